"""Smoke test of scripts/bench_wan_forward.py on its --tiny path (CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_wan_forward.py"


def test_tiny_benchmark_writes_result(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_wan_forward", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ckpt = tmp_path / "ckpt"
    result = bench.main(
        [
            "--tiny",
            "--attn",
            "xla",
            "--warmup",
            "1",
            "--runs",
            "2",
            "--text-len",
            "8",
            "--out-dir",
            str(tmp_path),
            "--ckpt-dir",
            str(ckpt),
        ]
    )
    files = list(tmp_path.glob("wan_forward-tiny-*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["tokens"] == 2 * 2 * 3  # latent 2x4x6, patch (1, 2, 2)
    assert saved["latent_shape"] == [1, 4, 2, 4, 6]
    assert len(saved["times_ms"]) == 2 and saved["time_ms"] > 0
    assert saved["param_count"] == bench.models.param_count(bench.models.param_shapes(bench.TINY_CONFIG))
    assert (ckpt / "config.json").is_file()
    for key in ("device", "jax_version", "date", "peak_bytes", "attention"):
        assert key in saved


def test_tiny_e2e_benchmark_runs_every_linear_and_attention_variant(tmp_path: Path) -> None:
    path = SCRIPT.parent / "bench_e2e.py"
    spec = importlib.util.spec_from_file_location("bench_e2e", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    variants = ["bf16", "w8a8", "w8a8-qattn-fp8-kblock"]
    bench.main(
        ["--tiny", "--variants", ",".join(variants), "--runs", "1", "--text-len", "8", "--out-dir", str(tmp_path)]
    )
    files = list(tmp_path.glob("e2e-tiny-*.json"))
    assert len(files) == 1
    rows = {r["variant"]: r for r in json.loads(files[0].read_text())["rows"]}
    assert list(rows) == variants
    assert all(r["time_ms"] > 0 for r in rows.values())
    # int8 codes with their scales take well under the bf16 bytes of the same weights
    assert rows["w8a8"]["weight_bytes"] < 0.8 * rows["bf16"]["weight_bytes"]
