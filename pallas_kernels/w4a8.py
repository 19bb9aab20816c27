"""W4A8 on Hopper: int4 per-channel weights x int8 per-token activations, int8 MMA.

Layouts:

* ``x_q``: ``[M, K]`` int8, ``x_scale``: ``[M, 1]`` (or ``[M]``) float32 per token.
* ``w_packed``: ``[N, ceil(K/2)]`` uint8, two signed 4-bit codes per byte along K, low nibble
  first (:func:`pallas_kernels.weight_only.pack_int4`; jquant's int4 QArrays store the same
  bytes), ``w_scale``: ``[N]`` float32 per output channel.

``y[m, n] = (sum_k x_q[m, k] * q[n, k]) * x_scale[m] * w_scale[n] + bias[n]``, exact int32
accumulation. Hopper's wgmma has no 4-bit type, so the codes are widened to int8 and fed to the
W8A8 int8 kernel (:func:`pallas_kernels.w8a8.int8_matmul`). The widening is one XLA pass over
the weights (``N*K/2`` bytes read, ``N*K`` written), not yet inside the kernel: at M >= 4096 it
costs a few percent of the GEMM (the weights are small next to the activations), at small M it
would dominate, so :func:`supports` takes M >= ``MIN_M`` only. The weights stay 4-bit in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common, w8a8, weight_only

#: Below this M the int8 widening pass costs more than the GEMM saves; W4A16 covers small M.
MIN_M = 1024


def _check(x_q, x_scale, w_packed, w_scale, bias):
  _common.check_rank("w4a8_matmul: x_q", x_q, 2)
  _common.check_dtype("w4a8_matmul: x_q", x_q, (jnp.int8,))
  _common.check_rank("w4a8_matmul: w_packed", w_packed, 2)
  _common.check_dtype("w4a8_matmul: w_packed", w_packed, (jnp.uint8,))
  k = x_q.shape[1]
  if w_packed.shape[1] != _common.cdiv(k, 2):
    raise ValueError(f"w4a8_matmul: w_packed must be [N, ceil(K/2)] = [N, {_common.cdiv(k, 2)}] for x_q with "
                     f"K={k}, got {w_packed.shape}")
  if w_scale.size != w_packed.shape[0]:
    raise ValueError(f"w4a8_matmul: w_scale must hold {w_packed.shape[0]} per-channel scales, got {w_scale.shape}")
  if x_scale.size != x_q.shape[0]:
    raise ValueError(f"w4a8_matmul: x_scale must hold {x_q.shape[0]} per-token scales, got {x_scale.shape}")
  if bias is not None and bias.size != w_packed.shape[0]:
    raise ValueError(f"w4a8_matmul: bias must have {w_packed.shape[0]} entries, got {bias.shape}")


def w4a8_matmul_reference(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_packed: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
  """Plain-JAX W4A8: unpack, exact int32 dot, scales, bias."""
  _check(x_q, x_scale, w_packed, w_scale, bias)
  w_q = weight_only.unpack_int4(w_packed, x_q.shape[1])
  return w8a8.int8_matmul_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype)


def supports(x_q: jax.Array, out_dtype=jnp.bfloat16) -> bool:
  """True where the GPU path applies: the int8 kernel's conditions and M >= MIN_M."""
  return x_q.ndim == 2 and x_q.shape[0] >= MIN_M and w8a8.supports(x_q, x_q, out_dtype)


def w4a8_matmul(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_packed: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
  """W4A8 GEMM ``int8[M,K] x int4[N,K]^T -> [M,N]``: widen + the int8 kernel on Hopper for
  M >= MIN_M, the reference elsewhere."""
  _check(x_q, x_scale, w_packed, w_scale, bias)
  if not supports(x_q, out_dtype):
    return w4a8_matmul_reference(x_q, x_scale, w_packed, w_scale, bias, out_dtype)
  return w8a8.int8_matmul(x_q, x_scale, widen(w_packed, x_q.shape[1]), w_scale, bias, out_dtype)


def widen(w_packed: jax.Array, k: int) -> jax.Array:
  """``uint8[N, ceil(K/2)]`` packed codes -> ``int8[N, K]`` through XLA's native int4 view
  (one fused pass). ``weight_only.unpack_int4``'s shifts and masks took 36 us for 3072x3072 on
  an H200, more than half the GEMM."""
  n = w_packed.shape[0]
  return lax.bitcast_convert_type(w_packed, jnp.int4).reshape(n, -1)[:, :k].astype(jnp.int8)


def _lowrank(x: jax.Array, l1: jax.Array, l2: jax.Array) -> jax.Array:
  """``(x @ l1) @ l2`` in bf16 with fp32 accumulation: ``[M, N]`` fp32."""
  if l1.shape[0] != x.shape[1] or l2.shape[0] != l1.shape[1]:
    raise ValueError(f"svdquant_matmul: l1 must be [K, r] and l2 [r, N] for x [M, K]={x.shape}, got "
                     f"{l1.shape} and {l2.shape}")
  h = lax.dot_general(x.astype(jnp.bfloat16), l1.astype(jnp.bfloat16), (((1,), (0,)), ((), ())),
                      preferred_element_type=jnp.float32)
  return lax.dot_general(h.astype(jnp.bfloat16), l2.astype(jnp.bfloat16), (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def svdquant_matmul_reference(x, x_q, x_scale, w_packed, w_scale, l1, l2, bias=None, out_dtype=jnp.bfloat16):
  """Plain-JAX SVDQuant linear: W4A8 reference on the codes plus the low-rank branch on ``x``."""
  y = w4a8_matmul_reference(x_q, x_scale, w_packed, w_scale, bias, jnp.float32)
  return (y + _lowrank(x, l1, l2)).astype(out_dtype)


def fused_rank(r: int) -> bool:
  """Ranks the int8 kernel's low-rank epilogue takes (a multiple of 16, at most 64)."""
  return r % 16 == 0 and 0 < r <= 64


def lowrank_operands(x: jax.Array, l1: jax.Array, l2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(h = x @ l1, l2^T)`` in bf16 (fp32 accumulation): the int8 kernel's low-rank epilogue
  operands (``w8a8.int8_matmul(..., lowrank=...)``)."""
  h = lax.dot_general(x.astype(jnp.bfloat16), l1.astype(jnp.bfloat16), (((1,), (0,)), ((), ())),
                      preferred_element_type=jnp.float32).astype(jnp.bfloat16)
  return h, l2.T.astype(jnp.bfloat16)


def svdquant_matmul(x, x_q, x_scale, w_packed, w_scale, l1, l2, bias=None, out_dtype=jnp.bfloat16):
  """SVDQuant linear ``W4A8(x_q) + (x @ l1) @ l2``.

  On Hopper (M >= MIN_M, rank 16..64): ``h = x @ l1`` is one small XLA GEMM, and the int8
  kernel adds ``h @ l2`` in its epilogue, piece by piece before each output store, so the
  up-projection and the sum cost no pass over the output. Elsewhere: the W4A8 GEMM plus the
  branch in XLA, added in ``out_dtype``.
  """
  if l1.shape[0] != x.shape[1] or l2.shape[0] != l1.shape[1]:
    raise ValueError(f"svdquant_matmul: l1 must be [K, r] and l2 [r, N] for x [M, K]={x.shape}, got "
                     f"{l1.shape} and {l2.shape}")
  if not (supports(x_q, out_dtype) and fused_rank(l1.shape[1])):
    y = w4a8_matmul(x_q, x_scale, w_packed, w_scale, bias, out_dtype)
    return y + _lowrank(x, l1, l2).astype(out_dtype)
  _check(x_q, x_scale, w_packed, w_scale, bias)
  return w8a8.int8_matmul(x_q, x_scale, widen(w_packed, x_q.shape[1]), w_scale, bias, out_dtype,
                          lowrank=lowrank_operands(x, l1, l2))
