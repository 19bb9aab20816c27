"""Block-diagonal online rotations for QuaRot (issue 26): orthogonal, exact in float, readable
aux entries (old scalar ones included), and docs/quarot.md quoting benchmarks/rotation_blocks.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

import jquant.nn
from jquant import policy
from jquant.algorithms import quarot as Q
from jquant.algorithms import rtn
from jquant.algorithms.linear_tree import get_aux, jitted_apply, layer_statistics, relative_error, update_layer
from jquant.algorithms.toy import one_layer
from jquant.hadamard import apply_block_hadamard, apply_hadamard, hadamard_matrix
from jquant.pipeline.denoiser import tiny_wan_bundle
from jquant.transform import Context

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "_rotation_blocks_table", ROOT / "scripts" / "rotation_blocks_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the transform ---------------------------------------------------------------------------------------
@settings(max_examples=25)
@given(block=st.sampled_from([2, 4, 8, 12, 16]), blocks=st.integers(1, 4), transpose=st.booleans())
def test_block_hadamard_is_the_dense_block_diagonal_and_orthogonal(block, blocks, transpose):
    n = block * blocks
    x = jnp.asarray(np.random.default_rng(n).standard_normal((3, n)), jnp.float32)
    h = scipy.linalg.block_diag(*[np.asarray(hadamard_matrix(block))] * blocks)
    want = x @ (h.T if transpose else h)
    y = apply_block_hadamard(x, block, transpose=transpose)
    chex.assert_trees_all_close(y, want, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(apply_block_hadamard(y, block, transpose=not transpose), x, rtol=1e-5, atol=1e-5)


def test_block_hadamard_full_width_cases_and_errors():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 24)), jnp.float32)
    for block in (None, 24, 48):  # None or a block at least the width: the full-width H
        chex.assert_trees_all_close(apply_block_hadamard(x, block), apply_hadamard(x), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(  # along another axis
        apply_block_hadamard(x.T, 8, axis=0), apply_block_hadamard(x, 8).T, rtol=1e-6, atol=1e-6
    )
    with pytest.raises(ValueError, match="length 24 along axis 1 is not a multiple of block 16"):
        apply_block_hadamard(x, 16)


# --- the aux entry -----------------------------------------------------------------------------------------
def test_aux_entry_format_keeps_the_old_scalar():
    assert jquant.nn.hadamard_entry().shape == () and jquant.nn.hadamard_block(jnp.ones(())) is None
    assert jquant.nn.hadamard_block(jquant.nn.hadamard_entry(128)) == 128
    # an older checkpoint's entry (scalar, any dtype) still means the full-width rotation
    rng = np.random.default_rng(1)
    x, w = (
        jnp.asarray(rng.standard_normal((4, 32)), jnp.float32),
        jnp.asarray(rng.standard_normal((32, 8)), jnp.float32),
    )
    model, v = one_layer(apply_hadamard(w, axis=0))
    old = update_layer(v, "layer", aux={"hadamard": jnp.ones((), jnp.float32)})
    chex.assert_trees_all_close(jquant.nn.apply(model, old, x), x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [None, 8, 16, 64])
def test_rotate_input_with_blocks_is_exact_and_composes(block):
    k = 48 if block != 16 else 64
    rng = np.random.default_rng(k)
    x, w, a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((16, k), (k, 24), (k, 4), (4, 24)))
    model, variables = one_layer(w)
    variables = update_layer(
        variables, "layer", aux={"input_mul": jnp.linspace(0.5, 2.0, k), "lowrank_a": a, "lowrank_b": b}
    )
    y = jquant.nn.apply(model, variables, x)
    rotated = Q.rotate_input(variables, "layer", seed=3, block=block)
    entry = get_aux(rotated, "layer")["hadamard"]
    assert jquant.nn.hadamard_block(entry) == (block if block is not None and block < k else None)
    chex.assert_trees_all_close(jquant.nn.apply(model, rotated, x), y, rtol=1e-5, atol=1e-4)
    # the observer (calibration) sees the block-rotated input
    seen = {}
    with jquant.nn.observe(lambda p, xx: seen.setdefault(p, xx)):
        jquant.nn.apply(model, rotated, x)
    d = get_aux(rotated, "layer")["input_mul"]
    chex.assert_trees_all_close(seen["layer"], apply_block_hadamard(x * d, block), rtol=1e-5, atol=1e-5)


def test_bad_blocks_are_refused():
    model, v = one_layer(jnp.ones((48, 4), jnp.float32))
    with pytest.raises(ValueError, match="layer: input width 48 is not a multiple of online_block 32"):
        Q.rotate_input(v, "layer", block=32)
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="online_block must be an integer >= 2"):
            Q.QuaRotConfig(online_block=bad)
    with pytest.raises(ValueError, match="quarot.transform: online_block"):
        Q.transform(online_block=1)


# --- every candidate of the table is an exact rewrite of the bundled model -----------------------------------
@pytest.fixture(scope="module")
def tiny():
    bundle = tiny_wan_bundle(num_steps=2)
    work = bundle.workload(2, 0)
    t = jnp.full((2,), 500.0, jnp.float32)
    inputs = (work.x_T, t, work.cond)
    module = bundle.denoiser.module
    ctx = Context(bundle.roles, bundle.head_dim, 128, lambda v: layer_statistics(module, v, *inputs))
    return bundle, module, inputs, ctx


@pytest.mark.slow
def test_every_candidate_is_exact_in_float(tiny):
    bundle, module, inputs, ctx = tiny
    variables = {"params": bundle.params}
    # Op by op, not jitted: each candidate's tree (its aux entries) would compile the whole model
    # again (~1.7 s each), while the eager ops' programs, compiled for the first, serve them all.
    y = jquant.nn.apply(module, variables, *inputs)
    cands = _script().candidates(0)
    assert {"full width", "block 256", "block 128", "block 32", "mixed (smooth FFN down)"} <= set(cands)
    for name, rotate in cands.items():
        rotated = rotate(variables, ctx)
        err = relative_error(jquant.nn.apply(module, rotated, *inputs), y)
        assert err < 1e-5, (name, err)
        down = get_aux(rotated, "blocks_0/ffn/net_2")
        up = get_aux(rotated, "blocks_0/ffn/net_0/proj")
        if name.startswith("block"):
            b = int(name.split()[1].rstrip(","))
            assert jquant.nn.hadamard_block(down["hadamard"]) == (b if b < 512 else None), name
            assert jquant.nn.hadamard_block(up["hadamard"]) == (b if b < 128 else None), name
            # The attention output projection: online unless the candidate keeps it offline only.
            o = get_aux(rotated, "blocks_0/attn1/to_out_0")
            assert ("hadamard" in o) == ("O offline" not in name), name
        elif name.startswith("mixed"):  # smoothing, no rotation, on the FFN-down input only
            assert "hadamard" not in down and "input_mul" in down and "hadamard" in up, name
        else:
            assert jquant.nn.hadamard_block(down["hadamard"]) is None, name


@pytest.mark.parametrize("backend,block", [("cpu", None), ("gpu", Q.GPU_ONLINE_BLOCK)])
def test_auto_block_is_128_on_a_gpu_and_full_width_elsewhere(tiny, monkeypatch, backend, block):
    """The W8A8 QuaRot recipes' ``online_block="auto"``: resolved when the transform runs."""
    from jquant.pipeline import recipes  # pylint: disable=import-outside-toplevel

    bundle, _, _, ctx = tiny
    monkeypatch.setattr(Q.jax, "default_backend", lambda: backend)
    assert Q.resolve_online_block("auto") == block and Q.resolve_online_block(64) == 64
    rotated = Q.transform(0, online_block="auto")({"params": bundle.params}, ctx)
    down = get_aux(rotated, "blocks_0/ffn/net_2")  # 512 wide: the only input the block splits
    assert jquant.nn.hadamard_block(down["hadamard"]) == block
    for name in ("int8-wa-quarot", "fp8-quarot"):
        assert recipes.get(name).transform.name.startswith("quarot[block auto] -> "), name
    assert recipes.get("w4a4-quarot").transform.name.startswith("quarot -> ")  # int4 activations: full width


def test_block_rotation_changes_the_quantized_model(tiny):
    """Not a no-op: a block-diagonal rotation quantizes differently from the full-width one."""
    bundle, module, inputs, ctx = tiny
    run = jitted_apply(module)
    v = {"params": bundle.params}
    w4 = rtn.transform(policy.uniform("int4"))
    full, blk = (w4(Q.transform(0, online_block=b)(v, ctx), ctx) for b in (None, 32))
    y_full, y_blk = (run(r, *inputs, act="int4/token") for r in (full, blk))
    assert relative_error(y_blk, y_full) > 1e-3


# --- the table script and the docs ----------------------------------------------------------------------------
def _fake_result(script):
    rows = lambda psnr, step: [  # noqa: E731
        {"precision": p, "candidate": c, "psnr": psnr[c], "one_step": step[c], "seconds": 1.0}
        for p in script.PRECISIONS
        for c in psnr
    ]
    tiny = rows(
        {"full width": 30.0, "block 128": 29.8, "block 32": 29.0},
        {"full width": 0.1, "block 128": 0.1, "block 32": 0.1},
    )
    stress = rows(
        {"full width": 9.0, "block 128": 9.0, "block 32": 9.0}, {"full width": 1.0, "block 128": 1.05, "block 32": 1.2}
    )
    return {"testbeds": {"tiny": tiny, "stress": stress}}


def test_verdicts_apply_both_targets():
    script = _script()
    v = script.verdicts(_fake_result(script))
    assert v == {"block 128": {"W8A8": True, "W4A8": True}, "block 32": {"W8A8": False, "W4A8": False}}
    md = script.markdown(_fake_result(script))
    assert "| W8A8 | block 128 | 29.80 | 0.1000 | 9.00 | 1.0500 | yes |" in md
    assert "| W4A8 | full width | 30.00 | 0.1000 | 9.00 | 1.0000 | reference |" in md


def test_docs_quote_the_json():
    res = json.loads((ROOT / "benchmarks" / "rotation_blocks.json").read_text())
    section = (ROOT / "docs" / "quarot.md").read_text().split("## Block-diagonal online rotations", 1)[1]
    table = _script().markdown(res)
    assert table.strip() in section, "docs/quarot.md's table differs from markdown(benchmarks/rotation_blocks.json)"
    assert res["command"].startswith("python3 scripts/rotation_blocks_table.py") and res["commit"]
    assert f"{res['settings']['clips']} clips" in section and f"{res['settings']['steps']} steps" in section
