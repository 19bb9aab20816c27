"""scripts/bench_block_gemm.py on the CPU at a small size: every row is judged before it is timed,
a wrong kernel makes its row FAIL and the script exit 1, and the JSON records each row."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import pytest
from _scripts import load_script, unload_script

from pallas_kernels import testing, timing


@pytest.fixture()
def bench(monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_M", "64")
    monkeypatch.setenv("BENCH_FORMATS", "int8")
    monkeypatch.setattr(timing, "_BENCHMARKS", str(tmp_path))
    module = load_script("bench_block_gemm")
    monkeypatch.setattr(module, "SHAPES", {"1.3b": [(256, 384)], "14b": []})
    monkeypatch.setattr(module, "FFN_UP", {(256, 384)})
    yield module
    unload_script(module)


def test_every_row_is_checked_and_recorded(bench, tmp_path):
    assert bench.main() == 0
    (path,) = tmp_path.glob("block_gemm-*.json")
    (row,) = json.loads(path.read_text())["rows"]
    labels = {"bf16", "token", "n128", "n256", "prod128", "prod256", "prod128_rot", "prod256_rot"}
    assert labels <= set(row)
    for label in labels:
        assert row[label]["status"] == "PASS" and row[label]["check"]["ok"], label
        assert row[label]["runs"] >= timing.MIN_RUNS and row[label]["us_min"] <= row[label]["us"]


def test_a_wrong_kernel_fails_its_row_and_the_run(bench, monkeypatch):
    case = testing.CASES["w8a8_int8_block_n256"]
    broken = dataclasses.replace(case, kernel=lambda *a, **k: 1.5 * case.reference(*a).astype(jnp.float32))
    monkeypatch.setitem(testing.CASES, "w8a8_int8_block_n256", broken)
    assert bench.main() == 1


def test_bench_rows_picks_rows(bench, monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_ROWS", "token,n256")
    assert bench.main() == 0
    (path,) = tmp_path.glob("block_gemm-*.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert {k for k, v in row.items() if isinstance(v, dict)} == {"bf16", "token", "n256"}
