"""docs/training.md quotes benchmarks/qat_table-nvidia-h200.json (the H200 distillation runs)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_training_doc_quotes_the_gpu_json() -> None:
    record = json.loads((ROOT / "benchmarks" / "qat_table-nvidia-h200.json").read_text())
    text = (ROOT / "docs" / "training.md").read_text()
    section = text[text.index("## Measured: thousands of distillation steps on the H200") :]
    assert f"commit {record['commit']}" in section and len(record["rows"]) == 6
    for r in record["rows"]:
        cells = f"| {r['setting']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['flicker']:.4f} | {r['one_step']:.4f} |"
        assert cells in section, cells
        assert f"| {r['train_s']:.0f} |" in section


def test_training_doc_quotes_the_rollout_json() -> None:
    record = json.loads((ROOT / "benchmarks" / "qat_table-512-nvidia-h200.json").read_text())
    text = (ROOT / "docs" / "training.md").read_text()
    section = text[text.index("## Measured: student rollouts") :]
    assert f"commit {record['commit']}" in section and len(record["rows"]) == 4
    for r in record["rows"]:
        cells = (
            f"| {r['data']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['flicker']:.4f} "
            f"| {r['one_step']:.4f} | {r.get('steps', 0):,} | {r['train_s']:.0f} |"
        )
        assert cells in section, cells
