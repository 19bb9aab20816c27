"""Where a jitted step's GPU time goes: a profiler trace folded into a table of kernels.

``profile(fn, *args, steps=2)`` runs ``fn`` under ``jax.profiler.trace`` and reads the Perfetto
trace it writes; ``kernel_table(events, steps)`` sums the device kernels' durations per kernel
name (per step, with :func:`pallas_kernels.timing.summarize_kernels`, the CUPTI breakdown's
helper), and :func:`phases` sorts them into the phases of a DiT step (attention, GEMMs,
quantization, norms and element-wise fusions, copies); ``phases`` takes
:func:`pallas_kernels.timing.kernel_breakdown`'s rows as well. Why: a step that is slower than its
kernels' isolated times predict (issue 19's Wan step) needs the per-kernel picture of the step
itself, not of each kernel alone.

Only events on the device's streams count (the process named ``/device:GPU:N``, threads named
``Stream ...``); on the CPU backend the trace has none, and the table is empty.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax

from pallas_kernels import timing

#: Ordered (category, pattern) rules over ``"<kernel name> <hlo op>"`` (lower case); first match wins.
#: A profile under XLA's command buffers names every kernel's HLO op ``command_buffer_N``, so
#: jquant's own kernels are told apart by the names their bodies give them (:data:`JQUANT_KERNELS`).
CATEGORY_RULES: tuple[tuple[str, str], ...] = (
    ("attention", r"^entry_mosaic_gpu_kernel\b"),
    ("gemm", r"^kernel_mosaic_gpu_kernel\b"),
    ("quantize", r"^_kernel(__\d+)?\b"),
    ("attention", r"cudnn|fmha|flash|sdpa|attention|_attn|softmax"),
    ("quantize", r"quant|hadamard|amax|absmax"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|wgmma|matmul|dot|w8a8|w4a8|scaled_mm|convolution"),
    ("norm", r"norm|rsqrt|reduce"),
    ("copy", r"copy|transpose|memcpy|memset|concatenate|dynamic.update.slice|pad"),
    ("elementwise", r"fusion|add|multiply|select|convert"),
)


#: The kernel bodies behind the three name rules above, ``(module, function)``: a Mosaic GPU
#: kernel is named ``<body>_mosaic_gpu_kernel`` and a Triton one after its function (``__N`` added
#: per specialization). A test keeps these names in step with the modules.
JQUANT_KERNELS: dict[str, tuple[tuple[str, str], ...]] = {
    "attention": (("pallas_kernels.attention", "entry"),),
    "gemm": (
        ("pallas_kernels.w8a8", "kernel"),
        ("pallas_kernels.w4a8", "kernel"),
        ("pallas_kernels.w4a16_gemm", "kernel"),
        ("pallas_kernels.weight_only", "kernel"),
    ),
    "quantize": (
        ("pallas_kernels.norm_quant", "_kernel"),
        ("pallas_kernels.attn_prep", "_kernel"),
        ("pallas_kernels.act_quant", "_kernel"),
        ("pallas_kernels.hadamard_gather", "_kernel"),
    ),
}


def category(name: str, hlo_op: str = "") -> str:
    """The phase a kernel belongs to by :data:`CATEGORY_RULES` (``"other"`` if none matches)."""
    text = f"{name} {hlo_op}".lower()
    for label, pattern in CATEGORY_RULES:
        if re.search(pattern, text):
            return label
    return "other"


def device_kernels(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The complete ('X') events on device streams: ``{"name", "hlo_op", "dur_us"}`` each."""
    events = list(events)
    procs = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    threads = {
        (e["pid"], e.get("tid")): e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    out = []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if "/device:GPU" not in procs.get(e.get("pid"), ""):
            continue
        if not threads.get((e["pid"], e.get("tid")), "").startswith("Stream"):
            continue
        args = e.get("args", {}) or {}
        hlo = str(args.get("hlo_op", args.get("long_name", "")))
        out.append({"name": e.get("name", "?"), "hlo_op": hlo, "dur_us": float(e["dur"])})
    return out


def kernel_table(events: Iterable[dict[str, Any]], steps: int, top: int = 40) -> dict[str, Any]:
    """Per-step device time: total, per category and the ``top`` kernels by time.

    ``steps``: how many steps the trace covers (the sums are divided by it). The per-kernel
    sums are :func:`pallas_kernels.timing.summarize_kernels`' (the CUPTI breakdown's) over the
    whole trace as one run; :func:`phases` adds the categories.
    """
    if steps < 1:
        raise ValueError(f"kernel_table: steps must be >= 1, got {steps}")
    kernels = device_kernels(events)
    hlo_of: dict[str, str] = {}
    for k in kernels:
        hlo_of.setdefault(k["name"], k["hlo_op"][:120])
    rows = timing.summarize_kernels([[(k["name"], k["dur_us"] / 1e3) for k in kernels]]) if kernels else []
    for r in rows:
        r.update(
            us=r["us"] / steps, us_min=r["us_min"] / steps, launches=r["launches"] / steps, hlo_op=hlo_of[r["kernel"]]
        )
    return {"steps": steps, "kernels_per_step": len(kernels) / steps, **phases(rows, top)}


def phases(rows: Sequence[dict[str, Any]], top: int = 40) -> dict[str, Any]:
    """Categories of :func:`pallas_kernels.timing.summarize_kernels`-style rows (``kernel``,
    ``launches``, ``us``; optional ``hlo_op``): the total, the us per :func:`category`, and the
    ``top`` rows with their category and share."""
    total = sum(r["us"] for r in rows)
    by_cat: dict[str, float] = collections.defaultdict(float)
    for r in rows:
        by_cat[category(r["kernel"], r.get("hlo_op", ""))] += r["us"]
    return {
        "device_us_per_step": total,
        "by_category_us": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
        "top": [
            {
                "name": r["kernel"][:120],
                "hlo_op": r.get("hlo_op", ""),
                "category": category(r["kernel"], r.get("hlo_op", "")),
                "us_per_step": r["us"],
                "count_per_step": r["launches"],
                "share": r["us"] / total if total else 0.0,
            }
            for r in rows[:top]
        ],
    }


def recategorize(table: dict[str, Any]) -> dict[str, Any]:
    """A stored :func:`kernel_table` with its phases re-sorted by today's :data:`CATEGORY_RULES`.

    Why: tables written before a rule existed (e.g. the command-buffer profiles of issue 19's
    twentieth session, where jquant's kernels all landed in ``"other"``) can be read again without
    the GPU. Only the ``top`` rows are stored, so the device time they do not cover stays under
    ``"other"``; ``unsorted_us`` says how much that is.
    """
    top = table.get("top")
    if not top:
        raise ValueError("recategorize: the table has no 'top' rows to sort")
    rows = [
        {"kernel": r["name"], "hlo_op": r.get("hlo_op", ""), "us": r["us_per_step"], "launches": r["count_per_step"]}
        for r in top
    ]
    out = {**table, **phases(rows, top=len(rows))}
    rest = table["device_us_per_step"] - out["device_us_per_step"]
    if rest < -1e-6 * table["device_us_per_step"]:
        raise ValueError(f"recategorize: the top rows sum to more than the table's total ({-rest:.1f} us over)")
    if rest > 0:
        cats = dict(out["by_category_us"])
        cats["other"] = cats.get("other", 0.0) + rest
        out["by_category_us"] = dict(sorted(cats.items(), key=lambda kv: -kv[1]))
    total = table["device_us_per_step"]
    for r in out["top"]:
        r["share"] = r["us_per_step"] / total if total else 0.0
    return {**out, "device_us_per_step": total, "unsorted_us": max(rest, 0.0)}


def read_trace(folder: str | Path) -> list[dict[str, Any]]:
    """The events of the newest ``*.trace.json.gz`` under ``folder`` (a ``jax.profiler`` log dir)."""
    paths = sorted(Path(folder).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise FileNotFoundError(f"read_trace: no *.trace.json.gz under {folder}")
    with gzip.open(paths[-1], "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def profile(
    fn: Callable[..., Any], *args: Any, steps: int = 2, top: int = 40, log_dir: str | None = None
) -> dict[str, Any]:
    """Runs ``fn(*args)`` ``steps`` times under the profiler (call it once before, so the trace has
    no compilation) and returns :func:`kernel_table` of the trace."""
    folder = log_dir or tempfile.mkdtemp(prefix="jquant-trace-")
    with jax.profiler.trace(folder):
        for _ in range(steps):
            jax.block_until_ready(fn(*args))
    return kernel_table(read_trace(folder), steps, top)


def format_table(table: dict[str, Any], rows: int = 12) -> str:
    """A few lines for a terminal: per-category ms and the largest kernels."""
    lines = [f"  device {table['device_us_per_step'] / 1e3:.1f} ms/step, {table['kernels_per_step']:.0f} kernels"]
    lines.append("  " + "  ".join(f"{c} {t / 1e3:.1f}" for c, t in table["by_category_us"].items()))
    for r in table["top"][:rows]:
        lines.append(
            f"    {r['us_per_step'] / 1e3:8.2f} ms x{r['count_per_step']:<5.0f} {r['category']:11s} {r['name'][:70]}"
        )
    return "\n".join(lines)


def compare(tables: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Category ms per step side by side for several variants' tables."""
    cats = sorted({c for _, t in tables for c in t["by_category_us"]})
    head = f"{'variant':28s}" + "".join(f"{c:>12s}" for c in cats) + f"{'total':>10s}"
    body = [
        f"{name:28s}"
        + "".join(f"{t['by_category_us'].get(c, 0.0) / 1e3:12.1f}" for c in cats)
        + f"{t['device_us_per_step'] / 1e3:10.1f}"
        for name, t in tables
    ]
    return "\n".join([head, *body])
