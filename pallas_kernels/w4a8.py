"""W4A8 on Hopper: int4 per-channel weights x int8 per-token activations, int8 MMA.

Layouts:

* ``x_q``: ``[M, K]`` int8, ``x_scale``: ``[M, 1]`` (or ``[M]``) float32 per token.
* ``w_packed``: ``[N, ceil(K/2)]`` uint8, two signed 4-bit codes per byte along K, low nibble
  first (:func:`pallas_kernels._weights.pack_int4`; jquant's int4 QArrays store the same
  bytes), ``w_scale``: ``[N]`` float32 per output channel.

``y[m, n] = (sum_k x_q[m, k] * q[n, k]) * x_scale[m] * w_scale[n] + bias[n]``, exact int32
accumulation. Hopper's wgmma has no 4-bit type, so the codes are widened to int8 inside the
kernel (:func:`w4a8_gemm_pallas`): it computes ``Y^T = W X^T`` with the weights as wgmma's
register-sourced A operand, loaded from shared memory as int4 straight into the 8-bit register
layout and widened there (Mosaic's PRMT-based upcast), and the tokens as the N dimension. The
weights stay 4-bit in memory, on the wire and in shared memory; only the output tile is
transposed, through shared memory in the epilogue. :func:`supports` takes M >= ``MIN_M``;
W4A16 covers small M. From ``WIDEN_MIN_M`` tokens on, widening the weights once (one XLA pass)
for the int8 GEMM costs less than widening every tile in the kernel, and that path runs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common, _weights, w8a8

#: Below this M the W4A16 kernel (bf16 tokens, no activation quantization) is the small-M path.
MIN_M = 1024
#: From this M on, one XLA pass widening the weights to int8 + the int8 GEMM beats widening in
#: the kernel (which widens each weight tile once per 256 tokens): H200, M=32760, 3072x3072
#: 425 vs 447 us, 1536x1536 128 vs 135 us; at M=4096 the in-kernel path is 11-19% faster
#: (benchmarks/w4a8_sweep-NVIDIA_H200.json).
WIDEN_MIN_M = 16384


def _check(x_q, x_scale, w_packed, w_scale, bias):
    _common.check_rank("w4a8_matmul: x_q", x_q, 2)
    _common.check_dtype("w4a8_matmul: x_q", x_q, (jnp.int8,))
    _common.check_rank("w4a8_matmul: w_packed", w_packed, 2)
    _common.check_dtype("w4a8_matmul: w_packed", w_packed, (jnp.uint8,))
    k = x_q.shape[1]
    if w_packed.shape[1] != _common.cdiv(k, 2):
        raise ValueError(
            f"w4a8_matmul: w_packed must be [N, ceil(K/2)] = [N, {_common.cdiv(k, 2)}] for x_q with "
            f"K={k}, got {w_packed.shape}"
        )
    if w_scale.size != w_packed.shape[0]:
        raise ValueError(f"w4a8_matmul: w_scale must hold {w_packed.shape[0]} per-channel scales, got {w_scale.shape}")
    if x_scale.size != x_q.shape[0]:
        raise ValueError(f"w4a8_matmul: x_scale must hold {x_q.shape[0]} per-token scales, got {x_scale.shape}")
    if bias is not None and bias.size != w_packed.shape[0]:
        raise ValueError(f"w4a8_matmul: bias must have {w_packed.shape[0]} entries, got {bias.shape}")


def w4a8_matmul_reference(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_packed: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
    """Plain-JAX W4A8: unpack, exact int32 dot, scales, bias."""
    _check(x_q, x_scale, w_packed, w_scale, bias)
    w_q = _weights.unpack_int4(w_packed, x_q.shape[1])
    return w8a8.int8_matmul_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype)


def supports(x_q: jax.Array, out_dtype=jnp.bfloat16) -> bool:
    """True where the GPU path applies: the int8 kernel's conditions and M >= MIN_M."""
    return x_q.ndim == 2 and x_q.shape[0] >= MIN_M and w8a8.supports(x_q, x_q, out_dtype)


def w4a8_matmul(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_packed: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    *,
    lowrank: tuple[jax.Array, jax.Array] | None = None,
    config: W4A8Config | None = None,
) -> jax.Array:
    """W4A8 GEMM ``int8[M,K] x int4[N,K]^T -> [M,N]``: the int4 kernel on Hopper for M >= MIN_M,
    the reference elsewhere.

    ``lowrank=(h, l2t)`` (``bf16[M, r]``, ``bf16[N, r]``, r a multiple of 16 up to 64 on the
    kernel path) adds ``h @ l2t^T`` in the epilogue (SVDQuant's up-projection).
    """
    _check(x_q, x_scale, w_packed, w_scale, bias)
    if not supports(x_q, out_dtype):
        if lowrank is None:
            return w4a8_matmul_reference(x_q, x_scale, w_packed, w_scale, bias, out_dtype)
        y = w4a8_matmul_reference(x_q, x_scale, w_packed, w_scale, bias, jnp.float32)
        return (y + _weights.dot_nt_f32(*lowrank)).astype(out_dtype)
    cfg = config or DEFAULT_W4A8
    if x_q.shape[0] >= WIDEN_MIN_M and config is None:
        w8 = int4_view(w_packed, x_q.shape[1]).astype(jnp.int8)
        return w8a8.int8_matmul(x_q, x_scale, w8, w_scale, bias, out_dtype, lowrank=lowrank)
    w4 = int4_view(w_packed, x_q.shape[1])
    # The int8 GEMM's padding rules with this kernel's CTA: tokens x weight rows.
    pad = w8a8.GemmConfig(tile_m=cfg.tokens, tile_n=cfg.cta_rows // 2)
    x, w, xs, wsb, (m, n) = w8a8._prepare(x_q, x_scale, w4, w_scale, bias, pad)  # pylint: disable=protected-access
    lr = ()
    if lowrank is not None:
        h, l2t = lowrank
        lr = (_common.pad_axis(h, 0, xs.shape[0]), _common.pad_axis(l2t, 0, wsb.shape[1]))
    y = w4a8_gemm_pallas(x, w, xs, wsb, *lr, out_dtype=out_dtype, sms=_common.num_sms(), config=cfg)
    return y[:m, :n]


def int4_view(w_packed: jax.Array, k: int) -> jax.Array:
    """``uint8[N, ceil(K/2)]`` packed codes as ``int4[N, K]``: XLA stores int4 two per byte, low
    nibble first, so for even K this is a view (no pass over the weights); the W4A8 kernel takes
    it and widens in registers."""
    n = w_packed.shape[0]
    w4 = lax.bitcast_convert_type(w_packed, jnp.int4).reshape(n, -1)
    return w4 if w4.shape[1] == k else w4[:, :k]


def _lowrank(x: jax.Array, l1: jax.Array, l2: jax.Array) -> jax.Array:
    """``(x @ l1) @ l2`` in bf16 with fp32 accumulation: ``[M, N]`` fp32."""
    if l1.shape[0] != x.shape[1] or l2.shape[0] != l1.shape[1]:
        raise ValueError(
            f"svdquant_matmul: l1 must be [K, r] and l2 [r, N] for x [M, K]={x.shape}, got {l1.shape} and {l2.shape}"
        )
    h = lax.dot_general(
        x.astype(jnp.bfloat16), l1.astype(jnp.bfloat16), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return lax.dot_general(
        h.astype(jnp.bfloat16), l2.astype(jnp.bfloat16), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )


def svdquant_matmul_reference(x, x_q, x_scale, w_packed, w_scale, l1, l2, bias=None, out_dtype=jnp.bfloat16):
    """Plain-JAX SVDQuant linear: W4A8 reference on the codes plus the low-rank branch on ``x``."""
    y = w4a8_matmul_reference(x_q, x_scale, w_packed, w_scale, bias, jnp.float32)
    return (y + _lowrank(x, l1, l2)).astype(out_dtype)


def fused_rank(r: int) -> bool:
    """Ranks the kernels' low-rank epilogue takes (a multiple of 16, at most 64)."""
    return r % 16 == 0 and 0 < r <= 64


def lowrank_operands(x: jax.Array, l1: jax.Array, l2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(h = x @ l1, l2^T)`` in bf16 (fp32 accumulation): the low-rank epilogue operands of
    ``w4a8_matmul(..., lowrank=...)`` and ``w8a8.int8_matmul(..., lowrank=...)``."""
    return down_projection(x, l1), l2.T.astype(jnp.bfloat16)


def down_projection(x: jax.Array, l1: jax.Array) -> jax.Array:
    """``h = x @ l1`` in bf16 from bf16 operands and an fp32 sum: the low-rank epilogue's ``h``."""
    return lax.dot_general(
        x.astype(jnp.bfloat16), l1.astype(jnp.bfloat16), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    ).astype(jnp.bfloat16)


def svdquant_matmul(x, x_q, x_scale, w_packed, w_scale, l1, l2, bias=None, out_dtype=jnp.bfloat16):
    """SVDQuant linear ``W4A8(x_q) + (x @ l1) @ l2``.

    On Hopper (M >= MIN_M, rank 16..64): ``h = x @ l1`` is one small XLA GEMM, and the W4A8
    kernel adds ``h @ l2`` in its epilogue, piece by piece before each output store, so the
    up-projection and the sum cost no pass over the output. Elsewhere: the W4A8 GEMM plus the
    branch in XLA, added in ``out_dtype``.
    """
    if l1.shape[0] != x.shape[1] or l2.shape[0] != l1.shape[1]:
        raise ValueError(
            f"svdquant_matmul: l1 must be [K, r] and l2 [r, N] for x [M, K]={x.shape}, got {l1.shape} and {l2.shape}"
        )
    if not (supports(x_q, out_dtype) and fused_rank(l1.shape[1])):
        y = w4a8_matmul(x_q, x_scale, w_packed, w_scale, bias, out_dtype)
        return y + _lowrank(x, l1, l2).astype(out_dtype)
    return w4a8_matmul(x_q, x_scale, w_packed, w_scale, bias, out_dtype, lowrank=lowrank_operands(x, l1, l2))


# --------------------------------------------------------------------------
# Kernel: Y^T = W X^T with the int4 weights as the register-sourced wgmma operand.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class W4A8Config:
    """Tiling of :func:`w4a8_gemm_pallas`.

    Each of the two consumer warpgroups owns ``blocks`` 64-row weight blocks (the register-sourced
    wgmma A operand) times ``tokens`` tokens (the wgmma N dimension, int32 accumulators:
    ``blocks * tokens <= 256`` keeps them in registers). Every weight element loaded and widened
    serves ``tokens`` tokens, so wider token tiles spend less on the widening per MAC
    (``benchmarks/w4a8_sweep-*.json``: 256 x 1 block is the fastest measured).
    """

    tokens: int = 256
    blocks: int = 1
    epi_t: int = 32  # tokens per output piece (one [epi_t, 64] TMA store)

    @property
    def cta_rows(self) -> int:
        return 2 * 64 * self.blocks

    def check(self) -> None:
        if (
            self.blocks not in (1, 2)
            or self.tokens % 64
            or not 64 <= self.tokens <= 256
            or self.blocks * self.tokens > 256
            or self.tokens % self.epi_t
        ):
            raise ValueError(f"W4A8Config: unsupported tiling {self}")


DEFAULT_W4A8 = W4A8Config()
_TILE_K = 128  # K per pipeline step: one 128-byte swizzle line of int8 tokens


def store_transposed(piece: jax.Array, out_dtype, slot_smem, dst_gmem) -> None:
    """Stores a ``[rows, tokens]`` accumulator piece (``Y^T``) as ``[tokens, rows]`` of ``out_dtype``:
    a register shuffle into the transposed wgmma layout, a write through a transposed view of one
    of two shared-memory slots (after that slot's previous TMA store has read it) and a TMA store."""
    import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
    piece = plgpu.layout_cast(piece.astype(out_dtype), plgpu.Layout.WGMMA_TRANSPOSED)
    plgpu.transpose_ref(slot_smem, (1, 0))[...] = piece
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(slot_smem, dst_gmem)


def _stages(cfg: W4A8Config, rank: int) -> int:
    """Pipeline stages that fit beside the output pieces (and the low-rank tiles)."""
    stage = (cfg.tokens + cfg.cta_rows // 2) * _TILE_K
    fixed = 2 * 2 * cfg.epi_t * 64 * 2 + 2 * (64 * cfg.blocks + cfg.tokens) * rank * 2
    return int(max(2, min(6, (w8a8._SMEM_BYTES - fixed) // stage)))  # pylint: disable=protected-access


@functools.partial(jax.jit, static_argnames=("out_dtype", "sms", "config"))
def w4a8_gemm_pallas(
    x: jax.Array,
    w: jax.Array,
    xs: jax.Array,
    wsb: jax.Array,
    h: jax.Array | None = None,
    l2t: jax.Array | None = None,
    *,
    out_dtype,
    sms: int,
    config: W4A8Config = DEFAULT_W4A8,
) -> jax.Array:
    """The Mosaic GPU W4A8 kernel on prepared operands: ``[M, N]`` of ``out_dtype``.

    ``x`` int8 ``[M, K]`` (K a multiple of 128, M of 8), ``w`` ``int4[N, K]`` (N a multiple of
    64), ``xs`` f32 ``[M']`` (per token, padded to ``config.tokens``), ``wsb`` f32 ``[2, N']``
    (per-channel scale and bias, padded to ``config.cta_rows``). Each consumer warpgroup loads its
    weight rows of a K step from shared memory as int4 straight into the 8-bit wgmma register
    layout, widens them to int8 in registers (PRMT-based upcast) and multiplies them by the int8
    token tile
    (``Y^T = W X^T``, tokens on the wgmma N dimension), so the weights never exist as int8 in
    memory. The epilogue scales in registers and stores the transposed tile through shared
    memory. With ``h = x @ L1`` (``bf16[M, r]``) and ``l2t = L2^T`` (``bf16[N, r]``, r a multiple
    of 16 up to 64) it adds ``(L2^T h^T)`` before the store (SVDQuant): one bf16 wgmma per 128
    tokens of a 64-row block.
    """
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

    m, k = x.shape
    n = w.shape[0]
    cfg = config
    cfg.check()
    tokens, cta_rows, wg_rows = cfg.tokens, cfg.cta_rows, 64 * cfg.blocks
    m_iters, n_iters, k_iters = _common.cdiv(m, tokens), _common.cdiv(n, cta_rows), k // _TILE_K
    lowrank = h is not None
    rank = h.shape[1] if lowrank else 0
    if lowrank and (rank % 16 or rank > 64 or l2t is None or l2t.shape[1] != rank):
        raise ValueError(
            f"w4a8_gemm_pallas: h [M, r] and l2t [N, r] need one rank r, a multiple"
            f" of 16 up to 64; got {h.shape} and {None if l2t is None else l2t.shape}"
        )
    x_transforms = (plgpu.TilingTransform((8, _TILE_K)), plgpu.SwizzleTransform(128))
    w_transforms = (plgpu.TilingTransform((8, _TILE_K)), plgpu.SwizzleTransform(_TILE_K // 2))
    out_transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    lr_transforms = (plgpu.TilingTransform((8, rank)), plgpu.SwizzleTransform(2 * rank)) if lowrank else None
    stages = _stages(cfg, rank)
    lr_t = 128 if tokens % 128 == 0 else 64  # tokens per low-rank wgmma (its f32 accumulator beside y)

    def kernel(*refs, out_smem, xs_smem, wsb_smem, scale_bar, h_smem=None, l2_smem=None):
        if lowrank:
            x_gmem, w_gmem, xs_gmem, wsb_gmem, h_gmem, l2t_gmem, out_gmem = refs
        else:
            x_gmem, w_gmem, xs_gmem, wsb_gmem, out_gmem = refs

        wg = lax.axis_index("wg")

        def tile(mi, ni):
            tok0 = mi * tokens
            row0 = ni * cta_rows + wg * wg_rows

            def compute_context(eval_pipeline):
                plgpu.copy_gmem_to_smem(xs_gmem.at[pl.ds(tok0, tokens)], xs_smem.at[wg], scale_bar.at[2 * wg])
                plgpu.copy_gmem_to_smem(wsb_gmem.at[:, pl.ds(row0, wg_rows)], wsb_smem.at[wg], scale_bar.at[2 * wg + 1])
                if lowrank:
                    plgpu.copy_gmem_to_smem(h_gmem.at[pl.ds(tok0, tokens)], h_smem.at[wg], scale_bar.at[4 + 2 * wg])
                    plgpu.copy_gmem_to_smem(l2t_gmem.at[pl.ds(row0, wg_rows)], l2_smem.at[wg], scale_bar.at[5 + 2 * wg])

                @functools.partial(pl.run_scoped, accs=[plgpu.ACC((64, tokens), jnp.int32) for _ in range(cfg.blocks)])
                def _acc_scope(accs):
                    eval_pipeline(tuple(accs))
                    plgpu.barrier_wait(scale_bar.at[2 * wg])
                    plgpu.barrier_wait(scale_bar.at[2 * wg + 1])
                    if lowrank:
                        plgpu.barrier_wait(scale_bar.at[4 + 2 * wg])
                        plgpu.barrier_wait(scale_bar.at[5 + 2 * wg])
                    shape = (64, tokens)
                    tok_scale = plgpu.load(xs_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(0))
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for j, acc in enumerate(accs):
                        rows = pl.ds(j * 64, 64)
                        row_scale = plgpu.load(wsb_smem.at[wg, 0, rows], (), layout=plgpu.Layout.WGMMA.reduce(1))
                        row_bias = plgpu.load(wsb_smem.at[wg, 1, rows], (), layout=plgpu.Layout.WGMMA.reduce(1))
                        y = acc[...].astype(jnp.float32)
                        y = y * lax.broadcast_in_dim(row_scale, shape, [0])
                        y = y * lax.broadcast_in_dim(tok_scale, shape, [1])
                        y = y + lax.broadcast_in_dim(row_bias, shape, [0])
                        for e in range(tokens // cfg.epi_t):
                            piece = y[:, e * cfg.epi_t : (e + 1) * cfg.epi_t]
                            if lowrank:
                                if (e * cfg.epi_t) % lr_t == 0:  # one (L2^T h^T) product per lr_t tokens

                                    def product(lr_ref, j=j, e=e):
                                        h_t = plgpu.transpose_ref(h_smem.at[wg, pl.ds(e * cfg.epi_t, lr_t)], (1, 0))
                                        plgpu.wgmma(lr_ref, l2_smem.at[wg, rows], h_t)
                                        return lr_ref[...]

                                    lr = pl.run_scoped(product, plgpu.ACC((64, lr_t), jnp.float32))
                                off = (e * cfg.epi_t) % lr_t
                                piece = piece + lr[:, off : off + cfg.epi_t]
                            slot = (j * (tokens // cfg.epi_t) + e) % 2
                            store_transposed(
                                piece,
                                out_dtype,
                                out_smem.at[wg, slot],
                                out_gmem.at[pl.ds(tok0 + e * cfg.epi_t, cfg.epi_t), pl.ds(row0 + j * 64, 64)],
                            )

            def mma_body(_, x_smem, w_smem, accs):
                x_t = plgpu.transpose_ref(x_smem, (1, 0))
                for j, acc in enumerate(accs):
                    a = plgpu.load(w_smem.at[pl.ds(wg * wg_rows + j * 64, 64)], (), layout=plgpu.Layout.WGMMA_8BIT)
                    plgpu.wgmma(acc, a.astype(jnp.int8), x_t)
                plgpu.wgmma_wait(0)
                return accs

            return (
                mma_body,
                compute_context,
                x_gmem.at[pl.ds(tok0, tokens), :],
                w_gmem.at[pl.ds(ni * cta_rows, cta_rows), :],
            )

        w8a8.persistent_tiles(
            x_gmem,
            w_gmem,
            plgpu.BlockSpec((tokens, _TILE_K), lambda kk: (0, kk), transforms=x_transforms, memory_space=plgpu.SMEM),
            plgpu.BlockSpec((cta_rows, _TILE_K), lambda kk: (0, kk), transforms=w_transforms, memory_space=plgpu.SMEM),
            k_iters=k_iters,
            stages=stages,
            grid_mn=(m_iters, n_iters),
            minor=1,
            tile_width=8,
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
        scratch_types=dict(
            out_smem=plgpu.SMEM((2, 2, cfg.epi_t, 64), out_dtype, transforms=out_transforms),
            xs_smem=plgpu.SMEM((2, tokens), jnp.float32),
            wsb_smem=plgpu.SMEM((2, 2, wg_rows), jnp.float32),
            scale_bar=plgpu.Barrier(num_barriers=8 if lowrank else 4),
            **(
                dict(
                    h_smem=plgpu.SMEM((2, tokens, rank), jnp.bfloat16, transforms=lr_transforms),
                    l2_smem=plgpu.SMEM((2, wg_rows, rank), jnp.bfloat16, transforms=lr_transforms),
                )
                if lowrank
                else {}
            ),
        ),
    )
    return call(x, w, xs, wsb, *((h, l2t) if lowrank else ()))
