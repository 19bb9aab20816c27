"""GPTQ and RTN: layout parity with quantize, quality vs RTN, damping escalation, tree API."""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant.nn as jnn
from jquant import calib
from jquant.algorithms import gptq as G
from jquant.algorithms import layerwise as lw
from jquant.algorithms import rtn as R
from jquant.algorithms.synthetic import layer_problem
from jquant.qarray import QArray, codes, dequantize, quantize
from jquant.rules import quantize_params

K, N, T = 128, 64, 1024
X, W = layer_problem(0, K, N, T)
STATS = calib.batch_stats(jnp.asarray(X), calib.CalibConfig(histogram=False))
H = STATS.hessian_mean
CFG = G.GPTQConfig(block_size=64)


def err(w_hat):
    return float(lw.relative_error(W, dequantize(w_hat), H))


@pytest.mark.parametrize("spec", ["int4/g32", "uint3/g32", "int3", "int8"])
def test_diagonal_hessian_gives_exactly_rtn(spec):
    # no correlations -> nothing to compensate: GPTQ must reduce to round-to-nearest
    h = jnp.diag(jnp.linspace(0.5, 2.0, K))
    q, r = G.gptq_layer(W, h, spec, CFG), quantize(W, spec)
    chex.assert_trees_all_equal(codes(q), codes(r))
    chex.assert_trees_all_equal(q.scale, r.scale)
    assert q.pad == r.pad and q.spec == r.spec and q.qvalue.shape == r.qvalue.shape


@pytest.mark.parametrize("spec", ["int4/g32", "int3/g32"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_at_4_and_3_bits(spec, act_order):
    q = G.gptq_layer(W, H, spec, G.GPTQConfig(block_size=64, act_order=act_order))
    r = quantize(W, spec)
    assert (q.qvalue.shape, q.scale.shape, q.qvalue.dtype) == (r.qvalue.shape, r.scale.shape, r.qvalue.dtype)
    assert err(q) < 0.5 * err(r), (err(q), err(r))


def test_rtn_clip_search_lowers_the_error_and_plain_rtn_is_quantize_params():
    plain = R.rtn_layer(W, "int4")
    clipped = R.rtn_layer(W, "int4", H, R.RTNConfig(clip_search=True, grid=8))
    assert err(clipped) < err(plain)
    tree = {"l": {"kernel": jnp.asarray(W), "bias": jnp.zeros(N)}}
    chex.assert_trees_all_equal(R.rtn(tree, None, "int4/g32"), quantize_params(tree, "int4/g32")[0])
    with pytest.raises(ValueError, match="Hessian"):
        R.rtn_layer(W, "int4", None, R.RTNConfig(clip_search=True))


def test_failed_cholesky_raises_damping_and_says_so():
    # an indefinite "Hessian" (as accumulated rounding can produce): one eigenvalue -5% of the mean diagonal
    rng = np.random.default_rng(1)
    q_, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    ev = np.ones(32)
    ev[0] = -0.05 * 32 / 31
    h = jnp.asarray((q_ * ev) @ q_.T, jnp.float32)
    with pytest.warns(RuntimeWarning, match="blk/kernel: Cholesky failed with damping 0.01"):
        u, used = G.inverse_cholesky(h, damp=0.01, path="blk/kernel")
    assert used == pytest.approx(0.1) and bool(jnp.all(jnp.isfinite(u)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="blk/kernel: Cholesky .* failed even with damping"):
            bad = jnp.kron(jnp.eye(16), jnp.asarray([[1.0, 5.0], [5.0, 1.0]]))  # eigenvalues -4 and 6
            G.inverse_cholesky(bad, damp=0.01, damp_limit=1.0, path="blk/kernel")


def test_rank_deficient_and_dead_channels_fall_back_to_damping():
    x = X[:16].copy()  # 16 tokens < 128 channels: H has rank 16
    x[:, 5] = 0.0  # a channel that never fires
    h = jnp.asarray(x.T @ x / len(x))
    q = G.gptq_layer(W, h, "int4/g32", CFG)
    w_hat = dequantize(q)
    assert bool(jnp.all(jnp.isfinite(w_hat)))
    assert float(lw.relative_error(W, w_hat, h)) < float(lw.relative_error(W, dequantize(quantize(W, "int4/g32")), h))


class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(N, name="down")(nn.gelu(nn.Dense(K, name="up")(x)))


def test_gptq_over_a_param_tree_runs_in_the_execution_path():
    model = Two()
    x = jnp.asarray(X[:256, :32].reshape(8, 32, 32))
    params = model.init(jax.random.key(0), x)["params"]
    apply = lambda p, b: model.apply({"params": p}, b)  # noqa: E731
    stats = calib.calibrate(apply, params, [x[:4], x[4:]], progress=False)
    out = G.gptq(params, stats, [("down", "int4/g32"), ("up", None)], CFG)
    assert isinstance(out["down"]["kernel"], QArray) and not isinstance(out["up"]["kernel"], QArray)
    chex.assert_trees_all_equal(out["up"], params["up"])
    ref = apply(params, x)
    y_g = jnn.apply(model, {"params": out}, x)
    y_r = jnn.apply(model, {"params": quantize_params(params, [("down", "int4/g32")])[0]}, x)
    assert float(jnp.mean((y_g - ref) ** 2)) < float(jnp.mean((y_r - ref) ** 2))
    with pytest.raises(KeyError, match="no calibration statistics for \\['up/kernel'\\]"):
        G.gptq(params, {"down/kernel": stats["down/kernel"]}, "int4/g32", CFG)
    with pytest.raises(ValueError, match="act_order with groups needs static_groups"):
        G.gptq(params, stats, "int4/g32", G.GPTQConfig(act_order=True, static_groups=False))
    with pytest.raises(ValueError, match="GGUF block codec"):
        G.gptq_layer(W, H, "q4_k")


def test_gptq_on_an_nnx_state():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(32, K, rngs=rngs)
            self.down = nnx.Linear(K, N, rngs=rngs)

        def __call__(self, x):
            return self.down(nnx.gelu(self.up(x)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    x = jnp.asarray(X[:512, :32])
    stats = calib.calibrate(lambda m, b: m(b), state, [x], graphdef=graphdef, progress=False)
    q = G.gptq(state, stats, [("down", "int4/g32")], CFG)
    assert isinstance(q["down"]["kernel"].get_value(), QArray)
    ref = nnx.merge(graphdef, state)(x)
    y = jnn.nnx_apply(graphdef, q, x)
    rel = float(jnp.sum((y - ref) ** 2) / jnp.sum(ref**2))
    assert 0 < rel < 1e-2
