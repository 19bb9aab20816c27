"""scripts/step_budget.py: a target's budget for attention, from stored bench_e2e JSON."""

from __future__ import annotations

import json
import math

import pytest

from tests._scripts import load_script, unload_script


@pytest.fixture(scope="module")
def sb():
    module = load_script("step_budget")
    yield module
    unload_script(module)


def _profile(kernels: list[tuple[str, float, str]]) -> dict:
    """A stored trace_table table whose top rows are ``kernels`` (name, us, stored category)."""
    total = sum(us for _, us, _ in kernels)
    return {
        "steps": 2,
        "kernels_per_step": len(kernels),
        "device_us_per_step": total,
        "by_category_us": {"other": total},  # as stored before today's rules
        "top": [
            {
                "name": n,
                "hlo_op": "command_buffer_1",
                "category": c,
                "us_per_step": us,
                "count_per_step": 1.0,
                "share": 0,
            }
            for n, us, c in kernels
        ],
    }


def _record(tmp_path, rows) -> str:
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps({"model": "toy", "commit": "abcdef0123", "rows": rows}))
    return str(path)


BF16 = {
    "variant": "bf16",
    "status": "PASS",
    "time_ms": 500.0,
    "profile": _profile([("cudnn_generated_sdpa", 300_000.0, "other"), ("nvjet_sm90_tst", 200_000.0, "other")]),
}
QUANT = {
    "variant": "w8a8",
    "status": "PASS",
    "time_ms": 410.0,
    "profile": _profile(
        [
            ("entry_mosaic_gpu_kernel", 250_000.0, "other"),
            ("kernel_mosaic_gpu_kernel", 100_000.0, "other"),
            ("_kernel__3", 40_000.0, "other"),
        ]
    ),
}


def test_budget_rows_resort_stored_kernels_and_do_the_arithmetic(sb, tmp_path):
    (row,) = sb.rows([_record(tmp_path, [BF16, QUANT])], [1.6, 2.0])
    assert row["bf16_phases_ms"] == pytest.approx({"attention": 300.0, "gemm": 200.0})
    assert row["phases_ms"] == pytest.approx({"attention": 250.0, "gemm": 100.0, "quantize": 40.0})
    assert row["attention_speedup"] == pytest.approx(1.2)
    b16, b20 = row["budgets"]
    assert b16["step_ms"] == pytest.approx(312.5) and b16["rest_ms"] == pytest.approx(140.0)
    assert b16["attention_ms"] == pytest.approx(172.5)
    assert b16["attention_speedup_needed"] == pytest.approx(300.0 / 172.5)
    assert b20["attention_ms"] == pytest.approx(110.0)
    assert "1.6x: 312, 172, 1.74x" in sb.markdown([row])


def test_budget_with_nothing_left_for_attention_needs_infinite_speedup(sb):
    b = sb.budget({"attention": 100.0, "gemm": 100.0}, {"attention": 50.0, "gemm": 150.0}, 1.5)
    assert b["attention_ms"] < 0 and math.isinf(b["attention_speedup_needed"])
    with pytest.raises(ValueError, match="target must be > 0"):
        sb.budget({"attention": 1.0}, {"attention": 1.0}, 0.0)


def test_plot_is_written(sb, tmp_path):
    table = sb.rows([_record(tmp_path, [BF16, QUANT])], [1.6])
    out = sb.plot(table, tmp_path / "img" / "budget.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "rows,match",
    [
        ([QUANT], "no profiled 'bf16' row"),
        ([BF16, {**QUANT, "status": "FAIL"}], "no profiled quantized row"),
        ([BF16, {**QUANT, "profile": None}], "no profiled quantized row"),
    ],
)
def test_load_names_the_file_and_what_is_missing(sb, tmp_path, rows, match):
    path = _record(tmp_path, rows)
    with pytest.raises(ValueError, match=match) as err:
        sb.load(path)
    assert path in str(err.value)


def test_load_rejects_a_truncated_file(sb, tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('{"rows": [')
    with pytest.raises(ValueError, match="cut.json: not a readable bench_e2e JSON"):
        sb.load(path)
