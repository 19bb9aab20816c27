"""GGUF k-quant weights on the GPU without a float copy of the model: Triton kernels via jax-triton.

A GGUF weight stays in ggml's block bytes (``u8[N, K / block_elems, block_bytes]``, the
contraction axis last, as a codec QArray stores it). Two kernels read those bytes directly:

* :func:`kquant_matmul_small_m` (M <= :data:`SMALL_M_MAX`, the GEMV shapes of modulation layers
  and text encoders): each program decodes a ``[BN, 256]`` tile of weights in registers from
  the block bytes (scales, mins and codes by ggml's formulas) and feeds it to ``tl.dot`` with
  the tokens; the K loop is split over programs and the fp32 partial sums are reduced by XLA.
  Weight bytes dominate at this M, so reading 4.5-8.5 bits per weight instead of 16 is the gain.
* :func:`kquant_decode` (large M): one memory-bound pass that writes the layer's bf16 weights
  (transient, one layer at a time), then XLA's bf16 GEMM. At M >= 4096 the GEMM costs
  ``2 M`` flops per weight and the decode one read and one write, so the decode is a few per
  cent of the step; decoding inside the GEMM's main loop would repeat it for every token tile.

Formats: ``q4_k``, ``q5_k``, ``q6_k`` (256-value super-blocks) and ``q8_0`` (32-value blocks,
decoded eight at a time). The references are :mod:`jquant.codecs`' decoders (ggml's
``dequantize_row_*``); ``scripts/bench_kquant.py`` checks each kernel against them on the GPU before timing it. jax-triton is the optional ``gpu`` extra; without it :func:`available` is False
and the dispatch keeps the XLA dequantize-then-dot path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jquant import codecs
from pallas_kernels import _common

try:  # Only with the ``gpu`` extra on a CUDA machine.
    import jax_triton as jt
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    jt = triton = tl = None

#: Block formats the kernels decode, with their Triton format id.
FORMATS: dict[str, int] = {"q4_k": 0, "q5_k": 1, "q6_k": 2, "q8_0": 3}
#: Values one decoded tile spans along K (a k-quant super-block; eight Q8_0 blocks).
TILE = 256
#: Largest M the fused kernel takes; larger M decode then use XLA's bf16 GEMM.
SMALL_M_MAX = 16
#: Both kernels passed scripts/bench_kquant.py's checks on an H200 (decode bit-exact against ggml's
#: formulas, every product against the fp32 reference; kernels unchanged since commit eee713b,
#: benchmarks/kquant-NVIDIA_H200.json, kquant_sweep-NVIDIA_H200.json), so the dispatch runs them by
#: default; False would keep them behind ``JQUANT_BACKEND=pallas``.
GPU_VERIFIED = True


def available() -> bool:
    """True when jax-triton and Triton import (the ``gpu`` extra is installed)."""
    return jt is not None


def tile_bytes(fmt: str) -> int:
    """Bytes of one :data:`TILE`-value tile of ``fmt`` (one super-block, or eight Q8_0 blocks)."""
    codec = codecs.get_codec(fmt)
    return codec.block_bytes * (TILE // codec.block_elems)


#: Offsets of each format's float16 block scales (d, and dmin for the affine k-quants).
_SCALE_OFFSETS: dict[str, tuple[int, ...]] = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "q8_0": (0,)}
#: Largest |code x sub-scale| of each format, so a block scale d bounds a weight by d times this.
_CODE_RANGE: dict[str, float] = {"q4_k": 63 * 15, "q5_k": 63 * 31, "q6_k": 128 * 32, "q8_0": 127}


def random_blocks(fmt: str, n: int, k: int, seed: int, absmax: float = 0.05) -> np.ndarray:
    """Synthetic ggml blocks for benchmarks (numpy ``u8[N, K/block, bytes]``): random code and
    sub-scale bytes, float16 block scales drawn so that weights stay within about ``absmax``.
    Nothing is encoded, so a 14B-parameter model's worth takes seconds."""
    codec = codecs.get_codec(fmt)
    if fmt not in _SCALE_OFFSETS:
        raise ValueError(f"random_blocks: format {fmt!r} not one of {sorted(_SCALE_OFFSETS)}")
    rng = np.random.default_rng(seed)
    nb = k // codec.block_elems
    b = rng.integers(0, 256, size=(n, nb, codec.block_bytes), dtype=np.uint8)
    hi = absmax / _CODE_RANGE[fmt]
    for off in _SCALE_OFFSETS[fmt]:
        h = rng.uniform(0.25 * hi, hi, size=(n, nb)).astype(np.float16)
        b[..., off : off + 2] = h.view(np.uint8).reshape(n, nb, 2)
    return b


def _check(blocks: jax.Array, fmt: str, name: str) -> tuple[int, int]:
    """``(N, K)`` of a ``u8[N, nb, block_bytes]`` weight; clear errors for anything else."""
    if fmt not in FORMATS:
        raise ValueError(f"{name}: format {fmt!r} has no kernel; supported: {sorted(FORMATS)}")
    codec = codecs.get_codec(fmt)
    if blocks.dtype != jnp.uint8 or blocks.ndim != 3 or blocks.shape[-1] != codec.block_bytes:
        raise ValueError(
            f"{name}: expected {fmt} blocks as uint8[N, K/{codec.block_elems}, {codec.block_bytes}], "
            f"got {blocks.dtype}{list(blocks.shape)}"
        )
    return blocks.shape[0], blocks.shape[1] * codec.block_elems


def _check_tiles(k: int, name: str) -> None:
    if k % TILE:
        raise ValueError(f"{name}: K={k} is not a multiple of {TILE} (the kernels decode whole 256-value tiles)")


def decode_reference(blocks: jax.Array, fmt: str, dtype=jnp.bfloat16) -> jax.Array:
    """Plain-JAX reference: ggml's decode of ``u8[N, nb, bytes]`` -> ``[N, K]``."""
    n, k = _check(blocks, fmt, "decode_reference")
    return codecs.get_codec(fmt).decode(blocks).reshape(n, k).astype(dtype)


def matmul_reference(x: jax.Array, blocks: jax.Array, fmt: str, out_dtype=jnp.bfloat16) -> jax.Array:
    """``x [M, K] @ decode(blocks)^T`` in fp32, rounded to ``out_dtype``."""
    w = decode_reference(blocks, fmt, jnp.float32)
    y = jax.lax.dot_general(x.astype(jnp.float32), w, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST)
    return y.astype(out_dtype)


if triton is not None:  # pragma: no cover - needs Triton

    @triton.jit
    def _f16(p):
        """fp32 of the float16 at byte pointers ``p`` (every ggml block scale sits at an even offset)."""
        return tl.load(p.to(tl.pointer_type(tl.float16))).to(tl.float32)

    @triton.jit
    def _stack1(a, b):
        """``[R, n]`` x2 -> ``[R, 2, n]``, ``a`` first."""
        return tl.permute(tl.join(a, b), (0, 2, 1))

    @triton.jit
    def _decode_tile(base, R: tl.constexpr, FMT: tl.constexpr):
        """fp32 ``[R, 256]``: the tiles starting at byte pointers ``base`` ([R, 1]), each byte loaded once."""
        lane = tl.arange(0, 32)[None, None, :]
        if FMT == 3:  # q8_0: eight 34-byte blocks, d (f16) then 32 int8 codes
            blk = base[:, :, None] + 34 * tl.arange(0, 8)[None, :, None]
            q = tl.load(blk + 2 + lane).to(tl.int8, bitcast=True).to(tl.float32)  # [R, 8, 32]
            v = _f16(blk) * q
        elif FMT == 2:  # q6_k: ql[128] qh[64] scales int8[16] d
            ql = tl.reshape(tl.load(base + tl.arange(0, 128)[None, :]).to(tl.int32), (R, 2, 2, 32))
            # quarter = 2 * nibble + (which 32 bytes): [R, half, nibble, parity, lane]
            low = tl.reshape(tl.permute(tl.join(ql & 0xF, ql >> 4), (0, 1, 4, 2, 3)), (R, 2, 4, 32))
            qh = tl.reshape(tl.load(base + 128 + tl.arange(0, 64)[None, :]).to(tl.int32), (R, 2, 1, 32))
            shift = 2 * tl.arange(0, 4)[None, None, :, None]
            q = (low | (((qh >> shift) & 3) << 4)) - 32
            sc = tl.load(base + 192 + tl.arange(0, 16)[None, :]).to(tl.int8, bitcast=True).to(tl.float32)
            d = _f16(base + 208)
            v = tl.reshape(q.to(tl.float32), (R, 16, 16)) * (d * sc)[:, :, None]
        else:  # q4_k / q5_k: d, dmin, 12 bytes of 6-bit scales and mins, [qh[32]], qs[128]
            four = tl.arange(0, 4)[None, :]
            a = tl.load(base + 4 + four).to(tl.int32)
            b = tl.load(base + 8 + four).to(tl.int32)
            c = tl.load(base + 12 + four).to(tl.int32)
            sc = tl.reshape(_stack1(a & 63, (c & 0xF) | ((a >> 6) << 4)), (R, 8))  # sub-block 4 * hi + t
            mn = tl.reshape(_stack1(b & 63, (c >> 4) | ((b >> 6) << 4)), (R, 8))
            QS: tl.constexpr = 16 if FMT == 0 else 48
            qs = tl.reshape(tl.load(base + QS + tl.arange(0, 128)[None, :]).to(tl.int32), (R, 4, 32))
            # value 64 * chunk + 32 * nibble + lane: sub-block 2 * chunk + nibble
            q = tl.reshape(tl.permute(tl.join(qs & 0xF, qs >> 4), (0, 1, 3, 2)), (R, 8, 32))
            if FMT == 1:
                qh = tl.load(base + 16 + tl.arange(0, 32)[None, :]).to(tl.int32)[:, None, :]
                q = q | (((qh >> tl.arange(0, 8)[None, :, None]) & 1) << 4)
            d = _f16(base)
            dmin = _f16(base + 2)
            v = (d * sc.to(tl.float32))[:, :, None] * q.to(tl.float32) - (dmin * mn.to(tl.float32))[:, :, None]
        return tl.reshape(v, (R, 256))

    @triton.jit
    def _decode_kernel(
        w_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr, ROWS: tl.constexpr, FMT: tl.constexpr, TB: tl.constexpr
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
        tile = tl.program_id(1)
        base = w_ptr + tl.where(rows < N, rows, 0).to(tl.int64) * ((K // 256) * TB) + tile * TB
        v = _decode_tile(base, ROWS, FMT)
        col = tile * 256 + tl.arange(0, 256)[None, :]
        tl.store(out_ptr + rows.to(tl.int64) * K + col, v.to(tl.bfloat16), mask=rows < N)

    @triton.jit
    def _small_m_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        M: tl.constexpr,
        N: tl.constexpr,
        K: tl.constexpr,
        BN: tl.constexpr,
        SPLIT: tl.constexpr,
        FMT: tl.constexpr,
        TB: tl.constexpr,
    ):
        pn = tl.program_id(0)
        ps = tl.program_id(1)
        rows = pn * BN + tl.arange(0, BN)[:, None]
        i = tl.arange(0, 256)[None, :]
        m = tl.arange(0, 16)[:, None]
        base = w_ptr + tl.where(rows < N, rows, 0).to(tl.int64) * ((K // 256) * TB)
        tiles: tl.constexpr = K // 256
        per: tl.constexpr = (tiles + SPLIT - 1) // SPLIT
        acc = tl.zeros((16, BN), dtype=tl.float32)
        for t in range(ps * per, tl.minimum(ps * per + per, tiles)):
            w = _decode_tile(base + t * TB, BN, FMT).to(tl.bfloat16)
            xk = tl.load(x_ptr + m * K + t * 256 + i, mask=m < M, other=0.0).to(tl.bfloat16)
            acc += tl.dot(xk, tl.trans(w))
        cols = pn * BN + tl.arange(0, BN)[None, :]
        tl.store(out_ptr + ps * 16 * N + m * N + cols, acc, mask=(m < M) & (cols < N))


def _require() -> None:
    if not available():
        raise ImportError(
            "pallas_kernels.kquant_triton needs jax-triton and Triton: install the 'gpu' extra "
            "(pip install 'jquant[gpu]') on a CUDA machine"
        )


def kquant_decode(blocks: jax.Array, fmt: str, *, rows: int = 8, warps: int = 4) -> jax.Array:
    """``u8[N, nb, bytes]`` ggml blocks -> ``bf16[N, K]`` in one pass on the GPU."""
    _require()
    n, k = _check(blocks, fmt, "kquant_decode")
    _check_tiles(k, "kquant_decode")
    return jt.triton_call(
        blocks,
        kernel=_decode_kernel,
        out_shape=jax.ShapeDtypeStruct((n, k), jnp.bfloat16),
        grid=(_common.cdiv(n, rows), _common.cdiv(k, TILE)),
        num_warps=warps,
        num_stages=1,
        N=n,
        K=k,
        ROWS=rows,
        FMT=FORMATS[fmt],
        TB=tile_bytes(fmt),
    )


def pick_split(n: int, k: int, bn: int, sms: int) -> int:
    """K splits so that about two programs run per SM, at least one 256-value tile each."""
    tiles = _common.cdiv(k, TILE)
    programs = _common.cdiv(n, bn)
    return max(1, min(tiles, _common.cdiv(2 * sms, programs)))


def kquant_matmul_small_m(
    x: jax.Array,
    blocks: jax.Array,
    fmt: str,
    out_dtype=jnp.bfloat16,
    *,
    bn: int = 64,
    split: int | None = None,
    warps: int = 4,
    stages: int = 1,
) -> jax.Array:
    """``x [M, K] @ decode(blocks)^T`` for M <= :data:`SMALL_M_MAX`, weights decoded in registers.

    The defaults (64 rows per program, 4 warps, 1 stage) were the fastest of the tilings
    ``scripts/bench_kquant.py --sweep`` timed on an H200 for every format at M = 1 and 16."""
    _require()
    n, k = _check(blocks, fmt, "kquant_matmul_small_m")
    _check_tiles(k, "kquant_matmul_small_m")
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"kquant_matmul_small_m: x must be [M, {k}], got {list(x.shape)}")
    m = x.shape[0]
    if m > SMALL_M_MAX:
        raise ValueError(f"kquant_matmul_small_m: M={m} > {SMALL_M_MAX}; use kquant_decode + a bf16 GEMM")
    split = split or pick_split(n, k, bn, _common.num_sms())
    partial = jt.triton_call(
        x.astype(jnp.bfloat16),
        blocks,
        kernel=_small_m_kernel,
        out_shape=jax.ShapeDtypeStruct((split, 16, n), jnp.float32),
        grid=(_common.cdiv(n, bn), split),
        num_warps=warps,
        num_stages=stages,
        M=m,
        N=n,
        K=k,
        BN=bn,
        SPLIT=split,
        FMT=FORMATS[fmt],
        TB=tile_bytes(fmt),
    )
    return partial.sum(axis=0)[:m].astype(out_dtype)


def kquant_matmul(x: jax.Array, blocks: jax.Array, fmt: str, out_dtype=jnp.bfloat16) -> jax.Array:
    """``x [M, K] @ decode(blocks)^T``: the fused kernel at small M, else decode + XLA's bf16 GEMM."""
    if x.ndim == 2 and x.shape[0] <= SMALL_M_MAX:
        return kquant_matmul_small_m(x, blocks, fmt, out_dtype)
    w = kquant_decode(blocks, fmt)
    y = jax.lax.dot_general(x.astype(jnp.bfloat16), w, (((x.ndim - 1,), (1,)), ((), ())))
    return y.astype(out_dtype)


def supports(x: jax.Array, fmt: str) -> bool:
    """Hopper (or any CUDA GPU Triton compiles for), jax-triton installed, verified or forced,
    one of :data:`FORMATS`, a 2-D activation."""
    return (
        available() and fmt in FORMATS and _common.on_hopper() and _common.kernel_enabled(GPU_VERIFIED) and x.ndim == 2
    )
