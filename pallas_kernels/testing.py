"""Random inputs, a kernel registry and the output checks shared by the GPU check, the benchmarks and tests.

Each :class:`KernelCase` names one kernel, its plain-JAX reference (same
signature), a generator of random quantized inputs for an ``(M, K, N)`` problem,
the work it does (operations and the fewest bytes it must move) and how to judge its
output (:func:`compare`), so that the scripts can check it against the reference, then
time it against XLA, without knowing anything kernel-specific.

Dot products are judged elementwise against a bound scaled by the magnitude of the sum,
``|y - y_ref| <= tol * (|x| @ |w|^T + |bias|) + ulp(out) * |y_ref|`` (:func:`check_dot`):
the relative error of a cancelling sum says little (a correct kernel's output element near
zero has a large relative error, a wrong kernel's error hides in the norm of a few large
ones); the accumulation and weight-rounding errors a correct kernel makes are bounded by
the sum of the absolute products, and rounding the output to bf16 by one unit in its last
place.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import (
    _common,
    _quant,
    act_quant,
    fused_producers,
    gemm_act_quant,
    lowrank_quant,
    norm_quant,
    w4_table,
    w4a8,
    w4a16_gemm,
    w8a8,
    weight_only,
)


def _any_shape(m: int, k: int, n: int) -> bool:  # pylint: disable=unused-argument
    """The default of :attr:`KernelCase.takes`: every ``(M, K, N)``."""
    return True


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """A kernel, its reference and how to build and size its inputs."""

    name: str
    kernel: Callable[..., jax.Array]
    reference: Callable[..., jax.Array]
    make_inputs: Callable[[jax.Array, int, int, int], tuple]
    flops: Callable[[int, int, int], float]
    min_bytes: Callable[[int, int, int], float]
    xla_baseline: str | None = None  # "int8" / "fp8": which XLA low-bit GEMM to time beside it
    # ``magnitude(*inputs)``: ``|x| @ |w|^T + |bias|`` (f32 [M, N]) of a GEMM case, for
    # :func:`check_dot`; for the quantizer with a low-rank output, that of ``h = x @ L1``.
    magnitude: Callable[..., jax.Array] | None = None
    # The dot-product bound's factor on ``magnitude`` (check_dot): 1e-3 where the kernel sums
    # exact products in int32/fp32 (only the fp32 scale products and the fp8 wgmma's accumulator
    # differ); 8e-3 where weights or scales are rounded to bf16 in registers (2^-9 each) and
    # where two bf16 roundings add up (a branch added in bf16).
    tol: float = 1e-3
    # Maps inputs to (fn, inputs) for timing, for kernels whose weights a model
    # converts once at load time (the conversion stays out of the timed call).
    bench_form: Callable[[tuple], tuple[Callable[..., jax.Array], tuple]] | None = None
    # K must be a multiple of this (the scale block of the codebook formats); the GPU check
    # rounds its ragged K up to it.
    k_multiple: int = 1
    # Quantizers: the largest fraction of differing codes and relative scale error the GPU check
    # accepts (exact kernels 1e-4 / 1e-6; the fused Hadamard sums in another float32 order, so a
    # row's max may round to the neighbouring bf16: one ulp, 2^-7).
    quant_tol: tuple[float, float] = (1e-4, 1e-6)
    # ``takes(M, K, N)``: whether the kernel takes that problem (K already rounded up to
    # ``k_multiple``); the GPU check prints the others as SKIP with ``shape_rule`` (what it takes).
    takes: Callable[[int, int, int], bool] = _any_shape
    shape_rule: str = ""


def _int8(key, shape):
    return jax.random.randint(key, shape, -127, 128, jnp.int32).astype(jnp.int8)


def _fp8(key, shape):
    return (jax.random.normal(key, shape, jnp.float32) * 2.0).astype(jnp.float8_e4m3fn)


def _scales(key, shape, lo=0.5, hi=1.5, scale=1.0):
    return jax.random.uniform(key, shape, jnp.float32, lo, hi) * scale


def w8a8_int8_inputs(key, m, k, n):
    kx, kw, ks, kt, kb = jax.random.split(key, 5)
    return (
        _int8(kx, (m, k)),
        _scales(ks, (m, 1), scale=1 / 127),
        _int8(kw, (n, k)),
        _scales(kt, (n,), scale=1 / 127),
        jax.random.normal(kb, (n,), jnp.float32),
    )


def w4a8_inputs(key, m, k, n):
    kx, kw, ks, kt, kb = jax.random.split(key, 5)
    q = jax.random.randint(kw, (n, k), -8, 8, jnp.int32)
    return (
        _int8(kx, (m, k)),
        _scales(ks, (m, 1), scale=1 / 127),
        weight_only.pack_int4(q),
        _scales(kt, (n,), scale=1 / 7),
        jax.random.normal(kb, (n,), jnp.float32),
    )


def svdquant_r32_inputs(key, m, k, n, rank=32):
    kx, kq, k1, k2 = jax.random.split(key, 4)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    _, xs, packed, ws, b = w4a8_inputs(kq, m, k, n)
    x_q = jnp.clip(jnp.round(x.astype(jnp.float32) / 0.03), -127, 127).astype(jnp.int8)
    l1 = (jax.random.normal(k1, (k, rank), jnp.float32) / k**0.5).astype(jnp.bfloat16)
    l2 = (jax.random.normal(k2, (rank, n), jnp.float32) * 0.1).astype(jnp.bfloat16)
    return (x, x_q, xs, packed, ws, l1, l2, b)


def w8a8_fp8_inputs(key, m, k, n):
    kx, kw, ks, kt, kb = jax.random.split(key, 5)
    return (
        _fp8(kx, (m, k)),
        _scales(ks, (m, 1)),
        _fp8(kw, (n, k)),
        _scales(kt, (n,)),
        jax.random.normal(kb, (n,), jnp.float32),
    )


def _block_inputs(codes, key, m, k, n):
    """Block-scaled GEMM operands: ``codes(key, shape)`` for x and w, one scale per token per
    128-wide K slice, one per 128x128 weight block, and a bias."""
    kx, kw, ks, kt, kb = jax.random.split(key, 5)
    kb_ = _common.cdiv(k, 128)
    nb = _common.cdiv(n, 128)
    return (
        codes(kx, (m, k)),
        _scales(ks, (m, kb_)),
        codes(kw, (n, k)),
        _scales(kt, (nb, kb_)),
        jax.random.normal(kb, (n,), jnp.float32),
    )


w8a8_fp8_block_inputs = functools.partial(_block_inputs, _fp8)
w8a8_int8_block_inputs = functools.partial(_block_inputs, _int8)


def w4a16_inputs(key, m, k, n, group=128):
    kx, kw, ks = jax.random.split(key, 3)
    q = jax.random.randint(kw, (n, k), -8, 8, jnp.int32)
    packed = weight_only.pack_int4(q)
    scales = _scales(ks, (n, _common.cdiv(k, group)), scale=0.02)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    return (x, packed, scales)


def w8a16_inputs(key, m, k, n):
    kx, kw, ks = jax.random.split(key, 3)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    return (x, _int8(kw, (n, k)), _scales(ks, (n,), scale=0.002))


def table_inputs(key, m, k, n, fmt="nf4", block=64, scaling=""):
    """Random 4-bit codebook weights: uniform codes; absmax-like, e8m0 ("mx") or e4m3 ("nv")
    block scales (NVFP4 with an fp32 tensor scale)."""
    kx, kw, ks = jax.random.split(key, 3)
    codes = jax.random.randint(kw, (n, k), 0, 16, jnp.int32)
    shape = (n, _common.cdiv(k, block))
    if scaling == "mx":
        scales = jnp.exp2(jax.random.randint(ks, shape, -9, -5).astype(jnp.float32))
    elif scaling == "nv":
        scales = _scales(ks, shape, 1.0, 400.0).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    else:
        scales = _scales(ks, shape, scale=0.05)
    tensor = jnp.float32(1 / 4096) if scaling == "nv" else None
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    return (x, weight_only.pack_int4(codes), scales, tensor)


def uint4_inputs(key, m, k, n, group=128):
    """Unsigned 4-bit codes with per-group scales and zero points (AWQ-style)."""
    kx, kw, ks, kz = jax.random.split(key, 4)
    codes = jax.random.randint(kw, (n, k), 0, 16, jnp.int32)
    shape = (n, _common.cdiv(k, group))
    zeros = jax.random.randint(kz, shape, 0, 16, jnp.int32).astype(jnp.uint8)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    return (x, weight_only.pack_int4(codes), _scales(ks, shape, scale=0.02), zeros)


def _uint4_bench_form(inputs, group=128):
    x, packed, scales, zeros = inputs
    prepared = w4_table.prepare_uint4(packed, scales, zeros, x.shape[1], group)
    return weight_only.w4a16_matmul_prepared, (x, prepared)


def _table_case(name, fmt, block, scaling):
    kernel = functools.partial(w4_table.w4_table_matmul, fmt=fmt, block=block)
    reference = functools.partial(w4_table.w4_table_matmul_reference, fmt=fmt, block=block)

    def bench_form(inputs):
        x, packed, scales, tensor = inputs
        prepared = w4_table.prepare_w4_table(packed, scales, x.shape[1], fmt=fmt, block=block)
        return w4_table.w4_table_matmul_prepared, (x, prepared, tensor)

    return KernelCase(
        name,
        kernel,
        reference,
        functools.partial(table_inputs, fmt=fmt, block=block, scaling=scaling),
        _gemm_flops,
        lambda m, k, n: 2 * m * k + n * k / 2 + 4 * n * k / block + 2 * m * n,
        bench_form=bench_form,
        k_multiple=block,
        magnitude=functools.partial(_mag_table, fmt=fmt, block=block),
        tol=8e-3,
    )


def w8a16_fp8_inputs(key, m, k, n):
    kx, kw, ks = jax.random.split(key, 3)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    return (x, _fp8(kw, (n, k)), _scales(ks, (n,), scale=0.01))


def act_quant_inputs(key, m, k, n):
    del n
    return (jax.random.normal(key, (m, k), jnp.float32).astype(jnp.bfloat16) * 3,)


def act_quant_lowrank_inputs(key, m, k, n, rank=32):
    del n
    kx, k1 = jax.random.split(key)
    return (
        act_quant_inputs(kx, m, k, 0)[0],
        (jax.random.normal(k1, (k, rank), jnp.float32) / k**0.5).astype(jnp.bfloat16),
    )


#: The rotation flag of each fused rotation + quantizer case (True: full width; b: block-diagonal).
ROTATIONS: dict[str, bool | int] = {}


def _hadamard_case(name: str, fmt: str, wide: bool = False, rotation: bool | int = True) -> KernelCase:
    """The fused rotation + quantizer on ``[M, K]`` (``[M, N]`` when ``wide``) activations;
    ``rotation``: True for the full-width Hadamard, ``b`` for the block-diagonal one."""
    quant = act_quant.quantize_int8 if fmt == "int8" else act_quant.quantize_fp8
    width = (lambda m, k, n: n) if wide else (lambda m, k, n: k)
    block = None if rotation is True else int(rotation)  # apply_block_hadamard takes multiples of it
    ROTATIONS[name] = rotation
    return KernelCase(
        name,
        functools.partial(quant, hadamard=rotation),
        functools.partial(_quant.reference, fmt=fmt, hadamard=rotation),  # pylint: disable=protected-access
        lambda key, m, k, n: act_quant_inputs(key, m, width(m, k, n), 0),
        lambda m, k, n: 3.0 * m * width(m, k, n),
        lambda m, k, n: 3 * m * width(m, k, n) + 4 * m,
        quant_tol=(1e-3, 2.0**-7),
        takes=_any_shape if block is None else (lambda m, k, n: width(m, k, n) % block == 0),
        shape_rule="" if block is None else f"the rotated width {'N' if wide else 'K'} a multiple of the block {block}",
    )


def act_inputs(key, m, k, n):
    """``(y bf16 [M, N], bias f32 [N])``: an FFN-up GEMM's output (N wide: Wan's 8960 in the
    check's shapes) and its bias, for the bias + activation + quantize path."""
    del k
    ky, kb = jax.random.split(key)
    return act_quant_inputs(ky, m, n, 0)[0], 0.5 * jax.random.normal(kb, (n,), jnp.float32)


def _act_case(name: str, fmt: str, activation: str = "gelu_tanh", approx: bool = False) -> KernelCase:
    """``act_quant.quantize_act``: the FFN-up output's bias + activation applied as the per-token
    quantizer loads it (always the kernel: the GPU check runs it verified or not), against
    ``act_quant.act_reference``. The kernel's and XLA's float32 tanh may differ in the last bits:
    a code on a rounding boundary moves one step, a scale by a few ulps. ``approx``: the
    default program with ``QuantizerConfig.approx`` (its approximate division and scaling)."""

    def kernel(y, b):
        cfg = dataclasses.replace(act_quant.act_config(y.shape[1]), approx=True) if approx else None
        return act_quant.quantize_act(y, b, activation, fmt, method="pallas", config=cfg)

    return KernelCase(
        name,
        kernel,
        lambda y, b: act_quant.act_reference(y, b, activation, fmt),
        act_inputs,
        lambda m, k, n: 12.0 * m * n,
        lambda m, k, n: 3 * m * n + 4 * m + 4 * n,
        quant_tol=(1e-3, 1e-5),
    )


def norm_quant_inputs(key, m, k, n, *, affine: str, per_row: bool):
    """``(x bf16 [M, K], norm_scale, norm_bias, shift, scale)`` for the norm + modulation +
    quantization producer: ``affine`` "" (Wan's and Flux's adaLN norms), "w" (RMSNorm's weight)
    or "wb"; the modulation ``[M, K]`` per row (``per_row``) or one ``[K]`` vector, float32."""
    del n
    kx, kw, kb, ks, kt = jax.random.split(key, 5)
    x = (jax.random.normal(kx, (m, k), jnp.float32) * 2 + 0.5).astype(jnp.bfloat16)
    w = 1 + 0.1 * jax.random.normal(kw, (k,), jnp.float32) if "w" in affine else None
    b = 0.1 * jax.random.normal(kb, (k,), jnp.float32) if "b" in affine else None
    shape = (m, k) if per_row else (k,)
    return x, w, b, 0.3 * jax.random.normal(ks, shape, jnp.float32), 0.3 * jax.random.normal(kt, shape, jnp.float32)


#: The relative scale error a rotated block allows when the kernel and its reference rotate values
#: rounded to bf16: one value v_i the two float32 orders round to neighbouring bf16 values moves a
#: rotated value by ulp(v_i) / sqrt(128) <= 2^-7 |v_i| / sqrt(128), and the block's amax is at least
#: its RMS, >= |v_i| / sqrt(128): one flip moves the scale by up to 2^-7 relative
#: (tests/test_gemm_act_quant.py's property test reaches it within 2%).
ROTATED_BF16_SCALE_TOL = 2.0**-7


def _norm_quant_kernel(x, w, b, shift, scale, *, kind: str, fmt: str, hadamard: int = 0, per_token: bool = False):
    """The Pallas producer (always the kernel: the GPU check must run it, verified or not), in the
    interpreter off the GPU; ``per_token``: one scale per row."""
    interpret = not _common._default_device_is_gpu()  # pylint: disable=protected-access
    return norm_quant.norm_modulate_quantize_pallas(
        x, w, b, shift, scale, 1e-6, kind, fmt, interpret=interpret, hadamard=hadamard, block=_scale_block(x, per_token)
    )


def _norm_quant_reference(x, w, b, shift, scale, *, kind: str, fmt: str, hadamard: int = 0, per_token: bool = False):
    return fused_producers.norm_modulate_quantize(
        x, w, b, shift, scale, eps=1e-6, kind=kind, fmt=fmt, hadamard=hadamard, block=_scale_block(x, per_token)
    )


def _scale_block(x, per_token: bool) -> int:
    """Channels per scale of a norm producer case: the whole row, or 128."""
    return x.shape[-1] if per_token else fused_producers.BLOCK


def _norm_quant_case(
    name: str, kind: str, fmt: str, affine: str, per_row: bool, hadamard: int = 0, per_token: bool = False
) -> KernelCase:
    """LayerNorm / RMSNorm + adaLN modulation (+ QuaRot's order-``hadamard`` block rotation) +
    per-(token, 128) quantization, or per token with ``per_token`` (norm_quant), against
    fused_producers.norm_modulate_quantize; K whole 128-channel scale blocks (and wider than the
    rotation)."""

    def min_bytes(m: int, k: int, n: int) -> float:  # x bf16, float32 vectors, codes, scales
        modulation = 2 * 4 * (m * k if per_row else k)
        return 2 * m * k + modulation + 4 * k * len(affine) + m * k + 4 * m * k / fused_producers.BLOCK

    return KernelCase(
        name,
        functools.partial(_norm_quant_kernel, kind=kind, fmt=fmt, hadamard=hadamard, per_token=per_token),
        functools.partial(_norm_quant_reference, kind=kind, fmt=fmt, hadamard=hadamard, per_token=per_token),
        functools.partial(norm_quant_inputs, affine=affine, per_row=per_row),
        # ~12 operations per value: sums, centring, rsqrt scale, affine, modulation, absmax, division.
        lambda m, k, n: 12.0 * m * k,
        min_bytes,
        # The sums and multiply-adds round in another order (norm_quant's docstring): a scale a
        # few float32 ulp off, a code on a rounding boundary one step off. The rotation rotates the
        # rows rounded to bf16, so a value the two orders put on either side of a bf16 rounding
        # boundary moves the rotated block's scale by up to ROTATED_BF16_SCALE_TOL (measured on
        # the H200: 5.1e-4, check_kernels-norm_quant_rounded_had128-NVIDIA_H200.txt at 2ab3f74).
        quant_tol=(1e-3, ROTATED_BF16_SCALE_TOL if hadamard else 1e-6),
        takes=lambda m, k, n: k % fused_producers.BLOCK == 0 and k > hadamard,
        shape_rule=f"K a multiple of {fused_producers.BLOCK}" + (f", above {hadamard}" if hadamard else ""),
    )


def gemm_act_quant_inputs(codes, key, m, k, n):
    """Block-scaled GEMM operands (:func:`_block_inputs`) with the activation scales shrunk so
    the pre-activation values have a standard deviation of about 2: the activation's curved
    part (not only its linear tail) decides the codes."""
    x, xs, w, ws, b = _block_inputs(codes, key, m, k, n)
    y = w8a8._block_reference(x, xs, w, ws, None, jnp.float32)  # pylint: disable=protected-access
    shrink = 2.0 / jnp.maximum(jnp.std(y), 1e-30)
    return x, xs * shrink, w, ws, 0.5 * b


def gemm_act_quant_signed_inputs(codes, key, m, k, n):
    """:func:`gemm_act_quant_inputs` plus random +-1 column multipliers (QuaRot's signs)."""
    k1, k2 = jax.random.split(key)
    signs = jnp.where(jax.random.bernoulli(k2, 0.5, (n,)), 1.0, -1.0).astype(jnp.float32)
    return (*gemm_act_quant_inputs(codes, k1, m, k, n), signs)


def _gemm_act_quant_case(
    name: str, fmt: str, hadamard: int = 0, cta_n: int | None = None, mul: bool = False
) -> KernelCase:
    """The FFN-up producer (gemm_act_quant): block-scaled GEMM + gelu_tanh (times random signs
    with ``mul``; + QuaRot's order-128 block rotation) + per-(token, 128) quantization to ``fmt``,
    operands in the same format, against the float32 GEMM + fused_producers.activation_quantize;
    ``cta_n`` pins the tile width (None: the default)."""
    inputs = gemm_act_quant_signed_inputs if mul else gemm_act_quant_inputs
    make = functools.partial(inputs, _int8 if fmt == "int8" else _fp8)
    config = w8a8.block_config(cta_n, bool(hadamard)) if cta_n else None
    return KernelCase(
        name,
        functools.partial(gemm_act_quant.gemm_act_quant, act="gelu_tanh", fmt=fmt, hadamard=hadamard, config=config),
        functools.partial(gemm_act_quant.gemm_act_quant_reference, act="gelu_tanh", fmt=fmt, hadamard=hadamard),
        make,
        _gemm_flops,
        lambda m, k, n: m * k + n * k + m * n + 4 * m * (k + n) / 128,
        # The block GEMM's own check allows 1e-3 |x||w|; a scale is an amax of GEMM outputs, so
        # 1e-3 relative. Codes differ where the float32 sums' other order (and fp8 wgmma's
        # accumulator) moves a value across a rounding boundary: perturbing the reference's
        # outputs by 1e-4 relative moves 2e-3 of them on the CPU, so at most 1e-2. With the
        # rotation the scale is an amax of rotated bf16 values (ROTATED_BF16_SCALE_TOL).
        quant_tol=(1e-2, ROTATED_BF16_SCALE_TOL if hadamard else 1e-3),
        takes=lambda m, k, n: n % fused_producers.BLOCK == 0,
        shape_rule=f"N a multiple of {fused_producers.BLOCK}",
    )


def _w4a16_bench_form(inputs, group=128):
    x, packed, scales = inputs
    prepared = weight_only.prepare_w4a16(packed, scales, x.shape[1], group)
    return weight_only.w4a16_matmul_prepared, (x, prepared)


def _gemm_flops(m, k, n):
    return 2.0 * m * k * n


# --------------------------------------------------------------------------
# Magnitudes |x| @ |w|^T (+ |bias|) of each GEMM case's inputs: the scale of the check_dot bound.
# --------------------------------------------------------------------------


def abs_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """``|x| [M, K] @ |w| [N, K]^T`` in float32 at highest precision."""
    return lax.dot_general(
        jnp.abs(x.astype(jnp.float32)),
        jnp.abs(w.astype(jnp.float32)),
        (((1,), (1,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )


def _plus_bias(mag, bias):
    return mag if bias is None else mag + jnp.abs(bias.astype(jnp.float32)).reshape(1, -1)


def _deq_w8a8(x_q, x_scale, w_q, w_scale, bias=None, *_):
    x = x_q.astype(jnp.float32) * x_scale.astype(jnp.float32).reshape(-1, 1)
    return x, w_q.astype(jnp.float32) * w_scale.astype(jnp.float32).reshape(-1, 1), bias


def _deq_block(x_q, x_scale, w_q, w_scale, bias=None):
    k = x_q.shape[1]
    xs = jnp.repeat(x_scale.astype(jnp.float32), 128, axis=1)[:, :k]
    ws = jnp.repeat(jnp.repeat(w_scale.astype(jnp.float32), 128, axis=0)[: w_q.shape[0]], 128, axis=1)[:, :k]
    return x_q.astype(jnp.float32) * xs, w_q.astype(jnp.float32) * ws, bias


def _deq_w4a8(x_q, x_scale, w_packed, w_scale, bias=None):
    return _deq_w8a8(x_q, x_scale, weight_only.unpack_int4(w_packed, x_q.shape[1]), w_scale, bias)


_DEQUANTIZED = {
    "w8a8_int8": _deq_w8a8,
    "w8a8_fp8": _deq_w8a8,
    "w8a8_fp8_block": _deq_block,
    "w8a8_int8_block": _deq_block,
    **{f"w8a8_{fmt}_block_n{width}": _deq_block for fmt in ("fp8", "int8") for width in (128, 256)},
    "w4a8": _deq_w4a8,
}


def dequantized_operands(name: str, inputs: tuple) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(x f32 [M, K], w f32 [N, K], bias)`` with the scales applied, for the cases with an XLA
    low-bit baseline (``y = x @ w^T + bias``)."""
    return _DEQUANTIZED[name](*inputs)


def _mag_of(deq):
    def magnitude(*inputs):
        x, w, bias = deq(*inputs)
        return _plus_bias(abs_dot(x, w), bias)

    return magnitude


_mag_w8a8 = _mag_of(_deq_w8a8)
_mag_block = _mag_of(_deq_block)
_mag_w4a8 = _mag_of(_deq_w4a8)


def _mag_svdquant(x, x_q, x_scale, w_packed, w_scale, l1, l2, bias=None):
    lowrank = jnp.abs(x.astype(jnp.float32)) @ jnp.abs(l1.astype(jnp.float32)) @ jnp.abs(l2.astype(jnp.float32))
    return _mag_w4a8(x_q, x_scale, w_packed, w_scale, bias) + lowrank


def _mag_w4a16(x, w_packed, w_scale, bias=None, *_, group=128):
    return _plus_bias(abs_dot(x, weight_only.dequantize_int4(w_packed, w_scale, x.shape[1], group)), bias)


def _mag_w8a16(x, w_q, w_scale, bias=None, *_):
    return _plus_bias(abs_dot(x, w_q) * jnp.abs(w_scale.astype(jnp.float32)).reshape(1, -1), bias)


def _mag_uint4(x, w_packed, w_scale, w_zero, bias=None, *_, group=128):
    u = weight_only.unpack_int4(w_packed, x.shape[1]).astype(jnp.int32) & 0xF
    rep = lambda a: jnp.repeat(a.astype(jnp.float32), group, axis=1)[:, : x.shape[1]]
    return _plus_bias(abs_dot(x, (u.astype(jnp.float32) - rep(w_zero)) * rep(w_scale)), bias)


def _mag_table(x, w_packed, w_scale, tensor_scale=None, bias=None, *_, fmt, block):
    mag = abs_dot(x, w4_table.dequantize(w_packed, w_scale, x.shape[1], fmt=fmt, block=block))
    if tensor_scale is not None:
        mag = mag * jnp.abs(jnp.asarray(tensor_scale, jnp.float32))
    return _plus_bias(mag, bias)


def _mag_lowrank_h(x, l1):
    return abs_dot(x, l1.T)


CASES: dict[str, KernelCase] = {
    "w8a8_int8": KernelCase(
        "w8a8_int8",
        w8a8.int8_matmul,
        w8a8.int8_matmul_reference,
        w8a8_int8_inputs,
        _gemm_flops,
        lambda m, k, n: m * k + n * k + 2 * m * n,
        xla_baseline="int8",
        magnitude=_mag_w8a8,
    ),
    "w8a8_fp8": KernelCase(
        "w8a8_fp8",
        w8a8.fp8_matmul,
        w8a8.fp8_matmul_reference,
        w8a8_fp8_inputs,
        _gemm_flops,
        lambda m, k, n: m * k + n * k + 2 * m * n,
        xla_baseline="fp8",
        magnitude=_mag_w8a8,
    ),
    "w8a8_fp8_block": KernelCase(
        "w8a8_fp8_block",
        w8a8.fp8_block_matmul,
        w8a8.fp8_block_matmul_reference,
        w8a8_fp8_block_inputs,
        _gemm_flops,
        lambda m, k, n: m * k + n * k + 2 * m * n + 4 * m * k / 128,
        xla_baseline="fp8",
        magnitude=_mag_block,
    ),
    "w8a8_int8_block": KernelCase(
        "w8a8_int8_block",
        w8a8.int8_block_matmul,
        w8a8.int8_block_matmul_reference,
        w8a8_int8_block_inputs,
        _gemm_flops,
        lambda m, k, n: m * k + n * k + 2 * m * n + 4 * m * k / 128,
        xla_baseline="int8",
        magnitude=_mag_block,
    ),
    # The same kernels with the tile width pinned: 128 x 128, or 128 x 256 (two 128-column scale
    # blocks per CTA); the unpinned cases above run the default (w8a8.BLOCK_CTA_N).
    **{
        f"w8a8_{fmt}_block_n{width}": KernelCase(
            f"w8a8_{fmt}_block_n{width}",
            functools.partial(run, config=w8a8.block_config(width)),
            reference,
            make,
            _gemm_flops,
            lambda m, k, n: m * k + n * k + 2 * m * n + 4 * m * k / 128,
            xla_baseline=fmt,
            magnitude=_mag_block,
        )
        for fmt, run, reference, make in (
            ("fp8", w8a8.fp8_block_matmul, w8a8.fp8_block_matmul_reference, w8a8_fp8_block_inputs),
            ("int8", w8a8.int8_block_matmul, w8a8.int8_block_matmul_reference, w8a8_int8_block_inputs),
        )
        for width in (128, 256)
    },
    "w4a8": KernelCase(
        "w4a8",
        w4a8.w4a8_matmul,
        w4a8.w4a8_matmul_reference,
        w4a8_inputs,
        _gemm_flops,
        lambda m, k, n: m * k + n * k / 2 + 2 * m * n,
        xla_baseline="int8",
        magnitude=_mag_w4a8,
    ),
    "svdquant_r32": KernelCase(
        "svdquant_r32",
        w4a8.svdquant_matmul,
        w4a8.svdquant_matmul_reference,
        svdquant_r32_inputs,
        lambda m, k, n: 2.0 * m * k * n + 2.0 * 32 * (m * k + m * n),
        lambda m, k, n: 3 * m * k + n * k / 2 + 2 * 32 * (k + n) + 2 * m * n,
        magnitude=_mag_svdquant,
        tol=8e-3,
    ),
    "w4a16": KernelCase(
        "w4a16",
        weight_only.w4a16_matmul,
        weight_only.w4a16_matmul_reference,
        w4a16_inputs,
        _gemm_flops,
        lambda m, k, n: 2 * m * k + n * k / 2 + 4 * n * k / 128 + 2 * m * n,
        bench_form=_w4a16_bench_form,
        magnitude=_mag_w4a16,
        tol=8e-3,
    ),
    # int4 with 32-wide groups: the decode-and-scale path with an identity decode.
    "w4a16_g32": KernelCase(
        "w4a16_g32",
        functools.partial(weight_only.w4a16_matmul, group_size=32),
        functools.partial(weight_only.w4a16_matmul_reference, group_size=32),
        functools.partial(w4a16_inputs, group=32),
        _gemm_flops,
        lambda m, k, n: 2 * m * k + n * k / 2 + 4 * n * k / 32 + 2 * m * n,
        bench_form=functools.partial(_w4a16_bench_form, group=32),
        magnitude=functools.partial(_mag_w4a16, group=32),
        tol=8e-3,
    ),
    "w8a16": KernelCase(
        "w8a16",
        weight_only.w8a16_matmul,
        weight_only.w8a16_matmul_reference,
        w8a16_inputs,
        _gemm_flops,
        lambda m, k, n: 2 * m * k + n * k + 4 * n + 2 * m * n,
        magnitude=_mag_w8a16,
        tol=8e-3,
    ),
    "w8a16_fp8": KernelCase(
        "w8a16_fp8",
        weight_only.w8a16_matmul,
        weight_only.w8a16_matmul_reference,
        w8a16_fp8_inputs,
        _gemm_flops,
        lambda m, k, n: 2 * m * k + n * k + 4 * n + 2 * m * n,
        magnitude=_mag_w8a16,
        tol=8e-3,
    ),
    "w4a16_zp": KernelCase(
        "w4a16_zp",
        functools.partial(w4_table.uint4_matmul, group_size=128),
        functools.partial(w4_table.uint4_matmul_reference, group_size=128),
        uint4_inputs,
        _gemm_flops,
        lambda m, k, n: 2 * m * k + n * k / 2 + 5 * n * k / 128 + 2 * m * n,
        bench_form=_uint4_bench_form,
        k_multiple=128,
        magnitude=_mag_uint4,
        tol=8e-3,
    ),
    # NF4 (block 64, QLoRA's default), MXFP4 (e2m1, e8m0 scales per 32), NVFP4 (e2m1, e4m3
    # scales per 16 and an fp32 tensor scale).
    "nf4_w16": _table_case("nf4_w16", "nf4", 64, ""),
    "fp4_w16": _table_case("fp4_w16", "fp4", 32, "mx"),
    "nvfp4_w16": _table_case("nvfp4_w16", "fp4", 16, "nv"),
    "act_quant": KernelCase(
        "act_quant",
        act_quant.quantize_int8,
        act_quant.quantize_int8_reference,
        act_quant_inputs,
        lambda m, k, n: 3.0 * m * k,
        lambda m, k, n: 2 * m * k + m * k + 4 * m,
    ),
    "act_quant_fp8": KernelCase(
        "act_quant_fp8",
        act_quant.quantize_fp8,
        act_quant.quantize_fp8_reference,
        act_quant_inputs,
        lambda m, k, n: 3.0 * m * k,
        lambda m, k, n: 2 * m * k + m * k + 4 * m,
    ),
    # QuaRot's online Hadamard fused into the quantizer, against apply_hadamard + the reference;
    # "_wide" quantizes an [M, N] activation (the input of a layer whose K is this one's N), so
    # Wan's 8960-wide FFN rows take the gathered layout (pallas_kernels.hadamard_gather).
    "act_quant_hadamard": _hadamard_case("act_quant_hadamard", "int8"),
    "act_quant_hadamard_wide": _hadamard_case("act_quant_hadamard_wide", "int8", wide=True),
    "act_quant_hadamard_fp8": _hadamard_case("act_quant_hadamard_fp8", "fp8"),
    # The block-diagonal rotation (QuaRotConfig.online_block = 128) fused into the quantizer.
    "act_quant_block128": _hadamard_case("act_quant_block128", "int8", rotation=128),
    "act_quant_block128_wide": _hadamard_case("act_quant_block128_wide", "int8", wide=True, rotation=128),
    "act_quant_block128_fp8": _hadamard_case("act_quant_block128_fp8", "fp8", rotation=128),
    # The FFN-up output's bias and gelu_tanh applied as the per-token quantizer loads it (FFN-down's
    # codes in a per-token W8A8 run: act_quant.ACT_GPU_VERIFIED).
    "act_quant_gelu_int8": _act_case("act_quant_gelu_int8", "int8"),
    "act_quant_gelu_fp8": _act_case("act_quant_gelu_fp8", "fp8"),
    # The same with QuantizerConfig.approx (act_quant.ACT_APPROX_GPU_VERIFIED).
    "act_quant_gelu_int8_approx": _act_case("act_quant_gelu_int8_approx", "int8", approx=True),
    "act_quant_gelu_fp8_approx": _act_case("act_quant_gelu_fp8_approx", "fp8", approx=True),
    # SVDQuant's down-projection h = x @ L1 fused into the quantizer: (codes, scales, h).
    "act_quant_lowrank": KernelCase(
        "act_quant_lowrank",
        lowrank_quant.quantize_lowrank,
        lowrank_quant.reference,
        act_quant_lowrank_inputs,
        lambda m, k, n: 3.0 * m * k + 2.0 * m * k * 32,
        lambda m, k, n: 2 * m * k + m * k + 4 * m + 2 * m * 32 + 2 * k * 32,
        magnitude=_mag_lowrank_h,
        tol=8e-3,
    ),
    # The norm + adaLN modulation + per-(token, 128) quantization producer (issue 19): Wan's
    # LayerNorm without affine and per-token modulation; an affine LayerNorm; an RMSNorm weight.
    "norm_quant_layer_int8": _norm_quant_case("norm_quant_layer_int8", "layer", "int8", "", True),
    "norm_quant_layer_fp8": _norm_quant_case("norm_quant_layer_fp8", "layer", "fp8", "wb", False),
    "norm_quant_rms_fp8": _norm_quant_case("norm_quant_rms_fp8", "rms", "fp8", "w", True),
    "norm_quant_layer_int8_had128": _norm_quant_case("norm_quant_layer_int8_had128", "layer", "int8", "", False, 128),
    "norm_quant_layer_fp8_had128": _norm_quant_case("norm_quant_layer_fp8_had128", "layer", "fp8", "", False, 128),
    # The same producer with one scale per token (the norm sees whole rows): for the per-token
    # W8A8 GEMM (norm_quant.TOKEN_GPU_VERIFIED).
    "norm_quant_layer_int8_token": _norm_quant_case(
        "norm_quant_layer_int8_token", "layer", "int8", "", True, per_token=True
    ),
    "norm_quant_rms_fp8_token": _norm_quant_case("norm_quant_rms_fp8_token", "rms", "fp8", "w", False, per_token=True),
    "norm_quant_layer_int8_had128_token": _norm_quant_case(
        "norm_quant_layer_int8_had128_token", "layer", "int8", "", False, 128, per_token=True
    ),
    # The FFN-up producer: block-scaled GEMM + activation + per-(token, 128) quantization.
    "gemm_act_quant_int8": _gemm_act_quant_case("gemm_act_quant_int8", "int8"),
    "gemm_act_quant_fp8": _gemm_act_quant_case("gemm_act_quant_fp8", "fp8"),
    "gemm_act_quant_int8_had128": _gemm_act_quant_case("gemm_act_quant_int8_had128", "int8", 128),
    **{
        f"gemm_act_quant_{fmt}_n{width}": _gemm_act_quant_case(f"gemm_act_quant_{fmt}_n{width}", fmt, cta_n=width)
        for fmt in ("int8", "fp8")
        for width in (128, 256)
    },
    "gemm_act_quant_int8_had128_n256": _gemm_act_quant_case("gemm_act_quant_int8_had128_n256", "int8", 128, 256),
    # QuaRot's randomized rotation: the signs (FFN-down's input_mul) in the epilogue (MUL_GPU_VERIFIED).
    "gemm_act_quant_int8_had128_mul": _gemm_act_quant_case("gemm_act_quant_int8_had128_mul", "int8", 128, mul=True),
    "gemm_act_quant_fp8_mul_n256": _gemm_act_quant_case("gemm_act_quant_fp8_mul_n256", "fp8", 0, 256, mul=True),
}


def _rows(w) -> int:
    """Output channels of a weight operand: ``[N, ...]`` arrays, or prepared (``W4Prepared``) weights."""
    return w.n if isinstance(w, weight_only.W4Prepared) else w.shape[0]


def kernel_path(name: str, inputs: tuple) -> str:
    """Which implementation the public wrapper of ``name`` runs for ``inputs`` here (the raw
    inputs of ``make_inputs``, or those of its ``bench_form``: x first, then the weights)."""
    x = inputs[0]
    if name in ("w8a8_int8", "w8a8_fp8"):
        return "kernel" if w8a8.supports(inputs[0], inputs[2]) else "reference"
    if name == "w4a8":
        return "kernel" if w4a8.supports(inputs[0]) else "reference"
    if name == "svdquant_r32":
        return "kernel" if w4a8.supports(inputs[1]) else "reference"
    if name.startswith(("w8a8_fp8_block", "w8a8_int8_block")):
        return "kernel" if w8a8.supports_block(inputs[0], inputs[2]) else "reference"
    if name in ("w4a16", "w8a16", "w4a16_g32", "w8a16_fp8", "w4a16_zp"):
        if not _common.on_gpu():
            return "reference"
        if name == "w4a16" and w4a16_gemm.supports(x, n=_rows(inputs[1])):
            return "kernel-large"
        if name == "w8a16" and not weight_only.supports(x) and w4a16_gemm.supports(x, n=_rows(inputs[1]), bits=8):
            return "kernel-large"
        group = 32 if name == "w4a16_g32" else 128
        flag = {"w8a16_fp8": weight_only.FP8_W16_GPU_VERIFIED, "w4a16_zp": weight_only.ZERO_POINT_GPU_VERIFIED}.get(
            name, True
        )
        ok = weight_only.supports(x, group) and _common.kernel_enabled(flag)
        return "kernel" if ok else "xla-dequant"
    if name in ("nf4_w16", "fp4_w16", "nvfp4_w16"):
        if not _common.on_gpu():
            return "reference"
        fmt, block = {"nf4_w16": ("nf4", 64), "fp4_w16": ("fp4", 32), "nvfp4_w16": ("fp4", 16)}[name]
        return "kernel" if w4_table.supports(x, block, fmt) else "xla-dequant"
    if name == "act_quant_lowrank":
        return "pallas" if lowrank_quant.supports(*inputs) else "xla"
    if name.startswith("gemm_act_quant"):
        rotation, mul = 128 if "had128" in name else 0, len(inputs) > 5
        return "kernel" if gemm_act_quant.supports(inputs[0], inputs[2], "gelu_tanh", rotation, mul) else "reference"
    if name.startswith("norm_quant"):
        return "pallas" if _common._default_device_is_gpu() else "interpret"  # pylint: disable=protected-access
    if name in ROTATIONS:
        return "pallas" if act_quant.supports(x, hadamard=ROTATIONS[name]) else "xla"
    if name.startswith("act_quant"):
        if not act_quant.supports(x):
            return "xla"
        return "triton" if act_quant._triton_usable(x) else "pallas"  # pylint: disable=protected-access
    raise ValueError(f"unknown kernel {name!r}")


# --------------------------------------------------------------------------
# Judging an output against its reference (the GPU check and the benchmarks).
# --------------------------------------------------------------------------


def out_ulp(dtype) -> float:
    """Relative spacing of ``dtype``'s values (2^-7 for bf16): two roundings of nearly equal
    values to ``dtype`` differ by at most this times their magnitude."""
    dtype = jnp.dtype(dtype)
    return float(jnp.finfo(dtype).eps) if jnp.issubdtype(dtype, jnp.floating) else 0.0


@functools.partial(jax.jit, static_argnames=("tol", "ulp"))
def _dot_stats(out, ref, magnitude, tol, ulp):
    a, b = out.astype(jnp.float32), ref.astype(jnp.float32)
    err = jnp.abs(a - b)
    bound = tol * magnitude.astype(jnp.float32) + ulp * jnp.abs(b)
    ratio = jnp.max(jnp.where(err == 0, 0.0, err / jnp.maximum(bound, 1e-30)))
    rel = jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30)
    return ratio, jnp.all(jnp.isfinite(a)) & jnp.all(jnp.isfinite(b)), rel, jnp.max(err)


def check_dot(out: jax.Array, ref: jax.Array, magnitude: jax.Array, tol: float, rel_tol: float | None = None) -> dict:
    """``|out - ref| <= tol * magnitude + ulp * |ref|`` elementwise, ``magnitude`` = ``|x| @ |w|^T
    (+ |bias|)`` and ``ulp`` the coarser output dtype's spacing (:func:`out_ulp`).

    Returns ``{"ok", "bound_ratio" (max of error over bound; ok means <= 1), "rel" (Frobenius, for
    information), "max_abs", "detail"}``. Non-finite values fail. With ``rel_tol`` the Frobenius
    error must also stay under it (attention: an average of many values, whose magnitude bound
    alone would pass an output scaled wrong where the softmax is flat and the average cancels).
    """
    if tuple(out.shape) != tuple(ref.shape):
        return {"ok": False, "detail": f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"}
    ulp = max(out_ulp(out.dtype), out_ulp(ref.dtype))
    ratio, finite, rel, max_abs = (
        float(v) for v in _dot_stats(out, ref, jnp.broadcast_to(magnitude, ref.shape), float(tol), ulp)
    )
    ok = bool(finite) and ratio <= 1.0 and (rel_tol is None or rel <= rel_tol)
    detail = (
        f"err/bound={ratio:.3g} (tol {tol:g}*|x||w| + {ulp:.3g}*|ref|) rel={rel:.2e}"
        + ("" if rel_tol is None else f" (<= {rel_tol:g})")
        + f" max_abs={max_abs:.3g}"
        + ("" if finite else " NON-FINITE")
    )
    return {"ok": ok, "bound_ratio": ratio, "rel": rel, "max_abs": max_abs, "detail": detail}


def check_gemm(out: jax.Array, ref: jax.Array, x: jax.Array, w_nk: jax.Array, tol: float = 1e-3) -> dict:
    """:func:`check_dot` for ``x [M, K] @ w [N, K]^T`` (the XLA baselines)."""
    return check_dot(out, ref, abs_dot(x, w_nk), tol)


@jax.jit
def _quant_stats(q, s, qr, sr):
    q, s, qr, sr = (v.astype(jnp.float32) for v in (q, s, qr, sr))
    diff = jnp.abs(q - qr)
    frac = jnp.mean((diff > 0).astype(jnp.float32))
    s_err = jnp.max(jnp.abs(s - sr) / jnp.maximum(jnp.abs(sr), 1e-30))
    finite = jnp.all(jnp.isfinite(q)) & jnp.all(jnp.isfinite(s))
    return frac, jnp.max(diff), s_err, finite


def check_quantized(out: tuple, ref: tuple, quant_tol: tuple[float, float], h: dict | None = None) -> dict:
    """Quantizer outputs ``(codes, scales)``: the fraction of differing codes and the largest
    relative scale error against ``quant_tol``; ``h``: check_dot's verdict on a third output."""
    q, s = out[:2]
    qr, sr = ref[:2]
    if q.shape != qr.shape or s.shape != sr.shape:
        return {"ok": False, "detail": f"shapes {q.shape}, {s.shape} != reference {qr.shape}, {sr.shape}"}
    frac, max_diff, s_err, finite = (float(v) for v in _quant_stats(q, s, qr, sr))
    frac_tol, scale_tol = quant_tol
    ok = bool(finite) and frac <= frac_tol and s_err <= scale_tol and (h is None or h["ok"])
    detail = (
        f"mismatch_frac={frac:.2e} max_q_diff={max_diff:.3g} scale_rel={s_err:.2e}"
        + ("" if finite else " NON-FINITE")
        + (f" h: {h['detail']}" if h else "")
    )
    return {"ok": ok, "mismatch_frac": frac, "scale_rel": s_err, "detail": detail}


def compare(case: KernelCase, out, ref, inputs: tuple) -> dict:
    """Judges ``out`` (the kernel's, or its bench form's) against ``ref`` (the reference on the
    raw ``inputs``): quantizers by codes and scales, GEMMs by :func:`check_dot`."""
    if isinstance(out, tuple):
        h = None
        if len(out) == 3:
            h = check_dot(out[2], ref[2], case.magnitude(*inputs), case.tol)
        return check_quantized(out, ref, case.quant_tol, h)
    if case.magnitude is None:
        raise ValueError(f"{case.name}: no magnitude to judge a dot product by")
    return check_dot(out, ref, case.magnitude(*inputs), case.tol)
