"""Vector codebooks: QuIP#'s E8P lattice (jquant.algorithms.quip) and AQLM (jquant.algorithms.aqlm)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant.nn
from jquant.algorithms import aqlm as A
from jquant.algorithms import quip as QP
from jquant.algorithms import vq
from jquant.algorithms.linear_tree import get_kernel, layer_statistics, relative_error
from jquant.algorithms.synthetic import layer_problem
from jquant.algorithms.toy import one_layer
from jquant.coded import decode_tree
from jquant.qarray import dequantize, dequantize_any, quantize


@pytest.fixture(scope="module")
def codebook():
    codes = jnp.arange(2**16, dtype=jnp.int32).astype(jnp.uint16)
    return codes, QP.e8p_decode(codes)


@pytest.fixture(scope="module")
def problem():
    x, w = map(jnp.asarray, layer_problem(0, 128, 64, 512))
    return x, w, x @ w, x.T @ x / x.shape[0]


def test_e8p_codebook_is_a_subset_of_e8_plus_quarter(codebook):
    codes, cb = codebook
    cb = np.asarray(cb)
    assert len(np.unique(cb, axis=0)) == 2**16
    base = cb - np.where((np.asarray(codes) & 1) == 1, 0.25, -0.25)[:, None]
    assert np.all((base * 2) % 2 == 1)  # half-integers
    assert np.all(np.round(base.sum(1)) % 2 == 0)  # even sum: D8 + 1/2, inside E8
    assert QP.e8p_abs_grid().shape == (256, 8)


def test_e8p_nearest_codeword_is_exact(codebook):
    codes, cb = codebook
    x = jnp.asarray(1.3 * np.random.default_rng(0).standard_normal((200, 8)), jnp.float32)
    c = QP.e8p_quantize(x)
    fast = jnp.sum((QP.e8p_decode(c) - x) ** 2, -1)
    brute = jnp.min(jnp.sum((x[:, None, :] - cb[None]) ** 2, -1), -1)
    np.testing.assert_allclose(fast, brute, atol=1e-5)
    np.testing.assert_array_equal(QP.e8p_quantize(cb[::97]), codes[::97])


@pytest.fixture(scope="module")
def quipped(problem):
    return QP.quip_weight(problem[1], problem[3])


def test_quip_leaf_decodes_and_is_two_bits(problem, quipped):
    x, w, y, h = problem
    q = quipped
    assert q.shape == w.shape and q.codes.dtype == jnp.uint16
    assert abs(q.bits_per_weight - 2.0) < 0.01
    # decode by hand: codewords * scale, then undo both RHTs
    wt = QP.e8p_decode(q.codes).transpose(0, 2, 1).reshape(w.shape) * q.scale
    chex.assert_trees_all_close(QP.incoherent(q.dequantize(), q.k_seed, q.n_seed), wt, atol=1e-4)
    jitted = jax.jit(lambda leaf: leaf.dequantize())(q)  # a pytree through jit
    chex.assert_trees_all_close(jitted, q.dequantize(), atol=1e-6)


def test_quip_two_bits_beats_rtn_three_bits_and_ldlq_helps(problem, quipped):
    x, w, y, h = problem
    e_ldlq = relative_error(x @ quipped.dequantize(), y)
    e_plain = relative_error(
        x @ QP.quip_weight(w, h, QP.QuIPConfig(ldlq=False, scales=(0.9, 1.0, 1.1))).dequantize(), y
    )
    e_rtn3 = min(relative_error(x @ dequantize(quantize(w, s)), y) for s in ("int3", "int3/g64"))
    assert e_ldlq < e_plain < e_rtn3, (e_ldlq, e_plain, e_rtn3)


def test_aqlm_alternation_never_increases_the_error(problem):
    x, w, y, h = problem
    cfg = A.AQLMConfig(num_codebooks=2, bits=5, beam=4, iters=2, kmeans_iters=4)
    leaf, errors = A.aqlm_weight(w, h, cfg)
    assert all(b <= a * (1 + 1e-4) for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]
    # decode = scale * sum of one codeword per codebook
    cb = leaf.codebooks.astype(jnp.float32)
    c = leaf.codes.astype(jnp.int32)
    vec = cb[0][c[..., 0]] + cb[1][c[..., 1]]
    manual = vec.transpose(0, 2, 1).reshape(w.shape) * leaf.scales.astype(jnp.float32)
    chex.assert_trees_all_close(leaf.dequantize(), manual, atol=1e-6)
    assert leaf.nominal_bits() / w.size == pytest.approx((64 * 16 * 2 * 5 + 2 * 32 * 8 * 16 + 64 * 16) / w.size)
    assert relative_error(x @ leaf.dequantize(), y) < relative_error(x @ dequantize(quantize(w, "int2/g64")), y)


def test_codebook_methods_on_a_tree():
    x, w = map(jnp.asarray, layer_problem(1, 128, 64, 512))
    model, variables = one_layer(w)
    stats = layer_statistics(model, variables, x)
    for out in (QP.quip(variables, stats), A.aqlm(variables, None, A.AQLMConfig(bits=5, iters=1, kmeans_iters=4))):
        leaf = get_kernel(out, "layer")
        y = jquant.nn.apply(model, decode_tree(out), x)
        chex.assert_trees_all_close(y, x @ dequantize_any(leaf) + variables["params"]["layer"]["bias"], atol=1e-4)
    with pytest.raises(ValueError, match="multiple of 8"):
        QP.quip_weight(jnp.ones((12, 4)))
    with pytest.raises(ValueError, match="no float kernel matches"):
        A.aqlm(variables, None, A.AQLMConfig(pattern="nothing"))


def test_row_vector_layout_round_trips_and_takes_diagonal_blocks():
    w = jnp.arange(24 * 5, dtype=jnp.float32).reshape(24, 5)
    v = vq.row_vectors(w)
    assert v.shape == (3, 5, 8)
    np.testing.assert_array_equal(v[1, 2], w[8:16, 2])
    np.testing.assert_array_equal(vq.from_row_vectors(v), w)
    m = jnp.arange(24 * 24, dtype=jnp.float32).reshape(24, 24)
    blocks = vq.diagonal_blocks(m)
    assert blocks.shape == (3, 8, 8)
    np.testing.assert_array_equal(blocks[2], m[16:24, 16:24])
    with pytest.raises(ValueError, match="AQLM needs the input dimension to be a multiple of 8"):
        A.aqlm_weight(jnp.ones((12, 4)))
