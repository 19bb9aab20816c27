"""Trajectory calibration, scale tables through the jitted sampler, per-step precision."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _pipeline_util import tiny_bundle
from hypothesis import given, settings
from hypothesis import strategies as st

import jquant.nn as jnn
from jquant.dispatch import quantize_activation
from jquant.formats import parse_spec
from jquant.pipeline import calibrate as C
from jquant.pipeline import runtime as R
from jquant.pipeline import tables as TB
from jquant.pipeline import timesteps as schedule
from jquant.pipeline import trajectory as T
from jquant.qarray import QArray, dequantize
from jquant.rules import flatten_with_paths, leaf_nbytes, quantize_params

W8 = [(r"condition_embedder|patch_embedding|proj_out", None), (".*", "int8")]


@pytest.fixture(scope="module")
def setup():
    b = tiny_bundle()
    cal = C.Calibrator(b, C.CalibrationConfig(num_samples=4, batch=2, seed=7))
    q = {"params": quantize_params(b.params, W8)[0]}
    return b, cal, q


def test_record_and_ranges_match_the_replayed_inputs(setup):
    b, cal, _ = setup
    traj = cal.trajectories
    assert traj.num_steps == 3 and traj.cfg and traj.frames == 2 and traj.tokens == 8
    assert [w.labels for w, _ in traj.items] == [(0, 1), (2, 3)]  # classes/prompts cycle across batches
    chex.assert_shape(traj.items[0][1], (4, 2, 1, 2, 8, 8))  # T + 1 latents, x_T first
    rng = cal.ranges({"params": b.params})
    assert "blocks_0/attn1/to_q" in rng.video and "blocks_0/attn2/to_k" not in rng.video
    chex.assert_shape(rng.absmax["blocks_0/attn1/to_q"], (3, 2, 2))
    chex.assert_shape(rng.absmax["blocks_0/attn2/to_k"], (3, 2, 1))  # text tokens: no frames
    assert rng.ranks["condition_embedder/time_proj"] == 2 and rng.ranks["blocks_0/ffn/net_2"] == 3

    # brute force: step 1, conditional branch, the to_q input of every sample, per frame
    def capture(x, t, cond):
        seen = {}
        with jnn.observe(lambda path, a: seen.setdefault(path, a)):
            b.denoiser.apply({"params": b.params}, x, t, cond)
        return seen["blocks_0/attn1/to_q"]

    cap = jax.jit(capture)
    a = np.concatenate([np.asarray(cap(x[1], jnp.asarray(traj.timesteps[1]), w.cond)) for w, x in traj.items])
    per_frame = np.abs(a).reshape(a.shape[0], 2, 4, -1).max(axis=(0, 2, 3))
    np.testing.assert_allclose(rng.absmax["blocks_0/attn1/to_q"][1, T.COND], per_frame, rtol=1e-6)
    assert np.all(rng.absmax["blocks_0/attn2/to_k"][:, T.UNCOND] != rng.absmax["blocks_0/attn2/to_k"][:, T.COND])
    samples = cal.samples({"params": b.params}, max_tokens=40)  # rows drawn over every step and branch
    assert samples["blocks_0/attn1/to_q"].shape == (40, 64) and samples["condition_embedder/time_proj"].shape == (
        12,
        64,
    )


def test_layer_stats_keyed_by_group_and_branch(setup):
    b, cal, _ = setup
    traj = cal.trajectories
    groups = np.array([0, 0, 1])
    st_ = T.layer_stats(b.denoiser, {"params": b.params}, traj, groups=groups)
    assert set(st_) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    path = "blocks_0/attn1/to_q/kernel"
    assert (
        float(st_[(0, 1)][path].count) == 2 * float(st_[(1, 1)][path].count) == 2 * 4 * 8
    )  # 2 steps vs 1, 4 samples x 8 tokens
    pooled = T.pooled_stats(st_)
    assert float(pooled[path].count) == 3 * 2 * 4 * 8  # 3 steps x 2 branches x 4 samples x 8 tokens
    sub = T.layer_stats(b.denoiser, {"params": b.params}, traj, steps_per_sample=1)
    assert float(T.pooled_stats(sub)[path].count) == 2 * 4 * 8  # one step per sample, both branches
    assert sorted(traj.steps_for(0, 1).tolist() + traj.steps_for(1, 1).tolist()) == [0, 1]
    with pytest.raises(ValueError, match="one entry per step"):
        list(traj.batches(groups=np.zeros(2)))


def test_build_table_groupings_and_values(setup):
    b, cal, q = setup
    rng = cal.ranges(q)
    layers = C.quantized_layers(q)
    assert "condition_embedder/time_proj" not in layers and "blocks_0/attn1/to_q" in layers
    single = TB.build_table(rng, "int8/t", TB.TableConfig("single"), layers)
    a = rng.absmax["blocks_0/attn1/to_q"]
    np.testing.assert_allclose(single.scales["blocks_0/attn1/to_q"], a.max().reshape(1, 1, 1) / 127, rtol=1e-6)
    full = TB.build_table(
        rng, "int8/t", TB.TableConfig("uniform", 3, per_branch=True, per_frame=True, margin=1.5), layers
    )
    np.testing.assert_allclose(full.scales["blocks_0/attn1/to_q"], a * 1.5 / 127, rtol=1e-6)
    chex.assert_shape(full.scales["blocks_0/attn2/to_k"], (3, 2, 1))
    var = TB.build_table(rng, "int8/t", TB.TableConfig("variance", 2), layers)
    expect = schedule.variance_aware_groups(rng.features()[:, [list(rng.absmax).index(p) for p in layers]], 2)
    np.testing.assert_array_equal(var.groups, expect)
    assert set(var.scales) == set(layers) and var.nbytes == 4 * 2 * len(layers)
    with pytest.raises(ValueError, match="static activation spec"):
        TB.build_table(rng, "int8/token")
    with pytest.raises(KeyError, match="not observed"):
        TB.build_table(rng, "int8/t", layers=["nope"])
    with pytest.raises(ValueError, match="grouping"):
        TB.TableConfig("kmeans")


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.booleans(), st.booleans(), st.sampled_from([2, 3, 4]))
def test_expand_maps_rows_to_branches_and_tokens_to_frames(b, frames, per_branch, cfg, rank):
    rows = 2 * b if cfg else b
    tokens_per_frame = 3
    s = np.arange(1, 1 + (2 if per_branch else 1) * frames, dtype=np.float32).reshape(-1, frames)
    video = rank >= 3
    out = np.asarray(TB.expand(jnp.asarray(s), rank, video, rows, cfg, frames, frames * tokens_per_frame))
    full = np.broadcast_to(out, (rows, *([1] * (rank - 3)), frames * tokens_per_frame, 1) if rank >= 3 else (rows, 1))
    for r in range(rows):
        branch = (1 if not cfg else r // b) if per_branch else 0
        for tok in range(frames * tokens_per_frame if video else 1):
            want = s[branch, tok // tokens_per_frame] if video else s[branch].max()
            got = full[(r, *([0] * (rank - 3)), tok, 0)] if rank >= 3 else full[r, 0]
            assert got == want


def test_per_token_static_scale_in_dispatch():
    x = jax.random.normal(jax.random.key(0), (4, 6, 16)) * jnp.arange(1, 5)[:, None, None]
    s = (jnp.max(jnp.abs(x), axis=(1, 2)) / 127)[:, None, None]  # one scale per batch row
    act = parse_spec("int8/t")
    got = dequantize(quantize_activation(x, act, s))
    for i in range(4):
        np.testing.assert_allclose(got[i], dequantize(quantize_activation(x[i], act, s[i, 0, 0])), rtol=1e-6)
    np.testing.assert_allclose(
        dequantize(quantize_activation(x, act, jnp.full((1,), 0.1))), dequantize(quantize_activation(x, act, 0.1))
    )
    with pytest.raises(ValueError, match="does not broadcast"):
        quantize_activation(x, act, jnp.ones((4, 6, 16)))


def test_table_threads_through_one_compiled_sampler(setup):
    """Equal rows give the same clip whatever their layout (branch/frame/group expansions
    agree), a different row changes it, and one trace serves every step and table value."""
    b, cal, q = setup
    den = b.denoiser
    work = b.workload(2, 0)
    rng = cal.ranges(q)
    layers = C.quantized_layers(q)
    single = TB.build_table(rng, "int8/t", TB.TableConfig("single"), layers)
    full = TB.build_table(rng, "int8/t", TB.TableConfig("uniform", 3, per_branch=True, per_frame=True), layers)
    same = TB.ScaleTable(
        full.act,
        full.groups,
        {p: np.broadcast_to(single.scales[p], full.scales[p].shape).copy() for p in full.scales},
        full.ranks,
        full.video,
        full.frames,
        full.config,
    )
    out_single = R.QuantizedModel(q, "int8/t", single).sample(den, work)
    traces = []
    orig = R._QuantStep.__call__

    def counting(self, *a):
        traces.append(1)
        return orig(self, *a)

    R._QuantStep.__call__ = counting
    try:
        out_same = R.QuantizedModel(q, "int8/t", same).sample(den, work)
        out_full = R.QuantizedModel(q, "int8/t", full).sample(den, work)
        halved = TB.ScaleTable(
            full.act,
            full.groups,
            {p: v * 0.5 for p, v in full.scales.items()},
            full.ranks,
            full.video,
            full.frames,
            full.config,
        )
        out_half = R.QuantizedModel(q, "int8/t", halved).sample(den, work)
    finally:
        R._QuantStep.__call__ = orig
    np.testing.assert_allclose(out_same, out_single, rtol=1e-5, atol=1e-5)
    assert len(traces) == 1  # one trace: the rows are traced step data
    assert np.all(np.isfinite(out_full)) and not np.allclose(out_full, out_half)
    dyn = R.QuantizedModel(q, "int8/token").sample(den, work)
    ref = R.float_model(b).sample(den, work)
    assert 0 < float(jnp.abs(dyn - ref).max()) < 0.5


def test_per_step_precision_switch(setup):
    b, cal, q = setup
    den, work = b.denoiser, b.workload(2, 0)
    q4 = {
        "params": quantize_params(
            b.params, [(r"condition_embedder|patch_embedding|proj_out", None), (".*", "int4/g32")]
        )[0]
    }
    layers = C.quantized_layers(q)
    m8 = R.QuantizedModel(q, "int8/t", TB.build_table(cal.ranges(q), "int8/t", TB.TableConfig("uniform", 2), layers))
    m4 = R.QuantizedModel(q4, "int8/token")
    outs = {}
    for name, choice in (("all4", [0, 0, 0]), ("all8", [1, 1, 1]), ("mixed", R.switch_schedule(3, 1))):
        fn, data = R.per_step_model_fn(den, [m4, m8], choice)
        outs[name] = den.sample(fn, work, step_data=data)
    np.testing.assert_allclose(outs["all4"], m4.sample(den, work), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs["all8"], m8.sample(den, work), rtol=1e-5, atol=1e-5)
    assert not np.allclose(outs["mixed"], outs["all4"]) and not np.allclose(outs["mixed"], outs["all8"])
    float_shared = sum(leaf_nbytes(leaf) for _, leaf in flatten_with_paths(q) if not isinstance(leaf, QArray))
    assert R.resident_bytes([m4, m8]) == R.tree_bytes(q) + R.tree_bytes(q4) - float_shared + m8.table.nbytes
    with pytest.raises(ValueError, match="one entry per step"):
        R.per_step_model_fn(den, [m4, m8], [0, 1])
    with pytest.raises(ValueError, match="index the 2 models"):
        R.per_step_model_fn(den, [m4, m8], [0, 1, 2])
