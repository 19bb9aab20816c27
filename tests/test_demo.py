"""`jquant demo` end to end on the bundled tiny model (two clips, six steps, two recipes)."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

import jquant.cli.demo as demo
from jquant.models import tiny_wan as tw
from jquant.pipeline import recipes as rc

RECIPES = ("int8-wa-smooth", "nf4")  # a static per-timestep table (W8A8) and a 4-bit weight-only codebook


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # the settings of tests/test_pipeline_quality.py: the cached bundle's compiled samplers are shared
    log = io.StringIO()  # not a terminal: the status comes as plain lines
    with contextlib.redirect_stderr(log):
        res = demo.run_demo(str(out), num_clips=2, steps=6, seed=0, recipes=RECIPES, calib_samples=2, progress=True)
    return res, out, log.getvalue()


def test_demo_reports_each_phase_as_lines(result):
    """Off a terminal (CI logs) every phase of every model is one timestamped line, no bar redraws."""
    log = result[2]
    assert "\r" not in log and "\x1b" not in log
    for text in (
        "1/3 fp32: loading the bundled model",
        "1/3 fp32: sampling 2 clips x 6 steps",
        "2/3 int8-wa-smooth: calibrating (recording the fp32 calibration trajectories, then layer statistics)",
        "2/3 int8-wa-smooth: calibrating (per-step activation ranges)",
        "2/3 int8-wa-smooth: done, PSNR",
        "3/3 nf4: quantizing",
        "3/3 nf4: sampling",
        "writing",
    ):
        assert text in log, (text, log)
    assert all(line.startswith("[") for line in log.splitlines())


def test_status_on_a_terminal_draws_one_bar():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    st = demo.Status(2, stream=stream)
    assert st.tty and st.bar is not None
    st.start("fp32")
    st.phase("sampling")
    st.done("ok")
    st.start("nf4")
    st.phase("calibrating (layer statistics)")
    st.close()
    text = stream.getvalue()
    assert "fp32: sampling" in text and "fp32: ok" in text and "nf4: calibrating (layer statistics)" in text
    assert "2/2" not in text and "1/2" in text  # the bar counts finished models
    quiet = io.StringIO()
    st = demo.Status(1, enabled=False, stream=quiet)
    st.start("fp32")
    st.phase("x")
    st.done("y")
    st.line("z")
    st.close()
    assert quiet.getvalue() == ""


def test_demo_rows_metrics_and_files(result):
    res, out, _ = result
    rows = {r["recipe"]: r for r in res["rows"]}
    assert list(rows) == ["fp32", *RECIPES]
    fp32, w8a8, w4 = rows["fp32"], rows["int8-wa-smooth"], rows["nf4"]
    assert math.isinf(fp32["psnr"]) and fp32["ssim"] == pytest.approx(1.0) and fp32["bits_per_weight"] == 32.0
    assert np.isfinite(w8a8["psnr"]) and np.isfinite(w4["psnr"])
    assert w8a8["psnr"] > w4["psnr"] + 3.0 and w8a8["ssim"] > w4["ssim"]  # measured: ~29 vs ~20 dB at these settings
    assert 8.0 < w8a8["bits_per_weight"] < 9.5 and 4.0 < w4["bits_per_weight"] < 5.0
    assert fp32["weight_bytes"] > 2.5 * w8a8["weight_bytes"] and w8a8["weight_bytes"] > 1.3 * w4["weight_bytes"]
    assert fp32["accuracy"] >= 1 / 2  # the bundled model's samples are recognisable
    for r in res["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["sample_s"] >= 0 and r["compile_s"] >= 0
        assert r["recipe"] in res["table"] and len(r["step_rmse"]) == 6
    assert w4["step_rmse"][-1] > 0 and w4["flicker"] > w8a8["flicker"] > 0

    png, gif = Image.open(out / "grid.png"), Image.open(out / "clips.gif")
    assert png.size[0] > png.size[1] > 0
    assert gif.n_frames == tw.DataConfig().frames
    plot = Image.open(out / "step_error.png")
    assert plot.size[0] > 300
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"][0]["psnr"] is None  # inf -> null in JSON
    assert saved["rows"][1]["psnr"] == pytest.approx(w8a8["psnr"])
    assert saved["labels"] == [0, 1]


def test_recipe_selection():
    assert demo.resolve_recipes("all") == rc.names()
    assert demo.resolve_recipes("int8-w, nf4") == ["int8-w", "nf4"]
    with pytest.raises(KeyError, match="unknown recipe 'w3'"):
        demo.resolve_recipes("int8-w,w3")
    with pytest.raises(KeyError, match="did you mean 'int8-wa-smooth'"):
        demo.resolve_recipes("int8-wa-smoth")


def test_main_prints_table(tmp_path, capsys, monkeypatch):
    calls = {}

    def fake_run_demo(out, num_clips, steps, seed, recipes, calib_samples):
        calls.update(out=out, num_clips=num_clips, steps=steps, seed=seed, recipes=recipes, calib_samples=calib_samples)
        return {
            "table": "TABLE",
            "num_clips": num_clips,
            "labels": [0],
            "png": "p",
            "gif": "g",
            "plot": "s",
            "total_s": 1.0,
        }

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert demo.main(["--out", str(tmp_path), "--clips", "2", "--steps", "3", "--seed", "7", "--recipes", "all"]) == 0
    assert calls == {"out": str(tmp_path), "num_clips": 2, "steps": 3, "seed": 7, "recipes": "all", "calib_samples": 4}
    printed = capsys.readouterr()
    assert "TABLE" in printed.out and printed.err.startswith("jquant demo: 2 clips x 3 steps")  # said before the work
    assert demo.main.__doc__ and demo.DEFAULT_RECIPES == ("int8-wa-smooth", "w4a16-gptq", "q4_k_m")
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
    assert calls == {
        "out": str(tmp_path),
        "num_clips": 2,
        "steps": 6,
        "seed": 0,
        "recipes": "int8-wa-smooth,q4_k_m",
        "calib_samples": 2,
    }
    assert demo.main(["--quick", "--steps", "4", "--out", str(tmp_path)]) == 0 and calls["steps"] == 4  # explicit wins
    assert demo.main(["--out", str(tmp_path)]) == 0
    assert calls["num_clips"] == 8 and calls["steps"] == 16 and calls["recipes"] == ",".join(demo.DEFAULT_RECIPES)


def test_run_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_clips"):
        demo.run_demo(str(tmp_path), num_clips=0, steps=2)
    with pytest.raises(ValueError, match="recipes is empty"):
        demo.run_demo(str(tmp_path), num_clips=1, steps=1, recipes=())
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):  # before any work
        demo.run_demo(str(tmp_path / "file"), num_clips=1, steps=1, recipes=("nf4",))
