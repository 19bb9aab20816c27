"""The one place that decides how a (quantized) matmul runs.

``linear(x, w, ...)`` contracts the last ``contract`` axes of ``x`` with the leading
axes of ``w`` (Flax kernel layout (in..., out...)). Paths, in order of preference:

1. Pallas GPU kernel (``pallas_kernels``) when on a GPU, the backend allows it and the
   kernel supports the formats and shapes.
2. XLA integer / fp8 path: int8 x int8 -> int32 (or fp8 x fp8 -> fp32) ``dot_general``
   with the activation's per-token scale and the weight's per-channel scale applied
   after, when both operands are 8-bit with scales constant along the contraction axis.
   Activations with one scale per token per N channels (``<fmt>/token128``) take the
   block-scaled form (:func:`block_scaled_dot`: one exact partial product per N-wide K block,
   scaled in f32 and summed) when the weight's scales are constant within those K blocks.
3. XLA dequantize-then-dot: weight dequantized to the activation dtype (weight-only), and
   for activation formats that cannot use (2) the activation is quantize-dequantized
   first (numerically the quantized model; not faster).

``JQUANT_BACKEND=xla|pallas|auto`` (environment) or the ``backend`` argument force a path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jquant.dispatch import kernels as kd
from jquant.dispatch.xla import (  # noqa: F401 (part of the dispatch API)
    _FP8,
    _INT8,
    _float_dot,
    _int_path_ok,
    _weight_scale_row,
    add_lowrank,
    block_scaled_dot,
    block_scaled_linear,
    is_per_token,
    quantize_activation,
    token_block,
)
from jquant.formats import QSpec
from jquant.hadamard import apply_block_hadamard, online_block
from jquant.qarray import QArray, decode_scale, dequantize, is_coded
from pallas_kernels import _common

Array = jax.Array


def resolve_backend(backend: str = "auto") -> str:
    """``$JQUANT_BACKEND`` when set, else ``backend``: one of auto, xla, pallas."""
    b = _common.backend_env() or backend
    if b not in _common.BACKENDS:
        raise ValueError(f"JQUANT_BACKEND/backend must be auto, xla or pallas, got {b!r}")
    return b


def linear(
    x: Array,
    w: QArray | Array,
    *,
    contract: int | None = 1,
    act: QSpec | None = None,
    act_scale: Array | None = None,
    backend: str = "auto",
    lowrank: tuple[Array, Array] | None = None,
    hadamard: bool | int = False,
) -> Array:
    """``x [..., K...] @ w [K..., N...]`` with the fastest applicable quantized path.

    ``lowrank=(A [K, r], B [r, N])`` adds SVDQuant's float branch ``(x @ A) @ B``; where the
    W4A8/W8A8 kernel runs it is fused into the GEMM's epilogue (pallas_kernels/w8a8.py).
    ``hadamard=True`` multiplies ``apply_hadamard(x)`` instead of ``x`` (QuaRot's online
    rotation, weights pre-rotated): fused into the activation quantizer where that kernel takes
    it, else rotated here in XLA (rounded to x's dtype). ``hadamard=b`` (an int) is the
    block-diagonal rotation of order ``b`` (``QuaRotConfig.online_block``), the same way.
    """
    if hadamard:
        if lowrank is None and resolve_backend(backend) != "xla":
            y = kd.maybe_run(x, w, act=act, act_scale=act_scale, force=False, hadamard=hadamard)
            if y is not None:
                return y

        x = apply_block_hadamard(x, online_block(hadamard), axis=-1).astype(x.dtype)
    contract = contract or 1
    if lowrank is not None and (contract != 1 or not isinstance(w, QArray) or w.ndim != 2):
        y = linear(x, w, contract=contract, act=act, act_scale=act_scale, backend=backend)
        return add_lowrank(y, x, lowrank, contract)
    out_dtype = x.dtype
    if is_coded(w):  # codebooks / low-rank / SpQR: decode with XLA ops, then the float path
        w = w.dequantize(x.dtype)
    if not isinstance(w, QArray):  # float layer (kept in float by the rules)
        return _float_dot(x, w.astype(x.dtype), contract)
    kshape = w.shape[:contract]
    if tuple(x.shape[x.ndim - contract :]) != tuple(kshape):
        raise ValueError(f"activation shape {x.shape} does not match kernel contraction dims {kshape}")
    batch = x.shape[: x.ndim - contract]
    feat = w.shape[contract:]
    if contract != 1 or w.ndim != 2:  # multi-axis kernels: canonical 2-D float path
        wf = dequantize(w, x.dtype).reshape(-1, math.prod(feat))
        x2 = x.reshape(*batch, -1)
        if act is not None:
            x2 = dequantize(quantize_activation(x2, act, act_scale), x.dtype)
        return (x2 @ wf).reshape(*batch, *feat)
    b = resolve_backend(backend)
    if b != "xla":
        y = kd.maybe_run(x, w, act=act, act_scale=act_scale, force=b == "pallas", lowrank=lowrank)
        if y is not None:  # the kernel path adds the low-rank branch itself
            return y
    if act is None:
        y = x @ dequantize(w, x.dtype)
    else:
        xq = quantize_activation(x, act, act_scale)
        yb = block_scaled_linear(xq, w) if token_block(xq.spec) else None
        y = yb.astype(out_dtype) if yb is not None else _token_scaled_linear(xq, w, out_dtype)
    return y if lowrank is None else add_lowrank(y, x, lowrank, contract)


def _token_scaled_linear(xq: QArray, w: QArray, out_dtype) -> Array:
    """XLA's ``xq @ w`` for per-token (or static) activation codes: the integer (or fp8) dot
    with both scales applied after it where the formats allow, else the dequantized product."""
    if _int_path_ok(xq.spec.fmt, w) and not token_block(xq.spec):
        acc_t = jnp.int32 if xq.spec.fmt in _INT8 else jnp.float32
        acc = jax.lax.dot_general(xq.qvalue, w.qvalue, (((xq.ndim - 1,), (0,)), ((), ())), preferred_element_type=acc_t)
        return (acc.astype(jnp.float32) * decode_scale(xq) * _weight_scale_row(w)).astype(out_dtype)
    return dequantize(xq, xq.dtype) @ dequantize(w, xq.dtype)


def linear_quantized(xq: QArray, w: QArray | Array, *, backend: str = "auto") -> Array:
    """``x [..., K] @ w [K, N]`` for activations already quantized per token per N channels
    (``<fmt>/tokenN``) or per token (``<fmt>/token``): a fused producer's codes
    (:mod:`jquant.producers`), in ``xq.dtype``.

    The block-scaled kernel where one applies (``<fmt>/b128x128`` weights on Hopper), else
    :func:`block_scaled_linear` in XLA, else the dequantized product; per-token codes take the
    per-token W8A8 / W4A8 GEMM where it applies, else XLA's integer dot: the same paths
    :func:`linear` takes for such activations after its own quantization."""
    per_token = isinstance(xq, QArray) and is_per_token(xq.spec)
    if not isinstance(xq, QArray) or (token_block(xq.spec) is None and not per_token):
        raise ValueError(
            f"linear_quantized: activations must be a <fmt>/token or <fmt>/tokenN QArray, got {type(xq).__name__}"
        )
    if tuple(xq.shape[-1:]) != tuple(w.shape[:1]) or w.ndim != 2:
        raise ValueError(f"linear_quantized: activation shape {xq.shape} does not match the kernel's {w.shape}")
    if is_coded(w):
        w = w.dequantize(xq.dtype)
    if isinstance(w, QArray):
        b = resolve_backend(backend)
        if b != "xla":
            run = kd.maybe_run_token_quantized if per_token else kd.maybe_run_quantized
            y = run(xq, w, force=b == "pallas")
            if y is not None:
                return y
        if per_token:
            return _token_scaled_linear(xq, w, xq.dtype)
        yb = block_scaled_linear(xq, w)
        if yb is not None:
            return yb.astype(xq.dtype)
        return dequantize(xq, xq.dtype) @ dequantize(w, xq.dtype)
    return dequantize(xq, xq.dtype) @ w.astype(xq.dtype)


def einsum(eq: str, x: Array, w: QArray | Array, *, act: QSpec | None = None, act_scale: Array | None = None) -> Array:
    """Einsum layers: dequantize-then-einsum; activations quantize-dequantized per token."""
    if isinstance(w, QArray) or is_coded(w):
        w = dequantize(w, x.dtype)
        if act is not None:
            x = dequantize(quantize_activation(x, act, act_scale), x.dtype)
    return jnp.einsum(eq, x, w.astype(x.dtype))
