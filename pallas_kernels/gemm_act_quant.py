"""The FFN-up producer (issue 19): a block-scaled 8-bit GEMM whose epilogue applies the FFN
activation and quantizes its own output for FFN-down, so no separate pass reads the hidden
activation again.

``gelu_tanh(x @ w^T + b)`` (or another of :data:`KERNEL_ACTIVATIONS`) with ``x`` int8 / e4m3
codes at one scale per token per 128 channels and ``w`` in 128 x 128 blocks (the operands of
:func:`pallas_kernels.w8a8.fp8_block_matmul` / ``int8_block_matmul``), then the per-token rule
of :mod:`pallas_kernels._quant` on every 128-wide slice of the output row: ``(codes [M, N],
scales [M, N / 128])``, the ``<fmt>/token128`` activation a block-scaled FFN-down consumes.

On Hopper the kernel is :func:`pallas_kernels.w8a8.block_gemm_pallas` with ``epilogue=(act,
fmt)``: each 128-column piece of a CTA's output tile is exactly one scale block, so the CTA owns
the amax of its rows and writes codes and scales straight from registers. Elsewhere (and on a GPU
without :data:`GPU_VERIFIED`) the reference runs: the block-scaled GEMM in float32,
then :func:`pallas_kernels.fused_producers.activation_quantize`. Kernel and reference agree
within one rounding step of the format on codes that sit on a rounding boundary (the float32
sums run in another order); the GPU check's case ``gemm_act_quant_*`` bounds how many.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _common, act_quant, fused_producers, w8a8

#: ``JQUANT_BACKEND=pallas scripts/check_kernels_gpu.py --kernels gemm_act_quant_int8,gemm_act_quant_fp8``
#: passed on an H200 at 93e0741 (``benchmarks/check_kernels-gemm_act_quant-NVIDIA_H200.txt``).
GPU_VERIFIED = True
#: The rotating epilogue (``hadamard=128``): ``gemm_act_quant_int8_had128`` passed at 93e0741 (same log).
HADAMARD_GPU_VERIFIED = True
#: The column multiplier (``mul``: QuaRot's random signs before the rotation): the ``*_mul`` cases
#: ran on an H200 at 6d9d244 (``benchmarks/check_kernels-gemm_act_quant_mul-NVIDIA_H200.txt``):
#: every code and scale within the rounding bounds; the one row marked FAIL there was a rotated
#: scale 1.01e-3 off against the un-rotated 1e-3 bound, which testing.py now derives as 2^-7.
MUL_GPU_VERIFIED = True
#: Activations the kernel's epilogue computes (their formulas lower to Mosaic GPU); the others
#: of ``fused_producers.ACTIVATIONS`` run the reference.
KERNEL_ACTIVATIONS = ("gelu_tanh", "relu")
_NAME = "gemm_act_quant"
#: The one block-diagonal rotation order the epilogue applies: one 128-column output tile.
ROTATION = 128


def _check(x_q, x_scale, w_q, w_scale, bias, act: str, fmt: str, hadamard: int = 0, mul=None) -> None:
    dtype = jnp.dtype(x_q.dtype)
    if dtype not in (w8a8._INT8, w8a8._FP8):  # pylint: disable=protected-access
        raise ValueError(f"{_NAME}: x_q must be int8 or float8_e4m3fn codes, got {x_q.dtype}")
    w8a8._check_block_operands(x_q, x_scale, w_q, w_scale, bias, _NAME, dtype)  # pylint: disable=protected-access
    if act not in fused_producers.ACTIVATIONS:
        raise ValueError(f"{_NAME}: activation {act!r} not in {sorted(fused_producers.ACTIVATIONS)}")
    if fmt not in fused_producers.FORMATS:
        raise ValueError(f"{_NAME}: output format {fmt!r} not in {fused_producers.FORMATS}")
    n = w_q.shape[0]
    if n % fused_producers.BLOCK:
        raise ValueError(
            f"{_NAME}: N={n} output channels do not split into {fused_producers.BLOCK}-channel scale "
            "blocks (the FFN-down input's scales); N must be a multiple of 128"
        )
    if hadamard not in (0, ROTATION):
        raise ValueError(f"{_NAME}: hadamard must be 0 or {ROTATION} (one rotation block per tile), got {hadamard}")
    if mul is not None and jnp.shape(mul) != (n,):
        raise ValueError(f"{_NAME}: mul must hold one multiplier per output channel ({n},), got {jnp.shape(mul)}")


def gemm_act_quant_reference(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    mul: jax.Array | None = None,
    *,
    act: str = "gelu_tanh",
    fmt: str = "int8",
    hadamard: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Plain JAX: the block-scaled GEMM in float32 (bias added), then
    :func:`fused_producers.activation_quantize` (times ``mul``, and with the block rotation when
    ``hadamard``)."""
    _check(x_q, x_scale, w_q, w_scale, bias, act, fmt, hadamard, mul)
    y = w8a8._block_reference(x_q, x_scale, w_q, w_scale, bias, jnp.float32)  # pylint: disable=protected-access
    return fused_producers.activation_quantize(y, act, fmt, hadamard=hadamard, mul=mul)


def supports(x_q: jax.Array, w_q: jax.Array, act: str, hadamard: int = 0, mul: bool = False) -> bool:
    """Whether the kernel runs: Hopper, a block-scaled kernel for the operands, an activation
    of :data:`KERNEL_ACTIVATIONS`, and the GPU check passed (or ``JQUANT_BACKEND=pallas``; the
    rotation and the column multiplier have their own flags, :data:`HADAMARD_GPU_VERIFIED` and
    :data:`MUL_GPU_VERIFIED`)."""
    verified = GPU_VERIFIED and (HADAMARD_GPU_VERIFIED or not hadamard) and (MUL_GPU_VERIFIED or not mul)
    return (
        act in KERNEL_ACTIVATIONS
        and hadamard in (0, ROTATION)
        and w8a8.supports_block(x_q, w_q)
        and _common.kernel_enabled(verified)
    )


def gemm_act_quant(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    mul: jax.Array | None = None,
    *,
    act: str = "gelu_tanh",
    fmt: str = "int8",
    hadamard: int = 0,
    config: w8a8.BlockConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``act(x @ w^T + bias)`` quantized per token per 128 channels: ``(codes [M, N] int8 or
    e4m3, scales [M, N/128] float32)``. Operands as :func:`w8a8.fp8_block_matmul`'s (int8 or
    e4m3 alike); N a multiple of 128. ``hadamard=128`` rotates each 128-wide slice of the
    (bf16-rounded) activation by QuaRot's block-diagonal Hadamard before quantizing, for an
    FFN-down whose weights carry the rotation. ``mul`` ``[N]`` multiplies the activation per
    channel before that (QuaRot's random signs, the FFN-down's ``input_mul``). Kernel on Hopper
    (:func:`supports`), reference elsewhere."""
    _check(x_q, x_scale, w_q, w_scale, bias, act, fmt, hadamard, mul)
    if not supports(x_q, w_q, act, hadamard, mul is not None):
        return gemm_act_quant_reference(x_q, x_scale, w_q, w_scale, bias, mul, act=act, fmt=fmt, hadamard=hadamard)
    m = x_q.shape[0]
    x, w, xs_t, ws_t, bias_v = w8a8._prepare_block(x_q, x_scale, w_q, w_scale, bias)  # pylint: disable=protected-access
    h = jnp.asarray(act_quant.block_matrix(2 * ROTATION, ROTATION), jnp.bfloat16) if hadamard else None
    codes, scales_t = w8a8.block_gemm_pallas(
        x,
        w,
        xs_t,
        ws_t,
        bias_v,
        h,
        None if mul is None else _common.pad_axis(jnp.asarray(mul, jnp.float32).reshape(-1), 0, bias_v.shape[0]),
        out_dtype=jnp.bfloat16,
        config=config or w8a8.block_config(rotate=bool(hadamard)),
        sms=_common.num_sms(),
        epilogue=(act, fmt),
    )
    return codes[:m], scales_t[: w_q.shape[0] // fused_producers.BLOCK, :m].T
