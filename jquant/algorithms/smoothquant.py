"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights for W8A8.

A few input channels of DiT linears carry activations 20-100x larger than the rest; a
per-tensor (or per-token) 8-bit activation grid sized for them wastes most of its
levels on the others. SmoothQuant divides channel j of the input by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

and multiplies row j of the kernel by it (``y = (x / s) @ (diag(s) W)``), balancing the
two ranges; alpha (default 0.5) sets how much difficulty moves to the weights. With
``search=True`` alpha is chosen per layer group on a grid, minimizing the W8A8 output
error estimated from the calibration statistics alone:

    tr(dW'^T H' dW') + n * sum_j e_j^2 ||Wq'_j||^2,   e_j^2 = min(D^2 / 12, E[x'_j^2])

(weight rounding error under the smoothed Hessian H', plus uniform activation rounding
noise of step D = max_j(max|x'_j|) / 127 per element, capped by the channel's own energy
when it rounds to zero). For dynamic per-token scales the step of a typical token is
estimated as max_j(p90(|x_j|) / s_j) / 127 from the calibration histogram.

The division ``x / s`` is folded into the preceding op where exact (one shared helper
with AWQ: :mod:`jquant.algorithms.fold`), else kept as ``input_mul``. With a static
activation spec (default ``"int8/t"``) the per-tensor activation scale
``max_j(max|x_j| / s_j) / 127`` (or a percentile instead of the max) is stored as
``input_scale`` in the aux data; run with ``jquant.nn.quantized(act="int8/t",
static=True, aux=...)``, or with ``act="int8/token"`` for dynamic scales.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp

from jquant.algorithms import fold as fold_lib
from jquant.algorithms import layerwise as lw
from jquant.algorithms.fold import flat_aux, with_params
from jquant.algorithms.rtn import _qdq
from jquant.formats import QSpec, parse_spec
from jquant.policy import Policy
from jquant.qarray import compute_scales
from jquant.rules import Rule
from jquant.transform import Context, Transform, Variables

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant options.

    Attributes:
      alpha: migration strength in [0, 1] (used when ``search`` is off).
      search: choose alpha per layer group on ``grid`` points in [0, 1].
      grid: number of alphas searched.
      act: activation spec: a static one (``"int8/t"``: an ``input_scale`` is stored) or
        a dynamic per-token one (``"int8/token"``: nothing stored).
      percentile: static scale from this per-channel percentile of |x| (histogram)
        instead of the absmax; None uses the absmax.
    """

    alpha: float = 0.5
    search: bool = False
    grid: int = 11
    act: str = "int8/t"
    percentile: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if self.percentile is not None and not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must lie in (0, 100], got {self.percentile}")
        parse_spec(self.act)

    @property
    def act_spec(self) -> QSpec:
        return parse_spec(self.act)


def smooth_scales(act_absmax: Array, w_absmax: Array, alpha: Array) -> Array:
    """s = max|X|^alpha / max|W|^(1-alpha), guarded against empty channels."""
    a = jnp.maximum(act_absmax.astype(jnp.float32), 1e-5)
    w = jnp.maximum(w_absmax.astype(jnp.float32), 1e-5)
    s = a**alpha / w ** (1.0 - alpha)
    return jnp.clip(s, 1e-5, 1e5)


@functools.partial(jax.jit, static_argnames=("wspec", "qmax"))
def _w8a8_error(w: Array, hmean: Array, range_: Array, s: Array, count: Array, wspec: QSpec, qmax: float) -> Array:
    """Estimated W8A8 output error of one layer under smoothing s (see module docstring)."""
    k, n = w.shape
    rows, cb = wspec.block_shape((k, n))
    ws = w.astype(jnp.float32) * s[:, None]
    sc, z, s2 = compute_scales(ws, wspec, (rows, cb))
    wq = _qdq(ws, wspec, sc, z, s2)
    h = hmean / s[:, None] / s[None, :]
    werr = lw.hessian_error(ws, wq, h)
    step = jnp.max(range_ / s) / qmax
    e2 = jnp.minimum(step**2 / 12.0, jnp.diagonal(h))
    aerr = jnp.sum(e2 * jnp.sum(wq**2, axis=1))
    return count * (werr + aerr)


def _step_range(stats: Any, act: QSpec) -> Array:
    """Per-channel |x| whose max over channels (after / s) sets the activation step: the
    absmax for a static per-tensor scale; for per-token scales the typical token's max,
    proxied by each channel's 90th percentile of |x| (the absmax without a histogram)."""
    if act.dynamic and stats.hist.shape[-1]:
        return stats.percentile(90.0)
    return stats.absmax


def _act_qmax(spec: QSpec) -> float:
    f = spec.format
    return float(f.qmax)


def smoothquant_search(
    params: Any,
    stats: Mapping[str, Any],
    rules: Sequence[Rule] | QSpec | str = "int8",
    config: SmoothQuantConfig | None = None,
    *,
    fold_map: fold_lib.FoldMap | None = None,
    layers: Collection[str] | None = None,
) -> tuple[dict[str, Array], dict[str, float]]:
    """The smoothing scales ``{kernel_path: s}`` and the alpha chosen per layer."""
    config = config or SmoothQuantConfig()
    need_h = config.search
    selected = {
        l.path: l for l in lw.select(params, stats, rules, layers=layers, method="smoothquant", need_hessian=need_h)
    }
    qmax = _act_qmax(config.act_spec)
    scales: dict[str, Array] = {}
    alphas: dict[str, float] = {}
    grid = jnp.linspace(0.0, 1.0, config.grid) if config.grid > 1 else jnp.asarray([config.alpha])
    for _, members in fold_lib.fold_groups(list(selected), fold_map):
        ls = [selected[m] for m in members]
        amax = ls[0].stats.absmax
        rng = _step_range(ls[0].stats, config.act_spec)
        wmax = jnp.max(jnp.stack([jnp.max(jnp.abs(l.kernel.astype(jnp.float32)), axis=1) for l in ls]), axis=0)
        if config.search:
            errs = []
            for a in grid:
                s = smooth_scales(amax, wmax, a)
                errs.append(
                    sum(
                        float(_w8a8_error(l.kernel, l.stats.hessian_mean, rng, s, l.stats.count, l.spec, qmax))
                        for l in ls
                    )
                )
            best = float(grid[int(jnp.argmin(jnp.asarray(errs)))])
        else:
            best = config.alpha
        s = smooth_scales(amax, wmax, jnp.float32(best))
        for m in members:
            scales[m] = s
            alphas[m] = best
    return scales, alphas


def static_input_scale(
    stats: Any, s: Array | None, act: QSpec | str = "int8/t", percentile: float | None = None
) -> Array:
    """Per-tensor static activation scale of x / s: max_j(stat_j / s_j) / qmax."""
    act = parse_spec(act)
    v = stats.absmax if percentile is None else stats.percentile(percentile)
    if s is not None:
        v = v / s
    return (jnp.maximum(jnp.max(v), 1e-8) / _act_qmax(act)).astype(jnp.float32)


def smoothquant(
    params: Any,
    stats: Mapping[str, Any],
    rules: Sequence[Rule] | QSpec | str = "int8",
    config: SmoothQuantConfig | None = None,
    *,
    fold_map: fold_lib.FoldMap | None = None,
    aux: fold_lib.Aux | None = None,
    layers: Collection[str] | None = None,
) -> tuple[Any, fold_lib.Aux]:
    """Smooth, then quantize weights per the rules (default int8 per channel); returns (params, aux).

    With a static ``config.act`` each layer's aux gets ``input_scale`` for its smoothed input.
    """
    config = config or SmoothQuantConfig()
    scales, _ = smoothquant_search(params, stats, rules, config, fold_map=fold_map, layers=layers)
    params, aux = fold_lib.smooth(params, scales, fold_map, aux)
    sel = lw.select(params, stats, rules, layers=set(scales), method="smoothquant", need_hessian=False)
    new = {l.path: lw.quantize_fast(l.kernel, l.spec, path=l.path) for l in sel}
    if not config.act_spec.dynamic:
        for l in sel:
            entry = aux.setdefault(lw.module_path(l.path), {})
            entry["input_scale"] = static_input_scale(l.stats, scales[l.path], config.act_spec, config.percentile)
    return lw.replace(params, new), aux


def transform(policy: Policy, alpha: float = 0.5, search: bool = True, act: str = "int8/t") -> Transform:
    """SmoothQuant: activation outliers migrated into the weights (alpha searched per layer
    on a grid when ``search``), then RTN per the policy. Its single static ``input_scale``
    is dropped: the recipe's table (or dynamic scales) decides at run time."""

    def fn(v: Variables, ctx: Context) -> Variables:
        cfg = SmoothQuantConfig(alpha=alpha, search=search, act=act)
        params, aux = smoothquant(v["params"], ctx.stats(v), policy.rules(ctx.roles), cfg, aux=flat_aux(v))
        aux = {m: {k: x for k, x in e.items() if k != "input_scale"} for m, e in aux.items()}  # the table decides
        return with_params(v, policy.cast(params, ctx.roles), {m: e for m, e in aux.items() if e})

    return Transform(f"smoothquant[{policy.name}]", fn, True)


def smoothing(policy: Policy, alpha: float = 0.5, search: bool = False, act: str = "int8/t") -> Transform:
    """SmoothQuant's smoothing alone: the float model with ``diag(s) W`` and ``x / s`` kept as
    ``input_mul`` (exact in float), for any quantizer to follow (``chain(smoothing(p), rtn(p))``)
    and as the reference a low-rank correction of that quantizer's error needs."""

    def fn(v: Variables, ctx: Context) -> Variables:
        cfg = SmoothQuantConfig(alpha=alpha, search=search, act=act)
        scales, _ = smoothquant_search(v["params"], ctx.stats(v), policy.rules(ctx.roles), cfg)
        params, aux = fold_lib.smooth(v["params"], scales, None, flat_aux(v))
        return with_params(v, params, aux)

    return Transform(f"smoothing[{policy.name}]", fn, True)
