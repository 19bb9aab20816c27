"""`jquant quantize` / `jquant eval` on a tiny random Wan directory; checkpoint round trip."""

import json

import jax
import numpy as np
import pytest
from _pipeline_util import CONFIG, tiny_bundle

from jquant import cli, models
from jquant.cli import quantize as pcli
from jquant.pipeline import calibrate as C
from jquant.pipeline import recipes as rc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan")
    models.save_pretrained(d, CONFIG, models.init_params(CONFIG, jax.random.key(0)))
    return d


def test_quantize_then_eval(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    rc_ = cli.main(
        [
            "quantize",
            str(model_dir),
            "--recipe",
            "int8-wa-smooth",
            "--out",
            str(out),
            "--steps",
            "2",
            "--calib-samples",
            "2",
            "--calib-batch",
            "2",
            "--table",
            "variance",
            "--groups",
            "2",
            "--per-branch",
        ]
    )
    assert rc_ == 0
    assert {p.name for p in out.iterdir()} >= {"checkpoint", "quant.json", "report.md", "report.json"}
    meta = json.loads((out / "quant.json").read_text())
    assert meta["act"] == "int8/t" and meta["num_steps"] == 2 and meta["table"]["config"]["per_branch"]
    rep = json.loads((out / "report.json").read_text())
    rows = {r["layer"]: r for r in rep["layers"]}
    assert rows["blocks_0/ffn/net_2"]["format"] == "int8/c" and "input_mul" in rows["blocks_0/ffn/net_2"]["aux"]
    assert rows["blocks_0/ffn/net_2"]["bytes"] < rows["blocks_0/ffn/net_2"]["bytes_float"] / 3
    assert rows["proj_out"]["format"].startswith("float") and rows["proj_out"]["activations"] == "-"
    assert set(rep["meta"]["info"]["seconds"]) >= {"calibration_stats", "calibration_record", "table_ranges", "save"}
    md = (out / "report.md").read_text()
    assert "| blocks_0/attn1/to_q | attn.qkv, self_attn, temporal | int8/c |" in md and "Scale table" in md
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--clips", "1"]) == 0
    printed = capsys.readouterr().out
    assert "int8-wa-smooth" in printed and "error after each denoising step" in printed
    res = json.loads((out / "eval.json").read_text())
    assert 10 < res["psnr"] < 80 and len(res["step_rmse"]) == 2 and res["labels"] == [0]


def test_checkpoint_round_trip_samples_identically(tmp_path):
    b = tiny_bundle()
    cal = C.Calibrator(b, C.CalibrationConfig(num_samples=1, batch=1))
    qm = C.quantize(b, rc.get("fp8-wa"), cal)
    pcli.save_quantized(tmp_path, qm, {"info": qm.info})
    back, meta = pcli.load_quantized(tmp_path)
    assert back.act == qm.act and back.name == "fp8-wa" and meta["table"]["act"] == "fp8_e4m3/t"
    np.testing.assert_array_equal(back.table.groups, qm.table.groups)
    work = b.workload(1, 0)
    np.testing.assert_array_equal(back.sample(b.denoiser, work), qm.sample(b.denoiser, work))
    with pytest.raises(FileNotFoundError, match="not a `jquant quantize` output"):
        pcli.load_quantized(tmp_path / "nope")


def test_cli_lists_and_refuses(model_dir, tmp_path, capsys):
    assert cli.main(["quantize", "--list"]) == 0  # no model folder needed
    listed = capsys.readouterr().out
    runnable, memory_only = listed.split("In memory only", 1)
    assert "int8-wa-smooth" in runnable and "quip2" not in runnable and "quip2" in memory_only
    assert cli.main(["quantize", str(model_dir), "--recipe", "quip2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot store" in err and "jquant demo --recipes quip2" in err and err.count("\n") == 1
    assert cli.main(["quantize", str(model_dir), "--recipe", "w3", "--out", str(tmp_path)]) == 2
    assert "unknown recipe 'w3'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written for a refused command
