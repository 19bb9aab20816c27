"""Smoke test of scripts/bench_models_forward.py on its --tiny path (CPU): every model's
benchmark inputs run through its port, so the full-size GPU run does not fail on shapes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_models_forward.py"


def test_tiny_benchmark_writes_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("bench_models_forward", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    # Two of the five (each port's own parity and sampling tests cover the rest): LTX-2, the one
    # not yet run at full size on the GPU, and HunyuanVideo.
    report = bench.main(
        [
            "--tiny",
            "--models",
            "hunyuan_video",
            "ltx2",
            "--attn",
            "xla",
            "--warmup",
            "0",
            "--runs",
            "1",
            "--out-dir",
            str(tmp_path),
        ]
    )
    files = list(tmp_path.glob("models_forward-tiny-*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["results"]) == {"hunyuan_video", "ltx2"}
    for name, r in saved["results"].items():
        config = bench.BENCHES[name].tiny_config
        assert r["param_count"] == bench.models.param_count(bench.models.param_shapes(config))
        assert r["output_finite"] and r["time_ms"] > 0 and len(r["times_ms"]) == 1
        assert r["class"] == config.CLASS_NAME
    assert saved["results"]["hunyuan_video"]["tokens"] == 2 * 4 * 6  # latent 2x8x12, patch (1, 2, 2)
    assert saved["results"]["ltx2"]["audio_tokens"] == 5
    for key in ("device", "jax_version", "date", "attention", "command"):
        assert key in saved
