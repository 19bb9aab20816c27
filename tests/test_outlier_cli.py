"""``--outliers`` of ``jquant quantize`` / ``jquant eval`` (jquant.cli.outliers), the report's
printout (jquant.metrics.outliers.format_table) and its plot (jquant.metrics.outlier_plot): on the
bundled tiny Wan with outliers planted by jquant.algorithms.outliers (known layers and channels),
and end to end on the bundled tiny model."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given
from PIL import Image

from jquant import cli
from jquant.algorithms import outliers as inj
from jquant.cli import outliers as ocli
from jquant.metrics import outlier_plot as op
from jquant.metrics import outliers as rep
from jquant.models import tiny_wan
from jquant.pipeline.calibrate import CalibrationConfig, Calibrator
from jquant.pipeline.denoiser import tiny_wan_bundle

# the planting of tests/test_outliers.py (5% of the channels at 32x, one at 128x)
PLANT = inj.OutlierConfig(fraction=0.05, scale=32.0, peak=128.0)


@pytest.fixture(scope="module")
def stressed(tmp_path_factory):
    """The stress testbed at 2 steps, its planted ``{path: channel multiplier}``, the printed
    table, the data ``report`` wrote, and the output folder."""
    base = tiny_wan_bundle(num_steps=2)
    params, planted = inj.inject_outliers(base.params, PLANT)
    cal = Calibrator(dataclasses.replace(base, params=params), CalibrationConfig(num_samples=2, batch=2))
    out = tmp_path_factory.mktemp("outliers")
    lines: list[str] = []
    data = ocli.report(cal, out, echo=lines.append)
    assert lines[0].startswith("activation outliers of the float model") and lines[2].startswith("wrote ")
    return cal, planted, lines[1], data, out


def _section(text: str, start: str) -> list[str]:
    """The table rows after the line starting ``start`` (a title), a header and a rule, up to a
    blank line; ``start=""``: the first table (header and rule first)."""
    lines = text.split("\n")
    at = next(i for i, ln in enumerate(lines) if ln.startswith(start)) + (3 if start else 2)
    rows = lines[at:]
    return rows[: rows.index("")] if "" in rows else rows


def test_printout_names_the_layers_and_channels_with_planted_outliers(stressed) -> None:
    _, planted, text, _, _ = stressed
    worst = _section(text, "largest ratios")
    assert len(worst) == 8
    for line in worst:
        path, role, *_ = line.split()
        assert path in planted, line
        top = int(re.search(r"\s(\d+) \(x", line).group(1))  # the printed largest channel
        assert planted[path][top] > 1, (line, np.flatnonzero(planted[path] > 1))
    by_role = {ln.split()[0]: ln for ln in _section(text, "")}
    for role in ("attn.qkv", "attn.out", "cross_attn", "ffn.up"):
        assert by_role[role].split("  ")[-1].split(":")[0] in planted, by_role[role]
        assert float(by_role[role].split()[3]) > PLANT.scale / 2  # the max ratio column
    assert by_role["ffn.down"].split("  ")[-1].split(":")[0] not in planted  # no affine producer: untouched
    assert float(by_role["ffn.down"].split()[3]) < 8


def test_written_json_matches_the_report(stressed) -> None:
    cal, planted, _, data, out = stressed
    written = json.loads((out / ocli.JSON_NAME).read_text())
    assert written == json.loads(json.dumps(data))
    rows = {r["layer"]: r for r in written["layers"]}
    assert set(planted) <= set(rows) <= set(cal.bundle.roles)
    for path, s in planted.items():
        assert rows[path]["top"][0] in set(np.flatnonzero(s > 1).tolist()), path
        assert 0.0 <= rows[path]["overlap"] <= 1.0 and len(rows[path]["persistence"]) == 4
    assert written["max_ratio"] == max(r["ratio"] for r in rows.values())
    assert (out / ocli.PNG_NAME).stat().st_size > 10_000


def test_plot_draws_the_report_by_depth(stressed, tmp_path) -> None:
    cal, _, _, data, _ = stressed
    reports = {
        r["layer"]: rep.LayerOutliers(
            r["channels"], r["ratio"], r["kurtosis"], tuple(zip(r["top"], r["top_ratio"])), tuple(r["persistence"])
        )
        for r in data["layers"]
    }
    png = tmp_path / "o.png"
    d = op.plot_outliers(reports, png, cal.bundle.roles)
    with Image.open(png) as im:
        assert im.size == (op.FIGSIZE[0] * op.DPI, op.FIGSIZE[1] * op.DPI)
        assert np.asarray(im.convert("L")).std() > 5  # drawn, not blank
    assert sorted(d.paths) == sorted(reports)
    np.testing.assert_array_equal(d.ratio, [reports[p].ratio for p in d.paths])
    np.testing.assert_array_equal(d.persistence, [reports[p].persistence[0] for p in d.paths])
    assert np.all(np.diff(d.block) >= 0) and d.group[0] == "emb" and d.group[-1] == "head"
    assert d.paths[-1] == "proj_out/kernel" and d.block.max() == tiny_wan.load_tiny().config.num_layers
    # what the figure holds is what plot_data returned
    fig = op.outlier_figure(d)
    top, bottom = fig.axes
    pts = np.concatenate([c.get_offsets() for c in top.collections])
    np.testing.assert_allclose(np.sort(pts[:, 1]), np.sort(d.ratio))
    pts = np.concatenate([c.get_offsets() for c in bottom.collections])
    np.testing.assert_allclose(np.sort(pts[:, 1]), np.sort(d.persistence[np.isfinite(d.persistence)]))


@given(st.lists(st.integers(0, 30), min_size=1, max_size=12, unique=True))
def test_depth_order_is_numeric(blocks: list[int]) -> None:
    reports = {f"blocks_{b}/attn1/to_q/kernel": rep.layer_outliers(np.arange(1.0, 5.0)) for b in blocks}
    reports["proj_out/kernel"] = rep.layer_outliers(np.ones(4))
    reports["condition_embedder/time_proj/kernel"] = rep.layer_outliers(np.ones(4))
    roles = {"proj_out/kernel": ("final",)}
    d = op.plot_data(reports, roles)
    assert d.paths[0].startswith("condition_embedder") and d.paths[-1] == "proj_out/kernel"
    assert [int(p.split("/")[0].split("_")[1]) for p in d.paths[1:-1]] == sorted(blocks)
    assert d.group[1:-1] == tuple(str(b) for b in sorted(blocks))


def test_format_table_and_its_refusals() -> None:
    a = np.ones(16)
    a[5] = 40.0
    reports = {"x/kernel": rep.layer_outliers(a, a * 0.5, 1.0), "y/kernel": rep.layer_outliers(np.ones(16))}
    text = rep.format_table(reports, {"x/kernel": ("ffn.up",)}, {"x/kernel": 0.5}, worst=1)
    assert "ffn.up" in text and "x/kernel: 5 (x40, p1.00)" in text
    kurt = f"{reports['x/kernel'].kurtosis:.1f}"
    assert _section(text, "largest ratios")[0].split()[:5] == ["x/kernel", "ffn.up", "40.0", kurt, "0.50"]
    assert rep.worst_layers(reports, 5) == ["x/kernel", "y/kernel"]
    with pytest.raises(ValueError, match="no layers"):
        rep.format_table({})
    with pytest.raises(ValueError, match="no layers"):
        op.plot_data({})


def test_outliers_flag_on_the_bundled_tiny_model(tmp_path, capsys) -> None:
    q = tmp_path / "q"
    argv = ["quantize", str(tiny_wan.ASSET_DIR), "--recipe", "int8-w", "--out", str(q), "--steps", "2"]
    assert cli.main([*argv, "--calib-samples", "1", "--calib-batch", "1", "--outliers"]) == 0
    printed = capsys.readouterr().out
    assert "activation outliers of the float model" in printed and "largest ratios" in printed
    assert {ocli.JSON_NAME, ocli.PNG_NAME, "checkpoint", "quant.json"} <= {p.name for p in q.iterdir()}
    e = tmp_path / "e"
    assert cli.main(["eval", str(q), "--clips", "1", "--out", str(e), "--outliers"]) == 0
    assert {ocli.JSON_NAME, ocli.PNG_NAME, "eval.json"} <= {p.name for p in e.iterdir()}
    assert (e / ocli.PNG_NAME).stat().st_size > 10_000
    # eval replays the calibration workload recorded at quantization: the same report
    assert json.loads((e / ocli.JSON_NAME).read_text()) == json.loads((q / ocli.JSON_NAME).read_text())


def _doc_rows(section: str) -> dict[str, list[str]]:
    """``{first cell: other cells}`` of every markdown table row in ``section``."""
    out = {}
    for ln in section.splitlines():
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if ln.lstrip().startswith("|") and len(cells) > 1 and not set(cells[1]) <= set("-:"):
            out[cells[0]] = cells[1:]
    return out


def test_results_doc_quotes_the_testbed_json() -> None:
    root = Path(__file__).resolve().parents[1]
    res = json.loads((root / "benchmarks" / "outlier_testbed.json").read_text())
    section = (root / "docs" / "results.md").read_text().split("## Three testbeds", 1)[1]
    rows = _doc_rows(section)
    methods = [r["method"] for r in res["testbeds"]["tiny"]["rows"]]
    for m in methods:
        cells = []
        for bed in ("tiny", "stress", "trained"):
            row = next((r for r in res["testbeds"][bed]["rows"] if r["method"] == m), None)
            cells += ["not measured"] * 2 if row is None else [f"{row['psnr']:.2f}", f"{row['one_step']:.4f}"]
        assert rows[m] == cells, m
    for bed in ("tiny", "stress", "trained"):
        rep_ = res["testbeds"][bed]["report"]
        assert rows[bed][1] == f"{rep_['median_ratio']:.1f}, {rep_['max_ratio']:.1f}", bed
        assert rows[bed][2] == f"{rep_['median_top_overlap']:.2f}", bed


def test_outliers_doc_quotes_the_probe_json() -> None:
    root = Path(__file__).resolve().parents[1]
    med = json.loads((root / "benchmarks" / "quarot_stress_probe.json").read_text())["median_over_planted_layers"]
    rows = _doc_rows((root / "docs" / "outliers.md").read_text().split("quarot_stress_probe.py", 1)[1])
    keys = {
        "A8 per token, plain": "A8 plain",
        "A8 per token, rotated": "A8 rotated",
        "A8 per token, smoothed": "A8 smoothed",
        "W8 GPTQ, rotated": "W8 GPTQ rotated",
        "W8A8, rotated, GPTQ (the `int8-wa-quarot` layer)": "W8A8 GPTQ rotated (int8-wa-quarot)",
        "W8A8 RTN, smoothed": "W8A8 RTN smoothed",
    }
    for label, key in keys.items():
        assert rows[label] == [f"{med['tiny'][key]:.4f}", f"{med['stress'][key]:.4f}"], label
    assert rows["token RMS / RMS of the unplanted channels"] == [f"{med[b]['energy']:.2f}" for b in ("tiny", "stress")]
    assert rows["token absmax / RMS after the rotation"] == [
        f"{med[b]['crest_rotated']:.2f}" for b in ("tiny", "stress")
    ]
