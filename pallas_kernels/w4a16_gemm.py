"""W4A16 for large M on Hopper: int4 weights dequantized in registers feeding a bf16 wgmma.

The small-M kernel (:mod:`pallas_kernels.weight_only`) covers M <= 16..256 with split-K and
fp32 partial sums; from a few thousand tokens on, weight-only linears took the XLA path:
dequantize the weights to bf16 (one extra pass over N x K per call), then XLA's bf16 GEMM
(0.83-0.94x bf16 on an H200). This kernel removes the extra pass. It is the W4A8 kernel's
design (:mod:`pallas_kernels.w4a8`) with bf16 activations: ``Y^T = W X^T``, tokens on the wgmma
N dimension (``tokens`` per CTA), each consumer warpgroup's 64 weight rows are the
register-sourced A operand, loaded as int4 from shared memory in Mosaic's 4x-upcast layout,
shuffled into the wgmma layout while narrow, converted to bf16 and multiplied by their 128-wide
group's scale (bf16) before the wgmma. The tile's group scales are copied to shared memory
once per output tile. The epilogue stores the transposed accumulator through a transposed
shared-memory view, so the output is ``[M, N]`` bf16 with no extra pass.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common, _weights, w4a8, w8a8

#: int4 passed scripts/check_kernels_gpu.py's ``w4a16`` case on an H200 (path ``kernel-large``:
#: 4096x3072x3072, ragged 1100x1000x136 and 2051x1536x8960;
#: benchmarks/check_kernels-hadamard-w4a16large-NVIDIA_H200.txt).
GPU_VERIFIED = True
#: int8 weights (W8A16) passed the ``w8a16`` case the same way
#: (benchmarks/check_kernels-w16large-NVIDIA_H200.txt).
INT8_GPU_VERIFIED = True
#: Fewest tokens for which the weight-only dispatch runs this kernel instead of XLA.
MIN_M = 1024
#: Smallest weight (K x N) the dispatch gives it: at 1536 x 1536 XLA's dequantize + bf16 GEMM
#: was faster (H200, M=4096: 39.4 vs 41.5 us; M=32760: 226 vs 295), from 1536 x 8960 and
#: 3072 x 3072 on the kernel (benchmarks/w4a16_large-NVIDIA_H200.json, int8 likewise).
MIN_KN = 3072 * 3072
_ROWS = 64  # weight rows per consumer warpgroup
_GROUP = _weights.GROUP


@dataclasses.dataclass(frozen=True)
class W4A16GemmConfig:
    """Tokens per CTA (the wgmma N; f32 accumulators of 64 x tokens per warpgroup), K per
    pipeline step (64: one 128-byte line of bf16 tokens, or 128: one scale group), tokens per
    output piece."""

    tokens: int = 256
    kstep: int = 64
    epi_t: int = 32

    def check(self) -> None:
        if self.tokens not in (64, 128, 256) or self.kstep not in (64, 128) or self.tokens % self.epi_t:
            raise ValueError(f"W4A16GemmConfig: unsupported tiling {self}")


#: Fastest or within 3% on 7 shapes (H200, benchmarks/w4a16_large-tilings-NVIDIA_H200.json).
DEFAULT = W4A16GemmConfig(tokens=256, kstep=128)


def _stages(cfg: W4A16GemmConfig, k_groups: int, bits: int = 4) -> int:
    stage = cfg.tokens * cfg.kstep * 2 + 2 * _ROWS * cfg.kstep * bits // 8
    fixed = 2 * 2 * cfg.epi_t * _ROWS * 2 + 2 * k_groups * _ROWS * 2
    return int(max(2, min(6, (w8a8._SMEM_BYTES - fixed) // stage)))  # pylint: disable=protected-access


@functools.partial(jax.jit, static_argnames=("sms", "config"))
def w4a16_gemm_pallas(
    x: jax.Array, w: jax.Array, s_t: jax.Array, *, sms: int, config: W4A16GemmConfig = DEFAULT
) -> jax.Array:
    """``bf16[M, N]`` from ``x`` ``bf16[M, K]`` (M a multiple of ``config.tokens``, K of 128),
    ``w`` ``int4[N, K]`` or ``int8[N, K]`` (N a multiple of 128) and ``s_t`` ``bf16[K/128, N]``
    group scales (int8 per-channel scales repeated per group)."""
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

    cfg = config
    cfg.check()
    m, k = x.shape
    n = w.shape[0]
    tokens, kstep, cta_rows = cfg.tokens, cfg.kstep, 2 * _ROWS
    k_groups = k // _GROUP
    m_iters, n_iters, k_iters = m // tokens, n // cta_rows, k // kstep
    x_transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    bits = 4 if w.dtype == jnp.int4 else 8
    w_transforms = (plgpu.TilingTransform((8, kstep)), plgpu.SwizzleTransform(kstep * bits // 8))
    a_layout = plgpu.Layout.WGMMA_UPCAST_4X if bits == 4 else plgpu.Layout.WGMMA_UPCAST_2X
    out_transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    steps_per_group = _GROUP // kstep

    def kernel(x_gmem, w_gmem, s_gmem, out_gmem, *, out_smem, s_smem, bar):
        wg = lax.axis_index("wg")

        def tile(mi, ni):
            tok0 = mi * tokens
            row0 = ni * cta_rows + wg * _ROWS

            def compute_context(eval_pipeline):
                plgpu.copy_gmem_to_smem(s_gmem.at[:, pl.ds(row0, _ROWS)], s_smem.at[wg], bar.at[wg])
                plgpu.barrier_wait(bar.at[wg])

                @functools.partial(pl.run_scoped, acc=plgpu.ACC((_ROWS, tokens), jnp.float32))
                def _acc_scope(acc):
                    eval_pipeline(acc)
                    y = acc[...]
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for e in range(tokens // cfg.epi_t):
                        w4a8.store_transposed(
                            y[:, e * cfg.epi_t : (e + 1) * cfg.epi_t],
                            jnp.bfloat16,
                            out_smem.at[wg, e % 2],
                            out_gmem.at[pl.ds(tok0 + e * cfg.epi_t, cfg.epi_t), pl.ds(row0, _ROWS)],
                        )

            def body(idx, x_smem, w_smem, acc):
                (kk,) = idx
                a = plgpu.load(w_smem.at[pl.ds(wg * _ROWS, _ROWS)], (), layout=a_layout)
                a = plgpu.layout_cast(a, plgpu.Layout.WGMMA).astype(jnp.bfloat16)
                scale = plgpu.load(s_smem.at[wg, kk // steps_per_group], (), layout=plgpu.Layout.WGMMA.reduce(1))
                a = a * lax.broadcast_in_dim(scale, (_ROWS, kstep), [0])
                plgpu.wgmma(acc, a, plgpu.transpose_ref(x_smem, (1, 0)))
                plgpu.wgmma_wait(0)
                return acc

            return (
                body,
                compute_context,
                x_gmem.at[pl.ds(tok0, tokens), :],
                w_gmem.at[pl.ds(ni * cta_rows, cta_rows), :],
            )

        w8a8.persistent_tiles(
            x_gmem,
            w_gmem,
            plgpu.BlockSpec((tokens, kstep), lambda kk: (0, kk), transforms=x_transforms, memory_space=plgpu.SMEM),
            plgpu.BlockSpec((cta_rows, kstep), lambda kk: (0, kk), transforms=w_transforms, memory_space=plgpu.SMEM),
            k_iters=k_iters,
            stages=_stages(cfg, k_groups, bits),
            grid_mn=(m_iters, n_iters),
            minor=1,
            tile_width=8,
            tile=tile,
        )
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
        grid=(sms,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        scratch_types=dict(
            out_smem=plgpu.SMEM((2, 2, cfg.epi_t, _ROWS), jnp.bfloat16, transforms=out_transforms),
            s_smem=plgpu.SMEM((2, k_groups, _ROWS), jnp.bfloat16),
            bar=plgpu.Barrier(num_barriers=2),
        ),
    )
    return call(x, w, s_t)


def supports(
    x: jax.Array, block: int = _GROUP, decode: str = "int", offsets: bool = False, n: int | None = None, bits: int = 4
) -> bool:
    """Hopper, verified there (or forced), 2-D ``x`` with M >= MIN_M, int4 with 128-wide groups
    (or ``bits=8``: int8 per channel) and no offsets (zero points); with ``n``, a weight of at
    least ``MIN_KN`` elements (smaller ones ran faster through XLA)."""
    verified = GPU_VERIFIED if bits == 4 else INT8_GPU_VERIFIED
    return (
        _common.on_hopper()
        and _common.kernel_enabled(verified)
        and x.ndim == 2
        and x.shape[0] >= MIN_M
        and decode == "int"
        and block == _GROUP
        and not offsets
        and (n is None or x.shape[1] * n >= MIN_KN)
    )


def w8a16_large_m(
    x: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    *,
    config: W4A16GemmConfig | None = None,
) -> jax.Array:
    """``x @ w_q^T * w_scale`` for int8 ``[N, K]`` weights with per-channel scales: the same kernel
    (the scale applied to the widened weights in bf16, one table row per 128-wide K group)."""
    n, k = w_q.shape
    kp, np_ = _common.round_up(k, _GROUP), _common.round_up(n, 2 * _ROWS)
    w = _common.pad_axis(_common.pad_axis(w_q, 1, kp), 0, np_)
    s_t = jnp.broadcast_to(_common.pad_axis(w_scale.astype(jnp.bfloat16).reshape(1, n), 1, np_), (kp // _GROUP, np_))
    prepared = _weights.W4Prepared(w=w, s_t=s_t, n=n, k=k)
    return w4a16_large_m(x, prepared, bias, out_dtype, config=config)


def w4a16_large_m(
    x: jax.Array,
    prepared: _weights.W4Prepared,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    *,
    config: W4A16GemmConfig | None = None,
) -> jax.Array:
    """``x @ W^T`` for prepared int4 weights (:func:`_weights.prepare_w4a16`, group 128; or
    int8 codes with a per-group table): the kernel (M padded to the token tile), then bias in XLA."""
    cfg = config or DEFAULT
    m = x.shape[0]
    kp = prepared.w.shape[1]
    xp = _common.pad_axis(_common.pad_axis(x.astype(jnp.bfloat16), 1, kp), 0, _common.round_up(m, cfg.tokens))
    y = w4a16_gemm_pallas(xp, prepared.w, prepared.s_t.astype(jnp.bfloat16), sms=_common.num_sms(), config=cfg)[
        :m, : prepared.n
    ]
    if bias is not None:
        y = (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(out_dtype)
    return y.astype(out_dtype)
