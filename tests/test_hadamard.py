"""Hadamard constructions, fast transforms and the randomized Hadamard transform."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jquant import hadamard as had

# Every linear input width of the DiT families, with the construction the search picks.
WIDTH_CONSTRUCTIONS = {
    1152: "paley1(q=11) x paley1(q=11) x sylvester(8)",
    1536: "paley1(q=11) x sylvester(128)",
    2048: "sylvester(2048)",
    3072: "paley1(q=11) x sylvester(256)",
    3584: "paley2(q=13) x sylvester(128)",
    4096: "sylvester(4096)",
    5120: "paley1(q=19) x sylvester(256)",
    8960: "paley1(q=19) x paley2(q=13) x sylvester(16)",
    12288: "paley1(q=11) x sylvester(1024)",
    13824: "paley1(q=11) x paley1(q=11) x paley1(q=11) x sylvester(8)",
    15360: "paley1(q=11) x paley1(q=19) x sylvester(64)",
    18944: "paley2(q=73) x sylvester(128)",
}
SMALL_WIDTHS = [n for n in WIDTH_CONSTRUCTIONS if n <= 4096]
LARGE_WIDTHS = [n for n in WIDTH_CONSTRUCTIONS if n > 4096]

_apply = had.apply_hadamard  # jitted (static axis / transpose)


def _dense(x, h):
    return jnp.matmul(x, h, precision=jax.lax.Precision.HIGHEST)


def _gram_atol(n: int) -> float:
    """Worst-case error of an fp32 H H^T entry: n products summed (each |term| <= 1/n, so the
    accumulated rounding is at most about n * 2^-24, whatever order the CPU's dot kernel sums in:
    it differs between machines) plus the rounding of 1/sqrt(n) itself."""
    return n * 2.0**-24 + 2.0**-22


@pytest.mark.parametrize("n", list(WIDTH_CONSTRUCTIONS))
def test_every_dit_width_has_an_exact_construction(n):
    plan = had.hadamard_plan(n)
    assert plan.exact
    assert plan.block_orders == (n,)
    assert had.hadamard_construction(n) == WIDTH_CONSTRUCTIONS[n]


@pytest.mark.parametrize("n", [384, 768, 1920, 2560, 4608, 6144, 7680, 9216, 10240, 14336])
def test_other_transformer_widths_are_exact_too(n):
    plan = had.hadamard_plan(n)
    assert plan.exact and plan.block_orders == (n,)
    assert "fallback" not in had.hadamard_construction(n)


@pytest.mark.parametrize("n", SMALL_WIDTHS)
def test_dense_matrix_is_orthogonal_with_entries_pm_inv_sqrt_n(n):
    h = np.asarray(had.hadamard_matrix(n, jnp.float32))
    r = np.float32(1.0 / math.sqrt(n))
    # Entries are exactly ±fl(1/sqrt(n)), so H H^T = r^2 S S^T with S the sign matrix;
    # S S^T is computed exactly (small integers in fp32).
    np.testing.assert_array_equal(np.abs(h), np.full_like(h, r))
    s = np.sign(h)
    gram = (s @ s.T).astype(np.float64) * np.float64(r) ** 2
    np.testing.assert_allclose(gram, np.eye(n), rtol=0, atol=1e-6)
    if n <= 2048:  # the plain fp32 product too (its error is the accumulation's)
        g32 = _dense(jnp.asarray(h), jnp.asarray(h).T)
        chex.assert_trees_all_close(g32, jnp.eye(n), atol=_gram_atol(n), rtol=0)


@pytest.mark.parametrize("n", LARGE_WIDTHS)
def test_large_widths_orthogonal_through_fast_transform(n):
    x = jax.random.normal(jax.random.key(n), (8, n), jnp.float32)
    y = _apply(x)
    norm_ratio = jnp.linalg.norm(y, axis=-1) / jnp.linalg.norm(x, axis=-1)
    chex.assert_trees_all_close(norm_ratio, jnp.ones(8), atol=1e-5, rtol=0)
    chex.assert_trees_all_close(_apply(y, transpose=True), x, atol=1e-5, rtol=0)
    chex.assert_trees_all_close(_apply(_apply(x, transpose=True)), x, atol=1e-5, rtol=0)
    assert float(jnp.abs(y - x).max()) > 0.1  # it actually mixed


@pytest.mark.parametrize("n", [1152, 1536, 3584, 4096])
def test_fast_transform_equals_dense_matmul(n):
    h = had.hadamard_matrix(n)
    x = jax.random.normal(jax.random.key(1), (3, n), jnp.float32)
    chex.assert_trees_all_close(_apply(x), _dense(x, h), atol=1e-5, rtol=0)
    chex.assert_trees_all_close(_apply(x, transpose=True), _dense(x, h.T), atol=1e-5, rtol=0)


def test_large_width_fast_transform_matches_dense_on_a_few_columns():
    # H[:, j] for a few j by pushing basis vectors through the transpose: e_j H^T = H[:, j]^T,
    # then compare with x @ H[:, j] computed from those columns.
    n = 8960
    cols = jnp.array([0, 1, 139, 4480, 8959])
    basis = jax.nn.one_hot(cols, n, dtype=jnp.float32)
    h_cols = _apply(basis, transpose=True)  # rows are H[:, j]
    r = np.float32(1.0 / math.sqrt(n))
    np.testing.assert_allclose(np.abs(np.asarray(h_cols)), r, rtol=1e-6)
    x = jax.random.normal(jax.random.key(2), (2, n), jnp.float32)
    chex.assert_trees_all_close(_apply(x)[:, cols], _dense(x, h_cols.T), atol=1e-5, rtol=0)


@pytest.mark.parametrize("q", [3, 7, 11, 19, 27, 43, 59, 107, 139])
def test_paley1_factors_are_hadamard(q):
    m = had._factor_matrix(had.HadamardFactor("paley1", q + 1, q)).astype(np.int64)
    np.testing.assert_array_equal(m @ m.T, (q + 1) * np.eye(q + 1, dtype=np.int64))


@pytest.mark.parametrize("q", [5, 9, 13, 17, 25, 49, 73, 81])
def test_paley2_factors_are_hadamard(q):
    o = 2 * (q + 1)
    m = had._factor_matrix(had.HadamardFactor("paley2", o, q)).astype(np.int64)
    np.testing.assert_array_equal(m @ m.T, o * np.eye(o, dtype=np.int64))


def test_prime_power_fields_give_the_same_orders_as_the_search_expects():
    # 28 = 27 + 1 needs GF(27) for Paley I; the search prefers Paley II on the prime 13.
    assert had._paley_factor(28) == had.HadamardFactor("paley2", 28, 13)
    assert had._paley_factor(100) == had.HadamardFactor("paley2", 100, 49)
    assert had._paley_factor(24) == had.HadamardFactor("paley1", 24, 23)
    assert had._paley_factor(92) is None


@pytest.mark.parametrize("n", [3, 6, 7, 92, 156])
def test_fallback_is_orthogonal_block_diagonal_and_says_so(n):
    plan = had.hadamard_plan(n)
    assert not plan.exact
    assert sum(plan.block_orders) == n
    assert "fallback" in had.hadamard_construction(n)
    h = had.hadamard_matrix(n)
    chex.assert_trees_all_close(_dense(h, h.T), jnp.eye(n), atol=_gram_atol(n), rtol=0)
    x = jax.random.normal(jax.random.key(3), (2, n), jnp.float32)
    chex.assert_trees_all_close(_apply(x), _dense(x, h), atol=1e-5, rtol=0)
    chex.assert_trees_all_close(_apply(x, transpose=True), _dense(x, h.T), atol=1e-5, rtol=0)


def test_apply_along_axis_zero_is_h_transpose_times_w():
    n = 12
    h = had.hadamard_matrix(n)
    w = jax.random.normal(jax.random.key(4), (n, 5), jnp.float32)
    chex.assert_trees_all_close(had.apply_hadamard(w, axis=0), _dense(h.T, w), atol=1e-6)
    # Rotation equivalence: (x H)(H^T W) == x W.
    x = jax.random.normal(jax.random.key(5), (3, n), jnp.float32)
    rotated = _dense(had.apply_hadamard(x), had.apply_hadamard(w, axis=0))
    chex.assert_trees_all_close(rotated, _dense(x, w), atol=1e-5)


def test_dtype_is_preserved_and_bf16_is_close():
    x = jax.random.normal(jax.random.key(6), (4, 1536), jnp.float32)
    y16 = had.apply_hadamard(x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    chex.assert_trees_all_close(y16.astype(jnp.float32), had.apply_hadamard(x), atol=3e-2)


@settings(max_examples=8, deadline=None)
@given(k=st.integers(0, 8), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_fwht_matches_sylvester_matrix_for_powers_of_two(k, batch, seed):
    n = 2**k
    x, y, dense, twice, raw = _fwht_cases(jax.random.key(seed), batch, had.hadamard_matrix(n))
    chex.assert_trees_all_close(y, dense, atol=1e-5, rtol=0)
    chex.assert_trees_all_close(twice, x, atol=1e-5, rtol=0)
    chex.assert_trees_all_close(raw, y * math.sqrt(n), atol=1e-4, rtol=1e-5)


@functools.partial(jax.jit, static_argnums=1)  # one program an example (eager: one for each op)
def _fwht_cases(key, batch, h):
    """x, fwht(x), x @ H, fwht(fwht(x)) and the unnormalized fwht(x)."""
    x = jax.random.normal(key, (batch, h.shape[0]), jnp.float32)
    y = had.fwht(x)
    return x, y, _dense(x, h), had.fwht(y), had.fwht(x, normalize=False)


def test_fwht_along_middle_axis():
    x = jax.random.normal(jax.random.key(7), (2, 8, 3), jnp.float32)
    ref = jnp.einsum("aib,ij->ajb", x, had.hadamard_matrix(8), precision="highest")
    chex.assert_trees_all_close(had.fwht(x, axis=1), ref, atol=1e-6)


def test_rht_is_reproducible_pinned_and_invertible():
    n = 3072
    x = jax.random.normal(jax.random.key(8), (4, n), jnp.float32)
    a = had.apply_rht(x, seed=123)
    b = had.apply_rht(x, seed=123)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(had.apply_rht(x, seed=124)))
    # The sign stream is pinned (threefry2x32, partitionable, fold_in(n)): a change in key
    # derivation would silently change every stored rotation.
    pinned = [1, 1, -1, 1, 1, 1, -1, -1, 1, 1, -1, -1]
    np.testing.assert_array_equal(np.asarray(had.rht_signs(12, 0)), pinned)
    had._rht_signs_np.cache_clear()
    with jax.threefry_partitionable(False):  # a user's global PRNG config does not leak in
        np.testing.assert_array_equal(np.asarray(had.rht_signs(12, 0)), pinned)
    had._rht_signs_np.cache_clear()
    under_jit = jax.jit(lambda: had.rht_signs(12, 0))()
    np.testing.assert_array_equal(np.asarray(under_jit), pinned)
    assert set(np.unique(np.asarray(had.rht_signs(n, 123)))) == {-1.0, 1.0}
    chex.assert_trees_all_close(had.inverse_rht(a, seed=123), x, atol=1e-5)
    # Norm is preserved.
    chex.assert_trees_all_close(jnp.linalg.norm(a, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_random_hadamard_matches_apply_rht_and_is_orthogonal():
    n = 20
    r = had.random_hadamard(n, seed=9)
    chex.assert_trees_all_close(_dense(r, r.T), jnp.eye(n), atol=1e-6)
    x = jax.random.normal(jax.random.key(10), (3, 2, n), jnp.float32)
    chex.assert_trees_all_close(had.apply_rht(x, 9), _dense(x, r), atol=1e-6)
    xt = jnp.swapaxes(x, 1, 2)  # along a non-last axis
    chex.assert_trees_all_close(had.apply_rht(xt, 9, axis=1), jnp.swapaxes(_dense(x, r), 1, 2), atol=1e-6)
    chex.assert_trees_all_close(had.inverse_rht(had.apply_rht(xt, 9, axis=1), 9, axis=1), xt, atol=1e-6)


def test_jit_and_rht_under_jit():
    x = jax.random.normal(jax.random.key(11), (2, 5120), jnp.float32)
    f = jax.jit(lambda v: had.inverse_rht(had.apply_rht(v, 5), 5))
    chex.assert_trees_all_close(f(x), x, atol=1e-5)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="positive integer"):
        had.hadamard_matrix(0)
    with pytest.raises(ValueError, match="positive integer"):
        had.hadamard_plan(12.0)
    with pytest.raises(ValueError, match="not a power of two"):
        had.fwht(jnp.ones((2, 12)))
    with pytest.raises(TypeError, match="floating-point"):
        had.apply_hadamard(jnp.ones((2, 8), jnp.int32))
    with pytest.raises(ValueError, match="out of range"):
        had.apply_hadamard(jnp.ones((2, 8)), axis=2)
    with pytest.raises(ValueError, match="seed must be an integer"):
        had.rht_signs(8, 1.5)


@pytest.mark.parametrize("n", [16, 64, 512, 768, 1536, 3072, 5120, 6144, 12288])
def test_kron_split_rebuilds_the_plan_matrix(n):
    outer, inner = had.kron_split(n)
    assert inner.shape[0] <= 256 and (inner.shape[0] >= 16 or inner.shape[0] == n)
    # every element, one outer row's band of rows at a time: the whole float64 product (1.2 GB at
    # n = 12288) and its temporaries took ten times longer than the comparison itself. The
    # largest difference of a band, not assert_allclose (a third of the time at n = 12288).
    want, m = np.asarray(had.hadamard_matrix(n)), inner.shape[0]
    band = inner.astype(np.float64) / np.sqrt(n)
    for a, row in enumerate(outer.astype(np.float64)):
        worst = np.abs(np.kron(row[None], band) - want[a * m : (a + 1) * m]).max()
        assert worst <= 1e-6, f"band {a}: {worst}"


def test_kron_split_refuses_fallback_plans():
    assert had.kron_split(200) is None  # block-diagonal fallback
