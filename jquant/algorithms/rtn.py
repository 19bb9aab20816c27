"""Round-to-nearest (RTN), the baseline, with an optional Hessian-weighted clipping search.

Plain RTN is :func:`jquant.rules.quantize_params`: absmax (or min/max with zero points)
scales per block, nearest code. With ``clip_search`` the scale of every scale block is
shrunk by the ratio r in ``linspace(1, min_ratio, grid)`` that minimizes the block's
output error ``sum_cols dW_b^T H_bb dW_b`` under the calibration Hessian (H_bb the
block's diagonal block of H: exact for per-channel and per-tensor scales, for groups it
ignores the cross-group terms). Clipping trades a larger error on the few largest
weights for a finer grid on all the others.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jquant.algorithms import layerwise as lw
from jquant.algorithms.fold import with_params
from jquant.formats import QSpec, parse_spec
from jquant.policy import Policy
from jquant.qarray import QArray, compute_scales, decode, decode_scale, encode
from jquant.rules import Rule, flatten_with_paths, normalize_rules, resolve
from jquant.transform import Context, Transform, Variables

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class RTNConfig:
    """RTN options: ``clip_search`` over ``grid`` ratios in [min_ratio, 1] (needs stats)."""

    clip_search: bool = False
    grid: int = 20
    min_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.grid < 1 or not 0 < self.min_ratio <= 1:
            raise ValueError(f"need grid >= 1 and 0 < min_ratio <= 1, got grid={self.grid}, min_ratio={self.min_ratio}")


def _block_errors(d: Array, hessian: Array, rows: int, cb: int) -> Array:
    """Per-scale-block error [K/rows, N/cb] of dW [K, N] using H's diagonal blocks."""
    k, n = d.shape
    g = k // rows
    db = d.reshape(g, rows, n)
    hb = hessian.reshape(g, rows, g, rows)[jnp.arange(g), :, jnp.arange(g), :]  # [g, rows, rows]
    e = jnp.einsum("grn,grs,gsn->gn", db, hb, db, precision=_HIGHEST)
    return e.reshape(g, n // cb, cb).sum(-1)


def _scaled(scale: Array, ratio: Array) -> Array:
    return (scale.astype(jnp.float32) * ratio).astype(scale.dtype)


def _qdq(w: Array, spec: QSpec, s: Array, z: Array | None, s2: Array | None) -> Array:
    dec = decode_scale(QArray(None, s, z, s2, spec=spec))
    return decode(encode(w, dec, z, spec), dec, z, spec)


def _check_clippable(spec: QSpec, path: str) -> None:
    if spec.format.kind == "codec" or spec.scaling == "mx":
        raise ValueError(f"clip search: {path}: {spec} has no continuous scale to shrink (GGUF codec / MX exponents)")


@functools.partial(jax.jit, static_argnames=("spec", "ratios"))
def _search(w: Array, hessian: Array, spec: QSpec, ratios: tuple[float, ...]):
    k, n = w.shape
    rows, cb = spec.block_shape((k, n))
    w = w.astype(jnp.float32)
    s, z, s2 = compute_scales(w, spec, (rows, cb))

    def err(r):
        return _block_errors(w - _qdq(w, spec, _scaled(s, r), z, s2), hessian, rows, cb)

    errs = jax.lax.map(err, jnp.asarray(ratios, jnp.float32))  # [R, G, N/cb]
    best = jnp.asarray(ratios, jnp.float32)[jnp.argmin(errs, axis=0)]
    return _scaled(s, best), z, s2, best


def clip_search(
    w: Array, hessian: Array, spec: QSpec | str, *, grid: int = 20, min_ratio: float = 0.5, path: str = "layer"
) -> tuple[Array, Array | None, Array | None, Array]:
    """Best per-block clipped scales: (scale, zero, scale2, ratio [blocks]) in stored dtypes."""
    spec = parse_spec(spec)
    _check_clippable(spec, path)
    k, n = w.shape
    spec.block_shape((k, n), path)
    ratios = tuple(float(r) for r in np.linspace(1.0, min_ratio, grid))
    return _search(jnp.asarray(w), jnp.asarray(hessian, jnp.float32), spec, ratios)


def rtn_layer(
    w: Array, spec: QSpec | str, hessian: Array | None = None, config: RTNConfig | None = None, *, path: str = "layer"
) -> QArray:
    """RTN of one kernel; with ``config.clip_search`` the scales are clipped by the Hessian search."""
    config = config or RTNConfig()
    spec = parse_spec(spec)
    w = jnp.asarray(w)
    if not config.clip_search:
        return lw.quantize_fast(w, spec, path=path)
    if hessian is None:
        raise ValueError(f"rtn: {path}: clip_search needs the layer's Hessian (calibration statistics)")
    s, z, s2, _ = clip_search(w, hessian, spec, grid=config.grid, min_ratio=config.min_ratio, path=path)
    return lw.build_qarray(w, spec, s, z, s2)


def rtn(
    params: Any,
    stats: Mapping[str, Any] | None,
    rules: Sequence[Rule] | QSpec | str,
    config: RTNConfig | None = None,
    *,
    layers: Collection[str] | None = None,
) -> Any:
    """Round-to-nearest over a param tree; ``stats`` is only needed for ``clip_search``.

    Without clipping this quantizes exactly as :func:`jquant.rules.quantize_params` does
    (restricted to ``layers`` if given), for every format including the GGUF codecs.
    """
    config = config or RTNConfig()
    if not config.clip_search:
        rl = normalize_rules(rules)
        flat = flatten_with_paths(params)
        if layers is not None:
            unknown = sorted(set(layers) - {p for p, _ in flat})
            if unknown:
                raise KeyError(f"rtn: layers {unknown} are not param paths of the tree")
        todo = {p: resolve(p, leaf, rl) for p, leaf in flat if layers is None or p in layers}
        leaves = dict(flat)
        return lw.replace(params, {p: lw.quantize_fast(leaves[p], s, path=p) for p, s in todo.items() if s is not None})
    return lw.map_layers(
        params,
        stats,
        rules,
        lambda layer: rtn_layer(layer.kernel, layer.spec, lw.mean_hessian(layer), config, path=layer.path),
        layers=layers,
        method="rtn",
    )


def transform(policy: Policy) -> Transform:
    """Round-to-nearest per the policy (bf16 layers cast)."""

    def fn(v: Variables, ctx: Context) -> Variables:
        return with_params(v, policy.quantize(v["params"], ctx.roles))

    return Transform(f"rtn[{policy.name}]", fn)
