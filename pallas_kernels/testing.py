"""Random inputs and a kernel registry shared by the GPU check, the benchmark and tests.

Each :class:`KernelCase` names one kernel, its plain-JAX reference (same
signature), a generator of random quantized inputs for an ``(M, K, N)`` problem,
and the work it does (operations and the fewest bytes it must move), so that the
scripts can time it against XLA and compare it with the reference without knowing
anything kernel-specific.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import act_quant
from pallas_kernels import lowrank_quant
from pallas_kernels import w4_table
from pallas_kernels import w4a16_gemm
from pallas_kernels import w4a8
from pallas_kernels import w8a8
from pallas_kernels import weight_only


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
  rel_tol: float = 1e-2
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


def _int8(key, shape):
  return jax.random.randint(key, shape, -127, 128, jnp.int32).astype(jnp.int8)


def _fp8(key, shape):
  return (jax.random.normal(key, shape, jnp.float32) * 2.0).astype(jnp.float8_e4m3fn)


def _scales(key, shape, lo=0.5, hi=1.5, scale=1.0):
  return jax.random.uniform(key, shape, jnp.float32, lo, hi) * scale


def w8a8_int8_inputs(key, m, k, n):
  kx, kw, ks, kt, kb = jax.random.split(key, 5)
  return (_int8(kx, (m, k)), _scales(ks, (m, 1), scale=1 / 127), _int8(kw, (n, k)),
          _scales(kt, (n,), scale=1 / 127), jax.random.normal(kb, (n,), jnp.float32))


def w4a8_inputs(key, m, k, n):
  kx, kw, ks, kt, kb = jax.random.split(key, 5)
  q = jax.random.randint(kw, (n, k), -8, 8, jnp.int32)
  return (_int8(kx, (m, k)), _scales(ks, (m, 1), scale=1 / 127), weight_only.pack_int4(q),
          _scales(kt, (n,), scale=1 / 7), jax.random.normal(kb, (n,), jnp.float32))


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
  return (_fp8(kx, (m, k)), _scales(ks, (m, 1)), _fp8(kw, (n, k)),
          _scales(kt, (n,)), jax.random.normal(kb, (n,), jnp.float32))


def w8a8_fp8_block_inputs(key, m, k, n):
  kx, kw, ks, kt, kb = jax.random.split(key, 5)
  kb_ = _common.cdiv(k, 128)
  nb = _common.cdiv(n, 128)
  return (_fp8(kx, (m, k)), _scales(ks, (m, kb_)), _fp8(kw, (n, k)),
          _scales(kt, (nb, kb_)), jax.random.normal(kb, (n,), jnp.float32))


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
      name, kernel, reference,
      functools.partial(table_inputs, fmt=fmt, block=block, scaling=scaling), _gemm_flops,
      lambda m, k, n: 2 * m * k + n * k / 2 + 4 * n * k / block + 2 * m * n,
      bench_form=bench_form, k_multiple=block)


def w8a16_fp8_inputs(key, m, k, n):
  kx, kw, ks = jax.random.split(key, 3)
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
  return (x, _fp8(kw, (n, k)), _scales(ks, (n,), scale=0.01))


def _dispatch_tokens(x):
  from jquant.formats import parse_spec  # pylint: disable=g-import-not-at-top
  from pallas_kernels import dispatch  # pylint: disable=g-import-not-at-top

  return dispatch.quantize_tokens(x, parse_spec("int8/token"), None)


def _jquant_tokens(x):
  from jquant.dispatch import quantize_activation  # pylint: disable=g-import-not-at-top
  from jquant.formats import parse_spec  # pylint: disable=g-import-not-at-top
  from jquant.qarray import decode_scale  # pylint: disable=g-import-not-at-top

  xq = quantize_activation(x, parse_spec("int8/token"), None)
  return xq.qvalue, decode_scale(xq).reshape(-1, 1)


def act_quant_inputs(key, m, k, n):
  del n
  return (jax.random.normal(key, (m, k), jnp.float32).astype(jnp.bfloat16) * 3,)


def act_quant_lowrank_inputs(key, m, k, n, rank=32):
  del n
  kx, k1 = jax.random.split(key)
  return (act_quant_inputs(kx, m, k, 0)[0],
          (jax.random.normal(k1, (k, rank), jnp.float32) / k**0.5).astype(jnp.bfloat16))


def _hadamard_case(name: str, fmt: str, wide: bool = False) -> KernelCase:
  """The fused rotation + quantizer on ``[M, K]`` (``[M, N]`` when ``wide``) activations."""
  quant = act_quant.quantize_int8 if fmt == "int8" else act_quant.quantize_fp8
  width = (lambda m, k, n: n) if wide else (lambda m, k, n: k)
  return KernelCase(
      name, functools.partial(quant, hadamard=True),
      functools.partial(act_quant._reference, fmt=fmt, hadamard=True),  # pylint: disable=protected-access
      lambda key, m, k, n: act_quant_inputs(key, m, width(m, k, n), 0),
      lambda m, k, n: 3.0 * m * width(m, k, n), lambda m, k, n: 3 * m * width(m, k, n) + 4 * m,
      quant_tol=(1e-3, 2.0**-7))


def _w4a16_bench_form(inputs, group=128):
  x, packed, scales = inputs
  prepared = weight_only.prepare_w4a16(packed, scales, x.shape[1], group)
  return weight_only.w4a16_matmul_prepared, (x, prepared)


def _gemm_flops(m, k, n):
  return 2.0 * m * k * n


CASES: dict[str, KernelCase] = {
    "w8a8_int8": KernelCase(
        "w8a8_int8", w8a8.int8_matmul, w8a8.int8_matmul_reference,
        w8a8_int8_inputs, _gemm_flops,
        lambda m, k, n: m * k + n * k + 2 * m * n, xla_baseline="int8"),
    "w8a8_fp8": KernelCase(
        "w8a8_fp8", w8a8.fp8_matmul, w8a8.fp8_matmul_reference,
        w8a8_fp8_inputs, _gemm_flops,
        lambda m, k, n: m * k + n * k + 2 * m * n, xla_baseline="fp8"),
    "w8a8_fp8_block": KernelCase(
        "w8a8_fp8_block", w8a8.fp8_block_matmul, w8a8.fp8_block_matmul_reference,
        w8a8_fp8_block_inputs, _gemm_flops,
        lambda m, k, n: m * k + n * k + 2 * m * n + 4 * m * k / 128,
        xla_baseline="fp8"),
    "w4a8": KernelCase(
        "w4a8", w4a8.w4a8_matmul, w4a8.w4a8_matmul_reference,
        w4a8_inputs, _gemm_flops,
        lambda m, k, n: m * k + n * k / 2 + 2 * m * n, xla_baseline="int8"),
    "svdquant_r32": KernelCase(
        "svdquant_r32", w4a8.svdquant_matmul, w4a8.svdquant_matmul_reference,
        svdquant_r32_inputs, lambda m, k, n: 2.0 * m * k * n + 2.0 * 32 * (m * k + m * n),
        lambda m, k, n: 3 * m * k + n * k / 2 + 2 * 32 * (k + n) + 2 * m * n),
    "w4a16": KernelCase(
        "w4a16", weight_only.w4a16_matmul, weight_only.w4a16_matmul_reference,
        w4a16_inputs, _gemm_flops,
        lambda m, k, n: 2 * m * k + n * k / 2 + 4 * n * k / 128 + 2 * m * n,
        bench_form=_w4a16_bench_form),
    # int4 with 32-wide groups: the decode-and-scale path with an identity decode.
    "w4a16_g32": KernelCase(
        "w4a16_g32", functools.partial(weight_only.w4a16_matmul, group_size=32),
        functools.partial(weight_only.w4a16_matmul_reference, group_size=32),
        functools.partial(w4a16_inputs, group=32), _gemm_flops,
        lambda m, k, n: 2 * m * k + n * k / 2 + 4 * n * k / 32 + 2 * m * n,
        bench_form=functools.partial(_w4a16_bench_form, group=32)),
    "w8a16": KernelCase(
        "w8a16", weight_only.w8a16_matmul, weight_only.w8a16_matmul_reference,
        w8a16_inputs, _gemm_flops,
        lambda m, k, n: 2 * m * k + n * k + 4 * n + 2 * m * n),
    "w8a16_fp8": KernelCase(
        "w8a16_fp8", weight_only.w8a16_matmul, weight_only.w8a16_matmul_reference,
        w8a16_fp8_inputs, _gemm_flops,
        lambda m, k, n: 2 * m * k + n * k + 4 * n + 2 * m * n),
    "w4a16_zp": KernelCase(
        "w4a16_zp", functools.partial(w4_table.uint4_matmul, group_size=128),
        functools.partial(w4_table.uint4_matmul_reference, group_size=128),
        uint4_inputs, _gemm_flops,
        lambda m, k, n: 2 * m * k + n * k / 2 + 5 * n * k / 128 + 2 * m * n,
        bench_form=_uint4_bench_form, k_multiple=128),
    # NF4 (block 64, QLoRA's default), MXFP4 (e2m1, e8m0 scales per 32), NVFP4 (e2m1, e4m3
    # scales per 16 and an fp32 tensor scale).
    "nf4_w16": _table_case("nf4_w16", "nf4", 64, ""),
    "fp4_w16": _table_case("fp4_w16", "fp4", 32, "mx"),
    "nvfp4_w16": _table_case("nvfp4_w16", "fp4", 16, "nv"),
    "act_quant": KernelCase(
        "act_quant", act_quant.quantize_int8, act_quant.quantize_int8_reference,
        act_quant_inputs, lambda m, k, n: 3.0 * m * k,
        lambda m, k, n: 2 * m * k + m * k + 4 * m),
    "act_quant_fp8": KernelCase(
        "act_quant_fp8", act_quant.quantize_fp8, act_quant.quantize_fp8_reference,
        act_quant_inputs, lambda m, k, n: 3.0 * m * k,
        lambda m, k, n: 2 * m * k + m * k + 4 * m),
    # QuaRot's online Hadamard fused into the quantizer, against apply_hadamard + the reference;
    # "_wide" quantizes an [M, N] activation (the input of a layer whose K is this one's N), so
    # Wan's 8960-wide FFN rows take the gathered layout (pallas_kernels.hadamard_gather).
    "act_quant_hadamard": _hadamard_case("act_quant_hadamard", "int8"),
    "act_quant_hadamard_wide": _hadamard_case("act_quant_hadamard_wide", "int8", wide=True),
    "act_quant_hadamard_fp8": _hadamard_case("act_quant_hadamard_fp8", "fp8"),
    # SVDQuant's down-projection h = x @ L1 fused into the quantizer: (codes, scales, h).
    "act_quant_lowrank": KernelCase(
        "act_quant_lowrank", lowrank_quant.quantize_lowrank, lowrank_quant.reference,
        act_quant_lowrank_inputs, lambda m, k, n: 3.0 * m * k + 2.0 * m * k * 32,
        lambda m, k, n: 2 * m * k + m * k + 4 * m + 2 * m * 32 + 2 * k * 32),
    # The dispatch's activation quantization (kernel where it applies) against jquant's own
    # XLA quantize: the W8A8 kernel path must see the XLA path's codes.
    "act_quant_jquant": KernelCase(
        "act_quant_jquant", _dispatch_tokens, _jquant_tokens,
        act_quant_inputs, lambda m, k, n: 3.0 * m * k,
        lambda m, k, n: 2 * m * k + m * k + 4 * m),
}


def kernel_path(name: str, inputs: tuple) -> str:
  """Which implementation the public wrapper of ``name`` runs for ``inputs`` here."""
  x = inputs[0]
  if name in ("w8a8_int8", "w8a8_fp8"):
    return "kernel" if w8a8.supports(inputs[0], inputs[2]) else "reference"
  if name == "w4a8":
    return "kernel" if w4a8.supports(inputs[0]) else "reference"
  if name == "svdquant_r32":
    return "kernel" if w4a8.supports(inputs[1]) else "reference"
  if name == "w8a8_fp8_block":
    return "kernel" if w8a8.supports_block(inputs[0], inputs[2]) else "reference"
  if name in ("w4a16", "w8a16", "w4a16_g32", "w8a16_fp8", "w4a16_zp"):
    if not _common.on_gpu():
      return "reference"
    if name == "w4a16" and w4a16_gemm.supports(x, n=inputs[1].shape[0]):
      return "kernel-large"
    if name == "w8a16" and not weight_only.supports(x) and w4a16_gemm.supports(x, n=inputs[1].shape[0], bits=8):
      return "kernel-large"
    group = 32 if name == "w4a16_g32" else 128
    flag = {"w8a16_fp8": weight_only.FP8_W16_GPU_VERIFIED,
            "w4a16_zp": weight_only.ZERO_POINT_GPU_VERIFIED}.get(name, True)
    ok = weight_only.supports(x, group) and _common.kernel_enabled(flag)
    return "kernel" if ok else "xla-dequant"
  if name in ("nf4_w16", "fp4_w16", "nvfp4_w16"):
    if not _common.on_gpu():
      return "reference"
    fmt, block = {"nf4_w16": ("nf4", 64), "fp4_w16": ("fp4", 32), "nvfp4_w16": ("fp4", 16)}[name]
    return "kernel" if w4_table.supports(x, block, fmt) else "xla-dequant"
  if name == "act_quant_lowrank":
    return "pallas" if lowrank_quant.supports(*inputs) else "xla"
  if name.startswith("act_quant_hadamard"):
    return "pallas" if act_quant.supports(x, hadamard=True) else "xla"
  if name.startswith("act_quant"):
    if not act_quant.supports(x):
      return "xla"
    return "triton" if act_quant._triton_usable(x) else "pallas"  # pylint: disable=protected-access
  raise ValueError(f"unknown kernel {name!r}")
