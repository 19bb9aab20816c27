"""Device timing for kernel benchmarks: CUPTI kernel time, inputs rotated past L2.

``time_fn`` runs ``fn`` on each of several input sets in turn inside one jitted
call (so L2, 50 MB on an H100, cannot serve the operands of one call from the
previous one), measures the summed GPU kernel time of that call with CUPTI
(``jax.experimental.mosaic.gpu.profiler.measure``) over many iterations, and
returns the median per-call time. Where CUPTI is unavailable it falls back to a
synchronised wall clock over the same rotation.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

L2_BYTES = 50 * 2**20
_BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def copies_for(bytes_per_set: float, limit: int = 24, budget: float = 6e9) -> int:
  """How many input sets to rotate so together they are >= 3x the L2 size."""
  need = int(np.ceil(3 * L2_BYTES / max(bytes_per_set, 1)))
  fit = max(1, int(budget // max(bytes_per_set, 1)))
  return max(2, min(need, limit, fit))


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def time_fn(
    fn: Callable[..., jax.Array],
    input_sets: Sequence[tuple],
    *,
    iterations: int = 30,
) -> dict:
  """Median microseconds per call of ``fn`` over ``input_sets`` (rotated)."""
  sets = list(input_sets)

  @jax.jit
  def run_all(all_sets):
    return [fn(*s) for s in all_sets]

  jax.block_until_ready(run_all(sets))  # compile + warm up
  try:
    from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top

    _, runtimes_ms = profiler.measure(run_all, iterations=iterations)(sets)
    if runtimes_ms is None:
      raise RuntimeError("no kernels were launched")
    per_call = [t * 1e3 / len(sets) for t in runtimes_ms]
    method = "cupti"
  except Exception:  # pylint: disable=broad-except
    per_call = []
    for _ in range(max(5, iterations // 3)):
      start = time.perf_counter()
      jax.block_until_ready(run_all(sets))
      per_call.append((time.perf_counter() - start) * 1e6 / len(sets))
    method = "wall"
  return {
      "us": statistics.median(per_call),
      "us_min": min(per_call),
      "us_max": max(per_call),
      "copies": len(sets),
      "method": method,
  }


def copy_bandwidth(iterations: int = 10) -> float:
  """Measured device copy bandwidth in GB/s (bytes read + written) on 1 GiB of bf16."""
  a = [jax.random.normal(jax.random.key(i), (2**29,), jnp.bfloat16) for i in range(2)]
  t = time_fn(lambda v: v + jnp.bfloat16(1), [(v,) for v in a], iterations=iterations)
  return 2 * a[0].size * 2 / t["us"] / 1e3


def write_rows(name: str, rows: list[dict]) -> str:
  """Writes ``{device, jax, date, rows}`` to ``benchmarks/<name>-<device>.json`` (and ``$OUT`` when
  set, where the GPU machine returns files); returns the benchmarks path."""
  dev = jax.devices()[0]
  slug = re.sub(r"[^A-Za-z0-9]+", "_", dev.device_kind).strip("_")
  out = {"device": dev.device_kind, "jax": jax.__version__,
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "rows": rows}
  paths = [os.path.join(folder, f"{name}-{slug}.json")
           for folder in [_BENCHMARKS] + ([os.environ["OUT"]] if os.environ.get("OUT") else [])]
  for path in paths:
    with open(path, "w") as f:
      json.dump(out, f, indent=1)
  return paths[0]
