"""scripts/pipeline_results.py: runs on any of the three testbeds, and a rerun keeps the
hand-maintained 'Three testbeds' section of docs/results.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _scripts import load_script, unload_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    module = load_script("pipeline_results")
    yield module
    unload_script(module)


def test_stress_testbed_run_writes_its_own_files_and_keeps_the_testbeds_section(script, tmp_path) -> None:
    out, js = tmp_path / "results.md", tmp_path / "r.json"
    out.write_text("# old generated part\n\n## Three testbeds\n\nhand-kept table\n")
    # one clip, one calibration sample: the rows, labels and files of a longer run, a fifth less CPU time
    argv = ["--testbed", "stress", "--sections", "precision", "--clips", "1", "--calib-samples", "1"]
    assert script.main([*argv, "--steps", "2", "--out", str(out), "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["settings"]["testbed"] == "stress" and res["precision"]
    # Two steps have one switch point: W4A8 for step 0, then W8A8 (no empty "steps 0--1" row).
    labels = [r["label"] for r in res["precision"]]
    assert labels == ["W4A8 every step", "W8A8 every step", "W4A8 for steps 0-0, W8A8 after"], labels
    assert res["precision"][2]["choice"] == [0, 1]
    text = out.read_text()
    assert text.startswith("# Measured results") and text.endswith("## Three testbeds\n\nhand-kept table\n")
    assert "old generated part" not in text and "on the stress testbed" in text
    with pytest.raises(SystemExit):
        script.main(["--testbed", "nope"])
