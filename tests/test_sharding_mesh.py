"""Sharded paths on a simulated 8-device CPU mesh, against the single-device results.

Runs only where JAX sees 8 devices: tests/test_sharding.py starts it in a child process with
``--xla_force_host_platform_device_count=8`` (the device count must be set before JAX starts,
and the rest of the suite runs on one CPU device). Run by hand with
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -q tests/test_sharding_mesh.py``.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jquant import calib, dispatch
from jquant import nn as jnn
from jquant.algorithms import gptq
from jquant.algorithms.distributed import gptq_spread
from jquant.attention import quantized_attention
from jquant.formats import parse_spec
from jquant.models.wan import WanConfig, WanTransformer3D
from jquant.models.wan import init_params as wan_init
from jquant.rules import quantize_params
from jquant.sharding import calib as scalib
from jquant.sharding import (
    device_bytes,
    expected_device_bytes,
    make_mesh,
    sequence_parallel,
    shard_params,
)

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices: run by tests/test_sharding.py in a child process"
)

# 8 heads of 64 (Ulysses over 8 devices), K = 512 / 1024: int4 groups of 128 and Q4_K blocks of 256
# split whole over the 2-way tensor-parallel axis; 32 video tokens, 8 text tokens, batch 2.
CONFIG = WanConfig(
    patch_size=(1, 2, 2),
    num_attention_heads=8,
    attention_head_dim=64,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=1024,
    num_layers=1,
)
BLOCK_KERNELS = r"blocks_\d+/.*/kernel$"
WEIGHTS = {"float": (None, None), "w8a8": ("int8", "int8/token"), "w4a16": ("int4/g128", None), "q4_k": ("q4_k", None)}
MESHES = {"fsdp": {"data": 8}, "tp": {"data": 4, "model": 2}, "fsdp_tp": {"data": 4, "model": 2}}
TIGHT = dict(atol=1e-5, rtol=1e-5)


# The weights are kept on the host (numpy), as a loaded checkpoint is: placing them on a mesh slices
# them there, where a device array would be cut by one compiled slicing program per shape and layout.
@functools.lru_cache(maxsize=None)
def _setup():
    params = jax.device_get(wan_init(CONFIG, jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (2, 4, 2, 8, 8))
    t = jnp.array([500.0, 300.0])
    text = jax.random.normal(jax.random.key(2), (2, 8, 32))
    return params, (x, t, text)


@functools.lru_cache(maxsize=None)
def _weights(kind: str):
    params, _ = _setup()
    spec, act = WEIGHTS[kind]
    if spec is not None:
        params, _ = quantize_params(params, [(BLOCK_KERNELS, spec)])
    return jax.device_get(params), act


def _forward(params, x, t, text, *, act=None, sp=None, quant_attn=False):
    model = WanTransformer3D(CONFIG)
    with jnn.quantized(act=act):
        if quant_attn:
            with quantized_attention(roles=("self_attn",)):
                if sp is None:
                    return model.apply({"params": params}, x, t, text)
                with sequence_parallel(*sp):
                    return model.apply({"params": params}, x, t, text)
        if sp is None:
            return model.apply({"params": params}, x, t, text)
        with sequence_parallel(*sp):
            return model.apply({"params": params}, x, t, text)


@functools.lru_cache(maxsize=None)
def _jitted(act: str | None, quant_attn: bool):
    """One compiled single-device step per (activation spec, attention) pair."""
    return jax.jit(functools.partial(_forward, act=act, quant_attn=quant_attn))


@functools.lru_cache(maxsize=None)
def _reference(kind: str, quant_attn: bool = False, act: bool = True):
    params, act_spec = _weights(kind)
    _, inputs = _setup()
    return np.asarray(_jitted(act_spec if act else None, quant_attn)(params, *inputs))


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@functools.lru_cache(maxsize=None)
def _sensitivity(kind: str, quant_attn: bool = False) -> float:
    """Relative change of the single-device output when the inputs move by 1e-6 (relative):
    what a last-bit difference upstream can legitimately do to this model."""
    params, act = _weights(kind)
    _, (x, t, text) = _setup()
    fn = _jitted(act, quant_attn)
    nudge = lambda a, seed: a * (1 + 1e-6 * jax.random.normal(jax.random.key(seed), a.shape))  # noqa: E731
    return _rel(fn(params, nudge(x, 5), t, nudge(text, 6)), _reference(kind, quant_attn))


def _assert_equal(out, ref, kind, quant_attn=False):
    """fp32 at tight tolerance where no activation is quantized. Quantized activations (W8A8's
    per-token int8, quantized attention's int8 q/k) turn a last-bit float difference upstream
    (a norm's or a partial sum's summation order under another partitioning) into one-code
    changes, which cross-attention to 8 text tokens spreads over the sample: a 1e-6 relative
    change of the text moves this W8A8 model's output by ~1e-3. There the sharded output must be
    within 3x of that sensitivity (and < 1%); the per-layer kernels are exact
    (test_w8a8_layers_exact) and the float paths tight (the float cases)."""
    out = np.asarray(out)
    if kind != "w8a8" and not quant_attn:
        np.testing.assert_allclose(out, ref, **TIGHT)
        return
    sens = _sensitivity(kind, quant_attn)
    assert _rel(out, ref) < min(1e-2, max(3 * sens, 1e-5)), (_rel(out, ref), sens)


@pytest.mark.parametrize("kind", sorted(WEIGHTS))
@pytest.mark.parametrize("mode", sorted(MESHES))
def test_weight_sharding_equals_single_device(mode, kind):
    params, act = _weights(kind)
    _, inputs = _setup()
    mesh = make_mesh(MESHES[mode])
    placed, plan = shard_params(params, mesh, mode)
    out = _jitted(act, False)(placed, *inputs)
    _assert_equal(out, _reference(kind), kind)

    # Per-device parameter bytes: what the plan says, read from the devices themselves.
    held = device_bytes(placed)
    assert len(held) == 8 and set(held.values()) == {expected_device_bytes(plan)}
    total = sum(p.nbytes for p in plan.values())
    shards = mesh.size if mode == "fsdp" else MESHES[mode]["model"] if mode == "tp" else mesh.size
    replicated = sum(p.nbytes for p in plan.values() if p.shards == 1)
    assert replicated < 0.02 * total, plan
    # every block kernel splits over the whole mode's axes; only small leaves stay replicated
    for path, p in plan.items():
        if path.startswith("blocks_0/") and path.endswith("/kernel"):  # or a reason: a block would be cut
            assert p.shards == shards or (p.shards > 1 and all("blocks" in r for r in p.kept_whole)), (path, p)
    if all(p.shards in (1, shards) for p in plan.values()):  # total / shards + replicated small leaves
        even = (total - replicated) / shards + replicated
        assert abs(held[next(iter(held))] - even) <= 0.01 * even, (held, even)


@pytest.mark.parametrize("mode", sorted(MESHES))
def test_w8a8_layers_exact(mode):
    """Each int8 kernel, split as the mode says, gives the unsharded layer's output bit for bit
    (int32 accumulation, per-token scales: partial sums and maxima are exact)."""
    params, act = _weights("w8a8")
    mesh = make_mesh(MESHES[mode])
    placed, plan = shard_params(params, mesh, mode)
    x = jax.device_put(jax.random.normal(jax.random.key(3), (8, 32, 1024)), NamedSharding(mesh, PartitionSpec("data")))
    layer = jax.jit(lambda x, w: dispatch.linear(x[..., : w.shape[0]], w, act=parse_spec(act)))
    blocks = placed["blocks_0"]
    for path in ("attn1/to_q", "attn1/to_out_0", "ffn/net_0/proj", "ffn/net_2"):
        module = functools.reduce(lambda d, k: d[k], path.split("/"), blocks)
        single = functools.reduce(lambda d, k: d[k], path.split("/"), params["blocks_0"])
        assert plan[f"blocks_0/{path}/kernel"].shards > 1
        np.testing.assert_array_equal(layer(x, module["kernel"]), layer(np.asarray(x), single["kernel"]))


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_sequence_parallel_float_equals_single_device(mode):
    params, _ = _weights("float")
    _, inputs = _setup()
    mesh = make_mesh({"data": 2, "seq": 4})

    def run(p, *a):
        model = WanTransformer3D(CONFIG)
        with sequence_parallel(mesh, "seq", batch_axis="data", mode=mode):
            return model.apply({"params": p}, *a)

    lowered = jax.jit(run).lower(params, *inputs)
    text = lowered.as_text()
    assert ("all_to_all" in text) == (mode == "ulysses") and ("collective_permute" in text) == (mode == "ring")
    np.testing.assert_allclose(np.asarray(jax.jit(run)(params, *inputs)), _reference("float"), **TIGHT)


@pytest.mark.parametrize("kind", ["w4a16", "w8a8"])
def test_ulysses_runs_quantized_attention_per_shard(kind):
    params, act = _weights(kind)
    _, inputs = _setup()
    mesh = make_mesh({"seq": 8})
    out = jax.jit(functools.partial(_forward, act=act, sp=(mesh, "seq"), quant_attn=True))(params, *inputs)
    quantized_ref = _reference(kind, quant_attn=True)
    _assert_equal(out, quantized_ref, kind, quant_attn=True)
    # the quantized kernel ran (its result is not the float attention's)
    assert np.abs(np.asarray(out) - _reference(kind)).max() > 1e-4


def test_distributed_hessians_equal_single_device():
    params, _ = _setup()
    model = WanTransformer3D(CONFIG)
    rng = np.random.default_rng(0)
    batches = [
        (
            rng.standard_normal((4, 4, 2, 8, 8), np.float32),
            np.full((4,), 400.0 + i, np.float32),
            rng.standard_normal((4, 8, 32), np.float32),
        )
        for i in range(1)
    ]

    def apply_fn(p, b):
        return model.apply({"params": p}, *b)

    single = calib.calibrate(apply_fn, params, batches, progress=False)
    mesh = make_mesh({"data": 4, "model": 2})
    placed, _ = shard_params(params, mesh, "fsdp_tp")
    spread = scalib.calibrate(apply_fn, placed, batches, mesh, scalib.leading_axis("data", mesh), progress=False)
    assert set(spread) == set(single)
    for path in single:
        h = np.asarray(single[path].hessian)
        np.testing.assert_allclose(spread[path].hessian, h, rtol=1e-5, atol=1e-6 * np.abs(h).max())
        chex.assert_trees_all_close(spread[path].count, single[path].count)
        # inputs are computed under another partitioning: equal up to the last float bit, so a
        # value on a histogram bin edge may land one bin over
        top = float(np.abs(np.asarray(single[path].absmax)).max())
        np.testing.assert_allclose(spread[path].absmax, single[path].absmax, rtol=1e-5, atol=1e-5 * top)
        assert int(spread[path].hist.sum()) == int(single[path].hist.sum())
        assert int(np.abs(np.asarray(spread[path].hist) - np.asarray(single[path].hist)).sum()) <= 2e-3 * int(
            single[path].hist.sum()
        )

    x2 = jnp.asarray(rng.standard_normal((64, 48), np.float32))
    by_hand = scalib.sharded_batch_stats(x2, make_mesh({"data": 2, "seq": 4}), ("data", "seq"))
    one = calib.batch_stats(x2, calib.CalibConfig())
    np.testing.assert_allclose(by_hand.hessian, one.hessian, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(by_hand.absmax, one.absmax)
    np.testing.assert_array_equal(by_hand.hist, one.hist)
    assert float(by_hand.count) == 64


def test_gptq_spread_equals_gptq():
    rng = np.random.default_rng(1)
    # three shapes, b and c alike: each device compiles at most two programs (a sweep per shape)
    shapes = {"a": (128, 64), "b": (64, 64), "c": (64, 64), "d": (128, 128)}
    params = {name: {"kernel": jnp.asarray(rng.standard_normal(shape), jnp.float32)} for name, shape in shapes.items()}
    stats = {
        f"{name}/kernel": calib.batch_stats(
            jnp.asarray(rng.standard_normal((2 * shape[0], shape[0])), jnp.float32), calib.CalibConfig(histogram=False)
        )
        for name, shape in shapes.items()
    }
    single = gptq.gptq(params, stats, "int4/g64")
    spread, where = gptq_spread(params, stats, "int4/g64", devices=jax.devices()[:3])
    # largest first to the least loaded device: d alone, a alone, then b and c share a device
    assert where["d/kernel"] == jax.devices()[0] and where["a/kernel"] == jax.devices()[1]
    assert where["b/kernel"] == where["c/kernel"] == jax.devices()[2]
    assert spread["d"]["kernel"].qvalue.devices() == {jax.devices()[0]}
    chex.assert_trees_all_equal(jax.device_get(spread), jax.device_get(single))


def test_bench_sharded_tiny(tmp_path):
    """scripts/bench_sharded.py --tiny on the 8-device mesh: every mode checked, timed, written."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_sharded.py"
    spec = importlib.util.spec_from_file_location("bench_sharded", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # 8 text tokens and one 16x32 frame (not the 512 tokens, 5 frames of 32x64 of --tiny): the same
    # modes, checks, timings and file in a third less time
    argv = ["--tiny", "--modes", "fsdp,ulysses", "--runs", "10", "--profile-runs", "1", "--out-dir", str(tmp_path)]
    argv += ["--text-len", "8", "--frames", "1", "--height", "16", "--width", "32"]
    result = bench.main(argv)
    assert result["failures"] == 0 and result["devices"] == 8
    rows = {r["mode"]: r for r in result["rows"]}
    assert [r["status"] for r in rows.values()] == ["PASS"] * 3
    assert rows["fsdp"]["param_bytes_per_device"] < rows["unsharded"]["param_bytes_per_device"] / 4
    assert rows["ulysses"]["check"]["ok"] and len(rows["ulysses"]["times_ms"]) == 10
    assert "communication_share" in rows["fsdp"] and rows["fsdp"]["mesh"] == {"data": 8}
    written = list(tmp_path.glob("sharded-tiny-w8a8-8x*.json"))
    assert len(written) == 1 and '"commit"' in written[0].read_text()


@pytest.mark.parametrize("kind", ["float", "w4a16"])
def test_sharded_sampler_equals_single_device(kind):
    """The whole jitted sampler (scan, CFG) with weights FSDP over ``data``, the two CFG branches
    split over ``data`` and Ulysses attention over ``seq``."""
    from jquant.pipeline import denoiser as D
    from jquant.pipeline import sharded
    from jquant.pipeline.runtime import QuantizedModel

    params, _ = _weights(kind)
    bundle = D.wan_bundle(
        WanTransformer3D(CONFIG),
        params,
        CONFIG,
        num_steps=2,
        shift=1.0,
        guidance_scale=3.0,
        frames=2,
        size=8,
        text_tokens=8,
    )
    den, work = bundle.denoiser, bundle.workload(2, 0)
    model = QuantizedModel({"params": params}, None)
    ref = np.asarray(model.sample(den, work))
    mesh = make_mesh({"data": 2, "seq": 4})
    fn, _, plan = sharded.sharded_model_fn(model, den, mesh, rules="fsdp", cfg_axis="data", sequence_axis="seq")
    assert (
        plan["blocks_0/ffn/net_2/kernel"].shards == 2
        and fn.args[0]["params"]["proj_out"]["kernel"].sharding.mesh == mesh
    )
    out = sharded.sample(model, den, work, mesh, rules="fsdp", cfg_axis="data", sequence_axis="seq")
    np.testing.assert_allclose(np.asarray(out), ref, **TIGHT)
    with pytest.raises(ValueError, match="axis 'cfg' is not in the mesh"):
        sharded.sharded_model_fn(model, den, mesh, cfg_axis="cfg")


@pytest.mark.parametrize("kind", ["float", "w4a16", "q4_k", "w8a8"])
def test_tensor_parallel_linears_per_shard(kind):
    """tensor_parallel: each split Dense under shard_map (the quantized GEMM per shard), row-parallel
    outputs summed by one psum. W8A8's row-parallel layers use per-shard activation scales: not
    the single-device numerics, but at least as close to the float model."""
    from jquant.sharding import tensor_parallel

    params, act = _weights(kind)
    _, inputs = _setup()
    mesh = make_mesh(MESHES["tp"])
    placed, plan = shard_params(params, mesh, "tp")

    def run(p, x, t, text):
        with tensor_parallel(mesh, plan, "model", batch_axis="data"), jnn.quantized(act=act):
            return WanTransformer3D(CONFIG).apply({"params": p}, x, t, text)

    jaxpr = str(jax.make_jaxpr(run)(placed, *inputs))
    split = [p for p in plan.values() if "model" in p.mesh_axes and p.path.endswith("/kernel")]
    rows = [p for p in split if p.mesh_axes[0] == "model"]
    assert jaxpr.count("shard_map") == len(split) and jaxpr.count("psum") == len(rows) == 3
    out = np.asarray(jax.jit(run)(placed, *inputs))
    if kind != "w8a8":
        np.testing.assert_allclose(out, _reference(kind), **TIGHT)
        return
    float_out = _reference("float")
    assert _rel(out, _reference(kind)) < 1e-2
    assert _rel(out, float_out) <= 1.02 * _rel(_reference(kind), float_out)


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_sequence_parallel_key_mask_and_cross_attention(mode):
    """A [B, 1, 1, Tk] key mask travels with the keys (ring: around the ring); cross-attention
    (other keys than the queries' tokens) splits only the queries."""
    from jquant.models.attention import attention

    mesh = make_mesh({"data": 2, "seq": 4})
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 32, 8, 16)) for i in range(3))
    mask = jax.random.bernoulli(jax.random.key(7), 0.7, (2, 1, 1, 32)).at[:, :, :, 0].set(True)
    text_k, text_v = (jax.random.normal(jax.random.key(10 + i), (2, 6, 8, 16)) for i in range(2))

    def run(q, k, v, mask, tk, tv):
        with sequence_parallel(mesh, "seq", batch_axis="data", mode=mode):
            return attention(q, k, v, mask), attention(q, tk, tv)

    masked, cross = jax.jit(run)(q, k, v, mask, text_k, text_v)
    np.testing.assert_allclose(masked, jax.nn.dot_product_attention(q, k, v, mask=mask), **TIGHT)
    np.testing.assert_allclose(cross, jax.nn.dot_product_attention(q, text_k, text_v), **TIGHT)
