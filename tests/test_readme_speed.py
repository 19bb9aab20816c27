"""README's "Measured on an H200" table quotes the step benchmarks' JSON in benchmarks/."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (model, variant label, JSON file, variant): the README's rows, in order.
ROWS = [
    ("Wan2.1-1.3B", "bf16 + cuDNN attention", "e2e-rope-flip-nvidia-h200.json", "bf16"),
    ("Wan2.1-1.3B", "W8A8 + quantized attention", "e2e-rope-flip-nvidia-h200.json", "w8a8-token-fused-qattn-default"),
    ("Wan2.1-1.3B", "W4A8 + quantized attention", "e2e-session22-nvidia-h200.json", "w4a8-token-fused-qattn-default"),
    ("Wan2.1-14B", "bf16 + cuDNN attention", "e2e-14b-fused-nvidia-h200.json", "bf16"),
    ("Wan2.1-14B", "W8A8 + quantized attention", "e2e-14b-fused-nvidia-h200.json", "w8a8-token-fused-qattn-default"),
    ("Wan2.1-14B", "GGUF Q4_K_M (weights read in place)", "e2e-14b-nvidia-h200.json", "q4_k_m"),
]


def speed_table() -> str:
    """The markdown table, every number from the JSON (median / min of the timed runs)."""
    lines = [
        "| model | variant | step (median / min) | vs bf16, same run | weights | JSON (commit) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for model, label, name, variant in ROWS:
        res = json.loads((ROOT / "benchmarks" / name).read_text())
        row = next(r for r in res["rows"] if r["variant"] == variant)
        assert row["status"] == "PASS", (name, variant)
        lines.append(
            f"| {model} | {label} | {row['time_ms']:.1f} / {row['time_ms_min']:.1f} ms |"
            f" {row['speedup_vs_bf16']:.2f}x | {row['weight_bytes'] / 1e9:.2f} GB | `{name}` ({res['commit'][:7]}) |"
        )
    return "\n".join(lines)


def test_readme_quotes_the_step_json():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Measured on an H200", 1)[1].split("\n## ", 1)[0]
    assert speed_table() in section, "README's table differs from speed_table() (benchmarks/*.json):\n" + speed_table()
