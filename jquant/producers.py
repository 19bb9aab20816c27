"""Fused activation producers in a quantized run (issue 19): the kernel that makes an activation
also quantizes it, so no separate quantization pass reads it again.

A port marks its adaLN inputs with ``jquant.models.blocks.NormModulate`` (``modulate(norm(x),
shift, scale)``). Inside ``jquant.nn.quantized(...)`` that module's call returns a
:class:`Produced` instead of an array: the float value (computed as before, and dropped by XLA
where no consumer reads it) plus what the producer needs to make codes. A quantized linear whose
activation spec is ``int8/token128`` or ``fp8_e4m3/token128`` (one scale per token per 128
channels: a producer sees tiles of a row, never the whole row) takes :meth:`Produced.quantized`:
the norm, the modulation and the quantization in one pass (``pallas_kernels.norm_quant`` on the
GPU, ``pallas_kernels.fused_producers`` elsewhere), made once and shared by every such consumer
(a block's Q, K and V). Every other consumer takes :attr:`Produced.value`.

The FFN-up layer is a producer too: a port's ``LinearAct`` (``activation(proj(x))``) returns an
:class:`ActProduced` when ``proj`` is a block-scaled pair (``<fmt>/b128x128`` weights,
``<fmt>/token128`` activations), and an FFN-down with a token128 spec takes the codes that the
FFN-up GEMM's epilogue wrote (``pallas_kernels.gemm_act_quant``): the hidden activation, the
widest in the block, is never written in 16 bits nor read again to be quantized. In a
per-token run (``token_producers``: the FFN-up input is the norm producer's per-token codes) an
FFN-down with a per-token spec takes codes that the activation quantizer makes from the FFN-up
GEMM's output, applying bias and activation as it loads it (``act_quant.quantize_act``): the
hidden activation is written once in 16 bits and read once, with no GELU pass in between.

The codes are quantized from the float32 modulated values (the kernel keeps them in registers),
where the unfused path rounds them to the model dtype first: they match that path's codes within
one rounding step of the format, not bit for bit.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jquant.dispatch import is_per_token, linear_quantized, token_block
from jquant.dispatch.kernels import block_act_quantized, token_act_quantized
from jquant.formats import QSpec
from jquant.qarray import QArray
from pallas_kernels import fused_producers, norm_quant

Array = jax.Array
#: jquant activation formats -> the producers' format names.
PRODUCER_FORMATS = {"int8": "int8", "fp8_e4m3": "fp8"}


def takes(act: QSpec | None, per_token: bool = False) -> bool:
    """Whether a consumer with activation spec ``act`` can take a producer's codes: dynamic,
    symmetric int8 or e4m3, one scale per token per :data:`fused_producers.BLOCK` channels, or
    (``per_token``) one scale per token, which only a norm producer makes (it sees whole rows)."""
    return (
        act is not None
        and act.fmt in PRODUCER_FORMATS
        and act.symmetric
        and (token_block(act) == fused_producers.BLOCK or (per_token and is_per_token(act)))
        and not act.scaling
    )


@dataclasses.dataclass(eq=False)
class Produced(abc.ABC):
    """An activation in a quantized run that its producer can also hand over as codes:
    ``value`` (``[B, T, D]``, the float result every other consumer takes) and, per format and
    rotation, the codes the producer makes (at most once; XLA drops what no consumer reads)."""

    value: Array
    _made: dict = dataclasses.field(default_factory=dict, repr=False, kw_only=True)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    @property
    def dtype(self) -> Any:
        return self.value.dtype

    @property
    def ndim(self) -> int:
        return self.value.ndim

    def quantized(
        self, act: QSpec, hadamard: int = 0, per_token: bool = False, mul: Array | None = None
    ) -> QArray | None:
        """The activation as ``act``'s QArray made by the fused producer, or None where ``act``
        is not one it makes (:func:`takes`; ``per_token`` admits ``<fmt>/token``), the width is
        not whole 128-channel blocks, or ``hadamard`` (QuaRot's block-diagonal online rotation of
        that order, applied by the producer before quantizing; 0: none) does not tile the width or
        this producer cannot apply it. ``mul`` ``[D]``: a per-channel multiplier applied first
        (the consumer's ``input_mul``: QuaRot's random signs), as the unfused path does in the
        model dtype. Codes are made once per format, rotation and multiplier array."""
        d = self.shape[-1]
        if not takes(act, per_token) or self.value.ndim != 3 or d % fused_producers.BLOCK:
            return None
        if hadamard and (hadamard < 2 or hadamard >= d or d % hadamard):
            return None
        if mul is not None and jnp.shape(mul) != (d,):
            return None
        # Keyed by the multiplier's identity (a layer's aux array; kept alive in the value, so
        # its id is not reused): consumers with one multiplier array share one pass.
        key = (PRODUCER_FORMATS[act.fmt], hadamard, is_per_token(act), None if mul is None else id(mul))
        if key not in self._made:
            m = None if mul is None else jnp.asarray(mul).astype(self.value.dtype).astype(jnp.float32)
            self._made[key] = (mul, self._produce(*key[:3], m))
        made = self._made[key][1]
        if made is None:
            return None
        codes, scales = made
        return QArray(codes, scales, spec=act, dtype=self.value.dtype, axis=-1)

    @abc.abstractmethod
    def _produce(self, fmt: str, hadamard: int, per_token: bool, mul: Array | None) -> tuple[Array, Array] | None:
        """``(codes [B, T, D], scales [B, T, D/128])`` in ``fmt`` (``[B, T, 1]`` with
        ``per_token``), or None where it cannot."""


@dataclasses.dataclass(eq=False)
class NormProduced(Produced):
    """A ``NormModulate`` output (the QKV and FFN-up input): the norm, the modulation, the
    optional block rotation and the quantization in one pass over ``x``."""

    x: Array
    shift: Array
    scale: Array
    eps: float
    norm_scale: Array | None = None
    norm_bias: Array | None = None
    kind: str = "layer"

    def _produce(self, fmt: str, hadamard: int, per_token: bool, mul: Array | None) -> tuple[Array, Array]:
        b, t, d = self.x.shape
        block = d if per_token else fused_producers.BLOCK
        norm_scale, norm_bias, shift_in = self.norm_scale, self.norm_bias, self.shift
        if mul is not None:  # ((n g + c)(1 + s) + h) m = (n (g m) + c m)(1 + s) + h m: exact for +-1
            norm_scale = mul if norm_scale is None else jnp.asarray(norm_scale, jnp.float32) * mul
            norm_bias = None if norm_bias is None else jnp.asarray(norm_bias, jnp.float32) * mul
            shift_in = jnp.asarray(shift_in, jnp.float32) * mul
        shift, scale = _per_sample(shift_in, b, d), _per_sample(self.scale, b, d)
        flat = self.x.reshape(b * t, d)
        if shift is not None and scale is not None and norm_quant.supports(flat, hadamard, per_token):
            # One kernel call per sample (vmap adds a grid axis): the [B, D] modulation stays a
            # [D] vector per call instead of a [B*T, D] array in HBM.
            def one(xb: Array, sh: Array, sc: Array) -> tuple[Array, Array]:
                return norm_quant.norm_modulate_quantize_pallas(
                    xb,
                    norm_scale,
                    norm_bias,
                    sh,
                    sc,
                    self.eps,
                    self.kind,
                    fmt,
                    hadamard=hadamard,
                    block=block,
                )

            return jax.vmap(one)(self.x, shift, scale)
        return fused_producers.norm_modulate_quantize(
            self.x,
            norm_scale,
            norm_bias,
            shift_in,
            self.scale,
            self.eps,
            self.kind,
            fmt,
            block=block,
            hadamard=hadamard,
        )


@dataclasses.dataclass(eq=False)
class ActProduced(Produced):
    """A ``LinearAct`` output (the FFN-down input): ``activation(xq @ kernel + bias)``, made
    by the FFN-up GEMM's epilogue (``pallas_kernels.gemm_act_quant``: the kernel on Hopper,
    its float32 reference elsewhere) from the FFN-up input's codes ``xq``; with ``hadamard=128``
    the epilogue also applies QuaRot's block rotation (FFN-down's online one, issue 26). With
    per-token codes ``xq`` and a per-token FFN-down, the per-token GEMM writes the FFN-up output
    and the activation quantizer applies bias and activation as it reads it
    (:func:`jquant.dispatch.kernels.token_act_quantized`)."""

    xq: QArray
    kernel: QArray
    bias: Array | None
    activation: str

    def _produce(self, fmt: str, hadamard: int, per_token: bool, mul: Array | None) -> tuple[Array, Array] | None:
        if not per_token:
            return block_act_quantized(self.xq, self.kernel, self.bias, self.activation, fmt, hadamard, mul)
        # One scale per token: the epilogue sees 128-column tiles of a row, never the whole row,
        # so the per-token GEMM writes the FFN-up output and the quantizer applies the bias and
        # the activation as it loads it (no GELU pass over the widest activation in between).
        if hadamard or mul is not None or not is_per_token(self.xq.spec):
            return None
        y = linear_quantized(self.xq, self.kernel)
        return token_act_quantized(y, self.bias, self.activation, fmt)


def _per_sample(v: Array, b: int, d: int) -> Array | None:
    """A modulation vector as ``[B, D]`` float32 (one per sample), or None for other layouts
    (per-token modulation), which the reference producer handles."""
    v = jnp.asarray(v, jnp.float32)
    if v.shape == (b, d):
        return v
    if v.shape in ((d,), (1, d)):
        return jnp.broadcast_to(v.reshape(1, d), (b, d))
    return None
