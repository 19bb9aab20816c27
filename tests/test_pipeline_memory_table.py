"""scripts/pipeline_memory_table.py on the CPU: the tiny dry run, a wrong kernel is a FAIL row,
and docs/pipelines.md quotes the GPU JSON in the repository."""

from __future__ import annotations

import json
import re
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from _scripts import load_script, unload_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table():
    module = load_script("pipeline_memory_table")
    yield module
    unload_script(module)


@pytest.fixture(autouse=True)
def _no_out(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)


def _run(table, tmp_path: Path, *extra: str) -> dict:
    argv = ["--tiny", "--models", "wan14b", "--recipes", "bf16,q4_k_m,w4-svd", "--out-dir", str(tmp_path), *extra]
    return table.main(argv)


def test_tiny_table(table, tmp_path):
    result = _run(table, tmp_path, "--time", "bf16,q4_k_m")
    assert result["failures"] == 0
    rows = {(r["component"], r.get("recipe")): r for r in result["rows"]}
    for key in [("text_encoder", None), ("vae", None), ("transformer", "bf16"), ("transformer", "q4_k_m")]:
        row = rows[key]
        assert row["status"] == "PASS" and row["check"]["ok"], row
        assert row["runs"] >= 10 and 0 < row["time_ms_min"] <= row["time_ms"], row
    assert rows[("transformer", "w4-svd")]["status"] == "MEMORY"
    pipes = {p["recipe"]: p for p in result["pipelines"]}
    assert set(pipes) == {"bf16", "q4_k_m", "w4-svd"}
    for p in pipes.values():  # the pipeline holds more than its transformer, and peaks above what it holds
        t = rows[("transformer", p["recipe"])]
        assert p["resident_bytes"] > t["resident_bytes"] and p["peak_bytes"] > p["resident_bytes"]
    assert "seconds_per_clip" in pipes["bf16"] and "seconds_per_clip" not in pipes["w4-svd"]
    bf16 = rows[("transformer", "bf16")]
    expected = (
        2 * rows[("text_encoder", None)]["time_ms"] + 50 * bf16["time_ms"] + rows[("vae", None)]["time_ms"]
    ) / 1e3
    assert pipes["bf16"]["seconds_per_clip"] == pytest.approx(expected)
    written = json.loads(next(tmp_path.glob("pipeline_memory-tiny-*.json")).read_text())
    for key in ("device", "date", "commit", "jax", "command"):
        assert written.get(key), key
    # A second call replaces its own rows and keeps the others.
    again = _run(table, tmp_path, "--components", "", "--recipes", "bf16", "--time", "bf16")
    assert sum(r["component"] == "transformer" and r.get("recipe") == "bf16" for r in again["rows"]) == 1
    assert any(r.get("recipe") == "w4-svd" for r in again["rows"])


def test_wrong_weights_fail_the_check(table, tmp_path, monkeypatch):
    real = table.dequantized

    def off_by_ten_percent(variables):  # a decode with a wrong scale: the kind of bug the check is for
        out = real(variables)
        out["params"] = table.jax.tree.map(lambda w: w * 1.1 if w.ndim == 2 else w, out["params"])
        return out

    monkeypatch.setattr(table, "dequantized", off_by_ten_percent)
    result = _run(table, tmp_path, "--components", "", "--recipes", "bf16,q4_k_m", "--time", "bf16,q4_k_m")
    rows = {r["recipe"]: r for r in result["rows"]}
    assert rows["q4_k_m"]["status"] == "FAIL" and "time_ms" not in rows["q4_k_m"]
    assert rows["bf16"]["status"] == "PASS" and result["failures"] == 1


def test_docs_quote_the_json():
    record = json.loads((ROOT / "benchmarks" / "pipeline_memory-nvidia-h200.json").read_text())
    text = (ROOT / "docs" / "pipelines.md").read_text()
    section = text[text.index("### The handbook's memory table") : text.index("### `jquant generate`")]
    assert f"commit {record['commit']}" in section
    mib = {round(r[k] / 2**20) for r in record["rows"] for k in ("resident_bytes", "peak_bytes") if r.get(k)}
    for n in re.findall(r"\| ([\d,]+) MiB", section):
        assert int(n.replace(",", "")) in mib, n
    gib = {f"{p[k] / 2**30:.2f}" for p in record["pipelines"] for k in ("resident_bytes", "peak_bytes")}
    for g in re.findall(r"\| ([\d.]+) GiB", section):
        assert g in gib, g
    for p in record["pipelines"]:
        if "seconds_per_clip" in p:
            assert f"{p['seconds_per_clip']:.1f} s" in section


def test_a_skipped_row_never_replaces_a_measured_one(table):
    measured = {"component": "transformer", "model": "m", "recipe": "fp8-w", "status": "MEMORY", "resident_bytes": 1}
    skipped = {"component": "transformer", "model": "m", "recipe": "fp8-w", "status": "SKIP", "skipped": "deadline"}
    redone = {**measured, "resident_bytes": 2}
    assert table.merge_rows([measured], [skipped]) == [measured]
    assert table.merge_rows([skipped], [measured]) == [measured]
    assert table.merge_rows([measured], [redone]) == [redone]
    timed = {**measured, "status": "PASS", "time_ms": 5.0}
    for untimed in (redone, {**redone, "status": "CHECKED"}):
        assert table.merge_rows([timed], [untimed]) == [timed]
    assert table.merge_rows([redone], [timed]) == [timed]


def test_check_only_rows(table, tmp_path):
    # --check runs a recipe's check without timing it: status CHECKED, the check kept, no times.
    args = [
        "--tiny",
        "--models",
        "wan14b",
        "--components",
        "",
        "--recipes",
        "int8-w",
        "--time",
        "",
        "--check",
        "int8-w",
    ]
    table.main([*args, "--out-dir", str(tmp_path)])
    (row,) = json.loads(next(tmp_path.glob("pipeline_memory-*.json")).read_text())["rows"]
    assert row["status"] == "CHECKED" and row["check"]["ok"] and "time_ms" not in row


def test_recipe_weights_are_the_eager_codes(table):
    # recipe_variables quantizes the whole tree in one jitted program: the codes and scales
    # must be the eager per-leaf policy's, bit for bit.
    from jquant import models as jm
    from jquant import policy as pol

    model = table.tiny_models()["wan14b"]
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, table.BF16), jm.param_shapes(model.config))
    params = table.random_tree(shapes, 0)
    roles = jm.layer_roles(model.config, params)
    for name, weights in (("fp8-w", "fp8_e4m3"), ("int8-w", "int8")):
        got = table.recipe_variables(name, params, roles, rank=4, seed=0)["params"]
        chex.assert_trees_all_equal(got, pol.uniform(weights).quantize(params, roles))


def test_bf16_nudge_is_about_one_rounding_step(table):
    # The check's rounding floor moves every matrix by at most 1/128 relative and leaves vectors.
    jnp = table.jnp
    v = {"params": {"w": jnp.linspace(0.5, 2.0, 64 * 32, dtype=jnp.float32).reshape(64, 32).astype(jnp.bfloat16),
                    "b": jnp.ones((32,), jnp.bfloat16)}}  # fmt: skip
    out = table.bf16_nudged(v, seed=0)["params"]
    w0, w1 = np.asarray(v["params"]["w"], np.float32), np.asarray(out["w"], np.float32)
    rel = np.abs(w1 - w0) / w0
    assert rel.max() <= 1 / 128 + 2**-8 and (rel > 0).mean() > 0.3  # moved, by about a bf16 step
    np.testing.assert_array_equal(np.asarray(out["b"]), np.asarray(v["params"]["b"]))


def test_random_leaves_are_jax_random_bit_for_bit(table):
    # The synthetic weights come from one random program per power-of-two length (35 numbers
    # drawn as 64, then cut): a leaf's numbers must still be exactly jax.random's for its shape.
    key, shape, f32 = jax.random.key(7), (5, 7), table.jnp.float32
    got = table._random_shaped(key, shape, "normal", table.BF16, 0.25)
    want = (jax.random.normal(key, shape, f32) * 0.25).astype(table.BF16)
    assert got.shape == shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    got = table._random_shaped(key, shape, "uniform", f32, 1.0)
    np.testing.assert_array_equal(got, jax.random.uniform(key, shape, f32, -1.0, 1.0))
