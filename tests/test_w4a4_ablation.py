"""scripts/w4a4_ablation.py's float-activation ablation on a tiny tree (the GPU-free part that
decides what the measurement means)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from _scripts import load_script, unload_script

from jquant.pipeline.runtime import QuantizedModel
from jquant.qarray import QArray, dequantize, quantize


def test_float_activations_decode_only_the_chosen_group():
    mod = load_script("w4a4_ablation")
    try:
        w = jax.random.normal(jax.random.key(0), (64, 32), jnp.float32)
        q = quantize(w, "int4/g64")
        params = {f"blocks_{i}": {"ffn": {"kernel": q}, "attn": {"kernel": q, "bias": jnp.ones(32)}} for i in range(2)}
        qm = QuantizedModel({"params": params}, "int4/token")
        assert mod.quantized_groups(qm) == ["blocks_*/attn/kernel", "blocks_*/ffn/kernel"]
        out = mod.with_float_acts(qm, {"blocks_*/ffn/kernel"}).params
        for i in range(2):
            leaf = out[f"blocks_{i}"]["ffn"]["kernel"]
            assert not isinstance(leaf, QArray)
            chex.assert_trees_all_equal(leaf, dequantize(q))  # the same 4-bit values, in float
            assert isinstance(out[f"blocks_{i}"]["attn"]["kernel"], QArray)
        assert qm.params["blocks_0"]["ffn"]["kernel"] is q  # the input model is left as it was
    finally:
        unload_script(mod)


def test_docs_quote_the_json():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    record = json.loads((root / "benchmarks" / "w4a4_ablation.json").read_text())
    text = (root / "docs" / "training.md").read_text()
    section = text[text.index("### Where W4A4's error comes from") :]
    assert f"commit {record['commit'][:7]}" in section
    for r in record["granularity"]:
        assert f"| {r['psnr']:.2f} | {r['ssim']:.3f} | {r['one_step']:.4f} |" in section, r
    by = {r["float_acts"]: r["one_step"] for r in record["float_groups"]}
    for name in ("(none)", "blocks_*/ffn/net_0/proj/kernel", "blocks_*/ffn/net_2/kernel", "(all)"):
        assert f"| {by[name]:.4f} |" in section, name


def test_docs_quote_the_mixed_policies():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    record = json.loads((root / "benchmarks" / "w4a4_ablation.json").read_text())
    section = (root / "docs" / "training.md").read_text().split("**Mixed precision**")[1]
    assert len(record["mixed"]) == 3
    for r in record["mixed"]:
        assert f"| {r['policy']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['one_step']:.4f} |" in section, r
