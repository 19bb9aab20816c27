"""W8A8 GEMMs on Hopper: int8 and fp8 (e4m3) operands, scales in the epilogue.

Layouts (all K-major, as Hopper's 8-bit wgmma requires):

* ``x_q``: ``[M, K]`` int8 or float8_e4m3fn, one row per token.
* ``x_scale``: ``[M, 1]`` (or ``[M]``) float32, one scale per token.
* ``w_q``: ``[N, K]`` same dtype as ``x_q``, one row per output channel.
* ``w_scale``: ``[N]`` float32, one scale per output channel.
* ``bias``: ``[N]`` float32 or None.

``y[m, n] = (sum_k x_q[m, k] * w_q[n, k]) * x_scale[m] * w_scale[n] + bias[n]``,
accumulated exactly in int32 (int8) or in fp32 (fp8), cast to ``out_dtype``.

The kernel is a persistent, warp-specialized Mosaic GPU GEMM: one producer
warpgroup streams ``[tile, 128]`` operand slabs through a multi-stage TMA
pipeline into swizzled shared memory, two consumer warpgroups each own a
``tile_m x tile_n`` accumulator in registers fed by wgmma, and the epilogue
applies the per-token and per-channel scales and the bias in registers before a
TMA store. Rows beyond ``M`` are read as zeros and never written (TMA bounds);
``K`` is padded to a multiple of 128, ``M`` to 8 and ``N`` to 64 in the wrapper
where needed (TMA tiles the minor dimension); real DiT shapes need no copy.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common, _quant, fused_producers

_INT8 = jnp.dtype(jnp.int8)
_FP8 = jnp.dtype(jnp.float8_e4m3fn)


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tiling of the warp-specialized 8-bit GEMM.

    ``tile_m x tile_n`` is one consumer warpgroup's accumulator; the two consumer
    warpgroups stack along ``wg_dim`` so the CTA computes twice that. ``tile_k``
    counts elements (bytes for 8-bit types) and must be 128 so one operand row
    fills one 128-byte swizzle line.
    """

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    stages: int = 4
    wg_dim: str = "n"
    grid_minor: str = "n"
    grid_tile_width: int = 8
    epi_m: int = 64
    epi_n: int = 32

    @property
    def cta_m(self) -> int:
        return self.tile_m * (2 if self.wg_dim == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (2 if self.wg_dim == "n" else 1)


DEFAULT_CONFIG = GemmConfig()
_SMEM_BYTES = 220 * 1024  # of the 227 KiB a Hopper CTA may use, leaving room for barriers and alignment


def _pick_config(m: int, n: int) -> GemmConfig:
    """Heuristic tiling: wide-N CTAs for large problems, narrow ones when N is small."""
    del m
    if n <= 128:
        return GemmConfig(wg_dim="m", tile_n=64)
    return DEFAULT_CONFIG


# --------------------------------------------------------------------------
# References.
# --------------------------------------------------------------------------


def _scaled_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype, acc_dtype):
    acc = lax.dot_general(x_q, w_q, (((1,), (1,)), ((), ())), preferred_element_type=acc_dtype).astype(jnp.float32)
    y = acc * x_scale.reshape(-1, 1).astype(jnp.float32)
    y = y * w_scale.reshape(1, -1).astype(jnp.float32)
    if bias is not None:
        y = y + bias.reshape(1, -1).astype(jnp.float32)
    return y.astype(out_dtype)


def int8_matmul_reference(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
    """Plain-JAX W8A8 int8 GEMM: exact int32 accumulation, scales, bias."""
    _check_operands("int8_matmul", x_q, x_scale, w_q, w_scale, bias, (_INT8,))
    return _scaled_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype, jnp.int32)


def fp8_matmul_reference(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
    """Plain-JAX W8A8 fp8 (e4m3) GEMM: fp32 accumulation, scales, bias."""
    _check_operands("fp8_matmul", x_q, x_scale, w_q, w_scale, bias, (_FP8,))
    return _scaled_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype, jnp.float32)


def _check_operands(name, x_q, x_scale, w_q, w_scale, bias, dtypes):
    _common.check_rank(f"{name}: x_q", x_q, 2)
    _common.check_rank(f"{name}: w_q", w_q, 2)
    _common.check_dtype(f"{name}: x_q", x_q, dtypes)
    if w_q.dtype != x_q.dtype:
        raise ValueError(f"{name}: w_q dtype {w_q.dtype} must equal x_q dtype {x_q.dtype}")
    m, k = x_q.shape
    n, k2 = w_q.shape
    if k != k2:
        raise ValueError(f"{name}: x_q is [M, K]={x_q.shape} and w_q must be [N, K] (K-major), got {w_q.shape}")
    if x_scale.size != m:
        raise ValueError(f"{name}: x_scale must hold one scale per token ({m}), got shape {x_scale.shape}")
    if w_scale.size != n:
        raise ValueError(f"{name}: w_scale must hold one scale per output channel ({n}), got shape {w_scale.shape}")
    if bias is not None and bias.size != n:
        raise ValueError(f"{name}: bias must have {n} entries, got {bias.shape}")


# --------------------------------------------------------------------------
# Kernel.
# --------------------------------------------------------------------------


def _swizzled(swizzle: int, elem_bytes: int):
    import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

    return (
        plgpu.TilingTransform((8, swizzle // elem_bytes)),
        plgpu.SwizzleTransform(swizzle),
    )


def _load_vector(ref, reduced_dim: int, interpret):
    """Loads a per-row (``reduced_dim=1``) or per-column vector in the wgmma layout."""
    import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

    if interpret is not None:  # The CPU interpreter has no layouts.
        return ref[...]
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(reduced_dim))


def store_tile(y, out_smem, out_gmem, row0, col0, epi_m: int, epi_n: int, piece=None):
    """Writes a register tile to ``out_gmem[row0:, col0:]`` through SMEM in TMA pieces.

    ``out_smem`` is ``[slots, epi_m, epi_n]``; pieces alternate between slots so one
    TMA store is in flight while the next piece is written. Rows or columns past
    the array's end are dropped by the TMA unit. ``piece(ei, ej, y_piece)``, when given,
    maps each piece before it is written (the SVDQuant epilogue adds its low-rank term).
    """
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

    tile_m, tile_n = y.shape
    num_slots = out_smem.shape[0]
    count_n = tile_n // epi_n
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for ei in range(tile_m // epi_m):
        for ej in range(count_n):
            slot = (ei * count_n + ej) % num_slots
            plgpu.wait_smem_to_gmem(num_slots - 1, wait_read_only=True)
            y_piece = y[ei * epi_m : (ei + 1) * epi_m, ej * epi_n : (ej + 1) * epi_n]
            out_smem[slot] = y_piece if piece is None else piece(ei, ej, y_piece)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(
                out_smem.at[slot], out_gmem.at[pl.ds(row0 + ei * epi_m, epi_m), pl.ds(col0 + ej * epi_n, epi_n)]
            )


def persistent_tiles(
    x_gmem,
    w_gmem,
    x_spec,
    w_spec,
    *,
    k_iters: int,
    stages: int,
    grid_mn: tuple[int, int],
    minor: int,
    tile_width: int,
    tile,
) -> None:
    """The persistent, warp-specialized skeleton both 8-bit GEMMs share.

    One producer warpgroup streams ``x_spec`` / ``w_spec`` K slabs through a ``stages``-deep TMA
    pipeline for two consumer warpgroups; the CTA walks the ``grid_mn`` output tiles in snake
    order (``plgpu.planar_snake``). ``tile(mi, ni)`` returns ``(body, compute_context, x_tile,
    w_tile)`` for one output tile: the pipeline body, its compute context and the gmem rows of
    x and w the tile reads.
    """
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40,
            in_specs=[x_spec, w_spec],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=stages,
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped, allocs=pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem), collective_axes="wg"
    )
    def _scope(allocs):
        @plgpu.nd_loop((grid_mn[0] * grid_mn[1],), collective_axes="sm")
        def _tile_loop(info):
            (lin,) = info.index
            mi, ni = plgpu.planar_snake(lin, grid_mn, minor, tile_width)
            body, compute_context, x_tile, w_tile = tile(mi, ni)
            pipeline(body, compute_context)(x_tile, w_tile, allocations=allocs)


# jit: every call site with the same shapes and config shares one lowered kernel (a model's
# repeated layers lower it once instead of once per layer: minutes of compile time).
@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "sms", "interpret"))
def scaled_gemm_pallas(
    x: jax.Array,
    w: jax.Array,
    xs: jax.Array,
    wsb: jax.Array,
    h: jax.Array | None = None,
    l2t: jax.Array | None = None,
    *,
    out_dtype,
    config: GemmConfig,
    sms: int,
    interpret=None,
) -> jax.Array:
    """Runs the Mosaic GPU kernel on prepared operands.

    ``x`` is ``[M, K]``, ``w`` is ``[N, K]`` (8-bit; K a multiple of 128, M of 8,
    N of 64),
    ``xs`` is ``[M]`` float32 and ``wsb`` is ``[2, N]`` float32 holding the
    per-channel scale (row 0) and bias (row 1). Returns ``[M, N]`` of ``out_dtype``.

    SVDQuant: with ``h = x @ L1`` (``bf16[M, r]``) and ``l2t = L2^T`` (``bf16[N, r]``, r a
    multiple of 16 up to 64) the epilogue adds ``h @ L2`` to each output piece with one small
    bf16 wgmma (64 x 32 x r) before it is stored: no second pass over the output.
    """
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

    cfg = config
    m, k = x.shape
    n = w.shape[0]
    acc_dtype = jnp.int32 if x.dtype == _INT8 else jnp.float32
    cta_m, cta_n = cfg.cta_m, cfg.cta_n
    m_iters = _common.cdiv(m, cta_m)
    n_iters = _common.cdiv(n, cta_n)
    k_iters = _common.cdiv(k, cfg.tile_k)
    swizzle = plgpu.find_swizzle(cfg.tile_k * 8, "operands")
    in_transforms = _swizzled(swizzle, 1)
    out_bytes = jnp.dtype(out_dtype).itemsize
    out_swizzle = plgpu.find_swizzle(cfg.epi_n * out_bytes * 8, "out")
    out_transforms = _swizzled(out_swizzle, out_bytes)
    minor = 1 if cfg.grid_minor == "n" else 0
    epi_m_count = cfg.tile_m // cfg.epi_m
    epi_n_count = cfg.tile_n // cfg.epi_n
    num_slots = min(2, epi_m_count * epi_n_count)

    lowrank = h is not None
    rank = h.shape[1] if lowrank else 0
    if lowrank and (rank % 16 or rank > 64 or l2t is None or l2t.shape[1] != rank):
        raise ValueError(
            f"scaled_gemm_pallas: h [M, r] and l2t [N, r] need one rank r, a multiple"
            f" of 16 up to 64; got {h.shape} and {None if l2t is None else l2t.shape}"
        )
    lr_transforms = _swizzled(2 * rank, 2) if lowrank else None

    def kernel(*refs, out_smem, xs_smem, wsb_smem, scale_bar, h_smem=None, l2_smem=None):
        if lowrank:
            x_gmem, w_gmem, xs_gmem, wsb_gmem, h_gmem, l2t_gmem, out_gmem = refs
        else:
            x_gmem, w_gmem, xs_gmem, wsb_gmem, out_gmem = refs

        wg = lax.axis_index("wg")

        def tile(mi, ni):
            if cfg.wg_dim == "m":
                row0 = mi * cta_m + wg * cfg.tile_m
                col0 = ni * cta_n
                wg_m_slice, wg_n_slice = pl.ds(wg * cfg.tile_m, cfg.tile_m), slice(None)
            else:
                row0 = mi * cta_m
                col0 = ni * cta_n + wg * cfg.tile_n
                wg_m_slice, wg_n_slice = slice(None), pl.ds(wg * cfg.tile_n, cfg.tile_n)

            def compute_context(eval_pipeline):
                # Scales travel while the main loop runs; they are waited on after it.
                plgpu.copy_gmem_to_smem(xs_gmem.at[pl.ds(row0, cfg.tile_m)], xs_smem.at[wg], scale_bar.at[2 * wg])
                plgpu.copy_gmem_to_smem(
                    wsb_gmem.at[:, pl.ds(col0, cfg.tile_n)], wsb_smem.at[wg], scale_bar.at[2 * wg + 1]
                )
                if lowrank:
                    plgpu.copy_gmem_to_smem(h_gmem.at[pl.ds(row0, cfg.tile_m)], h_smem.at[wg], scale_bar.at[4 + 2 * wg])
                    plgpu.copy_gmem_to_smem(
                        l2t_gmem.at[pl.ds(col0, cfg.tile_n)], l2_smem.at[wg], scale_bar.at[5 + 2 * wg]
                    )

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((cfg.tile_m, cfg.tile_n), acc_dtype))
                def _acc_scope(acc_ref):
                    eval_pipeline(acc_ref)
                    plgpu.barrier_wait(scale_bar.at[2 * wg])
                    plgpu.barrier_wait(scale_bar.at[2 * wg + 1])
                    row_scale = _load_vector(xs_smem.at[wg], 1, interpret)
                    col_scale = _load_vector(wsb_smem.at[wg, 0], 0, interpret)
                    col_bias = _load_vector(wsb_smem.at[wg, 1], 0, interpret)
                    shape = (cfg.tile_m, cfg.tile_n)
                    y = acc_ref[...].astype(jnp.float32)
                    y = y * lax.broadcast_in_dim(row_scale, shape, [0])
                    y = y * lax.broadcast_in_dim(col_scale, shape, [1])
                    y = y + lax.broadcast_in_dim(col_bias, shape, [1])
                    if not lowrank:
                        store_tile(y.astype(out_dtype), out_smem.at[wg], out_gmem, row0, col0, cfg.epi_m, cfg.epi_n)
                        return
                    plgpu.barrier_wait(scale_bar.at[4 + 2 * wg])
                    plgpu.barrier_wait(scale_bar.at[5 + 2 * wg])

                    def add_lowrank(ei, ej, y_piece):
                        def product(lr_ref):
                            plgpu.wgmma(
                                lr_ref,
                                h_smem.at[wg, pl.ds(ei * cfg.epi_m, cfg.epi_m)],
                                plgpu.transpose_ref(l2_smem.at[wg, pl.ds(ej * cfg.epi_n, cfg.epi_n)], (1, 0)),
                            )
                            return lr_ref[...]

                        lr = pl.run_scoped(product, plgpu.ACC((cfg.epi_m, cfg.epi_n), jnp.float32))
                        return (y_piece + lr).astype(out_dtype)

                    store_tile(y, out_smem.at[wg], out_gmem, row0, col0, cfg.epi_m, cfg.epi_n, piece=add_lowrank)

            def mma_body(_, a_smem, b_smem, acc_ref):
                plgpu.wgmma(acc_ref, a_smem.at[wg_m_slice], plgpu.transpose_ref(b_smem.at[wg_n_slice], (1, 0)))
                plgpu.wgmma_wait(0)
                return acc_ref

            return (
                mma_body,
                compute_context,
                x_gmem.at[pl.ds(mi * cta_m, cta_m), :],
                w_gmem.at[pl.ds(ni * cta_n, cta_n), :],
            )

        persistent_tiles(
            x_gmem,
            w_gmem,
            plgpu.BlockSpec((cta_m, cfg.tile_k), lambda kk: (0, kk), transforms=in_transforms, memory_space=plgpu.SMEM),
            plgpu.BlockSpec((cta_n, cfg.tile_k), lambda kk: (0, kk), transforms=in_transforms, memory_space=plgpu.SMEM),
            k_iters=k_iters,
            stages=cfg.stages,
            grid_mn=(m_iters, n_iters),
            minor=minor,
            tile_width=cfg.grid_tile_width,
            tile=tile,
        )
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(sms,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        interpret=interpret,
        scratch_types=dict(
            out_smem=plgpu.SMEM((2, num_slots, cfg.epi_m, cfg.epi_n), out_dtype, transforms=out_transforms),
            xs_smem=plgpu.SMEM((2, cfg.tile_m), jnp.float32),
            wsb_smem=plgpu.SMEM((2, 2, cfg.tile_n), jnp.float32),
            scale_bar=plgpu.Barrier(num_barriers=8 if lowrank else 4),
            **(
                dict(
                    h_smem=plgpu.SMEM((2, cfg.tile_m, rank), jnp.bfloat16, transforms=lr_transforms),
                    l2_smem=plgpu.SMEM((2, cfg.tile_n, rank), jnp.bfloat16, transforms=lr_transforms),
                )
                if lowrank
                else {}
            ),
        ),
    )
    return call(x, w, xs, wsb, *((h, l2t) if lowrank else ()))


def _prepare(x_q, x_scale, w_q, w_scale, bias, config: GemmConfig):
    """Pads operands so TMA strides are 16-byte aligned and tiles never exceed arrays."""
    m, k = x_q.shape
    n = w_q.shape[0]
    # TMA tiles the minor dimension of every operand: K must be a multiple of the
    # 128-byte swizzle line, rows a multiple of 8 and N of the output tile width.
    kp = _common.round_up(k, config.tile_k)
    mp = max(_common.round_up(m, 8), config.cta_m)
    np_ = max(_common.round_up(n, 64), config.cta_n)
    x = _common.pad_axis(_common.pad_axis(x_q, 1, kp), 0, mp)
    w = _common.pad_axis(_common.pad_axis(w_q, 1, kp), 0, np_)
    xs = _common.pad_axis(x_scale.reshape(-1).astype(jnp.float32), 0, _common.round_up(mp, config.cta_m))
    bias_row = jnp.zeros((n,), jnp.float32) if bias is None else bias.reshape(-1).astype(jnp.float32)
    wsb = jnp.stack([w_scale.reshape(-1).astype(jnp.float32), bias_row])
    wsb = _common.pad_axis(wsb, 1, _common.round_up(np_, config.cta_n))
    return x, w, xs, wsb, (m, n)


#: Both W8A8 kernels passed scripts/check_kernels_gpu.py on an H100 (JAX 0.11.2),
#: see benchmarks/check_kernels-NVIDIA_H100_80GB_HBM3.txt.
GPU_VERIFIED = True


def supports(x_q: jax.Array, w_q: jax.Array, out_dtype=jnp.bfloat16) -> bool:
    """True where the Mosaic GPU W8A8 kernel applies (Hopper, int8/e4m3, 2-D)."""
    if not _common.on_hopper() or not _common.kernel_enabled(GPU_VERIFIED):
        return False
    if x_q.ndim != 2 or w_q.ndim != 2 or x_q.shape[1] != w_q.shape[1]:
        return False
    if jnp.dtype(x_q.dtype) not in (_INT8, _FP8) or w_q.dtype != x_q.dtype:
        return False
    if jnp.dtype(out_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    return min(x_q.shape) > 0 and w_q.shape[0] > 0


def _scaled_matmul(name, reference, x_q, x_scale, w_q, w_scale, bias, out_dtype, config, lowrank=None):
    _check_operands(name, x_q, x_scale, w_q, w_scale, bias, (_INT8, _FP8))
    if not supports(x_q, w_q, out_dtype):
        y = reference(x_q, x_scale, w_q, w_scale, bias, jnp.float32 if lowrank else out_dtype)
        if lowrank is None:
            return y
        h, l2t = lowrank
        return (y + lax.dot_general(h, l2t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)).astype(
            out_dtype
        )
    cfg = config or _pick_config(x_q.shape[0], w_q.shape[0])
    x, w, xs, wsb, (m, n) = _prepare(x_q, x_scale, w_q, w_scale, bias, cfg)
    lr = ()
    if lowrank is not None:
        h, l2t = lowrank
        # The low-rank tiles take shared memory from the pipeline: keep the most stages that fit.
        lr_bytes = 2 * (cfg.tile_m + cfg.tile_n) * h.shape[1] * 2 + 4 * cfg.epi_m * cfg.epi_n * 2
        fit = (_SMEM_BYTES - lr_bytes) // ((cfg.cta_m + cfg.cta_n) * cfg.tile_k)
        cfg = dataclasses.replace(cfg, stages=int(max(2, min(cfg.stages, fit))))
        lr = (
            _common.pad_axis(h.astype(jnp.bfloat16), 0, xs.shape[0]),
            _common.pad_axis(l2t.astype(jnp.bfloat16), 0, wsb.shape[1]),
        )
    y = scaled_gemm_pallas(x, w, xs, wsb, *lr, out_dtype=out_dtype, config=cfg, sms=_common.num_sms())
    return y[:m, :n]


def int8_matmul(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    *,
    config: GemmConfig | None = None,
    lowrank: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """W8A8 int8 GEMM ``[M,K] x [N,K]^T -> [M,N]``; kernel on Hopper, reference elsewhere.

    ``lowrank=(h, l2t)`` (``[M, r]``, ``[N, r]``) adds ``h @ l2t^T`` in the epilogue (SVDQuant).
    """
    _common.check_dtype("int8_matmul: x_q", x_q, (_INT8,))
    return _scaled_matmul(
        "int8_matmul", int8_matmul_reference, x_q, x_scale, w_q, w_scale, bias, out_dtype, config, lowrank
    )


def fp8_matmul(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    *,
    config: GemmConfig | None = None,
) -> jax.Array:
    """W8A8 fp8 e4m3 GEMM ``[M,K] x [N,K]^T -> [M,N]``; kernel on Hopper, reference elsewhere."""
    _common.check_dtype("fp8_matmul: x_q", x_q, (_FP8,))
    return _scaled_matmul("fp8_matmul", fp8_matmul_reference, x_q, x_scale, w_q, w_scale, bias, out_dtype, config)


# --------------------------------------------------------------------------
# fp8 or int8 with 1x128 activation and 128x128 weight block scales (DeepGEMM-style).
# --------------------------------------------------------------------------

BLOCK = 128
#: The block-scaled kernels' default CTA width (:class:`BlockConfig`): 128 x 256 was 3-6% faster
#: than 128 x 128 on every Wan linear at 32,760 tokens (H200, benchmarks/notes.md, eighth
#: session); with the producer's block rotation the 128-wide tile keeps its deeper pipeline.
BLOCK_CTA_N = 256
# Weight scales travel per K step as 32 consecutive N blocks (128 bytes, the
# smallest copy a warpgroup issues); the kernel picks its own block's entry.
_WS_LANES = 32


def _check_block_operands(x_q, x_scale, w_q, w_scale, bias, name="fp8_block_matmul", dtype=_FP8):
    _common.check_rank(f"{name}: x_q", x_q, 2)
    _common.check_rank(f"{name}: w_q", w_q, 2)
    _common.check_dtype(f"{name}: x_q", x_q, (dtype,))
    _common.check_dtype(f"{name}: w_q", w_q, (dtype,))
    m, k = x_q.shape
    n, k2 = w_q.shape
    if k != k2:
        raise ValueError(f"{name}: x_q {x_q.shape} and w_q {w_q.shape} must share K")
    kb, nb = _common.cdiv(k, BLOCK), _common.cdiv(n, BLOCK)
    if x_scale.shape != (m, kb):
        raise ValueError(
            f"{name}: x_scale must be [M, ceil(K/128)]={(m, kb)} (one scale per token"
            f" per 128-wide K slice), got {x_scale.shape}"
        )
    if w_scale.shape != (nb, kb):
        raise ValueError(f"{name}: w_scale must be [ceil(N/128), ceil(K/128)]={(nb, kb)}, got {w_scale.shape}")
    if bias is not None and bias.size != n:
        raise ValueError(f"{name}: bias must have {n} entries, got {bias.shape}")


def fp8_block_matmul_reference(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
    """Plain-JAX block-scaled fp8 GEMM: dequantize both operands to f32, f32 dot."""
    _check_block_operands(x_q, x_scale, w_q, w_scale, bias)
    return _block_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype)


def int8_block_matmul_reference(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
    """Plain-JAX block-scaled int8 GEMM: dequantize both operands to f32, f32 dot."""
    _check_block_operands(x_q, x_scale, w_q, w_scale, bias, "int8_block_matmul", _INT8)
    return _block_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype)


def _block_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype) -> jax.Array:
    m, k = x_q.shape
    n = w_q.shape[0]
    xs = jnp.repeat(x_scale.astype(jnp.float32), BLOCK, axis=1)[:, :k]
    ws = jnp.repeat(jnp.repeat(w_scale.astype(jnp.float32), BLOCK, axis=0)[:n], BLOCK, axis=1)[:, :k]
    x = x_q.astype(jnp.float32) * xs
    w = w_q.astype(jnp.float32) * ws
    y = lax.dot_general(
        x, w, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )
    if bias is not None:
        y = y + bias.reshape(1, -1).astype(jnp.float32)
    return y.astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tiling of the block-scaled GEMMs: two consumer warpgroups of 64 rows each.

    ``cta_n`` is 128 (one weight scale block per CTA) or 256: each warpgroup then keeps two
    64 x 128 running sums and runs each K slice's wgmma once per 128-column half into one
    shared partial accumulator, so the CTA reads 48 KiB per K slice for twice the products of
    the 128-wide tile's 32 KiB (the register file holds 2 sums + 1 partial, not 2 + 2).
    """

    stages: int = 5
    cta_n: int = 128
    grid_minor: str = "n"
    grid_tile_width: int = 8
    epi_m: int = 64
    epi_n: int = 32

    def __post_init__(self):
        if self.cta_n not in (BLOCK, 2 * BLOCK):
            raise ValueError(f"BlockConfig: cta_n must be {BLOCK} or {2 * BLOCK}, got {self.cta_n}")


#: Shared memory a Hopper CTA may allocate (227 KiB), less room for the pipeline's barriers.
_BLOCK_SMEM_LIMIT = 227 * 1024 - 2048


def block_smem_bytes(cfg: BlockConfig, out_bytes: int, rotate: bool, col_mul: bool = False) -> int:
    """Shared memory of :func:`block_gemm_pallas`: the pipeline's stages (x and w K slices,
    their scales), the output staging pieces, bias (and the column multipliers), scales out and
    the rotation copies."""
    stage = 128 * BLOCK + cfg.cta_n * BLOCK + 4 * 128 + 4 * _WS_LANES
    fixed = 2 * 2 * cfg.epi_m * cfg.epi_n * out_bytes + 2 * cfg.cta_n * 4 * (2 if col_mul else 1) + 2 * 64 * 4
    return cfg.stages * stage + fixed + (2 * BLOCK * BLOCK * 2 if rotate else 0)


def block_config(cta_n: int | None = None, rotate: bool = False) -> BlockConfig:
    """The deepest pipeline that fits shared memory for a ``cta_n``-wide tile (default
    :data:`BLOCK_CTA_N`, or 128 with ``rotate``); ``rotate`` leaves room for the epilogue's two
    32 KiB rotation copies."""
    cta_n = cta_n or (BLOCK if rotate else BLOCK_CTA_N)
    stages = {(BLOCK, False): 5, (BLOCK, True): 4, (2 * BLOCK, False): 4, (2 * BLOCK, True): 3}[(cta_n, rotate)]
    return BlockConfig(stages=stages, cta_n=cta_n)


# jit: every call site with the same shapes and config shares one lowered kernel (a model's
# repeated layers lower it once instead of once per layer: minutes of compile time).
@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "sms", "epilogue"))
def block_gemm_pallas(
    x: jax.Array,
    w: jax.Array,
    xs_t: jax.Array,
    ws_t: jax.Array,
    bias: jax.Array,
    h: jax.Array | None = None,
    mul: jax.Array | None = None,
    *,
    out_dtype,
    config: BlockConfig,
    sms: int,
    epilogue: tuple[str, str] | None = None,
):
    """Runs the block-scaled kernel on prepared operands.

    ``x`` ``[M, K]`` and ``w`` ``[N, K]`` are both e4m3 or both int8 with K a multiple
    of 128, ``xs_t`` is the activation scales transposed to ``[K/128, M]``, ``ws_t`` the
    weight scales transposed to ``[K/128, ceil(N/128) rounded to 32]`` and ``bias``
    ``[N]``. Each 128-wide K slice goes through wgmma into a fresh accumulator (fp32 for
    e4m3, exact int32 for int8) that is then added, as fp32 times ``x_scale[m] *
    w_scale``, to the running fp32 sum.

    ``epilogue=(activation, fmt)`` (the FFN-up producer, issue 19) applies
    ``pallas_kernels.fused_producers.ACTIVATIONS[activation]`` to the float32 tile and
    quantizes it by the per-token rule of :mod:`pallas_kernels._quant`: each 128-column piece
    of the output tile is one scale block, so the CTA owns its rows' amax. Returns ``(codes
    [M, N] in fmt's dtype, scales [N/128 rounded to whole CTAs, M rounded to 128] float32)``, the scales already in the
    ``xs_t`` layout a consuming block-scaled GEMM reads. ``out_dtype`` is then ignored.
    With ``h`` (the +-1 Sylvester matrix of order 128, bf16) the epilogue also applies QuaRot's
    block-diagonal rotation before quantizing: the bf16-rounded activation tile times ``h``
    through one more wgmma (exact products, float32 sums), times ``1/sqrt(128)``.
    With ``mul`` (``[N]`` float32, only with an epilogue) the activation is multiplied by it per
    column first (QuaRot's random signs of a randomized Hadamard, ``input_mul``); it travels in
    the bias buffer (``[N/128, 2, 128]``: bias and multiplier rows), one copy per tile.
    """
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

    cfg = config
    m, k = x.shape
    n = w.shape[0]
    wg_m, cta_m, cta_n = 64, 128, cfg.cta_n
    halves = cta_n // BLOCK  # 128-column pieces per CTA: one weight scale block each
    m_iters = _common.cdiv(m, cta_m)
    n_iters = _common.cdiv(n, cta_n)
    k_iters = k // BLOCK
    # Bias as [N/128 rounded to whole CTAs, 128]: each piece's 128 entries are one SMEM row
    # (with ``mul``: [.., 2, 128], the piece's multipliers beside its bias).
    bias = _common.pad_axis(bias.reshape(-1), 0, n_iters * cta_n).reshape(-1, BLOCK)
    col_mul = mul is not None
    if col_mul:
        if epilogue is None or mul.shape != (n,):
            raise ValueError(f"block_gemm_pallas: mul must be [{n}] and needs an epilogue, got {mul.shape}")
        mul = _common.pad_axis(mul.astype(jnp.float32), 0, n_iters * cta_n).reshape(-1, BLOCK)
        bias = jnp.stack([bias, mul], axis=1)
    if epilogue is not None:
        act_fn = fused_producers.ACTIVATIONS[epilogue[0]]
        out_dtype = _quant.QDTYPE[epilogue[1]]
        qmax = _quant.QMAX[epilogue[1]]
    rotate = h is not None
    if rotate and (epilogue is None or h.shape != (BLOCK, BLOCK)):
        raise ValueError(f"block_gemm_pallas: h must be [{BLOCK}, {BLOCK}] and needs an epilogue, got {h.shape}")
    in_transforms = _swizzled(128, 1)
    out_bytes = jnp.dtype(out_dtype).itemsize
    smem = block_smem_bytes(cfg, out_bytes, rotate, col_mul)
    if smem > _BLOCK_SMEM_LIMIT:
        raise ValueError(
            f"block_gemm_pallas: {cfg} needs {smem} bytes of shared memory, more than the"
            f" {_BLOCK_SMEM_LIMIT} a Hopper CTA has; use fewer stages (block_config picks them)"
        )
    out_transforms = _swizzled(plgpu.find_swizzle(cfg.epi_n * out_bytes * 8, "out"), out_bytes)
    minor = 1 if cfg.grid_minor == "n" else 0
    num_slots = 2
    part_dtype = jnp.int32 if x.dtype == _INT8 else jnp.float32
    wgmma_row = plgpu.Layout.WGMMA.reduce(1)
    wgmma_col = plgpu.Layout.WGMMA.reduce(0)

    def kernel(*refs, out_smem, bias_smem, bias_bar, sc_smem=None, h_smem=None, h_bar=None):
        x_gmem, w_gmem, xs_gmem, ws_gmem, bias_gmem = refs[:5]
        h_gmem = refs[5] if rotate else None
        out_gmem, *sc_out = refs[6 if rotate else 5 :]
        sc_gmem = sc_out[0] if sc_out else None

        def get_pipeline(body, compute_context):
            return plgpu.emit_pipeline_warp_specialized(
                body,
                grid=(k_iters,),
                memory_registers=40,
                in_specs=[
                    plgpu.BlockSpec(
                        (cta_m, BLOCK), lambda kk: (0, kk), transforms=in_transforms, memory_space=plgpu.SMEM
                    ),
                    plgpu.BlockSpec(
                        (cta_n, BLOCK), lambda kk: (0, kk), transforms=in_transforms, memory_space=plgpu.SMEM
                    ),
                    plgpu.BlockSpec((1, cta_m), lambda kk: (kk, 0), memory_space=plgpu.SMEM),
                    plgpu.BlockSpec((1, _WS_LANES), lambda kk: (kk, 0), memory_space=plgpu.SMEM),
                ],
                wg_axis="wg",
                num_compute_wgs=2,
                max_concurrent_steps=cfg.stages,
                compute_context=compute_context,
            )

        ignore = lambda *_, **__: None

        @functools.partial(
            pl.run_scoped,
            allocs=get_pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem, xs_gmem, ws_gmem),
            collective_axes="wg",
        )
        def _scope(allocs):
            wg = lax.axis_index("wg")
            if rotate:  # each consumer warpgroup's own copy of the rotation, loaded once

                @pl.when(wg < 2)
                def _load_h():
                    plgpu.copy_gmem_to_smem(h_gmem, h_smem.at[wg], h_bar.at[wg])
                    plgpu.barrier_wait(h_bar.at[wg])

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _tile_loop(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), minor, cfg.grid_tile_width)
                row0 = mi * cta_m + wg * wg_m
                col0 = ni * cta_n
                nb0 = ni * halves  # the first 128-column block of this CTA
                n_group = lax.div(nb0, _WS_LANES)
                n_lane = lax.rem(nb0, _WS_LANES)  # halves <= 2 divides the 32 lanes: one group

                def compute_context(eval_pipeline):
                    plgpu.copy_gmem_to_smem(bias_gmem.at[pl.ds(nb0, halves)], bias_smem.at[wg], bias_bar.at[wg])
                    zeros = plgpu.layout_cast(jnp.full((wg_m, BLOCK), 0.0, jnp.float32), plgpu.Layout.WGMMA)
                    accs = eval_pipeline((zeros,) * halves)
                    plgpu.barrier_wait(bias_bar.at[wg])
                    for j, acc in enumerate(accs):
                        if col_mul:
                            col_bias = plgpu.load(bias_smem.at[wg, j, 0], (), layout=wgmma_col)
                            col_m = plgpu.load(bias_smem.at[wg, j, 1], (), layout=wgmma_col)
                        else:
                            col_bias, col_m = plgpu.load(bias_smem.at[wg, j], (), layout=wgmma_col), None
                        piece_epilogue(acc + lax.broadcast_in_dim(col_bias, (wg_m, BLOCK), [1]), j, col_m)

                def piece_epilogue(y, j, col_m=None):
                    """Stores one 64 x 128 piece (column block ``nb0 + j``), or quantizes it."""
                    cj = col0 + j * BLOCK
                    if epilogue is None:
                        store_tile(y.astype(out_dtype), out_smem.at[wg], out_gmem, row0, cj, cfg.epi_m, cfg.epi_n)
                        return
                    # The FFN-up producer: activation, then _quant's per-token rule on the tile.
                    y = act_fn(y)
                    if col_m is not None:
                        y = y * lax.broadcast_in_dim(col_m, (wg_m, BLOCK), [1])
                    if rotate:  # (bf16(y) @ H) / sqrt(128): the unfused path rotates the bf16 value

                        def rotation(rot_ref):
                            plgpu.wgmma(rot_ref, y.astype(jnp.bfloat16), h_smem.at[wg])
                            return rot_ref[...]

                        y = pl.run_scoped(rotation, plgpu.ACC((wg_m, BLOCK), jnp.float32)) * (1.0 / math.sqrt(BLOCK))
                    row_scale = jnp.maximum(jnp.max(jnp.abs(y), axis=1) / qmax, _quant.SCALE_FLOOR)
                    q = jnp.clip(y / lax.broadcast_in_dim(row_scale, (wg_m, BLOCK), [0]), -qmax, qmax)
                    if out_dtype == _INT8:
                        q = jnp.round(q)
                    # store_tile first waits for this warpgroup's earlier stores, the previous
                    # piece's scales included, so one scale buffer serves every piece.
                    store_tile(q.astype(out_dtype), out_smem.at[wg], out_gmem, row0, cj, cfg.epi_m, cfg.epi_n)
                    sc_smem.at[wg][...] = row_scale
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(sc_smem.at[wg], sc_gmem.at[nb0 + j, pl.ds(row0, wg_m)])

                def body(_, a_smem, b_smem, xs_smem, ws_smem, accs):
                    row_scale = plgpu.load(xs_smem.at[0, pl.ds(wg * wg_m, wg_m)], (), layout=wgmma_row)
                    out = []
                    for j, acc in enumerate(accs):  # one partial accumulator, reused per half

                        def block_product(tmp_ref, j=j):
                            b_half = b_smem.at[pl.ds(j * BLOCK, BLOCK)] if halves > 1 else b_smem
                            plgpu.wgmma(tmp_ref, a_smem.at[pl.ds(wg * wg_m, wg_m)], plgpu.transpose_ref(b_half, (1, 0)))
                            return tmp_ref[...]

                        part = pl.run_scoped(block_product, plgpu.ACC((wg_m, BLOCK), part_dtype))
                        scale = row_scale * ws_smem[0, n_lane + j]
                        out.append(acc + part.astype(jnp.float32) * lax.broadcast_in_dim(scale, (wg_m, BLOCK), [0]))
                    return tuple(out)

                get_pipeline(body, compute_context)(
                    x_gmem.at[pl.ds(mi * cta_m, cta_m), :],
                    w_gmem.at[pl.ds(ni * cta_n, cta_n), :],
                    xs_gmem.at[:, pl.ds(mi * cta_m, cta_m)],
                    ws_gmem.at[:, pl.ds(n_group * _WS_LANES, _WS_LANES)],
                    allocations=allocs,
                )

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    out_type = jax.ShapeDtypeStruct((m, n), out_dtype)
    scratch = dict(
        out_smem=plgpu.SMEM((2, num_slots, cfg.epi_m, cfg.epi_n), out_dtype, transforms=out_transforms),
        bias_smem=plgpu.SMEM((2, halves, 2, BLOCK) if col_mul else (2, halves, BLOCK), jnp.float32),
        bias_bar=plgpu.Barrier(num_barriers=2),
    )
    if epilogue is not None:  # scales [N tiles, M rounded to the CTA]: whole 64-row TMA pieces
        out_type = (out_type, jax.ShapeDtypeStruct((n_iters * halves, m_iters * cta_m), jnp.float32))
        scratch["sc_smem"] = plgpu.SMEM((2, wg_m), jnp.float32)
    if rotate:
        scratch["h_smem"] = plgpu.SMEM((2, BLOCK, BLOCK), jnp.bfloat16, transforms=_swizzled(128, 2))
        scratch["h_bar"] = plgpu.Barrier(num_barriers=2)
    call = plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(sms,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        scratch_types=scratch,
    )
    return call(x, w, xs_t, ws_t, bias, *((h,) if rotate else ()))  # mul rides in bias


def _prepare_block(x_q, x_scale, w_q, w_scale, bias):
    m, k = x_q.shape
    n = w_q.shape[0]
    kp = _common.round_up(k, BLOCK)
    mp = max(_common.round_up(m, 8), 128)
    np_ = max(_common.round_up(n, 64), BLOCK)
    x = _common.pad_axis(_common.pad_axis(x_q, 1, kp), 0, mp)
    w = _common.pad_axis(_common.pad_axis(w_q, 1, kp), 0, np_)
    xs_t = _common.pad_axis(x_scale.astype(jnp.float32).T, 1, _common.round_up(mp, 128))
    ws_t = w_scale.astype(jnp.float32).T
    ws_t = _common.pad_axis(ws_t, 1, _common.round_up(ws_t.shape[1], _WS_LANES))
    bias_v = jnp.zeros((n,), jnp.float32) if bias is None else bias.reshape(-1).astype(jnp.float32)
    bias_v = _common.pad_axis(bias_v, 0, _common.round_up(np_, BLOCK))
    return x, w, xs_t, ws_t, bias_v


#: The int8 variant of the block-scaled kernel (int32 accumulator per 128-wide K slice) passed
#: ``JQUANT_BACKEND=pallas scripts/check_kernels_gpu.py --kernels w8a8_int8_block`` on an H200 at
#: 31c4fea (11 shapes, ``benchmarks/check_kernels-int8_block-NVIDIA_H200.txt``).
INT8_BLOCK_GPU_VERIFIED = True


def supports_block(x_q: jax.Array, w_q: jax.Array, out_dtype=jnp.bfloat16) -> bool:
    """True where a block-scaled kernel applies (Hopper, 2-D; e4m3, or int8 once GPU-checked)."""
    if not supports(x_q, w_q, out_dtype):
        return False
    if jnp.dtype(x_q.dtype) == _INT8:
        return _common.kernel_enabled(INT8_BLOCK_GPU_VERIFIED)
    return jnp.dtype(x_q.dtype) == _FP8


def fp8_block_matmul(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    *,
    config: BlockConfig | None = None,
) -> jax.Array:
    """Block-scaled fp8 GEMM: ``x_scale`` ``[M, K/128]``, ``w_scale`` ``[N/128, K/128]``.

    Kernel on Hopper, :func:`fp8_block_matmul_reference` elsewhere.
    """
    _check_block_operands(x_q, x_scale, w_q, w_scale, bias)
    return _block_matmul(x_q, x_scale, w_q, w_scale, bias, out_dtype, config)


def int8_block_matmul(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    *,
    config: BlockConfig | None = None,
) -> jax.Array:
    """Block-scaled int8 GEMM (the fp8 one's layout): ``x_scale`` ``[M, K/128]``, ``w_scale``
    ``[N/128, K/128]``; kernel on Hopper once GPU-checked (:data:`INT8_BLOCK_GPU_VERIFIED`),
    :func:`int8_block_matmul_reference` elsewhere."""
    _check_block_operands(x_q, x_scale, w_q, w_scale, bias, "int8_block_matmul", _INT8)
    return _block_matmul(x_q, x_scale, w_q, w_scale, bias, out_dtype, config)


def _block_matmul(x_q, x_scale, w_q, w_scale, bias, out_dtype, config) -> jax.Array:
    if not supports_block(x_q, w_q, out_dtype):
        return _block_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    m, n = x_q.shape[0], w_q.shape[0]
    x, w, xs_t, ws_t, bias_v = _prepare_block(x_q, x_scale, w_q, w_scale, bias)
    y = block_gemm_pallas(
        x, w, xs_t, ws_t, bias_v, out_dtype=out_dtype, config=config or block_config(), sms=_common.num_sms()
    )
    return y[:m, :n]
