"""GGUF block quantization: Q8_0 and the k-quants Q4_K, Q5_K, Q6_K in ggml's byte layout.

Encoders are vectorized numpy and follow ggml's reference quantizers (the weighted
scale/min search of ``make_qkx2_quants`` for Q4_K/Q5_K, the signed-scale search of
``make_qx_quants`` for Q6_K, absmax for Q8_0); they quantize along the LAST axis:
``f32[..., n] -> u8[..., n // block_elems, block_bytes]``. Decoders are jittable JAX:
``u8[..., nb, block_bytes] -> f32[..., nb * block_elems]`` and give exactly the values
ggml's ``dequantize_row_*`` (and ``gguf.quants.dequantize``) give for the same bytes:
every product in them is exact in float32, so only the final subtraction rounds.

Block layouts (little endian, ``QK_K = 256``):

* Q8_0, 34 B / 32 values: f16 d | int8 q[32]; x = d * q.
* Q4_K, 144 B / 256 values: f16 d | f16 dmin | 12 B of eight 6-bit (scale, min) pairs |
  128 B of nibbles; sub-block j (32 values) is x = d * sc_j * q - dmin * m_j, q in 0..15.
* Q5_K, 176 B: as Q4_K, plus 32 B of fifth bits between scales and nibbles; q in 0..31.
* Q6_K, 210 B: 128 B low nibbles | 64 B high 2-bit pairs | int8 scales[16] | f16 d;
  sub-block j (16 values) is x = d * sc_j * (q - 32), q in 0..63.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

QK_K = 256
_GROUP_MAX_EPS = 1e-15
_CHUNK_BLOCKS = 512  # super-blocks encoded at once: ~12 MB of search scratch, cache-friendly


@dataclasses.dataclass(frozen=True)
class BlockCodec:
    """One GGUF block type: its layout sizes and its encoder/decoder pair."""

    name: str  # 'q4_k'
    block_elems: int  # values per block: 256 (32 for q8_0)
    block_bytes: int  # bytes per block: 144 for q4_k
    bits_per_weight: float
    encode: Callable[[np.ndarray], np.ndarray]  # f32[..., n] -> u8[..., n//block_elems, block_bytes]
    decode: Callable[[jax.Array], jax.Array]  # u8[..., nb, block_bytes] -> f32[..., nb*block_elems]
    ggml_type: int  # GGMLQuantizationType value in GGUF files


# ----------------------------------------------------------------------------- encode helpers


def _as_blocks(x: np.ndarray, block_elems: int, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """Validate ``x`` and view it as rows of ``block_elems``; returns (rows, leading shape)."""
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"{name}: expected an array with at least one axis, got a scalar")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    n = x.shape[-1]
    if n == 0 or n % block_elems:
        raise ValueError(
            f"{name}: last axis has {n} values, which is not a positive multiple of the "
            f"block size {block_elems}"
        )
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: input contains NaN or infinite values")
    return x.reshape(-1, block_elems), x.shape[:-1] + (n // block_elems,)


def _encode_chunked(rows: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], nbytes: int, chunk: int) -> np.ndarray:
    out = np.empty((rows.shape[0], nbytes), np.uint8)
    for s in range(0, rows.shape[0], chunk):
        out[s : s + chunk] = fn(rows[s : s + chunk])
    return out


def _to_f16(v: np.ndarray, name: str) -> np.ndarray:
    """Round to float16 (ties to even, as ggml) and fail loudly on overflow."""
    with np.errstate(over="ignore"):
        h = v.astype(np.float16)
    if not np.isfinite(h).all():
        raise ValueError(f"{name}: a block scale overflows float16 (|x| too large for GGUF)")
    return h


def _f16_bytes(h: np.ndarray) -> np.ndarray:
    return h.astype("<f2").view(np.uint8).reshape(h.shape + (2,))


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1), 0).astype(np.float32)


def _search_scale_min(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qkx2_quants`` over rows of ``x`` (S, n): x ~ scale * l - min, l in 0..nmax.

    Candidate 0 is the plain min/max grid; candidates 1..nstep+1 stretch it by
    ``rmin + rdelta * i`` steps and refit scale and min by weighted least squares. The
    weighted error of every candidate comes in closed form from the same five sums, and
    the first candidate strictly better than the plain grid with the lowest error wins,
    as in ggml's sequential loop. Returns (scale, min), min >= 0 being the offset
    subtracted on decode.
    """
    f32 = np.float32
    mn = np.minimum(x.min(-1), 0).astype(f32)
    rng = x.max(-1) - mn
    steps = np.concatenate([[nmax], rmin + rdelta * np.arange(nstep + 1) + nmax]).astype(f32)
    iscale = _safe_div(steps[None, :], rng[:, None])  # (S, C)
    lc = iscale[:, :, None] * (x - mn[:, None])[:, None, :]  # (S, C, n)
    np.rint(lc, out=lc)
    np.clip(lc, 0, nmax, out=lc)
    wx = w * x
    sum_l = np.einsum("scn,sn->sc", lc, w)
    sum_xl = np.einsum("scn,sn->sc", lc, wx)
    lc *= lc
    sum_l2 = np.einsum("scn,sn->sc", lc, w)
    sum_w, sum_x, sum_x2 = w.sum(-1)[:, None], wx.sum(-1)[:, None], (wx * x).sum(-1)[:, None]
    det = sum_w * sum_l2 - sum_l * sum_l
    scale = _safe_div(sum_w * sum_xl - sum_x * sum_l, det)
    offset = _safe_div(sum_l2 * sum_x - sum_l * sum_xl, det)
    clamp = offset > 0  # ggml keeps the offset non-positive (min <= 0) and refits the scale
    scale = np.where(clamp, _safe_div(sum_xl, sum_l2), scale)
    offset = np.where(clamp, 0, offset).astype(f32)
    scale[:, 0], offset[:, 0] = _safe_div(np.ones_like(rng), iscale[:, 0]), mn
    err = (scale * scale * sum_l2 + 2 * scale * offset * sum_l - 2 * scale * sum_xl
           + offset * offset * sum_w - 2 * offset * sum_x + sum_x2)
    valid = det > 0
    valid[:, 0] = True
    err = np.where(valid, err, np.inf)
    best = err[:, 1:].argmin(-1) + 1
    better = np.take_along_axis(err, best[:, None], -1)[:, 0] < err[:, 0]
    best = np.where(better, best, 0)[:, None]
    scale = np.take_along_axis(scale, best, -1)[:, 0]
    offset = np.take_along_axis(offset, best, -1)[:, 0]
    flat = rng == 0
    return np.where(flat, 0, scale).astype(f32), np.where(flat, -mn, -offset).astype(f32)


def _signed_scale(x: np.ndarray, nmax: int) -> np.ndarray:
    """ggml's ``make_qx_quants`` (rmse_type 1, weights x^2) over rows of ``x`` (S, n).

    x ~ scale * l with l in -nmax..nmax-1; the grid is anchored on the signed
    largest-magnitude value, stretched by 0.1 * i for i in -9..9, and the grid with the
    largest sum(w*x*l)^2 / sum(w*l^2) (the least weighted error) wins, ties to the
    earliest grid as in ggml's sequential loop.
    """
    f32 = np.float32
    idx = np.abs(x).argmax(-1)
    top = np.take_along_axis(x, idx[:, None], -1)[:, 0]
    steps = np.array([0, *range(-9, 0), *range(1, 10)], f32)
    iscale = _safe_div(-(nmax + f32(0.1) * steps)[None, :], top[:, None])  # (S, 19)
    lc = iscale[:, :, None] * x[:, None, :]
    np.rint(lc, out=lc)
    np.clip(lc, -nmax, nmax - 1, out=lc)
    w = x * x
    sumlx = np.einsum("scn,sn->sc", lc, w * x)
    lc *= lc
    suml2 = np.einsum("scn,sn->sc", lc, w)
    metric = np.where(suml2 > 0, _safe_div(sumlx * sumlx, suml2), -np.inf)
    metric[:, 0] = np.maximum(metric[:, 0], 0)
    best = metric.argmax(-1)[:, None]
    scale = _safe_div(np.take_along_axis(sumlx, best, -1), np.take_along_axis(suml2, best, -1))[:, 0]
    return np.where(np.abs(top) < _GROUP_MAX_EPS, 0, scale).astype(f32)


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Pack eight 6-bit scales and mins (B, 8) into ggml's 12-byte K_SCALE layout."""
    out = np.empty(ls.shape[:-1] + (12,), np.uint8)
    lo_s, hi_s = ls[:, :4], ls[:, 4:]
    lo_m, hi_m = lm[:, :4], lm[:, 4:]
    out[:, 0:4] = lo_s | ((hi_s >> 4) << 6)
    out[:, 4:8] = lo_m | ((hi_m >> 4) << 6)
    out[:, 8:12] = (hi_s & 0xF) | ((hi_m & 0xF) << 4)
    return out


def _kquant_affine(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, name: str):
    """Shared Q4_K/Q5_K super-block fit: returns (d_f16, dmin_f16, ls, lm, L) for blocks (B, 256)."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    av = np.sqrt((sub * sub).sum(-1) / 32)
    w = av[:, None] + np.abs(sub)
    scales, mins = _search_scale_min(sub, w, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(-1), 0)
    max_min = np.maximum(mins.max(-1), 0)
    inv_s = _safe_div(np.full_like(max_scale, 63), max_scale)
    inv_m = _safe_div(np.full_like(max_min, 63), max_min)
    ls = np.clip(np.rint(inv_s[:, None] * scales), 0, 63).astype(np.uint8)
    lm = np.clip(np.rint(inv_m[:, None] * mins), 0, 63).astype(np.uint8)
    d = _to_f16(max_scale / np.float32(63), name)
    dmin = _to_f16(max_min / np.float32(63), name)
    xb = x.reshape(nb, 8, 32)
    dq = (d.astype(np.float32)[:, None] * ls).reshape(nb, 8, 1)
    mq = (dmin.astype(np.float32)[:, None] * lm).reshape(nb, 8, 1)
    # Where the f16 scale underflows a sub-block decodes to the constant -mq; drop that
    # offset when plain zeros are closer (ggml keeps it, which can be worse than nothing).
    drop = (dq == 0) & (((xb + mq) ** 2).sum(-1, keepdims=True) > (xb * xb).sum(-1, keepdims=True))
    lm = np.where(drop[..., 0], 0, lm).astype(np.uint8)
    mq = np.where(drop, 0, mq)
    q = np.clip(np.rint(_safe_div(xb + mq, np.broadcast_to(dq, (nb, 8, 32)))), 0, nmax)
    return d, dmin, ls, lm, q.astype(np.uint8)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(B, 8, 32) values 0..15 -> (B, 128): byte 32c+l holds sub-blocks 2c (low) and 2c+1 (high)."""
    q = q.reshape(q.shape[0], 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], 128)


# ----------------------------------------------------------------------------- encoders


def _q8_0_blocks(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(-1) / np.float32(127)
    inv = _safe_div(np.ones_like(d), d)
    v = x * inv[:, None]
    q = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8)  # roundf: half away from 0
    return np.concatenate([_f16_bytes(_to_f16(d, "encode_q8_0")), q.view(np.uint8)], -1)


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    d, dmin, ls, lm, q = _kquant_affine(x, 15, -1.0, 0.1, 20, "encode_q4_k")
    return np.concatenate(
        [_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min_k4(ls, lm), _pack_nibbles(q)], -1
    )


def _q5_k_blocks(x: np.ndarray) -> np.ndarray:
    d, dmin, ls, lm, q = _kquant_affine(x, 31, -0.5, 0.1, 15, "encode_q5_k")
    high = (q >> 4).astype(np.uint8)  # (B, 8, 32): fifth bit of sub-block k goes to bit k
    qh = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)
    return np.concatenate(
        [_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min_k4(ls, lm), qh, _pack_nibbles(q & 0xF)], -1
    )


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    scales = _signed_scale(x.reshape(nb * 16, 16), 32).reshape(nb, 16)
    idx = np.abs(scales).argmax(-1)[:, None]
    max_scale = np.take_along_axis(scales, idx, -1)[:, 0]
    zero = np.abs(max_scale) < _GROUP_MAX_EPS
    iscale = _safe_div(np.full_like(max_scale, -128), np.where(zero, 1, max_scale))
    d = _to_f16(np.where(zero, 0, _safe_div(np.ones_like(iscale), iscale)), "encode_q6_k")
    sc = np.minimum(127, np.rint(iscale[:, None] * scales)).astype(np.int8)
    sc[zero] = 0
    dq = np.broadcast_to((d.astype(np.float32)[:, None] * sc)[:, :, None], (nb, 16, 16))
    q = np.clip(np.rint(_safe_div(x.reshape(nb, 16, 16), dq)), -32, 31) + 32
    q = np.where(dq != 0, q, 32).astype(np.uint8).reshape(nb, 2, 4, 32)  # half, quarter, lane
    low = np.concatenate([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                          (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], -1)
    hi = q >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    blocks = np.concatenate(
        [low.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), _f16_bytes(d)], -1
    )
    blocks[zero] = 0
    return blocks


def _make_encoder(fn: Callable[[np.ndarray], np.ndarray], block_elems: int, block_bytes: int, name: str, chunk: int):
    def encode(x: np.ndarray) -> np.ndarray:
        rows, shape = _as_blocks(x, block_elems, name)
        return _encode_chunked(rows, fn, block_bytes, chunk).reshape(shape + (block_bytes,))

    encode.__name__ = name
    encode.__doc__ = (
        f"Quantize f32[..., n] along the last axis into u8[..., n // {block_elems}, {block_bytes}] "
        "GGUF blocks (ggml layout)."
    )
    return encode


encode_q8_0 = _make_encoder(_q8_0_blocks, 32, 34, "encode_q8_0", 1 << 17)  # no search scratch
encode_q4_k = _make_encoder(_q4_k_blocks, QK_K, 144, "encode_q4_k", _CHUNK_BLOCKS)
encode_q5_k = _make_encoder(_q5_k_blocks, QK_K, 176, "encode_q5_k", _CHUNK_BLOCKS)
encode_q6_k = _make_encoder(_q6_k_blocks, QK_K, 210, "encode_q6_k", _CHUNK_BLOCKS)


# ----------------------------------------------------------------------------- decoders


def _f16_at(b: jax.Array, i: int) -> jax.Array:
    """Little-endian float16 at byte ``i`` of each block, as float32 with a trailing axis."""
    u = b[..., i].astype(jnp.uint16) | (b[..., i + 1].astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(u, jnp.float16).astype(jnp.float32)[..., None]


def _check_blocks(blocks: jax.Array, block_bytes: int, name: str) -> jax.Array:
    blocks = jnp.asarray(blocks)
    if blocks.dtype != jnp.uint8 or blocks.ndim < 2 or blocks.shape[-1] != block_bytes:
        raise ValueError(
            f"{name}: expected uint8 blocks of shape (..., nb, {block_bytes}), "
            f"got {blocks.dtype}{tuple(blocks.shape)}"
        )
    return blocks


def _flatten_blocks(v: jax.Array, blocks: jax.Array) -> jax.Array:
    return v.reshape(blocks.shape[:-2] + (-1,))


def _scale_min_k4(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unpack the 12-byte K_SCALE field into eight 6-bit scales and mins (float32)."""
    s0, s1, s2 = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = jnp.concatenate([s0 & 63, (s2 & 0xF) | ((s0 >> 6) << 4)], -1)
    mn = jnp.concatenate([s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)], -1)
    return sc.astype(jnp.float32), mn.astype(jnp.float32)


def _sub_block_affine(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Q4_K/Q5_K per-sub-block scale d*sc_j and offset dmin*m_j, shaped (..., 8, 1)."""
    sc, mn = _scale_min_k4(blocks[..., 4:16])
    return (_f16_at(blocks, 0) * sc)[..., None], (_f16_at(blocks, 2) * mn)[..., None]


def _nibbles(qs: jax.Array) -> jax.Array:
    """(..., 128) bytes -> (..., 8, 32) values 0..15 in element order."""
    qs = qs.reshape(qs.shape[:-1] + (4, 1, 32))
    return jnp.concatenate([qs & 0xF, qs >> 4], -2).reshape(qs.shape[:-3] + (8, 32))


@jax.jit
def decode_q8_0(blocks: jax.Array) -> jax.Array:
    """u8[..., nb, 34] Q8_0 blocks -> f32[..., nb * 32]."""
    blocks = _check_blocks(blocks, 34, "decode_q8_0")
    q = jax.lax.bitcast_convert_type(blocks[..., 2:], jnp.int8).astype(jnp.float32)
    return _flatten_blocks(q * _f16_at(blocks, 0), blocks)


@jax.jit
def decode_q4_k(blocks: jax.Array) -> jax.Array:
    """u8[..., nb, 144] Q4_K blocks -> f32[..., nb * 256]."""
    blocks = _check_blocks(blocks, 144, "decode_q4_k")
    d, m = _sub_block_affine(blocks)
    q = _nibbles(blocks[..., 16:144]).astype(jnp.float32)
    return _flatten_blocks(d * q - m, blocks)


@jax.jit
def decode_q5_k(blocks: jax.Array) -> jax.Array:
    """u8[..., nb, 176] Q5_K blocks -> f32[..., nb * 256]."""
    blocks = _check_blocks(blocks, 176, "decode_q5_k")
    d, m = _sub_block_affine(blocks)
    qh = blocks[..., None, 16:48] >> jnp.arange(8, dtype=jnp.uint8)[:, None]  # (..., 8, 32)
    q = (_nibbles(blocks[..., 48:176]) | ((qh & 1) << 4)).astype(jnp.float32)
    return _flatten_blocks(d * q - m, blocks)


@jax.jit
def decode_q6_k(blocks: jax.Array) -> jax.Array:
    """u8[..., nb, 210] Q6_K blocks -> f32[..., nb * 256]."""
    blocks = _check_blocks(blocks, 210, "decode_q6_k")
    lead = blocks.shape[:-1]
    ql = blocks[..., 0:128].reshape(lead + (2, 2, 32))  # half, (first|second 32 bytes), lane
    low = jnp.stack([ql[..., 0, :] & 0xF, ql[..., 1, :] & 0xF, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], -2)
    qh = blocks[..., 128:192].reshape(lead + (2, 1, 32))
    high = (qh >> (2 * jnp.arange(4, dtype=jnp.uint8))[:, None]) & 3  # (..., 2, 4, 32)
    q = ((low | (high << 4)).astype(jnp.float32) - 32).reshape(lead + (16, 16))
    sc = jax.lax.bitcast_convert_type(blocks[..., 192:208], jnp.int8).astype(jnp.float32)
    d = (_f16_at(blocks, 208) * sc)[..., None]
    return _flatten_blocks(d * q, blocks)


CODECS: dict[str, BlockCodec] = {
    "q8_0": BlockCodec("q8_0", 32, 34, 8.5, encode_q8_0, decode_q8_0, 8),
    "q4_k": BlockCodec("q4_k", QK_K, 144, 4.5, encode_q4_k, decode_q4_k, 12),
    "q5_k": BlockCodec("q5_k", QK_K, 176, 5.5, encode_q5_k, decode_q5_k, 13),
    "q6_k": BlockCodec("q6_k", QK_K, 210, 6.5625, encode_q6_k, decode_q6_k, 14),
}


def get_codec(name: str) -> BlockCodec:
    """Look up a codec by name ('q4_k', 'Q4_K', ...); a clear error lists the known ones."""
    codec = CODECS.get(name.lower())
    if codec is None:
        raise ValueError(f"unknown GGUF block codec {name!r}; known: {sorted(CODECS)}")
    return codec


# ----------------------------------------------------------------------------- mixes

# Uniform type of each mix; the _M mixes raise chosen tensors above it (see kquant_mix).
MIX_BASE: dict[str, str] = {"Q4_K_M": "q4_k", "Q5_K_M": "q5_k", "Q6_K": "q6_k", "Q8_0": "q8_0"}
# One step up for the _M mixes (fused qkv, modulation); Q6_K for the protected layers.
_MIX_STEP_UP = {"Q4_K_M": "q5_k", "Q5_K_M": "q6_k"}
MIN_QUANT_SIZE = 4096  # tensors with fewer values stay in float (the bytes saved are noise)

_V_PROJ = re.compile(r"(^|[./_])(to_v|add_v_proj|v_proj|v)([./_]|$)")
_FUSED_QKV = re.compile(r"(^|[./_])(qkv|to_qkv|qkv_proj|in_proj)([./_]|$)")
_STACK = re.compile(r"^((?:.*?[./])?[A-Za-z_]*(?:blocks|layers))[._](\d+)(?=[./]|$)")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layer pick for the _M mixes: the first and last eighth, and every third
    layer in between, get the higher type."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def block_index(path: str) -> tuple[str, int] | None:
    """(stack, index) of the transformer block a param path belongs to, or None.

    Works on diffusers names (``transformer_blocks.3.attn.to_v.weight``) and Flax paths
    (``single_transformer_blocks_3/attn/to_v/kernel``): the stack is the first path part
    ending in ``blocks`` or ``layers`` followed by an index.
    """
    m = _STACK.match(path)
    return (m.group(1), int(m.group(2))) if m else None


def kquant_mix(
    name: str,
    path: str,
    shape: Sequence[int],
    roles: Sequence[str],
    *,
    layer: tuple[int, int] | None = None,
    axis: int = -1,
) -> str | None:
    """Codec name for one tensor under a GGUF mix, or None to keep it in float.

    Args:
      name: the mix, one of :data:`MIX_BASE` ('Q4_K_M', 'Q5_K_M', 'Q6_K', 'Q8_0').
      path: param path or diffusers tensor name (used to tell V projections and fused qkv).
      shape: tensor shape; ``axis`` is its contraction (ggml row) axis, the last one in
        torch (out, in) layout.
      roles: layer-role labels (models.roles vocabulary); empty for non-kernel params.
      layer: (index, count) of the block within its stack, for llama.cpp's layer pick;
        None for tensors outside the block stacks (these count as protected).

    Rules (docs/gguf.md has the table and reasons): float for rank < 2, fewer than
    ``MIN_QUANT_SIZE`` values, unlabelled params, embedders and the output head, except a
    shared modulation producer (roles embedder + modulation), which gets Q8_0; in the _M
    mixes attention V and FFN down projections get Q6_K on ``use_more_bits`` layers, fused
    qkv and per-block adaLN modulation go one type up; everything else gets the mix's base
    type. A contraction axis that is not a multiple of 256 falls back to Q8_0 (32), else
    float.
    """
    if name not in MIX_BASE:
        raise ValueError(f"unknown GGUF mix {name!r}; known: {sorted(MIX_BASE)}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or math.prod(shape) < MIN_QUANT_SIZE or not roles:
        return None
    roles = set(roles)
    if roles >= {"embedder", "modulation"}:  # shared adaLN producer (Wan time_proj): feeds every block
        codec = "q8_0"
    elif roles & {"embedder", "final"}:
        return None
    else:
        codec = MIX_BASE[name]
    if name in _MIX_STEP_UP and codec != "q8_0":
        protected = layer is None or use_more_bits(*layer)
        is_v = bool(roles & {"attn.qkv", "cross_attn.kv"}) and bool(_V_PROJ.search(path))
        if (is_v or "ffn.down" in roles) and protected:
            codec = "q6_k"
        elif "modulation" in roles or ("attn.qkv" in roles and _FUSED_QKV.search(path)):
            codec = _MIX_STEP_UP[name]
    n = shape[axis]
    if n % CODECS[codec].block_elems:
        codec = "q8_0" if n % CODECS["q8_0"].block_elems == 0 else None
    return codec


def plan_kquant_mix(
    name: str,
    shapes: Mapping[str, Sequence[int]],
    roles: Mapping[str, Sequence[str]],
    *,
    axis: int = -1,
) -> dict[str, str | None]:
    """:func:`kquant_mix` for every tensor of a model, with layer indices from the paths.

    ``shapes`` maps every param path to its shape; ``roles`` maps (some of) them to role
    labels; the block count of each stack is the largest index seen plus one.
    """
    counts: dict[str, int] = {}
    where = {p: block_index(p) for p in shapes}
    for loc in where.values():
        if loc is not None:
            counts[loc[0]] = max(counts.get(loc[0], 0), loc[1] + 1)
    return {
        p: kquant_mix(
            name, p, s, roles.get(p, ()),
            layer=None if where[p] is None else (where[p][1], counts[where[p][0]]),
            axis=axis,
        )
        for p, s in shapes.items()
    }


# Role guesses from common diffusers tensor names, for models without a Flax port.
_NAME_ROLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"^(patch_embed\w*|pos_embed|x_embedder|t_embedder|y_embedder|time_embed\w*|condition_embedder|"
     r"context_embedder|time_text_embed|caption_projection|adaln_single|img_in|txt_in|time_in|vector_in|"
     r"guidance_in|proj_in|patch_embedding)\.", ("embedder",)),
    (r"^(proj_out|norm_out|final_layer|proj_out_\w+)\.", ("final",)),
    (r"(norm\w*\.linear|adaLN_modulation\.\d+|\w*_mod\.lin|\.modulation\.lin\w*)\.weight$", ("modulation",)),
    (r"(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|q_proj|k_proj|v_proj|qkv|to_qkv)\.weight$", ("attn.qkv",)),
    (r"(to_out\.0|to_add_out|out_proj|o_proj|attn\.proj)\.weight$", ("attn.out",)),
    (r"(ff|ffn|ff_context|mlp)\.(net\.0(\.proj)?|fc1|linear_1|w1|w3)\.weight$|proj_mlp\.weight$", ("ffn.up",)),
    (r"(ff|ffn|ff_context|mlp)\.(net\.2|fc2|linear_2|w2)\.weight$", ("ffn.down",)),
    (r"(attn2|cross_attn)\.", ("cross_attn",)),
)


def roles_from_name(name: str) -> tuple[str, ...]:
    """Best-effort layer roles of a diffusers tensor name (for models without a port).

    Unrecognised 2-D ``.weight`` tensors get no role and are left in float by the mixes,
    so a guess never quantizes something it does not understand.
    """
    out: list[str] = []
    for pattern, rs in _NAME_ROLES:
        if re.search(pattern, name):
            out += [r for r in rs if r not in out]
    if out == ["cross_attn"]:
        return ()
    return tuple(out)
