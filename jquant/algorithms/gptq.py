"""GPTQ (Frantar et al. 2022): Hessian-aware column-by-column quantization with error feedback.

For a kernel W [K, N] and the input Hessian H = X^T X [K, K], the columns of W^T (input
channels) are quantized one at a time; each column's rounding error is spread over the
not-yet-quantized columns through the upper Cholesky factor U of H^-1, which minimizes
the layer output error ||X (W - W_q)||^2 greedily. Implementation follows the paper's
reference code:

* lazy batched updates: columns are processed in blocks of ``block_size`` (128); inside
  a block the error is propagated column by column, to the rest of the matrix once per
  block (one matmul). Blocks and columns are ``lax.fori_loop`` s inside one jitted call.
* damping: ``damp`` times the mean Hessian diagonal is added to the diagonal (default
  0.01). Channels that never saw a non-zero input (zero diagonal) get H_ii = 1, so they
  are rounded to nearest and feed no error to others. A Hessian from fewer tokens than
  channels is rank-deficient; the damping makes it positive definite (the documented
  fallback). A failed Cholesky (non-finite factor, e.g. from an indefinite
  accumulated H) multiplies the damping by 10, warns naming the layer, and retries up to
  ``damp_limit``; past it, a ValueError names the layer.
* act-order: columns in decreasing order of H_ii. Group scales must stay contiguous in
  the original order to keep :class:`~jquant.qarray.QArray`'s layout, so act-order uses
  static groups (scales from the original weights, computed up front), the paper's
  ``static_groups`` option.
* group-wise scales: without static groups, a group's scales (and zero points) are
  computed when the sweep reaches its first column, from the already error-updated
  weights, as in the reference.

Every scalar-code format of :mod:`jquant.formats` works (int8/4/3/2, the uint variants
with zero points, fp8, nf4, fp4 incl. MX/NV block scales); granularities: per tensor,
per channel, groups, 2-D blocks. The result is a QArray laid out exactly as
``jquant.qarray.quantize`` lays it out, so dispatch, io and kernels read it unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import warnings
from typing import Any, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jquant.algorithms import layerwise as lw
from jquant.algorithms.fold import with_params
from jquant.formats import QSpec, parse_spec
from jquant.policy import Policy
from jquant.qarray import QArray, compute_scales, decode, decode_scale, encode
from jquant.rules import Rule
from jquant.transform import Context, Transform, Variables

Array = jax.Array
log = logging.getLogger(__name__)
_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    """GPTQ options.

    Attributes:
      block_size: columns per lazy-update block (128 in the paper).
      damp: damping as a fraction of the mean Hessian diagonal.
      damp_limit: largest damping fraction tried after x10 increases on a failed Cholesky.
      act_order: quantize columns in decreasing order of the Hessian diagonal.
      static_groups: compute group scales up front from the original weights. None
        picks it automatically (on with act_order or MX/NV block scaling, else off);
        False with act_order and groups is an error (it would break QArray's layout).
    """

    block_size: int = 128
    damp: float = 0.01
    damp_limit: float = 10.0
    act_order: bool = False
    static_groups: bool | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not self.damp > 0 or not self.damp_limit >= self.damp:
            raise ValueError(f"need 0 < damp <= damp_limit, got damp={self.damp}, damp_limit={self.damp_limit}")


# --- Hessian preparation --------------------------------------------------------------------------
@jax.jit
def _inverse_cholesky(h: Array, perm: Array, damp: Array) -> tuple[Array, Array]:
    """Upper Cholesky factor U of (H_perm + damp * mean(diag) I)^-1, and whether it is finite."""
    h = h[perm][:, perm].astype(jnp.float32)
    h = (h + h.T) / 2
    d = jnp.diagonal(h)
    h = h + jnp.diag(jnp.where(d <= 0, 1.0 - d, 0.0))  # dead channels: H_ii = 1
    k = h.shape[0]
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(k, dtype=h.dtype)
    low = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((low, True), jnp.eye(k, dtype=h.dtype))
    u = jnp.triu(jnp.linalg.cholesky((hinv + hinv.T) / 2).T)
    return u, jnp.all(jnp.isfinite(u))


def inverse_cholesky(
    hessian: Array, *, damp: float = 0.01, damp_limit: float = 10.0, perm: Array | None = None, path: str = "layer"
) -> tuple[Array, float]:
    """U = chol(H^-1) (upper) with damping escalation; returns (U, damping used)."""
    h = jnp.asarray(hessian, jnp.float32)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"{path}: Hessian must be square [K, K], got {h.shape}")
    if not bool(jnp.all(jnp.isfinite(h))):
        raise ValueError(f"{path}: Hessian has NaN/Inf entries")
    perm = jnp.arange(h.shape[0]) if perm is None else perm
    d = damp
    while True:
        u, ok = _inverse_cholesky(h, perm, jnp.float32(d))
        if bool(ok):
            return u, d
        if d * 10 > damp_limit * (1 + 1e-9):
            raise ValueError(
                f"{path}: Cholesky of the damped Hessian failed even with damping {d:g} (limit {damp_limit:g})"
            )
        msg = f"{path}: Cholesky failed with damping {d:g} x mean(diag H); retrying with {d * 10:g}"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.warning(msg)
        d *= 10


# --- the blocked column sweep (shared with SpQR) -------------------------------------------------------
def blocked_sweep(w_t: Array, u: Array, ctx: Any, quantizer: Any, *, block: int, sub: int):
    """GPTQ's lazy-batch sweep over the columns of ``w_t`` [N, Kp] (Kp multiple of block).

    ``quantizer`` (static, hashable) supplies ``group(ctx, slab [N, sub], d [sub], col0)
    -> (state, record)`` called at the start of every ``sub`` columns, and
    ``column(ctx, state, w [N], j, col) -> (dq [N], code [N])``. Returns the codes
    [N, Kp], dequantized values [N, Kp] and the stacked records [Kp // sub, ...].
    """
    n, kp = w_t.shape
    nblocks, nsub = kp // block, block // sub
    rec0 = jax.eval_shape(lambda s, d: quantizer.group(ctx, s, d, 0)[1], w_t[:, :sub], u[0, :sub])
    code_t = jax.eval_shape(
        lambda s, d: quantizer.column(ctx, quantizer.group(ctx, s, d, 0)[0], s[:, 0], 0, 0)[1], w_t[:, :sub], u[0, :sub]
    )
    recs = jax.tree.map(lambda r: jnp.zeros((kp // sub,) + r.shape, r.dtype), rec0)
    codes = jnp.zeros((n, kp), code_t.dtype)
    dqs = jnp.zeros((n, kp), jnp.float32)

    def block_body(bi, carry):
        w_t, codes, dqs, recs = carry
        i1 = bi * block
        w1 = lax.dynamic_slice(w_t, (0, i1), (n, block))
        u1 = lax.dynamic_slice(u, (i1, i1), (block, block))
        d1 = jnp.diagonal(u1)

        def sub_body(si, c2):
            w1, c1, q1, e1, recs = c2
            j0 = si * sub
            state, rec = quantizer.group(
                ctx, lax.dynamic_slice(w1, (0, j0), (n, sub)), lax.dynamic_slice(d1, (j0,), (sub,)), i1 + j0
            )
            recs = jax.tree.map(lambda r, v: r.at[(i1 + j0) // sub].set(v), recs, rec)

            def col_body(j, c3):
                w1, c1, q1, e1 = c3
                c = j0 + j
                wc = lax.dynamic_index_in_dim(w1, c, axis=1, keepdims=False)
                dq, code = quantizer.column(ctx, state, wc, j, i1 + c)
                err = (wc - dq) / d1[c]
                w1 = w1 - err[:, None] * lax.dynamic_index_in_dim(u1, c, axis=0, keepdims=False)[None, :]
                c1 = lax.dynamic_update_index_in_dim(c1, code, c, axis=1)
                q1 = lax.dynamic_update_index_in_dim(q1, dq, c, axis=1)
                e1 = lax.dynamic_update_index_in_dim(e1, err, c, axis=1)
                return w1, c1, q1, e1

            w1, c1, q1, e1 = lax.fori_loop(0, sub, col_body, (w1, c1, q1, e1))
            return w1, c1, q1, e1, recs

        init = (
            w1,
            jnp.zeros((n, block), codes.dtype),
            jnp.zeros((n, block), jnp.float32),
            jnp.zeros((n, block), jnp.float32),
            recs,
        )
        _, c1, q1, e1, recs = lax.fori_loop(0, nsub, sub_body, init)
        # lazy batch update of everything right of the block (U is upper triangular, so
        # columns left of it are untouched; the block's own columns are not read again)
        w_t = w_t - jnp.matmul(e1, lax.dynamic_slice(u, (i1, 0), (block, kp)), precision=_HIGHEST)
        codes = lax.dynamic_update_slice(codes, c1, (0, i1))
        dqs = lax.dynamic_update_slice(dqs, q1, (0, i1))
        return w_t, codes, dqs, recs

    _, codes, dqs, recs = lax.fori_loop(0, nblocks, block_body, (w_t, codes, dqs, recs))
    return codes, dqs, recs


def pad_problem(w_t: Array, u: Array, kp: int) -> tuple[Array, Array]:
    """Pad [N, K] weights with zero columns and U with an identity block up to Kp."""
    k = w_t.shape[1]
    if kp == k:
        return w_t, u
    w_t = jnp.pad(w_t, ((0, 0), (0, kp - k)))
    u = jnp.pad(u, ((0, kp - k), (0, kp - k)))
    idx = jnp.arange(k, kp)
    return w_t, u.at[idx, idx].set(1.0)


def _expand(v: Array, cb: int, n: int) -> Array:
    return jnp.repeat(v, cb, total_repeat_length=n) if cb > 1 else v


def quantize_column(w: Array, scale: Array, zero: Array | None, spec: QSpec) -> tuple[Array, Array]:
    """(dequantized, code) of one column [N] with per-element fp32 scale (and zero)."""
    z = None if zero is None else zero[None]
    code = encode(w[None], scale[None], z, spec)
    return decode(code, scale[None], z, spec)[0], code[0]


@dataclasses.dataclass(frozen=True)
class _Quantizer:
    """GPTQ's column quantizer: static (tables up front) or dynamic groups."""

    spec: QSpec
    rows: int  # rows (input channels) per scale block
    cb: int  # output columns per scale block
    n: int
    static: bool

    def group(self, ctx, slab, d, col0):
        if self.static:
            return None, ()
        s, z, s2 = compute_scales(slab.T, self.spec, (self.rows, self.cb))
        dec = decode_scale(QArray(None, s, z, s2, spec=self.spec))[0]
        zf = None if z is None else _expand(z[0].astype(jnp.float32), self.cb, self.n)
        return (_expand(dec, self.cb, self.n), zf), (s[0], z[0]) if z is not None else (s[0],)

    def column(self, ctx, state, w, j, col):
        if self.static:
            dec, zero, gidx = ctx
            g = gidx[col]
            s = _expand(dec[g], self.cb, self.n)
            zf = None if zero is None else _expand(zero[g].astype(jnp.float32), self.cb, self.n)
        else:
            s, zf = state
        return quantize_column(w, s, zf, self.spec)


@functools.partial(jax.jit, static_argnames=("quantizer", "block", "sub"))
def _gptq_core(w: Array, u: Array, perm: Array, *, quantizer: _Quantizer, block: int, sub: int):
    """Sweep, un-permute, and return (codes [K, N], scale, zero, scale2) in QArray layout."""
    k, n = w.shape
    kp = math.ceil(k / block) * block
    spec, rows, cb = quantizer.spec, quantizer.rows, quantizer.cb
    ctx = None
    if quantizer.static:  # scales from the original weights, looked up per (permuted) column
        s, z, s2 = compute_scales(w.astype(jnp.float32), spec, (rows, cb))
        dec = decode_scale(QArray(None, s, z, s2, spec=spec))
        gidx = jnp.concatenate([perm // rows, jnp.full((kp - k,), k // rows - 1, perm.dtype)])
        ctx = (dec, z, gidx)
    w_t, u = pad_problem(w.T.astype(jnp.float32)[:, perm], u, kp)
    codes, _, recs = blocked_sweep(w_t, u, ctx, quantizer, block=block, sub=sub)
    codes = codes[:, :k][:, jnp.argsort(perm)].T
    if not quantizer.static:
        recs = jax.tree.map(lambda r: r[: k // sub], recs)
        s, z, s2 = recs[0], (recs[1] if len(recs) > 1 else None), None
    return codes, s, z, s2


def check_spec(spec: QSpec, path: str, method: str) -> None:
    if spec.format.kind == "codec":
        raise ValueError(f"{method}: {path}: {spec.fmt} is a GGUF block codec; use jquant.algorithms.kquants")
    if spec.dynamic:
        raise ValueError(f"{method}: {path}: {spec} is an activation (per-token) spec")


def sweep_geometry(k: int, rows: int, block_size: int, grouped: bool) -> tuple[int, int]:
    """(block, sub): blocks are whole multiples of the group size when groups are dynamic."""
    if not grouped:
        return block_size, block_size
    block = (block_size // rows) * rows if rows <= block_size else rows
    return block, rows


def gptq_layer(
    w: Array, hessian: Array, spec: QSpec | str, config: GPTQConfig | None = None, *, path: str = "layer"
) -> QArray:
    """GPTQ-quantize one kernel ``w`` [K, N] given its input Hessian [K, K] (X^T X, any scale)."""
    config = config or GPTQConfig()
    spec = parse_spec(spec)
    check_spec(spec, path, "gptq")
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"gptq: {path}: kernel must be 2-D (in, out), got {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"gptq: {path}: kernel dtype {w.dtype} is not floating")
    if not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError(f"gptq: {path}: kernel has NaN/Inf values")
    k, n = w.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"gptq: {path}: Hessian {tuple(hessian.shape)} does not match K={k}")
    rows, cb = spec.block_shape((k, n), path)
    grouped = rows < k
    static = config.static_groups
    if static is None:
        static = config.act_order or bool(spec.scaling)
    if grouped and config.act_order and static is False:
        raise ValueError(f"gptq: {path}: act_order with groups needs static_groups (QArray groups are contiguous)")
    static = static or not grouped
    diag = jnp.diagonal(jnp.asarray(hessian, jnp.float32))
    perm = jnp.argsort(-diag, stable=True) if config.act_order else jnp.arange(k)
    u, used = inverse_cholesky(hessian, damp=config.damp, damp_limit=config.damp_limit, perm=perm, path=path)
    if used != config.damp:
        log.info("gptq: %s used damping %g", path, used)
    block, sub = sweep_geometry(k, rows, config.block_size, not static)
    q = _Quantizer(spec, rows, cb, n, static)
    codes, s, z, s2 = _gptq_core(w, u, perm, quantizer=q, block=block, sub=sub)
    return lw.build_qarray(w, spec, s, z, s2, codes=codes)


def gptq(
    params: Any,
    stats: Mapping[str, Any],
    rules: Sequence[Rule] | QSpec | str,
    config: GPTQConfig | None = None,
    *,
    layers: Collection[str] | None = None,
) -> Any:
    """GPTQ every kernel the rules assign a spec to (restricted to ``layers`` if given).

    ``stats`` maps kernel paths to :class:`jquant.calib.LayerStats` (anything with
    ``hessian`` and ``count``). Layers rules skip are returned unchanged.
    """
    config = config or GPTQConfig()

    def one(layer: lw.Layer) -> QArray:
        if float(layer.stats.count) < layer.kernel.shape[0]:
            log.info(
                "gptq: %s: Hessian from %d tokens < %d channels is rank-deficient; damping keeps it invertible",
                layer.path,
                int(layer.stats.count),
                layer.kernel.shape[0],
            )
        return gptq_layer(layer.kernel, lw.mean_hessian(layer), layer.spec, config, path=layer.path)

    return lw.map_layers(params, stats, rules, one, layers=layers, method="gptq")


def transform(policy: Policy, config: Any = None) -> Transform:
    """GPTQ (Hessian error feedback) per the policy, on trajectory statistics."""

    def fn(v: Variables, ctx: Context) -> Variables:
        params = gptq(v["params"], ctx.stats(v), policy.rules(ctx.roles), config)
        return with_params(v, policy.cast(params, ctx.roles))

    return Transform(f"gptq[{policy.name}]", fn, True)
