"""pallas_kernels.trace_table: a profiler trace folded into per-step kernel times and phases."""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import trace_table


def _events() -> list[dict]:
    """A Perfetto-style trace: one GPU process with a stream and an 'XLA Ops' line, and a host."""
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 1, "args": {"name": "python"}},
    ]
    k = lambda name, dur, hlo="", tid=7, pid=1: {
        "ph": "X",
        "pid": pid,
        "tid": tid,
        "name": name,
        "dur": dur,
        "args": {"hlo_op": hlo},
    }
    kernels = []
    for _ in range(2):  # two steps
        kernels += [
            k("cudnn_generated_fort_native_sdpa_sm90", 300.0),
            k("nvjet_tst_128x256_64x4_2x1_v_bz_TNT", 100.0, "dot.3"),
            k("loop_multiply_fusion", 20.0, "multiply_fusion.2"),
            k("input_reduce_fusion", 30.0, "reduce.1"),
            k("mosaic_gpu_kernel", 50.0, "w8a8_int8"),
            k("quantize_fusion", 10.0, "act_quant"),
        ]
    noise = [
        k("nvjet_x", 999.0, tid=8),
        k("PjitFunction(step)", 5000.0, pid=2, tid=1),
        {"ph": "i", "pid": 1, "tid": 7, "name": "mark"},
    ]
    return meta + kernels + noise


def test_kernel_table_sums_stream_kernels_per_step():
    table = trace_table.kernel_table(_events(), steps=2)
    assert table["kernels_per_step"] == 6
    assert table["device_us_per_step"] == pytest.approx(510.0)  # the 'XLA Ops' line and the host are not counted
    cats = table["by_category_us"]
    assert cats == pytest.approx(
        {"attention": 300.0, "gemm": 150.0, "norm": 30.0, "elementwise": 20.0, "quantize": 10.0}
    )
    assert list(cats) == sorted(cats, key=lambda c: -cats[c])
    top = table["top"][0]
    assert top["category"] == "attention" and top["count_per_step"] == 1 and top["share"] == pytest.approx(300 / 510)
    assert sum(r["us_per_step"] for r in table["top"]) == pytest.approx(510.0)
    assert "attention" in trace_table.format_table(table) and "gemm" in trace_table.compare([("a", table)])


def test_kernel_table_rejects_zero_steps():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        trace_table.kernel_table(_events(), steps=0)


@pytest.mark.parametrize(
    "name,hlo,expected",
    [
        ("sm90_xmma_gemm_bf16", "", "gemm"),
        ("mosaic_gpu", "quant_attention", "attention"),
        ("triton_act_quant", "", "quantize"),
        ("copy_transpose", "", "copy"),
        ("something_unknown", "", "other"),
        ("entry_mosaic_gpu_kernel", "command_buffer_1", "attention"),
        ("kernel_mosaic_gpu_kernel", "command_buffer_1", "gemm"),
        ("_kernel__6", "command_buffer_1", "quantize"),
        ("_kernel", "command_buffer_1", "quantize"),
        ("loop_multiply_fusion_29", "command_buffer_1", "elementwise"),
    ],
)
def test_category(name, hlo, expected):
    assert trace_table.category(name, hlo) == expected


def test_read_trace_and_profile_on_this_backend(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.trace.json.gz"):
        trace_table.read_trace(tmp_path)
    (tmp_path / "a").mkdir()
    with gzip.open(tmp_path / "a" / "h.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": _events()}, f)
    assert len(trace_table.read_trace(tmp_path)) == len(_events())
    fn = jax.jit(lambda x: jnp.tanh(x @ x))
    x = jnp.ones((64, 64))
    fn(x).block_until_ready()
    table = trace_table.profile(fn, x, steps=1, log_dir=str(tmp_path / "trace"))
    assert table["steps"] == 1
    if jax.default_backend() == "cpu":  # no device streams: an empty table, not an error
        assert table["kernels_per_step"] == 0 and table["top"] == []
    else:
        assert table["device_us_per_step"] > 0


@pytest.mark.parametrize("label", sorted(trace_table.JQUANT_KERNELS))
def test_jquant_kernel_bodies_still_have_the_names_the_rules_match(label):
    """Under command buffers only the body's name tells jquant's kernels apart: a renamed body
    would silently land in another phase, so each listed module must still define it."""
    for module, body in trace_table.JQUANT_KERNELS[label]:
        source = inspect.getsource(importlib.import_module(module))
        assert re.search(rf"^\s*def {body}\(", source, re.M), f"{module} no longer defines {body}()"
        mosaic = "_mosaic_gpu_kernel" if body != "_kernel" else ""
        assert trace_table.category(f"{body}{mosaic}", "command_buffer_1") == label


def test_recategorize_resorts_stored_rows_and_keeps_the_unlisted_rest():
    table = trace_table.kernel_table(_events(), steps=2, top=3)
    stored = {**table, "by_category_us": {"other": table["device_us_per_step"]}}
    for r in stored["top"]:
        r["category"] = "other"
    again = trace_table.recategorize(stored)
    assert again["device_us_per_step"] == pytest.approx(510.0)
    assert again["unsorted_us"] == pytest.approx(510.0 - 450.0)  # the three largest are stored
    assert again["by_category_us"] == pytest.approx({"attention": 300.0, "gemm": 150.0, "other": 60.0})
    assert [r["category"] for r in again["top"]] == ["attention", "gemm", "gemm"]
    assert sum(again["by_category_us"].values()) == pytest.approx(510.0)


def test_recategorize_rejects_tables_without_rows_or_with_rows_over_the_total():
    with pytest.raises(ValueError, match="no 'top' rows"):
        trace_table.recategorize({"device_us_per_step": 1.0, "top": []})
    table = trace_table.kernel_table(_events(), steps=2)
    with pytest.raises(ValueError, match="sum to more than the table's total"):
        trace_table.recategorize({**table, "device_us_per_step": 100.0})
