"""SpQR: quality against GPTQ at equal bits, bit accounting, outliers, execution path."""

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
from jquant.algorithms import spqr as S
from jquant.algorithms.synthetic import layer_problem
from jquant.qarray import dequantize

K, N, T = 128, 64, 1024
X, W = layer_problem(4, K, N, T)
H = calib.batch_stats(jnp.asarray(X), calib.CalibConfig(histogram=False)).hessian_mean
CFG = S.SpQRConfig(bits=3, outlier_rate=0.005, block_size=64)


@pytest.fixture(scope="module")
def q3():
    return S.spqr_layer(W, H, CFG)


def test_spqr_beats_gptq_at_equal_or_more_bits(q3):
    e_spqr = float(lw.relative_error(W, q3.dequantize(), H))
    for spec in ("int4/g128/s=bfloat16", "int3/g16/s=bfloat16"):
        g = G.gptq_layer(W, H, spec, G.GPTQConfig(block_size=64))
        assert q3.nominal_bits_per_weight <= lw.nominal_bits_per_weight(g)
        assert e_spqr < float(lw.relative_error(W, dequantize(g), H)), spec


def test_bit_accounting_and_outliers(q3):
    n_out = round(0.005 * N * 16) * (K // 16)
    assert q3.n_outliers == n_out
    # 3-bit codes + 2 x 3-bit stats per 16 weights + 2 x (f16 step + f16 min) per 16 x 16 + 48 bits per outlier
    expect = 3 + 2 * 3 / 16 + 2 * 32 / 256 + 48 * n_out / (K * N)
    assert q3.nominal_bits_per_weight == pytest.approx(expect)
    assert q3.bits_per_weight == pytest.approx(8 * q3.nbytes / (K * N))
    bits = S.bits_per_weight({"a": {"kernel": q3}})
    assert bits["nominal"] == pytest.approx(expect) and bits["storage"] > bits["nominal"]  # 3-bit codes in nibbles
    w_hat = np.asarray(q3.dequantize())
    rows, cols = np.asarray(q3.rows, np.int64), np.asarray(q3.cols, np.int64)
    assert len(set(zip(rows.tolist(), cols.tolist()))) == n_out
    np.testing.assert_array_equal(w_hat[rows, cols], np.asarray(q3.values, np.float32))
    # outliers are the salient weights (large w^2 H_jj), not merely large ones
    saliency = W**2 * np.asarray(jnp.diagonal(H))[:, None]
    assert np.median(saliency[rows, cols]) > 5 * np.median(saliency)
    no_out = S.spqr_layer(W, H, S.SpQRConfig(bits=3, outlier_rate=0.0, block_size=64))
    assert no_out.n_outliers == 0
    assert float(lw.relative_error(W, no_out.dequantize(), H)) > float(lw.relative_error(W, q3.dequantize(), H))


def test_pytree_jit_and_execution_path(q3):
    leaves, treedef = jax.tree.flatten(q3)
    again = jax.tree.unflatten(treedef, leaves)
    chex.assert_trees_all_equal(jax.jit(lambda a: a.dequantize())(again), q3.dequantize())

    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(N, name="lin")(x)

    model, x = One(), jnp.asarray(X[:32])
    params = model.init(jax.random.key(0), x)["params"]
    params = {"lin": {"kernel": jnp.asarray(W), "bias": params["lin"]["bias"] + 1.0}}
    tree = S.spqr(params, {"lin/kernel": calib.batch_stats(jnp.asarray(X), calib.CalibConfig())}, "lin", CFG)
    assert isinstance(tree["lin"]["kernel"], S.SpQRArray)
    y = jax.jit(lambda p, x: jnn.apply(model, {"params": p}, x))(tree, x)
    ref = x @ tree["lin"]["kernel"].dequantize() + params["lin"]["bias"]
    chex.assert_trees_all_close(y, ref, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="blk/kernel: group_size 16 does not divide the input dimension 40"):
        S.spqr_layer(jnp.ones((40, 16)), jnp.eye(40), CFG, path="blk/kernel")
    with pytest.raises(ValueError, match="stat_group 16 does not divide the output dimension 24"):
        S.spqr_layer(jnp.ones((32, 24)), jnp.eye(32), CFG)
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        S.SpQRConfig(bits=5)


def test_one_signed_and_outlier_heavy_groups_stay_finite():
    # nearly constant positive groups made zero = -min/scale huge: float16 statistics overflowed to NaN
    w = 1.0 + 1e-5 * W
    q = S.spqr_layer(w, H, S.SpQRConfig(bits=3, outlier_rate=0.05, block_size=64))
    w_hat = np.asarray(q.dequantize())
    assert np.all(np.isfinite(w_hat))
    assert float(lw.relative_error(w, w_hat, H)) < 1e-3
