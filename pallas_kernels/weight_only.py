"""Weight-only GEMMs on Hopper: int4 (W4A16) and int8 (W8A16) weights x bf16 tokens.

Layouts
-------
* ``x``: ``[M, K]`` bfloat16 activations.
* W8A16: ``w_q`` ``[N, K]`` int8 (K-major), ``w_scale`` ``[N]`` (one per output
  channel): ``y = (x @ w_q^T) * w_scale``.
* W4A16: ``w_packed`` ``[N, ceil(K/2)]`` uint8, two signed 4-bit values per byte
  along K, low nibble first::

      byte[n, j] = (q[n, 2j] & 0xF) | ((q[n, 2j + 1] & 0xF) << 4),  q in [-8, 7]

  (two's complement nibbles; this is also how XLA stores ``int4`` arrays, so the
  kernel views the bytes as ``int4[N, K]`` without moving them). ``w_scale`` is
  ``[N, ceil(K/group)]`` float32 or bfloat16, symmetric (no zero point):
  ``w[n, k] = q[n, k] * w_scale[n, k // group]``.

Paths
-----
* Small M (the GEMV shapes of modulation layers and text encoders, M <= 16):
  a Mosaic GPU kernel that computes ``Y^T = W X^T``: the narrow weights are the
  wgmma A operand, loaded from shared memory into registers and converted to
  bf16 there (int4 through Mosaic's fast 4-bit upcast), while the tokens are the
  wgmma N dimension (16..128). The K loop is split over CTAs so that every SM
  streams weights; the fp32 partial sums are reduced, scaled and transposed by
  one small XLA fusion. For W4A16 each 128-wide K step (one scale group) goes
  into a fresh accumulator that is added to the running sum times the group
  scale, so no per-weight multiply is needed.
* Large M: the weights are dequantized to bf16 once per call (one pass over
  ``N*K``) and multiplied by XLA's bf16 GEMM, whose time dominates from M ~ 1k.

:func:`prepare_w4a16` moves the int4 weights and scales into the kernel's layout
once (int4 view, scales transposed to ``[K/128, N]``, padding); a model should
do that at load time and call :func:`w4a16_matmul_prepared` per step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common

GROUP = 128
#: Largest M the kernel takes. Measured on an H200 it matches or beats dequantize + XLA bf16
#: at M <= 16 (benchmarks/kernels-weight_only-NVIDIA_H200.json); larger M were not measured, so they stay on XLA.
SMALL_M_MAX = 16
#: Largest M the kernel handles at all (``JQUANT_PALLAS=kernel`` takes it up to here).
KERNEL_M_MAX = 256
#: The small-M kernels passed scripts/check_kernels_gpu.py on an H200 (JAX 0.11.2,
#: benchmarks/check_kernels-NVIDIA_H200.txt), so they are the default for M <= SMALL_M_MAX on Hopper.
GPU_VERIFIED = True
_WT = 64  # weight rows per consumer warpgroup


# --------------------------------------------------------------------------
# Packing.
# --------------------------------------------------------------------------


def pack_int4(q: jax.Array) -> jax.Array:
  """Packs ``int[N, K]`` values in [-8, 7] into ``uint8[N, ceil(K/2)]`` (low nibble first)."""
  _common.check_rank("pack_int4: q", q, 2)
  q = q.astype(jnp.int32)
  if q.shape[1] % 2:
    q = _common.pad_axis(q, 1, q.shape[1] + 1)
  lo = q[:, 0::2] & 0xF
  hi = q[:, 1::2] & 0xF
  return (lo | (hi << 4)).astype(jnp.uint8)


def unpack_int4(packed: jax.Array, k: int | None = None) -> jax.Array:
  """Inverse of :func:`pack_int4`: ``uint8[N, K/2] -> int8[N, K]`` in [-8, 7]."""
  _common.check_rank("unpack_int4: packed", packed, 2)
  _common.check_dtype("unpack_int4: packed", packed, (jnp.uint8,))
  b = packed.astype(jnp.int32)
  lo = b & 0xF
  hi = (b >> 4) & 0xF
  q = jnp.stack([lo, hi], axis=-1).reshape(packed.shape[0], -1)
  q = jnp.where(q >= 8, q - 16, q).astype(jnp.int8)
  return q if k is None else q[:, :k]


# --------------------------------------------------------------------------
# References.
# --------------------------------------------------------------------------


def _check_w4(x, w_packed, w_scale, group_size):
  _common.check_rank("w4a16_matmul: x", x, 2)
  _common.check_rank("w4a16_matmul: w_packed", w_packed, 2)
  _common.check_dtype("w4a16_matmul: w_packed", w_packed, (jnp.uint8,))
  k = x.shape[1]
  if w_packed.shape[1] != _common.cdiv(k, 2):
    raise ValueError(
        f"w4a16_matmul: w_packed must be [N, ceil(K/2)] = [N, {_common.cdiv(k, 2)}]"
        f" for x with K={k}, got {w_packed.shape}")
  groups = _common.cdiv(k, group_size)
  if w_scale.shape != (w_packed.shape[0], groups):
    raise ValueError(
        f"w4a16_matmul: w_scale must be [N, ceil(K/{group_size})] ="
        f" {(w_packed.shape[0], groups)}, got {w_scale.shape}")


def _check_w8(x, w_q, w_scale):
  _common.check_rank("w8a16_matmul: x", x, 2)
  _common.check_rank("w8a16_matmul: w_q", w_q, 2)
  _common.check_dtype("w8a16_matmul: w_q", w_q, (jnp.int8,))
  if w_q.shape[1] != x.shape[1]:
    raise ValueError(
        f"w8a16_matmul: w_q must be [N, K] with K={x.shape[1]}, got {w_q.shape}")
  if w_scale.size != w_q.shape[0]:
    raise ValueError(
        f"w8a16_matmul: w_scale must hold {w_q.shape[0]} per-channel scales, got"
        f" {w_scale.shape}")


def _check_bias(name, bias, n):
  if bias is not None and bias.size != n:
    raise ValueError(f"{name}: bias must have {n} entries, got {bias.shape}")


def dequantize_int4(w_packed, w_scale, k: int, group_size: int = GROUP,
                    dtype=jnp.float32) -> jax.Array:
  """``q * scale`` as ``dtype[N, K]`` (the product is formed in float32)."""
  q = unpack_int4(w_packed, k).astype(jnp.float32)
  s = jnp.repeat(w_scale.astype(jnp.float32), group_size, axis=1)[:, :k]
  return (q * s).astype(dtype)


def _finish(y, bias, out_dtype):
  if bias is not None:
    y = y + bias.reshape(1, -1).astype(jnp.float32)
  return y.astype(out_dtype)


def w4a16_matmul_reference(
    x: jax.Array,
    w_packed: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    *,
    group_size: int = GROUP,
) -> jax.Array:
  """Plain-JAX W4A16: dequantize to f32, f32 dot (highest precision), bias."""
  _check_w4(x, w_packed, w_scale, group_size)
  _check_bias("w4a16_matmul", bias, w_packed.shape[0])
  w = dequantize_int4(w_packed, w_scale, x.shape[1], group_size)
  y = lax.dot_general(x.astype(jnp.float32), w, (((1,), (1,)), ((), ())),
                      precision=lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)
  return _finish(y, bias, out_dtype)


def w8a16_matmul_reference(
    x: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
  """Plain-JAX W8A16: f32 dot of x with the int8 weights, then the channel scales."""
  _check_w8(x, w_q, w_scale)
  _check_bias("w8a16_matmul", bias, w_q.shape[0])
  y = lax.dot_general(x.astype(jnp.float32), w_q.astype(jnp.float32),
                      (((1,), (1,)), ((), ())),
                      precision=lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)
  y = y * w_scale.reshape(1, -1).astype(jnp.float32)
  return _finish(y, bias, out_dtype)


def _xla_bf16(x, w_bf16, bias, out_dtype, col_scale=None):
  """The large-M path: XLA's bf16 GEMM on weights dequantized to bf16.

  The barrier keeps XLA from fusing the dequantization into the GEMM (its fused
  int8-operand GEMMs are slower than cuBLAS on a materialized bf16 weight).
  """
  w_bf16 = lax.optimization_barrier(w_bf16)
  y = lax.dot_general(x.astype(jnp.bfloat16), w_bf16, (((1,), (1,)), ((), ())),
                      preferred_element_type=jnp.float32)
  if col_scale is not None:
    y = y * col_scale.reshape(1, -1).astype(jnp.float32)
  return _finish(y, bias, out_dtype)


# --------------------------------------------------------------------------
# Kernel.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WeightOnlyConfig:
  """Tokens per CTA (the wgmma N), split-K factor and pipeline depth."""

  tokens: int
  splits: int
  stages: int


def _pick_config(m: int, n: int, k_steps: int, sms: int, bits: int) -> WeightOnlyConfig:
  tokens = 16
  while tokens < min(m, 128):
    tokens *= 2
  tiles = _common.cdiv(n, 2 * _WT) * _common.cdiv(m, tokens)
  # One wave: split K so that the CTAs just fill the SMs. A second wave cost more than the
  # extra splits gained in scripts/sweep_weight_only.py (H200: 3072x3072 at M=1 5.7 us with
  # 96 CTAs, 7.4 us with 192), and each CTA's K loop is latency-bound, not bandwidth-bound.
  want = max(1, sms // tiles)
  splits = max(d for d in range(1, k_steps + 1) if k_steps % d == 0 and d <= want)
  w_bytes = 2 * _WT * GROUP * bits // 8
  stage_bytes = w_bytes + tokens * GROUP * 2 + 2 * _WT * 4
  out_bytes = 2 * _WT * tokens * 4
  # 4 stages were as fast as 8 in the sweep and leave shared memory for a second CTA per SM.
  stages = int(max(2, min(4, (200 * 1024 - out_bytes) // stage_bytes)))
  return WeightOnlyConfig(tokens=tokens, splits=splits, stages=stages)


# jit: every call site with the same shapes and config shares one lowered kernel (a model's
# repeated layers lower it once instead of once per layer: minutes of compile time).
@functools.partial(jax.jit, static_argnames=("config",))
def weight_only_pallas(
    w: jax.Array,
    x: jax.Array,
    s_t: jax.Array | None,
    *,
    config: WeightOnlyConfig,
) -> jax.Array:
  """Split-K ``Y^T = W X^T`` partial sums, ``f32[splits, N, M]``.

  ``w`` is ``int8[N, K]`` or ``int4[N, K]`` (N a multiple of 128, K of 128), ``x``
  is ``bf16[M, K]`` (M a multiple of ``config.tokens``) and ``s_t`` the int4 group
  scales transposed to ``f32[K/128, N]`` (None for int8, whose per-channel scale
  is applied outside).
  """
  import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

  cfg = config
  n, k = w.shape
  m = x.shape[0]
  bits = jnp.iinfo(w.dtype).bits
  t = cfg.tokens
  cta_w = 2 * _WT
  n_iters, m_iters = n // cta_w, m // t
  k_steps = k // GROUP
  ks = k_steps // cfg.splits
  w_swizzle = GROUP * bits // 8
  w_transforms = (plgpu.TilingTransform((8, GROUP)), plgpu.SwizzleTransform(w_swizzle))
  x_transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  out_swizzle = plgpu.find_swizzle(t * 32, "out")
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // 4)),
                    plgpu.SwizzleTransform(out_swizzle))
  a_layout = plgpu.Layout.WGMMA_UPCAST_4X if bits == 4 else plgpu.Layout.WGMMA_UPCAST_2X
  grouped = s_t is not None

  def kernel(*refs, out_smem):
    if grouped:
      w_gmem, x_gmem, s_gmem, out_gmem = refs
    else:
      w_gmem, x_gmem, out_gmem = refs
      s_gmem = None
    ni = lax.axis_index("n")
    si = lax.axis_index("s")
    mi = lax.axis_index("m")
    wg = lax.axis_index("wg")
    k0 = si * ks

    def load_a(w_smem):
      # Wide smem loads in the upcast layout, a register shuffle into the wgmma
      # layout while the values are still narrow, then the convert to bf16.
      a = plgpu.load(w_smem.at[pl.ds(wg * _WT, _WT)], (), layout=a_layout)
      return plgpu.layout_cast(a, plgpu.Layout.WGMMA).astype(jnp.bfloat16)

    def body(_, w_smem, x_smem, *rest):
      *s_smem, acc = rest
      a = load_a(w_smem)
      b = plgpu.transpose_ref(x_smem, (1, 0))
      if not grouped:
        plgpu.wgmma(acc, a, b)
        plgpu.wgmma_wait(0)
        return acc

      def group_product(tmp_ref):
        plgpu.wgmma(tmp_ref, a, b)
        return tmp_ref[...]

      part = pl.run_scoped(group_product, plgpu.ACC((_WT, t), jnp.float32))
      scale = plgpu.load(s_smem[0].at[0, pl.ds(wg * _WT, _WT)], (),
                         layout=plgpu.Layout.WGMMA.reduce(1))
      return acc + part * lax.broadcast_in_dim(scale, (_WT, t), [0])

    def store(y):
      out_smem[wg] = y
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(
          out_smem.at[wg],
          out_gmem.at[si, pl.ds(ni * cta_w + wg * _WT, _WT), pl.ds(mi * t, t)])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def compute_context(eval_pipeline):
      if grouped:
        zeros = plgpu.layout_cast(
            jnp.full((_WT, t), 0.0, jnp.float32), plgpu.Layout.WGMMA)
        store(eval_pipeline(zeros))
      else:
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((_WT, t), jnp.float32))
        def _acc_scope(acc_ref):
          eval_pipeline(acc_ref)
          store(acc_ref[...])

    in_specs = [
        plgpu.BlockSpec((cta_w, GROUP), lambda kk: (0, kk),
                        transforms=w_transforms, memory_space=plgpu.SMEM),
        plgpu.BlockSpec((t, GROUP), lambda kk: (0, kk),
                        transforms=x_transforms, memory_space=plgpu.SMEM),
    ]
    operands = [
        w_gmem.at[pl.ds(ni * cta_w, cta_w), pl.ds(k0 * GROUP, ks * GROUP)],
        x_gmem.at[pl.ds(mi * t, t), pl.ds(k0 * GROUP, ks * GROUP)],
    ]
    if grouped:
      in_specs.append(plgpu.BlockSpec((1, cta_w), lambda kk: (kk, 0),
                                      memory_space=plgpu.SMEM))
      operands.append(s_gmem.at[pl.ds(k0, ks), pl.ds(ni * cta_w, cta_w)])
    pipeline = plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(ks,),
        memory_registers=40,
        in_specs=in_specs,
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=min(cfg.stages, ks),
        compute_context=compute_context,
    )
    pipeline(*operands)

  call = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((cfg.splits, n, m), jnp.float32),
      grid=(n_iters, cfg.splits, m_iters),
      grid_names=("n", "s", "m"),
      num_threads=3,
      thread_name="wg",
      scratch_types=dict(
          out_smem=plgpu.SMEM((2, _WT, t), jnp.float32, transforms=out_transforms),
      ),
  )
  args = (w, x) + ((s_t,) if grouped else ())
  return call(*args)


def _small_m_gemm(w, x, s_t, n, bits, sms):
  """Pads ``x``, runs the kernel, reduces splits; returns ``f32[M, N]`` (unscaled for int8)."""
  m, k = x.shape
  kp = w.shape[1]
  cfg = _pick_config(m, w.shape[0], kp // GROUP, sms, bits)
  mp = _common.round_up(m, cfg.tokens)
  xp = _common.pad_axis(_common.pad_axis(x.astype(jnp.bfloat16), 1, kp), 0, mp)
  parts = weight_only_pallas(w, xp, s_t, config=cfg)
  return parts.sum(axis=0)[:n, :m].T


# --------------------------------------------------------------------------
# Public wrappers.
# --------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["w", "s_t"],
    meta_fields=["n", "k"])
@dataclasses.dataclass(frozen=True)
class W4Prepared:
  """int4 weights in the kernel layout: ``w`` ``int4[Np, Kp]``, ``s_t`` ``f32[Kp/128, Np]``."""

  w: jax.Array
  s_t: jax.Array
  n: int
  k: int


def prepare_w4a16(w_packed: jax.Array, w_scale: jax.Array, k: int) -> W4Prepared:
  """Views packed int4 weights as ``int4[N, K]`` and transposes the group-128 scales.

  ``k`` is the true reduction size (``x.shape[1]``). N and K are padded to
  multiples of 128 (zero weights contribute nothing).
  """
  n = w_packed.shape[0]
  if w_packed.shape[1] != _common.cdiv(k, 2):
    raise ValueError(
        f"prepare_w4a16: w_packed must be [N, ceil(K/2)] for K={k}, got"
        f" {w_packed.shape}")
  if w_scale.shape != (n, _common.cdiv(k, GROUP)):
    raise ValueError(
        f"prepare_w4a16: w_scale must be [N, ceil(K/128)] = "
        f"{(n, _common.cdiv(k, GROUP))}, got {w_scale.shape}")
  np_ = _common.round_up(n, 2 * _WT)
  kp = _common.round_up(k, GROUP)
  packed = _common.pad_axis(_common.pad_axis(w_packed, 1, kp // 2), 0, np_)
  w4 = lax.bitcast_convert_type(packed, jnp.int4).reshape(np_, kp)
  s_t = _common.pad_axis(w_scale.astype(jnp.float32), 0, np_).T
  return W4Prepared(w=w4, s_t=s_t, n=n, k=k)


def supports(x: jax.Array, group_size: int = GROUP) -> bool:
  """True where the small-M weight-only kernel runs (Hopper, 2-D, M <= SMALL_M_MAX or, forced
  by ``JQUANT_PALLAS=kernel``, KERNEL_M_MAX; group 128,
  and verified on the GPU or forced with ``JQUANT_PALLAS=kernel``)."""
  if not _common.on_hopper() or not _common.kernel_enabled(GPU_VERIFIED):
    return False
  m_max = KERNEL_M_MAX if _common.forced_mode() == "kernel" else SMALL_M_MAX
  return (x.ndim == 2 and 0 < x.shape[0] <= m_max and x.shape[1] > 0
          and group_size == GROUP)


def w4a16_matmul_prepared(
    x: jax.Array,
    prepared: W4Prepared,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
  """W4A16 on weights from :func:`prepare_w4a16` (the per-step call of a model)."""
  _common.check_rank("w4a16_matmul: x", x, 2)
  if x.shape[1] != prepared.k:
    raise ValueError(
        f"w4a16_matmul: x has K={x.shape[1]} but the weights were prepared for"
        f" K={prepared.k}")
  _check_bias("w4a16_matmul", bias, prepared.n)
  if supports(x):
    y = _small_m_gemm(prepared.w, x, prepared.s_t, prepared.n, 4,
                      _common.num_sms())
    return _finish(y, bias, out_dtype)
  kp = prepared.w.shape[1]
  w = prepared.w.astype(jnp.float32)
  s = jnp.repeat(prepared.s_t.T, GROUP, axis=1)
  w_bf16 = (w * s)[:prepared.n, :prepared.k].astype(jnp.bfloat16)
  del kp
  return _xla_bf16(x, w_bf16, bias, out_dtype)


def w4a16_matmul(
    x: jax.Array,
    w_packed: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
    *,
    group_size: int = GROUP,
) -> jax.Array:
  """W4A16 GEMM ``bf16[M,K] x int4[N,K]^T -> [M,N]`` (symmetric, per-group scales).

  Small M on Hopper: the Mosaic GPU kernel (after :func:`prepare_w4a16`). Large M
  or other group sizes on a GPU: dequantize to bf16 and XLA's bf16 GEMM. Off GPU:
  :func:`w4a16_matmul_reference`.
  """
  _check_w4(x, w_packed, w_scale, group_size)
  _check_bias("w4a16_matmul", bias, w_packed.shape[0])
  if not _common.on_hopper():
    return w4a16_matmul_reference(x, w_packed, w_scale, bias, out_dtype,
                                  group_size=group_size)
  if not supports(x, group_size):
    w_bf16 = dequantize_int4(w_packed, w_scale, x.shape[1], group_size,
                             jnp.bfloat16)
    return _xla_bf16(x, w_bf16, bias, out_dtype)
  prepared = prepare_w4a16(w_packed, w_scale, x.shape[1])
  return w4a16_matmul_prepared(x, prepared, bias, out_dtype)


def w8a16_matmul(
    x: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    bias: jax.Array | None = None,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
  """W8A16 GEMM ``bf16[M,K] x int8[N,K]^T -> [M,N]`` with per-channel scales.

  Small M on Hopper: the Mosaic GPU kernel. Large M on a GPU: int8 -> bf16 and
  XLA's bf16 GEMM (the scale applied to the fp32 result). Off GPU: the reference.
  """
  _check_w8(x, w_q, w_scale)
  n, k = w_q.shape
  _check_bias("w8a16_matmul", bias, n)
  if not _common.on_hopper():
    return w8a16_matmul_reference(x, w_q, w_scale, bias, out_dtype)
  if not supports(x):
    return _xla_bf16(x, w_q.astype(jnp.bfloat16), bias, out_dtype, w_scale)
  kp = _common.round_up(k, GROUP)
  np_ = _common.round_up(n, 2 * _WT)
  w = _common.pad_axis(_common.pad_axis(w_q, 1, kp), 0, np_)
  y = _small_m_gemm(w, x, None, n, 8, _common.num_sms())
  y = y * w_scale.reshape(1, -1).astype(jnp.float32)
  return _finish(y, bias, out_dtype)
