"""Kernel selection for jquant's dispatch: which Pallas kernel (if any) runs a matmul.

``maybe_run(x, w, act=..., act_scale=...)`` returns the kernel's output, or None when no
kernel applies; :func:`jquant.dispatch.linear` then takes the XLA path. Kernels apply on
a Hopper GPU to 2-D QArray weights (Flax layout (K, N)) with:

* ``int8`` per-channel weights + ``int8`` activations -> ``w8a8.int8_matmul``
* ``fp8_e4m3`` per-channel weights + ``fp8_e4m3`` activations -> ``w8a8.fp8_matmul``
* ``int4`` per-channel weights + ``int8`` activations, M >= 1024 -> ``w4a8.w4a8_matmul`` (int4
  tiles widened to int8 in registers); with an SVDQuant branch (rank 16..64) the branch's
  up-projection runs in that GEMM's epilogue (its down-projection is one XLA GEMM; the fused
  ``lowrank_quant`` quantizer measured slower and runs only when forced)
* weight-only ``int4/g128`` (symmetric) or ``int8`` / ``fp8`` per-channel, M <= 16 ->
  ``weight_only.w4a16_matmul`` / ``w8a16_matmul`` (where ``weight_only.supports`` says so;
  checked on the GPU, see docs/kernels.md); ``int4`` with groups of 16/32/64 the same; int4/g128
  and int8 per-channel at M >= 1024 with K x N >= 3072 x 3072 -> the same wrappers, which run
  ``w4a16_gemm`` (dequantized in registers)
* weight-only ``nf4``, ``fp4``, ``mxfp4``, ``nvfp4`` (blocks of 16..128), M <= 16 ->
  ``w4_table.w4_table_matmul`` (decode in registers); ``uint4`` groups with zero points ->
  ``w4_table.uint4_matmul``

The kernels take K-major weights ([N, K]); QArrays store (K, N), so the codes are
transposed in the jitted graph (one pass over the weight bytes per call; 4-bit packing is
along K in both layouts, so packed bytes transpose unchanged). Dynamic per-token int8 / e4m3
activations go through the activation quantizer kernel (:func:`quantize_tokens`), whose rule
is :func:`jquant.quantize`'s to the bit; other activation specs use
:func:`jquant.dispatch.quantize_activation`. Either way both paths see identical codes and scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jquant.formats import QSpec
from jquant.qarray import QArray, decode_scale


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _channel_scale(w: QArray):
    """[N] weight scale if w is 2-D, symmetric, with one scale per output channel."""
    if w.ndim != 2 or w.zero_point is not None or w.spec.scaling or w.scale.shape[0] != 1:
        return None
    return decode_scale(w)[0]


def _fused_lowrank(x2: jax.Array, lowrank):
    """``(h = x @ A, B^T)`` for the int8 kernel's epilogue, or None where the rank does not fit."""
    from pallas_kernels import w4a8

    if lowrank is None or not w4a8.fused_rank(lowrank[0].shape[-1]):
        return None
    return w4a8.lowrank_operands(x2, *lowrank)


def _fused_tokens(x2: jax.Array, act: QSpec, act_scale, hadamard: bool = False) -> bool:
    """Whether the activation quantizer kernel takes these activations (with the rotation)."""
    from pallas_kernels import act_quant

    return (act_scale is None and act.fmt in ("int8", "fp8_e4m3") and act.symmetric and not act.scaling
            and act.scale_dtype == "float32" and act_quant.supports(x2, hadamard))


def quantize_tokens(x2: jax.Array, act: QSpec, act_scale, hadamard: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(codes [M, K], scale f32 [M, 1])`` of 2-D activations, as :func:`jquant.dispatch.quantize_activation`.

    Dynamic symmetric int8 / e4m3 with fp32 scales runs the activation quantizer kernel where it
    applies (``act_quant.supports``): one pass over ``x``, the same codes and scales as jquant's
    rule (``act_quant``'s reference is that rule to the bit); everything else quantizes in XLA.
    ``hadamard=True`` quantizes ``apply_hadamard(x2)`` (rounded to x2's dtype, as jquant.nn does),
    rotated inside the kernel where it takes the width.
    """
    from jquant.dispatch import quantize_activation
    from pallas_kernels import act_quant

    if _fused_tokens(x2, act, act_scale, hadamard):
        quant = act_quant.quantize_int8 if act.fmt == "int8" else act_quant.quantize_fp8
        return quant(x2, hadamard=True) if hadamard else quant(x2)
    if hadamard:
        from jquant.algorithms.hadamard import apply_hadamard

        x2 = apply_hadamard(x2, axis=-1).astype(x2.dtype)
        return quantize_tokens(x2, act, act_scale)
    xq = quantize_activation(x2, act, act_scale)
    return xq.qvalue, jnp.broadcast_to(decode_scale(xq), (x2.shape[0], 1)).astype(jnp.float32)


def _tokens_and_lowrank(x2: jax.Array, act: QSpec, act_scale, hadamard: bool, lowrank):
    """``(codes, scales, epilogue operands or None)`` for the int8 GEMMs: with an SVDQuant branch
    the quantizer kernel also computes ``h = x @ A`` in its pass over ``x`` where it can
    (``lowrank_quant``), else ``h`` is its own XLA GEMM."""
    from pallas_kernels import lowrank_quant, w4a8

    if (lowrank is not None and not hadamard and w4a8.fused_rank(lowrank[0].shape[-1])
            and _fused_tokens(x2, act, act_scale) and lowrank_quant.supports(x2, lowrank[0])):
        x_q, xs, h = lowrank_quant.quantize_lowrank(x2, lowrank[0], "int8" if act.fmt == "int8" else "fp8")
        return x_q, xs, (h, lowrank[1].T.astype(jnp.bfloat16))
    x_q, xs = quantize_tokens(x2, act, act_scale, hadamard)
    return x_q, xs, _fused_lowrank(x2, lowrank)


def _w8a8(x2: jax.Array, w: QArray, act: QSpec, act_scale, out_dtype, lowrank=None, hadamard=False):
    """The W8A8 / W4A8 kernels; returns ``(y, fused)`` (fused: the low-rank branch is in y) or None."""
    from pallas_kernels import w4a8, w8a8

    ws = _channel_scale(w)
    if w.spec.fmt == "int4" and act.fmt == "int8" and ws is not None:
        x_q, xs, fused = _tokens_and_lowrank(x2, act, act_scale, hadamard, lowrank)
        if not w4a8.supports(x_q, out_dtype):
            return None
        y = w4a8.w4a8_matmul(x_q, xs, w.qvalue.T, ws, None, out_dtype, lowrank=fused)
        return y, fused is not None
    fmt = {"int8": "int8", "fp8_e4m3": "fp8_e4m3"}.get(w.spec.fmt)
    if fmt is None or act.fmt != fmt or ws is None:
        return None
    w_q = w.qvalue.T
    x_q, xs, fused = _tokens_and_lowrank(x2, act, act_scale, hadamard, lowrank if fmt == "int8" else None)
    if not w8a8.supports(x_q, w_q, out_dtype):
        return None
    if fmt == "fp8_e4m3":
        return w8a8.fp8_matmul(x_q, xs, w_q, ws, None, out_dtype), False
    return w8a8.int8_matmul(x_q, xs, w_q, ws, None, out_dtype, lowrank=fused), fused is not None


def _weight_only(x2: jax.Array, w: QArray, out_dtype):
    from pallas_kernels import w4_table, w4a16_gemm, weight_only

    spec = w.spec
    if w.ndim != 2:
        return None
    x2 = x2.astype(jnp.bfloat16)
    group = spec.group_size if spec.granularity == "group" else None
    if w.zero_point is not None:
        if spec.fmt != "uint4" or group is None or not weight_only.supports(x2, group):
            return None
        return w4_table.uint4_matmul(x2, w.qvalue.T, decode_scale(w).T, w.zero_point.T, None, out_dtype,
                                     group_size=group)
    if spec.fmt in w4_table.TABLES and group is not None:
        if not w4_table.supports(x2, group, spec.fmt):
            return None
        # NVFP4: the e4m3 block scales go to the kernel (exact in bf16), the fp32 tensor scale
        # multiplies the output.
        nv = spec.scaling == "nv"
        scale = w.scale.astype(jnp.float32) if nv else decode_scale(w)
        return w4_table.w4_table_matmul(x2, w.qvalue.T, scale.T, w.scale2 if nv else None, None,
                                        out_dtype, fmt=spec.fmt, block=group)
    if spec.scaling:
        return None
    n = w.shape[-1]  # QArrays are (K, N)
    if spec.fmt == "int4" and group is not None:
        if not (weight_only.supports(x2, group) or w4a16_gemm.supports(x2, group, n=n)):
            return None
        return weight_only.w4a16_matmul(x2, w.qvalue.T, decode_scale(w).T, None, out_dtype, group_size=group)
    ws = _channel_scale(w)
    if spec.fmt in ("int8", "fp8_e4m3", "fp8_e5m2") and ws is not None and (
            weight_only.supports(x2) or (spec.fmt == "int8" and w4a16_gemm.supports(x2, n=n, bits=8))):
        return weight_only.w8a16_matmul(x2, w.qvalue.T, ws, None, out_dtype)
    return None


def maybe_run(x: jax.Array, w: QArray, *, act: QSpec | None, act_scale, force: bool = False,
              lowrank=None, hadamard: bool = False):
    """Run ``x @ w`` (plus ``(x @ A) @ B`` for ``lowrank=(A, B)``) with a Pallas kernel if one
    applies, else return None.

    ``force`` (``JQUANT_BACKEND=pallas``) turns "not on a GPU" into an error; shapes and
    formats no kernel covers still fall back to XLA. The low-rank branch is fused into the int8
    GEMM's epilogue (W8A8 and W4A8, rank 16..64); other kernels add it with XLA.
    ``hadamard=True`` runs ``apply_hadamard(x) @ w`` only where the rotation fuses into the
    activation quantizer (dynamic per-token int8/e4m3 into W8A8/W4A8, no low-rank branch), else
    returns None for the caller to rotate.
    """
    if not on_gpu():
        if force:
            raise RuntimeError("JQUANT_BACKEND=pallas but the default JAX backend is not a GPU")
        return None
    out_dtype = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    x2 = x.reshape(-1, x.shape[-1])
    if act is not None and act_scale is not None and jnp.size(act_scale) != 1:
        return None  # per-token static tables: XLA path
    if hadamard and not (act is not None and lowrank is None and _fused_tokens(x2, act, act_scale, True)):
        return None
    if act is not None:
        run = _w8a8(x2, w, act, act_scale, out_dtype, lowrank, hadamard)
        y, fused = (None, False) if run is None else run
    else:
        y, fused = _weight_only(x2, w, out_dtype), False
    if y is None:
        return None
    if lowrank is not None and not fused:
        from jquant.dispatch import add_lowrank

        y = add_lowrank(y, x2, lowrank)
    return y.reshape(*x.shape[:-1], y.shape[-1]).astype(x.dtype)
