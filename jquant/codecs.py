"""GGUF block codecs in ggml's byte layout: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the
k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Encoders are vectorized numpy ports of ggml's reference quantizers (``quantize_row_*_ref``
in ``ggml-quants.c``, the path ``ggml_quantize_chunk`` takes without an importance matrix)
and give the same bytes: every float32 operation is done in the C code's order (sums are
sequential), rounding is ggml's (``nearest_int``'s magic-number
trick, ``roundf``, truncating casts), searches keep ggml's running state (e.g. the minimum
that ``make_qkx2_quants`` updates as candidates win), f16 conversion rounds to nearest even.
``tests/test_kquants_ggml.py`` checks the bytes against ggml's on stored fixtures. They
quantize along the LAST axis: ``f32[..., n] -> u8[..., n // block_elems, block_bytes]``.
Decoders are jittable JAX: ``u8[..., nb, block_bytes] -> f32[..., nb * block_elems]`` and
give exactly the values ggml's ``dequantize_row_*`` (and ``gguf.quants.dequantize``) give:
every product in them is exact in float32, so only a final add/subtract rounds.

Block layouts (little endian, ``QK_K = 256``; d, m, dmin are float16):

* Q4_0, 18 B / 32 values: d | 16 B nibbles (value j low, j+16 high); x = d * (q - 8).
* Q4_1, 20 B / 32: d | m | 16 B nibbles; x = d * q + m.
* Q5_0, 22 B / 32: d | u32 fifth bits (bit j: value j) | 16 B nibbles; x = d * (q - 16).
* Q5_1, 24 B / 32: d | m | u32 fifth bits | 16 B nibbles; x = d * q + m.
* Q8_0, 34 B / 32: d | int8 q[32]; x = d * q.
* Q2_K, 84 B / 256: 16 B (scale | min << 4) | 64 B 2-bit quants | d | dmin; sub-block j
  (16 values) is x = d * sc_j * q - dmin * m_j, q in 0..3.
* Q3_K, 110 B / 256: 32 B high bits | 64 B 2-bit quants | 12 B sixteen 6-bit scales | d;
  sub-block j (16 values) is x = d * (sc_j - 32) * (q - 4), q in 0..7.
* Q4_K, 144 B / 256: d | dmin | 12 B of eight 6-bit (scale, min) pairs | 128 B of nibbles;
  sub-block j (32 values) is x = d * sc_j * q - dmin * m_j, q in 0..15.
* Q5_K, 176 B: as Q4_K, plus 32 B of fifth bits between scales and nibbles; q in 0..31.
* Q6_K, 210 B: 128 B low nibbles | 64 B high 2-bit pairs | int8 scales[16] | d;
  sub-block j (16 values) is x = d * sc_j * (q - 32), q in 0..63.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import CODEC_FORMATS

QK_K = 256
_F32 = np.float32
_GROUP_MAX_EPS = _F32(1e-15)  # ggml's GROUP_MAX_EPS (1e-15f)
_CHUNK_BLOCKS = 2048  # super-blocks encoded at once: (32, 16384) f32 search arrays, ~2 MB each


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
            f"{name}: last axis has {n} values, which is not a positive multiple of the block size {block_elems}"
        )
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: input contains NaN or infinite values")
    return x.reshape(-1, block_elems), x.shape[:-1] + (n // block_elems,)


def _encode_chunked(rows: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], nbytes: int, chunk: int) -> np.ndarray:
    out = np.empty((rows.shape[0], nbytes), np.uint8)
    with np.errstate(all="ignore"):  # the C code divides by zero too, then masks the result
        for s in range(0, rows.shape[0], chunk):
            out[s : s + chunk] = fn(rows[s : s + chunk])
    return out


def _to_f16(v: np.ndarray, name: str) -> np.ndarray:
    """GGML_FP32_TO_FP16: round to nearest even (subnormals too); fail loudly on overflow."""
    h = np.asarray(v, _F32).astype(np.float16)
    if not np.isfinite(h).all():
        raise ValueError(f"{name}: a block scale overflows float16 (|x| too large for GGUF)")
    return h


def _f16_bytes(h: np.ndarray) -> np.ndarray:
    return h.astype("<f2").view(np.uint8).reshape(h.shape + (2,))


def _u32_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype("<u4").view(np.uint8).reshape(v.shape + (4,))


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: add 1.5 * 2^23 in float32 and read the low mantissa bits.

    Rounds half to even for |v| < 2^22; beyond that (and for inf/NaN) it returns the same
    garbage as the C code, which the callers then clamp, as ggml does.
    """
    b = (np.asarray(v, _F32) + _F32(12582912.0)).view(np.int32)
    return (b & 0x007FFFFF) - 0x00400000


_JUST_BELOW_HALF = np.nextafter(_F32(0.5), _F32(0))


def _roundf(v: np.ndarray) -> np.ndarray:
    """C ``roundf`` on float32: half away from zero. ``trunc(v +- (0.5 - 2^-25))`` is exact
    for every float32 (``floor(|v| + 0.5)`` is not: it rounds 0.49999997 up)."""
    return np.trunc(v + np.copysign(_JUST_BELOW_HALF, v))


def _seqsum(a: np.ndarray) -> np.ndarray:
    """``float s = 0; for (i...) s += a[i];`` over axis 0, in that order (numpy's own sums
    are pairwise); one vector add per row of a (n, S) array."""
    acc = a[0] + _F32(0)
    for row in a[1:]:
        acc += row
    return acc


def _take0(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """a[idx[s], s] for a (n, S) array."""
    return np.take_along_axis(a, idx[None, :], 0)[0]


def _absmax_signed(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max) over axis 0 as ggml's ``if (amax < fabsf(v))`` loops: the first value of
    largest magnitude with its sign, and +0 when all are zero."""
    ax = np.abs(x)
    idx = ax.argmax(0)
    amax = _take0(ax, idx)
    return amax, np.where(amax > 0, _take0(x, idx), _F32(0))


def _first_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) over axis 0 as ggml's ``if (v < min)`` loops: first occurrence, so the
    sign of a zero extreme is the C code's."""
    return _take0(x, x.argmin(0)), _take0(x, x.argmax(0))


def _blocks_t(x: np.ndarray, n: int) -> np.ndarray:
    """Rows (B, k*n) -> (n, B*k) contiguous: sub-blocks as columns, for sequential sums."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's ``make_qkx2_quants`` on the columns of ``x`` (n, S): x ~ scale * L - the_min.

    The plain min/max grid, then stretched grids ``(rmin + rdelta * is + nmax) / (max - min)``
    for is = 0..nstep, each refit by weighted least squares (the min kept <= 0); a candidate
    replaces the best when its weighted error is strictly lower, and, as in ggml, the
    winner's min becomes the offset of the later candidates' grids. Returns (scale, the_min,
    L) with L (n, S) in 0..nmax.
    """
    f = _F32
    mn = x.min(0)
    mn = np.where(mn > 0, f(0), mn)
    mx = x.max(0)
    flat = mx == mn
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)

    def error(scale, mn, L):
        diff = scale * L + mn - x
        diff = np.abs(diff) if use_mad else diff * diff
        return _seqsum(w * diff)

    def grid(iscale, mn):
        return np.clip(_nearest_int(iscale * (x - mn)), 0, nmax).astype(f)

    iscale = f(nmax) / (mx - mn)
    scale = f(1) / iscale
    best = error(scale, mn, grid(iscale, mn))
    grid_is, grid_mn = iscale, mn  # the winning grid, rebuilt at the end (cheaper than keeping L)
    for i in range(nstep + 1):
        iscale = (f(rmin) + f(rdelta) * f(i) + f(nmax)) / (mx - mn)
        la = grid(iscale, mn)
        wl = w * la
        sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * la), _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = np.where(pos, f(0), this_min)
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min, la)
        win = (D > 0) & (cur < best) & ~flat
        best = np.where(win, cur, best)
        scale = np.where(win, this_scale, scale)
        grid_is, grid_mn = np.where(win, iscale, grid_is), np.where(win, mn, grid_mn)
        mn = np.where(win, this_min, mn)
    L = np.where(flat, f(0), grid(grid_is, grid_mn))
    return np.where(flat, f(0), scale), -mn, L


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qx_quants`` with rmse_type 1 (weights x^2, no imatrix) on the columns of
    ``x`` (n, S): x ~ scale * (L - nmax).

    Grids ``-(nmax + 0.1 * is) / max`` anchored on the signed largest-magnitude value, for
    is = 0 then -9..9; a grid wins when sumlx^2 > best * suml2 against the running best.
    Returns (scale, L) with L (n, S) in 0..2*nmax-1 (all 0 in an all-zero column).
    """
    f = _F32
    amax, mx = _absmax_signed(x)
    w = x * x
    wx = w * x

    def grid(iscale):
        return np.clip(_nearest_int(iscale * x), -nmax, nmax - 1).astype(f)

    def sums(l):
        return _seqsum(wx * l), _seqsum(w * l * l)

    grid_is = f(-nmax) / mx
    sumlx, suml2 = sums(grid(grid_is))
    scale = np.where(suml2 != 0, sumlx / suml2, f(0))
    best = scale * sumlx
    for i in (*range(-9, 0), *range(1, 10)):
        iscale = -(f(nmax) + f(0.1) * f(i)) / mx
        slx, sl2 = sums(grid(iscale))
        win = (sl2 > 0) & (slx * slx > best * sl2)
        grid_is = np.where(win, iscale, grid_is)  # the winning grid, rebuilt at the end
        scale = np.where(win, slx / sl2, scale)
        best = np.where(win, scale * slx, best)
    zero = amax < _GROUP_MAX_EPS
    return np.where(zero, f(0), scale), np.where(zero, f(0), grid(grid_is) + f(nmax))


def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_q3_quants`` with do_rmse on the columns of ``x`` (n, S).

    The grid ``-nmax / max``, then up to five passes of per-value coordinate descent on
    sum(w x l)^2 / sum(w l^2) (w = x^2), value by value in order, as in the C loop (a pass
    that changes nothing leaves the state as is, so running all five is the same). Returns
    (scale, L) with L (n, S) in 0..2*nmax-1 (all 0 in an all-zero column).
    """
    f = _F32
    amax, mx = _absmax_signed(x)
    L = np.clip(_nearest_int((f(-nmax) / mx) * x), -nmax, nmax - 1).astype(f)
    w = x * x
    wx = w * x
    sumlx, suml2 = _seqsum(wx * L), _seqsum(w * L * L)
    for _ in range(5):
        for i in range(x.shape[0]):
            li, wi, wxi = L[i], w[i], wx[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new_l = np.clip(_nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1).astype(f)
            slx = slx + wxi * new_l
            sl2 = sl2 + wi * new_l * new_l
            take = ((sumlx - wxi * li) > 0) & (new_l != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = np.where(take, new_l, li)
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, f(0))
    zero = amax < _GROUP_MAX_EPS
    return np.where(zero, f(0), scale), np.where(zero, f(0), L + f(nmax))


def _requant(x: np.ndarray, L: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int) -> np.ndarray:
    """ggml's final pass: ``l = clamp(nearest_int((x + dm) / d), lo, hi)`` where d != 0
    (``dm`` None: ``x / d``); where d == 0 the search's L stays. Shapes (n, S), d/dm (S,)."""
    v = x if dm is None else x + dm
    q = np.clip(_nearest_int(v / d), lo, hi).astype(_F32)
    return np.where(d != 0, q, L)


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
    """``quantize_row_q{4,5}_K_ref`` up to packing, for blocks (B, 256): returns
    (d_f16, dmin_f16, ls, lm, L) with L (B, 8, 32) in 0..nmax."""
    f = _F32
    nb = x.shape[0]
    xs = _blocks_t(x, 32)  # (32, B*8)
    av_x = np.sqrt(_seqsum(xs * xs) / f(32))
    w = av_x + np.abs(xs)
    scales, mins, L = _make_qkx2_quants(xs, w, nmax, rmin, rdelta, nstep, False)
    max_scale = np.maximum(scales.reshape(nb, 8).max(-1), f(0))
    max_min = np.maximum(mins.reshape(nb, 8).max(-1), f(0))
    inv_s = np.where(max_scale > 0, f(63) / max_scale, f(0))
    inv_m = np.where(max_min > 0, f(63) / max_min, f(0))
    ls = np.minimum(_nearest_int(np.repeat(inv_s, 8) * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(np.repeat(inv_m, 8) * mins) & 0xFF, 63).astype(np.uint8)
    d = _to_f16(max_scale / f(63), name)
    dmin = _to_f16(max_min / f(63), name)
    dj = np.repeat(d.astype(f), 8) * ls
    mj = np.repeat(dmin.astype(f), 8) * lm
    L = _requant(xs, L, dj, mj, 0, nmax)
    return d, dmin, ls.reshape(nb, 8), lm.reshape(nb, 8), L.T.astype(np.uint8).reshape(nb, 8, 32)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(B, 8, 32) values 0..15 -> (B, 128): byte 32c+l holds sub-blocks 2c (low) and 2c+1 (high)."""
    q = q.reshape(q.shape[0], 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], 128)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """(B, 256) values 0..3 -> (B, 64): byte 32h+l holds values 128h+l+32k at bits 2k."""
    q = L.reshape(L.shape[0], 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(L.shape[0], 64)


# ----------------------------------------------------------------------------- encoders


def _q8_0_blocks(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(-1) / _F32(127)
    inv = np.where(d != 0, _F32(1) / d, _F32(0))
    q = _roundf(x * inv[:, None]).astype(np.int8)
    return np.concatenate([_f16_bytes(_to_f16(d, "encode_q8_0")), q.view(np.uint8)], -1)


def _qx_0_blocks(x: np.ndarray, bits: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0/Q5_0: d = max / -2^(bits-1) (signed largest magnitude), q = (int8)(x/d + 2^(bits-1) + 0.5)."""
    half = 1 << (bits - 1)
    _, mx = _absmax_signed(x.T)
    d = mx / _F32(-half)
    inv = np.where(d != 0, _F32(1) / d, _F32(0))
    q = np.minimum((x * inv[:, None] + _F32(half + 0.5)).astype(np.int32), 2 * half - 1)
    return _f16_bytes(_to_f16(d, name)), q.astype(np.uint8)


def _qx_1_blocks(x: np.ndarray, bits: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Q4_1/Q5_1: d = (max - min) / (2^bits - 1), m = min, q = (int)((x - min)/d + 0.5)."""
    mn, mx = _first_min_max(x.T)
    d = (mx - mn) / _F32((1 << bits) - 1)
    inv = np.where(d != 0, _F32(1) / d, _F32(0))
    q = ((x - mn[:, None]) * inv[:, None] + _F32(0.5)).astype(np.int32)
    if bits == 4:
        q = np.minimum(q, 15)
    head = np.concatenate([_f16_bytes(_to_f16(d, name)), _f16_bytes(_to_f16(mn, name))], -1)
    return head, q.astype(np.uint8)


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    """(B, 32) values 0..31 -> (B, 4) bytes of the u32 whose bit j is bit 4 of value j."""
    qh = (((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)
    return _u32_bytes(qh)


def _low_nibbles_32(q: np.ndarray) -> np.ndarray:
    """(B, 32) -> (B, 16): byte j holds value j (low) and j+16 (high)."""
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _q4_0_blocks(x: np.ndarray) -> np.ndarray:
    d, q = _qx_0_blocks(x, 4, "encode_q4_0")
    return np.concatenate([d, _low_nibbles_32(q)], -1)


def _q4_1_blocks(x: np.ndarray) -> np.ndarray:
    head, q = _qx_1_blocks(x, 4, "encode_q4_1")
    return np.concatenate([head, _low_nibbles_32(q)], -1)


def _q5_0_blocks(x: np.ndarray) -> np.ndarray:
    d, q = _qx_0_blocks(x, 5, "encode_q5_0")
    return np.concatenate([d, _fifth_bits(q), _low_nibbles_32(q)], -1)


def _q5_1_blocks(x: np.ndarray) -> np.ndarray:
    head, q = _qx_1_blocks(x, 5, "encode_q5_1")
    return np.concatenate([head, _fifth_bits(q), _low_nibbles_32(q)], -1)


def _q2_k_blocks(x: np.ndarray) -> np.ndarray:
    f = _F32
    nb = x.shape[0]
    xs = _blocks_t(x, 16)  # (16, B*16)
    scales, mins, L = _make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    max_scale = np.maximum(scales.reshape(nb, 16).max(-1), f(0))
    max_min = np.maximum(mins.reshape(nb, 16).max(-1), f(0))
    has_s, has_m = np.repeat(max_scale > 0, 16), np.repeat(max_min > 0, 16)
    ls = np.where(has_s, _nearest_int(np.repeat(f(15) / max_scale, 16) * scales), 0)
    lm = np.where(has_m, _nearest_int(np.repeat(f(15) / max_min, 16) * mins), 0)
    sc = ((ls & 0xFF) | ((lm << 4) & 0xFF)).astype(np.uint8)
    d = _to_f16(np.where(max_scale > 0, max_scale / f(15), f(0)), "encode_q2_k")
    dmin = _to_f16(np.where(max_min > 0, max_min / f(15), f(0)), "encode_q2_k")
    dj = np.repeat(d.astype(f), 16) * (sc & 0xF)
    mj = np.repeat(dmin.astype(f), 16) * (sc >> 4)
    L = _requant(xs, L, dj, mj, 0, 3).T.astype(np.uint8).reshape(nb, 256)
    return np.concatenate([sc.reshape(nb, 16), _pack_2bit(L), _f16_bytes(d), _f16_bytes(dmin)], -1)


def _q3_k_blocks(x: np.ndarray) -> np.ndarray:
    f = _F32
    nb = x.shape[0]
    xs = _blocks_t(x, 16)  # (16, B*16)
    scales, L = _make_q3_quants(xs, 4)
    _, max_scale = _absmax_signed(scales.reshape(nb, 16).T)
    has = max_scale != 0
    iscale = np.where(has, f(-32) / max_scale, f(0))
    l6 = np.clip(_nearest_int(np.repeat(iscale, 16) * scales).astype(np.int8), -32, 31).astype(np.int32) + 32
    l6 = np.where(np.repeat(has, 16), l6, 0).reshape(nb, 16)  # no scale: bytes stay 0 (sc = -32)
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, :8] = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    hi = (l6 >> 4).reshape(nb, 4, 4)  # (j // 4, j % 4)
    packed[:, 8:] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    d = _to_f16(np.where(has, f(1) / iscale, f(0)), "encode_q3_k")
    dj = np.repeat(d.astype(f), 16) * (l6.reshape(-1) - 32).astype(f)
    L = _requant(xs, L - f(4), dj, None, -4, 3) + f(4)
    L = L.T.astype(np.uint8).reshape(nb, 256)
    high = (L > 3).reshape(nb, 8, 32)  # bit b of hmask[m] is value 32b + m
    hmask = (high.astype(np.uint8) << np.arange(8, dtype=np.uint8)[:, None]).sum(1, dtype=np.uint8)
    return np.concatenate([hmask, _pack_2bit(L & 3), packed, _f16_bytes(d)], -1)


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    d, dmin, ls, lm, q = _kquant_affine(x, 15, -1.0, 0.1, 20, "encode_q4_k")
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min_k4(ls, lm), _pack_nibbles(q)], -1)


def _q5_k_blocks(x: np.ndarray) -> np.ndarray:
    d, dmin, ls, lm, q = _kquant_affine(x, 31, -0.5, 0.1, 15, "encode_q5_k")
    high = (q >> 4).astype(np.uint8)  # (B, 8, 32): fifth bit of sub-block k goes to bit k
    qh = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min_k4(ls, lm), qh, _pack_nibbles(q & 0xF)], -1)


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    f = _F32
    nb = x.shape[0]
    xs = _blocks_t(x, 16)  # (16, B*16)
    scales, L = _make_qx_quants(xs, 32)
    amax, max_scale = _absmax_signed(scales.reshape(nb, 16).T)
    zero = amax < _GROUP_MAX_EPS
    iscale = f(-128) / max_scale
    d = _to_f16(np.where(zero, f(0), f(1) / iscale), "encode_q6_k")
    sc = np.minimum(_nearest_int(np.repeat(iscale, 16) * scales), 127).astype(np.int8)
    dj = np.repeat(d.astype(f), 16) * sc.astype(f)
    L = _requant(xs, L - f(32), dj, None, -32, 31) + f(32)
    q = L.T.astype(np.uint8).reshape(nb, 2, 4, 32)  # half, quarter, lane
    low = np.concatenate(
        [(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4), (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], -1
    )
    hi = q >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    blocks = np.concatenate(
        [low.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8).reshape(nb, 16), _f16_bytes(d)], -1
    )
    blocks[zero] = 0  # ggml memsets an all-zero super-block
    return blocks


def _make_encoder(fn: Callable[[np.ndarray], np.ndarray], block_elems: int, block_bytes: int, name: str, chunk: int):
    def encode(x: np.ndarray) -> np.ndarray:
        rows, shape = _as_blocks(x, block_elems, name)
        return _encode_chunked(rows, fn, block_bytes, chunk).reshape(shape + (block_bytes,))

    encode.__name__ = name
    encode.__doc__ = (
        f"Quantize f32[..., n] along the last axis into u8[..., n // {block_elems}, {block_bytes}] "
        "GGUF blocks: ggml's reference quantizer bytes (no imatrix)."
    )
    return encode


_SMALL_CHUNK = 1 << 16  # 32-value blocks per call for the search-free types
encode_q4_0 = _make_encoder(_q4_0_blocks, 32, 18, "encode_q4_0", _SMALL_CHUNK)
encode_q4_1 = _make_encoder(_q4_1_blocks, 32, 20, "encode_q4_1", _SMALL_CHUNK)
encode_q5_0 = _make_encoder(_q5_0_blocks, 32, 22, "encode_q5_0", _SMALL_CHUNK)
encode_q5_1 = _make_encoder(_q5_1_blocks, 32, 24, "encode_q5_1", _SMALL_CHUNK)
encode_q8_0 = _make_encoder(_q8_0_blocks, 32, 34, "encode_q8_0", _SMALL_CHUNK)
encode_q2_k = _make_encoder(_q2_k_blocks, QK_K, 84, "encode_q2_k", _CHUNK_BLOCKS)
encode_q3_k = _make_encoder(_q3_k_blocks, QK_K, 110, "encode_q3_k", _CHUNK_BLOCKS)
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
            f"{name}: expected uint8 blocks of shape (..., nb, {block_bytes}), got {blocks.dtype}{tuple(blocks.shape)}"
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


def _nibbles_32(qs: jax.Array) -> jax.Array:
    """(..., 16) bytes -> (..., 32) values 0..15: value j low nibble of byte j, j+16 high."""
    return jnp.concatenate([qs & 0xF, qs >> 4], -1)


def _fifth_bit_32(qh: jax.Array) -> jax.Array:
    """(..., 4) bytes of a little-endian u32 -> (..., 32) values 0/16 (bit j -> value j)."""
    bits = qh[..., :, None] >> jnp.arange(8, dtype=jnp.uint8)  # (..., 4, 8): bit 8i+k
    return ((bits & 1) << 4).reshape(qh.shape[:-1] + (32,))


def _crumbs(qs: jax.Array) -> jax.Array:
    """(..., 64) bytes -> (..., 256) 2-bit values in element order (Q2_K/Q3_K layout)."""
    q = qs.reshape(qs.shape[:-1] + (2, 1, 32)) >> (2 * jnp.arange(4, dtype=jnp.uint8))[:, None]
    return (q & 3).reshape(qs.shape[:-1] + (256,))


@jax.jit
def decode_q4_0(blocks: jax.Array) -> jax.Array:
    """u8[..., nb, 18] Q4_0 blocks -> f32[..., nb * 32]."""
    blocks = _check_blocks(blocks, 18, "decode_q4_0")
    q = _nibbles_32(blocks[..., 2:18]).astype(jnp.float32) - 8
    return _flatten_blocks(q * _f16_at(blocks, 0), blocks)


@jax.jit
def decode_q4_1(blocks: jax.Array) -> jax.Array:
    """u8[..., nb, 20] Q4_1 blocks -> f32[..., nb * 32]."""
    blocks = _check_blocks(blocks, 20, "decode_q4_1")
    q = _nibbles_32(blocks[..., 4:20]).astype(jnp.float32)
    return _flatten_blocks(q * _f16_at(blocks, 0) + _f16_at(blocks, 2), blocks)


@jax.jit
def decode_q5_0(blocks: jax.Array) -> jax.Array:
    """u8[..., nb, 22] Q5_0 blocks -> f32[..., nb * 32]."""
    blocks = _check_blocks(blocks, 22, "decode_q5_0")
    q = (_nibbles_32(blocks[..., 6:22]) | _fifth_bit_32(blocks[..., 2:6])).astype(jnp.float32) - 16
    return _flatten_blocks(q * _f16_at(blocks, 0), blocks)


@jax.jit
def decode_q5_1(blocks: jax.Array) -> jax.Array:
    """u8[..., nb, 24] Q5_1 blocks -> f32[..., nb * 32]."""
    blocks = _check_blocks(blocks, 24, "decode_q5_1")
    q = (_nibbles_32(blocks[..., 8:24]) | _fifth_bit_32(blocks[..., 4:8])).astype(jnp.float32)
    return _flatten_blocks(q * _f16_at(blocks, 0) + _f16_at(blocks, 2), blocks)


@jax.jit
def decode_q8_0(blocks: jax.Array) -> jax.Array:
    """u8[..., nb, 34] Q8_0 blocks -> f32[..., nb * 32]."""
    blocks = _check_blocks(blocks, 34, "decode_q8_0")
    q = jax.lax.bitcast_convert_type(blocks[..., 2:], jnp.int8).astype(jnp.float32)
    return _flatten_blocks(q * _f16_at(blocks, 0), blocks)


@jax.jit
def decode_q2_k(blocks: jax.Array) -> jax.Array:
    """u8[..., nb, 84] Q2_K blocks -> f32[..., nb * 256]."""
    blocks = _check_blocks(blocks, 84, "decode_q2_k")
    sc = blocks[..., 0:16]
    d = (_f16_at(blocks, 80) * (sc & 0xF).astype(jnp.float32))[..., None]  # (..., 16, 1)
    m = (_f16_at(blocks, 82) * (sc >> 4).astype(jnp.float32))[..., None]
    q = _crumbs(blocks[..., 16:80]).astype(jnp.float32).reshape(blocks.shape[:-1] + (16, 16))
    return _flatten_blocks(d * q - m, blocks)


@jax.jit
def decode_q3_k(blocks: jax.Array) -> jax.Array:
    """u8[..., nb, 110] Q3_K blocks -> f32[..., nb * 256]."""
    blocks = _check_blocks(blocks, 110, "decode_q3_k")
    lead = blocks.shape[:-1]
    hm = blocks[..., None, 0:32] >> jnp.arange(8, dtype=jnp.uint8)[:, None]  # (..., 8, 32): value 32b + m
    q = _crumbs(blocks[..., 32:96]).astype(jnp.float32) - 4 * (1 - (hm & 1)).reshape(lead + (256,)).astype(jnp.float32)
    s = blocks[..., 96:108]
    low = jnp.concatenate([s[..., :8] & 0xF, s[..., :8] >> 4], -1)  # (..., 16)
    high = (s[..., 8:12, None] >> (2 * jnp.arange(4, dtype=jnp.uint8))) & 3  # (..., j % 4, j // 4)
    high = jnp.swapaxes(high, -1, -2).reshape(lead + (16,))
    sc = (low | (high << 4)).astype(jnp.float32) - 32
    d = (_f16_at(blocks, 108) * sc)[..., None]
    return _flatten_blocks(d * q.reshape(lead + (16, 16)), blocks)


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


# Every block type jquant encodes and decodes, in ggml's bytes (ggml_type ids as in gguf).
GGML_CODECS: dict[str, BlockCodec] = {
    "q4_0": BlockCodec("q4_0", 32, 18, 4.5, encode_q4_0, decode_q4_0, 2),
    "q4_1": BlockCodec("q4_1", 32, 20, 5.0, encode_q4_1, decode_q4_1, 3),
    "q5_0": BlockCodec("q5_0", 32, 22, 5.5, encode_q5_0, decode_q5_0, 6),
    "q5_1": BlockCodec("q5_1", 32, 24, 6.0, encode_q5_1, decode_q5_1, 7),
    "q8_0": BlockCodec("q8_0", 32, 34, 8.5, encode_q8_0, decode_q8_0, 8),
    "q2_k": BlockCodec("q2_k", QK_K, 84, 2.625, encode_q2_k, decode_q2_k, 10),
    "q3_k": BlockCodec("q3_k", QK_K, 110, 3.4375, encode_q3_k, decode_q3_k, 11),
    "q4_k": BlockCodec("q4_k", QK_K, 144, 4.5, encode_q4_k, decode_q4_k, 12),
    "q5_k": BlockCodec("q5_k", QK_K, 176, 5.5, encode_q5_k, decode_q5_k, 13),
    "q6_k": BlockCodec("q6_k", QK_K, 210, 6.5625, encode_q6_k, decode_q6_k, 14),
}
# The codecs that are also QArray formats (spec names in jquant.formats.CODEC_FORMATS): what
# QArrays, the GGUF reader/writer and the mixes use. A name added there joins automatically.
CODECS: dict[str, BlockCodec] = {n: GGML_CODECS[n] for n in CODEC_FORMATS if n in GGML_CODECS}


def get_codec(name: str) -> BlockCodec:
    """Look up any codec of :data:`GGML_CODECS` by name ('q4_k', 'Q3_K', ...); a clear
    error lists the known ones."""
    codec = GGML_CODECS.get(name.lower())
    if codec is None:
        raise ValueError(f"unknown GGUF block codec {name!r}; known: {sorted(GGML_CODECS)}")
    return codec
