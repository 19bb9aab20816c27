"""Per-input-channel smoothing, folded into the preceding op where exact (AWQ, SmoothQuant).

A smoothing scale s [K] rewrites a layer ``y = x @ W`` as ``y = (x / s) @ (diag(s) W)``:
the kernel's rows are multiplied by s, and ``x / s`` must come from somewhere. Where the
op that produces ``x`` is known and affine per channel, the division is folded into it,
so the float model is *unchanged* and costs nothing at run time; otherwise it is kept as
an explicit per-layer input multiplier ``input_mul = 1/s`` in the aux data
(:mod:`jquant.nn` applies it to x before the matmul).

The fold map ``{kernel_path: target}`` says, for each layer, which op produced its input
(the models helper provides these maps for the ported models). A target is:

* ``None`` (or the layer absent from the map): explicit ``input_mul``.
* a param path string: a 2-D kernel ``[in, out]`` means a preceding **linear** layer
  (its output columns, and its sibling ``bias`` if present, are divided by s: e.g.
  attention ``v`` feeding ``o``, FFN ``up`` feeding ``down`` only when nothing nonlinear sits
  between — an activation function between them makes folding inexact, so don't); a 1-D
  vector means a **norm's affine scale** (it and its sibling ``bias`` are divided).
* a :class:`Fold` for the general case: an output-column ``offset`` (a fused qkv or a
  chunked output), an explicit ``bias`` path, or ``kind="modulation"``: the layer's input
  is ``norm(x) * (1 + m_scale) + m_shift`` with ``m = c @ K_mod + b_mod`` (adaLN); the scale
  chunk becomes ``(1 + m_scale) / s - 1`` (kernel columns / s, bias ``(1 + b)/s - 1``) and the
  shift chunk ``m_shift / s``. Needs the modulation's bias.

Exactness conditions (the caller's responsibility): every consumer of a folded op's
output must be a layer listed with the *same* target (they then share one s: e.g. q, k, v
after one norm), and nothing may read that output besides them. Folding into an already
quantized (QArray) op is impossible; such layers fall back to ``input_mul`` with a warning.

Aux data is a flat ``{module_path: {"input_mul": ..., "input_scale": ...}}`` dict: give it
to :func:`jquant.nn.quantized` (``aux=``, NNX) or nest it with :func:`aux_collection`
into linen's ``"jquant"`` variable collection.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jquant.algorithms import layerwise as lw
from jquant.calib import LayerStats
from jquant.nn import AUX_COLLECTION, AUX_KEYS
from jquant.qarray import QArray
from jquant.rules import flatten_with_paths
from jquant.transform import Variables

Array = jax.Array
Aux = dict[str, dict[str, Any]]
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Fold:
    """The op producing a layer's input (see module docstring).

    Attributes:
      path: param path of the producing weight (a kernel [in, out] or a 1-D vector).
      kind: "linear", "affine" or "modulation"; None infers linear/affine from the rank.
      offset: first output column feeding the layer (for modulation: the scale chunk's).
      shift_offset: modulation only: first output column of the shift chunk.
      bias: bias param path; None means the sibling '.../bias' when present.
    """

    path: str
    kind: Literal["linear", "affine", "modulation"] | None = None
    offset: int = 0
    shift_offset: int | None = None
    bias: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in (None, "linear", "affine", "modulation"):
            raise ValueError(f"Fold.kind must be linear, affine or modulation, got {self.kind!r}")
        if self.kind == "modulation" and self.shift_offset is None:
            raise ValueError(f"Fold({self.path!r}): modulation needs shift_offset (and offset for the scale chunk)")
        if self.offset < 0 or (self.shift_offset is not None and self.shift_offset < 0):
            raise ValueError(f"Fold({self.path!r}): offsets must be >= 0")


FoldMap = Mapping[str, "str | Fold | None"]


def _as_fold(target: str | Fold | None) -> Fold | None:
    if target is None or isinstance(target, Fold):
        return target
    if isinstance(target, str):
        return Fold(target)
    raise TypeError(f"a fold target must be a param path, a Fold or None, got {type(target).__name__}")


def fold_groups(paths: list[str], fold_map: FoldMap | None) -> list[tuple[Fold | None, list[str]]]:
    """Layers grouped by fold target (layers with no target each form their own group)."""
    groups: dict[Any, tuple[Fold | None, list[str]]] = {}
    for p in paths:
        f = _as_fold((fold_map or {}).get(p))
        key = ("explicit", p) if f is None else f
        groups.setdefault(key, (f, []))[1].append(p)
    return list(groups.values())


def _sibling_bias(path: str) -> str:
    head, _, _ = path.rpartition("/")
    return f"{head}/bias" if head else "bias"


def _set_slice(vec: Array, off: int, fn, axis: int, what: str, k: int) -> Array:
    size = vec.shape[axis]
    if off + k > size:
        raise ValueError(f"fold: {what}: columns [{off}, {off + k}) exceed its size {size} along axis {axis}")
    idx = [slice(None)] * vec.ndim
    idx[axis] = slice(off, off + k)
    idx = tuple(idx)
    return vec.at[idx].set(fn(vec[idx].astype(jnp.float32)).astype(vec.dtype))


def _fold_into(flat: dict[str, Any], fold: Fold, s: Array, new: dict[str, Any]) -> bool:
    """Divide the target's outputs by s in ``new`` (copy-on-write over ``flat``); False if impossible."""
    get = lambda p: new.get(p, flat.get(p))  # noqa: E731
    if fold.path not in flat:
        raise KeyError(f"fold target {fold.path!r} is not a param path of the tree")
    target = get(fold.path)
    bias_path = fold.bias or _sibling_bias(fold.path)
    bias = get(bias_path)
    if isinstance(target, QArray) or isinstance(bias, QArray):
        return False
    kind = fold.kind or {2: "linear", 1: "affine"}.get(target.ndim)
    if kind is None:
        raise ValueError(
            f"fold target {fold.path!r} has rank {target.ndim}; expected a 2-D kernel or a 1-D affine vector"
        )
    if fold.bias is not None and bias is None:
        raise KeyError(f"fold bias {fold.bias!r} is not a param path of the tree")
    k = s.shape[0]
    axis = target.ndim - 1
    div = lambda v: v / s  # noqa: E731
    if kind in ("linear", "affine"):
        new[fold.path] = _set_slice(target, fold.offset, div, axis, fold.path, k)
        if bias is not None:
            new[bias_path] = _set_slice(bias, fold.offset, div, 0, bias_path, k)
        return True
    if bias is None:
        raise ValueError(f"fold: modulation {fold.path!r} has no bias; (1 + scale)/s - 1 cannot be folded exactly")
    t = _set_slice(target, fold.offset, div, axis, fold.path, k)
    new[fold.path] = _set_slice(t, fold.shift_offset, div, axis, fold.path, k)
    b = _set_slice(bias, fold.offset, lambda v: (1.0 + v) / s - 1.0, 0, bias_path, k)
    new[bias_path] = _set_slice(b, fold.shift_offset, div, 0, bias_path, k)
    return True


def smooth(
    params: Any, scales: Mapping[str, Array], fold_map: FoldMap | None = None, aux: Aux | None = None
) -> tuple[Any, Aux]:
    """Apply smoothing scales ``{kernel_path: s [K]}``: kernel rows * s, inputs / s.

    Returns the new params and aux. Layers sharing a fold target must have equal scales.
    The float model computes the same function afterwards (exactly, up to rounding), when
    run under :mod:`jquant.nn` (which applies ``input_mul``).
    """
    flat = dict(flatten_with_paths(params))
    aux = {k: dict(v) for k, v in (aux or {}).items()}
    new: dict[str, Any] = {}
    for p, s in scales.items():
        if p not in flat:
            raise KeyError(f"smooth: {p!r} is not a param path of the tree")
        w = flat[p]
        if isinstance(w, QArray) or getattr(w, "ndim", 0) != 2:
            raise ValueError(f"smooth: {p!r} must be a float 2-D kernel (smooth before quantizing)")
        s = jnp.asarray(s, jnp.float32)
        if s.shape != (w.shape[0],):
            raise ValueError(f"smooth: scale for {p!r} has shape {s.shape}, expected ({w.shape[0]},)")
        if not bool(jnp.all(jnp.isfinite(s) & (s > 0))):
            raise ValueError(f"smooth: scale for {p!r} must be finite and positive")
    for fold, members in fold_groups(list(scales), fold_map):
        s = jnp.asarray(scales[members[0]], jnp.float32)
        for m in members[1:]:
            if not np.allclose(np.asarray(scales[m]), np.asarray(s), rtol=1e-6):
                raise ValueError(f"smooth: {members} share the fold target {fold.path!r} but have different scales")
        for m in members:
            w = new.get(m, flat[m])
            new[m] = (w.astype(jnp.float32) * s[:, None]).astype(w.dtype)
        folded = fold is not None and _fold_into(flat, fold, s, new)
        if fold is not None and not folded:
            msg = f"smooth: cannot fold into quantized {fold.path!r}; using input_mul for {members}"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning(msg)
        if not folded:
            for m in members:
                entry = aux.setdefault(lw.module_path(m), {})
                prev = entry.get("input_mul")
                inv = 1.0 / s
                entry["input_mul"] = inv if prev is None else jnp.asarray(prev, jnp.float32) * inv
    return lw.replace(params, new), aux


def smooth_stats(stats: Any, s: Array) -> Any:
    """Statistics of x / s from those of x (the histogram is dropped: its bins no longer align;
    per-channel percentiles of x / s are ``percentile(x) / s``)."""
    s = jnp.asarray(s, jnp.float32)
    return LayerStats(
        count=stats.count,
        sum=stats.sum / s,
        abssum=stats.abssum / s,
        absmax=stats.absmax / s,
        hessian=stats.hessian / s[:, None] / s[None, :],
        hist=jnp.zeros((s.shape[0], 0), jnp.int32),
        log2_lo=stats.log2_lo,
        bins_per_octave=stats.bins_per_octave,
    )


def aux_collection(aux: Aux) -> dict:
    """Flat ``{module_path: {name: value}}`` -> nested dict for linen's ``"jquant"`` collection."""
    out: dict = {}
    for mpath, entries in aux.items():
        node = out
        for part in mpath.split("/"):
            node = node.setdefault(part, {})
        node.update(entries)
    return out


def aux_from_collection(coll: Mapping) -> Aux:
    """Inverse of :func:`aux_collection`."""
    out: Aux = {}

    def walk(node: Mapping, prefix: str) -> None:
        entries = {k: v for k, v in node.items() if k in AUX_KEYS and not isinstance(v, Mapping)}
        if entries:
            out[prefix] = entries
        for k, v in node.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}/{k}" if prefix else k)

    walk(coll, "")
    return out


def flat_aux(v: Variables) -> Aux:
    """The ``"jquant"`` aux collection of linen variables as flat ``{module_path: {name: value}}``."""
    return aux_from_collection(v.get(AUX_COLLECTION, {}))


def with_params(v: Variables, params: Any, aux: Aux | None = None) -> Variables:
    """``v`` with new params (and, when given, a new aux collection built from flat ``aux``)."""
    out = {**v, "params": params}
    if aux is not None:
        out[AUX_COLLECTION] = aux_collection(aux)
    return out
