"""jquant.sharding on one device (plans, errors, the 1-device mesh) and, in a child process, the
8-device CPU mesh checks of tests/test_sharding_mesh.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import _draws as draws
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AbstractMesh

from jquant.qarray import quantize
from jquant.sharding import axes as A
from jquant.sharding import sequence_parallel
from jquant.sharding.attention import SequenceParallel

ROOT = Path(__file__).resolve().parents[1]


#: quantize as one compiled program per (shape, spec) instead of one per op (the same codes and scales)
_quantize = jax.jit(quantize, static_argnums=1)


def _mesh(**sizes: int) -> AbstractMesh:
    return AbstractMesh(tuple(sizes.values()), tuple(sizes))


def _weights(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """Weights for the plan tests, drawn with numpy: a plan depends on shapes only, and a jax
    draw compiles one program per shape."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def test_logical_axes_from_paths_and_roles():
    params = {
        "blocks_0": {
            "attn1": {
                "to_q": {"kernel": jnp.zeros((8, 16)), "bias": jnp.zeros((16,))},
                "to_out_0": {"kernel": jnp.zeros((16, 8)), "bias": jnp.zeros((8,))},
                "norm_q": {"scale": jnp.zeros((16,))},
            },
            "ffn": {"net_0": {"proj": {"kernel": jnp.zeros((8, 32))}}, "net_2": {"kernel": jnp.zeros((32, 8))}},
        },
        "proj_out": {"kernel": jnp.zeros((8, 4))},
    }
    axes = A.logical_axes(params)
    assert axes["blocks_0/attn1/to_q/kernel"] == ("embed", "heads")
    assert axes["blocks_0/attn1/to_q/bias"] == ("heads",)
    assert axes["blocks_0/attn1/to_out_0/kernel"] == ("heads", "embed")
    assert axes["blocks_0/attn1/to_out_0/bias"] == ("embed",)
    assert axes["blocks_0/attn1/norm_q/scale"] == (None,)
    assert axes["blocks_0/ffn/net_0/proj/kernel"] == ("embed", "mlp")
    assert axes["blocks_0/ffn/net_2/kernel"] == ("mlp", "embed")
    assert axes["proj_out/kernel"] == ("in", "out")
    # roles override the names (e.g. a single-stream block's fused projections)
    roles = {"proj_out/kernel": ("ffn.down",)}
    assert A.logical_axes(params, roles)["proj_out/kernel"] == ("mlp", "embed")


def test_tp_plan_is_megatron_column_then_row():
    params = {"attn": {"to_q": {"kernel": jnp.zeros((256, 256))}, "to_out_0": {"kernel": jnp.zeros((256, 256))}}}
    plan = A.plan(params, _mesh(data=2, model=4), "tp")
    assert plan["attn/to_q/kernel"].spec == jax.sharding.PartitionSpec(None, "model")
    assert plan["attn/to_out_0/kernel"].spec == jax.sharding.PartitionSpec("model", None)
    fsdp_tp = A.plan(params, _mesh(data=2, model=4), "fsdp_tp")
    assert fsdp_tp["attn/to_q/kernel"].spec == jax.sharding.PartitionSpec("data", "model")
    assert fsdp_tp["attn/to_q/kernel"].device_nbytes == 256 * 256 * 4 // 8


def test_group_scales_never_split_a_group():
    w = quantize(_weights(0, (512, 64)), "int4/g128")  # 4 groups along K
    params = {"ffn": {"net_2": {"kernel": w}}}
    four = A.plan(params, _mesh(model=4), "tp")["ffn/net_2/kernel"]
    assert four.mesh_axes == ("model", None) and four.kept_whole == ()
    eight = A.plan(params, _mesh(model=8), "tp")["ffn/net_2/kernel"]
    assert eight.mesh_axes == (None, None) and "4 scale groups would be cut by 8 shards" in eight.kept_whole[0]
    # sharded children: codes (packed two per byte) and scales split along the same logical axis
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("model",))
    sh = A.leaf_sharding(w, four, mesh)
    assert sh.qvalue.spec == jax.sharding.PartitionSpec("model", None)
    assert sh.scale.spec == jax.sharding.PartitionSpec("model", None)


def test_gguf_blocks_split_whole():
    w = quantize(_weights(0, (512, 32)), "q4_k")  # 2 blocks of 256 along K
    params = {"ffn": {"net_2": {"kernel": w}}}
    two = A.plan(params, _mesh(model=2), "tp")["ffn/net_2/kernel"]
    assert two.mesh_axes == ("model", None)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("model",))
    # ggml rows: qvalue [N, blocks, bytes]; K splits the block axis
    assert A.leaf_sharding(w, two, mesh).qvalue.spec == jax.sharding.PartitionSpec(None, "model", None)
    four = A.plan(params, _mesh(model=4), "tp")["ffn/net_2/kernel"]
    assert four.mesh_axes == (None, None) and "2 q4_k blocks do not split into 4" in four.kept_whole[0]


@settings(max_examples=12)
@given(
    k_groups=st.sampled_from([1, 2, 4, 8]),
    group=st.sampled_from([32, 64, 128]),
    n=st.sampled_from([16, 48, 64]),
    shards=st.sampled_from([2, 3, 4, 8]),
    spec=st.sampled_from(["int4/g{g}", "int8/g{g}", "uint4/g{g}", "int8"]),
)
def test_plans_keep_blocks_whole(k_groups, group, n, shards, spec):
    """Any int/uint QArray, any shard count: a split dimension splits codes and scales into equal
    whole-group pieces, and the per-device bytes are what the pieces add up to."""
    k = k_groups * group
    w = _quantize(_weights(k, (k, n)), spec.format(g=group))
    params = {"x": {"net_2": {"kernel": w}}, "y": {"to_q": {"kernel": w}}}
    for p in A.plan(params, _mesh(model=shards), "tp").values():
        q = w
        for dim, axis in enumerate(p.mesh_axes):
            if axis is None:
                continue
            assert q.shape[dim] % shards == 0 and q.qvalue.shape[dim] % shards == 0
            assert q.scale.shape[dim] == 1 or q.scale.shape[dim] % shards == 0
        split = [d for d, a in enumerate(p.mesh_axes) if a is not None]
        per = sum(
            int(c.nbytes) // (shards if split and c.ndim == q.ndim and c.shape[split[0]] > 1 else 1)
            for c in (q.qvalue, q.scale, q.zero_point)
            if c is not None
        )
        assert p.device_nbytes == per


def test_bad_rules_and_meshes_are_named():
    params = {"to_q": {"kernel": jnp.zeros((8, 8))}}
    with pytest.raises(ValueError, match="mode 'zigzag' is not one of"):
        A.plan(params, _mesh(data=2), "zigzag")
    with pytest.raises(ValueError, match="names an axis the mesh lacks"):
        A.plan(params, _mesh(data=2), [("heads", "model")])
    with pytest.raises(ValueError, match="needs 4 devices"):
        A.make_mesh({"data": 4}, jax.devices()[:1])
    mesh = A.make_mesh({"seq": 1}, jax.devices()[:1])
    with pytest.raises(ValueError, match="mode 'star'"):
        SequenceParallel(mesh, "seq", mode="star")
    with pytest.raises(ValueError, match="axis 'data' is not in the mesh"):
        SequenceParallel(mesh, "data")


def test_one_device_mesh_runs_the_sharded_path():
    """The code path the GPU's 1-device benchmark times: placed params, the hook installed."""
    from jquant.models.attention import attention

    mesh = A.make_mesh({"seq": 1}, jax.devices()[:1])
    q, k, v = (draws.normal(jax.random.key(i), (1, 16, 2, 32)) for i in range(3))
    with sequence_parallel(mesh, "seq"):
        out = jax.jit(attention)(q, k, v)
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), atol=1e-6)
    params = {"to_q": {"kernel": jnp.ones((8, 8))}}
    placed, plan = A.shard_params(params, A.make_mesh({"data": 1, "model": 1}, jax.devices()[:1]), "fsdp_tp")
    assert A.device_bytes(placed) == {str(jax.devices()[0]): 256} and A.expected_device_bytes(plan) == 256
    # jit without placing first: the sharding tree mirrors QArray leaves
    qparams = {"to_q": {"kernel": quantize(jax.random.normal(jax.random.key(0), (256, 8)), "int4/g128")}}
    mesh2 = A.make_mesh({"data": 1, "model": 1}, jax.devices()[:1])
    tree = A.shardings(qparams, mesh2, A.plan(qparams, mesh2, "fsdp_tp"))
    out = jax.jit(lambda p: p["to_q"]["kernel"].dequantize(), in_shardings=(tree,))(qparams)
    np.testing.assert_array_equal(out, qparams["to_q"]["kernel"].dequantize())


@pytest.mark.slow
def test_eight_device_mesh_in_a_child_process():
    """tests/test_sharding_mesh.py on a simulated 8-device CPU mesh (one child: one JAX start)."""
    # LLVM's cheap pipeline: the child's tiny programs are compile-bound (a third faster in all), and
    # both sides of every comparison (sharded, single-device) are compiled alike. XLA:CPU's older
    # elemental emitters instead of its MLIR fusion emitters compile them in about half the time
    # again (the child's CPU time 140 -> 80 s); results stay within float rounding.
    fast_compile = (
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
        " --xla_cpu_use_fusion_emitters=false"
    )
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {fast_compile}", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_sharding_mesh.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail


def test_docs_example_runs():
    """docs/sharding.md's example (on however many devices this process has) and its quantized
    attention step: Ulysses on a 1-device mesh equals the unsharded quantized attention."""
    import re

    from jquant.attention import quantized_attention

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "sharding.md").read_text(), re.S)
    ns: dict = {}
    exec(blocks[0], ns)  # noqa: S102  (the page's own example; it asserts its results)
    exec(blocks[1], ns)  # noqa: S102  (tensor_parallel)
    exec(blocks[2], ns)  # noqa: S102
    args = (ns["qparams"], ns["x"], ns["t"], ns["text"])

    def unsharded(p, x, t, text):
        with quantized_attention(roles=("self_attn",)):
            return ns["step"](p, x, t, text)

    ref = jax.jit(unsharded)(*args)
    np.testing.assert_allclose(jax.jit(ns["step_sp_quant"])(*args), ref, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(ref - ns["ref"]).max()) > 1e-4  # quantized attention did run
