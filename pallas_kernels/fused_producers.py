"""Plain-JAX references of the fused activation producers (issue 19): the kernels that produce
an activation also quantize it, for a block-scaled W8A8 GEMM to consume.

A producer sees one tile of a token row, not the whole row, so it keeps one scale per token per
:data:`BLOCK` channels (DeepGEMM's fine-grained activation scales; jquant's spec
``<fmt>/token128``) instead of one per token:

* :func:`norm_modulate_quantize`: LayerNorm or RMSNorm (optional affine), adaLN modulation
  ``(1 + scale) * norm(x) + shift`` and the quantization, in one pass: the producer feeding QKV
  and FFN-up.
* :func:`activation_quantize`: the FFN-up GEMM's epilogue: the activation function, then the
  quantization of its own output for FFN-down.

Both compute in float32 and quantize from float32 (no rounding to the model dtype in between:
a fused kernel keeps the modulated values in registers), except that a rotation rotates the
values rounded to bf16. Their codes decode to the unfused
path's (the model's norm and modulation in float, then ``jquant.quantize(y, "<fmt>/token128")``)
within one rounding step of the format. The quantizer is the per-token rule of
:mod:`pallas_kernels._quant` (jquant's, to the bit) applied to every ``BLOCK``-wide slice of a row.
"""

from __future__ import annotations

from typing import Callable, Literal

import jax
import jax.numpy as jnp

from jquant.hadamard import apply_block_hadamard
from pallas_kernels import _quant

Array = jax.Array
#: Channels per activation scale (one scale per token per BLOCK channels), DeepGEMM's 128.
BLOCK = 128
#: The formats a producer writes (the keys of ``_quant.QMAX``): int8, and fp8 e4m3.
FORMATS = tuple(_quant.QMAX)
NormKind = Literal["layer", "rms"]
#: The FFN activations by diffusers' names (the formulas of ``jquant.models.embeddings``).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda v: jax.nn.gelu(v, approximate=False),
    "gelu_tanh": lambda v: jax.nn.gelu(v, approximate=True),
    "relu": jax.nn.relu,
}


def _check_fmt(fmt: str, block: int, width: int, name: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"{name}: format {fmt!r} not in {FORMATS}")
    if block < 1 or width % block:
        raise ValueError(
            f"{name}: rows of {width} channels do not split into {block}-channel scale blocks "
            f"(the width must be a multiple of {block})"
        )


def quantize_blocks(y: Array, fmt: str = "int8", block: int = BLOCK) -> tuple[Array, Array]:
    """``(codes [..., K], scales f32 [..., K / block])``: one scale per token per ``block`` channels.

    Each ``block``-wide slice of a row is quantized by jquant's per-token rule
    (``_quant.reference``: ``scale = max(amax / qmax, 1e-12)``, codes ``y / scale`` clipped, int8
    rounded half to even), so the result equals ``jquant.quantize(y, f"{fmt}/token{block}")``.
    """
    k = y.shape[-1]
    _check_fmt(fmt, block, k, "quantize_blocks")
    lead = y.shape[:-1]
    codes, scales = _quant.reference(y.astype(jnp.float32).reshape(-1, block), fmt)
    return codes.reshape(*lead, k), scales.reshape(*lead, k // block)


def dequantize_blocks(codes: Array, scales: Array, block: int = BLOCK) -> Array:
    """float32 values of :func:`quantize_blocks`' output."""
    lead, k = codes.shape[:-1], codes.shape[-1]
    y = codes.astype(jnp.float32).reshape(*lead, k // block, block) * scales[..., None].astype(jnp.float32)
    return y.reshape(*lead, k)


def normalize(
    x: Array, kind: NormKind = "layer", eps: float = 1e-6, weight: Array | None = None, bias: Array | None = None
) -> Array:
    """float32 LayerNorm (``"layer"``) or RMSNorm (``"rms"``) over the last axis, then the optional
    affine ``* weight + bias`` (the formulas of ``jquant.models.blocks.LayerNorm`` / ``RMSNorm``)."""
    xf = x.astype(jnp.float32)
    if kind == "layer":
        mean = xf.mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps)
    elif kind == "rms":
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps)
    else:
        raise ValueError(f"normalize: kind must be 'layer' or 'rms', got {kind!r}")
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y


def _per_row(v: Array, x: Array, name: str) -> Array:
    """adaLN vector ``[B, D]`` (one per sample, broadcast over tokens) or anything broadcastable to ``x``."""
    v = jnp.asarray(v, jnp.float32)
    if v.ndim == 2 and x.ndim == 3 and v.shape == (x.shape[0], x.shape[-1]):
        return v[:, None, :]
    try:
        jnp.broadcast_shapes(v.shape, x.shape)
    except ValueError:
        raise ValueError(f"norm_modulate_quantize: {name} of shape {v.shape} does not broadcast to x {x.shape}")
    return v


def norm_modulate(
    x: Array,
    norm_scale: Array | None,
    norm_bias: Array | None,
    shift: Array,
    scale: Array,
    eps: float = 1e-6,
    kind: NormKind = "layer",
) -> Array:
    """``(1 + scale) * norm(x) + shift`` in float32; ``shift``/``scale`` ``[B, D]`` (per sample, as
    ``jquant.models.blocks.modulate``) or broadcastable to ``x`` ``[B, T, D]``."""
    y = normalize(x, kind, eps, norm_scale, norm_bias)
    return y * (1 + _per_row(scale, x, "scale")) + _per_row(shift, x, "shift")


def norm_modulate_quantize(
    x: Array,
    norm_scale: Array | None,
    norm_bias: Array | None,
    shift: Array,
    scale: Array,
    eps: float = 1e-6,
    kind: NormKind = "layer",
    fmt: str = "int8",
    block: int = BLOCK,
    hadamard: int = 0,
) -> tuple[Array, Array]:
    """The QKV / FFN-up producer: :func:`norm_modulate`, optionally QuaRot's block-diagonal online
    rotation of order ``hadamard`` (``jquant.hadamard.apply_block_hadamard`` in float32 of the
    values rounded to bf16 first, as the unfused path rounds to the model dtype and as the kernel
    rotates with one bf16 MMA), then :func:`quantize_blocks`.

    Returns ``(codes [..., D], scales f32 [..., D / block])`` for a block-scaled GEMM
    (``jquant.dispatch.block_scaled_dot``).
    """
    _check_fmt(fmt, block, x.shape[-1], "norm_modulate_quantize")
    y = norm_modulate(x, norm_scale, norm_bias, shift, scale, eps, kind)
    if hadamard:
        if hadamard < 2 or x.shape[-1] % hadamard:
            raise ValueError(
                f"norm_modulate_quantize: a block rotation of order {hadamard} does not tile D={x.shape[-1]}"
            )
        y = apply_block_hadamard(_quant.round_to_bf16(y), hadamard, axis=-1)
    return quantize_blocks(y, fmt, block)


def activation_quantize(
    y: Array, act: str = "gelu_tanh", fmt: str = "int8", block: int = BLOCK, hadamard: int = 0, mul: Array | None = None
) -> tuple[Array, Array]:
    """The FFN-up epilogue: ``act(y)`` in float32, quantized per token per ``block`` channels for
    FFN-down. ``y`` is the FFN-up GEMM's output (bias added) ``[..., F]``. ``mul`` ``[F]``
    multiplies the activation per channel first (QuaRot's random signs: FFN-down's ``input_mul``).
    ``hadamard=b`` then applies QuaRot's block-diagonal rotation of order ``b`` to the activation
    rounded to bf16 (what the unfused path rotates: the model's bf16 hidden activation), in float32."""
    if act not in ACTIVATIONS:
        raise ValueError(f"activation_quantize: activation {act!r} not in {sorted(ACTIVATIONS)}")
    _check_fmt(fmt, block, y.shape[-1], "activation_quantize")
    v = ACTIVATIONS[act](y.astype(jnp.float32))
    if mul is not None:
        v = v * jnp.asarray(mul, jnp.float32).reshape(-1)
    if hadamard:
        if hadamard < 2 or y.shape[-1] % hadamard:
            raise ValueError(f"activation_quantize: a block rotation of order {hadamard} does not tile F={y.shape[-1]}")
        v = apply_block_hadamard(_quant.round_to_bf16(v), hadamard, axis=-1)
    return quantize_blocks(v, fmt, block)
