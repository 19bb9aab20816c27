"""The trained outlier testbed on the CPU before real weights exist: `shapes_bundle` over a
randomly initialised `--quick` shapes model folder (written with scripts/train_outlier_model.py's
own configs and writers, no training steps), its workload, the float sampler, the judge-less
evaluation, and scripts/outlier_testbed.py's trained testbed with the JSON merge."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _scripts import load_script, unload_script
from test_train_outlier_model import _script as train_script

from jquant import models
from jquant.models import shapes_data as sd
from jquant.models import shapes_model as sm
from jquant.pipeline import evaluate as E
from jquant.pipeline.denoiser import (
    SHAPES_SAMPLING,
    shapes_bundle,
    shapes_caption_attributes,
    shapes_caption_index,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "W8A8 RTN"


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """A `--quick` shapes model folder with seeded random weights (bf16, as the trainer saves)."""
    script = train_script()
    te_cfg = script.text_config(True)
    tr_cfg = script.transformer_config(True, te_cfg.d_model)
    params = script.to_weights(script.init_params(te_cfg, tr_cfg, jax.random.key(0)))
    out = tmp_path_factory.mktemp("shapes_model")
    models.save_pretrained(out / sm.TRANSFORMER_DIR, tr_cfg, params["transformer"], overwrite=True)
    sm.save_text_encoder(out / sm.TEXT_ENCODER_DIR, te_cfg, params["text_encoder"])
    sm.save_tokenizer(out / sm.TOKENIZER_DIR, script.TEXT_LEN)
    meta = {"data": dataclasses.asdict(script.data_config(True)), "text_len": script.TEXT_LEN, "commit": "fixture"}
    (out / sm.META_NAME).write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def testbed():
    module = load_script("outlier_testbed")
    yield module
    unload_script(module)


def test_caption_enumeration_visits_every_combination_and_varies_every_attribute() -> None:
    attrs = shapes_caption_attributes(np.arange(288))
    assert len({tuple(r) for r in attrs}) == 288
    np.testing.assert_array_equal(shapes_caption_attributes(np.arange(288, 300)), attrs[:12])  # cycles
    assert np.all(attrs[1:] != attrs[:-1])  # consecutive captions differ in every attribute
    for row, k in zip(attrs, shapes_caption_index(attrs)):
        o, c, m, d = row
        assert k == o + 4 * (c + 6 * (m + 3 * d))


def test_shapes_bundle_workload_and_float_sampling(shapes_dir: Path) -> None:
    b = shapes_bundle(shapes_dir, num_steps=2)
    assert b is shapes_bundle(shapes_dir, num_steps=2)  # cached: compiled samplers are reused
    den = b.denoiser
    assert den.num_steps == 2 and den.sampler == "flow"
    assert (den.shift, den.guidance_scale) == (SHAPES_SAMPLING["shift"], SHAPES_SAMPLING["guidance_scale"])
    assert shapes_bundle(shapes_dir).denoiser.num_steps == SHAPES_SAMPLING["num_steps"]
    assert {r for roles in b.roles.values() for r in roles} >= {"attn.qkv", "ffn.up", "ffn.down"}

    w, again, later = b.workload(2, 7), b.workload(2, 7), b.workload(2, 7, start=1)
    np.testing.assert_array_equal(np.asarray(w.x_T), np.asarray(again.x_T))
    np.testing.assert_array_equal(np.asarray(w.cond), np.asarray(again.cond))
    assert w.labels == again.labels and later.labels[0] == w.labels[1]
    assert w.x_T.shape == b.extra["shapes"].latent_shape(2)
    captions = sd.captions(shapes_caption_attributes(np.arange(2)))
    np.testing.assert_allclose(np.asarray(w.cond), np.asarray(b.extra["shapes"].text(captions)))
    assert not np.allclose(np.asarray(w.cond[0]), np.asarray(w.cond[1]))  # different captions
    assert not np.allclose(np.asarray(w.x_T), np.asarray(b.workload(2, 8).x_T))

    ref = E.reference(b, w)
    data = b.extra["shapes"].data
    assert ref.videos.shape == (2, data.frames, data.size, data.size, 3) and ref.data_range == 1.0
    assert float(jnp.min(ref.videos)) >= 0.0 and float(jnp.max(ref.videos)) <= 1.0
    assert ref.trajectory.shape[0] == 3 and bool(jnp.all(jnp.isfinite(ref.trajectory)))


def test_outlier_testbed_trained_row_and_merge(shapes_dir: Path, testbed, tmp_path: Path) -> None:
    out = tmp_path / "testbed.json"
    tiny_row = {"method": RECIPE, "psnr": 31.21, "ssim": 0.9, "flicker": 0.01, "one_step": 0.0748, "seconds": 1.0}
    legacy = {
        "device": "cpu (old)",
        "settings": {"clips": 16},
        "testbeds": {"tiny": {"report": {}, "rows": [tiny_row]}},
    }
    out.write_text(json.dumps(legacy))
    argv = ["--testbeds", "trained", "--trained-dir", str(shapes_dir), "--clips", "1", "--calib-samples", "1"]
    assert testbed.main([*argv, "--steps", "2", "--recipes", RECIPE, "--json", str(out)]) == 0

    res = json.loads(out.read_text())
    assert res["testbeds"]["tiny"]["rows"] == [tiny_row]  # the other testbed's rows survive
    assert res["testbeds"]["tiny"]["run"]["device"] == "cpu (old)"  # and keep their own record
    trained = res["testbeds"]["trained"]
    (row,) = trained["rows"]
    assert row["method"] == RECIPE and np.isfinite(row["psnr"]) and np.isfinite(row["one_step"])
    assert trained["report"]["max_ratio"] >= trained["report"]["median_ratio"] >= 1.0
    run = trained["run"]
    assert run["backend"] == jax.default_backend() and run["jax"] == jax.__version__
    assert run["commit"] and run["date"] and run["device_kind"]
    assert run["settings"] == {"clips": 1, "calib_samples": 1, "steps": 2, "seed": 0}
    assert run["model"]["dir"] == str(shapes_dir) and run["model"]["commit"] == "fixture"
    table = testbed.markdown(res)
    assert "tiny PSNR" in table and "trained PSNR | trained 1-step" in table
    assert f"| {RECIPE} | 31.21 | 0.0748 | {row['psnr']:.2f} | {row['one_step']:.4f} |" in table


def test_merge_rows_replaces_by_method_and_keeps_recipe_order(testbed) -> None:
    order = list(testbed.recipes())
    old = [{"method": order[3], "psnr": 1.0}, {"method": order[0], "psnr": 2.0}]
    new = [{"method": order[3], "psnr": 5.0}, {"method": order[1], "psnr": 6.0}]
    merged = testbed.merge_rows(old, new, order)
    assert [(r["method"], r["psnr"]) for r in merged] == [(order[0], 2.0), (order[1], 6.0), (order[3], 5.0)]


def test_trained_testbed_without_a_model_folder_names_it(testbed, tmp_path: Path) -> None:
    missing = tmp_path / "no_model"
    with pytest.raises(SystemExit, match=str(missing)):
        testbed.main(["--testbeds", "trained", "--trained-dir", str(missing), "--json", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="choose from tiny,stress,trained"):
        testbed.main(["--testbeds", "tiny,big"])
    assert not (tmp_path / "x.json").exists()
