"""What the per-token activation quantizers share: jquant's per-token rule (scale floor, codes
rounded half to even), the plain-JAX reference, program configuration and the exact bf16
helpers. act_quant (the Pallas kernel and its routing), hadamard_gather, triton_quant and
lowrank_quant all build on this module; none of them imports another for these."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant.hadamard import apply_block_hadamard, online_block
from pallas_kernels import _common

CHUNK = 1024


#: Widest row (padded to a power of two) the single-pass kernel holds in registers.
SINGLE_PASS_MAX = 16384


QMAX = {"int8": 127.0, "fp8": 448.0}


QDTYPE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
    """One program's work: ``rows`` tokens, ``warps`` warps, one pass or two chunked ones;
    ``stages``: Triton's software-pipelining depth of the chunked loops (1: none).

    ``approx`` (the bias + activation path of act_quant): the activation's division
    ``v / (1 + 2^-u)`` as one ``div.approx.ftz``, its ``ex2.approx`` flushing subnormals (1 plus
    a subnormal is 1 either way), and each code as ``v * (1 / scale)`` by one saturating
    conversion (:func:`to_q_saturating`) where the exact program divides, clamps, rounds and converts:
    fewer instructions a value (SASS for sm_90a, ``scripts/triton_resources.py``) in a program
    that issues about 31 a value. Codes within one step of the exact program's."""

    rows: int = 2
    warps: int = 4
    single_pass: bool = True
    stages: int = 1
    approx: bool = False


def pick_config(k: int) -> QuantizerConfig:
    """Single pass with 8K values per 4-warp program (16K rows: one row, 8 warps), else chunked.

    Measured on an H200 (``benchmarks/act_quant_sweep-NVIDIA_H200.json``): 8K values per
    program with 4 warps beat 16K with 8 or 16 warps and the chunked kernel at every K."""
    width = padded_width(k)
    if width > SINGLE_PASS_MAX:
        return QuantizerConfig(rows=4, warps=4, single_pass=False)
    if width > 8192:
        return QuantizerConfig(rows=1, warps=8, single_pass=True)
    return QuantizerConfig(rows=max(1, 8192 // width), warps=4, single_pass=True)


def padded_width(k: int) -> int:
    """K padded to a power of two (Triton block shapes are powers of two)."""
    return 1 << max(0, (k - 1).bit_length())


def round_half_even(v: jax.Array) -> jax.Array:
    """Round to nearest, ties to even, from floor and exact f32 differences.

    Triton has no round primitive, and the usual ``(v + 1.5*2**23) - 1.5*2**23``
    trick is folded away by XLA's simplifier (so it would not survive the CPU
    interpreter); ``v - floor(v)`` is exact, so this matches ``jnp.round``.
    """
    f = jnp.floor(v)
    d = v - f
    odd = (f - 2.0 * jnp.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return f + jnp.where(up, 1.0, 0.0)


def rint(v: jax.Array, interpret: bool) -> jax.Array:
    """Round half to even: one ``cvt.rni`` per value on the GPU, ``floor`` arithmetic elsewhere."""
    if interpret:
        return round_half_even(v)
    return _ptx("cvt.rni.f32.f32", jnp.float32, v)


def _ptx(op: str, result_dtype, *args: jax.Array) -> jax.Array:
    """One PTX instruction ``op $0, $1[, $2]`` per value (float32 operands)."""
    import jax.experimental.pallas.triton as pltriton  # pylint: disable=g-import-not-at-top

    operands = ", ".join(f"${i}" for i in range(len(args) + 1))
    (r,) = pltriton.elementwise_inline_asm(
        f"{op} {operands};",
        args=list(args),
        constraints=",".join(["=r"] + ["r"] * len(args)),
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, result_dtype)],
    )
    return r


def exp2(v: jax.Array, interpret: bool, ftz: bool = False) -> jax.Array:
    """``2 ** v`` in float32: one ``ex2.approx`` per value on the GPU (relative error about 2^-22;
    Pallas' lowering of ``jnp.exp2`` calls libdevice's accurate sequence instead), ``jnp.exp2``
    elsewhere. ``ftz``: subnormal results are 0, which saves ptxas's three-instruction rescaling
    of arguments below -126."""
    if interpret:
        return jnp.exp2(v)
    return _ptx("ex2.approx.ftz.f32" if ftz else "ex2.approx.f32", jnp.float32, v)


def div_approx(a: jax.Array, b: jax.Array, interpret: bool) -> jax.Array:
    """``a / b`` in float32 by ``div.approx.ftz`` on the GPU (a reciprocal and a multiply, about
    2 ulp; ``a / b`` is IEEE division, a longer sequence), ``a / b`` elsewhere."""
    if interpret:
        return a / b
    return _ptx("div.approx.ftz.f32", jnp.float32, a, b)


def to_q_saturating(v: jax.Array, fmt: str, interpret: bool) -> jax.Array:
    """Codes of float32 ``v`` already within ``[-QMAX, QMAX]`` up to rounding (``v * (1 / scale)``
    with ``scale = absmax / QMAX``: at most QMAX (1 + 2^-22)) by one saturating conversion: int8
    by ``cvt.rni.sat.s8`` (round half to even; the saturation never reaches -128), e4m3 by
    Triton's conversion, which saturates to +-448 itself. :func:`to_q` clamps first (two more
    instructions a value, and for int8 a round and Triton's clamping conversion: four). The
    interpreter takes :func:`to_q`: the same codes."""
    if interpret:
        return to_q(v, fmt, interpret)
    if fmt == "int8":
        return _ptx("cvt.rni.sat.s8.f32", jnp.int32, v).astype(jnp.int8)
    return v.astype(QDTYPE[fmt])


def to_q(v: jax.Array, fmt: str, interpret: bool = True) -> jax.Array:
    qmax = QMAX[fmt]
    v = jnp.clip(v, -qmax, qmax)
    if fmt == "int8":
        v = rint(v, interpret)
    return v.astype(QDTYPE[fmt])


#: jquant's scale floor (``jquant.qarray.compute_scales``): an all-zero row gets it, and codes 0.
SCALE_FLOOR = 1e-12


def scale_of(amax: jax.Array, fmt: str) -> jax.Array:
    return jnp.maximum(amax / QMAX[fmt], SCALE_FLOOR).astype(jnp.float32)


def check(x):
    _common.check_rank("quantize: x", x, 2)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"quantize: x must be floating point, got {x.dtype}")


def reference(x, fmt, hadamard: bool | int = False):
    """jquant's per-token rule; ``hadamard`` (True: full width, int: block order) rotates first."""
    check(x)
    xf = x.astype(jnp.float32)
    if hadamard:  # jquant.nn's online rotation: x @ H in float32, rounded to x's dtype
        # The rounding on the bits: XLA's GPU simplifier drops an f32 -> bf16 -> f32 round trip
        # (excess precision), which left this reference quantizing unrounded rows on the GPU.
        xf = apply_block_hadamard(xf, online_block(hadamard), axis=-1)
        xf = round_to_bf16(xf) if x.dtype == jnp.bfloat16 else xf.astype(x.dtype).astype(jnp.float32)
    scale = scale_of(jnp.max(jnp.abs(xf), axis=1, keepdims=True), fmt)
    q = jnp.clip(xf / scale, -QMAX[fmt], QMAX[fmt])
    if fmt == "int8":
        q = jnp.round(q)
    return q.astype(QDTYPE[fmt]), scale


def bf16_parts(v: jax.Array, n: int) -> list[jax.Array]:
    """``n`` bf16 pieces summing to ``v`` (three hold a float32 exactly): products with +-1
    matrices on bf16 tensor cores stay exact whatever precision the dot would pick for float32."""
    parts = []
    for _ in range(n):
        p = v.astype(jnp.bfloat16)
        parts.append(p)
        v = v - p.astype(jnp.float32)
    return parts


def pm1_dot(v: jax.Array, m: jax.Array, pieces: int) -> jax.Array:
    """``v @ m`` in float32 for a +-1 / 0 bf16 matrix ``m``, as ``pieces`` exact bf16 products."""
    out = None
    for p in bf16_parts(v, pieces):
        d = jnp.dot(p, m, preferred_element_type=jnp.float32)
        out = d if out is None else out + d
    return out


def round_to_bf16(y: jax.Array) -> jax.Array:
    """float32 -> nearest bf16 (ties to even), kept in float32, with integer ops on the bits.

    ``y.astype(bf16).astype(f32)`` means the same, but a compiler may fold that round trip away
    (XLA's GPU simplifier does: excess precision); bit arithmetic cannot be folded. Finite inputs
    only (activations)."""
    bits = lax.bitcast_convert_type(y, jnp.uint32)
    bias = jnp.uint32(0x7FFF) + ((bits >> jnp.uint32(16)) & jnp.uint32(1))
    return lax.bitcast_convert_type((bits + bias) & jnp.uint32(0xFFFF0000), jnp.float32)


def rotate_rounded(v: jax.Array, h_s, block: int) -> jax.Array:
    """float32 ``bf16(v) @ H_block / sqrt(block)`` for ``[chunks, block]`` rows: ``v`` rounded to
    bf16 (:func:`round_to_bf16`), then one bf16 MMA with the +-1 Sylvester matrix ``h_s``, whose
    products are exact and summed in float32. The producers' rotation: a third of the MMAs of
    rotating the float32 rows exactly (:func:`rotate_block` with float32), and the rounding the
    unfused path applies anyway (the model dtype before the rotation)."""
    return pm1_dot(round_to_bf16(v), h_s[...], 1) * np.float32(1.0 / math.sqrt(block))


def rotate_block(v: jax.Array, h_s, block: int, dtype) -> jax.Array:
    """``v @ H_block`` inside a kernel for ``[chunks, block]`` rows (one block of QuaRot's
    block-diagonal rotation each; ``h_s`` the +-1 Sylvester matrix), exact in float32 through
    bf16 parts, then rounded to ``dtype`` like jquant.nn's XLA path (float32: no rounding)."""
    z = pm1_dot(v, h_s[...], 1 if dtype == jnp.bfloat16 else 3) * np.float32(1.0 / math.sqrt(block))
    if dtype == jnp.bfloat16:
        return round_to_bf16(z)
    return z.astype(dtype).astype(jnp.float32)
