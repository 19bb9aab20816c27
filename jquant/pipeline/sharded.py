"""The jitted sampler (``lax.scan`` with scale tables) sharded end to end over a device mesh.

:func:`sharded_model_fn` turns a :class:`~jquant.pipeline.runtime.QuantizedModel`'s
``(model_fn, step_data)`` into the same pair with the variables placed on the mesh
(:func:`jquant.sharding.shard_params` under a mode or rules; the ``"jquant"`` aux collection
replicated) and, per step, optionally

* the CFG branches split across a mesh axis (``cfg_axis``): the sampler evaluates both branches
  as one batch ``[uncond; cond]``; that batch is constrained to split over ``cfg_axis``, so with
  ``cfg_axis`` of size 2 each half of the mesh runs one branch;
* sequence-parallel attention (``sequence_axis``, ``sp_mode``: Ulysses or ring).

The scan, the scale tables (``step_data`` rows, replicated: they are small) and the update run
as one jitted program that XLA partitions; :func:`sample` is ``Denoiser.sample`` with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.tree_util import Partial

from jquant.pipeline.denoiser import Denoiser, Workload
from jquant.pipeline.runtime import QuantizedModel
from jquant.sharding import LeafPlan, sequence_parallel, shard_params
from jquant.sharding.axes import MeshRules


class _ShardedStep:
    """The model step under the CFG-split constraint and sequence-parallel attention; hashable
    by its parts so equal set-ups share one compiled sampler."""

    def __init__(self, inner: Any, mesh: Mesh, cfg_axis: str | None, sp: tuple[str, str] | None) -> None:
        self.inner, self.mesh, self.cfg_axis, self.sp = inner, mesh, cfg_axis, sp

    def _key(self) -> tuple:
        return (self.inner, self.mesh, self.cfg_axis, self.sp)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ShardedStep) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _split_batch(self, tree: Any, batch: int) -> Any:
        n = self.mesh.shape[self.cfg_axis]
        spec = NamedSharding(self.mesh, PartitionSpec(self.cfg_axis))

        def one(a: Any) -> Any:
            ok = getattr(a, "ndim", 0) >= 1 and a.shape[0] == batch and batch % n == 0
            return jax.lax.with_sharding_constraint(a, spec) if ok else a

        return jax.tree_util.tree_map(one, tree)

    def __call__(self, variables: Any, x: jax.Array, t: jax.Array, cond: Any, step_slice: Any, *extra: Any):
        if self.cfg_axis is not None:
            x, cond = self._split_batch((x, cond), x.shape[0])
        with contextlib.ExitStack() as stack:
            if self.sp is not None:
                axis, mode = self.sp
                stack.enter_context(sequence_parallel(self.mesh, axis, batch_axis=self.cfg_axis, mode=mode))
            return self.inner(variables, x, t, cond, step_slice, *extra)


def place_variables(
    variables: Mapping[str, Any], mesh: Mesh, rules: MeshRules | str, roles: Mapping[str, Sequence[str]] | None = None
) -> tuple[dict[str, Any], dict[str, LeafPlan]]:
    """Linen variables on ``mesh``: params under ``rules``, every other collection replicated."""
    out = dict(variables)
    out["params"], plan = shard_params(variables["params"], mesh, rules, roles)
    for name, tree in variables.items():
        if name != "params":
            out[name] = jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
    return out, plan


def sharded_model_fn(
    model: QuantizedModel,
    den: Denoiser,
    mesh: Mesh,
    *,
    rules: MeshRules | str = "replicated",
    roles: Mapping[str, Sequence[str]] | None = None,
    cfg_axis: str | None = None,
    sequence_axis: str | None = None,
    sp_mode: str = "ulysses",
) -> tuple[Partial, Any, dict[str, LeafPlan]]:
    """``(model_fn, step_data, plan)`` for ``den.sample``, sharded as the module docstring says."""
    for axis in (cfg_axis, sequence_axis):
        if axis is not None and axis not in mesh.shape:
            raise ValueError(f"sharded_model_fn: axis {axis!r} is not in the mesh {tuple(mesh.shape)}")
    fn, step_data = model.model_fn(den)
    variables, plan = place_variables(fn.args[0], mesh, rules, roles)
    sp = None if sequence_axis is None else (sequence_axis, sp_mode)
    step = _ShardedStep(fn.func, mesh, cfg_axis, sp)
    if step_data is not None:
        step_data = jax.device_put(step_data, NamedSharding(mesh, PartitionSpec()))
    return Partial(step, variables), step_data, plan


def sample(
    model: QuantizedModel, den: Denoiser, work: Workload, mesh: Mesh, *, return_trajectory: bool = False, **kwargs: Any
):
    """``model.sample(den, work)`` on ``mesh`` (keyword arguments as :func:`sharded_model_fn`)."""
    fn, step_data, _ = sharded_model_fn(model, den, mesh, **kwargs)
    replicated = NamedSharding(mesh, PartitionSpec())
    work = Workload(
        jax.device_put(work.x_T, replicated),
        jax.device_put(work.cond, replicated),
        None if work.uncond is None else jax.device_put(work.uncond, replicated),
        work.labels,
    )
    return den.sample(fn, work, step_data=step_data, return_trajectory=return_trajectory)
