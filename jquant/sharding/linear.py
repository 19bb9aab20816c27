"""Tensor-parallel linears with the quantized GEMM per shard (``shard_map``).

Under a ``tp``/``fsdp_tp`` placement XLA's partitioner splits the XLA paths of a quantized
linear by itself, but a Pallas kernel is a custom call it cannot split (it gathers the
operands). Inside ``with tensor_parallel(mesh, plan):`` every linen ``Dense`` whose kernel the
plan splits over ``axis`` runs under ``shard_map`` instead, each device calling the layer on its
own shard, so ``jquant.nn`` routes *each shard* through ``jquant.dispatch`` (Pallas kernel or
XLA):

* column-parallel (kernel split by output, N): the input is whole on every device, each
  computes its slice of the output;
* row-parallel (split by input, K): each device contracts its slice of the input, then one
  ``psum`` adds the partial outputs; the bias is added once, after it.

Weight-only and float layers give the unsharded result (the row-parallel sum up to float
order). A row-parallel layer with dynamically quantized activations (W8A8 per token) computes
its activation scales *per shard* (over the device's K slice): the format allows it, it needs no
extra communication, and each shard's scale is at most the whole row's, so the rounding is at
least as fine; the numerics are not the unsharded ones. Layers with ``"jquant"`` aux entries
(static scales, smoothing, low-rank branches, online Hadamard) are left to XLA's partitioner.

Enter the context *outside* ``jquant.nn.quantized`` (flax runs the outermost interceptor
first), around the code that traces the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Iterator, Mapping

import flax.linen as nn
import jax
from jax.sharding import Mesh, PartitionSpec

from jquant.nn import AUX_COLLECTION, AUX_KEYS
from jquant.producers import Produced
from jquant.qarray import QArray
from jquant.sharding.axes import LeafPlan, child_spec

_LOCAL = threading.local()


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """Mesh, plan (``jquant.sharding.plan``), the tensor-parallel axis and an optional batch axis."""

    mesh: Mesh
    plan: Mapping[str, LeafPlan]
    axis: str = "model"
    batch_axis: str | None = None

    def __post_init__(self) -> None:
        for a in (self.axis, self.batch_axis):
            if a is not None and a not in self.mesh.shape:
                raise ValueError(f"tensor_parallel: axis {a!r} is not in the mesh {tuple(self.mesh.shape)}")


@contextlib.contextmanager
def tensor_parallel(
    mesh: Mesh, plan: Mapping[str, LeafPlan], axis: str = "model", *, batch_axis: str | None = None
) -> Iterator[TensorParallel]:
    """Run the linen ``Dense`` layers ``plan`` splits over ``axis`` per shard (module docstring)."""
    tp = TensorParallel(mesh, plan, axis, batch_axis)
    with nn.intercept_methods(functools.partial(_interceptor, tp)):
        yield tp


def _kernel_specs(kernel, leaf_plan: LeafPlan, axis: str):
    axes = tuple(a if a == axis else None for a in leaf_plan.mesh_axes)
    if not isinstance(kernel, QArray):
        return PartitionSpec(*axes)
    children, aux = kernel.tree_flatten()
    return QArray.tree_unflatten(aux, [None if c is None else child_spec(kernel, c, axes) for c in children])


def _interceptor(tp: TensorParallel, next_fun, args, kwargs, context):
    module = context.module
    if (
        getattr(_LOCAL, "depth", 0)
        or context.method_name != "__call__"
        or type(module) is not nn.Dense
        or module.is_initializing()
        or not module.has_variable("params", "kernel")
        or any(module.has_variable(AUX_COLLECTION, k) for k in AUX_KEYS)
    ):
        return next_fun(*args, **kwargs)
    leaf_plan = tp.plan.get("/".join(module.scope.path) + "/kernel")
    if leaf_plan is None or tp.axis not in leaf_plan.mesh_axes:
        return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    if isinstance(x, Produced):  # a fused producer's output: the shards take its float value
        x = x.value
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.has_variable("params", "bias") else None
    row = leaf_plan.mesh_axes.index(tp.axis) == 0
    n = tp.mesh.shape[tp.axis]
    bax = tp.batch_axis if tp.batch_axis is not None and x.shape[0] % tp.mesh.shape[tp.batch_axis] == 0 else None
    lead = (bax,) + (None,) * (x.ndim - 2)
    x_spec = PartitionSpec(*lead, tp.axis if row else None)
    out_spec = PartitionSpec(*lead, None if row else tp.axis)
    local = nn.Dense(
        kernel.shape[1] if row else kernel.shape[1] // n,
        use_bias=False,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        precision=module.precision,
        dot_general=module.dot_general,
        dot_general_cls=module.dot_general_cls,
    )

    def body(x_l, k_l):
        _LOCAL.depth = getattr(_LOCAL, "depth", 0) + 1
        try:
            y = local.apply({"params": {"kernel": k_l}}, x_l)  # jquant.nn routes this shard
        finally:
            _LOCAL.depth -= 1
        return jax.lax.psum(y, tp.axis) if row else y

    fn = jax.shard_map(
        body,
        mesh=tp.mesh,
        in_specs=(x_spec, _kernel_specs(kernel, leaf_plan, tp.axis)),
        out_specs=out_spec,
        check_vma=False,
    )
    y = fn(x, kernel)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y
