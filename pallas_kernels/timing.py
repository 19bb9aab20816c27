"""Device timing for kernel benchmarks: check first, CUPTI kernel time, inputs rotated past L2.

``time_fn`` runs ``fn`` on each of several input sets in turn inside one jitted
call (so L2, 50 MB on an H100, cannot serve the operands of one call from the
previous one), measures the summed GPU kernel time of that call with CUPTI
(``jax.experimental.mosaic.gpu.profiler.measure``) over at least ``MIN_RUNS``
iterations, and returns the median and the minimum per-call time. Where CUPTI is
unavailable it falls back to a synchronised wall clock over the same rotation.

``check_then_time`` is what the benchmark scripts call for every timed function: it
runs ``fn`` once, judges the output (``pallas_kernels.testing.compare`` / ``check_dot``
for kernels), and times it only when it passed, so a wrong kernel is a FAIL row, never
a speed. ``run_metadata`` / ``write_json`` give every benchmark JSON the same record
(device, date, commit, JAX version, command).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

L2_BYTES = 50 * 2**20
MIN_RUNS = 10  # timed runs of every function at least (median and min are reported)
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
    check: Callable[[object], dict] | None = None,
) -> dict:
    """Microseconds per call of ``fn`` over ``input_sets`` (rotated): ``us`` (median), ``us_min``,
    ``us_max`` over ``runs`` >= MIN_RUNS timed runs.

    With ``check``, the warm-up call's output on the first set is judged first (``check(out)`` ->
    a dict with ``ok``; returned under ``check``); a failed check returns ``{"check": verdict}``
    and no times."""
    sets = list(input_sets)
    iterations = max(int(iterations), MIN_RUNS)

    @jax.jit
    def run_all(all_sets):
        return [fn(*s) for s in all_sets]

    outs = jax.block_until_ready(run_all(sets))  # compile + warm up
    verdict = None
    if check is not None:
        verdict = check(outs[0])
        if not verdict.get("ok"):
            return {"check": verdict}
    del outs
    try:
        from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top

        _, runtimes_ms = profiler.measure(run_all, iterations=iterations)(sets)
        if runtimes_ms is None:
            raise RuntimeError("no kernels were launched")
        per_call = [t * 1e3 / len(sets) for t in runtimes_ms]
        method = "cupti"
    except Exception:  # pylint: disable=broad-except
        per_call = []
        for _ in range(iterations):
            start = time.perf_counter()
            jax.block_until_ready(run_all(sets))
            per_call.append((time.perf_counter() - start) * 1e6 / len(sets))
        method = "wall"
    return {
        "us": statistics.median(per_call),
        "us_min": min(per_call),
        "us_max": max(per_call),
        "runs": len(per_call),
        "copies": len(sets),
        "method": method,
        **({} if verdict is None else {"check": verdict}),
    }


def summarize_kernels(runs: Sequence[Sequence[tuple[str, float]]]) -> list[dict]:
    """Per-kernel statistics from CUPTI's per-iteration lists of ``(kernel name, ms)``: launches of
    one name within an iteration are summed; returns ``{"kernel", "launches", "us", "us_min"}``
    (median and minimum over iterations), slowest first."""
    per_name: dict[str, list[float]] = {}
    launches: dict[str, int] = {}
    for run in runs:
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        for name, ms in run:
            totals[name] = totals.get(name, 0.0) + ms * 1e3
            counts[name] = counts.get(name, 0) + 1
        for name, us in totals.items():
            per_name.setdefault(name, []).append(us)
            launches[name] = counts[name]
    rows = [
        {"kernel": name, "launches": launches[name], "us": statistics.median(t), "us_min": min(t)}
        for name, t in per_name.items()
    ]
    return sorted(rows, key=lambda r: -r["us"])


def kernel_breakdown(fn: Callable, args: tuple, *, iterations: int = MIN_RUNS) -> list[dict]:
    """GPU time of each kernel ``jax.jit(fn)(*args)`` launches (CUPTI), :func:`summarize_kernels`'
    rows; where each microsecond of a multi-kernel XLA function goes. Raises RuntimeError where
    CUPTI cannot measure (no GPU)."""
    if jax.default_backend() != "gpu":
        raise RuntimeError(f"kernel_breakdown: needs a GPU for CUPTI, backend is {jax.default_backend()!r}")
    from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top

    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))
    _, runs = profiler.measure(jitted, aggregate=False, iterations=max(int(iterations), MIN_RUNS))(*args)
    if not runs:
        raise RuntimeError("kernel_breakdown: no kernels were measured")
    return summarize_kernels(runs)


def check_then_time(
    fn: Callable, input_sets: Sequence[tuple], check: Callable[[object], dict], *, iterations: int = MIN_RUNS
) -> dict:
    """Runs ``fn`` (the warm-up call of :func:`time_fn`), judges its output on the first input set
    with ``check(out)`` (a dict with ``ok``), and only if it passed times it.

    Returns ``{"status": "PASS" | "FAIL" | "ERROR", "check": verdict, "us", "us_min", ...}``
    (no times unless PASS); an exception in the run, the check or the timing is an ERROR row
    with ``error`` and ``traceback``, never a dropped row.
    """
    try:
        t = time_fn(fn, input_sets, iterations=iterations, check=check)
    except Exception as exc:  # pylint: disable=broad-except
        return error_row(exc)
    return {"status": "PASS" if "us" in t else "FAIL", **t}


def error_row(exc: BaseException) -> dict:
    """``{"status": "ERROR", "error", "traceback"}`` for a row whose run raised."""
    return {
        "status": "ERROR",
        "error": f"{type(exc).__name__}: {exc}"[:2000],
        "traceback": traceback.format_exc()[-3000:],
    }


def git_commit() -> str:
    """``$JQUANT_COMMIT`` when set (the GPU machine gets a copy of the working tree, whose git
    metadata, where any, can be stale: pass the commit in the command); else ``git rev-parse
    HEAD`` of the repository (``-dirty`` with uncommitted changes to tracked files)."""
    if os.environ.get("JQUANT_COMMIT"):
        return os.environ["JQUANT_COMMIT"]
    root = os.path.dirname(_BENCHMARKS)
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("JQUANT_COMMIT", "unknown")


def run_metadata(script: str | None = None, argv: Sequence[str] | None = None) -> dict:
    """The record every benchmark JSON starts with: device, platform, date, commit, JAX, command."""
    dev = jax.devices()[0]
    script = script or os.path.relpath(os.path.abspath(sys.argv[0]), os.path.dirname(_BENCHMARKS))
    argv = sys.argv[1:] if argv is None else list(argv)
    return {
        "device": dev.device_kind,
        "platform": dev.platform,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "jax": jax.__version__,
        "command": " ".join(["python3", script, *argv]),
    }


def write_json(file_name: str, record: dict, folder: str | None = None) -> str:
    """Writes ``record`` to ``<folder or benchmarks/>/<file_name>`` and a copy to ``$OUT`` when set
    (where the GPU machine returns files); returns the first path."""
    paths = [os.path.join(folder or _BENCHMARKS, file_name)]  # an absolute file_name stays as it is
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], os.path.basename(file_name)))
    for path in paths:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(record, f, indent=1, default=str)
            f.write("\n")
    return paths[0]


def copy_bandwidth(iterations: int = 10) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + written) on 1 GiB of bf16."""
    a = [jax.random.normal(jax.random.key(i), (2**29,), jnp.bfloat16) for i in range(2)]
    t = time_fn(lambda v: v + jnp.bfloat16(1), [(v,) for v in a], iterations=iterations)
    return 2 * a[0].size * 2 / t["us"] / 1e3


def write_rows(name: str, rows: list[dict]) -> str:
    """Writes ``{device, jax, date, rows}`` to ``benchmarks/<name>-<device>.json`` (and ``$OUT`` when
    set, where the GPU machine returns files); returns the benchmarks path."""
    return write_json(f"{name}-{device_slug()}.json", {**run_metadata(), "rows": rows})


def device_slug() -> str:
    """``NVIDIA_H200``: the default device's kind for file names."""
    return re.sub(r"[^A-Za-z0-9]+", "_", jax.devices()[0].device_kind).strip("_") or jax.devices()[0].platform
