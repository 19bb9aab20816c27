"""AWQ and SmoothQuant: exact folding of the smoothing, quality vs RTN / plain W8A8, errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant.nn as jnn
from jquant import calib, dispatch
from jquant.algorithms import awq as A
from jquant.algorithms import fold as F
from jquant.algorithms import layerwise as lw
from jquant.algorithms import smoothquant as SQ
from jquant.algorithms.synthetic import layer_problem
from jquant.formats import parse_spec
from jquant.qarray import QArray, dequantize, quantize

D, FF = 16, 32


class Block(nn.Module):
    """A DiT-like block: norm-affine -> q,k,v; v -> o; adaLN modulation -> up; gelu -> down."""

    @nn.compact
    def __call__(self, x, c):
        mod = nn.Dense(2 * D, name="mod")(c)[:, None, :]
        shift, scale = mod[..., :D], mod[..., D:]
        h = nn.LayerNorm(name="norm1")(x)
        q, k, v = (nn.Dense(D, name=n)(h) for n in ("q", "k", "v"))
        a = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(D), axis=-1) @ v
        x = x + nn.Dense(D, name="o")(a)
        h2 = nn.LayerNorm(use_scale=False, use_bias=False, name="norm2")(x) * (1 + scale) + shift
        return x + nn.Dense(D, name="down")(nn.gelu(nn.Dense(FF, name="up")(h2)))


FOLD_MAP = {
    "q/kernel": "norm1/scale",  # a norm's affine scale (and bias)
    "k/kernel": "norm1/scale",
    "v/kernel": "norm1/scale",
    "o/kernel": "v/kernel",  # a preceding linear's output columns (attention is linear in v)
    "up/kernel": F.Fold("mod/kernel", kind="modulation", offset=D, shift_offset=0),
    "down/kernel": None,  # after a GELU: explicit input_mul
}
MODEL = Block()
RNG = np.random.default_rng(0)
XS = jnp.asarray(RNG.standard_normal((2, 6, D)) * np.where(np.arange(D) < 2, 30.0, 1.0), jnp.float32)
CS = jnp.asarray(RNG.standard_normal((2, D)), jnp.float32)
PARAMS = MODEL.init(jax.random.key(0), XS, CS)["params"]
PARAMS = jax.tree.map(
    lambda p: p + 0.1 * jnp.asarray(RNG.standard_normal(p.shape), p.dtype), PARAMS
)  # non-trivial norm/bias


def run(params, aux=None, **kw):
    variables = {"params": params, **({"jquant": F.aux_collection(aux)} if aux else {})}
    with jnn.quantized(**kw):
        return MODEL.apply(variables, XS, CS)


@pytest.fixture(scope="module")
def block_stats():
    return calib.calibrate(lambda p, b: MODEL.apply({"params": p}, *b), PARAMS, [(XS, CS)], progress=False)


def test_folding_is_exact_for_every_target_kind():
    rng = np.random.default_rng(1)
    s = {
        g: jnp.asarray(rng.uniform(0.2, 5.0, n), jnp.float32)
        for g, n in (("qkv", D), ("o", D), ("up", D), ("down", FF))
    }
    scales = {
        "q/kernel": s["qkv"],
        "k/kernel": s["qkv"],
        "v/kernel": s["qkv"],
        "o/kernel": s["o"],
        "up/kernel": s["up"],
        "down/kernel": s["down"],
    }
    new, aux = F.smooth(PARAMS, scales, FOLD_MAP)
    assert set(aux) == {"down"}  # only the layer with no foldable producer keeps an input_mul
    assert not np.allclose(new["norm1"]["scale"], PARAMS["norm1"]["scale"])
    assert not np.allclose(new["mod"]["bias"], PARAMS["mod"]["bias"])
    chex.assert_trees_all_close(run(new, aux), run(PARAMS), rtol=2e-5, atol=2e-5)
    # without a fold map everything becomes an explicit input_mul, still exact
    new2, aux2 = F.smooth(PARAMS, scales)
    assert set(aux2) == {"q", "k", "v", "o", "up", "down"}
    chex.assert_trees_all_close(run(new2, aux2), run(PARAMS), rtol=2e-5, atol=2e-5)


def test_awq_and_smoothquant_smoothing_leave_the_float_model_unchanged(block_stats):
    p_awq, aux_awq = A.awq(PARAMS, block_stats, "int4/g8", A.AWQConfig(grid=5, quantize=False), fold_map=FOLD_MAP)
    chex.assert_trees_all_close(run(p_awq, aux_awq), run(PARAMS), rtol=2e-5, atol=2e-5)
    scales, _ = SQ.smoothquant_search(PARAMS, block_stats, "int8", fold_map=FOLD_MAP)
    p_sq, aux_sq = F.smooth(PARAMS, scales, FOLD_MAP)
    chex.assert_trees_all_close(run(p_sq, aux_sq), run(PARAMS), rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(scales["q/kernel"], scales["v/kernel"])  # one shared scale per fold target


def test_static_w8a8_block_runs_and_beats_plain_w8a8(block_stats):
    ref = run(PARAMS)
    p_sq, aux = SQ.smoothquant(PARAMS, block_stats, "int8", fold_map=FOLD_MAP)
    assert isinstance(p_sq["q"]["kernel"], QArray) and all("input_scale" in aux[m] for m in ("q", "o", "up", "down"))
    y_sq = run(p_sq, aux, act="int8/t", static=True)
    plain = lw.quantize_fast  # per-channel int8 weights, static per-tensor act scales from the absmax
    p_pl = {k: ({**v, "kernel": plain(v["kernel"], "int8")} if "kernel" in v else v) for k, v in PARAMS.items()}
    aux_pl = {p[:-7]: {"input_scale": SQ.static_input_scale(s, None)} for p, s in block_stats.items()}
    y_pl = run(p_pl, aux_pl, act="int8/t", static=True)
    assert float(jnp.mean((y_sq - ref) ** 2)) < float(jnp.mean((y_pl - ref) ** 2))


X1, W1 = layer_problem(2, 128, 64, 1024)
ST1 = calib.batch_stats(jnp.asarray(X1), calib.CalibConfig())
TREE1 = {"lin": {"kernel": jnp.asarray(W1)}}


@pytest.mark.parametrize("spec", ["int4/g32", "int4"])
def test_awq_beats_rtn_at_4_bits(spec):
    p, aux = A.awq(TREE1, {"lin/kernel": ST1}, spec, A.AWQConfig(grid=10, clip_grid=8))
    q = p["lin"]["kernel"]
    w_eff = dequantize(q) * aux["lin"]["input_mul"][:, None]  # the effective kernel seen by x
    h = ST1.hessian_mean
    e_awq = float(lw.relative_error(W1, w_eff, h))
    e_rtn = float(lw.relative_error(W1, dequantize(quantize(W1, spec)), h))
    assert e_awq < 0.5 * e_rtn, (e_awq, e_rtn)


@pytest.mark.parametrize("act", ["int8/t", "int8/token"])
def test_smoothquant_w8a8_beats_plain_w8a8_with_outliers(act):
    x = jnp.asarray(X1)
    y = x @ W1
    a = parse_spec(act)

    def rel(yq):
        return float(jnp.sum((yq - y) ** 2) / jnp.sum(y**2))

    plain = dispatch.linear(
        x, quantize(W1, "int8"), act=a, act_scale=None if a.dynamic else SQ.static_input_scale(ST1, None)
    )
    for cfg in (SQ.SmoothQuantConfig(act=act), SQ.SmoothQuantConfig(act=act, search=True, grid=6)):
        p, aux = SQ.smoothquant(TREE1, {"lin/kernel": ST1}, "int8", cfg)
        ent = aux["lin"]
        assert ("input_scale" in ent) == (not a.dynamic)
        yq = dispatch.linear(x * ent["input_mul"], p["lin"]["kernel"], act=a, act_scale=ent.get("input_scale"))
        assert rel(yq) < 0.5 * rel(plain), (cfg, rel(yq), rel(plain))


def test_fold_errors_and_quantized_target_fallback():
    s = jnp.full((D,), 2.0)
    with pytest.raises(ValueError, match="different scales"):
        F.smooth(PARAMS, {"q/kernel": s, "k/kernel": 2 * s}, FOLD_MAP)
    with pytest.raises(KeyError, match="not a param path"):
        F.smooth(PARAMS, {"q/kernel": s}, {"q/kernel": "nope/scale"})
    no_bias = {**PARAMS, "mod": {"kernel": PARAMS["mod"]["kernel"]}}
    with pytest.raises(ValueError, match="has no bias"):
        F.smooth(no_bias, {"up/kernel": s}, FOLD_MAP)
    with pytest.raises(ValueError, match="positive"):
        F.smooth(PARAMS, {"q/kernel": -s}, FOLD_MAP)
    qv = {**PARAMS, "v": {**PARAMS["v"], "kernel": quantize(PARAMS["v"]["kernel"], "int8")}}
    with pytest.warns(RuntimeWarning, match="cannot fold into quantized 'v/kernel'"):
        _, aux = F.smooth(qv, {"o/kernel": s}, FOLD_MAP)
    np.testing.assert_allclose(aux["o"]["input_mul"], 0.5)
    assert F.aux_from_collection(F.aux_collection(aux)).keys() == aux.keys()
