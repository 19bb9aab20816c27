"""Reading and rewriting the linear layers of a linen variables tree, with their aux data.

The algorithms of this package (rotations, low-rank splits, codebooks) are pure functions
``(variables, stats, config) -> variables`` over linen variables
``{"params": ..., "jquant": ...}``. A *layer* is addressed by its module path, the string
:func:`jquant.nn.observe` reports (``'blocks_0/attn/to_q'``): its kernel is
``params[...]['kernel']`` and its aux entries (``input_mul``, ``hadamard``,
``lowrank_a``/``lowrank_b``, ``input_scale``) live at the same path in the ``"jquant"``
collection, which is what :mod:`jquant.nn` reads at run time.

Statistics (``stats``) are :func:`jquant.calib.calibrate`'s ``{kernel path: LayerStats}``
(a plain mapping keyed by kernel or module path with the same fields also works) of each
layer's *effective* input, the ``x`` an observer sees after any ``input_mul`` and
``hadamard`` already in the tree: ``hessian`` (``X^T X`` summed over tokens, [K, K]),
``count`` (tokens) and ``absmax`` ([K]). After a method adds aux entries, calibrate the new
tree again before a method that reads statistics of the rotated/smoothed input.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from jquant import calib
from jquant.coded import CodedArray, decode_tree
from jquant.formats import QSpec
from jquant.nn import AUX_COLLECTION, AUX_KEYS, apply, observe
from jquant.qarray import QArray
from jquant.rules import Rule, normalize_rules, resolve
from jquant.transform import Variables

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


def _flat(tree: Any) -> dict[str, Any]:
    return traverse_util.flatten_dict(dict(tree or {}), sep="/")


def _check_variables(variables: Variables, where: str) -> None:
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(
            f"{where}: expected linen variables {{'params': ..., 'jquant': ...}}, got {type(variables).__name__}"
        )


def linear_paths(variables: Variables) -> list[str]:
    """Module paths of every layer with a 'kernel' param (Dense-like layers), in tree order."""
    _check_variables(variables, "linear_paths")
    return [p[: -len("/kernel")] for p in _flat(variables["params"]) if p.endswith("/kernel") or p == "kernel"]


def get_kernel(variables: Variables, path: str) -> Any:
    flat = _flat(variables["params"])
    key = f"{path}/kernel" if path else "kernel"
    if key not in flat:
        raise KeyError(f"no kernel at module path {path!r} (param {key!r} missing)")
    return flat[key]


def is_quantized(leaf: Any) -> bool:
    """A QArray or a coded (codebook, low-rank) kernel."""
    return isinstance(leaf, (QArray, CodedArray))


def float_kernel(variables: Variables, path: str, what: str) -> Array:
    """The 2-D float kernel of one layer; a clear error naming ``what`` for a quantized or
    non-2-D one (rotations, smoothing and low-rank splits rewrite float weights only)."""
    w = get_kernel(variables, path)
    if is_quantized(w):
        raise ValueError(f"{path}: {what} must run before quantization (kernel is a {type(w).__name__})")
    if w.ndim != 2:
        raise ValueError(f"{path}: {what} handles 2-D (K, N) kernels, got shape {w.shape}")
    return w


def float_paths(variables: Variables, pattern: str, method: str) -> list[str]:
    """Module paths matching ``pattern`` whose kernel is still float; an error if none."""
    paths = [p for p in match_paths(variables, pattern) if not is_quantized(get_kernel(variables, p))]
    if not paths:
        raise ValueError(f"{method}: no float kernel matches pattern {pattern!r}")
    return paths


def get_bias(variables: Variables, path: str) -> Array | None:
    return _flat(variables["params"]).get(f"{path}/bias" if path else "bias")


def get_aux(variables: Variables, path: str) -> dict[str, Any]:
    """The aux entries of one layer (empty dict if none)."""
    prefix = f"{path}/" if path else ""
    flat = _flat(variables.get(AUX_COLLECTION))
    return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix) and k[len(prefix) :] in AUX_KEYS}


def update_layer(
    variables: Variables,
    path: str,
    *,
    kernel: Any = None,
    bias: Any = None,
    aux: Mapping[str, Any] | None = None,
    drop_aux: Iterable[str] = (),
) -> dict[str, Any]:
    """A new variables dict with one layer's kernel / bias / aux entries replaced."""
    _check_variables(variables, "update_layer")
    out = dict(variables)
    params = _flat(variables["params"])
    prefix = f"{path}/" if path else ""
    if kernel is not None:
        if f"{prefix}kernel" not in params:
            raise KeyError(f"no kernel at module path {path!r}")
        params[f"{prefix}kernel"] = kernel
    if bias is not None:
        params[f"{prefix}bias"] = bias
    out["params"] = traverse_util.unflatten_dict(params, sep="/")
    if aux or drop_aux:
        flat_aux = _flat(variables.get(AUX_COLLECTION))
        for k in drop_aux:
            flat_aux.pop(f"{prefix}{k}", None)
        for k, v in (aux or {}).items():
            if k not in AUX_KEYS:
                raise ValueError(f"{path}: unknown aux entry {k!r}; known: {AUX_KEYS}")
            flat_aux[f"{prefix}{k}"] = v
        out[AUX_COLLECTION] = traverse_util.unflatten_dict(flat_aux, sep="/")
    return out


def select_layers(
    variables: Variables, rules: Sequence[Rule] | QSpec | str, method: str = "select_layers"
) -> list[tuple[str, QSpec]]:
    """(module path, spec) for every float 2-D kernel a rule assigns a spec to.

    ``rules`` follows :func:`jquant.rules.quantize_params`: one spec for every eligible
    kernel, or an ordered ``(regex, spec_or_None)`` list matched against the kernel's param
    path (``'.../kernel'``). Raises if nothing is selected (a method that silently does
    nothing hides a wrong rule or an already quantized tree).
    """
    rule_list = normalize_rules(rules)
    out = []
    for path in linear_paths(variables):
        kernel = get_kernel(variables, path)
        if isinstance(kernel, QArray) or not hasattr(kernel, "ndim") or kernel.ndim != 2:
            continue
        spec = resolve(f"{path}/kernel", kernel, rule_list)
        if spec is not None:
            out.append((path, spec))
    if not out:
        raise ValueError(f"{method}: the rules {rules!r} select no float 2-D kernel among {linear_paths(variables)}")
    return out


def match_paths(variables: Variables, pattern: str) -> list[str]:
    """Linear module paths that ``re.search``-match ``pattern``."""
    rx = re.compile(pattern)
    return [p for p in linear_paths(variables) if rx.search(p)]


# --- statistics ------------------------------------------------------------------------------
def layer_stat(stats: Any, path: str, name: str, *, required: bool = True) -> Any:
    """``stats[path][name]`` (mapping or attribute access); a clear error if missing."""
    entry = None
    if stats is not None:
        for key in (f"{path}/kernel", path):
            entry = stats.get(key) if isinstance(stats, Mapping) else getattr(stats, key, None)
            if entry is not None:
                break
    value = None
    if entry is not None:
        value = entry.get(name) if isinstance(entry, Mapping) else getattr(entry, name, None)
    if value is None and required:
        raise KeyError(f"{path}: statistics entry {name!r} missing (stats must map module path -> {{{name!r}: ...}})")
    return value


def hessian(stats: Any, path: str, *, damp: float = 0.0) -> Array:
    """Mean ``X^T X / count`` of a layer (fp32), plus ``damp * mean(diag) * I``."""
    h = jnp.asarray(layer_stat(stats, path, "hessian"), jnp.float32)
    count = layer_stat(stats, path, "count", required=False)
    if count is not None:
        h = h / jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"{path}: hessian must be square [K, K], got shape {h.shape}")
    if damp:
        h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
    return h


@functools.lru_cache(maxsize=16)
def _calib_step(model: Any):
    apply_fn = lambda v, b: model.apply(v, *b)  # noqa: E731 - whole variables: aux included
    config = calib.CalibConfig(histogram=False)
    return apply_fn, config, calib.make_step(apply_fn, config)


def layer_statistics(model: Any, variables: Variables, *inputs: Any, batches: Sequence[Any] | None = None) -> dict:
    """:mod:`jquant.calib` statistics of a linen ``model`` with ``variables`` (aux included)
    on one input tuple (or a list of input tuples ``batches``): ``{kernel path: LayerStats}``.

    The jitted calibration step is cached per (hashable) module, so trees of the same
    structure (e.g. before and after a smoothing) reuse one compilation.
    """
    apply_fn, config, step = _calib_step(model)
    batches = list(batches) if batches is not None else [inputs]
    if not batches:
        raise ValueError("layer_statistics: no calibration batches")
    variables = dict(variables)
    stats = calib.init(apply_fn, variables, batches[0], config)
    for b in batches:
        stats = step(stats, variables, b)
    calib.validate(stats)
    return stats


def capture_inputs(model: Any, variables: Variables, *inputs: Any) -> dict[str, Array]:
    """Eager run of ``model`` recording each linear layer's effective input, flattened to
    [T, K], keyed by module path (for losses that need samples, e.g. SpinQuant's)."""
    seen: dict[str, list[Array]] = {}
    with observe(lambda path, x: seen.setdefault(path, []).append(jnp.reshape(x, (-1, x.shape[-1])))):
        model.apply(variables, *inputs)
    return {p: jnp.concatenate(v, 0).astype(jnp.float32) for p, v in seen.items()}


def relative_error(y: Array, y_ref: Array) -> float:
    y, y_ref = jnp.asarray(y, jnp.float32), jnp.asarray(y_ref, jnp.float32)
    return float(jnp.linalg.norm(y - y_ref) / jnp.maximum(jnp.linalg.norm(y_ref), 1e-30))


@functools.lru_cache(maxsize=32)
def jitted_apply(model: Any):
    """``run(variables, *inputs, act=None, **kw)``: :func:`jquant.nn.apply` under ``jax.jit``
    (``act`` static), with CodedArray kernels decoded first. One compile per tree structure;
    cached per (hashable) linen module."""

    @functools.partial(jax.jit, static_argnames=("act",))
    def run(variables: Variables, *inputs: Any, act: str | None = None, **kw: Any) -> Any:
        return apply(model, decode_tree(variables), *inputs, act=act, **kw)

    return run
