"""NF4 and FP4 (e2m1: plain, MXFP4, NVFP4) weight-only GEMMs: 4-bit codebook weights x bf16;
and uint4 with zero points, which takes the same decode-and-scale kernel path.

Layout (jquant's QArray storage, transposed to K-major)
-------------------------------------------------------
* ``w_packed``: ``uint8[N, ceil(K/2)]`` table indices (``jquant.formats.NF4_TABLE`` /
  ``FP4_TABLE``), two per byte along K, low nibble first.
* ``w_scale``: ``f32[N, K/block]`` decoded block scales (MXFP4: ``2^e`` from e8m0, block 32;
  NVFP4: the e4m3 scale as a float, block 16; NF4: absmax, block 64 by default).
* ``tensor_scale``: NVFP4's fp32 per-tensor scale (None otherwise).

``y = (x @ (table[code] * scale)^T) * tensor_scale + bias``.

Kernel path (Hopper, small M): :func:`prepare_w4_table` rewrites the codes once, at load
time, as signed int4 values whose decode is a few register ops
(:func:`_weights.decode_codes`), and the weight-only kernel multiplies each decoded K
block by its scale in bf16 (exact for e8m0 and e4m3 scales) before the wgmma. Large M: the
weights are decoded to bf16 once per call and XLA's bf16 GEMM runs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import FP4_TABLE, NF4_TABLE
from pallas_kernels import _common, _weights, weight_only

TABLES = {"nf4": NF4_TABLE, "fp4": FP4_TABLE}


def _signed_value(code: int, fmt: str) -> int:
    """The int4 value the kernel decodes for table index ``code``."""
    if fmt == "nf4":
        return code - 8
    mag = code & 7
    return -mag if code & 8 else mag


@functools.lru_cache(maxsize=None)
def _byte_lut(fmt: str) -> np.ndarray:
    """Maps a packed byte of two table indices to a byte of two int4 kernel values."""
    nib = np.array([_signed_value(c, fmt) & 0xF for c in range(16)], np.uint8)
    b = np.arange(256)
    return (nib[b & 0xF] | (nib[b >> 4] << 4)).astype(np.uint8)


def _check(x, w_packed, w_scale, fmt, block, name="w4_table_matmul"):
    if fmt not in TABLES:
        raise ValueError(f"{name}: fmt must be one of {sorted(TABLES)}, got {fmt!r}")
    _check_packed(x, w_packed, w_scale, block, name)


def _check_packed(x, w_packed, w_scale, block, name):
    """Shapes and dtypes of packed 4-bit weights with ``[N, K/block]`` scales."""
    _common.check_rank(f"{name}: x", x, 2)
    _common.check_rank(f"{name}: w_packed", w_packed, 2)
    _common.check_dtype(f"{name}: w_packed", w_packed, (jnp.uint8,))
    k = x.shape[1]
    if w_packed.shape[1] != _common.cdiv(k, 2):
        raise ValueError(
            f"{name}: w_packed must be [N, ceil(K/2)] = [N, {_common.cdiv(k, 2)}] for x with"
            f" K={k}, got {w_packed.shape}"
        )
    if block <= 0 or k % block:
        raise ValueError(f"{name}: block {block} must divide K={k}")
    if w_scale.shape != (w_packed.shape[0], k // block):
        raise ValueError(
            f"{name}: w_scale must be [N, K/{block}] = {(w_packed.shape[0], k // block)}, got {w_scale.shape}"
        )


def dequantize(
    w_packed: jax.Array, w_scale: jax.Array, k: int, *, fmt: str, block: int, dtype=jnp.float32
) -> jax.Array:
    """``table[code] * scale`` as ``dtype[N, K]`` (table lookup, product in float32)."""
    codes = _weights.unpack_int4(w_packed, k).astype(jnp.int32) & 0xF
    w = jnp.asarray(np.asarray(TABLES[fmt], np.float32))[codes]
    return (w * jnp.repeat(w_scale.astype(jnp.float32), block, axis=1)).astype(dtype)


def _finish(y, tensor_scale, bias, out_dtype):
    if tensor_scale is not None:
        y = y * jnp.asarray(tensor_scale, jnp.float32).reshape(())
    return _weights.finish(y, bias, out_dtype)  # pylint: disable=protected-access


def w4_table_matmul_reference(
    x: jax.Array,
    w_packed: jax.Array,
    w_scale: jax.Array,
    tensor_scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    *,
    fmt: str,
    block: int,
) -> jax.Array:
    """Plain-JAX reference: table lookup, f32 dot at highest precision, scales, bias."""
    _check(x, w_packed, w_scale, fmt, block)
    w = dequantize(w_packed, w_scale, x.shape[1], fmt=fmt, block=block)
    return _finish(_weights.dot_nt_f32(x, w), tensor_scale, bias, out_dtype)


def prepare_w4_table(w_packed: jax.Array, w_scale: jax.Array, k: int, *, fmt: str, block: int) -> _weights.W4Prepared:
    """Codes -> int4 kernel values (one byte-table pass), scales transposed, N and K padded.

    Padded weights are int4 zeros (NF4 decodes them to ``NF4_TABLE[8]``, not 0); they add
    nothing because padded rows get zero scales and the kernel zero-pads x along K.
    """
    _check(jnp.zeros((1, k), jnp.bfloat16), w_packed, w_scale, fmt, block, "prepare_w4_table")
    values = jnp.asarray(_byte_lut(fmt))[w_packed]
    prepared = _weights.prepare_w4a16(values, w_scale, k, block)
    return dataclasses.replace(prepared, decode=fmt)


def w4_table_matmul_prepared(
    x: jax.Array,
    prepared: _weights.W4Prepared,
    tensor_scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
    """The per-step call on weights from :func:`prepare_w4_table`."""
    y = weight_only.w4a16_matmul_prepared(x, prepared, None, jnp.float32)
    return _finish(y, tensor_scale, bias, out_dtype)


def supports(x: jax.Array, block: int, fmt: str) -> bool:
    """True where the small-M kernel runs for this format and block."""
    return weight_only.supports(x, block, fmt)


def w4_table_matmul(
    x: jax.Array,
    w_packed: jax.Array,
    w_scale: jax.Array,
    tensor_scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    *,
    fmt: str,
    block: int,
) -> jax.Array:
    """NF4 / FP4 weight-only GEMM ``bf16[M,K] x codes[N,K]^T -> [M,N]``.

    Small M on Hopper: the Mosaic GPU kernel. Large M on a GPU: decode to bf16 and XLA's
    bf16 GEMM. Off GPU: :func:`w4_table_matmul_reference`.
    """
    _check(x, w_packed, w_scale, fmt, block)
    if not _common.on_hopper():
        return w4_table_matmul_reference(x, w_packed, w_scale, tensor_scale, bias, out_dtype, fmt=fmt, block=block)
    if not supports(x, block, fmt):
        w_bf16 = dequantize(w_packed, w_scale, x.shape[1], fmt=fmt, block=block, dtype=jnp.bfloat16)
        y = _weights.xla_bf16(x, w_bf16, None, jnp.float32)
        return _finish(y, tensor_scale, bias, out_dtype)
    prepared = prepare_w4_table(w_packed, w_scale, x.shape[1], fmt=fmt, block=block)
    return w4_table_matmul_prepared(x, prepared, tensor_scale, bias, out_dtype)


# --------------------------------------------------------------------------
# uint4 with zero points (AWQ-style asymmetric groups): the same decode-and-scale path.
# --------------------------------------------------------------------------


def _check_zp(x, w_packed, w_scale, w_zero, group_size):
    _check_packed(x, w_packed, w_scale, group_size, "uint4_matmul")
    if w_zero.shape != w_scale.shape:
        raise ValueError(f"uint4_matmul: w_zero must have w_scale's shape {w_scale.shape}, got {w_zero.shape}")


def uint4_matmul_reference(x, w_packed, w_scale, w_zero, bias=None, out_dtype=jnp.bfloat16, *, group_size: int):
    """Plain-JAX reference: ``w = (u - z) * s`` with unsigned codes ``u`` (low nibble first)."""
    _check_zp(x, w_packed, w_scale, w_zero, group_size)
    k = x.shape[1]
    u = _weights.unpack_int4(w_packed, k).astype(jnp.int32) & 0xF
    rep = lambda a: jnp.repeat(a.astype(jnp.float32), group_size, axis=1)
    w = (u.astype(jnp.float32) - rep(w_zero)) * rep(w_scale)
    return _finish(_weights.dot_nt_f32(x, w), None, bias, out_dtype)


def prepare_uint4(w_packed, w_scale, w_zero, k: int, group_size: int) -> _weights.W4Prepared:
    """Unsigned codes ``u`` -> int4 ``u - 8`` (flip each nibble's top bit) plus the per-group
    offset ``(8 - z) * s``, so that ``w = (u - 8) * s + (8 - z) * s = (u - z) * s``."""
    _check_zp(jnp.zeros((1, k), jnp.bfloat16), w_packed, w_scale, w_zero, group_size)
    prepared = _weights.prepare_w4a16(w_packed ^ jnp.uint8(0x88), w_scale, k, group_size)
    offset = (8.0 - w_zero.astype(jnp.float32)) * w_scale.astype(jnp.float32)
    o_t = _common.pad_axis(_common.pad_axis(offset, 0, prepared.s_t.shape[1]), 1, prepared.s_t.shape[0]).T
    return dataclasses.replace(prepared, o_t=o_t)


def uint4_matmul(x, w_packed, w_scale, w_zero, bias=None, out_dtype=jnp.bfloat16, *, group_size: int):
    """W4A16 with uint4 codes and per-group zero points: the kernel at small M on Hopper, else
    decode to bf16 + XLA's GEMM (the reference off the GPU)."""
    _check_zp(x, w_packed, w_scale, w_zero, group_size)
    if not _common.on_hopper():
        return uint4_matmul_reference(x, w_packed, w_scale, w_zero, bias, out_dtype, group_size=group_size)
    prepared = prepare_uint4(w_packed, w_scale, w_zero, x.shape[1], group_size)
    return weight_only.w4a16_matmul_prepared(x, prepared, bias, out_dtype)
