"""Distributed calibration: activation statistics and Hessians reduced across mesh axes.

Two ways, same numbers as one device (up to float summation order):

* :func:`calibrate` streams batches split over the mesh (the batch and/or token axis of every
  input) through :func:`jquant.calib.calibrate`; XLA's partitioner turns each layer's ``X^T X``
  over sharded tokens into per-device partial sums plus one all-reduce.
* :func:`sharded_batch_stats` does it by hand for one layer's inputs ``[T, K]`` split over
  ``axes``: each device reduces its rows with :func:`jquant.calib.batch_stats`, then
  :func:`reduce_stats` sums (counts, sums, Hessian, histogram) and maxes (absmax) across devices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jquant import calib
from jquant.calib import CalibConfig, LayerStats

AxisNames = str | tuple[str, ...]


def reduce_stats(stats: LayerStats, axes: AxisNames) -> LayerStats:
    """Pool per-device statistics across mesh ``axes`` (call inside ``shard_map``)."""
    return LayerStats(
        count=jax.lax.psum(stats.count, axes),
        sum=jax.lax.psum(stats.sum, axes),
        abssum=jax.lax.psum(stats.abssum, axes),
        absmax=jax.lax.pmax(stats.absmax, axes),
        hessian=jax.lax.psum(stats.hessian, axes),
        hist=jax.lax.psum(stats.hist, axes),
        log2_lo=stats.log2_lo,
        bins_per_octave=stats.bins_per_octave,
    )


def _size(mesh: Mesh, axes: AxisNames) -> int:
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    out = 1
    for a in names:
        if a not in mesh.shape:
            raise ValueError(f"sharding.calib: axis {a!r} is not in the mesh {tuple(mesh.shape)}")
        out *= mesh.shape[a]
    return out


def sharded_batch_stats(x2: jax.Array, mesh: Mesh, axes: AxisNames, config: CalibConfig | None = None) -> LayerStats:
    """Statistics of one layer's inputs ``x2 [T, K]``, rows split over mesh ``axes``."""
    config = config or CalibConfig()
    n = _size(mesh, axes)
    if x2.ndim != 2 or x2.shape[0] % n:
        raise ValueError(f"sharded_batch_stats: inputs must be [T, K] with T divisible by {n}, got {x2.shape}")

    def local(rows: jax.Array) -> LayerStats:
        return reduce_stats(calib.batch_stats(rows, config), axes)

    fn = jax.shard_map(local, mesh=mesh, in_specs=PartitionSpec(axes, None), out_specs=PartitionSpec(), check_vma=False)
    return jax.jit(fn)(x2)


def batch_sharding(batch: Any, mesh: Mesh, spec: PartitionSpec | Callable[[jax.Array], PartitionSpec]) -> Any:
    """Shardings for a batch pytree: ``spec`` for every array (or ``spec(array)``)."""
    return jax.tree.map(lambda x: NamedSharding(mesh, spec(x) if callable(spec) else spec), batch)


def calibrate(
    apply_fn: Callable,
    params: Any,
    batches: Iterable[Any],
    mesh: Mesh,
    spec: PartitionSpec | Callable[[jax.Array], PartitionSpec],
    config: CalibConfig | None = None,
    **kwargs: Any,
) -> Any:
    """:func:`jquant.calib.calibrate` with every batch placed on ``mesh`` as ``spec`` says
    (e.g. ``PartitionSpec("data")`` splits each input's leading axis); ``params`` may be sharded
    (:func:`jquant.sharding.shard_params`). Extra keyword arguments go to ``calib.calibrate``."""

    def placed() -> Iterable[Any]:
        for batch in batches:
            yield jax.device_put(batch, batch_sharding(batch, mesh, spec))

    return calib.calibrate(apply_fn, params, placed(), config, **kwargs)


def leading_axis(axes: AxisNames, mesh: Mesh) -> Callable[[jax.Array], PartitionSpec]:
    """A batch ``spec`` that splits each array's leading axis over ``axes`` where it divides
    evenly and replicates the array otherwise (timesteps of a batch of 1, scalars)."""
    n = _size(mesh, axes)

    def spec(x: jax.Array) -> PartitionSpec:
        shape: Sequence[int] = getattr(x, "shape", ())
        return PartitionSpec(axes) if shape and shape[0] % n == 0 else PartitionSpec()

    return spec
