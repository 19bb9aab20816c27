"""`jquant demo` end to end on the bundled tiny model (few clips, few steps)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

import jquant.demo as demo
import models
from jquant.qarray import QArray
from jquant.rules import flatten_with_paths
from models import tiny_wan as tw


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return demo.run_demo(str(out), num_clips=3, steps=4, seed=0, progress=False), out


def test_demo_rows_metrics_and_files(result):
    res, out = result
    rows = {r["format"]: r for r in res["rows"]}
    assert list(rows) == [f.name for f in demo.DEFAULT_FORMATS]
    fp32, w8a8, w4 = (rows[f.name] for f in demo.DEFAULT_FORMATS)
    assert math.isinf(fp32["psnr"]) and fp32["ssim"] == pytest.approx(1.0)
    assert np.isfinite(w8a8["psnr"]) and np.isfinite(w4["psnr"])
    # Measured on this model: W8A8 ~26-33 dB, W4A16 (int4/g64) ~15-19 dB against fp32.
    assert w8a8["psnr"] > w4["psnr"] + 3.0
    assert w8a8["ssim"] > w4["ssim"]
    assert fp32["weight_bytes"] > 2.5 * w8a8["weight_bytes"]  # 7.08 MB -> 2.40 MB -> 1.67 MB
    assert w8a8["weight_bytes"] > 1.3 * w4["weight_bytes"]
    assert fp32["accuracy"] >= 2 / 3  # the bundled model's samples are recognisable
    for r in res["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["sample_s"] >= 0 and r["compile_s"] >= 0
        assert r["format"] in res["table"]

    png, gif = Image.open(out / "grid.png"), Image.open(out / "clips.gif")
    assert png.size[0] > png.size[1] > 0
    assert gif.n_frames == tw.DataConfig().frames
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"][0]["psnr"] is None  # inf -> null in JSON
    assert saved["rows"][1]["psnr"] == pytest.approx(w8a8["psnr"])
    assert saved["labels"] == [0, 1, 2]


def test_role_rules_keep_embedders_modulation_final_float():
    bundle = tw.load_tiny()
    roles = models.layer_roles(bundle.config, bundle.params)
    q = demo.rtn("int4/g64")(bundle.params, roles)
    leaves = dict(flatten_with_paths(q))
    kept = [p for p, r in roles.items() if set(r) & set(demo.FLOAT_ROLES)]
    assert "proj_out/kernel" in kept and "condition_embedder/time_proj/kernel" in kept
    for path in roles:
        assert isinstance(leaves[path], QArray) == (path not in kept), path
    assert demo.weight_bytes(q) < demo.weight_bytes(bundle.params) / 3


def test_main_prints_table(tmp_path, capsys, monkeypatch):
    calls = {}

    def fake_run_demo(out, num_clips, steps, seed):
        calls.update(out=out, num_clips=num_clips, steps=steps, seed=seed)
        return {"table": "TABLE", "num_clips": num_clips, "labels": [0], "png": "p", "gif": "g", "total_s": 1.0}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert demo.main(["--out", str(tmp_path), "--clips", "2", "--steps", "3", "--seed", "7"]) == 0
    assert calls == {"out": str(tmp_path), "num_clips": 2, "steps": 3, "seed": 7}
    assert "TABLE" in capsys.readouterr().out


def test_run_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_clips"):
        demo.run_demo(str(tmp_path), num_clips=0, steps=2)
    with pytest.raises(ValueError, match="formats"):
        demo.run_demo(str(tmp_path), num_clips=1, steps=1, formats=())
