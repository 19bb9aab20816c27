"""Logical axes of a port's parameters, mesh rules, and the sharding of every leaf (QArrays too).

Every parameter dimension gets a *logical* name from its path (and layer role when given):

==========================  ===================  ==========================================
layer                       kernel axes (K, N)   bias axes
==========================  ===================  ==========================================
q/k/v projections           ("embed", "heads")   ("heads",)
attention output            ("heads", "embed")   ("embed",)
FFN up (``net_0/proj``)     ("embed", "mlp")     ("mlp",)
FFN down (``net_2``)        ("mlp", "embed")     ("embed",)
any other linear            ("in", "out")        ("out",)
norms, tables, the rest     replicated           replicated
==========================  ===================  ==========================================

*Rules* map logical names to mesh axes, in order, as flax's ``logical_axis_rules`` do: each
rule ``(name, mesh_axis)`` puts ``mesh_axis`` on the first still-unsharded dimension named
``name`` that can take it, and a mesh axis is used at most once per leaf. A dimension can take
a mesh axis of size n when it divides evenly and, for a QArray, when no quantization block is
cut: codes (packed or GGUF blocks) split along the same logical axis as their scales and zero
points, and a scale dimension with more than one entry (groups) must split into whole groups
(int4 group 128 over 8 shards needs 1024 rows). A dimension that cannot take its mesh axis stays
whole (the plan records why), so a rule never changes numerics, only placement.

Presets (:data:`MODES`): ``fsdp`` (every linear's weights split over ``data``, gathered by XLA
where used), ``tp`` (Megatron column/row: q/k/v and FFN-up split by output, attention-out and
FFN-down by input, over ``model``), ``fsdp_tp`` (both, on a 2-D mesh), ``replicated``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jquant.formats import FORMATS
from jquant.qarray import QArray
from jquant.rules import flatten_with_paths, leaf_nbytes, map_with_paths

#: ``(logical axis name, mesh axis name or None)`` pairs, in priority order.
MeshRules = Sequence[tuple[str, "str | None"]]
LogicalAxes = tuple["str | None", ...]

MODES: dict[str, tuple[tuple[str, str], ...]] = {
    "replicated": (),
    "fsdp": (("mlp", "data"), ("heads", "data"), ("out", "data"), ("embed", "data"), ("in", "data")),
    "tp": (("heads", "model"), ("mlp", "model"), ("out", "model")),
    "fsdp_tp": (
        ("heads", "model"),
        ("mlp", "model"),
        ("out", "model"),
        ("embed", "data"),
        ("in", "data"),
        ("out", "data"),
    ),
}

# Path fallbacks when no layer roles are given (the ports' diffusers names).
_PATH_AXES: tuple[tuple[str, tuple[str, str]], ...] = (
    (r"(^|/)(to_[qkv]|add_[qkv]_proj)$", ("embed", "heads")),
    (r"(^|/)(to_out_0|to_add_out)$", ("heads", "embed")),
    (r"(^|/)(net_0/proj|proj_mlp)$", ("embed", "mlp")),
    (r"(^|/)net_2$", ("mlp", "embed")),
)
_ROLE_AXES: tuple[tuple[str, tuple[str, str]], ...] = (
    ("attn.qkv", ("embed", "heads")),
    ("attn.out", ("heads", "embed")),
    ("ffn.up", ("embed", "mlp")),
    ("ffn.down", ("mlp", "embed")),
)


def kernel_axes(module_path: str, roles: Sequence[str] | None = None) -> tuple[str, str]:
    """Logical (K, N) names of the 2-D kernel of the linear layer at ``module_path``."""
    if roles:
        for role, axes in _ROLE_AXES:
            if role in roles:
                return axes
        return ("in", "out")
    for pattern, axes in _PATH_AXES:
        if re.search(pattern, module_path):
            return axes
    return ("in", "out")


def logical_axes(params: Any, roles: Mapping[str, Sequence[str]] | None = None) -> dict[str, LogicalAxes]:
    """``{leaf path: logical axes}`` for every leaf (QArrays are leaves; see the module table).

    ``roles`` is ``{kernel path: roles}`` as :func:`jquant.models.layer_roles` gives it; without
    it the ports' diffusers layer names decide.
    """
    flat = dict(flatten_with_paths(params))
    out: dict[str, LogicalAxes] = {}
    for path, leaf in flat.items():
        ndim = len(getattr(leaf, "shape", ()))
        module, _, name = path.rpartition("/")
        kernel = f"{module}/kernel" if module else "kernel"
        if name == "kernel" and ndim == 2:
            out[path] = kernel_axes(module, None if roles is None else roles.get(path, ()))
        elif name == "bias" and ndim == 1 and len(getattr(flat.get(kernel), "shape", ())) == 2:
            out[path] = (kernel_axes(module, None if roles is None else roles.get(kernel, ()))[1],)
        else:
            out[path] = (None,) * ndim
    return out


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """Where one leaf goes: its logical axes, the mesh axis of each logical dimension (None =
    whole), how many shards that makes, and why a named dimension stayed whole."""

    path: str
    axes: LogicalAxes
    mesh_axes: tuple["str | None", ...]
    shards: int
    nbytes: int
    device_nbytes: int
    kept_whole: tuple[str, ...] = ()

    @property
    def spec(self) -> PartitionSpec:
        return PartitionSpec(*self.mesh_axes)


def _codec_dim(leaf: QArray, dim: int) -> int:
    """qvalue dimension of logical dimension ``dim`` of a GGUF-block QArray ([..., nb, bytes])."""
    n = leaf.ndim
    contraction = leaf.axis % n
    if dim == contraction:
        return leaf.qvalue.ndim - 2
    return dim if dim < contraction else dim - 1


def _cut(leaf: Any, dim: int, n: int) -> str | None:
    """Why logical dimension ``dim`` of ``leaf`` cannot split into ``n`` equal shards, or None."""
    size = leaf.shape[dim]
    if size % n:
        return f"size {size} is not divisible by {n}"
    if not isinstance(leaf, QArray):
        return None
    if leaf.spec.fmt not in FORMATS:
        if dim == leaf.axis % leaf.ndim:
            nb = leaf.qvalue.shape[-2]
            return None if nb % n == 0 else f"{nb} {leaf.spec.fmt} blocks do not split into {n}"
        return None
    if leaf.qvalue.shape[dim] % n or (leaf.pad and dim == leaf.axis % leaf.ndim):
        return f"packed codes ({leaf.qvalue.shape[dim]}) do not split into {n}"
    groups = leaf.scale.shape[dim] if leaf.scale is not None and leaf.scale.ndim == leaf.ndim else 1
    if groups > 1 and groups % n:
        return f"{groups} scale groups would be cut by {n} shards"
    return None


def plan_leaf(path: str, leaf: Any, axes: LogicalAxes, rules: MeshRules, mesh: Mesh) -> LeafPlan:
    """Apply ``rules`` to one leaf (see the module docstring)."""
    mesh_axes: list[str | None] = [None] * len(axes)
    used: set[str] = set()
    whole: list[str] = []
    for name, mesh_axis in rules:
        if mesh_axis is not None and mesh_axis not in mesh.shape:
            raise ValueError(f"mesh rules: ({name!r}, {mesh_axis!r}) names an axis the mesh lacks {tuple(mesh.shape)}")
        if mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1:
            continue
        for dim, dim_name in enumerate(axes):
            if dim_name != name or mesh_axes[dim] is not None:
                continue
            why = _cut(leaf, dim, mesh.shape[mesh_axis])
            if why is None:
                mesh_axes[dim] = mesh_axis
                used.add(mesh_axis)
                break
            whole.append(f"{name}: {why}")
    shards = math.prod(mesh.shape[a] for a in mesh_axes if a is not None)
    return LeafPlan(
        path,
        tuple(axes),
        tuple(mesh_axes),
        shards,
        leaf_nbytes(leaf),
        _device_nbytes(leaf, mesh_axes, mesh),
        tuple(whole),
    )


def _device_nbytes(leaf: Any, mesh_axes: Sequence[str | None], mesh: Mesh) -> int:
    """Bytes one device holds of ``leaf`` split as ``mesh_axes`` (a QArray: each child as it splits)."""
    if not isinstance(leaf, QArray):
        return leaf_nbytes(leaf) // math.prod(mesh.shape[a] for a in mesh_axes if a is not None)
    total = 0
    for child in leaf.tree_flatten()[0]:
        if child is not None:
            spec = child_spec(leaf, child, mesh_axes)
            total += child.nbytes // math.prod(mesh.shape[a] for a in spec if a is not None)
    return total


def plan(
    params: Any, mesh: Mesh, rules: MeshRules | str, roles: Mapping[str, Sequence[str]] | None = None
) -> dict[str, LeafPlan]:
    """``{leaf path: LeafPlan}`` for a param tree under ``rules`` (a :data:`MODES` name or pairs)."""
    if isinstance(rules, str):
        if rules not in MODES:
            raise ValueError(f"sharding: mode {rules!r} is not one of {sorted(MODES)}")
        rules = MODES[rules]
    axes = logical_axes(params, roles)
    return {path: plan_leaf(path, leaf, axes[path], rules, mesh) for path, leaf in flatten_with_paths(params)}


def child_spec(leaf: QArray, child: jax.Array, mesh_axes: Sequence[str | None]) -> PartitionSpec:
    """Partition of one array of a QArray given its logical dimensions' mesh axes."""
    if leaf.spec.fmt not in FORMATS:  # GGUF blocks [..., nb, bytes]
        spec: list[str | None] = [None] * child.ndim
        for dim, a in enumerate(mesh_axes):
            if a is not None:
                spec[_codec_dim(leaf, dim)] = a
        return PartitionSpec(*spec)
    if child.ndim != leaf.ndim:  # per-tensor second-level scale
        return PartitionSpec()
    return PartitionSpec(*(a if child.shape[d] > 1 else None for d, a in enumerate(mesh_axes)))


def leaf_sharding(leaf: Any, leaf_plan: LeafPlan, mesh: Mesh) -> Any:
    """A NamedSharding for an array; for a QArray, a QArray whose children are NamedShardings."""
    if not isinstance(leaf, QArray):
        return NamedSharding(mesh, leaf_plan.spec)
    children, aux = leaf.tree_flatten()
    shardings = [None if c is None else NamedSharding(mesh, child_spec(leaf, c, leaf_plan.mesh_axes)) for c in children]
    return QArray.tree_unflatten(aux, shardings)


def shardings(params: Any, mesh: Mesh, leaf_plans: Mapping[str, LeafPlan]) -> Any:
    """The tree of shardings matching ``params`` (QArray leaves mirrored), for ``jax.device_put``
    or ``jax.jit(in_shardings=...)``."""
    return map_with_paths(lambda path, leaf: leaf_sharding(leaf, leaf_plans[path], mesh), params)


def shard_params(
    params: Any, mesh: Mesh, rules: MeshRules | str, roles: Mapping[str, Sequence[str]] | None = None
) -> tuple[Any, dict[str, LeafPlan]]:
    """Place ``params`` on ``mesh`` under ``rules``; returns (placed params, plan)."""
    leaf_plans = plan(params, mesh, rules, roles)
    return jax.device_put(params, shardings(params, mesh, leaf_plans)), leaf_plans


def expected_device_bytes(leaf_plans: Mapping[str, LeafPlan]) -> int:
    """Parameter bytes each device holds under a plan (every array's bytes over its shard count)."""
    return sum(p.device_nbytes for p in leaf_plans.values())


def device_bytes(params: Any) -> dict[str, int]:
    """Bytes of ``params`` each device actually holds (``addressable_shards``), by device."""
    out: dict[str, int] = {}
    for leaf in jax.tree_util.tree_leaves(params):
        for shard in leaf.addressable_shards:
            out[str(shard.device)] = (
                out.get(str(shard.device), 0) + int(np.prod(shard.data.shape)) * shard.data.itemsize
            )
    return out


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of ``shape`` (``{"data": 2, "model": 4}``) over ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(shape.values())
    if need != len(devices):
        raise ValueError(f"make_mesh: shape {dict(shape)} needs {need} devices, {len(devices)} given")
    return Mesh(np.asarray(devices, dtype=object).reshape(tuple(shape.values())), tuple(shape))
