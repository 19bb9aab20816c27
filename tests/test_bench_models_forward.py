"""Smoke test of scripts/bench_models_forward.py on its --tiny path (CPU): every model's
benchmark inputs run through its port, so the full-size GPU run does not fail on shapes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_models_forward.py"


def _load(monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("bench_models_forward", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def test_tiny_benchmark_writes_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load(monkeypatch)
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


def test_random_leaves_are_jax_random_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    # The weights come from one random program per power-of-two length (35 numbers drawn as 64,
    # then cut): a tensor's numbers must still be exactly jax.random's for its shape.
    bench = _load(monkeypatch)
    key = jax.random.key(7)
    for shape, kind, fan in (((5, 7), "kernel", 5), ((3, 4, 6), "table", 6)):
        want = jax.random.normal(key, shape, bench.BF16) * jnp.asarray(fan**-0.5, bench.BF16)
        got = bench._random_leaf(key, shape, kind)
        assert got.shape == shape and got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(bench._random_leaf(key, (3,), "ones"), np.ones(3))
