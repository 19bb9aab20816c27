"""QuaRot for DiTs (jquant.algorithms.quarot): exact rotations, then better 4-bit quality."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant.nn
from jquant import models
from jquant.algorithms import fold
from jquant.algorithms import quarot as Q
from jquant.algorithms.fold import aux_collection
from jquant.algorithms.gptq import gptq
from jquant.algorithms.linear_tree import get_aux, jitted_apply, layer_statistics, relative_error, update_layer
from jquant.algorithms.smoothquant import SmoothQuantConfig, smoothquant_search
from jquant.algorithms.svd import CorrectionConfig, lowrank_correction
from jquant.algorithms.toy import one_layer, outlier_block, rope
from jquant.hadamard import random_hadamard
from jquant.models import dit, flux, wan
from jquant.rules import quantize_params

W4 = [("adaLN", None), (".*", "int4")]  # the modulation stays in float


def _block_config(**kw):
    return Q.QuaRotConfig(skip="adaLN", vo_groups=((("to_v",), ("to_out",)),), head_dim=32, **kw)


@pytest.fixture(scope="module")
def block():
    blk, variables, (x, c) = outlier_block(
        seed=0, dim=128, heads=4, mlp=256, tokens=32, batch=4, qk_norm=True, use_rope=True
    )
    run = jitted_apply(blk)
    return blk, variables, x, c, run(variables, x, c), run


def _quantize(variables, rules=W4):
    return {**variables, "params": quantize_params(variables["params"], rules)[0]}


@pytest.mark.parametrize("k", [96])
def test_rotate_input_is_exact_and_composes_with_existing_aux(k):
    rng = np.random.default_rng(k)
    x, w, a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((16, k), (k, 24), (k, 4), (4, 24)))
    model, variables = one_layer(w)
    mul = jnp.linspace(0.5, 2.0, k)
    variables = update_layer(variables, "layer", aux={"input_mul": mul, "lowrank_a": a, "lowrank_b": b})
    y = jquant.nn.apply(model, variables, x)
    rotated = Q.rotate_input(variables, "layer", seed=3)
    aux = get_aux(rotated, "layer")
    assert "hadamard" in aux and not bool(jnp.allclose(aux["input_mul"], mul))
    chex.assert_trees_all_close(jquant.nn.apply(model, rotated, x), y, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="layer: already has an online Hadamard"):
        Q.rotate_input(rotated, "layer")


def test_quarot_block_is_exact_in_float(block):
    blk, variables, x, c, y, run = block
    rotated = Q.quarot(variables, None, _block_config())
    for p in ("to_q", "to_k", "to_v", "to_out", "ff_up", "ff_down"):
        assert "hadamard" in get_aux(rotated, p)
    assert "hadamard" not in get_aux(rotated, "adaLN")
    assert relative_error(run(rotated, x, c), y) < 1e-5


def test_qk_fold_needs_no_rope_online_rotation_after_rope_is_exact(block):
    blk, variables, x, c, y, run = block  # this block has RoPE and affine q/k RMSNorms
    folded = Q.quarot(variables, None, _block_config(qk_groups=((("to_q",), ("to_k",)),)))
    assert relative_error(run(folded, x, c), y) > 1e-3
    # applied after RoPE the rotation leaves the scores unchanged
    q, k = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2, 10, 4, 32)), jnp.float32)
    qr, kr = Q.rotate_qk_online(rope(q), rope(k), random_hadamard(32, 5))
    s, sr = jnp.einsum("bqhd,bkhd->bhqk", rope(q), rope(k)), jnp.einsum("bqhd,bkhd->bhqk", qr, kr)
    chex.assert_trees_all_close(sr, s, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def quantized(block):
    """The same block quantized (int4 per channel) by each method, on the same calibration
    data: ``{method: (quantized tree, float tree in the same basis, its statistics)}``."""
    blk, variables, x, c, y, run = block
    stats = layer_statistics(blk, variables, x, c)
    rotated = Q.quarot(variables, None, _block_config())
    rstats = layer_statistics(blk, rotated, x, c)
    scales, _ = smoothquant_search(variables["params"], stats, W4, SmoothQuantConfig(alpha=0.5))
    params, aux = fold.smooth(variables["params"], scales)
    smoothed = {"params": params, "jquant": aux_collection(aux)}
    sstats = {p: fold.smooth_stats(st, scales[p]) if p in scales else st for p, st in stats.items()}
    return {
        "rtn": (_quantize(variables), variables, stats),
        "smoothquant": (_quantize(smoothed), smoothed, sstats),
        "gptq": ({**variables, "params": gptq(variables["params"], stats, W4)}, variables, stats),
        "quarot_rtn": (_quantize(rotated), rotated, rstats),
        "quarot": ({**rotated, "params": gptq(rotated["params"], rstats, W4)}, rotated, rstats),
    }


def test_quarot_beats_rtn_and_smoothquant(block, quantized):
    """QuaRot as published (rotations + GPTQ) and with RTN, against RTN and SmoothQuant, at W4A4 and W4A8."""
    blk, variables, x, c, y, run = block
    for act in ("int4/token", "int8/token"):
        err = {k: relative_error(run(v[0], x, c, act=act), y) for k, v in quantized.items()}
        assert err["quarot"] < err["rtn"] and err["quarot"] < err["smoothquant"], (act, err)
        assert err["quarot_rtn"] < err["rtn"], (act, err)


def test_bad_rotations_are_refused(block):
    blk, variables, *_ = block
    with pytest.raises(ValueError, match="not orthogonal"):
        Q.rotate_heads(variables, ["to_v"], ["to_out"], jnp.ones((32, 32)))
    with pytest.raises(ValueError, match="to_v: output width 128 is not a multiple of head_dim 48"):
        Q.rotate_heads(variables, ["to_v"], ["to_out"], random_hadamard(48, 0))
    with pytest.raises(ValueError, match="to_q: rotate_input must run before quantization"):
        Q.rotate_input(_quantize(variables), "to_q")
    online = Q.rotate_input(variables, "to_out")
    with pytest.raises(ValueError, match="to_out: rotate_heads must run before aux"):
        Q.rotate_heads(online, ["to_v"], ["to_out"], random_hadamard(32, 0))
    with pytest.raises(ValueError, match="no layer matches"):
        Q.quarot(variables, None, Q.QuaRotConfig(online="nothing"))


def _ported(name):
    """A tiny config of each ported DiT, random params and random inputs with several tokens."""
    rng = np.random.default_rng(0)
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    if name == "wan":
        cfg = wan.WanConfig(
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=4,
            out_channels=4,
            text_dim=8,
            freq_dim=16,
            ffn_dim=32,
            num_layers=2,
        )
        inputs = dict(hidden_states=f32(1, 4, 2, 4, 4), timestep=jnp.array([500.0]), encoder_hidden_states=f32(1, 5, 8))
    elif name == "wan_i2v":
        cfg = wan.WanConfig(
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=4,
            text_dim=8,
            freq_dim=16,
            ffn_dim=32,
            num_layers=1,
            image_dim=6,
            added_kv_proj_dim=24,
            cross_attn_norm=False,
        )
        inputs = dict(
            hidden_states=f32(1, 4, 1, 4, 4),
            timestep=jnp.array([500.0]),
            encoder_hidden_states=f32(1, 512, 8),
            encoder_hidden_states_image=f32(1, 3, 6),
        )
    elif name == "flux":
        cfg = flux.FluxConfig(
            in_channels=8,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=12,
            pooled_projection_dim=10,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        inputs = dict(
            hidden_states=f32(1, 6, 8),
            encoder_hidden_states=f32(1, 3, 12),
            pooled_projections=f32(1, 10),
            timestep=jnp.array([0.5]),
            img_ids=jnp.asarray(rng.integers(0, 4, (6, 3)), jnp.float32),
            txt_ids=jnp.zeros((3, 3)),
            guidance=jnp.array([3.5]),
        )
    else:
        cfg = dit.DiTConfig(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            num_embeds_ada_norm=10,
        )
        inputs = dict(hidden_states=f32(1, 4, 8, 8), timestep=jnp.array([500]), class_labels=jnp.array([3]))
    shapes = models.param_shapes(cfg)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape).astype(np.float32)), shapes)
    return cfg, models.port_for_config(cfg).module_cls(cfg), params, inputs


@pytest.mark.parametrize("name", ["wan", "wan_i2v", "flux", "dit"])
def test_quarot_on_ported_models_is_exact_in_float(name):
    cfg, model, params, inputs = _ported(name)
    plan = Q.dit_plan(params, models.layer_roles(cfg, params), cfg.attention_head_dim, fold_qk=name == "dit")
    assert plan.vo_groups and bool(plan.qk_groups) == (name == "dit")  # DiT: no RoPE, no q/k norm
    rotated = Q.quarot({"params": params}, None, plan)
    for kpath, r in models.layer_roles(cfg, params).items():  # online rotations exactly on the attention/FFN linears
        rotated_here = "hadamard" in get_aux(rotated, kpath[: -len("/kernel")])
        assert rotated_here == bool(set(r) & Q.ONLINE_ROLES and not set(r) & Q.NEVER_ROTATED), kpath
    run = jitted_apply(model)
    y = run({"params": params}, **inputs)
    assert relative_error(run(rotated, **inputs), y) < 1e-5
    if name == "wan":
        with pytest.raises(ValueError, match="q/k norm parameters"):
            Q.dit_plan(params, models.layer_roles(cfg, params), cfg.attention_head_dim, fold_qk=True)


def test_smooth_rotate_gptq_svd_compose(block, quantized):
    """smooth -> rotate -> GPTQ -> SVD correction: exact in float until GPTQ, each step helps."""
    blk, variables, x, c, y, run = block
    stats = quantized["rtn"][2]
    fold_map = {"to_out/kernel": "to_v/kernel"}  # o's smoothing folds into v: the V/O rotation stays exact
    scales, _ = smoothquant_search(variables["params"], stats, W4, SmoothQuantConfig(alpha=0.5), fold_map=fold_map)
    params, aux = fold.smooth(variables["params"], scales, fold_map)
    smoothed = {"params": params, "jquant": fold.aux_collection(aux)}
    assert "input_mul" not in get_aux(smoothed, "to_out")
    rotated = Q.quarot(smoothed, None, _block_config())
    assert "input_mul" in get_aux(rotated, "ff_down") and "hadamard" in get_aux(rotated, "ff_down")
    assert relative_error(run(rotated, x, c), y) < 1e-5
    rstats = layer_statistics(blk, rotated, x, c)
    q = {**rotated, "params": gptq(rotated["params"], rstats, W4)}
    corrected = lowrank_correction(rotated, q, rstats, CorrectionConfig(rank=16))
    e = [relative_error(run(v, x, c, act="int8/token"), y) for v in (quantized["gptq"][0], q, corrected)]
    assert e[2] < e[1] < e[0], e
