"""AWQ (Lin et al. 2023): activation-aware per-input-channel scaling, then clipping.

Weights multiplied by large-activation channels matter most. AWQ scales every input
channel j of a kernel by ``s_j = mean|x_j|^alpha`` (normalized by sqrt(max s * min s)),
quantizes ``diag(s) W`` and divides the input by s, choosing alpha on a grid in [0, 1] to
minimize the layer output error. Here the error is computed from the calibration
Hessian alone, ``tr(dW^T H dW)`` with ``dW = diag(1/s) Q(diag(s) W) - W`` (no activations
kept), summed over the layers that share one fold target (q, k, v after one norm get one
shared s, since the norm's scale can only hold one). alpha = 0 (no scaling, plain RTN) is
on the grid, so the search never does worse than RTN on this objective. A clipping
search (:func:`jquant.algorithms.rtn.clip_search`, on the scaled weights and the scaled
Hessian ``diag(1/s) H diag(1/s)``) then shrinks each scale block's range.

The division ``x / s`` is folded into the preceding op where exact and otherwise kept
as an explicit ``input_mul`` (see :mod:`jquant.algorithms.fold`).
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
from jquant.algorithms.rtn import _qdq, clip_search
from jquant.formats import QSpec, parse_spec
from jquant.policy import Policy
from jquant.qarray import compute_scales
from jquant.rules import Rule
from jquant.transform import Context, Transform, Variables

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class AWQConfig:
    """AWQ options.

    Attributes:
      grid: number of alphas in [0, 1] tried for the scale exponent.
      clip_search: run the clipping search after scaling.
      clip_grid, clip_min_ratio: clip ratios ``linspace(1, clip_min_ratio, clip_grid)``.
      quantize: return QArray kernels; False returns the smoothed float kernels (no
        clipping) so that another method (e.g. GPTQ, on statistics transformed with
        :func:`jquant.algorithms.fold.smooth_stats`) follows.
    """

    grid: int = 20
    clip_search: bool = True
    clip_grid: int = 20
    clip_min_ratio: float = 0.5
    quantize: bool = True

    def __post_init__(self) -> None:
        if self.grid < 1 or self.clip_grid < 1 or not 0 < self.clip_min_ratio <= 1:
            raise ValueError(f"AWQ needs grid >= 1, clip_grid >= 1 and 0 < clip_min_ratio <= 1, got {self}")


def awq_scales(absmean: Array, alpha: Array) -> Array:
    """s = mean|x|^alpha, normalized so that max(s) * min(s) = 1 (AutoAWQ's normalization)."""
    s = jnp.maximum(absmean.astype(jnp.float32), 1e-8) ** alpha
    s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
    return jnp.clip(s, 1e-4, 1e4)


@functools.partial(jax.jit, static_argnames=("spec",))
def _alpha_errors(w: Array, hessian: Array, absmean: Array, alphas: Array, spec: QSpec) -> Array:
    """Output error of scaled RTN for each alpha [R]."""
    k, n = w.shape
    rows, cb = spec.block_shape((k, n))
    w = w.astype(jnp.float32)

    def err(a):
        s = awq_scales(absmean, a)
        ws = w * s[:, None]
        sc, z, s2 = compute_scales(ws, spec, (rows, cb))
        d = w - _qdq(ws, spec, sc, z, s2) / s[:, None]
        return lw.hessian_error(w, w - d, hessian)

    return jax.lax.map(err, alphas)


def search_scales(
    kernels: Sequence[Array], hessians: Sequence[Array], absmean: Array, spec: QSpec | Sequence[QSpec], grid: int = 20
) -> tuple[Array, float]:
    """Best shared s over a group of layers fed by the same input; returns (s, alpha)."""
    specs = [parse_spec(x) for x in spec] if isinstance(spec, (list, tuple)) else [parse_spec(spec)] * len(kernels)
    alphas = jnp.linspace(0.0, 1.0, grid) if grid > 1 else jnp.zeros(1)
    total = sum(_alpha_errors(w, h, absmean, alphas, sp) for w, h, sp in zip(kernels, hessians, specs))
    best = float(alphas[int(jnp.argmin(total))])
    return awq_scales(absmean, jnp.float32(best)), best


def awq_search(
    params: Any,
    stats: Mapping[str, Any],
    rules: Sequence[Rule] | QSpec | str,
    config: AWQConfig | None = None,
    *,
    fold_map: fold_lib.FoldMap | None = None,
    layers: Collection[str] | None = None,
) -> dict[str, Array]:
    """The AWQ scale search alone: ``{kernel_path: s [K]}`` (shared within a fold group).

    Apply them with :func:`jquant.algorithms.fold.smooth`; transform statistics for a
    following method with :func:`jquant.algorithms.fold.smooth_stats`.
    """
    config = config or AWQConfig()
    selected = {l.path: l for l in lw.select(params, stats, rules, layers=layers, method="awq")}
    for p, l in selected.items():
        if l.spec.format.kind == "codec":
            raise ValueError(f"awq: {p}: GGUF codecs are not supported; use kquants")
    scales: dict[str, Array] = {}
    for _, members in fold_lib.fold_groups(list(selected), fold_map):
        ls = [selected[m] for m in members]
        hs = [l.stats.hessian_mean for l in ls]
        s, _ = search_scales([l.kernel for l in ls], hs, ls[0].stats.absmean, [l.spec for l in ls], config.grid)
        for m in members:
            scales[m] = s
    return scales


def awq(
    params: Any,
    stats: Mapping[str, Any],
    rules: Sequence[Rule] | QSpec | str,
    config: AWQConfig | None = None,
    *,
    fold_map: fold_lib.FoldMap | None = None,
    aux: fold_lib.Aux | None = None,
    layers: Collection[str] | None = None,
) -> tuple[Any, fold_lib.Aux]:
    """AWQ every kernel the rules select; returns (params, aux).

    ``fold_map`` ``{kernel_path: preceding op}`` (see :mod:`jquant.algorithms.fold`)
    decides where ``x / s`` goes; layers not in it get an explicit ``input_mul``. Run
    the result under :func:`jquant.nn.quantized` with the returned aux.
    """
    config = config or AWQConfig()
    scales = awq_search(params, stats, rules, config, fold_map=fold_map, layers=layers)
    moved = {p: s for p, s in scales.items() if not bool(jnp.all(s == 1.0))}  # alpha = 0: nothing to fold
    params, aux = fold_lib.smooth(params, moved, fold_map, aux)
    if not config.quantize:
        return params, aux
    selected = {l.path: l for l in lw.select(params, stats, rules, layers=set(scales), method="awq")}
    new = {}
    for p, l in selected.items():
        if config.clip_search and l.spec.scaling != "mx":
            s = scales[p]
            h = l.stats.hessian_mean / s[:, None] / s[None, :]  # Hessian of x / s
            sc, z, s2, _ = clip_search(
                l.kernel, h, l.spec, grid=config.clip_grid, min_ratio=config.clip_min_ratio, path=p
            )
            new[p] = lw.build_qarray(l.kernel, l.spec, sc, z, s2)
        else:
            new[p] = lw.quantize_fast(l.kernel, l.spec, path=p)
    return lw.replace(params, new), aux


def transform(policy: Policy, config: Any = None) -> Transform:
    """AWQ (activation-aware scaling + clipping search); ``x / s`` kept as ``input_mul``."""

    def fn(v: Variables, ctx: Context) -> Variables:
        params, aux = awq(v["params"], ctx.stats(v), policy.rules(ctx.roles), config, aux=flat_aux(v))
        return with_params(v, policy.cast(params, ctx.roles), aux)

    return Transform(f"awq[{policy.name}]", fn, True)
