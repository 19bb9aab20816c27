"""SVD family: SVDQuant, SVD-LLM, LoftQ and the low-rank correction (jquant.algorithms.svd)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant.nn
from jquant.algorithms import fold, quarot, svd
from jquant.algorithms.gptq import gptq
from jquant.algorithms.linear_tree import get_aux, get_kernel, layer_statistics, relative_error, update_layer
from jquant.algorithms.smoothquant import SmoothQuantConfig, smoothquant_search
from jquant.algorithms.toy import one_layer, outlier_layer
from jquant.coded import LowRankArray, decode_tree
from jquant.qarray import QArray, dequantize
from jquant.rules import quantize_params

HI = jax.lax.Precision.HIGHEST


@pytest.fixture(scope="module")
def layer():
    x, w = outlier_layer(seed=1, k=128, n=96, tokens=384)
    model, variables = one_layer(w)
    stats = layer_statistics(model, variables, x)
    return x, w, model, variables, stats


def _err(model, variables, x, y_ref, act=None):  # eager: one Dense, trees of many structures
    return relative_error(jquant.nn.apply(model, decode_tree(variables), x, act=act), y_ref)


def _rtn(variables, _stats, spec="int4/g32"):
    return {**variables, "params": quantize_params(variables["params"], spec)[0]}


@pytest.mark.parametrize("rank", [1, 8, 30])
def test_svd_llm_truncation_error_is_the_dropped_singular_values(rank):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((200, 48)) * np.linspace(0.1, 5.0, 48), jnp.float32)
    w = jnp.asarray(rng.standard_normal((48, 32)), jnp.float32)
    h = jnp.matmul(x.T, x, precision=HI)
    a, b, sig = svd.whitened_lowrank(w, h, rank)
    err2 = jnp.sum(jnp.square(jnp.matmul(x, w - jnp.matmul(a, b, precision=HI), precision=HI)))
    np.testing.assert_allclose(float(err2), float(jnp.sum(sig[rank:] ** 2)), rtol=2e-3, atol=1e-3)
    # and it beats the plain (unwhitened) SVD of the same rank on the output error
    pa, pb = svd.svd_lowrank(w, rank)
    plain = jnp.sum(jnp.square(x @ (w - pa @ pb)))
    assert float(err2) <= float(plain) * (1 + 1e-4)


def test_svdquant_split_is_exact_in_float(layer):
    x, w, *_, stats = layer
    mul, a, b, res = svd.svdquant_split(w, stats["layer/kernel"].absmax, rank=16, alpha=0.5)
    y = jnp.matmul(x * mul, jnp.matmul(a, b, precision=HI) + res, precision=HI)
    chex.assert_trees_all_close(y, jnp.matmul(x, w, precision=HI), rtol=1e-5, atol=1e-4)


def test_svdquant_runs_through_jquant_nn_and_beats_rtn(layer):
    x, w, model, variables, stats = layer
    y_ref = x @ w
    cfg = svd.SVDQuantConfig(rules="int4/g32", rank=16, alpha=0.5, lowrank_dtype="float32")
    sq = svd.svdquant(variables, stats, cfg)
    aux = get_aux(sq, "layer")
    assert set(aux) == {"input_mul", "lowrank_a", "lowrank_b"}
    q = get_kernel(sq, "layer")
    assert isinstance(q, QArray)
    # the executed layer is exactly (x * mul) @ (dequant(Q) + a b)
    xs = x * aux["input_mul"]
    manual = xs @ dequantize(q) + (xs @ aux["lowrank_a"]) @ aux["lowrank_b"]
    chex.assert_trees_all_close(jquant.nn.apply(model, sq, x), manual, rtol=1e-4, atol=1e-3)
    for act in (None, "int8/token", "int4/token"):
        e_sq, e_rtn = _err(model, sq, x, y_ref, act), _err(model, _rtn(variables, stats), x, y_ref, act)
        assert e_sq < e_rtn, (act, e_sq, e_rtn)


def test_svd_llm_tree_uses_lowrank_leaves(layer):
    x, w, model, variables, stats = layer
    out = svd.svd_llm(variables, stats, svd.SVDLLMConfig(pattern="layer", ratio=0.5))
    k = get_kernel(out, "layer")
    assert isinstance(k, LowRankArray) and k.rank == svd.rank_for_ratio(128, 96, 0.5)
    assert k.nbytes <= 0.5 * w.size * 4 + 1
    e_llm = _err(model, out, x, x @ w)
    pa, pb = svd.svd_lowrank(w, k.rank)
    e_plain = relative_error(x @ (pa @ pb), x @ w)
    assert e_llm < e_plain
    with pytest.raises(ValueError, match="exactly one of rank or ratio"):
        svd.svd_llm(variables, stats, svd.SVDLLMConfig())


def test_loftq_alternation_lowers_the_error(layer):
    _, w, model, variables, stats = layer
    q, a, b, errors = svd.loftq_weight(w, "int4/g32", rank=8, iters=4)
    assert len(errors) == 4 and errors[-1] < errors[0]
    np.testing.assert_allclose(
        errors[-1], float(jnp.linalg.norm(w - dequantize(q) - a @ b) / jnp.linalg.norm(w)), rtol=1e-4
    )
    out = svd.loftq(variables, stats, svd.LoftQConfig(rules="int4/g32", rank=8, iters=3, lowrank_dtype="float32"))
    assert isinstance(get_kernel(out, "layer"), QArray) and get_aux(out, "layer")["lowrank_a"].shape == (128, 8)


def test_lowrank_correction_lowers_error_monotonically_in_rank(layer):
    x, w, model, variables, stats = layer
    y_ref = x @ w
    q = _rtn(variables, stats)
    errs = [_err(model, q, x, y_ref)]
    for r in (8, 16, 32, 64):
        corrected = svd.lowrank_correction(variables, q, stats, svd.CorrectionConfig(rank=r, lowrank_dtype="float32"))
        errs.append(_err(model, corrected, x, y_ref))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    # extending an existing branch adds ranks; whitening beats the plain correction
    twice = svd.lowrank_correction(variables, corrected, stats, svd.CorrectionConfig(rank=8, lowrank_dtype="float32"))
    assert get_aux(twice, "layer")["lowrank_a"].shape[1] == 72
    plain = svd.lowrank_correction(variables, q, stats, svd.CorrectionConfig(rank=16, whiten=False))
    whitened = svd.quantize_and_correct(variables, stats, svd.CorrectionConfig(rank=16), _rtn)
    assert _err(model, whitened, x, y_ref) < _err(model, plain, x, y_ref)


def test_errors_name_the_layer(layer):
    x, w, model, variables, stats = layer
    q = _rtn(variables, stats)
    with pytest.raises(ValueError, match="svdquant: the rules .* select no float 2-D kernel"):
        svd.svdquant(q, stats, svd.SVDQuantConfig())
    rotated = update_layer(variables, "layer", aux={"hadamard": jnp.ones(())})
    with pytest.raises(ValueError, match="layer: svdquant smoothing after an online Hadamard"):
        svd.svdquant(rotated, stats, svd.SVDQuantConfig(rules="int4/g32"))
    with pytest.raises(KeyError, match="absmax"):
        svd.svdquant(
            variables, {"layer": {"hessian": stats["layer/kernel"].hessian}}, svd.SVDQuantConfig(rules="int4/g32")
        )
    with pytest.raises(ValueError, match="rank must be an integer"):
        svd.svd_lowrank(w, 0)
    with pytest.raises(ValueError, match="not in the same basis"):
        svd.lowrank_correction(rotated, q, stats)


def test_svd_correction_lowers_every_4bit_method(layer):
    """RTN, SmoothQuant, GPTQ, QuaRot (+RTN / +GPTQ) and SVDQuant, each + a rank-8 correction (W4A8)."""
    x, w, model, variables, stats = layer
    y = x @ w
    spec = "int4"
    scales, _ = smoothquant_search(variables["params"], stats, spec, SmoothQuantConfig(alpha=0.5))
    params, aux = fold.smooth(variables["params"], scales)
    smoothed = {"params": params, "jquant": fold.aux_collection(aux)}
    rotated = quarot.quarot(variables, None, quarot.QuaRotConfig())
    rstats = layer_statistics(model, rotated, x)
    sq = svd.svdquant(variables, stats, svd.SVDQuantConfig(rules=spec, rank=8, lowrank_dtype="float32"))
    mul = get_aux(sq, "layer")["input_mul"]
    sq_ref = update_layer(variables, "layer", kernel=w / mul[:, None], aux={"input_mul": mul})
    cases = {
        "rtn": (_rtn(variables, stats, spec), variables, stats),
        "smoothquant": (_rtn(smoothed, stats, spec), smoothed, layer_statistics(model, smoothed, x)),
        "gptq": ({**variables, "params": gptq(variables["params"], stats, spec)}, variables, stats),
        "quarot_rtn": (_rtn(rotated, rstats, spec), rotated, rstats),
        "quarot_gptq": ({**rotated, "params": gptq(rotated["params"], rstats, spec)}, rotated, rstats),
        "svdquant": (sq, sq_ref, layer_statistics(model, sq_ref, x)),
    }
    for name, (q, ref, st) in cases.items():
        corrected = svd.lowrank_correction(ref, q, st, svd.CorrectionConfig(rank=8))
        e0, e1 = (_err(model, v, x, y, "int8/token") for v in (q, corrected))
        assert e1 < e0, (name, e0, e1)
