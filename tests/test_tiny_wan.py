"""The bundled tiny Wan model: its data renderer, loader, classifier, and the --quick training run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jquant import models
from jquant.models import tiny_wan as tw

ROOT = Path(__file__).resolve().parents[1]
# One compiled forward instead of one eager compile per op of the model (~100 small programs).
velocity = jax.jit(tw.velocity, static_argnums=0)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), label=st.integers(0, 9))
def test_render_clips_keep_the_whole_digit_on_canvas(seed, label):
    cfg = tw.DataConfig()
    clips = np.asarray(tw.render_clips(jax.random.key(seed), jnp.array([label]), cfg))
    assert clips.shape == (1, cfg.frames, cfg.size, cfg.size)
    assert clips.min() >= 0.0 and clips.max() <= 1.0
    # Bouncing keeps the glyph inside, and bilinear shifts conserve ink: every frame holds the same mass.
    mass = clips[0].sum(axis=(1, 2))
    ink = tw.glyphs(cfg.glyph_scale)[label].sum()
    np.testing.assert_allclose(mass, mass[0], rtol=1e-4)
    assert cfg.min_ink * ink - 1e-3 <= mass[0] <= ink + 1e-3


def test_glyphs_are_distinct_and_bad_configs_fail():
    g = tw.glyphs(1).reshape(10, -1)
    assert len({row.tobytes() for row in g}) == 10
    with pytest.raises(ValueError, match="glyph size"):
        tw.DataConfig(size=12)
    with pytest.raises(ValueError, match="min_speed"):
        tw.DataConfig(min_speed=2.0, max_speed=1.0)


def test_bundled_model_loads_and_classifier_reads_real_clips():
    bundle = tw.load_tiny()
    assert bundle.config.num_layers == 6 and bundle.config.in_channels == 1
    assert sum(f.stat().st_size for f in tw.ASSET_DIR.iterdir()) < 20e6
    labels = jnp.arange(20) % 10
    clips = tw.render_clips(jax.random.key(123), labels, bundle.data)
    assert tw.sample_accuracy(bundle.classifier, bundle.classifier_params, clips, labels) >= 0.95
    x = tw.clips_to_latents(clips[:2])
    v = velocity(bundle.model, bundle.params, x, 500.0, bundle.text(labels[:2]))
    assert v.shape == x.shape and bool(jnp.all(jnp.isfinite(v)))
    np.testing.assert_allclose(tw.latents_to_clips(x), clips[:2], atol=1e-6)


def test_load_tiny_errors_name_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny_wan.json"):
        tw.load_tiny(tmp_path)
    with pytest.raises(FileNotFoundError, match="classifier"):
        tw.load_classifier(tmp_path)


def _train_tiny_module():
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "scripts" / "train_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the script loads
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_train_tiny_quick_writes_a_loadable_diffusers_directory(tmp_path):
    out, report = tmp_path / "tiny", tmp_path / "report.json"
    assert _train_tiny_module().main(["--quick", "--out", str(out), "--report", str(report)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "WanTransformer3DModel"
    model, params = models.load_pretrained(out)
    bundle = tw.load_tiny(out)
    assert bundle.class_embeddings.shape == (10, 4, config["text_dim"])
    assert not np.any(np.asarray(bundle.null_embedding))
    x = jnp.zeros(bundle.latent_shape(1))
    assert velocity(model, params, x, 1000.0, bundle.text(jnp.array([3]))).shape == x.shape
    rep = json.loads(report.read_text())
    assert rep["quick"] and rep["training"]["steps"] == 50
    assert np.isfinite(rep["training"]["final_loss"]) and rep["training"]["final_loss"] < rep["training"]["first_loss"]
    assert 0.0 <= rep["sample_accuracy"]["accuracy"] <= 1.0
