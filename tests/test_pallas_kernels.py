"""CPU tests for pallas_kernels: references, packing, padding, dispatch and lowering.

The Mosaic GPU kernels only run on a Hopper GPU (scripts/check_kernels_gpu.py
compares them with these references there; results in benchmarks/). Here we test
the references against independent NumPy float64 computations, the int4 layout
(including that XLA's int4 view of the packed bytes is the same layout the
kernel reads), the quantizer kernel under the Pallas interpreter, the CPU
fallback of every wrapper, and that every Mosaic GPU kernel lowers to a Mosaic
GPU custom call for ragged shapes (which catches layout/tiling errors early).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _bounds import assert_dot_close
from hypothesis import given, settings
from hypothesis import strategies as st

import jquant
from jquant.formats import FP4_TABLE, NF4_TABLE
from pallas_kernels import (
    _common,
    _quant,
    act_quant,
    norm_quant,
    testing,
    triton_quant,
    w4_table,
    w4a8,
    w4a16_gemm,
    w8a8,
    weight_only,
)

RAGGED = [(1, 64, 8), (33, 300, 77)]


def _np(x):
    # NumPy's conversion (ml_dtypes' bf16/fp8/int4 widen exactly): a jnp cast would compile one
    # program per new shape and dtype.
    return np.asarray(x).astype(np.float64)


@functools.cache
def _jitted_maker(make, nargs):
    return jax.jit(make, static_argnums=tuple(range(1, nargs)))


def _inputs(make, seed, m, k, n, *args):
    """``make(jax.random.key(seed), m, k, n, *args)`` as one compiled program a shape (eager,
    each random op of a builder compiles again for every new shape)."""
    return _jitted_maker(make, 4 + len(args))(jax.random.key(seed), m, k, n, *args)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(seed, shape, scale, dtype):
    """``(normal(key(seed), shape) * scale).astype(dtype)`` as one program a shape."""
    return (jax.random.normal(jax.random.key(seed), shape) * scale).astype(dtype)


def _input_shapes(make, m, k, n, **kw):
    """``make(key, m, k, n)``'s outputs as ShapeDtypeStructs (None stays None): the lowering
    tests need shapes only, and computing random inputs at their sizes compiles every random op."""
    return jax.eval_shape(lambda key: make(key, m, k, n, **kw), jax.random.key(0))


# --------------------------------------------------------------------------
# W8A8 references.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", RAGGED)
def test_int8_reference_matches_numpy(m, k, n):
    x, xs, w, ws, b = _inputs(testing.w8a8_int8_inputs, m, m, k, n)
    got = w8a8.int8_matmul_reference(x, xs, w, ws, b, out_dtype=jnp.float32)
    want = (_np(x) @ _np(w).T) * _np(xs) * _np(ws)[None] + _np(b)[None]
    np.testing.assert_allclose(_np(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,k,n", RAGGED)
def test_fp8_reference_matches_numpy(m, k, n):
    x, xs, w, ws, b = _inputs(testing.w8a8_fp8_inputs, m + 1, m, k, n)
    got = w8a8.fp8_matmul_reference(x, xs, w, ws, None, out_dtype=jnp.float32)
    want = (_np(x) @ _np(w).T) * _np(xs) * _np(ws)[None]
    np.testing.assert_allclose(_np(got), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("m,k,n", [(5, 300, 200), (2, 100, 129)])
def test_block_reference_matches_blockwise_sum(m, k, n, fmt):
    make, ref = {
        "fp8": (testing.w8a8_fp8_block_inputs, w8a8.fp8_block_matmul_reference),
        "int8": (testing.w8a8_int8_block_inputs, w8a8.int8_block_matmul_reference),
    }[fmt]
    x, xs, w, ws, b = make(jax.random.key(k), m, k, n)
    got = ref(x, xs, w, ws, b, out_dtype=jnp.float32)
    xn, wn, xsn, wsn = _np(x), _np(w), _np(xs), _np(ws)
    want = np.zeros((m, n)) + _np(b)[None]
    for kb in range(xsn.shape[1]):
        sl = slice(kb * 128, (kb + 1) * 128)
        part = xn[:, sl] @ wn[:, sl].T
        col = np.repeat(wsn[:, kb], 128)[:n]
        want += part * xsn[:, kb : kb + 1] * col[None]
    # f32 sums of int8 products reach 1e5: the absolute tolerance follows the largest output.
    np.testing.assert_allclose(_np(got), want, rtol=1e-4, atol=max(1e-3, 1e-6 * np.abs(want).max()))


def test_magic_number_conversion_is_exact_on_the_edges_of_an_int8_dot():
    # What the attention kernel's int8 Q K^T scores can be (|p| <= 128^3 = 2^21), and the magic
    # number's own limit 2^22: the biased float minus the bias is the integer, exactly.
    edges = np.array([0, 1, -1, 2**21, -(2**21), 2**22 - 1, -(2**22), 127 * 127 * 128, -128 * 127 * 128], np.int32)
    out = _common.biased_int32_to_float32(jnp.asarray(edges)) - jnp.float32(_common.MAGIC_VALUE)
    np.testing.assert_array_equal(np.asarray(out), edges.astype(np.float32))
    assert out.dtype == jnp.float32


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_magic_number_conversion_matches_astype(seed):
    p = jax.random.randint(jax.random.key(seed), (64, 128), -(2**22), 2**22 + 1, jnp.int32)
    biased = _common.biased_int32_to_float32(p)
    chex.assert_trees_all_equal(biased - jnp.float32(_common.MAGIC_VALUE), p.astype(jnp.float32))


def test_w8a8_bad_shapes_raise_named_errors():
    x, xs, w, ws, b = _inputs(testing.w8a8_int8_inputs, 0, 4, 64, 8)
    with pytest.raises(ValueError, match="K-major"):
        w8a8.int8_matmul(x, xs, w.T, ws, b)
    with pytest.raises(ValueError, match="x_scale"):
        w8a8.int8_matmul(x, xs[:2], w, ws, b)
    with pytest.raises(ValueError, match="w_scale"):
        w8a8.int8_matmul(x, xs, w, ws[:3], b)
    with pytest.raises(ValueError, match="bias"):
        w8a8.int8_matmul(x, xs, w, ws, b[:1])
    with pytest.raises(ValueError, match="dtype"):
        w8a8.int8_matmul(x.astype(jnp.float8_e4m3fn), xs, w, ws, b)
    xf, xsf, wf, wsf, _ = _inputs(testing.w8a8_fp8_block_inputs, 0, 4, 256, 8)
    with pytest.raises(ValueError, match=r"x_scale must be \[M, ceil\(K/128\)\]"):
        w8a8.fp8_block_matmul(xf, xsf[:, :1], wf, wsf)
    xi, xsi, wi, wsi, _ = _inputs(testing.w8a8_int8_block_inputs, 0, 4, 256, 8)
    with pytest.raises(ValueError, match=r"int8_block_matmul: x_q .*dtype"):
        w8a8.int8_block_matmul(xf, xsi, wi, wsi)  # e4m3 codes into the int8 kernel
    with pytest.raises(ValueError, match=r"int8_block_matmul: w_scale must be"):
        w8a8.int8_block_matmul(xi, xsi, wi, wsi[:, :1])


# --------------------------------------------------------------------------
# int4 packing and weight-only references.
# --------------------------------------------------------------------------


def test_int4_nibble_layout_is_low_first_twos_complement():
    q = jnp.array([[1, 2, 7, -1, -8, 0]])
    packed = weight_only.pack_int4(q)
    chex.assert_trees_all_equal(packed, jnp.array([[0x21, 0xF7, 0x08]], jnp.uint8))
    chex.assert_trees_all_equal(weight_only.unpack_int4(packed), q.astype(jnp.int8))


# One program a shape for each direction (eager, each of their ops compiles again for every shape).
_jit_pack_int4 = jax.jit(weight_only.pack_int4)
_jit_unpack_int4 = jax.jit(weight_only.unpack_int4, static_argnums=1)


@settings(max_examples=4, deadline=None)
@given(n=st.integers(1, 5), k=st.integers(1, 37), seed=st.integers(0, 2**16))
def test_int4_pack_roundtrip(n, k, seed):
    q = np.random.default_rng(seed).integers(-8, 8, size=(n, k))
    packed = _jit_pack_int4(jnp.asarray(q))
    assert packed.shape == (n, (k + 1) // 2) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(_jit_unpack_int4(packed, k)), q)


def test_xla_int4_view_matches_packing():
    """The kernel views packed bytes as int4[N, K]; XLA must read the same values."""
    q = np.random.default_rng(0).integers(-8, 8, size=(6, 256))
    prepared = weight_only.prepare_w4a16(weight_only.pack_int4(jnp.asarray(q)), jnp.ones((6, 2)), 256)
    assert prepared.w.dtype == jnp.int4 and prepared.w.shape == (128, 256)
    np.testing.assert_array_equal(np.asarray(prepared.w[:6].astype(jnp.int32)), q)
    assert prepared.s_t.shape == (2, 128)


@pytest.mark.parametrize("m,k,n", RAGGED + [(4, 301, 130)])
def test_w4a8_reference_matches_numpy_and_cpu_wrapper(m, k, n):
    x, xs, packed, ws, b = _inputs(testing.w4a8_inputs, k + n, m, k, n)
    got = w4a8.w4a8_matmul_reference(x, xs, packed, ws, b, out_dtype=jnp.float32)
    q = _np(weight_only.unpack_int4(packed, k))
    assert q.min() >= -8 and q.max() <= 7
    want = (_np(x) @ q.T) * _np(xs) * _np(ws)[None] + _np(b)[None]
    np.testing.assert_allclose(_np(got), want, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(w4a8.int4_view(packed, k).astype(jnp.int8), weight_only.unpack_int4(packed, k))
    assert not w4a8.supports(x)  # no GPU here (and M < MIN_M)
    chex.assert_trees_all_equal(
        w4a8.w4a8_matmul(x, xs, packed, ws, b), w4a8.w4a8_matmul_reference(x, xs, packed, ws, b)
    )


def test_svdquant_path_adds_the_lowrank_branch_to_the_w4a8_gemm():
    x, x_q, xs, packed, ws, l1, l2, b = _inputs(testing.svdquant_r32_inputs, 3, 6, 200, 72)
    got = w4a8.svdquant_matmul(x, x_q, xs, packed, ws, l1, l2, b, out_dtype=jnp.float32)
    base = w4a8.w4a8_matmul_reference(x_q, xs, packed, ws, b, out_dtype=jnp.float32)
    branch = (_np(x) @ _np(l1)) @ _np(l2)
    np.testing.assert_allclose(_np(got) - _np(base), branch, rtol=2e-2, atol=2e-2 * np.abs(branch).max())
    chex.assert_trees_all_close(
        got, w4a8.svdquant_matmul_reference(x, x_q, xs, packed, ws, l1, l2, b, jnp.float32), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match=r"l1 must be \[K, r\]"):
        w4a8.svdquant_matmul(x, x_q, xs, packed, ws, l1[:5], l2)


def test_int8_lowrank_epilogue_reference_path():
    # Off the GPU, int8_matmul(lowrank=(h, l2t)) is the reference plus h @ l2t^T, once rounded.
    x, xs, w, ws, b = _inputs(testing.w8a8_int8_inputs, 5, 7, 256, 40)
    h = jax.random.normal(jax.random.key(6), (7, 32), jnp.float32).astype(jnp.bfloat16)
    l2t = jax.random.normal(jax.random.key(7), (40, 32), jnp.float32).astype(jnp.bfloat16)
    got = w8a8.int8_matmul(x, xs, w, ws, b, jnp.float32, lowrank=(h, l2t))
    want = _np(w8a8.int8_matmul_reference(x, xs, w, ws, b, jnp.float32)) + _np(h) @ _np(l2t).T
    np.testing.assert_allclose(_np(got), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rank,fused", [(32, True), (16, True), (64, True), (8, False), (80, False)])
def test_svdquant_fuses_the_branch_into_the_gemm_epilogue(rank, fused, monkeypatch):
    monkeypatch.setenv(_common.FORCE_ENV, "pallas")
    args = _input_shapes(testing.svdquant_r32_inputs, w4a8.MIN_M + 6, 320, 136, rank=rank)
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    text = jax.jit(w4a8.svdquant_matmul).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") > 0
    # Fused: one GEMM custom call and one XLA dot (x @ L1); unfused ranks keep both branch dots.
    assert text.count("stablehlo.dot_general") == (1 if fused else 2), rank
    with pytest.raises(ValueError, match="multiple of 16 up to 64"):
        w8a8.scaled_gemm_pallas(
            jnp.zeros((128, 128), jnp.int8),
            jnp.zeros((256, 128), jnp.int8),
            jnp.zeros((128,)),
            jnp.zeros((2, 256)),
            jnp.zeros((128, 24), jnp.bfloat16),
            jnp.zeros((256, 24), jnp.bfloat16),
            out_dtype=jnp.bfloat16,
            config=w8a8.DEFAULT_CONFIG,
            sms=132,
        )


def test_w4a8_bad_shapes_raise_named_errors():
    x, xs, packed, ws, b = _inputs(testing.w4a8_inputs, 0, 4, 256, 16)
    with pytest.raises(ValueError, match=r"w_packed must be \[N, ceil\(K/2\)\]"):
        w4a8.w4a8_matmul(x, xs, packed[:, :100], ws)
    with pytest.raises(ValueError, match="per-channel scales"):
        w4a8.w4a8_matmul(x, xs, packed, ws[:3])
    with pytest.raises(ValueError, match="per-token scales"):
        w4a8.w4a8_matmul(x, xs[:2], packed, ws)
    with pytest.raises(ValueError, match="x_q"):
        w4a8.w4a8_matmul(x.astype(jnp.float32), xs, packed, ws)


def test_w4a8_lowers_to_mosaic_gpu_from_min_m(monkeypatch):
    monkeypatch.setenv(_common.FORCE_ENV, "pallas")
    case = testing.CASES["w4a8"]
    args = _input_shapes(case.make_inputs, w4a8.MIN_M + 6, 300, 136)
    assert _lowers_to_mosaic(case.kernel, *args)
    small = _input_shapes(case.make_inputs, 16, 300, 136)
    assert not _lowers_to_mosaic(case.kernel, *small)  # small M stays on the reference (W4A16's job)


@pytest.mark.parametrize("m,k,n", RAGGED + [(3, 300, 130)])
def test_w4a16_reference_matches_numpy(m, k, n):
    x, packed, scales = _inputs(testing.w4a16_inputs, k, m, k, n)
    got = weight_only.w4a16_matmul_reference(x, packed, scales, out_dtype=jnp.float32)
    q = _np(weight_only.unpack_int4(packed, k))
    w = q * np.repeat(_np(scales), 128, axis=1)[:, :k]
    np.testing.assert_allclose(_np(got), _np(x) @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m,k,n", RAGGED)
@pytest.mark.parametrize("fp8", [False, True])
def test_w8a16_reference_matches_numpy(m, k, n, fp8):
    make = testing.w8a16_fp8_inputs if fp8 else testing.w8a16_inputs
    x, w, s = make(jax.random.key(n), m, k, n)
    b = jnp.arange(n, dtype=jnp.float32)
    got = weight_only.w8a16_matmul_reference(x, w, s, b, out_dtype=jnp.float32)
    want = (_np(x) @ _np(w).T) * _np(s)[None] + _np(b)[None]
    np.testing.assert_allclose(_np(got), want, rtol=1e-4, atol=1e-4)


def test_weight_only_bad_shapes_raise_named_errors():
    x, packed, scales = _inputs(testing.w4a16_inputs, 0, 2, 256, 8)
    with pytest.raises(ValueError, match="w_packed must be"):
        weight_only.w4a16_matmul(x, packed[:, :5], scales)
    with pytest.raises(ValueError, match="w_scale must be"):
        weight_only.w4a16_matmul(x, packed, scales[:, :1])
    with pytest.raises(ValueError, match="prepared for"):
        weight_only.w4a16_matmul_prepared(x[:, :128], weight_only.prepare_w4a16(packed, scales, 256))
    x8, w8, s8 = _inputs(testing.w8a16_inputs, 0, 2, 64, 8)
    with pytest.raises(ValueError, match="per-channel"):
        weight_only.w8a16_matmul(x8, w8, s8[:2])


def test_weight_only_split_config():
    for k_steps in (12, 24, 70, 96, 40, 1):
        cfg = weight_only._pick_config(16, 3072, k_steps, 132, 4)
        assert k_steps % cfg.splits == 0 and cfg.tokens == 16 and 2 <= cfg.stages <= 8
    assert weight_only._pick_config(100, 3072, 24, 132, 8).tokens == 128
    # One wave of CTAs (the sweep in benchmarks/weight_only_sweep-NVIDIA_H200.json): 24 column
    # tiles of 3072 split K 4 ways (96 CTAs), 96 tiles of 12288 do not split.
    assert weight_only._pick_config(1, 3072, 96, 132, 4).splits == 4
    assert weight_only._pick_config(1, 12288, 96, 132, 4).splits == 1
    for n, k_steps in ((1536, 12), (3072, 24), (5120, 40), (8960, 12)):
        cfg = weight_only._pick_config(1, n, k_steps, 132, 4)
        assert -(-n // 128) * cfg.splits <= max(132, -(-n // 128))


def test_weight_only_kstep_config():
    # int4/g128 takes 512-wide K steps, the rest 256, each lowered until it divides a split.
    assert weight_only._pick_config(1, 12288, 96, 132, 4).kstep == 512
    assert weight_only._pick_config(1, 3072, 24, 132, 4).kstep == 256  # 6 steps per split
    assert weight_only._pick_config(1, 12288, 96, 132, 8).kstep == 256
    assert weight_only._pick_config(1, 12288, 96, 132, 4, "nf4", 64).kstep == 256
    cfg = weight_only._pick_config(1, 1536, 3, 132, 4)
    assert cfg.kstep == 128 and cfg.splits == 3
    assert weight_only._pick_config(256, 3072, 24, 132, 4).kstep == 128  # 128 tokens: smem
    for k_steps in (1, 12, 24, 40, 70, 96):
        for bits, decode, block in ((4, "int", 128), (8, "int", 128), (4, "fp4", 16)):
            cfg = weight_only._pick_config(16, 3072, k_steps, 132, bits, decode, block)
            assert (k_steps // cfg.splits) % (cfg.kstep // 128) == 0


# --------------------------------------------------------------------------
# NF4 / FP4 codebooks.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_codebook_decode_matches_table(fmt):
    table = np.asarray({"nf4": NF4_TABLE, "fp4": FP4_TABLE}[fmt], np.float32)
    q = np.array([w4_table._signed_value(c, fmt) for c in range(16)], np.float32)
    assert q.min() >= -8 and q.max() <= 7  # int4 values
    got32 = _np(weight_only.decode_codes(jnp.asarray(q), fmt))
    np.testing.assert_allclose(got32, table, atol=3e-5 if fmt == "nf4" else 0)
    # In the kernel's bf16 registers the decode equals the table rounded to bf16.
    got16 = weight_only.decode_codes(jnp.asarray(q, jnp.bfloat16), fmt)
    chex.assert_trees_all_equal(got16, jnp.asarray(table).astype(jnp.bfloat16))


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_codebook_byte_remap_keeps_both_nibbles(fmt):
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 16, (7, 40)), jnp.int32)
    values = jnp.asarray(w4_table._byte_lut(fmt))[weight_only.pack_int4(codes)]
    q = weight_only.unpack_int4(values)
    want = np.vectorize(lambda c: w4_table._signed_value(int(c), fmt))(np.asarray(codes))
    np.testing.assert_array_equal(np.asarray(q), want)


# One program per example (eager, each op of the paths compiled again for every new shape: ~30
# programs an example): the random inputs, then what the test checks on them.
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _codebook_case(key, m, k, n, fmt, block, scaling):
    """Inputs, and the reference, its dequantized weights, the kernel layout and the XLA path on it."""
    x, packed, scales, tensor = inputs = testing.table_inputs(key, m, k, n, fmt, block, scaling)
    ref = w4_table.w4_table_matmul_reference(x, packed, scales, tensor, fmt=fmt, block=block, out_dtype=jnp.float32)
    prepared = w4_table.prepare_w4_table(packed, scales, k, fmt=fmt, block=block)
    got = w4_table.w4_table_matmul_prepared(x, prepared, tensor, out_dtype=jnp.float32)
    return inputs, (ref, w4_table.dequantize(packed, scales, k, fmt=fmt, block=block), prepared, got)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _uint4_case(key, m, k, n, group):
    """Inputs, and the uint4 reference, the unpacked codes, the kernel layout and the XLA path on it."""
    x, packed, scales, zeros = inputs = testing.uint4_inputs(key, m, k, n, group)
    ref = w4_table.uint4_matmul_reference(x, packed, scales, zeros, out_dtype=jnp.float32, group_size=group)
    prepared = w4_table.prepare_uint4(packed, scales, zeros, k, group)
    got = weight_only.w4a16_matmul_prepared(x, prepared, out_dtype=jnp.float32)
    return inputs, (ref, weight_only.unpack_int4(packed, k), prepared, got)


@settings(deadline=None, max_examples=5)
@given(
    fmt=st.sampled_from(["nf4", "fp4"]),
    block=st.sampled_from([16, 32, 64, 128]),
    m=st.integers(1, 20),
    kb=st.integers(1, 5),
    n=st.integers(1, 150),
    nv=st.booleans(),
)
def test_codebook_prepared_path_matches_reference(fmt, block, m, kb, n, nv):
    k = block * kb
    scaling = "nv" if nv and fmt == "fp4" else ""
    (x, packed, scales, tensor), (ref, w_dq, prepared, got) = _codebook_case(
        jax.random.key(m * n + k), m, k, n, fmt, block, scaling
    )
    w_dq_ref = _np(w_dq) * (1.0 if tensor is None else float(tensor))
    want = _np(x) @ w_dq_ref.T
    assert_dot_close(_np(ref), want, _np(x), w_dq_ref, 1e-5, "codebook reference")
    # The kernel layout (remapped codes, padded, decoded by decode_codes) through the XLA path.
    chex.assert_shape(prepared.w, (-(-n // 128) * 128, -(-k // 128) * 128))
    assert_dot_close(_np(got), _np(ref), _np(x), w_dq_ref, 1e-2, "bf16 weights on the XLA path")


@settings(deadline=None, max_examples=6)
@given(
    m=st.sampled_from([1, 7, 20]),  # few shapes: each new one compiles the reference and the prepared path
    kb=st.integers(1, 3),
    n=st.sampled_from([1, 77, 150]),
    group=st.sampled_from([32, 128]),
)
def test_uint4_zero_points_prepared_path_matches_reference(m, kb, n, group):
    k = 128 * kb
    (x, packed, scales, zeros), (ref, unpacked, prepared, got) = _uint4_case(jax.random.key(m + n), m, k, n, group)
    u = _np(unpacked) % 16
    rep = lambda a: np.repeat(_np(a), group, axis=1)
    want = _np(x) @ ((u - rep(zeros)) * rep(scales)).T
    assert_dot_close(_np(ref), want, _np(x), (u - rep(zeros)) * rep(scales), 1e-5, "uint4 reference")
    chex.assert_equal_shape([prepared.s_t, prepared.o_t])
    assert_dot_close(_np(got), want, _np(x), (u - rep(zeros)) * rep(scales), 1e-2, "uint4 prepared path")
    with pytest.raises(ValueError, match="w_zero must have w_scale's shape"):
        w4_table.uint4_matmul(x, packed, scales, np.concatenate([zeros, zeros], 1), group_size=group)


def test_codebook_bad_inputs_raise_named_errors():
    x, packed, scales, _ = _inputs(testing.table_inputs, 0, 2, 128, 8, "nf4", 64)
    with pytest.raises(ValueError, match="fmt must be one of"):
        w4_table.w4_table_matmul(x, packed, scales, fmt="nf5", block=64)
    with pytest.raises(ValueError, match="block 48 must divide K=128"):
        w4_table.w4_table_matmul(x, packed, scales, fmt="nf4", block=48)
    with pytest.raises(ValueError, match=r"w_scale must be \[N, K/32\]"):
        w4_table.w4_table_matmul(x, packed, scales, fmt="nf4", block=32)
    with pytest.raises(ValueError, match="w_packed must be"):
        w4_table.prepare_w4_table(packed[:, :10], scales, 128, fmt="fp4", block=64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        weight_only.prepare_w4a16(packed, scales, 128, 48)


# --------------------------------------------------------------------------
# Activation quantizer.
# --------------------------------------------------------------------------


def test_round_half_even_matches_jnp_round():
    v = jnp.concatenate(
        [jnp.arange(-130, 130, 0.25, dtype=jnp.float32), jnp.array([0.49999997, -0.49999997, 126.5, -126.5])]
    )
    chex.assert_trees_all_equal(_quant.round_half_even(v), jnp.round(v))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("m,k", [(1, 64), (6, 1100), (9, 2049)])
@pytest.mark.parametrize(
    "config",
    [None, act_quant.QuantizerConfig(4, 4, single_pass=False), act_quant.QuantizerConfig(2, 8, single_pass=True)],
)
def test_quantizer_kernel_interpret_matches_reference(fmt, m, k, config):
    # Both the single-pass (row in registers) and the chunked two-pass programs, ragged M and K.
    x = _normal(m * k, (m, k), 3, jnp.bfloat16)
    x = x.at[0].set(0.0)  # an all-zero row gets the scale floor and zeros
    q, s = act_quant.quantize_pallas(x, fmt, interpret=True, config=config)
    qr, sr = _quant.reference(x, fmt)
    chex.assert_trees_all_equal(q, qr)
    chex.assert_trees_all_equal(s, sr)
    assert float(s[0, 0]) == np.float32(act_quant.SCALE_FLOOR) and not np.any(_np(q[0]))


@functools.partial(jax.jit, static_argnums=(1, 2))  # one program a shape (eager: one an op)
def _token_rows(key, m, k, spread):
    """Bf16 rows of scale ``spread``, the first all zero (the scale floor's case)."""
    return (jax.random.normal(key, (m, k)) * spread).astype(jnp.bfloat16).at[0].set(0.0)


# Each rule as one program a shape (eager, each of their ops compiles again for every shape).
_jit_reference = jax.jit(_quant.reference, static_argnums=1)
_jit_quantize = jax.jit(functools.partial(jquant.quantize, check_finite=False), static_argnums=1)


@settings(max_examples=12, deadline=None)
@given(
    m=st.sampled_from([1, 2, 9]),  # few shapes: each new one compiles both quantizers
    k=st.sampled_from([1, 37, 128, 300]),
    spread=st.floats(1e-3, 1e3),
    fmt=st.sampled_from(["int8", "fp8"]),
)
def test_quantizer_reference_is_jquants_per_token_rule(m, k, spread, fmt):
    # The kernels' reference equals jquant.quantize(x, "<fmt>/token") to the bit (codes and scales),
    # so the dispatch may hand activations to the kernel and keep the XLA path's codes.
    x = _token_rows(jax.random.key(m * 1000 + k), m, k, spread)
    q, s = _jit_reference(x, fmt)
    want = _jit_quantize(x, "int8/token" if fmt == "int8" else "fp8_e4m3/token")
    chex.assert_trees_all_equal(q, want.qvalue)
    chex.assert_trees_all_equal(s, want.scale.astype(jnp.float32).reshape(m, 1))


def test_quantizer_error_bound():
    x = jax.random.normal(jax.random.key(3), (7, 300)).astype(jnp.bfloat16)
    q, s = act_quant.quantize_int8(x)
    assert q.dtype == jnp.int8 and s.shape == (7, 1)
    err = np.abs(_np(q) * _np(s) - _np(x))
    assert np.all(err <= _np(s) / 2 + 1e-6)
    assert np.max(np.abs(_np(q))) == 127


def test_quantizer_feeds_int8_gemm():
    x = jax.random.normal(jax.random.key(4), (5, 256)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(5), (12, 256))
    wq, ws = act_quant.quantize_int8(w.astype(jnp.bfloat16))
    xq, xs = act_quant.quantize_int8(x)
    y = w8a8.int8_matmul(xq, xs, wq, ws[:, 0], out_dtype=jnp.float32)
    want = _np(x) @ _np(w).T
    assert np.linalg.norm(_np(y) - want) / np.linalg.norm(want) < 2e-2


# --------------------------------------------------------------------------
# Dispatch and lowering.
# --------------------------------------------------------------------------


def test_cpu_dispatch_falls_back_to_references(monkeypatch):
    monkeypatch.delenv(_common.FORCE_ENV, raising=False)
    x, xs, w, ws, b = _inputs(testing.w8a8_int8_inputs, 1, 3, 128, 16)
    assert not w8a8.supports(x, w)
    chex.assert_trees_all_equal(w8a8.int8_matmul(x, xs, w, ws, b), w8a8.int8_matmul_reference(x, xs, w, ws, b))
    xw, pw, sw = _inputs(testing.w4a16_inputs, 2, 3, 256, 16)
    assert not weight_only.supports(xw)
    chex.assert_trees_all_equal(weight_only.w4a16_matmul(xw, pw, sw), weight_only.w4a16_matmul_reference(xw, pw, sw))
    assert not act_quant.supports(xw)


def test_force_env(monkeypatch):
    monkeypatch.setenv(_common.FORCE_ENV, "pallas")
    assert _common.on_hopper()
    monkeypatch.setenv(_common.FORCE_ENV, "xla")
    assert not _common.on_hopper() and not _common.on_gpu()
    assert not _common.kernel_enabled(True)
    monkeypatch.delenv(_common.FORCE_ENV)
    assert _common.kernel_enabled(True) and not _common.kernel_enabled(False)
    monkeypatch.setenv(_common.FORCE_ENV, "pallas")
    assert _common.kernel_enabled(False)
    monkeypatch.setenv(_common.FORCE_ENV, "sometimes")
    with pytest.raises(ValueError, match="JQUANT_BACKEND"):
        _common.on_hopper()


def test_w8a8_padding_keeps_tma_alignment():
    cfg = w8a8.GemmConfig()
    x, xs, w, ws, b = _inputs(testing.w8a8_int8_inputs, 0, 5, 200, 77)
    xp, wp, xsp, wsb, (m, n) = w8a8._prepare(x, xs, w, ws, b, cfg)
    assert (m, n) == (5, 77)
    assert xp.shape == (128, 256) and wp.shape == (256, 256)
    assert xsp.shape == (128,) and wsb.shape == (2, 256)
    chex.assert_trees_all_equal(xp[:5, :200], x)
    assert not np.any(_np(xp[5:])) and not np.any(_np(wp[:, 200:]))


def _lowers_to_mosaic(fn, *args) -> bool:
    arrays = [i for i, a in enumerate(args) if a is not None]

    def call(*xs):
        full = list(args)
        for i, v in zip(arrays, xs):
            full[i] = v
        return fn(*full)

    shapes = [jax.ShapeDtypeStruct(args[i].shape, args[i].dtype) for i in arrays]
    text = jax.jit(call).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    return "mosaic_gpu" in text


@pytest.mark.parametrize(
    "name",
    [
        "w8a8_int8",
        "w8a8_fp8",
        "w8a8_fp8_block",
        "w8a8_int8_block",
        "w8a8_fp8_block_n128",
        "w8a8_int8_block_n128",
        "w4a16",
        "w8a16",
        "w4a16_g32",
        "w8a16_fp8",
        "w4a16_zp",
        "nf4_w16",
        "fp4_w16",
        "nvfp4_w16",
    ],
)
def test_kernels_lower_to_mosaic_gpu(name, monkeypatch):
    monkeypatch.setenv(_common.FORCE_ENV, "pallas")
    case = testing.CASES[name]
    # (256, 3072, 3072): 128 tokens, where the widest K steps no longer fit in shared memory.
    for m, k, n in [(5, 320, 136), (130, 1024, 520), (3, 3072, 256), (256, 3072, 3072)]:
        k = -(-k // case.k_multiple) * case.k_multiple
        args = _input_shapes(case.make_inputs, m, k, n)
        assert _lowers_to_mosaic(case.kernel, *args), (name, m, k, n)


@pytest.mark.parametrize(
    "m,k,n", [(1030, 320, 136), (1024, 3072, 3072), (2051, 1536, 8960), (1100, 256, 64), (w4a8.WIDEN_MIN_M, 256, 192)]
)
def test_w4a8_lowers_with_int4_tiles_in_the_kernel(m, k, n, monkeypatch):
    # The int4 view reaches the Mosaic kernel (no XLA widening convert); from WIDEN_MIN_M tokens
    # on, one XLA convert widens the weights for the int8 GEMM instead.
    monkeypatch.setenv(_common.FORCE_ENV, "pallas")
    args = _input_shapes(testing.w4a8_inputs, m, k, n)
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    text = jax.jit(w4a8.w4a8_matmul).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    widened = re.search(r"stablehlo\.convert .*xi4>\) -> tensor<[0-9x]+xi8>", text) is not None
    assert widened == (m >= w4a8.WIDEN_MIN_M)


@pytest.mark.parametrize("k", [1536, 5120, 8960, 13824, 20000])
def test_act_config_runs_wide_rows_on_four_warps(k):
    # The activation path keeps the plain quantizer's program except one-row programs (padded
    # past 8192 lanes), which the sweep measured faster on 4 warps than on 8, and takes the
    # approximate arithmetic once it passed its GPU check and is made the default.
    got, plain = act_quant.act_config(k), act_quant.pick_config(k)
    assert got.approx == (act_quant.ACT_APPROX_GPU_VERIFIED and act_quant.ACT_APPROX_DEFAULT) and not plain.approx
    got = dataclasses.replace(got, approx=False)
    if plain.single_pass and act_quant.padded_width(k) > 8192:
        assert (got.rows, got.warps, got.single_pass) == (1, 4, True) and plain.warps == 8
    else:
        assert got == plain


@pytest.mark.parametrize("k", [3000, 20000])
def test_quantizer_lowers_to_triton(k):
    # 3000: one pass with the row in registers and cvt.rni rounding; 20000: too wide, chunked.
    assert act_quant.pick_config(k).single_pass == (k <= act_quant.SINGLE_PASS_MAX)
    x = jnp.zeros((10, k), jnp.bfloat16)
    text = (
        jax.jit(lambda v: act_quant.quantize_pallas(v, "int8"))
        .trace(jax.ShapeDtypeStruct(x.shape, x.dtype))
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert "xla.gpu.triton" in text
    with pytest.raises(ValueError, match="too wide for the single-pass"):
        act_quant.quantize_pallas(
            jnp.zeros((2, 20000), jnp.bfloat16),
            "int8",
            interpret=True,
            config=act_quant.QuantizerConfig(single_pass=True),
        )


def test_triton_language_quantizer_needs_the_gpu_extra():
    # jax-triton is the optional 'gpu' extra (evaluated on the GPU by scripts/sweep_act_quant.py --jax-triton);
    # without it the entry point says what to install instead of failing on a missing name.
    if triton_quant.available():
        pytest.skip("jax-triton is installed here")
    with pytest.raises(ImportError, match=r"jquant\[gpu\]"):
        triton_quant.quantize(jnp.zeros((2, 8), jnp.bfloat16), "int8")
    with pytest.raises(ImportError, match=r"jquant\[gpu\]"):
        act_quant.quantize_int8(jnp.zeros((2, 8), jnp.bfloat16), method="triton")
    assert not act_quant._triton_usable(jnp.zeros((2, 8), jnp.bfloat16))
    with pytest.raises(ValueError, match="auto/pallas/triton/xla"):
        act_quant.quantize_fp8(jnp.zeros((2, 8), jnp.bfloat16), method="cuda")


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("m,k", [(3, 1536), (2, 64), (5, 768), (2, 5120), (17, 512)])
def test_fused_hadamard_quantizer_matches_rotate_then_quantize(fmt, m, k):
    # The kernel rotates rows in registers (inner Sylvester product + leading-block mix) and must
    # give apply_hadamard's rows rounded to bf16, then the same codes and scales.
    x = _normal(m + k, (m, k), 3, jnp.bfloat16)
    q, s = act_quant.quantize_pallas(x, fmt, interpret=True, hadamard=True)
    qr, sr = _quant.reference(x, fmt, hadamard=True)
    chex.assert_trees_all_equal(q, qr)
    chex.assert_trees_all_equal(s, sr)
    lay = act_quant.hadamard_layout(k)
    assert lay.width >= k and lay.width % lay.inner == 0
    # Off the GPU, method="auto" is the reference (XLA rotation + quantize).
    assert not act_quant.supports(x, hadamard=True)
    chex.assert_trees_all_equal(act_quant.quantize_int8(x, hadamard=True), _quant.reference(x, "int8", True))


_Q = act_quant.QuantizerConfig


@pytest.mark.parametrize("fmt,m,k,block,dtype,config", [
    ("int8", 17, 512, 128, jnp.bfloat16, None),
    ("fp8", 3, 1536, 256, jnp.bfloat16, None),
    ("int8", 5, 8960, 128, jnp.bfloat16, None),
    ("int8", 4, 384, 128, jnp.float32, None),
    ("int8", 33, 640, 128, jnp.bfloat16, _Q(rows=32, warps=8, single_pass=False, stages=3)),
    # one pass: whole rows (padded to a power of two) as stacked chunks under one dot
    ("int8", 17, 512, 128, jnp.bfloat16, _Q(rows=4, warps=4, single_pass=True)),
    ("fp8", 3, 1536, 256, jnp.bfloat16, _Q(rows=2, warps=4, single_pass=True)),
    ("int8", 5, 8960, 128, jnp.bfloat16, _Q(rows=1, warps=8, single_pass=True)),
    ("int8", 7, 384, 128, jnp.float32, _Q(rows=4, warps=4, single_pass=True)),
])  # fmt: skip
def test_block_rotation_quantizer_matches_rotate_then_quantize(fmt, m, k, block, dtype, config):
    # hadamard=b: each b-wide chunk rotated by one +-1 product (two chunked passes, or one pass
    # over whole rows), giving apply_block_hadamard's rows rounded to x's dtype, then jquant's
    # codes and scales.
    x = _normal(m + k, (m, k), 3, dtype)
    q, s = act_quant.quantize_pallas(x, fmt, interpret=True, hadamard=block, config=config)
    qr, sr = _quant.reference(x, fmt, hadamard=block)
    if dtype == jnp.bfloat16:  # the rows round to bf16 on both sides: bit for bit
        chex.assert_trees_all_equal(s, sr)
        chex.assert_trees_all_equal(q, qr)
    else:  # float32 sums in another order: scales within rounding, codes at most a step apart, rarely
        chex.assert_trees_all_close(s, sr, rtol=1e-6, atol=0)
        diff = np.abs(np.asarray(q, np.float32) - np.asarray(qr, np.float32))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-2
    assert act_quant.block_matrix(k, block) is not None
    assert not act_quant.supports(x, hadamard=block)  # off the GPU


def test_block_rotation_quantizer_refuses_what_it_cannot_map():
    for k, b in ((512, 96), (500, 128), (128, 128), (512, 8)):
        assert act_quant.block_matrix(k, b) is None
    with pytest.raises(ValueError, match="no fused block-128 rotation for K=500"):
        act_quant.quantize_pallas(jnp.zeros((2, 500), jnp.bfloat16), "int8", interpret=True, hadamard=128)
    with pytest.raises(ValueError, match="True or a block order"):
        act_quant.quantize_pallas(jnp.zeros((2, 512), jnp.bfloat16), "int8", interpret=True, hadamard=-4)
    with pytest.raises(ValueError, match=">= 16 chunks per program"):  # the dot needs 16 rows
        act_quant.quantize_pallas(
            jnp.zeros((2, 512), jnp.bfloat16), "int8", interpret=True, hadamard=128, config=_Q(2, 4, True)
        )
    single = _Q(rows=1, warps=8, single_pass=True)
    for k, cfg in ((1536, None), (8960, None), (1536, single), (8960, single)):  # lowers to Triton (Wan's widths)
        text = (
            jax.jit(lambda v, cfg=cfg: act_quant.quantize_pallas(v, "int8", hadamard=128, config=cfg))
            .trace(jax.ShapeDtypeStruct((37, k), jnp.bfloat16))
            .lower(lowering_platforms=("cuda",))
            .as_text()
        )
        assert "xla.gpu.triton" in text


def test_fused_hadamard_refuses_what_it_cannot_map():
    # Wan's FFN widths (two Paley factors) and fallback plans have no fused layout.
    for k in (8960, 13824, 200):
        assert act_quant.hadamard_layout(k) is None
    with pytest.raises(ValueError, match="no fused Hadamard for K=8960"):
        act_quant.quantize_pallas(jnp.zeros((2, 8960), jnp.bfloat16), "int8", interpret=True, hadamard=True)
    with pytest.raises(ValueError, match="no fused Hadamard"):
        act_quant.quantize_int8(jnp.zeros((2, 64), jnp.bfloat16), method="triton", hadamard=True)
    text = (
        jax.jit(lambda v: act_quant.quantize_pallas(v, "int8", hadamard=True))
        .trace(jax.ShapeDtypeStruct((37, 3072), jnp.bfloat16))
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert "xla.gpu.triton" in text


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=64))
def test_round_to_bf16_is_the_bf16_cast(values):
    v = jnp.asarray(np.asarray(values, np.float32))
    ties = jnp.asarray(np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 0.0], np.float32))
    for a in (v, ties):
        chex.assert_trees_all_equal(act_quant.round_to_bf16(a), a.astype(jnp.bfloat16).astype(jnp.float32))


@pytest.mark.parametrize("config", [w4a16_gemm.W4A16GemmConfig(), w4a16_gemm.W4A16GemmConfig(128, 128)])
def test_w4a16_large_m_kernel_lowers_and_dispatches(config, monkeypatch):
    # The large-M W4A16 kernel (int4 dequantized in registers) lowers to Mosaic GPU; the prepared
    # path takes it from MIN_M tokens once verified or forced, and never off the GPU.
    x, prepared = jax.eval_shape(  # shapes only: nothing here runs
        lambda key: (lambda x, p, s: (x, weight_only.prepare_w4a16(p, s, 320)))(
            *testing.w4a16_inputs(key, 5, 320, 136)
        ),
        jax.random.key(0),
    )
    assert not w4a16_gemm.supports(x)
    monkeypatch.setenv(_common.FORCE_ENV, "pallas")
    monkeypatch.setattr(_common, "on_hopper", lambda: True)
    assert not w4a16_gemm.supports(x) and not w4a16_gemm.supports(x, 32)
    big = jax.ShapeDtypeStruct((w4a16_gemm.MIN_M + 3, 320), jnp.bfloat16)
    assert w4a16_gemm.supports(big) and not w4a16_gemm.supports(big, offsets=True)
    # Small weights stay on XLA's dequantize + GEMM (measured faster there).
    assert w4a16_gemm.supports(big, n=-(-w4a16_gemm.MIN_KN // 320)) and not w4a16_gemm.supports(big, n=136)
    text = (
        jax.jit(lambda v, p: w4a16_gemm.w4a16_large_m(v, p, config=config))
        .trace(big, prepared)
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert "mosaic_gpu" in text
    # int8 per-channel weights (W8A16) through the same kernel.
    _, w8, s8 = _input_shapes(testing.w8a16_inputs, 5, 320, 136)
    text = (
        jax.jit(lambda v, w, s: w4a16_gemm.w8a16_large_m(v, w, s, config=config))
        .trace(big, w8, s8)
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert "mosaic_gpu" in text
    with pytest.raises(ValueError, match="unsupported tiling"):
        w4a16_gemm.W4A16GemmConfig(tokens=96).check()


def test_block_sweep_programs_are_valid_and_exact():
    # Every program scripts/sweep_act_quant.py --block 128 times on the GPU is one quantize_pallas
    # accepts at Wan's widths and gives the reference's codes (interpreter, a few rows).
    from _scripts import load_script, unload_script

    sweep = load_script("sweep_act_quant")
    try:
        for k in (1536, 8960):
            cfgs = sweep.block_configs(k, 128)
            assert "chunked_r16_w4" in cfgs and any(c.single_pass for c in cfgs.values())
            x = _normal(k, (3, k), 2, jnp.bfloat16)
            want = _quant.reference(x, "int8", hadamard=128)
            for name, cfg in cfgs.items():
                got = act_quant.quantize_pallas(x, "int8", interpret=True, hadamard=128, config=cfg)
                chex.assert_trees_all_equal(got, want, custom_message=name)
    finally:
        unload_script(sweep)


@pytest.mark.parametrize(
    "k,block", [(1536, 128), (1536, 256), (512, 128), (5120, 128), (8960, 128), (13824, 128), (2048, 1024)]
)
def test_block_config_is_a_program_the_rotation_can_run(k, block):
    # The default holds >= 16 chunks per program (the rotation's dot needs 16 rows) and one pass
    # only where the padded row fits the sweep's 8K-values-per-program design.
    cfg = act_quant.block_config(k, block)
    chunks = cfg.rows * (act_quant.padded_width(k) if cfg.single_pass else block) // block
    assert chunks >= 16
    assert cfg.single_pass == (act_quant.padded_width(k) <= 2048 and block <= 512)
    if not cfg.single_pass:
        assert (cfg.rows, cfg.warps, cfg.stages) == (64, 8, 2)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("m,k", [(37, 1000), (5, act_quant.SINGLE_PASS_MAX + 200)])
def test_activation_quantizer_matches_its_reference(fmt, m, k):
    # The bias + activation + per-token quantizer in the interpreter (one pass, and two chunked
    # passes for a row wider than the registers hold; ragged rows and columns) against the
    # float32 reference; every kernel activation lowers to Triton for the GPU.
    y = (jax.random.normal(jax.random.key(0), (m, k), jnp.float32) * 3).astype(jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(1), (k,), jnp.float32)
    for activation in act_quant.KERNEL_ACTIVATIONS:
        for b in (bias, None):
            q, s = act_quant.quantize_act(y, b, activation, fmt, method="pallas")
            qr, sr = act_quant.act_reference(y, b, activation, fmt)
            stats = testing.check_quantized((q, s), (qr, sr), (1e-3, 1e-6))
            assert stats["ok"], (activation, stats["detail"])
    silu = act_quant.act_reference(y, None, "silu", fmt)[1]
    assert not np.allclose(np.asarray(silu), np.asarray(act_quant.act_reference(y, None, "relu", fmt)[1]))
    text = (
        jax.jit(lambda v, c: act_quant.quantize_pallas(v, fmt, bias=c, activation="gelu_tanh"))
        .trace(jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((k,), jnp.float32))
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert "xla.gpu.triton" in text


@pytest.mark.parametrize(
    "fmt,activation,k", [("int8", "gelu_tanh", 1000), ("fp8", "gelu_tanh", 8960), ("int8", "silu", 300)]
)
def test_the_approximate_program_is_within_one_step_of_the_exact_one(fmt, activation, k):
    # QuantizerConfig.approx scales each code by the row's reciprocal (and rounds it by one
    # conversion): the same scales, codes one step apart where v / s and v * (1 / s) fall on two
    # sides of a rounding boundary. (Its PTX division and exponential run only on the GPU.)
    y = _normal(4, (9, k), 3, jnp.bfloat16)
    bias = _normal(5, (k,), 1, jnp.float32)
    exact = act_quant.QuantizerConfig(rows=2, warps=4, single_pass=True)
    kw = dict(interpret=True, bias=bias, activation=activation)
    want = act_quant.quantize_pallas(y, fmt, config=exact, **kw)
    got = act_quant.quantize_pallas(y, fmt, config=dataclasses.replace(exact, approx=True), **kw)
    chex.assert_trees_all_equal(got[1], want[1])
    c, w = np.asarray(got[0], np.float32), np.asarray(want[0], np.float32)
    step = 1.0 if fmt == "int8" else np.exp2(np.floor(np.log2(np.maximum(np.abs(w), 2.0**-6))) - 3)
    assert (np.abs(c - w) <= step).all() and (c != w).mean() <= 1e-3
    assert float(np.abs(c).sum()) > 0


def test_the_approximate_program_lowers_to_its_ptx_and_is_refused_elsewhere():
    cfg = act_quant.QuantizerConfig(rows=1, warps=4, approx=True)
    y = jnp.ones((4, 1024), jnp.bfloat16)
    with pytest.raises(ValueError, match="approx is for the activation path"):
        act_quant.quantize_pallas(y, "int8", interpret=True, config=cfg)
    with pytest.raises(ValueError, match="single-pass config, exact"):
        norm_quant.norm_modulate_quantize_pallas(
            y, None, None, jnp.zeros((1024,)), jnp.zeros((1024,)), 1e-6, fmt="int8", interpret=True, config=cfg
        )
    from _scripts import load_script, unload_script  # pylint: disable=import-outside-toplevel

    kf = load_script("kernel_fingerprint")
    try:
        texts = [
            "\n".join(
                kf.triton_modules(
                    lambda v, c=dataclasses.replace(cfg, approx=approx): act_quant.quantize_pallas(
                        v, "int8", config=c, activation="gelu_tanh"
                    ),
                    jax.ShapeDtypeStruct((32, 8960), jnp.bfloat16),
                )
            )
            for approx in (False, True)
        ]
    finally:
        unload_script(kf)
    exact, approx = texts
    for op in ("div.approx.ftz.f32", "ex2.approx.ftz.f32", "cvt.rni.sat.s8.f32"):
        assert op in approx and op not in exact, op
    assert "ex2.approx.f32" in exact and "cvt.rni.f32.f32" in exact


def test_activation_quantizer_refuses_what_it_cannot_do():
    y = jnp.ones((4, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="activation 'gelu' needs one of"):  # erfc: no Triton lowering
        act_quant.quantize_pallas(y, "int8", interpret=True, activation="gelu")
    with pytest.raises(ValueError, match="no rotation"):
        act_quant.quantize_pallas(y, "int8", interpret=True, activation="silu", hadamard=128)
    with pytest.raises(ValueError, match="bias must have 256 values"):
        act_quant.quantize_pallas(y, "int8", interpret=True, bias=jnp.ones((128,)), activation="silu")
    with pytest.raises(ValueError, match="not in"):
        act_quant.quantize_act(y, None, "swish", "int8")
    # exact gelu stays on the reference, which still computes it
    q, s = act_quant.quantize_act(y, None, "gelu", "int8")
    assert q.shape == (4, 256) and float(s[0, 0]) == pytest.approx(float(jax.nn.gelu(1.0, approximate=False)) / 127)


@pytest.mark.parametrize("approx", [False, True])
def test_kernel_activation_formulas_are_the_reference_functions(approx):
    # The one-exp formulas the quantizer kernel uses equal ACTIVATIONS' to float32 rounding over
    # the whole range, and saturate without NaN at both ends. In gelu's negative tail (v < -5)
    # the tanh form cancels to 0 where the exp form keeps values under 1e-6: an absolute bound.
    from pallas_kernels.fused_producers import ACTIVATIONS  # pylint: disable=import-outside-toplevel

    v = jnp.concatenate([jnp.linspace(-30.0, 30.0, 20001), jnp.asarray([-3e38, -1e6, -90.0, 0.0, 90.0, 1e6, 3e38])])
    for name in act_quant.KERNEL_ACTIVATIONS:
        got, want = act_quant.kernel_activation(name, v, interpret=True, approx=approx), ACTIVATIONS[name](v)
        assert np.isfinite(np.asarray(got)).all(), name
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="not in"):
        act_quant.kernel_activation("gelu", v, interpret=True)


def test_activation_sweep_variants_match_their_references(monkeypatch):
    # scripts/sweep_act_quant.py --activation: every variant (programs, no bias, the baselines with
    # their own references) is valid at Wan's FFN width and matches (interpreter, a few rows).
    import functools  # pylint: disable=import-outside-toplevel

    from _scripts import load_script, unload_script

    sweep = load_script("sweep_act_quant")
    monkeypatch.setattr(act_quant, "quantize_pallas", functools.partial(act_quant.quantize_pallas, interpret=True))
    try:
        x = _normal(3, (3, 8960), 2, jnp.bfloat16)
        want = act_quant.act_reference(x, jnp.zeros((8960,)), "gelu_tanh", "int8")
        variants = sweep.activation_variants("gelu_tanh")("int8", 8960)
        assert {"default", "default_no_bias", "plain_quantizer", "xla_act+kernel", "approx_r1_w4"} <= set(variants)
        for name, fn in variants.items():
            fn, ref = fn if isinstance(fn, tuple) else (fn, None)
            expected = want if ref is None else ref(x)
            got = fn(x)
            d = np.abs(np.asarray(got[0], np.float32) - np.asarray(expected[0], np.float32))
            assert d.max() <= 1 and (d > 0).mean() <= 1e-3, name
            np.testing.assert_allclose(np.asarray(got[1]), np.asarray(expected[1]), rtol=1e-6, err_msg=name)
    finally:
        unload_script(sweep)
