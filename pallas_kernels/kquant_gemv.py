"""GGUF k-quants at small M (M <= 16) on Hopper with no conversion instructions (Triton via jax-triton).

On Hopper a conversion from an 8/16-bit integer (I2F) and fp32 -> bf16 rounding run at about 15
per SM per clock, an eighth of the fp32 rate (``scripts/bench_convert.py``,
``benchmarks/convert-NVIDIA_H200.json``; int32 -> fp32, I2FP, is nearly full rate). The first small-M
kernel (:func:`pallas_kernels.kquant_triton.kquant_matmul_small_m`) spends 1.6 conversions per weight
and moves values between registers to put them in K order. Here a code never goes through a
conversion:

* **Magic-number decode.** A code's bits are OR-ed into the mantissa of 2^23 where its word holds
  them (``(w & mask) | 0x4B000000``, one LOP3) and one subtraction of 2^23 (plus the format's
  bias) gives ``2^p * code`` exactly; the power of two ``2^-p`` goes into the block scale. Q5_K's
  and Q6_K's high bits are shifted next to their nibble once per word and merged by a second LOP3.
* **Values in word order.** Each lane decodes the values its words hold, in the order they hold
  them, so no value moves between registers. For Q4_K and Q5_K the activations are permuted to
  match once, in XLA (:func:`x_order`, in fp32); Q6_K's and Q8_0's code words hold two
  K-consecutive values, so those kernels read x in its own order as bf16 pairs (one int32 load).
* **One register layout per format.** Lanes run along a row's words (coalesced loads), rows along
  warps; every tensor of the loop has the same shape, so Triton keeps it in that layout.

Two paths: ``mma=False`` accumulates on the CUDA cores in fp32 (M <= :data:`FMA_M_MAX`, the GEMV
shapes: modulation layers at batch 1-2), ``mma=True`` casts the decoded tile to bf16 and uses
``tl.dot`` (M <= 16; slower than the first kernel on the H200, so not dispatched). ``depth`` sets
how many tiles each program loads ahead (1 is the fastest measured with a split). References:
:func:`pallas_kernels.kquant_triton.matmul_reference`; ``scripts/bench_kquant.py --gemv``,
``--gemv-stages`` and ``--gemv-depth`` check every output before timing it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _common
from pallas_kernels import kquant_triton as kq

try:  # Triton alone defines the kernels (its interpreter runs them on the CPU in the tests) ...
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None
try:  # ... jax-triton (the ``gpu`` extra) launches them from JAX on a CUDA machine.
    import jax_triton as jt
except ImportError:  # pragma: no cover - depends on the environment
    jt = None

#: Largest M of the CUDA-core path (one fp32 accumulator per row of x).
FMA_M_MAX = 2
#: Largest M of the tensor-core path (``tl.dot``'s 16-row tile).
MMA_M_MAX = 16
#: The CUDA-core path with :data:`DISPATCH_TILING` passed its H200 check on every format at M = 1 on
#: 5120 x 5120 and at M = 1 and 2 on 5120 x 13824, kernel as it is now, at 0e51104
#: (``bench_kquant.py --gemv-depth``, ``benchmarks/kquant_gemv_depth-x-NVIDIA_H200.json``: every
#: ``dispatch`` and ``gemv`` row PASS), so the dispatch runs it.
GPU_VERIFIED = True
#: Smallest weight (N * K) the dispatch sends here: below it (1536 x 1536) the first kernel is as
#: fast or faster (``kquant_gemv_stages-NVIDIA_H200.json``).
DISPATCH_MIN_WEIGHTS = 1 << 22


def x_order(fmt: str, mma: bool) -> np.ndarray:
    """``int[256]``: for each position of the permuted activation tile, the value index (inside a
    256-value tile) it holds: the order in which the kernel's lanes decode the weights."""
    if fmt in ("q4_k", "q5_k"):
        # FMA: component j (byte j // 2, nibble j % 2) major, then word 8 c + 4 uo + ui;
        # MMA: word major, then (nibble, byte % 2, byte // 2), as the joins stack them.
        c, uo, ui, j = np.ix_(np.arange(4), np.arange(2), np.arange(4), np.arange(8))
        value = 64 * c + 32 * (j % 2) + 4 * (4 * uo + ui) + j // 2
        if mma:
            pn, blo, bhi = j % 2, (j // 2) % 2, j // 4
            slot = ((((c * 2 + uo) * 4 + ui) * 2 + pn) * 2 + blo) * 2 + bhi
        else:
            slot = j * 32 + 8 * c + 4 * uo + ui
    elif fmt == "q6_k":
        # ql word 32 n + 16 s + 8 lh + ll holds l = 16 lh + 2 ll + byte of quarter s + 2 nib.
        n, s, lh, ll, byte, nib = np.ix_(*(np.arange(k) for k in (2, 2, 2, 8, 2, 2)))
        value = 128 * n + 32 * (s + 2 * nib) + 16 * lh + 2 * ll + byte
        word = 32 * n + 16 * s + 8 * lh + ll
        slot = word * 4 + nib * 2 + byte if mma else value  # the CUDA-core path reads x in its order
    elif fmt == "q8_0":
        g, h, byte = np.ix_(np.arange(8), np.arange(16), np.arange(2))
        value = 32 * g + 2 * h + byte
        slot = value  # both paths read x in its own order
    else:
        raise ValueError(f"x_order: format {fmt!r} has no kernel; supported: {sorted(kq.FORMATS)}")
    order = np.empty(kq.TILE, np.int32)
    order[np.broadcast_to(slot, value.shape).reshape(-1)] = value.reshape(-1)
    return order


def permute_x(x: jax.Array, fmt: str, mma: bool) -> jax.Array:
    """``x [M, K]`` with every 256-wide tile in :func:`x_order`."""
    order = x_order(fmt, mma)
    if np.array_equal(order, np.arange(kq.TILE)):
        return x
    m, k = x.shape
    return x.reshape(m, k // kq.TILE, kq.TILE)[:, :, order].reshape(m, k)


def kernel_x(x: jax.Array, fmt: str, mma: bool) -> jax.Array:
    """The activation operand of :func:`_gemv_kernel`: ``x`` in :func:`x_order`. Q4_K and Q5_K on
    the CUDA-core path take it in fp32, made by the permutation that runs anyway (the loop then has
    no bf16 -> fp32 shift per value: 7.1 -> 6.3 instructions per weight in the SASS); Q6_K and Q8_0
    there read x in its own order as bf16 pairs, so it is only cast; the tensor-core path takes bf16."""
    dtype = jnp.float32 if not mma and fmt in ("q4_k", "q5_k") else jnp.bfloat16
    return permute_x(x.astype(dtype), fmt, mma)


if triton is not None:  # pragma: no cover - needs Triton

    @triton.jit
    def _mg(bits, bias: tl.constexpr):
        """``float(bits & 0x7FFFFF) - bias`` exactly, in two full-rate ops (OR, subtract)."""
        return (bits | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + bias)

    @triton.jit
    def _operand(v, F16: tl.constexpr):
        """``v`` as a ``tl.dot`` operand: bf16, or fp16 where ``F16`` (Triton's CPU interpreter has no
        bf16 dot, so the tests run the same kernel with fp16 operands)."""
        if F16:
            out = v.to(tl.float16)
        else:
            out = v.to(tl.bfloat16)
        return out

    @triton.jit
    def _or_mg(lo, hi, bias: tl.constexpr):
        """``_mg(lo | hi, bias)`` where ``hi`` already carries the 2^23 bits (``| 0x4B000000``): two
        LOP3 per value (one for the high bits with the magic, one to merge the nibble) instead of three."""
        return (lo | hi).to(tl.float32, bitcast=True) - (8388608.0 + bias)

    @triton.jit
    def _bf16_lo(w):
        """The bf16 in the low half of int32 ``w``, as fp32 (exact: a shift)."""
        return (w << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _bf16_hi(w):
        """The bf16 in the high half of int32 ``w``, as fp32 (exact: a mask)."""
        return (w & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def _h2f(h):
        """fp32 of the float16 whose bits are the low 16 bits of int32 ``h``."""
        return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    # ---- Q4_K / Q5_K: lanes (c, uo, rows), 4 consecutive words per lane (ui): [4, 2, R, 4] ----

    @triton.jit
    def _k45_scales(hdr, R: tl.constexpr):
        """``(A0, A1, M0, M1)`` as [4, 2, R, 1]: d * sc and dmin * mn of sub-blocks 2c and 2c + 1,
        from the header words (d|dmin, then the 12 bytes of 6-bit fields) each lane holds."""
        even, odd = tl.split(tl.reshape(hdr, (4, 2, R, 2, 2)))  # words {0, 2} and {1, 3}
        h0, h2 = tl.split(even)
        h1, h3 = tl.split(odd)
        c = tl.arange(0, 4)[:, None, None]
        sh0 = 16 * (c % 2)  # byte (2c) % 4 of the 4-byte fields; sub-block 2c + 1 is the next byte
        low = c < 2
        a0 = h1 >> sh0
        a1 = a0 >> 8
        b0 = h2 >> sh0
        b1 = b0 >> 8
        c0 = h3 >> sh0
        c1 = c0 >> 8
        sc0 = tl.where(low, a0 & 63, (c0 & 0xF) | ((a0 >> 2) & 0x30))
        sc1 = tl.where(low, a1 & 63, (c1 & 0xF) | ((a1 >> 2) & 0x30))
        mn0 = tl.where(low, b0 & 63, ((c0 >> 4) & 0xF) | ((b0 >> 2) & 0x30))
        mn1 = tl.where(low, b1 & 63, ((c1 >> 4) & 0xF) | ((b1 >> 2) & 0x30))
        d = _h2f(h0)
        dmin = _h2f(h0 >> 16)
        return (
            (d * _mg(sc0, 0.0))[:, :, :, None],
            (d * _mg(sc1, 0.0))[:, :, :, None],
            (dmin * _mg(mn0, 0.0))[:, :, :, None],
            (dmin * _mg(mn1, 0.0))[:, :, :, None],
        )

    @triton.jit
    def _k45_load(sb, off, FMT: tl.constexpr):
        """The words each lane needs of Q4_K/Q5_K super-blocks at int32 pointers ``sb`` [1, 1, R, 1]
        (``off`` = 8 c + 4 uo + ui): header, qs and (Q5_K) qh words, [4, 2, R, 4] each."""
        QS: tl.constexpr = 4 if FMT == 0 else 12
        hdr = tl.load(sb + off % 4)
        w = tl.load(sb + QS + off)
        if FMT == 1:
            qh = tl.load(sb + 4 + (off % 8))
        else:
            qh = w
        return hdr, w, qh

    @triton.jit
    def _k45_decode(raw, off, fifteen, R: tl.constexpr, FMT: tl.constexpr):
        """The 8 components (byte j // 2, nibble j % 2 of each word) of the words :func:`_k45_load`
        read, fp32 [4, 2, R, 4] each."""
        hdr, w, qh = raw
        A0, A1, M0, M1 = _k45_scales(hdr, R)
        w12 = w >> 12
        w16 = w >> 16
        m0 = fifteen
        m1 = fifteen << 4
        m2 = fifteen << 8
        m3 = fifteen << 12
        if FMT == 1:  # Q5_K: the fifth bit of value (c, u, byte b, nibble pn) is bit 8b + 2c + pn of qh word u
            qh8 = qh << 8
            c2 = 2 * (off // 8)
            one = fifteen & 1
            # right shifts that put bit 8b + 2c + pn at the nibble's position + 4 in its source
            h0 = ((qh8 >> (c2 + 4)) & (one << 4)) | 0x4B000000
            h1 = ((qh8 >> (c2 + 1)) & (one << 8)) | 0x4B000000
            h2 = ((qh8 >> (c2 + 4)) & (one << 12)) | 0x4B000000
            h3 = ((qh8 >> (c2 + 1)) & (one << 16)) | 0x4B000000
            h4 = ((qh >> (c2 + 8)) & (one << 8)) | 0x4B000000
            h5 = ((qh >> (c2 + 5)) & (one << 12)) | 0x4B000000
            h6 = ((qh >> (c2 + 8)) & (one << 16)) | 0x4B000000
            h7 = ((qh >> (c2 + 9)) & (one << 16)) | 0x4B000000
        else:
            h0 = 0x4B000000
            h1 = h0
            h2 = h0
            h3 = h0
            h4 = h0
            h5 = h0
            h6 = h0
            h7 = h0
        return (
            _or_mg(w & m0, h0, 0.0) * A0 - M0,
            _or_mg(w & m1, h1, 0.0) * (A1 * 0.0625) - M1,
            _or_mg(w & m2, h2, 0.0) * (A0 * 0.00390625) - M0,
            _or_mg(w & m3, h3, 0.0) * (A1 * 0.000244140625) - M1,
            _or_mg(w12 & m1, h4, 0.0) * (A0 * 0.0625) - M0,
            _or_mg(w12 & m2, h5, 0.0) * (A1 * 0.00390625) - M1,
            _or_mg(w12 & m3, h6, 0.0) * (A0 * 0.000244140625) - M0,
            _or_mg(w16 & m3, h7, 0.0) * (A1 * 0.000244140625) - M1,
        )

    # ---- Q6_K: lanes (n, s, ll), rows and lh in registers: [2, 2, 2, R, 8] (u16 words) ----

    @triton.jit
    def _q6k_load(sb, n, s, lh, ll):
        """The words each lane needs of Q6_K super-blocks at byte pointers ``sb`` [1, 1, 1, R, 1]:
        ql word 32 n + 16 s + 8 lh + ll, its qh word, the two scales and d."""
        p16 = sb.to(tl.pointer_type(tl.uint16))
        ql = tl.load(p16 + 32 * n + 16 * s + 8 * lh + ll).to(tl.int32)
        qh = tl.load(p16 + 64 + 16 * n + 8 * lh + ll + 0 * s).to(tl.int32)
        sc0 = tl.load(sb + 192 + 8 * n + 2 * s + lh).to(tl.int32)  # [2, 2, 2, R, 1]: once per row
        sc1 = tl.load(sb + 196 + 8 * n + 2 * s + lh).to(tl.int32)
        d = tl.load(p16 + 104).to(tl.int32)
        return ql, qh, sc0, sc1, d

    @triton.jit
    def _q6k_decode(raw, s, fifteen):
        """The 4 components (byte, nibble) of each ql word :func:`_q6k_load` read, fp32 [2, 2, 2, R, 8]."""
        ql, qh, sc0, sc1, d = raw
        d = _h2f(d)
        # quarter q = s + 2 nib has its two high bits at 8 byte + 2 q of qh; move them to 8 byte + 4 nib + 4
        qh = qh << (4 - 2 * s)
        A0 = d * _mg(sc0 ^ 0x80, 128.0)
        A1 = d * _mg(sc1 ^ 0x80, 128.0)
        # 2^23's bits go into the shifted qh word once (its bits 20-31 are free) and stay in every
        # mask, so each value costs two LOP3: (qh & mask) and (ql & mask) | that.
        three = fifteen >> 2
        mg = (three | 0x4B000000) - three  # 2^23's bits, as a value the compiler cannot fold
        qh = qh | mg
        v00 = _or_mg(ql & fifteen, qh & ((three << 4) | mg), 32.0) * A0
        v01 = _or_mg(ql & (fifteen << 4), qh & ((three << 8) | mg), 512.0) * (A1 * 0.0625)
        v10 = _or_mg(ql & (fifteen << 8), qh & ((three << 12) | mg), 8192.0) * (A0 * 0.00390625)
        v11 = _or_mg(ql & (fifteen << 12), qh & ((three << 16) | mg), 131072.0) * (A1 * 0.000244140625)
        return v00, v01, v10, v11

    # ---- Q8_0: lanes (g, h), rows in registers: [8, R, 16] (u16 words of codes) ----

    @triton.jit
    def _q80_load(sb, g, h):
        """Code words [8, R, 16] and block scales [8, R, 1] of eight Q8_0 blocks at byte pointers ``sb``."""
        p16 = sb.to(tl.pointer_type(tl.uint16))
        w = tl.load(p16 + 17 * g + 1 + h).to(tl.int32)
        d = tl.load(p16 + 17 * g).to(tl.int32)  # [8, R, 1]: once per block
        return w, d

    @triton.jit
    def _q80_decode(raw, fifteen):
        """The 2 components (byte 0, 1 of each code word) :func:`_q80_load` read, fp32 [8, R, 16]:
        the int8 codes times their block's d."""
        w, d = raw
        d = _h2f(d)
        ff = fifteen * 17
        lo = _mg((w & ff) ^ 0x80, 128.0) * d
        hi = _mg((w & (ff << 8)) ^ 0x8000, 32768.0) * (d * 0.00390625)
        return lo, hi

    @triton.jit
    def _load_tile(sb, FMT: tl.constexpr, ia, ib, ic, idd, off):
        """The raw words of the tiles at byte pointers ``sb`` each lane decodes (per format)."""
        if FMT == 3:
            raw = _q80_load(sb, ia, ib)
        elif FMT == 2:
            raw = _q6k_load(sb, ia, ib, ic, idd)
        else:
            raw = _k45_load(sb.to(tl.pointer_type(tl.int32)), off, FMT)
        return raw

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        w_ptr,
        fifteen,
        out_ptr,
        M: tl.constexpr,
        N: tl.constexpr,
        K: tl.constexpr,
        R: tl.constexpr,
        SPLIT: tl.constexpr,
        MMA: tl.constexpr,
        FMT: tl.constexpr,
        TB: tl.constexpr,
        F16: tl.constexpr = False,
        DEPTH: tl.constexpr = 1,
    ):
        """``out[split, m, rows] = sum over this split's tiles of x_perm[m] . w[rows]``; the
        weights decoded by the format's ``_*_decode``, the product on the CUDA cores (fp32, M <= 2)
        or with ``tl.dot`` (bf16 operands, fp32 accumulation, M <= 16). ``DEPTH`` (0-4) is how many
        tiles ahead of the one being decoded each lane has asked for. More helps a program without a
        split; with one, 1 is fastest on the H200 (the ring's registers cost resident warps)."""
        pn = tl.program_id(0)
        ps = tl.program_id(1)
        per: tl.constexpr = K // 256 // SPLIT
        row_bytes: tl.constexpr = (K // 256) * TB
        mm = tl.arange(0, 16)[:, None]
        kk = tl.arange(0, 256)[None, :]
        acc_mma = tl.zeros((16, R), dtype=tl.float32)
        if FMT == 3:
            g = tl.arange(0, 8)[:, None, None]
            r = pn * R + tl.arange(0, R)[None, :, None]
            h = tl.arange(0, 16)[None, None, :]
            base = w_ptr + tl.where(r < N, r, 0).to(tl.int64) * row_bytes
            xo = 16 * g + h + 0 * r
            acc0 = tl.zeros((8, R, 16), dtype=tl.float32)
            ia, ib, ic, idd, off = g, h, g, g, g  # the index tensors _load_tile reads (Q8_0: g, h)
        elif FMT == 2:
            n6 = tl.arange(0, 2)[:, None, None, None, None]
            s6 = tl.arange(0, 2)[None, :, None, None, None]
            lh6 = tl.arange(0, 2)[None, None, :, None, None]
            ll6 = tl.arange(0, 8)[None, None, None, None, :]
            r = pn * R + tl.arange(0, R)[None, None, None, :, None]
            base = w_ptr + tl.where(r < N, r, 0).to(tl.int64) * row_bytes
            xo = 64 * n6 + 16 * s6 + 8 * lh6 + ll6 + 0 * r  # the x word (bf16 pair) of nibble 0
            acc0 = tl.zeros((2, 2, 2, R, 8), dtype=tl.float32)
            ia, ib, ic, idd, off = n6, s6, lh6, ll6, n6
        else:
            off = (
                8 * tl.arange(0, 4)[:, None, None, None]
                + 4 * tl.arange(0, 2)[None, :, None, None]
                + tl.arange(0, 4)[None, None, None, :]
            )
            r = pn * R + tl.arange(0, R)[None, None, :, None]
            base = w_ptr + tl.where(r < N, r, 0).to(tl.int64) * row_bytes
            xo = off
            acc0 = tl.zeros((4, 2, R, 4), dtype=tl.float32)
            ia, ib, ic, idd = off, off, off, off
        acc1 = tl.zeros_like(acc0)
        # a ring of DEPTH tiles in registers: tile i + DEPTH is asked for before tile i is decoded
        # (the last steps reload the last tile, an L2 hit), so DEPTH + 1 tiles' loads are in flight
        raw = _load_tile(base + ps * per * TB, FMT, ia, ib, ic, idd, off)
        if DEPTH >= 2:
            r1 = _load_tile(base + (ps * per + tl.minimum(1, per - 1)) * TB, FMT, ia, ib, ic, idd, off)
        if DEPTH >= 3:
            r2 = _load_tile(base + (ps * per + tl.minimum(2, per - 1)) * TB, FMT, ia, ib, ic, idd, off)
        if DEPTH >= 4:
            r3 = _load_tile(base + (ps * per + tl.minimum(3, per - 1)) * TB, FMT, ia, ib, ic, idd, off)
        for i in range(0, per):
            t = ps * per + i
            if DEPTH >= 1:
                nxt = _load_tile(base + (ps * per + tl.minimum(i + DEPTH, per - 1)) * TB, FMT, ia, ib, ic, idd, off)
            else:
                raw = _load_tile(base + t * TB, FMT, ia, ib, ic, idd, off)
                nxt = raw
            if FMT == 3:
                v = _q80_decode(raw, fifteen)
                J: tl.constexpr = 2
                XS: tl.constexpr = 128
            elif FMT == 2:
                v = _q6k_decode(raw, ib, fifteen)
                J: tl.constexpr = 4
                XS: tl.constexpr = 64
            else:
                v = _k45_decode(raw, off, fifteen, R, FMT)
                J: tl.constexpr = 8
                XS: tl.constexpr = 32
            if DEPTH == 2:
                raw = r1
                r1 = nxt
            elif DEPTH == 3:
                raw = r1
                r1 = r2
                r2 = nxt
            elif DEPTH == 4:
                raw = r1
                r1 = r2
                r2 = r3
                r3 = nxt
            else:
                raw = nxt
            if MMA:
                if FMT == 3:  # [8, R, 16, 2] -> [R, 8, 16, 2]
                    tile = tl.permute(tl.join(_operand(v[0], F16), _operand(v[1], F16)), (1, 0, 2, 3))
                elif FMT == 2:  # [2, 2, 2, R, 8, nib, byte] -> [R, n, s, lh, ll, nib, byte]
                    b0 = tl.join(_operand(v[0], F16), _operand(v[2], F16))
                    b1 = tl.join(_operand(v[1], F16), _operand(v[3], F16))
                    tile = tl.permute(tl.join(b0, b1), (3, 0, 1, 2, 4, 6, 5))
                else:  # [4, 2, R, 4, pn, blo, bhi] -> [R, c, uo, ui, pn, blo, bhi]
                    p0 = tl.join(_operand(v[0], F16), _operand(v[1], F16))
                    p1 = tl.join(_operand(v[2], F16), _operand(v[3], F16))
                    p2 = tl.join(_operand(v[4], F16), _operand(v[5], F16))
                    p3 = tl.join(_operand(v[6], F16), _operand(v[7], F16))
                    tile = tl.permute(tl.join(tl.join(p0, p1), tl.join(p2, p3)), (2, 0, 1, 3, 4, 5, 6))
                xk = tl.load(x_ptr + mm * K + t * 256 + kk, mask=mm < M, other=0.0)
                acc_mma += tl.dot(_operand(xk, F16), tl.trans(tl.reshape(tile, (R, 256))))
            else:
                if FMT >= 2:
                    # Q6_K / Q8_0: a lane's code word holds two K-consecutive values (bytes 0, 1),
                    # so x is read in its own order as bf16 pairs (int32 words: the low half is
                    # byte 0's value) at the same index. The words are 2-byte aligned, so their
                    # loads are one element wide; the offset (fifteen - 15 = 0, unknown to the
                    # compiler) makes x's loads one element wide too, and Triton gives both the
                    # same register layout instead of moving x through shared memory.
                    xt = x_ptr.to(tl.pointer_type(tl.int32)) + (fifteen - 15) + t * 128 + xo
                    for j in tl.static_range(J // 2):  # Q6_K: j = nibble, x words 32 apart
                        xw = tl.load(xt + 32 * j)
                        acc0 += v[j] * _bf16_lo(xw)
                        acc0 += v[j + J // 2] * _bf16_hi(xw)
                        if M == 2:
                            xw = tl.load(xt + K // 2 + 32 * j)
                            acc1 += v[j] * _bf16_lo(xw)
                            acc1 += v[j + J // 2] * _bf16_hi(xw)
                else:
                    xt = x_ptr + t * 256 + xo
                    for j in tl.static_range(J):
                        acc0 += v[j] * tl.load(xt + j * XS).to(tl.float32)
                        if M == 2:
                            acc1 += v[j] * tl.load(xt + K + j * XS).to(tl.float32)
        cols = pn * R + tl.arange(0, R)[None, :]
        if MMA:
            y = acc_mma
        else:
            if FMT == 3:
                y0 = tl.sum(tl.sum(acc0, axis=2), axis=0)
                y1 = tl.sum(tl.sum(acc1, axis=2), axis=0)
            elif FMT == 2:
                y0 = tl.sum(tl.sum(tl.sum(tl.sum(acc0, axis=4), axis=2), axis=1), axis=0)
                y1 = tl.sum(tl.sum(tl.sum(tl.sum(acc1, axis=4), axis=2), axis=1), axis=0)
            else:
                y0 = tl.sum(tl.sum(tl.sum(acc0, axis=3), axis=1), axis=0)
                y1 = tl.sum(tl.sum(tl.sum(acc1, axis=3), axis=1), axis=0)
            y = tl.where(mm == 0, y0[None, :], tl.where(mm == 1, y1[None, :], 0.0))
        tl.store(out_ptr + ps * 16 * N + mm * N + cols, y.to(out_ptr.dtype.element_ty), mask=(mm < M) & (cols < N))


def _require() -> None:
    if jt is None:
        raise ImportError(
            "pallas_kernels.kquant_gemv needs jax-triton and Triton: install the 'gpu' extra "
            "(pip install 'jquant[gpu]') on a CUDA machine"
        )


def kquant_gemv(
    x: jax.Array,
    blocks: jax.Array,
    fmt: str,
    out_dtype=jnp.bfloat16,
    *,
    mma: bool | None = None,
    rows: int = 32,
    warps: int = 4,
    stages: int = 1,
    split: int | None = None,
    depth: int = 1,
) -> jax.Array:
    """``x [M, K] @ decode(blocks)^T`` for M <= 16, GGUF blocks ``u8[N, K/block, bytes]`` read in place.

    ``mma`` None picks the CUDA-core path for M <= :data:`FMA_M_MAX`. ``split`` > 1 splits K over
    programs (a divisor of K / 256 at most ``split``) and sums the fp32 partials in XLA; None
    splits until about two programs run per SM. ``depth`` (0-4) is how many tiles ahead each
    program loads."""
    _require()
    n, k = kq._check(blocks, fmt, "kquant_gemv")  # pylint: disable=protected-access
    kq._check_tiles(k, "kquant_gemv")  # pylint: disable=protected-access
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"kquant_gemv: x must be [M, {k}], got {list(x.shape)}")
    m = x.shape[0]
    mma = m > FMA_M_MAX if mma is None else mma
    if m > (MMA_M_MAX if mma else FMA_M_MAX):
        raise ValueError(f"kquant_gemv: M={m} is above the {'tensor' if mma else 'CUDA'}-core path's limit")
    if rows & (rows - 1) or rows < (16 if mma else 1):
        raise ValueError(f"kquant_gemv: rows={rows} must be a power of two (>= 16 with mma)")
    if not 0 <= depth <= 4:
        raise ValueError(f"kquant_gemv: depth={depth} must be 0-4 (tiles loaded ahead)")
    split = dividing_split(k, kq.pick_split(n, k, rows, _common.num_sms()) if split is None else split)
    out = launch(kernel_x(x, fmt, mma), blocks, fmt, m, mma, rows, warps, stages, split, depth, out_dtype)
    y = out.sum(axis=0) if split > 1 else out[0]
    return y[:m].astype(out_dtype)


def dividing_split(k: int, split: int) -> int:
    """The largest divisor of K's 256-value tile count that is at most ``split``: what the kernel runs."""
    tiles = k // kq.TILE
    return max(d for d in range(1, min(split, tiles) + 1) if tiles % d == 0)


def launch(
    xk: jax.Array,
    blocks: jax.Array,
    fmt: str,
    m: int,
    mma: bool,
    rows: int,
    warps: int,
    stages: int,
    split: int,
    depth: int,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
    """The kernel alone on the operand :func:`kernel_x` made (arguments checked by
    :func:`kquant_gemv`): ``[split, 16, N]`` partials, fp32 when ``split`` > 1. Benchmarks time it
    to separate the kernel from the activation permutation and the split's sum."""
    n, k = kq._check(blocks, fmt, "kquant_gemv")  # pylint: disable=protected-access
    if (k // kq.TILE) % split:
        raise ValueError(f"kquant_gemv: split={split} does not divide K={k}'s {k // kq.TILE} tiles (dividing_split)")
    return jt.triton_call(
        xk,
        blocks,
        15,  # a Python int: jax-triton passes it as an i32 scalar (numpy scalars become arrays)
        kernel=_gemv_kernel,
        out_shape=jax.ShapeDtypeStruct((split, 16, n), jnp.float32 if split > 1 else out_dtype),
        grid=(_common.cdiv(n, rows), split),
        num_warps=warps,
        num_stages=stages,
        M=m,
        N=n,
        K=k,
        R=rows,
        SPLIT=split,
        MMA=mma,
        FMT=kq.FORMATS[fmt],
        TB=kq.tile_bytes(fmt),
        DEPTH=depth,
    )


#: The tiling the dispatch uses per format (CUDA-core path, M <= :data:`FMA_M_MAX`, one tile loaded
#: ahead): the fastest at M = 1 on 5120 x 5120 in ``bench_kquant.py --gemv-stages``; in
#: ``--gemv-depth`` still the fastest on 5120 x 13824 at M = 1 and 2 and within 9% on 5120 x 5120
#: (the tilings that win there lose up to 33% at M = 2: ``kquant_gemv_depth-x-NVIDIA_H200.json``). Larger M
#: (the tensor-core path, slower than the first kernel at M = 16) stays on
#: :func:`pallas_kernels.kquant_triton.kquant_matmul`.
DISPATCH_TILING: dict[str, dict] = {
    "q4_k": dict(rows=32, warps=4, split=4),
    "q5_k": dict(rows=32, warps=4, split=4),
    "q6_k": dict(rows=8, warps=2, split=1),
    "q8_0": dict(rows=8, warps=2, split=1),
}


def supports(x: jax.Array, fmt: str, weights: int) -> bool:
    """Whether the dispatch runs :func:`dispatch_matmul` for ``x`` on a ``fmt`` weight of ``weights``
    values: a format of :data:`DISPATCH_TILING`, at least :data:`DISPATCH_MIN_WEIGHTS`, 2-D ``x``
    with M <= :data:`FMA_M_MAX`, a Hopper GPU, jax-triton installed, the kernel GPU-checked (or forced)."""
    return (
        jt is not None
        and fmt in DISPATCH_TILING
        and weights >= DISPATCH_MIN_WEIGHTS
        and x.ndim == 2
        and x.shape[0] <= FMA_M_MAX
        and _common.on_hopper()
        and _common.kernel_enabled(GPU_VERIFIED)
    )


def dispatch_matmul(x: jax.Array, blocks: jax.Array, fmt: str, out_dtype=jnp.bfloat16) -> jax.Array:
    """:func:`kquant_gemv` on the CUDA-core path with the format's :data:`DISPATCH_TILING`."""
    return kquant_gemv(x, blocks, fmt, out_dtype, mma=False, **DISPATCH_TILING[fmt])
