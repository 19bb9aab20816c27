"""The 4- and 8-bit weight layouts the weight-only kernels share, and their plain-JAX references.

Packing (two signed nibbles per byte along K, low nibble first), the kernel layout of 4-bit
weights (:class:`W4Prepared`, :func:`prepare_w4a16`), value decodes (int, FP4, NF4), shape
checks, and the float32 / XLA bf16 references. :mod:`pallas_kernels.weight_only` (small M and
the routing), :mod:`pallas_kernels.w4a16_gemm` (large M), :mod:`pallas_kernels.w4a8` and
:mod:`pallas_kernels.w4_table` all build on it, so none of them imports another for these.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant.formats import NF4_TABLE
from pallas_kernels import _common

GROUP = 128


#: 8-bit weights the W8A16 kernel takes; fp8 ones are converted to bf16 in registers like int8.
W8_DTYPES = (jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2)


#: Scale blocks along K the codebook decode takes (one wgmma per block in a 128-wide K step).
TABLE_BLOCKS = (16, 32, 64, 128)


WT = 64  # weight rows per consumer warpgroup


def pack_int4(q: jax.Array) -> jax.Array:
    """Packs ``int[N, K]`` values in [-8, 7] into ``uint8[N, ceil(K/2)]`` (low nibble first)."""
    _common.check_rank("pack_int4: q", q, 2)
    q = q.astype(jnp.int32)
    if q.shape[1] % 2:
        q = _common.pad_axis(q, 1, q.shape[1] + 1)
    lo = q[:, 0::2] & 0xF
    hi = q[:, 1::2] & 0xF
    return (lo | (hi << 4)).astype(jnp.uint8)


def unpack_int4(packed: jax.Array, k: int | None = None) -> jax.Array:
    """Inverse of :func:`pack_int4`: ``uint8[N, K/2] -> int8[N, K]`` in [-8, 7]."""
    _common.check_rank("unpack_int4: packed", packed, 2)
    _common.check_dtype("unpack_int4: packed", packed, (jnp.uint8,))
    b = packed.astype(jnp.int32)
    lo = b & 0xF
    hi = (b >> 4) & 0xF
    q = jnp.stack([lo, hi], axis=-1).reshape(packed.shape[0], -1)
    q = jnp.where(q >= 8, q - 16, q).astype(jnp.int8)
    return q if k is None else q[:, :k]


def check_w4(x, w_packed, w_scale, group_size):
    _common.check_rank("w4a16_matmul: x", x, 2)
    _common.check_rank("w4a16_matmul: w_packed", w_packed, 2)
    _common.check_dtype("w4a16_matmul: w_packed", w_packed, (jnp.uint8,))
    k = x.shape[1]
    if w_packed.shape[1] != _common.cdiv(k, 2):
        raise ValueError(
            f"w4a16_matmul: w_packed must be [N, ceil(K/2)] = [N, {_common.cdiv(k, 2)}]"
            f" for x with K={k}, got {w_packed.shape}"
        )
    groups = _common.cdiv(k, group_size)
    if w_scale.shape != (w_packed.shape[0], groups):
        raise ValueError(
            f"w4a16_matmul: w_scale must be [N, ceil(K/{group_size})] ="
            f" {(w_packed.shape[0], groups)}, got {w_scale.shape}"
        )


def check_w8(x, w_q, w_scale):
    _common.check_rank("w8a16_matmul: x", x, 2)
    _common.check_rank("w8a16_matmul: w_q", w_q, 2)
    _common.check_dtype("w8a16_matmul: w_q", w_q, W8_DTYPES)
    if w_q.shape[1] != x.shape[1]:
        raise ValueError(f"w8a16_matmul: w_q must be [N, K] with K={x.shape[1]}, got {w_q.shape}")
    if w_scale.size != w_q.shape[0]:
        raise ValueError(f"w8a16_matmul: w_scale must hold {w_q.shape[0]} per-channel scales, got {w_scale.shape}")


def check_bias(name, bias, n):
    if bias is not None and bias.size != n:
        raise ValueError(f"{name}: bias must have {n} entries, got {bias.shape}")


def dequantize_int4(w_packed, w_scale, k: int, group_size: int = GROUP, dtype=jnp.float32) -> jax.Array:
    """``q * scale`` as ``dtype[N, K]`` (the product is formed in float32)."""
    q = unpack_int4(w_packed, k).astype(jnp.float32)
    s = jnp.repeat(w_scale.astype(jnp.float32), group_size, axis=1)[:, :k]
    return (q * s).astype(dtype)


def dot_nt_f32(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [M, K] @ w [N, K]^T`` in float32 at highest precision (the references' GEMM)."""
    return lax.dot_general(
        x.astype(jnp.float32),
        w.astype(jnp.float32),
        (((1,), (1,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )


def finish(y, bias, out_dtype):
    if bias is not None:
        y = y + bias.reshape(1, -1).astype(jnp.float32)
    return y.astype(out_dtype)


def w4a16_matmul_reference(
    x: jax.Array,
    w_packed: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    *,
    group_size: int = GROUP,
) -> jax.Array:
    """Plain-JAX W4A16: dequantize to f32, f32 dot (highest precision), bias."""
    check_w4(x, w_packed, w_scale, group_size)
    check_bias("w4a16_matmul", bias, w_packed.shape[0])
    w = dequantize_int4(w_packed, w_scale, x.shape[1], group_size)
    return finish(dot_nt_f32(x, w), bias, out_dtype)


def w8a16_matmul_reference(
    x: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
    """Plain-JAX W8A16: f32 dot of x with the int8 weights, then the channel scales."""
    check_w8(x, w_q, w_scale)
    check_bias("w8a16_matmul", bias, w_q.shape[0])
    y = dot_nt_f32(x, w_q) * w_scale.reshape(1, -1).astype(jnp.float32)
    return finish(y, bias, out_dtype)


def xla_bf16(x, w_bf16, bias, out_dtype, col_scale=None):
    """The large-M path: XLA's bf16 GEMM on weights dequantized to bf16.

    The barrier keeps XLA from fusing the dequantization into the GEMM (its fused
    int8-operand GEMMs are slower than cuBLAS on a materialized bf16 weight).
    """
    w_bf16 = lax.optimization_barrier(w_bf16)
    y = lax.dot_general(x.astype(jnp.bfloat16), w_bf16, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if col_scale is not None:
        y = y * col_scale.reshape(1, -1).astype(jnp.float32)
    return finish(y, bias, out_dtype)


#: Decoders of 4-bit weights. "int": the int4 value itself. "fp4": e2m1 codes stored as the
#: signed magnitude index q in [-7, 7]; "nf4": NF4 codes stored as q = code - 8 in [-8, 7].
DECODES = ("int", "fp4", "nf4")


def decode_codes(q: jax.Array, decode: str) -> jax.Array:
    """Value of each 4-bit weight from its signed int4 value ``q`` (any float dtype).

    Written with elementwise lax ops only, so the same function runs on XLA arrays and,
    inside the Mosaic GPU kernel, on register tiles (int4 -> bf16 upcast, then this).
    FP4 e2m1 magnitudes ``{0, .5, 1, 1.5, 2, 3, 4, 6}`` are piecewise linear in the index:
    ``f(q) = 2q - clamp(q, -4, 4) / 2 - clamp(q, -6, 6)`` (exact in bf16). NF4 has no closed
    form: the degree-15 polynomial through its 16 points, in float32 Horner form (16 FMAs;
    within 2e-5 of the table, and equal to it after rounding to bf16). A cascade of 15
    compare-and-selects took 94 us in the kernel against the polynomial's 52 us (H200, M=1,
    3072x12288; benchmarks/notes.md).
    """
    if decode == "int":
        return q
    if decode == "fp4":
        two, half = q.dtype.type(2), q.dtype.type(0.5)
        c4 = lax.clamp(q.dtype.type(-4), q, q.dtype.type(4))
        c6 = lax.clamp(q.dtype.type(-6), q, q.dtype.type(6))
        return two * q - half * c4 - c6
    if decode == "nf4":
        coef = nf4_poly()
        u = q.astype(jnp.float32) * jnp.float32(1 / 8) + jnp.float32(1 / 16)
        v = u * jnp.float32(coef[-1]) + jnp.float32(coef[-2])
        for c in coef[-3::-1]:
            v = v * u + jnp.float32(c)
        return v.astype(q.dtype)
    raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")


@functools.lru_cache(maxsize=None)
def nf4_poly() -> tuple[float, ...]:
    """Monomial coefficients (increasing degree) of the NF4 interpolant in ``u = (q + .5) / 8``."""
    u = (np.arange(-8, 8) + 0.5) / 8
    return tuple(
        float(c) for c in np.linalg.solve(np.vander(u, 16, increasing=True), np.asarray(NF4_TABLE, np.float64))
    )


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["w", "s_t", "o_t"], meta_fields=["n", "k", "decode", "block"]
)
@dataclasses.dataclass(frozen=True)
class W4Prepared:
    """4-bit weights in the kernel layout: ``w`` ``int4[Np, Kp]``, ``s_t`` ``f32[Kp/block, Np]``.

    ``decode`` (one of :data:`DECODES`) says how an int4 value maps to a weight; ``o_t`` (None,
    or like ``s_t``) is the per-block offset of zero-point formats: ``w = decode(q) * s + o``.
    """

    w: jax.Array
    s_t: jax.Array
    n: int
    k: int
    decode: str = "int"
    block: int = GROUP
    o_t: jax.Array | None = None


def prepare_w4a16(w_packed: jax.Array, w_scale: jax.Array, k: int, group_size: int = GROUP) -> W4Prepared:
    """Views packed int4 weights as ``int4[N, K]`` and transposes the group scales.

    ``k`` is the true reduction size (``x.shape[1]``); ``group_size`` 128, or another of
    :data:`TABLE_BLOCKS` (those take the kernel's decode-and-scale path). N and K are padded
    to multiples of 128 (padded rows and K blocks get zero scales and add nothing).
    """
    n = w_packed.shape[0]
    if group_size not in TABLE_BLOCKS:
        raise ValueError(f"prepare_w4a16: group_size must be one of {TABLE_BLOCKS}, got {group_size}")
    if w_packed.shape[1] != _common.cdiv(k, 2):
        raise ValueError(f"prepare_w4a16: w_packed must be [N, ceil(K/2)] for K={k}, got {w_packed.shape}")
    if w_scale.shape != (n, _common.cdiv(k, group_size)):
        raise ValueError(
            f"prepare_w4a16: w_scale must be [N, ceil(K/{group_size})] = "
            f"{(n, _common.cdiv(k, group_size))}, got {w_scale.shape}"
        )
    np_ = _common.round_up(n, 2 * WT)
    kp = _common.round_up(k, GROUP)
    packed = _common.pad_axis(_common.pad_axis(w_packed, 1, kp // 2), 0, np_)
    w4 = lax.bitcast_convert_type(packed, jnp.int4).reshape(np_, kp)
    s_t = _common.pad_axis(_common.pad_axis(w_scale.astype(jnp.float32), 0, np_), 1, kp // group_size).T
    return W4Prepared(w=w4, s_t=s_t, n=n, k=k, block=group_size)
