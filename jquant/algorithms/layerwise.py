"""Shared plumbing of the layer-wise methods (RTN clipping, GPTQ, AWQ, SmoothQuant, SpQR).

A layer-wise method walks the param tree, picks the kernels a rule list assigns a spec
to (the same rules as :func:`jquant.rules.quantize_params`), looks up each kernel's
calibration statistics by its param path (``module/path/kernel``, the key
:mod:`jquant.calib` uses) and replaces it. This module holds the selection, the
Hessian-weighted error every method minimizes, building a QArray from codes/scales a
method chose, and the bit accounting used in reports.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import QSpec, parse_spec
from jquant.qarray import QArray, decode_scale, encode, pack, quantize
from jquant.rules import Rule, flatten_with_paths, map_with_paths, normalize_rules, resolve

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Layer:
    """One selected layer: kernel param path, float kernel [K, N], its spec and stats."""

    path: str
    kernel: Array
    spec: QSpec
    stats: Any

    @property
    def module_path(self) -> str:
        return module_path(self.path)


def module_path(kernel_path: str) -> str:
    """'blocks_0/attn/to_q/kernel' -> 'blocks_0/attn/to_q' (the key of aux data)."""
    return kernel_path[: -len("/kernel")] if kernel_path.endswith("/kernel") else kernel_path


def select(
    params: Any,
    stats: Mapping[str, Any] | None,
    rules: Sequence[Rule] | QSpec | str,
    *,
    layers: Collection[str] | None = None,
    method: str,
    need_stats: bool = True,
    need_hessian: bool = True,
) -> list[Layer]:
    """Layers of ``params`` that ``rules`` quantize (restricted to ``layers`` if given).

    Raises a clear error (naming the param path) for a missing/empty statistic, a kernel
    that is not 2-D (in, out), a spec whose contraction axis is not 0, or a Hessian whose
    size does not match the kernel's input dimension.
    """
    rules = normalize_rules(rules)
    flat = flatten_with_paths(params)
    if layers is not None:
        known = {p for p, _ in flat}
        unknown = sorted(set(layers) - known)
        if unknown:
            raise KeyError(f"{method}: layers {unknown} are not param paths of the tree")
        layers = set(layers)
    out: list[Layer] = []
    missing: list[str] = []
    for path, leaf in flat:
        if layers is not None and path not in layers:
            continue
        spec = resolve(path, leaf, rules)
        if spec is None:
            continue
        if leaf.ndim != 2:
            raise ValueError(
                f"{method}: {path!r} has shape {tuple(leaf.shape)}; only 2-D (in, out) kernels are supported"
            )
        if spec.contraction_axis(2, path) != 0:
            raise ValueError(
                f"{method}: {path!r}: spec {spec} contracts axis {spec.axis}; Flax kernels contract axis 0"
            )
        if spec.dynamic:
            raise ValueError(f"{method}: {path!r}: {spec} is a per-token (activation) spec, not a weight spec")
        st = None
        if need_stats:
            if stats is None or path not in stats:
                missing.append(path)
                continue
            st = stats[path]
            if float(st.count) <= 0:
                raise ValueError(f"{method}: layer {path!r} saw zero tokens during calibration")
            if need_hessian and tuple(st.hessian.shape) != (leaf.shape[0], leaf.shape[0]):
                raise ValueError(
                    f"{method}: {path!r}: Hessian shape {tuple(st.hessian.shape)} does not match the kernel's "
                    f"input dimension {leaf.shape[0]} (calibrate with CalibConfig(hessian=True))"
                )
        out.append(Layer(path, leaf, spec, st))
    if missing:
        hint = (
            " (pass variables['params'], not the whole variables dict)"
            if any(p.startswith("params/") for p in missing)
            else ""
        )
        raise KeyError(f"{method}: no calibration statistics for {missing}{hint}")
    return out


def replace(params: Any, new: Mapping[str, Any]) -> Any:
    """A copy of ``params`` with the leaves at the given paths replaced."""
    if not new:
        return params
    seen: set[str] = set()

    def one(path: str, leaf: Any) -> Any:
        if path in new:
            seen.add(path)
            return new[path]
        return leaf

    out = map_with_paths(one, params)
    if seen != set(new):
        raise KeyError(f"paths not in the tree: {sorted(set(new) - seen)}")
    return out


def map_layers(
    params: Any,
    stats: Mapping[str, Any] | None,
    rules: Sequence[Rule] | QSpec | str,
    layer_fn: Callable[[Layer], Any],
    *,
    layers: Collection[str] | None = None,
    method: str,
    need_stats: bool = True,
    need_hessian: bool = True,
) -> Any:
    """The per-layer lift: :func:`select` the layers, ``layer_fn(layer) -> new leaf`` each,
    :func:`replace` them, so a method only writes its per-layer math."""
    selected = select(
        params, stats, rules, layers=layers, method=method, need_stats=need_stats, need_hessian=need_hessian
    )
    return replace(params, {layer.path: layer_fn(layer) for layer in selected})


def mean_hessian(layer: Layer) -> Array:
    """The layer's calibration Hessian averaged over the tokens it saw."""
    return layer.stats.hessian / jnp.maximum(layer.stats.count, 1.0)


# --- errors ------------------------------------------------------------------------------------
def hessian_error(w: Array, w_hat: Array, hessian: Array) -> Array:
    """tr(dW^T H dW) for kernels [K, N]: ||X (W - W_hat)||_F^2 when H = X^T X."""
    d = jnp.asarray(w, jnp.float32) - jnp.asarray(w_hat, jnp.float32)
    return jnp.sum(d * jnp.matmul(hessian, d, precision=_HIGHEST))


def relative_error(w: Array, w_hat: Array, hessian: Array) -> Array:
    """Output error relative to the output energy: tr(dW^T H dW) / tr(W^T H W)."""
    w = jnp.asarray(w, jnp.float32)
    return hessian_error(w, w_hat, hessian) / jnp.maximum(hessian_error(w, jnp.zeros_like(w), hessian), 1e-30)


def column_errors(d: Array, hessian: Array) -> Array:
    """Per-output-column error diag(dW^T H dW) [N] for dW [K, N]."""
    return jnp.sum(d * jnp.matmul(hessian, d, precision=_HIGHEST), axis=0)


# --- building QArrays ------------------------------------------------------------------------
def build_qarray(
    w: Array, spec: QSpec, scale: Array, zero: Array | None, scale2: Array | None = None, codes: Array | None = None
) -> QArray:
    """A QArray with the given (stored-dtype) scales, laid out exactly as ``quantize`` does.

    ``codes`` (unpacked, kernel layout) are encoded from ``w`` with the given scales when
    not supplied. Jitted (one compilation per shape and spec).
    """
    return _build_qarray(w, scale, zero, scale2, codes, spec=spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def _build_qarray(w, scale, zero, scale2, codes, *, spec: QSpec) -> QArray:
    proto = QArray(None, scale, zero, scale2, spec=spec, dtype=w.dtype)
    if codes is None:
        codes = encode(w, decode_scale(proto), zero, spec)
    pad = 0
    if spec.packed:
        codes, pad = pack(codes, spec.format.bits, spec.contraction_axis(w.ndim))
    return QArray(codes, scale, zero, scale2, spec=spec, dtype=w.dtype, pad=pad)


@functools.partial(jax.jit, static_argnames=("spec",))
def _quantize_jit(w: Array, spec: QSpec) -> QArray:
    return quantize(w, spec)


def quantize_fast(w: Array, spec: QSpec | str, *, path: str = "") -> QArray:
    """``jquant.qarray.quantize`` compiled once per shape and spec (eager quantize compiles
    every small op separately, which dominates on small layers). Same checks and errors."""
    spec = parse_spec(spec)
    w = jnp.asarray(w)
    if spec.format.kind == "codec" or not jnp.issubdtype(w.dtype, jnp.floating) or w.ndim == 0:
        return quantize(w, spec, path=path)
    spec.block_shape(tuple(w.shape), path)
    if not np.all(np.isfinite(np.asarray(w, np.float32))):
        return quantize(w, spec, path=path)  # raises the NaN/Inf error naming the path
    return _quantize_jit(w, spec)


def logical_bits(spec: QSpec) -> int:
    """Bits a code carries (int3 -> 3, though stored in a 4-bit container)."""
    m = re.search(r"(\d+)$", spec.fmt)
    if spec.format.kind == "int" and m:
        return int(m.group(1))
    return spec.format.bits


def nominal_bits(q: QArray) -> float:
    """Total bits of a QArray counting codes and zero points at their logical width
    (int3 = 3 bits) and scales at their stored dtype: the usual paper accounting."""
    b = logical_bits(q.spec)
    total = float(np.prod(q.shape)) * b
    if q.scale is not None:
        total += q.scale.size * jnp.dtype(q.scale.dtype).itemsize * 8
    if q.zero_point is not None:
        total += q.zero_point.size * b
    if q.scale2 is not None:
        total += q.scale2.size * 32
    return total


def nominal_bits_per_weight(q: Any) -> float:
    """Bits per weight of a QArray (or any leaf with ``nominal_bits``), paper accounting."""
    if isinstance(q, QArray):
        return nominal_bits(q) / max(np.prod(q.shape), 1)
    if hasattr(q, "nominal_bits"):
        return q.nominal_bits() / max(np.prod(q.shape), 1)
    raise TypeError(f"no bit accounting for {type(q).__name__}")
