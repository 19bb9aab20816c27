"""The three GPU benchmarks on the CPU: --help, tiny dry runs, and a wrong kernel fails loudly.

Each script checks every timed output against its reference before timing it; a kernel that
computes something else must be a FAIL row (not a speed) and make the script exit non-zero,
and every PASS row must carry the median and the minimum time. The scripts run in this
process (``main(argv)``) on tiny shapes, their JSON written to a temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import testing

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _no_out(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)


def _meta_ok(meta: dict) -> None:
    for key in ("device", "date", "commit", "jax", "command"):
        assert meta.get(key), key


@pytest.mark.parametrize("name", ["bench_kernels", "bench_attention", "bench_e2e"])
def test_help(name, capsys):
    module = _load(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_bench_kernels_fails_loudly_on_a_wrong_kernel(tmp_path, monkeypatch):
    bench = _load("bench_kernels")
    cases = getattr(bench, "CASES", testing.CASES)  # the script's registry (the kernels' and the dispatch's)
    good = cases["w8a8_int8"]

    def wrong(*args, **kwargs):  # 5% too large: the kind of error a bad scale makes
        return (good.reference(*args, **kwargs).astype(jnp.float32) * 1.05).astype(jnp.bfloat16)

    def broken(*args, **kwargs):
        raise RuntimeError("deliberately broken")

    monkeypatch.setitem(cases, "w8a8_int8", dataclasses.replace(good, kernel=wrong))
    monkeypatch.setitem(cases, "w8a16", dataclasses.replace(cases["w8a16"], kernel=broken))
    out = tmp_path / "kernels.json"
    rc = bench.main(["--tiny", "--kernels", "w8a8_int8,w4a16,w8a16", "--m", "4", "--out", str(out)])
    assert rc == 1
    record = json.loads(out.read_text())
    _meta_ok(record["meta"])
    rows = {r["kernel"]: r for r in record["rows"]}
    assert rows["w8a8_int8"]["status"] == "FAIL" and "us" not in rows["w8a8_int8"]
    assert rows["w8a8_int8"]["check"]["bound_ratio"] > 1
    assert rows["w8a16"]["status"] == "ERROR" and "deliberately broken" in rows["w8a16"]["error"]
    # W4A16 times its prepared form (W4Prepared weights): checked, timed, median and min.
    for name in ("w4a16", "xla_bf16", "xla_int8"):
        row = rows[name]
        assert row["status"] == "PASS", row
        assert row["runs"] >= 10 and 0 < row["us_min"] <= row["us"], row
    assert rows["w4a16"]["xla_bf16_us"] > 0 and rows["w4a16"]["xla_bf16_us_min"] > 0
    assert record["meta"]["failures"] == 2


def test_bench_kernels_dispatch_dry_run(tmp_path):
    bench = _load("bench_kernels")
    out = tmp_path / "dispatch.json"
    rc = bench.main(
        ["--tiny", "--dispatch", "--m", "1", "--kn", "256:128", "--kernels", "int8/w8a8", "--out", str(out)]
    )
    assert rc == 0
    record = json.loads(out.read_text())
    _meta_ok(record["meta"])
    paths = [r for r in record["rows"] if r.get("section") == "paths"]
    assert {r["path"] for r in paths} == {"w8a8", "xla_w8a8", "w16", "xla_w16"}
    timed = [r for r in paths if r["status"] == "PASS"]
    assert timed and all(0 < r["us_min"] <= r["us"] and r["xla_bf16_us"] > 0 for r in timed)
    table = {tuple(key): entries for *key, entries in record["meta"]["table"]}
    assert ("int8/w8a8", 256, 128) in table and ("int8/w8a8", 0, 0) in table
    assert any(r.get("section") == "verify" and r["path"] == "auto" for r in record["rows"])


def test_bench_attention_fails_loudly_on_a_wrong_kernel(tmp_path, monkeypatch):
    bench = _load("bench_attention")
    variant_fn = bench.variant_fn

    def wrong_variant_fn(variant, block_k):
        fn, prepare, finish, reference, pv = variant_fn(variant, block_k)
        if variant != "kernel-int8-bf16":
            return fn, prepare, finish, reference, pv
        return (lambda *a: (fn(*a).astype(jnp.float32) * 1.1).astype(jnp.bfloat16)), prepare, finish, reference, pv

    monkeypatch.setattr(bench, "variant_fn", wrong_variant_fn)
    rc = bench.main(["--tiny", "--variants", "xla,kernel-int8-bf16,total-int8-fp8", "--out-dir", str(tmp_path)])
    assert rc == 1
    record = json.loads(next(tmp_path.glob("attention-*-tiny.json")).read_text())
    _meta_ok(record)
    rows = {r["variant"]: r for r in record["rows"]}
    assert rows["kernel-int8-bf16"]["status"] == "FAIL" and "us" not in rows["kernel-int8-bf16"]
    for name in ("xla", "total-int8-fp8"):
        assert rows[name]["status"] == "PASS", rows[name]
        assert rows[name]["runs"] >= 10 and 0 < rows[name]["us_min"] <= rows[name]["us"]
    assert record["failures"] == 1


@pytest.mark.slow
def test_bench_e2e_fails_loudly_on_a_wrong_step(tmp_path, monkeypatch):
    bench = _load("bench_e2e")
    step_fn = bench.step_fn

    def wrong_step_fn(model, act, attention, *rest):
        step = step_fn(model, act, attention, *rest)
        if act is None or os.environ.get("JQUANT_BACKEND") == "xla":
            return step  # bf16, and every reference step, stay right
        return jax.jit(lambda *a: step(*a) * 1.2)

    monkeypatch.setattr(bench, "step_fn", wrong_step_fn)
    result = bench.main(
        ["--tiny", "--variants", "bf16,w8a8", "--text-len", "8", "--out-dir", str(tmp_path), "--profile"]
    )
    assert result["failures"] == 1
    record = json.loads(next(tmp_path.glob("e2e-tiny-*.json")).read_text())
    _meta_ok(record)
    rows = {r["variant"]: r for r in record["rows"]}
    assert rows["w8a8"]["status"] == "FAIL" and "time_ms" not in rows["w8a8"]
    assert rows["bf16"]["status"] == "PASS" and len(rows["bf16"]["times_ms"]) >= 10
    assert 0 < rows["bf16"]["time_ms_min"] <= rows["bf16"]["time_ms"]
    # Each phase's seconds, in order, so a variant cut by a time limit shows where it was.
    assert list(rows["bf16"]["phases_s"]) == [
        "quantized weights",
        "compiled",
        "first run",
        "kernels-off reference compiled",
        "kernels-off reference ran",
        "timed",
        "profiled",
    ]
    assert rows["bf16"]["profile"]["steps"] == 2  # a trace table (empty on the CPU: no device streams)
    assert all(v >= 0 for v in rows["bf16"]["phases_s"].values())
    assert "timed" not in rows["w8a8"]["phases_s"]  # a failed check stops before timing


def test_bench_e2e_quarot_variants_are_exact_rewrites():
    """The QuaRot variants' rotated float model (full width; block 128 with the O projection's
    rotation offline only) computes the float step within fp32 rounding before it is quantized."""
    bench = _load("bench_e2e")
    cfg = dataclasses.replace(bench.TINY_CONFIG, num_layers=1)
    import jquant.nn  # pylint: disable=import-outside-toplevel
    from jquant import models  # pylint: disable=import-outside-toplevel

    params = jax.tree_util.tree_map(jnp.asarray, bench.wan_forward.synthetic_params(cfg, 0))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    roles = models.layer_roles(cfg, params)
    model = bench.wan.PORT.module(cfg, dtype=jnp.float32).clone(attention_impl="xla")
    shape = bench.wan_forward.latent_shape(cfg, 5, 32, 48)
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    t, text = jnp.array([500.0]), jax.random.normal(jax.random.key(1), (1, 8, cfg.text_dim))
    # each forward jitted (traced inside its context), not compiled op by op
    ref = jax.jit(model.apply)({"params": params}, x, t, text)
    for plan in ({}, bench.QUAROT_B128):
        v = bench.rotated(params, roles, cfg.attention_head_dim, plan)
        assert "jquant" in v  # the online rotations are aux entries
        with jquant.nn.quantized():
            out = jax.jit(model.apply)(v, x, t, text)
        err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        assert err < 1e-5, (plan, err)
    assert bench.VARIANTS["w8a8-quarot-b128-ffnblock"]["weights"].name == "int8-ffn-b128x128"


def _emulated_cudnn_fp8(q8, k8, v8, scales, *, sm_scale=None):
    """cuDNN's FP8 forward as its emulation computes it, on the codes: a CPU stand-in."""
    from pallas_kernels import attention_ref as ar  # pylint: disable=import-outside-toplevel

    deq = [x.astype(jnp.float32) * scales[f"descale_{n}"] for n, x in zip("qkv", (q8, k8, v8))]
    out = ar.per_tensor_fp8_attention(*deq, scales=scales, sm_scale=sm_scale)
    return (out / scales["descale_o"]).astype(jnp.float8_e4m3fn)


@pytest.mark.parametrize("wrong", [False, True])
def test_bench_attention_cudnn_fp8_row_is_checked(tmp_path, monkeypatch, wrong):
    """The cuDNN FP8 baseline row (a CPU stand-in for the private cuDNN call): quantized with
    per-tensor scales, its e4m3 output decoded and checked against the emulation; a stand-in
    10% off fails the row; speedups against it appear on the rows after it."""
    bench = _load("bench_attention")
    factor = 1.1 if wrong else 1.0

    def stand_in(*args, **kwargs):
        return (_emulated_cudnn_fp8(*args, **kwargs).astype(jnp.float32) * factor).astype(jnp.float8_e4m3fn)

    monkeypatch.setattr(bench.cudnn_fp8, "unavailable_reason", lambda: None)
    monkeypatch.setattr(bench.cudnn_fp8, "cudnn_fp8_attention", stand_in)
    rc = bench.main(["--tiny", "--variants", "cudnn-fp8,kernel-int8-bf16", "--out-dir", str(tmp_path)])
    record = json.loads(next(tmp_path.glob("attention-*-tiny.json")).read_text())
    rows = {r["variant"]: r for r in record["rows"]}
    if wrong:
        assert rc == 1 and rows["cudnn-fp8"]["status"] == "FAIL" and "us" not in rows["cudnn-fp8"]
        assert "speedup_vs_cudnn_fp8" not in rows["kernel-int8-bf16"]
        return
    assert rc == 0, rows
    fp8 = rows["cudnn-fp8"]
    assert fp8["status"] == "PASS" and fp8["check"]["rel"] < 8e-2
    kernel = rows["kernel-int8-bf16"]
    assert kernel["cudnn_fp8_us"] == fp8["us"] and kernel["cudnn_fp8_us_min"] == fp8["us_min"]
    assert kernel["speedup_vs_cudnn_fp8"] == pytest.approx(fp8["us"] / kernel["us"])
    assert kernel["speedup_vs_cudnn_fp8_min"] == pytest.approx(fp8["us_min"] / kernel["us_min"])


def test_bench_attention_cudnn_fp8_skipped_where_unavailable(tmp_path, capsys):
    bench = _load("bench_attention")
    rc = bench.main(["--tiny", "--variants", "cudnn-fp8,xla", "--out-dir", str(tmp_path)])
    assert rc == 0
    assert "cudnn-fp8 skipped: no GPU" in capsys.readouterr().out
    record = json.loads(next(tmp_path.glob("attention-*-tiny.json")).read_text())
    assert [r["variant"] for r in record["rows"]] == ["xla"]


def test_bench_attention_prep_breakdown_rows(tmp_path, monkeypatch):
    """--prep-breakdown records each kernel of the operand pass (CUPTI stubbed off the GPU) and the
    single-pass floor; an error in one variant is an ERROR row and exit 1."""
    bench = _load("bench_attention")
    fake = [{"kernel": "fusion_1", "launches": 1, "us": 30.0, "us_min": 29.0}]

    def breakdown(fn, args, iterations=10):
        jax.block_until_ready(jax.jit(fn)(*args))  # the operand pass itself must run
        return fake

    monkeypatch.setattr(bench.timing, "kernel_breakdown", breakdown)
    monkeypatch.setattr(bench.timing, "copy_bandwidth", lambda: 4000.0)
    rc = bench.main(["--tiny", "--prep-breakdown", "--variants", "kernel-int8-fp8,xla", "--out-dir", str(tmp_path)])
    assert rc == 0
    record = json.loads(next(tmp_path.glob("attention-prep-*.json")).read_text())
    (row,) = record["rows"]
    assert row["variant"] == "kernel-int8-fp8" and row["kernels"] == fake and row["us"] == 30.0
    elems = 2 * 256 * 128
    assert row["one_pass_bytes"] == 9 * elems + 8 * 256 * 2
    assert row["one_pass_us"] == pytest.approx(row["one_pass_bytes"] / 4000.0 / 1e3)


def test_bench_e2e_cudnn_fp8_step_routes_every_unmasked_call(monkeypatch):
    """The cuDNN FP8 step variants (a CPU stand-in for the private cuDNN call): every attention of
    the tiny Wan step goes through per-tensor e4m3 codes, the step stays within the FP8 rounding
    of the float step, and with the kernels forced off (the reference) the float path runs."""
    bench = _load("bench_e2e")
    calls = []

    def stand_in(*args, **kwargs):
        calls.append(args[0].shape)
        return _emulated_cudnn_fp8(*args, **kwargs)

    monkeypatch.setattr(bench.cudnn_fp8, "cudnn_fp8_attention", stand_in)
    cfg = dataclasses.replace(bench.TINY_CONFIG, num_layers=2)
    params = jax.tree_util.tree_map(jnp.asarray, bench.wan_forward.synthetic_params(cfg, 0))
    model = bench.wan.PORT.module(cfg, dtype=jnp.bfloat16).clone(attention_impl="xla")
    shape = bench.wan_forward.latent_shape(cfg, 5, 32, 48)
    x = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
    t, text = jnp.array([500.0]), jax.random.normal(jax.random.key(1), (1, 8, cfg.text_dim), jnp.bfloat16)
    variables = {"params": params}
    ref = bench.step_fn(model, None, None)(variables, x, t, text).astype(jnp.float32)
    out = bench.step_fn(model, None, None, float_attention="cudnn-fp8")(variables, x, t, text).astype(jnp.float32)
    assert len(calls) == 2 * cfg.num_layers  # self- and cross-attention of every block
    err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 0 < err < 5e-2, err
    calls.clear()
    monkeypatch.setenv(bench._common.FORCE_ENV, "xla")  # the reference step: the emulation, chunked
    forced = bench.step_fn(model, None, None, float_attention="cudnn-fp8")(variables, x, t, text)
    assert not calls
    chex.assert_trees_all_close(forced.astype(jnp.float32), out, atol=2e-2, rtol=2e-2)
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 40, 2, 64), jnp.bfloat16) for i in range(3))
    whole = bench.cudnn_fp8.ref.per_tensor_fp8_attention(q, k, v)
    chex.assert_trees_all_close(bench.per_tensor_fp8_reference(q, k, v, chunk=16), whole.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="float_attention='fa3'"):
        bench.step_fn(model, None, None, float_attention="fa3")
    assert bench.VARIANTS["w8a8-token-fused-cudnn-fp8"]["float_attention"] == "cudnn-fp8"


@pytest.mark.parametrize("factor", [1.0, 0.6])
def test_bench_e2e_cudnn_fp8_row_is_checked_against_exact_and_emulated_steps(monkeypatch, factor):
    """A cuDNN FP8 step row (a CPU stand-in for the private call) passes when its step is as far
    from the exact-attention step as the emulated one is, and fails when the attention it
    computes is off (outputs 0.6x what they should be): the check sees both references."""
    bench = _load("bench_e2e")
    monkeypatch.setattr(bench.cudnn_fp8, "unavailable_reason", lambda: None)
    monkeypatch.setattr(
        bench.cudnn_fp8,
        "cudnn_fp8_attention",
        lambda *a, **k: (_emulated_cudnn_fp8(*a, **k).astype(jnp.float32) * factor).astype(jnp.float8_e4m3fn),
    )
    cfg = dataclasses.replace(bench.TINY_CONFIG, num_layers=1)
    params = jax.tree_util.tree_map(jnp.asarray, bench.wan_forward.synthetic_params(cfg, 0))
    model = bench.wan.PORT.module(cfg, dtype=jnp.bfloat16).clone(attention_impl="xla")
    shape = bench.wan_forward.latent_shape(cfg, 5, 32, 48)
    inputs = (
        jax.random.normal(jax.random.key(0), shape, jnp.bfloat16),
        jnp.array([500.0]),
        jax.random.normal(jax.random.key(1), (1, 8, cfg.text_dim), jnp.bfloat16),
    )
    args = argparse.Namespace(rel_tol=5e-2, warmup=0, runs=10, profile=False, seed=0)
    row = bench.time_variant("bf16-cudnn-fp8", model, params, {}, inputs, args)
    check = row["check"]
    assert 0 < check["rel_emulated"] < 0.1 and check["rel_vs_emulated"] >= 0
    assert check["ok"] == (factor == 1.0), check["detail"]
    assert row["status"] == ("PASS" if factor == 1.0 else "FAIL")
    assert ("time_ms" in row) == (factor == 1.0)


def test_attention_call_errors_tiny_rows(tmp_path):
    """The per-call probe on the tiny Wan step (CPU): one row per attention call with every
    implementation's error against exact attention, the float path near exact and the per-tensor
    FP8 emulation further off; the JSON carries the run's metadata and the per-kind summary."""
    probe = _load("attention_call_errors")
    result = probe.main(["--tiny", "--out-dir", str(tmp_path)])
    _meta_ok(result)
    rows = result["rows"]
    assert len(rows) == 2 * probe.bench_e2e.TINY_CONFIG.num_layers
    assert [r["module"].split("/")[-1] for r in rows[:2]] == ["attn1", "attn2"]
    for r in rows:
        errs = r["rel_vs_exact"]
        assert set(errs) == {"float", "fp8_emulated", "jquant_default"}
        assert errs["float"] < 1e-2 and errs["jquant_default"] < 2e-2
        assert errs["fp8_emulated"] > 3 * errs["float"]
        assert r["amax"]["q"] > 0
    assert set(result["summary"]) == {"self", "cross"}
    assert (tmp_path / "attention_call_errors-tiny-cpu.json").exists()


def test_attention_call_errors_compares_cudnn_with_its_emulation():
    """With a cuDNN FP8 implementation present (a CPU stand-in: the emulation with its output
    scaled by 1.1) the row carries cuDNN against the emulation, and the stand-in's 10% shows."""
    probe = _load("attention_call_errors")
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 64, 2, 64), jnp.bfloat16) for i in range(3))
    emulated = jax.jit(probe.bench_e2e.per_tensor_fp8_reference)
    impls = {"fp8_emulated": emulated, "cudnn_fp8": lambda q, k, v: emulated(q, k, v) * 1.1}
    row = probe.call_row(0, q, k, v, None, impls)
    assert row["cudnn_fp8_vs_emulated"] == pytest.approx(0.1, rel=0.05)
    assert row["tq"] == row["tk"] == 64 and not row["masked"]
    masked = probe.call_row(1, q, k, v, jnp.ones((1, 1, 64, 64), bool), impls)
    assert masked["masked"] and "rel_vs_exact" not in masked


def _interpreted_producer(monkeypatch, bench, corrupt: bool = False):
    """The norm producer in Pallas's interpreter as the bench's GPU kernel (``corrupt``: its codes
    negated, a wrong kernel)."""
    real = bench.norm_quant.norm_modulate_quantize_pallas

    def interpreted(*args, **kwargs):
        codes, scales = real(*args, interpret=True, **kwargs)
        return (-codes if corrupt else codes), scales

    monkeypatch.setattr(bench.norm_quant, "supports", lambda *a, **k: True)
    monkeypatch.setattr(bench.norm_quant, "norm_modulate_quantize_pallas", interpreted)
    monkeypatch.setattr(bench, "PRODUCER_CONFIGS", bench.PRODUCER_CONFIGS[-2:])  # 16 rows: >= 16 chunks at K=256


@pytest.mark.parametrize("corrupt", [False, True])
def test_bench_linear_path_producer_columns(monkeypatch, corrupt):
    """Issue 26's producer-fed linear (norm producer + GEMM on its codes) against norm + bf16: every
    column checked before it is timed, a wrong producer caught; the producer's programs give the
    default program's codes."""
    monkeypatch.setenv("BENCH_M", "64")
    bench = _load("bench_linear_path")
    _interpreted_producer(monkeypatch, bench, corrupt)
    k, n = 256, 128
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (bench.M, k), jnp.bfloat16)
    w = jax.random.normal(kw, (k, n), jnp.float32) * 0.02
    act = bench.parse_spec("int8/token")
    sets = [(x, w.astype(jnp.bfloat16), bench.quantize(w, bench.parse_spec("int8")))]
    q4 = [(x, bench.quantize(w, bench.parse_spec("int4")))]
    out, wrong = bench.producer_columns(k, sets, q4, act)
    if corrupt:
        assert wrong == 4 and not out["producer_w8a8_check"]["ok"] and "producer_w8a8_us" not in out
        return
    assert wrong == 0 and out["norm_bf16_us"] > 0
    for label in ("w8a8", "w8a8_block128", "w4a8", "w4a8_block128"):
        assert out[f"producer_{label}_check"]["ok"], label
        assert out[f"producer_{label}_check"]["rel_l2"] < 2e-2
        assert out[f"producer_{label}_speedup_vs_norm_bf16"] > 0
    assert all("us" in c for c in out["producer_block_configs"].values()), out["producer_block_configs"]


def test_attention_call_errors_coherence_rows(tmp_path):
    """``--coherence``: synthetic calls with V sharing a direction; each row has every
    implementation, jquant's e4m3 P V kernel path and the truncating-accumulator model."""
    probe = _load("attention_call_errors")
    result = probe.main(["--tiny", "--coherence", "0,3", "--out-dir", str(tmp_path)])
    rows = result["coherence_rows"]
    assert [r["coherence"] for r in rows] == [0.0, 3.0] and result["rows"] == []
    for r in rows:
        assert {"float", "fp8_emulated", "jquant_default", "jquant_fp8_pv", "truncating_model"} <= set(
            r["rel_vs_exact"]
        )
        assert r["rel_vs_exact"]["float"] < 1e-2 and r["rel_vs_exact"]["truncating_model"] < 0.2
    assert (tmp_path / "attention_call_errors-tiny-coherence-cpu.json").exists()


def test_truncating_accumulation_model():
    """The fp8 MMA accumulator model: exact where every addend fits its bits, and it loses the
    small products of a long sum with a large common part (the sum shrinks)."""
    ar = _load("attention_call_errors").attention_ref
    p = jnp.ones((1, 64), jnp.float32)
    v = jnp.ones((64, 4), jnp.float32)
    chex.assert_trees_all_close(ar.truncating_accumulation(p, v), jnp.full((1, 4), 64.0))
    v_big = jnp.full((4096, 1), 1.0).at[0, 0].set(2.0**20)
    p_big = jnp.ones((1, 4096), jnp.float32)
    out = float(ar.truncating_accumulation(p_big, v_big, bits=13)[0, 0])
    assert out == 2.0**20  # every later 1.0 is below the 2^7 grid of a 2^20 sum: truncated away
    with pytest.raises(ValueError, match="multiple of 32"):
        ar.truncating_accumulation(jnp.ones((1, 40)), jnp.ones((40, 2)))


def test_bench_attention_layout_options_set_unpadded_for_total_rows_only():
    """-unp / -pad pin quant_attention's V / output layout (a same-run A/B of
    pa.UNPADDED_DEFAULT); kernel rows take pre-quantized operands and have no such choice."""
    bench = _load("bench_attention")
    assert bench.parse_variant("total-int8-bf16-kblock-had-unp", 128)[3].unpadded is True
    assert bench.parse_variant("total-int8-bf16-kblock-had-pad", 128)[3].unpadded is False
    with pytest.raises(ValueError, match="unp"):
        bench.parse_variant("kernel-int8-bf16-unp", 128)
