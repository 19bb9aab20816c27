#!/usr/bin/env python3
"""What a step speedup target leaves for attention, read from measured ``bench_e2e.py`` JSON.

For each JSON (written by ``bench_e2e.py --profile``) and each profiled quantized row, against
the same run's bf16 row: device ms per step by phase (the profiler's kernels, sorted again by
today's :data:`pallas_kernels.trace_table.CATEGORY_RULES`), the device budget a target sets
(bf16 device ms / target), what the quantized row spends outside attention, and so what is left
for attention and the speedup over bf16's attention (cuDNN) that this needs. Prints a Markdown
table and draws ``docs/img/step_budget.png`` (one panel per JSON: phases stacked, the targets'
budgets as lines). Why: issue 19's step target is missed, and this shows by how much each phase
would have to move; nothing here is measured anew, every number is arithmetic on the JSON.

    python scripts/step_budget.py                      # the 1.3B and 14B steps in benchmarks/
    python scripts/step_budget.py --json A.json --json B.json --targets 1.6,1.8 --out plot.png

Run from the repository root after ``pip install -e .`` (or with ``PYTHONPATH=.``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from pallas_kernels import trace_table

ROOT = Path(__file__).resolve().parents[1]
#: The last profiled steps of the landed default: Wan2.1-1.3B (784e0ed) and Wan2.1-14B (dfdb463).
DEFAULT_JSONS = ("benchmarks/e2e-rope-flip-nvidia-h200.json", "benchmarks/e2e-14b-fused-nvidia-h200.json")
DEFAULT_TARGETS = (1.6, 1.8)
#: Drawing order and colours of the phases (anything else is drawn after them in grey).
PHASES = ("attention", "gemm", "quantize", "elementwise", "norm", "copy", "other")
COLOURS = {
    "attention": "#d62728",
    "gemm": "#1f77b4",
    "quantize": "#ff7f0e",
    "elementwise": "#2ca02c",
    "norm": "#9467bd",
    "copy": "#8c564b",
    "other": "#7f7f7f",
}


def load(path: str | Path) -> dict[str, Any]:
    """The JSON, its bf16 row and its profiled quantized rows, with clear errors naming the file."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable bench_e2e JSON ({e})") from e
    rows = record.get("rows")
    if not isinstance(rows, list):
        raise ValueError(f"{path}: no 'rows' list (not a bench_e2e.py output)")
    base = [r for r in rows if r.get("variant") == "bf16" and r.get("profile")]
    if not base:
        raise ValueError(f"{path}: no profiled 'bf16' row; run bench_e2e.py with --profile and bf16 among the variants")
    quant = [r for r in rows if r.get("variant") != "bf16" and r.get("profile") and r.get("status") == "PASS"]
    if not quant:
        raise ValueError(f"{path}: no profiled quantized row that passed its check")
    return {"path": path, "record": record, "bf16": base[0], "quantized": quant}


def phases_ms(row: dict[str, Any]) -> dict[str, float]:
    """Device ms per step by phase of a profiled row, its kernels sorted by today's rules."""
    table = trace_table.recategorize(row["profile"])
    return {c: us / 1e3 for c, us in table["by_category_us"].items() if us > 0}


def budget(bf16: dict[str, float], quant: dict[str, float], target: float) -> dict[str, float]:
    """What ``target`` (step speedup over bf16, device time) leaves for the quantized row's attention.

    ``bf16`` / ``quant``: ms per phase. ``attention_ms``: the budget minus everything else the
    quantized row spends (<= 0: the rest alone is over budget); ``attention_speedup_needed``:
    bf16's attention over that (inf when nothing is left).
    """
    if target <= 0:
        raise ValueError(f"budget: target must be > 0, got {target}")
    if "attention" not in bf16 or "attention" not in quant:
        raise ValueError("budget: both rows need an 'attention' phase")
    step_ms = sum(bf16.values()) / target
    rest = sum(v for k, v in quant.items() if k != "attention")
    attn = step_ms - rest
    return {
        "target": target,
        "step_ms": step_ms,
        "rest_ms": rest,
        "attention_ms": attn,
        "attention_speedup_needed": bf16["attention"] / attn if attn > 0 else float("inf"),
    }


def rows(paths: Sequence[str | Path], targets: Sequence[float]) -> list[dict[str, Any]]:
    """One row per (JSON, profiled quantized variant): measured phases and each target's budget."""
    out = []
    for p in paths:
        data = load(p)
        b16 = phases_ms(data["bf16"])
        for q in data["quantized"]:
            qm = phases_ms(q)
            out.append(
                {
                    "file": str(Path(p)),
                    "model": data["record"].get("model", "?"),
                    "commit": data["record"].get("commit", "?"),
                    "variant": q["variant"],
                    "bf16_phases_ms": b16,
                    "phases_ms": qm,
                    "bf16_device_ms": sum(b16.values()),
                    "device_ms": sum(qm.values()),
                    "wall_ms": q.get("time_ms"),
                    "bf16_wall_ms": data["bf16"].get("time_ms"),
                    "attention_speedup": b16["attention"] / qm["attention"],
                    "budgets": [budget(b16, qm, t) for t in targets],
                }
            )
    return out


def markdown(table: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table (device ms per step)."""
    head = (
        "| model (commit) | variant | bf16 device ms | quantized device ms (attention + rest) "
        "| attention vs bf16 | target: step budget, attention budget, attention speedup needed |"
    )
    lines = [head, "|---|---|---:|---:|---:|---|"]
    for r in table:
        need = "; ".join(
            f"{b['target']:.1f}x: {b['step_ms']:.0f}, {b['attention_ms']:.0f}, {b['attention_speedup_needed']:.2f}x"
            for b in r["budgets"]
        )
        lines.append(
            f"| {r['model']} ({r['commit'][:7]}) | {r['variant']} | {r['bf16_device_ms']:.1f} "
            f"| {r['device_ms']:.1f} ({r['phases_ms']['attention']:.1f} + {r['device_ms'] - r['phases_ms']['attention']:.1f}) "
            f"| {r['attention_speedup']:.2f}x | {need} |"
        )
    return "\n".join(lines)


def plot(table: Sequence[dict[str, Any]], out: str | Path) -> Path:
    """One panel per row: bf16 and the quantized variant, phases stacked, targets as dashed lines."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, axes = plt.subplots(len(table), 1, figsize=(9, 2.3 * len(table)), squeeze=False)
    for ax, r in zip(axes[:, 0], table):
        bars = (("bf16 + cuDNN", r["bf16_phases_ms"]), (r["variant"], r["phases_ms"]))
        for y, (_, ph) in enumerate(bars):
            left = 0.0
            names = [c for c in PHASES if c in ph] + sorted(c for c in ph if c not in PHASES)
            for c in names:
                ax.barh(y, ph[c], left=left, color=COLOURS.get(c, "#bbbbbb"), edgecolor="white", label=c)
                left += ph[c]
        for b in r["budgets"]:
            ax.axvline(b["step_ms"], color="black", linestyle="--", linewidth=1)
            ax.text(b["step_ms"], 1.45, f"{b['target']:.1f}x", ha="center", va="bottom", fontsize=8)
        ax.set_yticks([0, 1], [name for name, _ in bars], fontsize=8)
        ax.set_ylim(-0.5, 1.8)
        ax.set_title(f"{r['model']} ({r['commit'][:7]}): device ms per step", fontsize=9)
    seen: dict[str, Any] = {}
    for ax in axes[:, 0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    order = [c for c in PHASES if c in seen] + sorted(c for c in seen if c not in PHASES)
    fig.legend([seen[c] for c in order], order, fontsize=8, ncol=len(order), loc="upper center")
    axes[-1, 0].set_xlabel("device ms per step (profiler); dashed: the step's budget at each target")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--json", action="append", help="bench_e2e.py --profile output (repeat); default: " + ", ".join(DEFAULT_JSONS)
    )
    ap.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)), help="step speedups over bf16")
    ap.add_argument("--out", default=str(ROOT / "docs/img/step_budget.png"), help="the plot ('' for none)")
    args = ap.parse_args(argv)
    paths = args.json or [ROOT / p for p in DEFAULT_JSONS]
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    table = rows(paths, targets)
    print(markdown(table))
    if args.out:
        print(f"wrote {plot(table, args.out)}")
    return table


if __name__ == "__main__":
    main()
