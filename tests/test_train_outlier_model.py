"""scripts/train_outlier_model.py --quick: the saved folder loads, the log holds the outlier
statistics at every report, the weights are bf16, and the same seed gives the same weights."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from jquant.models import shapes_model as sm

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


def _script():
    name = "train_outlier_model"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for rel in WEIGHTS:
        with safe_open(folder / rel, "np") as f:
            out.update({f"{rel}:{k}": f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.slow
def test_quick_run_saves_a_loadable_bf16_model_with_outlier_log_and_is_deterministic(tmp_path):
    script = _script()
    a, b = tmp_path / "a", tmp_path / "b"
    assert script.main(["--quick", "--out", str(a), "--seed", "3"]) == 0

    model = sm.load_shapes_model(a)
    text = model.text(["a red circle moves left", "a blue cross spins up"])
    assert text.shape == (2, model.text_len, model.text_encoder.config.d_model)
    assert float(jnp.abs(text[:, 6:]).max()) == 0.0  # zero past the caption's 6 tokens
    x = jnp.zeros(model.latent_shape(2))
    v = jax.jit(model.model.apply)({"params": model.params}, x, jnp.full((2,), 500.0), text)  # not op by op
    assert v.shape == x.shape and bool(jnp.all(jnp.isfinite(v)))

    with safe_open(a / WEIGHTS[0], "np") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    with safe_open(a / WEIGHTS[1], "np") as f:
        dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}

    lines = [json.loads(line) for line in (a / sm.LOG_NAME).read_text().splitlines()]
    assert [e["step"] for e in lines] == [0, 10, 20, 30]
    assert all(np.isfinite(e["loss"]) for e in lines[1:])
    for e in lines:
        for part, want in (
            ("transformer", {"attn.qkv", "ffn.up", "ffn.down"}),
            ("text_encoder", {"attn.qkv", "ffn.up"}),
        ):
            rep = e[part]
            assert want <= {r["role"] for r in rep["roles"]}, (part, rep["roles"])
            for r in rep["roles"]:
                assert 1.0 <= r["median_ratio"] <= r["max_ratio"] and np.isfinite(r["median_kurtosis"])
            assert rep["residual"]["blocks"] and rep["residual"]["max_ratio"] >= 1.0
    meta = json.loads((a / sm.META_NAME).read_text())
    assert meta["seed"] == 3 and meta["commit"] and "--steps 30" in meta["command"]
    assert meta["outliers"]["final"]["transformer"]["max_ratio"] == lines[-1]["transformer"]["max_ratio"]

    assert script.main(["--quick", "--out", str(b), "--seed", "3"]) == 0
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


def test_flat_drawn_noise_is_jax_random_normal_bit_for_bit():
    # The report's noise and train_tiny's sampling noise are drawn flat and reshaped (a 5-D
    # threefry draw compiles ~20x slower on the CPU): the numbers must be the shaped draw's.
    key = jax.random.key(11)
    got = _script().train_tiny.normal(key, (3, 4, 5))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.random.normal(key, (3, 4, 5))))
