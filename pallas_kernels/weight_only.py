"""Weight-only GEMMs on Hopper: int4 (W4A16) and int8 (W8A16) weights x bf16 tokens.

Layouts
-------
* ``x``: ``[M, K]`` bfloat16 activations.
* W8A16: ``w_q`` ``[N, K]`` int8 (K-major), ``w_scale`` ``[N]`` (one per output
  channel): ``y = (x @ w_q^T) * w_scale``.
* W4A16: ``w_packed`` ``[N, ceil(K/2)]`` uint8, two signed 4-bit values per byte
  along K, low nibble first::

      byte[n, j] = (q[n, 2j] & 0xF) | ((q[n, 2j + 1] & 0xF) << 4),  q in [-8, 7]

  (two's complement nibbles; this is also how XLA stores ``int4`` arrays, so the
  kernel views the bytes as ``int4[N, K]`` without moving them). ``w_scale`` is
  ``[N, ceil(K/group)]`` float32 or bfloat16, symmetric (no zero point):
  ``w[n, k] = q[n, k] * w_scale[n, k // group]``.

Paths
-----
* Small M (the GEMV shapes of modulation layers and text encoders, M <= 16):
  a Mosaic GPU kernel that computes ``Y^T = W X^T``: the narrow weights are the
  wgmma A operand, loaded from shared memory into registers and converted to
  bf16 there (int4 through Mosaic's fast 4-bit upcast), while the tokens are the
  wgmma N dimension (16..128). The K loop is split over CTAs so that every SM
  streams weights; the fp32 partial sums are reduced, scaled and transposed by
  one small XLA fusion. For W4A16 each 128-wide K step (one scale group) goes
  into a fresh accumulator that is added to the running sum times the group
  scale, so no per-weight multiply is needed.
* Large M: the weights are dequantized to bf16 once per call (one pass over
  ``N*K``) and multiplied by XLA's bf16 GEMM, whose time dominates from M ~ 1k.

:func:`prepare_w4a16` moves the int4 weights and scales into the kernel's layout
once (int4 view, scales transposed to ``[K/128, N]``, padding); a model should
do that at load time and call :func:`w4a16_matmul_prepared` per step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common, _weights, w4a16_gemm
from pallas_kernels._weights import (  # noqa: F401 (part of this module's API)
    DECODES,
    GROUP,
    TABLE_BLOCKS,
    W8_DTYPES,
    W4Prepared,
    decode_codes,
    dequantize_int4,
    dot_nt_f32,
    pack_int4,
    prepare_w4a16,
    unpack_int4,
    w4a16_matmul_reference,
    w8a16_matmul_reference,
    xla_bf16,
)

#: Largest M the kernel takes. Measured on an H200 it matches or beats dequantize + XLA bf16
#: at M <= 16 (benchmarks/kernels-weight_only-NVIDIA_H200.json); larger M were not measured, so they stay on XLA.
SMALL_M_MAX = 16
#: Largest M the kernel handles at all (``JQUANT_BACKEND=pallas`` takes it up to here).
KERNEL_M_MAX = 256
#: The small-M kernels passed scripts/check_kernels_gpu.py on an H200 (JAX 0.11.2,
#: benchmarks/check_kernels-NVIDIA_H200.txt), so they are the default for M <= SMALL_M_MAX on Hopper.
GPU_VERIFIED = True
#: The same for the decode-and-scale path (NF4 / FP4 in pallas_kernels/w4_table.py, int4 with
#: groups of 16/32/64): passed the same check. At M <= 16 it beats dequantize + XLA's bf16
#: GEMM for every format (benchmarks/table_decode_sweep-NVIDIA_H200.json), though NF4 stays
#: below XLA's bf16 GEMM on bf16 weights (docs/kernels.md).
TABLE_GPU_VERIFIED = True
#: fp8 weight-only (W8A16 with e4m3/e5m2 weights) passed check_kernels_gpu.py's ``w8a16_fp8``
#: case on an H200 (benchmarks/check_kernels-fp8-zp-NVIDIA_H200.txt); False would keep it on
#: dequantize + XLA unless forced with ``JQUANT_BACKEND=pallas``.
FP8_W16_GPU_VERIFIED = True
#: uint4 with zero points (the per-block offset in the decode-and-scale path) passed the
#: ``w4a16_zp`` case on an H200 (same log).
ZERO_POINT_GPU_VERIFIED = True
_SMEM_BUDGET = 200 * 1024  # bytes of shared memory for the pipeline stages and the output tile


# --------------------------------------------------------------------------
# Packing.
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# References.
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Kernel.
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# 4-bit codebooks (NF4, FP4 e2m1) decoded in registers.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WeightOnlyConfig:
    """Tokens per CTA (the wgmma N), split-K factor, pipeline depth, and the weight decode.

    ``decode`` is one of :data:`DECODES`; for the codebooks ("fp4", "nf4") ``block`` is the
    scale block along K (16, 32, 64 or 128), applied to the decoded bf16 weights in
    registers before the wgmma (exact for e8m0 and e4m3 block scales).
    """

    tokens: int
    splits: int
    stages: int
    decode: str = "int"
    block: int = GROUP
    kstep: int = GROUP  # K per pipeline step (a multiple of 128)


def _pick_config(
    m: int,
    n: int,
    k_steps: int,
    sms: int,
    bits: int,
    decode: str = "int",
    block: int = GROUP,
    kstep: int | None = None,
    offsets: bool = False,
) -> WeightOnlyConfig:
    """Tokens, split-K and stages for ``k_steps`` 128-wide K steps; ``kstep`` K per pipeline
    step (lowered to the largest power-of-two multiple of 128 that divides each split's K).

    Default kstep (scripts/sweep_table_decode.py, H200, M=1, 3072x12288): int4 with 128-wide
    groups 512 (13.1 us vs 14.8 at 128), everything else 256 (int8 15.7 vs 16.7; at 512 the
    stages no longer fit and it was no faster; fp4/nf4 gain under 5%).
    """
    if kstep is None:
        kstep = 4 * GROUP if (bits, decode, block) == (4, "int", GROUP) else 2 * GROUP
    tokens = 16
    while tokens < min(m, 128):
        tokens *= 2
    tiles = _common.cdiv(n, 2 * _weights.WT) * _common.cdiv(m, tokens)
    # One wave: split K so that the CTAs just fill the SMs. A second wave cost more than the
    # extra splits gained in scripts/sweep_weight_only.py (H200: 3072x3072 at M=1 5.7 us with
    # 96 CTAs, 7.4 us with 192), and each CTA's K loop is latency-bound, not bandwidth-bound.
    want = max(1, sms // tiles)
    splits = max(d for d in range(1, k_steps + 1) if k_steps % d == 0 and d <= want)
    out_bytes = 2 * _weights.WT * tokens * 4

    def stage_bytes(kstep):
        tables = 2 if offsets else 1
        return (
            2 * _weights.WT * kstep * bits // 8 + tokens * kstep * 2 + tables * (kstep // block) * 2 * _weights.WT * 4
        )

    # Two stages at least must fit (with 128 tokens a 512-wide step does not).
    while kstep > GROUP and (
        (k_steps // splits) % (kstep // GROUP) or 2 * stage_bytes(kstep) > _SMEM_BUDGET - out_bytes
    ):
        kstep //= 2
    # 4 stages were as fast as 8 in the sweep and leave shared memory for a second CTA per SM.
    stages = int(max(2, min(4, (_SMEM_BUDGET - out_bytes) // stage_bytes(kstep))))
    return WeightOnlyConfig(tokens=tokens, splits=splits, stages=stages, decode=decode, block=block, kstep=kstep)


# jit: every call site with the same shapes and config shares one lowered kernel (a model's
# repeated layers lower it once instead of once per layer: minutes of compile time).
@functools.partial(jax.jit, static_argnames=("config",))
def weight_only_pallas(
    w: jax.Array,
    x: jax.Array,
    s_t: jax.Array | None,
    o_t: jax.Array | None = None,
    *,
    config: WeightOnlyConfig,
) -> jax.Array:
    """Split-K ``Y^T = W X^T`` partial sums, ``f32[splits, N, M]``.

    ``w`` is ``int8[N, K]`` or ``int4[N, K]`` (N a multiple of 128, K of 128), ``x``
    is ``bf16[M, K]`` (M a multiple of ``config.tokens``) and ``s_t`` the int4 group
    scales transposed to ``f32[K/128, N]`` (None for int8, whose per-channel scale
    is applied outside), or for the codebooks the block scales ``f32[K/block, N]``. ``o_t``
    (same shape) adds a per-block offset after the scale, ``w = q * s + o``: zero points
    (uint4 ``(u - z) * s`` stored as ``q = u - 8``, ``o = (8 - z) * s``).
    """
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

    cfg = config
    n, k = w.shape
    m = x.shape[0]
    bits = 4 if w.dtype == jnp.int4 else 8
    t = cfg.tokens
    cta_w = 2 * _weights.WT
    n_iters, m_iters = n // cta_w, m // t
    k_steps = k // GROUP
    ks = k_steps // cfg.splits
    sub = cfg.kstep // GROUP
    if cfg.kstep % GROUP or ks % sub:
        raise ValueError(
            f"weight_only_pallas: kstep {cfg.kstep} must be a multiple of {GROUP} dividing the {ks * GROUP} K per split"
        )
    w_swizzle = GROUP * bits // 8
    w_transforms = (plgpu.TilingTransform((8, GROUP)), plgpu.SwizzleTransform(w_swizzle))
    # The decode-and-scale path: codebooks, and int4 with scale blocks other than 128.
    table = cfg.decode != "int" or (bits == 4 and cfg.block != GROUP) or o_t is not None
    blk = cfg.block if table else GROUP
    x_tile = min(64, blk)  # B slices of one scale block must start on a tile
    x_transforms = (plgpu.TilingTransform((8, x_tile)), plgpu.SwizzleTransform(2 * x_tile))
    out_swizzle = plgpu.find_swizzle(t * 32, "out")
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // 4)), plgpu.SwizzleTransform(out_swizzle))
    a_layout = plgpu.Layout.WGMMA_UPCAST_4X if bits == 4 else plgpu.Layout.WGMMA_UPCAST_2X
    grouped = s_t is not None

    def kernel(*refs, out_smem):
        o_gmem = None
        if o_t is not None:
            w_gmem, x_gmem, s_gmem, o_gmem, out_gmem = refs
        elif grouped:
            w_gmem, x_gmem, s_gmem, out_gmem = refs
        else:
            w_gmem, x_gmem, out_gmem = refs
            s_gmem = None
        ni = lax.axis_index("n")
        si = lax.axis_index("s")
        mi = lax.axis_index("m")
        wg = lax.axis_index("wg")
        k0 = si * ks

        def load_a(w_smem, j):
            # Wide smem loads in the upcast layout, a register shuffle into the wgmma
            # layout while the values are still narrow, then the convert to bf16.
            a = plgpu.load(
                w_smem.at[pl.ds(wg * _weights.WT, _weights.WT), pl.ds(j * GROUP, GROUP)], (), layout=a_layout
            )
            a = plgpu.layout_cast(a, plgpu.Layout.WGMMA)
            if jnp.issubdtype(w.dtype, jnp.floating):  # fp8: Hopper converts it to f16 (exact), not bf16
                a = a.astype(jnp.float16)
            return a.astype(jnp.bfloat16)

        def x_t(x_smem, start, size):
            return plgpu.transpose_ref(x_smem.at[:, pl.ds(start, size)], (1, 0))

        def row_scale(s_ref, row, dtype):
            return plgpu.load(
                s_ref.at[row, pl.ds(wg * _weights.WT, _weights.WT)], (), layout=plgpu.Layout.WGMMA.reduce(1)
            ).astype(dtype)

        def body(_, w_smem, x_smem, *rest):
            # ``sub`` 128-wide K slices per pipeline step: their loads, converts and wgmmas are
            # independent, so they overlap, with one wgmma wait per step.
            *s_smem, acc = rest
            if table:
                # Decode, scale each K block of the weights in bf16, one wgmma per block into
                # the same accumulator.
                for j in range(sub):
                    a = decode_codes(load_a(w_smem, j), cfg.decode)
                    for c in range(GROUP // blk):
                        row = j * (GROUP // blk) + c
                        scale = row_scale(s_smem[0], row, jnp.bfloat16)
                        a_c = a if blk == GROUP else a[:, c * blk : (c + 1) * blk]
                        a_c = a_c * lax.broadcast_in_dim(scale, (_weights.WT, blk), [0])
                        if o_gmem is not None:
                            offset = row_scale(s_smem[1], row, jnp.bfloat16)
                            a_c = a_c + lax.broadcast_in_dim(offset, (_weights.WT, blk), [0])
                        plgpu.wgmma(acc, a_c, x_t(x_smem, j * GROUP + c * blk, blk))
                plgpu.wgmma_wait(0)
                return acc
            if not grouped:
                for j in range(sub):
                    plgpu.wgmma(acc, load_a(w_smem, j), x_t(x_smem, j * GROUP, GROUP))
                plgpu.wgmma_wait(0)
                return acc

            # int4 with 128-wide groups: each group's product in its own fp32 accumulator,
            # added to the running sum times the group scale (no per-weight multiply).
            def group_products(*tmp_refs):
                for j, tmp_ref in enumerate(tmp_refs):
                    plgpu.wgmma(tmp_ref, load_a(w_smem, j), x_t(x_smem, j * GROUP, GROUP))
                return [tmp_ref[...] for tmp_ref in tmp_refs]

            parts = pl.run_scoped(group_products, *[plgpu.ACC((_weights.WT, t), jnp.float32) for _ in range(sub)])
            for j, part in enumerate(parts):
                scale = row_scale(s_smem[0], j, jnp.float32)
                acc = acc + part * lax.broadcast_in_dim(scale, (_weights.WT, t), [0])
            return acc

        def store(y):
            out_smem[wg] = y
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(
                out_smem.at[wg], out_gmem.at[si, pl.ds(ni * cta_w + wg * _weights.WT, _weights.WT), pl.ds(mi * t, t)]
            )
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        def compute_context(eval_pipeline):
            if grouped and not table:
                zeros = plgpu.layout_cast(jnp.full((_weights.WT, t), 0.0, jnp.float32), plgpu.Layout.WGMMA)
                store(eval_pipeline(zeros))
            else:

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((_weights.WT, t), jnp.float32))
                def _acc_scope(acc_ref):
                    eval_pipeline(acc_ref)
                    store(acc_ref[...])

        in_specs = [
            plgpu.BlockSpec((cta_w, cfg.kstep), lambda kk: (0, kk), transforms=w_transforms, memory_space=plgpu.SMEM),
            plgpu.BlockSpec((t, cfg.kstep), lambda kk: (0, kk), transforms=x_transforms, memory_space=plgpu.SMEM),
        ]
        operands = [
            w_gmem.at[pl.ds(ni * cta_w, cta_w), pl.ds(k0 * GROUP, ks * GROUP)],
            x_gmem.at[pl.ds(mi * t, t), pl.ds(k0 * GROUP, ks * GROUP)],
        ]
        # Scale (and offset) tables: this split's rows of blocks, this CTA's 128 columns.
        for table_gmem in (s_gmem, o_gmem):
            if table_gmem is None:
                continue
            in_specs.append(plgpu.BlockSpec((cfg.kstep // blk, cta_w), lambda kk: (kk, 0), memory_space=plgpu.SMEM))
            operands.append(table_gmem.at[pl.ds(k0 * (GROUP // blk), ks * (GROUP // blk)), pl.ds(ni * cta_w, cta_w)])
        pipeline = plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(ks // sub,),
            memory_registers=40,
            in_specs=in_specs,
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=min(cfg.stages, ks // sub),
            compute_context=compute_context,
        )
        pipeline(*operands)

    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((cfg.splits, n, m), jnp.float32),
        grid=(n_iters, cfg.splits, m_iters),
        grid_names=("n", "s", "m"),
        num_threads=3,
        thread_name="wg",
        scratch_types=dict(
            out_smem=plgpu.SMEM((2, _weights.WT, t), jnp.float32, transforms=out_transforms),
        ),
    )
    args = (w, x) + ((s_t,) if grouped else ()) + ((o_t,) if o_t is not None else ())
    return call(*args)


def _small_m_gemm(w, x, s_t, n, bits, sms, decode="int", block=GROUP, o_t=None):
    """Pads ``x``, runs the kernel, reduces splits; returns ``f32[M, N]`` (unscaled for int8)."""
    m, k = x.shape
    kp = w.shape[1]
    cfg = _pick_config(m, w.shape[0], kp // GROUP, sms, bits, decode, block, offsets=o_t is not None)
    mp = _common.round_up(m, cfg.tokens)
    xp = _common.pad_axis(_common.pad_axis(x.astype(jnp.bfloat16), 1, kp), 0, mp)
    parts = weight_only_pallas(w, xp, s_t, o_t, config=cfg)
    return parts.sum(axis=0)[:n, :m].T


# --------------------------------------------------------------------------
# Public wrappers.
# --------------------------------------------------------------------------


def supports(x: jax.Array, group_size: int = GROUP, decode: str = "int") -> bool:
    """True where the small-M weight-only kernel runs (Hopper, 2-D, M <= SMALL_M_MAX or, forced
    by ``JQUANT_BACKEND=pallas``, KERNEL_M_MAX; group 128 for int4, a block of
    :data:`TABLE_BLOCKS` for the codebooks; verified on the GPU or forced with
    ``JQUANT_BACKEND=pallas``)."""
    verified = GPU_VERIFIED if (decode, group_size) == ("int", GROUP) else TABLE_GPU_VERIFIED
    if not _common.on_hopper() or not _common.kernel_enabled(verified):
        return False
    m_max = KERNEL_M_MAX if _common.forced_mode() == "kernel" else SMALL_M_MAX
    return x.ndim == 2 and 0 < x.shape[0] <= m_max and x.shape[1] > 0 and group_size in TABLE_BLOCKS


def w4a16_matmul_prepared(
    x: jax.Array,
    prepared: W4Prepared,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
    """W4A16 on weights from :func:`prepare_w4a16` (the per-step call of a model)."""
    _common.check_rank("w4a16_matmul: x", x, 2)
    if x.shape[1] != prepared.k:
        raise ValueError(f"w4a16_matmul: x has K={x.shape[1]} but the weights were prepared for K={prepared.k}")
    _weights.check_bias("w4a16_matmul", bias, prepared.n)
    zero_ok = prepared.o_t is None or _common.kernel_enabled(ZERO_POINT_GPU_VERIFIED)
    if supports(x, prepared.block, prepared.decode) and zero_ok:
        y = _small_m_gemm(
            prepared.w, x, prepared.s_t, prepared.n, 4, _common.num_sms(), prepared.decode, prepared.block, prepared.o_t
        )
        return _weights.finish(y, bias, out_dtype)

    if w4a16_gemm.supports(x, prepared.block, prepared.decode, prepared.o_t is not None, prepared.n):
        return w4a16_gemm.w4a16_large_m(x, prepared, bias, out_dtype)
    return xla_bf16(x, dequantize_prepared(prepared), bias, out_dtype)


def dequantize_prepared(prepared: W4Prepared) -> jax.Array:
    """``bf16[N, K]`` weights from the kernel layout (the large-M path's one pass)."""
    w = decode_codes(prepared.w.astype(jnp.float32), prepared.decode)
    w = w * jnp.repeat(prepared.s_t.T, prepared.block, axis=1)
    if prepared.o_t is not None:
        w = w + jnp.repeat(prepared.o_t.T, prepared.block, axis=1)
    return w[: prepared.n, : prepared.k].astype(jnp.bfloat16)


def w4a16_matmul(
    x: jax.Array,
    w_packed: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    *,
    group_size: int = GROUP,
) -> jax.Array:
    """W4A16 GEMM ``bf16[M,K] x int4[N,K]^T -> [M,N]`` (symmetric, per-group scales).

    Small M on Hopper: the Mosaic GPU kernel (after :func:`prepare_w4a16`); large M with
    128-wide groups: :mod:`pallas_kernels.w4a16_gemm` (dequantized in registers) where verified.
    Otherwise on a GPU: dequantize to bf16 and XLA's bf16 GEMM. Off GPU:
    :func:`w4a16_matmul_reference`.
    """
    _weights.check_w4(x, w_packed, w_scale, group_size)
    _weights.check_bias("w4a16_matmul", bias, w_packed.shape[0])
    if not _common.on_hopper():
        return w4a16_matmul_reference(x, w_packed, w_scale, bias, out_dtype, group_size=group_size)

    if not (supports(x, group_size) or w4a16_gemm.supports(x, group_size, n=w_packed.shape[0])):
        w_bf16 = dequantize_int4(w_packed, w_scale, x.shape[1], group_size, jnp.bfloat16)
        return xla_bf16(x, w_bf16, bias, out_dtype)
    prepared = prepare_w4a16(w_packed, w_scale, x.shape[1], group_size)
    return w4a16_matmul_prepared(x, prepared, bias, out_dtype)


def w8a16_matmul(
    x: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
    """W8A16 GEMM ``bf16[M,K] x int8/fp8[N,K]^T -> [M,N]`` with per-channel scales.

    Small M on Hopper: the Mosaic GPU kernel; large M, int8: :mod:`pallas_kernels.w4a16_gemm`
    (widened in registers) where verified. Otherwise on a GPU: 8-bit -> bf16 and XLA's bf16
    GEMM (the scale applied to the fp32 result). Off GPU: the reference.
    """
    _weights.check_w8(x, w_q, w_scale)
    n, k = w_q.shape
    _weights.check_bias("w8a16_matmul", bias, n)
    if not _common.on_hopper():
        return w8a16_matmul_reference(x, w_q, w_scale, bias, out_dtype)
    fp8_ok = w_q.dtype == jnp.int8 or _common.kernel_enabled(FP8_W16_GPU_VERIFIED)
    if not (supports(x) and fp8_ok):
        if w_q.dtype == jnp.int8 and w4a16_gemm.supports(x, n=n, bits=8):
            return w4a16_gemm.w8a16_large_m(x, w_q, w_scale, bias, out_dtype)
        return xla_bf16(x, w_q.astype(jnp.bfloat16), bias, out_dtype, w_scale)
    kp = _common.round_up(k, GROUP)
    np_ = _common.round_up(n, 2 * _weights.WT)
    w = _common.pad_axis(_common.pad_axis(w_q, 1, kp), 0, np_)
    y = _small_m_gemm(w, x, None, n, 8, _common.num_sms())
    y = y * w_scale.reshape(1, -1).astype(jnp.float32)
    return _weights.finish(y, bias, out_dtype)
