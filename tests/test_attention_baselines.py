"""The per-tensor FP8 attention baseline: cuDNN's numerics emulated, its guarded GPU wrapper, and
the stress inputs and operator-error table that compare it with jquant's fine-grained variants."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _scripts import load_script, unload_script

from pallas_kernels import attention_ref as ar
from pallas_kernels import cudnn_fp8


def _inputs(kind="random", seed=0, tokens=256):
    return ar.sample_inputs(jax.random.key(seed), 1, tokens, tokens, 2, 64, kind=kind)


def test_per_tensor_output_is_on_the_e4m3_grid_and_close_to_exact():
    q, k, v = _inputs()
    out = ar.per_tensor_fp8_attention(q, k, v)
    d_o = ar.per_tensor_fp8_scales(q, k, v)["descale_o"]
    codes = np.asarray(out / d_o, np.float32)
    on_grid = np.asarray(jnp.asarray(codes).astype(jnp.float8_e4m3fn), np.float32)
    np.testing.assert_allclose(codes, on_grid, rtol=1e-6)  # only the division's rounding
    assert np.unique(on_grid).size <= 253
    assert ar.relative_l2(out, ar.exact_attention(q, k, v)) < 0.1


def test_per_tensor_scales_given_as_a_dict_equal_the_mode():
    q, k, v = _inputs(seed=1)
    scales = ar.per_tensor_fp8_scales(q, k, v, "amax")
    chex.assert_trees_all_close(
        ar.per_tensor_fp8_attention(q, k, v, scales=scales), ar.per_tensor_fp8_attention(q, k, v)
    )
    unit = ar.per_tensor_fp8_scales(q, k, v, "unit")
    chex.assert_trees_all_equal(
        {n: unit[n] for n in ("descale_q", "descale_k", "descale_v")},
        dict.fromkeys(("descale_q", "descale_k", "descale_v"), jnp.float32(1.0)),
    )
    with pytest.raises(ValueError, match="scales='tensor'"):
        ar.per_tensor_fp8_scales(q, k, v, "tensor")


@pytest.mark.parametrize("kind", ["realistic", "sharp"])
def test_per_tensor_fp8_loses_to_fine_grained_scales_on_outliers(kind):
    q, k, v = _inputs(kind, seed=2)
    exact = ar.exact_attention(q, k, v)
    per_tensor = ar.relative_l2(ar.per_tensor_fp8_attention(q, k, v), exact)
    jquant = ar.relative_l2(ar.quant_attention_reference(q, k, v, hadamard=True), exact)
    assert jquant < 0.5 * per_tensor, (jquant, per_tensor)


def test_sharp_inputs_concentrate_the_softmax():
    peak = {
        kind: float(jnp.mean(jnp.max(ar.attention_probabilities(*_inputs(kind)[:2]), axis=-1)))
        for kind in ar.INPUT_KINDS
    }
    assert peak["random"] < peak["realistic"] < peak["sharp"], peak
    with pytest.raises(ValueError, match="expected one of"):
        ar.sample_inputs(jax.random.key(0), 1, 4, 4, 1, 64, kind="spiky")


def test_cudnn_fp8_says_why_it_cannot_run_here():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    assert "no GPU" in cudnn_fp8.unavailable_reason()
    (q8, k8, v8), scales = cudnn_fp8.quantize(*_inputs())
    with pytest.raises(RuntimeError, match="cuDNN FP8 attention unavailable: no GPU"):
        cudnn_fp8.cudnn_fp8_attention(q8, k8, v8, scales)


def test_cudnn_fp8_quantize_round_trips_within_e4m3_rounding():
    x = _inputs(seed=3)
    codes, scales = cudnn_fp8.quantize(*x)
    for name, raw, code in zip("qkv", x, codes):
        assert code.dtype == jnp.float8_e4m3fn
        back = code.astype(jnp.float32) * scales[f"descale_{name}"]
        raw = raw.astype(jnp.float32)
        normal = jnp.abs(raw) >= 2.0**-6 * scales[f"descale_{name}"]
        err = jnp.where(normal, jnp.abs(back - raw) / jnp.maximum(jnp.abs(raw), 1e-30), 0.0)
        assert float(jnp.max(err)) <= 2.0**-4, name


@pytest.fixture()
def quality():
    module = load_script("attention_quality")
    yield module
    unload_script(module)


def test_operator_error_table(quality):
    variants = {
        n: f
        for n, f in quality.operator_variants().items()
        if n in ("per-tensor FP8 (cuDNN-style)", "jquant int8/bf16")
    }
    rows = quality.operator_error(128, 2, 64, 1, variants=variants)
    assert {(r["inputs"], r["variant"]) for r in rows} == {(kind, n) for kind in ar.INPUT_KINDS for n in variants}
    err = {(r["inputs"], r["variant"]): r["rel_l2"] for r in rows}
    for kind in ar.INPUT_KINDS:
        assert err[(kind, "jquant int8/bf16")] < err[(kind, "per-tensor FP8 (cuDNN-style)")], kind


def test_a_partial_quality_run_does_not_replace_the_full_table(quality, monkeypatch, tmp_path):
    """--only writes attention_quality_partial.json unless --out names a file; bad names are refused."""
    written = {}
    monkeypatch.setattr(quality, "run", lambda *a, **k: {"rows": [], "psnr_drop_db_x": 0.0})
    monkeypatch.setattr(quality.Path, "write_text", lambda self, text: written.setdefault("path", self))
    monkeypatch.setattr(quality.Path, "mkdir", lambda self, **k: None)
    assert quality.main(["--only", "W8A8 + qattn int8/bf16, K per tile", "--no-operator-error"]) == 0
    assert written["path"].name == "attention_quality_partial.json"
    with pytest.raises(SystemExit):
        quality.main(["--only", "no such recipe", "--no-operator-error"])


def test_operator_only_runs_the_chosen_variants_and_refuses_bad_requests(quality, tmp_path):
    out = tmp_path / "op.json"
    chosen = "jquant int8/bf16, K per tile (the default);int8 Q K^T / P x 255, int8 V, K per tile (emulated)"
    args = ["--operator-only", "--op-tokens", "128", "--op-heads", "1", "--op-seeds", "1"]
    assert quality.main([*args, "--op-variants", chosen, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert "rows" not in record and record["operator_error_shape"]["tokens"] == 128
    assert {r["variant"] for r in record["operator_error"]} == set(chosen.split(";"))
    with pytest.raises(SystemExit):
        quality.main([*args])  # no --out: it must not replace the full table
    with pytest.raises(SystemExit):
        quality.main([*args, "--op-variants", "no such variant", "--out", str(out)])
