"""Per-token activation quantizer: bf16 ``[M, K]`` -> int8 / fp8 e4m3 values + f32 scales.

``scale[m] = max_k |x[m, k]| / QMAX`` (1 for an all-zero row), ``q = x * (1/scale)``
rounded to nearest-even and clipped to ``[-QMAX, QMAX]`` (QMAX = 127 for int8,
448 for e4m3), so ``q * scale`` approximates ``x``. The outputs feed
:func:`pallas_kernels.w8a8.int8_matmul` / ``fp8_matmul`` directly (``x_scale``
is ``[M, 1]``).

Two implementations with the same result:

* ``"pallas"``: one Pallas program per ``ROWS`` tokens (Triton lowering; plain
  Pallas, so it also runs under ``interpret=True`` on the CPU). Each program reads
  its rows in 1024-wide chunks twice, once for the absmax and once to quantize;
  the second read comes from L2, so HBM sees one read and one write.
* ``"xla"``: the same arithmetic as jnp ops, fused by XLA.

``method="auto"`` picks the Pallas kernel on a GPU once it is verified there
(:data:`GPU_VERIFIED`; see docs/kernels.md) and XLA otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common

ROWS = 4
CHUNK = 1024
#: The Pallas quantizer matched the reference bit for bit on an H200 (codes and
#: scales, 9 shapes incl. ragged; benchmarks/check_kernels-NVIDIA_H200.txt).
GPU_VERIFIED = True
_QMAX = {"int8": 127.0, "fp8": 448.0}
_QDTYPE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
def _round_half_even(v: jax.Array) -> jax.Array:
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


def _to_q(v: jax.Array, fmt: str) -> jax.Array:
  qmax = _QMAX[fmt]
  v = jnp.clip(v, -qmax, qmax)
  if fmt == "int8":
    v = _round_half_even(v)
  return v.astype(_QDTYPE[fmt])


def _scale_of(amax: jax.Array, fmt: str) -> jax.Array:
  return jnp.where(amax > 0, amax / _QMAX[fmt], 1.0).astype(jnp.float32)


def _check(x):
  _common.check_rank("quantize: x", x, 2)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"quantize: x must be floating point, got {x.dtype}")


def _reference(x, fmt):
  _check(x)
  xf = x.astype(jnp.float32)
  scale = _scale_of(jnp.max(jnp.abs(xf), axis=1, keepdims=True), fmt)
  q = jnp.clip(xf * (1.0 / scale), -_QMAX[fmt], _QMAX[fmt])
  if fmt == "int8":
    q = jnp.round(q)
  return q.astype(_QDTYPE[fmt]), scale


def quantize_int8_reference(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Plain-JAX per-token int8 quantization: ``(int8[M, K], f32[M, 1])``."""
  return _reference(x, "int8")


def quantize_fp8_reference(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Plain-JAX per-token fp8 e4m3 quantization: ``(e4m3[M, K], f32[M, 1])``."""
  return _reference(x, "fp8")


def _kernel(x_ref, q_ref, s_ref, *, m: int, k: int, fmt: str):
  import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
  import jax.experimental.pallas.triton as pltriton  # pylint: disable=g-import-not-at-top

  i = pl.program_id(0)
  rows = i * ROWS + jnp.arange(ROWS)
  row_ok = rows < m
  n_chunks = _common.cdiv(k, CHUNK)

  def block(c):
    cols = c * CHUNK + jnp.arange(CHUNK)
    mask = row_ok[:, None] & (cols < k)[None, :]
    idx = (pl.ds(i * ROWS, ROWS), pl.ds(c * CHUNK, CHUNK))
    return idx, mask

  def amax_step(c, acc):
    idx, mask = block(c)
    v = pltriton.load(x_ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)
    return jnp.maximum(acc, jnp.max(jnp.abs(v), axis=1))

  amax = lax.fori_loop(0, n_chunks, amax_step, jnp.zeros((ROWS,), jnp.float32))
  scale = _scale_of(amax, fmt)
  inv = 1.0 / scale

  def quant_step(c, carry):
    idx, mask = block(c)
    v = pltriton.load(x_ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)
    pltriton.store(q_ref.at[idx], _to_q(v * inv[:, None], fmt), mask=mask)
    return carry

  lax.fori_loop(0, n_chunks, quant_step, 0)
  pltriton.store(s_ref.at[pl.ds(i * ROWS, ROWS)], scale, mask=row_ok)


def quantize_pallas(x: jax.Array, fmt: str, *, interpret: bool = False):
  """The Pallas kernel (Triton lowering on GPU, or the interpreter when asked)."""
  import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
  import jax.experimental.pallas.triton as pltriton  # pylint: disable=g-import-not-at-top

  _check(x)
  m, k = x.shape
  call = pl.pallas_call(
      functools.partial(_kernel, m=m, k=k, fmt=fmt),
      out_shape=(jax.ShapeDtypeStruct((m, k), _QDTYPE[fmt]),
                 jax.ShapeDtypeStruct((m,), jnp.float32)),
      grid=(_common.cdiv(m, ROWS),),
      interpret=interpret,
      compiler_params=None if interpret else pltriton.CompilerParams(
          num_warps=4, num_stages=1),
  )
  q, s = call(x)
  return q, s.reshape(m, 1)


def _quantize(x, fmt, method):
  _check(x)
  if method not in ("auto", "pallas", "xla"):
    raise ValueError(f"quantize: method must be auto/pallas/xla, got {method!r}")
  if method == "pallas":
    return quantize_pallas(x, fmt, interpret=not _common._default_device_is_gpu())  # pylint: disable=protected-access
  if method == "auto" and supports(x):
    return quantize_pallas(x, fmt)
  return _reference(x, fmt)


def quantize_int8(x: jax.Array, method: str = "auto") -> tuple[jax.Array, jax.Array]:
  """Per-token int8 quantization ``(int8[M, K], f32[M, 1])`` in one pass over ``x``."""
  return _quantize(x, "int8", method)


def quantize_fp8(x: jax.Array, method: str = "auto") -> tuple[jax.Array, jax.Array]:
  """Per-token fp8 e4m3 quantization ``(e4m3[M, K], f32[M, 1])`` in one pass over ``x``."""
  return _quantize(x, "fp8", method)


def supports(x: jax.Array) -> bool:
  """True where ``method="auto"`` runs the compiled Pallas quantizer: a GPU, a 2-D
  float input, and the kernel verified there (or ``JQUANT_PALLAS=kernel``)."""
  return (_common.on_gpu() and _common.kernel_enabled(GPU_VERIFIED)
          and x.ndim == 2 and x.size > 0 and jnp.issubdtype(x.dtype, jnp.floating))
