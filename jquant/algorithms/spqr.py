"""SpQR (Dettmers et al. 2023): small-group low-bit weights, quantized group statistics,
and the most sensitive weights kept exactly in a sparse bf16 matrix.

Per kernel W [K, N] (one GPTQ sweep over the input channels, :func:`gptq.blocked_sweep`):

* first level: groups of ``group_size`` (16) consecutive input channels per output
  column get an asymmetric min-max ``bits``-bit grid (scale s, float zero z; the range
  always contains 0, as in GPTQ's quantizer, so z stays in [0, 2^bits - 1]);
* second level: the vectors of s and z of each group are themselves quantized to
  ``stat_bits`` (3) bits, min-max in groups of ``stat_group`` (16) output columns, with a
  float16 step and minimum per such group;
* outliers: when the sweep reaches a group, each weight's *leave-one-out gain* is
  computed: how much the group's Hessian-weighted error ``sum ((w - q(w)) / [U]_jj)^2``
  (U the Cholesky factor of H^-1, GPTQ's saliency ``w^2 / [H^-1]_jj``-style weighting)
  drops if that weight is kept exact and left out of the min/max. The top
  ``outlier_rate`` fraction of the group's weights are kept in bf16 (COO row/column
  indices + values) and excluded from the group's statistics; they feed no error forward.
  (The paper thresholds the gain by a tolerance; a fixed rate makes the bit budget
  predictable, which is what equal-bits comparisons need.)
* the rest is GPTQ: each column's rounding error is propagated to later columns.

Bits per weight (``nominal_bits_per_weight``): ``bits`` + ``2 * stat_bits / group_size``
+ ``2 * 32 / (group_size * stat_group)`` (f16 step and minimum for s and z) + the outliers
at 48 bits each (16-bit value + 16-bit row + 16-bit column), e.g. 3 + 0.375 + 0.25 +
0.48 = 4.1 bits at 1% outliers. ``nbytes`` counts the real storage (3-bit codes live in
4-bit containers).

The result is an :class:`SpQRArray` leaf, a :class:`~jquant.coded.CodedArray`:
``dequantize()`` decodes the dense codes with the decoded statistics and writes the
outliers back (an XLA scatter). :mod:`jquant.nn` runs it with no change to the core:
the dispatch reads a non-QArray kernel as ``w.astype(x.dtype)``, which decodes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jquant.algorithms import layerwise as lw
from jquant.algorithms.gptq import blocked_sweep, inverse_cholesky
from jquant.coded import CodedArray
from jquant.qarray import pack, unpack
from jquant.rules import Rule

Array = jax.Array
_STAT_DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class SpQRConfig:
    """SpQR options (see module docstring).

    Attributes:
      bits: weight code bits (2, 3 or 4).
      group_size: first-level group (input channels per scale), beta_1.
      stat_bits: bits of the quantized first-level scales and zeros.
      stat_group: second-level group (output columns per stat step/minimum), beta_2.
      stat_dtype: dtype of the second-level step and minimum.
      outlier_rate: fraction of weights kept exactly (bf16) per group.
      block_size: GPTQ lazy-update block (rounded to a multiple of group_size dividing K).
      damp, damp_limit: GPTQ damping and its escalation limit.
    """

    bits: int = 3
    group_size: int = 16
    stat_bits: int = 3
    stat_group: int = 16
    stat_dtype: str = "float16"
    outlier_rate: float = 0.01
    block_size: int = 128
    damp: float = 0.01
    damp_limit: float = 10.0

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4):
            raise ValueError(f"SpQR bits must be 2, 3 or 4, got {self.bits}")
        if self.stat_bits not in (2, 3, 4, 8):
            raise ValueError(f"stat_bits must be 2, 3, 4 or 8, got {self.stat_bits}")
        if self.group_size < 2 or self.stat_group < 1:
            raise ValueError("group_size must be >= 2 and stat_group >= 1")
        if not 0.0 <= self.outlier_rate < 1.0:
            raise ValueError(f"outlier_rate must lie in [0, 1), got {self.outlier_rate}")
        if self.stat_dtype not in _STAT_DTYPES:
            raise ValueError(f"stat_dtype must be one of {sorted(_STAT_DTYPES)}")


def _container(bits: int) -> int:
    return 8 if bits > 4 else (4 if bits >= 3 else 2)


# --- second-level statistics ---------------------------------------------------------------------
def stat_quantize(v: Array, bits: int, group: int, dtype) -> tuple[Array, Array, Array]:
    """Min-max quantize v [..., N] in groups of ``group`` along the last axis: (codes, step, min)."""
    qmax = 2**bits - 1
    vg = v.reshape(*v.shape[:-1], -1, group).astype(jnp.float32)
    vmin = jnp.min(vg, axis=-1).astype(dtype)
    step = ((jnp.max(vg, axis=-1) - vmin.astype(jnp.float32)) / qmax).astype(dtype)
    stepf = step.astype(jnp.float32)
    safe = jnp.where(stepf > 0, stepf, 1.0)
    codes = jnp.clip(jnp.round((vg - vmin.astype(jnp.float32)[..., None]) / safe[..., None]), 0, qmax)
    return codes.reshape(v.shape).astype(jnp.uint8), step, vmin


def stat_decode(codes: Array, step: Array, vmin: Array, group: int) -> Array:
    """Inverse of :func:`stat_quantize`: codes * step + min, as float32."""
    c = codes.astype(jnp.float32).reshape(*codes.shape[:-1], -1, group)
    v = c * step.astype(jnp.float32)[..., None] + vmin.astype(jnp.float32)[..., None]
    return v.reshape(codes.shape)


def _first_level(w: Array, s: Array, z: Array, qmax: int) -> tuple[Array, Array]:
    q = jnp.clip(jnp.round(w / s + z), 0, qmax)
    return (q - z) * s, q


_TINY = 1e-10


def _minmax_stats(slab: Array, keep: Array, qmax: int) -> tuple[Array, Array]:
    lo = jnp.min(jnp.where(keep, slab, jnp.inf), axis=-1)
    hi = jnp.max(jnp.where(keep, slab, -jnp.inf), axis=-1)
    lo = jnp.minimum(jnp.where(jnp.isfinite(lo), lo, 0.0), 0.0)  # the grid contains 0 (as GPTQ's
    hi = jnp.maximum(jnp.where(jnp.isfinite(hi), hi, 0.0), 0.0)  # quantizer): zeros stay in [0, qmax]
    s = jnp.maximum(hi - lo, _TINY) / qmax
    return s, -lo / s


def leave_one_out_gain(slab: Array, d: Array, qmax: int) -> Array:
    """Error reduction from keeping each weight of a group exact [N, beta] (rows = groups)."""
    n, beta = slab.shape
    keep_all = jnp.ones_like(slab, bool)
    s, z = _minmax_stats(slab, keep_all, qmax)
    dq, _ = _first_level(slab, s[:, None], z[:, None], qmax)
    base = jnp.sum(((slab - dq) / d) ** 2, axis=-1)  # [N]
    keep = ~jnp.eye(beta, dtype=bool)  # [beta(left out), beta]
    sl = jnp.broadcast_to(slab[:, None, :], (n, beta, beta))
    s2, z2 = _minmax_stats(sl, keep[None], qmax)  # [N, beta]
    dq2, _ = _first_level(sl, s2[..., None], z2[..., None], qmax)
    err = jnp.sum(jnp.where(keep[None], ((sl - dq2) / d) ** 2, 0.0), axis=-1)  # [N, beta]
    return base[:, None] - err


@dataclasses.dataclass(frozen=True)
class _SpQRQuantizer:
    bits: int
    beta: int
    stat_bits: int
    stat_group: int
    stat_dtype: str
    n_out: int  # outliers per group

    def group(self, ctx, slab, d, col0):
        n, beta = slab.shape
        qmax = 2**self.bits - 1
        if self.n_out > 0:
            gain = leave_one_out_gain(slab, d[None, :], qmax)
            _, idx = lax.top_k(gain.reshape(-1), self.n_out)
            mask = jnp.zeros(n * beta, bool).at[idx].set(True).reshape(n, beta)
        else:
            idx = jnp.zeros((0,), jnp.int32)
            mask = jnp.zeros((n, beta), bool)
        s, z = _minmax_stats(slab, ~mask, qmax)
        dt = _STAT_DTYPES[self.stat_dtype]
        sc, ss, sm = stat_quantize(s, self.stat_bits, self.stat_group, dt)
        zc, zs, zm = stat_quantize(z, self.stat_bits, self.stat_group, dt)
        s_t = jnp.maximum(stat_decode(sc, ss, sm, self.stat_group), _TINY)
        z_t = stat_decode(zc, zs, zm, self.stat_group)
        return (s_t, z_t, mask), (sc, ss, sm, zc, zs, zm, idx.astype(jnp.int32))

    def column(self, ctx, state, w, j, col):
        s, z, mask = state
        dq, q = _first_level(w, s, z, 2**self.bits - 1)
        keep = lax.dynamic_index_in_dim(mask, j, axis=1, keepdims=False)
        dq = jnp.where(keep, w.astype(jnp.bfloat16).astype(jnp.float32), dq)
        return dq, q.astype(jnp.uint8)


@jax.tree_util.register_pytree_node_class
class SpQRArray(CodedArray):
    """A SpQR-quantized kernel [K, N]: packed codes, quantized group stats, COO outliers."""

    def __init__(self, codes, s_codes, s_step, s_min, z_codes, z_step, z_min, rows, cols, values, *, meta):
        self.codes, self.s_codes, self.s_step, self.s_min = codes, s_codes, s_step, s_min
        self.z_codes, self.z_step, self.z_min = z_codes, z_step, z_min
        self.rows, self.cols, self.values = rows, cols, values
        self.meta = meta  # (K, N, bits, group_size, stat_bits, stat_group, dtype name)
        self.dtype = jnp.dtype(meta[6])

    def tree_flatten(self):
        return (
            (
                self.codes,
                self.s_codes,
                self.s_step,
                self.s_min,
                self.z_codes,
                self.z_step,
                self.z_min,
                self.rows,
                self.cols,
                self.values,
            ),
            self.meta,
        )

    @classmethod
    def tree_unflatten(cls, meta, children):
        return cls(*children, meta=meta)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.meta[0], self.meta[1])

    @property
    def n_outliers(self) -> int:
        return int(self.values.shape[0])

    def _stats(self) -> tuple[Array, Array]:
        k, n, _, beta, sbits, sgroup, _ = self.meta
        sc = unpack(self.s_codes, _container(sbits), 1, 0, False) if _container(sbits) < 8 else self.s_codes
        zc = unpack(self.z_codes, _container(sbits), 1, 0, False) if _container(sbits) < 8 else self.z_codes
        s = jnp.maximum(stat_decode(sc, self.s_step, self.s_min, sgroup), _TINY)
        return s, stat_decode(zc, self.z_step, self.z_min, sgroup)

    def dequantize(self, dtype=None) -> Array:
        k, n, bits, beta, _, _, _ = self.meta
        dt = self.dtype if dtype is None else dtype
        q = unpack(self.codes, _container(bits), 0, 0, False).astype(jnp.float32)
        s, z = self._stats()
        w = (q - jnp.repeat(z, beta, axis=0)) * jnp.repeat(s, beta, axis=0)
        w = w.at[self.rows.astype(jnp.int32), self.cols.astype(jnp.int32)].set(self.values.astype(jnp.float32))
        return w.astype(dt)

    def astype(self, dtype) -> Array:
        """The dense kernel in ``dtype``: how :func:`jquant.dispatch.linear` reads a
        non-QArray kernel (``w.astype(x.dtype)``), so SpQR layers run unchanged."""
        return self.dequantize(dtype)

    def nominal_bits(self) -> float:
        """Paper accounting: codes and stat codes at their bit widths, second-level stats at
        their dtype, outliers at 16-bit value + 32-bit (row, col) index."""
        k, n, bits, beta, sbits, sgroup, _ = self.meta
        stat_bits = 8 * jnp.dtype(self.s_step.dtype).itemsize
        groups = (k // beta) * n
        total = k * n * bits + 2 * groups * sbits + 2 * 2 * (groups // sgroup) * stat_bits
        return float(total + self.n_outliers * 48)

    @property
    def nominal_bits_per_weight(self) -> float:
        return self.nominal_bits() / (self.meta[0] * self.meta[1])


def _block_for(k: int, beta: int, block_size: int) -> int:
    m = k // beta
    best = 1
    for d in range(1, m + 1):
        if m % d == 0 and d * beta <= max(block_size, beta):
            best = d
    return best * beta


@functools.partial(jax.jit, static_argnames=("quantizer", "block"))
def _spqr_core(w: Array, u: Array, *, quantizer: _SpQRQuantizer, block: int):
    return blocked_sweep(w.T.astype(jnp.float32), u, None, quantizer, block=block, sub=quantizer.beta)


def spqr_layer(w: Array, hessian: Array, config: SpQRConfig | None = None, *, path: str = "layer") -> SpQRArray:
    """SpQR-quantize one kernel ``w`` [K, N] given its input Hessian [K, K]."""
    config = config or SpQRConfig()
    w = jnp.asarray(w)
    if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"spqr: {path}: kernel must be a floating 2-D (in, out) array, got {w.dtype}{tuple(w.shape)}")
    if not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError(f"spqr: {path}: kernel has NaN/Inf values")
    k, n = w.shape
    beta, sg = config.group_size, config.stat_group
    if k % beta:
        raise ValueError(f"spqr: {path}: group_size {beta} does not divide the input dimension {k}")
    if n % sg:
        raise ValueError(f"spqr: {path}: stat_group {sg} does not divide the output dimension {n}")
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"spqr: {path}: Hessian {tuple(hessian.shape)} does not match K={k}")
    u, _ = inverse_cholesky(hessian, damp=config.damp, damp_limit=config.damp_limit, path=path)
    n_out = int(round(config.outlier_rate * n * beta))
    q = _SpQRQuantizer(config.bits, beta, config.stat_bits, sg, config.stat_dtype, n_out)
    block = _block_for(k, beta, config.block_size)
    codes_t, dq_t, recs = _spqr_core(w, u, quantizer=q, block=block)
    sc, ss, sm, zc, zs, zm, idx = recs  # [G, ...]
    g = k // beta
    rows = (jnp.arange(g, dtype=jnp.int32)[:, None] * beta + idx % beta).reshape(-1)
    cols = (idx // beta).reshape(-1)
    values = dq_t[cols, rows].astype(jnp.bfloat16)
    idx_dt = jnp.uint16 if max(k, n) <= 65536 else jnp.int32
    cbits = _container(config.stat_bits)
    pack_stat = (lambda c: pack(c, cbits, 1)[0]) if cbits < 8 else (lambda c: c)
    meta = (k, n, config.bits, beta, config.stat_bits, sg, jnp.dtype(w.dtype).name)
    return SpQRArray(
        pack(codes_t.T, _container(config.bits), 0)[0],
        pack_stat(sc),
        ss,
        sm,
        pack_stat(zc),
        zs,
        zm,
        rows.astype(idx_dt),
        cols.astype(idx_dt),
        values,
        meta=meta,
    )


def spqr(
    params: Any,
    stats: Mapping[str, Any],
    rules: Sequence[Rule] | str = ".*",
    config: SpQRConfig | None = None,
    *,
    layers: Collection[str] | None = None,
) -> Any:
    """SpQR every selected kernel. ``rules`` is a regex (or list of regexes / (regex, flag)
    pairs, flag None to skip) choosing the layers; the format comes from ``config``."""
    config = config or SpQRConfig()
    spec = f"uint{config.bits}/g{config.group_size}"
    if isinstance(rules, str):
        rules = [(rules, spec)]
    else:
        rules = [(r, spec) if isinstance(r, str) else (r[0], None if r[1] is None else spec) for r in rules]
    return lw.map_layers(
        params,
        stats,
        rules,
        lambda layer: spqr_layer(layer.kernel, layer.stats.hessian_mean, config, path=layer.path),
        layers=layers,
        method="spqr",
    )


def bits_per_weight(tree: Any) -> dict[str, float]:
    """Average bits per weight over the SpQR leaves of a tree: nominal (paper) and storage."""
    leaves = [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, SpQRArray)) if isinstance(x, SpQRArray)]
    if not leaves:
        raise ValueError("no SpQR leaves in the tree")
    size = sum(math.prod(x.shape) for x in leaves)
    return {
        "nominal": sum(x.nominal_bits() for x in leaves) / size,
        "storage": sum(8 * x.nbytes for x in leaves) / size,
    }
