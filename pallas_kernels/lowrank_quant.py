"""SVDQuant's down-projection fused into the activation quantizer: one pass over ``x`` gives the
int8 / fp8 codes, the per-token scales and ``h = x @ L1``.

Both read the same bf16 activations, and at DiT sizes the down-projection is memory-bound (rank
32: 64 flops per 2-byte element), so as its own XLA GEMM it costs a second full read of ``x``
(11.4 us of the 20.3 us the branch added to a 59 us W4A8 GEMM at 4096 x 3072 x 3072,
``benchmarks/svdquant_breakdown-NVIDIA_H200.json``). Here each program takes ``rows`` tokens
(at least 16: the tensor-core ``dot`` wants 16 on every side) and walks K in ``chunk``-wide
pieces: every piece updates the row absmax and adds ``piece @ L1[piece]`` (bf16 operands, f32
accumulator) to ``h``; the codes follow either from the pieces kept in registers
(``single_pass``) or from a second, L2-served read.

Measured on an H200 it is correct but slower than the two passes it fuses (see :data:`ENABLED`),
so the dispatch uses it only when forced.

The codes and scales are :mod:`pallas_kernels.act_quant`'s (jquant's per-token rule, to the
bit); ``h`` is :func:`pallas_kernels.w4a8.lowrank_operands`' (bf16 out of an f32 sum, in another
order). The outputs feed ``w4a8_matmul(..., lowrank=(h, l2^T))`` / ``w8a8.int8_matmul``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common, _quant, w4a8

#: Off unless forced (``JQUANT_BACKEND=pallas``): correct on an H200 (scripts/check_kernels_gpu.py's
#: ``act_quant_lowrank`` case, 11 shapes, codes and scales bit-exact;
#: benchmarks/check_kernels-hadamard-lowrank-NVIDIA_H200.txt) but slower than what it would
#: replace, the quantizer kernel plus XLA's ``x @ L1`` (benchmarks/lowrank_quant-NVIDIA_H200.json:
#: 4096 x 3072 best 32.2 us vs 24.8; 32760 x 3072 170.8 vs 136.8). Each 16- or 32-row program
#: re-reads the whole ``L1`` (K x 32 bf16: 196 KB at K=3072, twice the program's own rows)
#: and, past 2048-wide rows, reads its rows a second time for the codes; at 33-54% of the copy
#: bandwidth the saved read of ``x`` does not pay for that. A version worth enabling needs more
#: rows per program than registers hold (``x`` tiles in shared memory: Mosaic GPU, not Triton).
ENABLED = False


@dataclasses.dataclass(frozen=True)
class LowrankQuantConfig:
    """One program's work: ``rows`` tokens (>= 16), ``warps`` warps, K in ``chunk``-wide pieces,
    the pieces held in registers for the codes (``single_pass``) or read twice."""

    rows: int = 16
    warps: int = 8
    chunk: int = 512
    single_pass: bool = False

    def check(self, k: int) -> None:
        if self.rows < 16 or self.rows & (self.rows - 1) or self.chunk < 16 or self.chunk & (self.chunk - 1):
            raise ValueError(f"LowrankQuantConfig: rows (>= 16) and chunk (>= 16) must be powers of two, got {self}")
        held = self.rows * _common.round_up(k, self.chunk)
        if self.single_pass and held > VALUES_PER_WARP * self.warps:
            raise ValueError(
                f"LowrankQuantConfig: {self.rows} rows of K={k} do not fit in registers"
                f" ({held} values; at most {VALUES_PER_WARP} per warp)"
            )


#: Most activations per warp a single-pass program keeps in registers (bf16: 64 registers a thread).
VALUES_PER_WARP = 4096


def pick_config(k: int) -> LowrankQuantConfig:
    """16 rows in 512-wide pieces with 8 warps; one pass where they fit in registers."""
    cfg = LowrankQuantConfig(single_pass=True)
    try:
        cfg.check(k)
    except ValueError:
        cfg = LowrankQuantConfig(single_pass=False)
    return cfg


def _check(x: jax.Array, l1: jax.Array) -> None:
    _quant.check(x)  # pylint: disable=protected-access
    _common.check_rank("quantize_lowrank: l1", l1, 2)
    if l1.shape[0] != x.shape[1]:
        raise ValueError(f"quantize_lowrank: l1 must be [K, r] for x [M, K]={x.shape}, got {l1.shape}")
    r = l1.shape[1]
    if r < 16 or r & (r - 1):
        raise ValueError(f"quantize_lowrank: rank {r} must be a power of two >= 16 (the kernel's dot)")


def reference(x: jax.Array, l1: jax.Array, fmt: str = "int8") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Plain JAX: ``(codes, scale [M, 1], h = x @ l1 in bf16)``, the kernel's signature."""

    _check(x, l1)
    q, s = _quant.reference(x, fmt)  # pylint: disable=protected-access
    return q, s, w4a8.down_projection(x, l1)


def _kernel(x_ref, l1_ref, q_ref, s_ref, h_ref, *, m: int, k: int, fmt: str, cfg: LowrankQuantConfig, interpret: bool):
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.triton as pltriton  # pylint: disable=g-import-not-at-top

    i = pl.program_id(0)
    rows, chunk, r = cfg.rows, cfg.chunk, l1_ref.shape[1]
    row_ok = i * rows + jnp.arange(rows) < m
    n_chunks = _common.cdiv(k, chunk)

    def cols(c):
        return c * chunk + jnp.arange(chunk) < k

    def at(c):  # a traced start: static slices past K (masked anyway) fail Pallas's bounds check
        return pl.ds(c * chunk + 0 * i, chunk)

    def load(c):
        mask = row_ok[:, None] & cols(c)[None, :]
        return pltriton.load(x_ref.at[pl.ds(i * rows, rows), at(c)], mask=mask, other=0.0)

    def step(v, c, amax, h):
        l1c = pltriton.load(l1_ref.at[at(c), :], mask=cols(c)[:, None], other=0.0)
        amax = jnp.maximum(amax, jnp.max(jnp.abs(v.astype(jnp.float32)), axis=1))
        h = h + jnp.dot(v.astype(jnp.bfloat16), l1c.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        return amax, h

    def store(c, v, scale):
        mask = row_ok[:, None] & cols(c)[None, :]
        codes = _quant.to_q(v.astype(jnp.float32) / scale[:, None], fmt, interpret)  # pylint: disable=protected-access
        pltriton.store(q_ref.at[pl.ds(i * rows, rows), at(c)], codes, mask=mask)

    amax = jnp.zeros((rows,), jnp.float32)
    h = jnp.zeros((rows, r), jnp.float32)
    if cfg.single_pass:  # the pieces stay in registers (a Python loop: Triton cannot slice them)
        pieces = [load(c) for c in range(n_chunks)]
        for c, v in enumerate(pieces):
            amax, h = step(v, c, amax, h)
        scale = _quant.scale_of(amax, fmt)  # pylint: disable=protected-access
        for c, v in enumerate(pieces):
            store(c, v, scale)
    else:
        amax, h = lax.fori_loop(0, n_chunks, lambda c, carry: step(load(c), c, *carry), (amax, h))
        scale = _quant.scale_of(amax, fmt)  # pylint: disable=protected-access

        def quant_step(c, carry):
            store(c, load(c), scale)
            return carry

        lax.fori_loop(0, n_chunks, quant_step, 0)
    pltriton.store(s_ref.at[pl.ds(i * rows, rows)], scale, mask=row_ok)
    pltriton.store(h_ref.at[pl.ds(i * rows, rows), :], h.astype(h_ref.dtype), mask=row_ok[:, None])


def quantize_lowrank_pallas(
    x: jax.Array, l1: jax.Array, fmt: str = "int8", *, interpret: bool = False, config: LowrankQuantConfig | None = None
):
    """The Pallas kernel (Triton lowering on the GPU, the interpreter when asked):
    ``(codes [M, K], scale f32 [M, 1], h bf16 [M, r])``."""
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.triton as pltriton  # pylint: disable=g-import-not-at-top

    _check(x, l1)
    if fmt not in ("int8", "fp8"):
        raise ValueError(f"quantize_lowrank: fmt must be int8 or fp8, got {fmt!r}")
    m, k = x.shape
    cfg = config or pick_config(k)
    cfg.check(k)
    call = pl.pallas_call(
        functools.partial(_kernel, m=m, k=k, fmt=fmt, cfg=cfg, interpret=interpret),
        out_shape=(
            jax.ShapeDtypeStruct((m, k), _quant.QDTYPE[fmt]),  # pylint: disable=protected-access
            jax.ShapeDtypeStruct((m,), jnp.float32),
            jax.ShapeDtypeStruct((m, l1.shape[1]), jnp.bfloat16),
        ),
        grid=(_common.cdiv(m, cfg.rows),),
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=cfg.warps, num_stages=1),
    )
    q, s, h = call(x, l1.astype(jnp.bfloat16))
    return q, s.reshape(m, 1), h


def supports(x: jax.Array, l1: jax.Array) -> bool:
    """True where :func:`quantize_lowrank` runs the kernel: a GPU, the kernel enabled there
    (:data:`ENABLED`, or ``JQUANT_BACKEND=pallas``), 2-D float ``x`` and a power-of-two rank >= 16."""
    r = l1.shape[-1]
    return (
        _common.on_gpu()
        and _common.kernel_enabled(ENABLED)
        and x.ndim == 2
        and x.size > 0
        and jnp.issubdtype(x.dtype, jnp.floating)
        and l1.ndim == 2
        and l1.shape[0] == x.shape[1]
        and r >= 16
        and not r & (r - 1)
    )


def quantize_lowrank(x: jax.Array, l1: jax.Array, fmt: str = "int8") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token ``fmt`` codes and scales of ``x`` and ``h = x @ l1`` (bf16), in one pass over
    ``x`` on the GPU (:func:`supports`), as :func:`reference` elsewhere."""
    if supports(x, l1):
        return quantize_lowrank_pallas(x, l1, fmt)
    return reference(x, l1, fmt)
