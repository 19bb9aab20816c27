"""The three fidelity testbeds (issue 25, docs/results.md "Three testbeds") as ModelBundles.

* ``tiny``: the bundled tiny Wan as trained (almost no activation outliers);
* ``stress``: the same model with outlier channels planted function-preservingly
  (:func:`jquant.algorithms.outliers.inject_outliers`; the float output is unchanged);
* ``trained``: the second bundled model, a text-conditioned Wan trained on the H200
  (``jquant/models/assets/shapes_model``, :func:`jquant.pipeline.denoiser.shapes_bundle`).

``scripts/outlier_testbed.py`` and ``scripts/pipeline_results.py --testbed`` build their
bundles here, so every table compares the same three models.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jquant.algorithms import outliers as inj
from jquant.models import shapes_model as sm
from jquant.models import tiny_wan as tw
from jquant.pipeline.denoiser import ModelBundle, shapes_bundle, tiny_wan_bundle

TESTBEDS = ("tiny", "stress", "trained")
DEFAULT_TRAINED_DIR = tw.ASSET_DIR.parent / "shapes_model"


def check_trained_dir(path: Path) -> None:
    """Exit naming the trained model's folder when it holds no shapes model."""
    if not (Path(path) / sm.META_NAME).is_file():
        raise SystemExit(
            f"--trained-dir: {path} holds no trained shapes model ({sm.META_NAME} missing); train it with "
            f"`python scripts/train_outlier_model.py --out {path}` or pass --trained-dir DIR"
        )


def build_testbed(
    name: str,
    steps: int | None = None,
    trained_dir: Path = DEFAULT_TRAINED_DIR,
    stress_cfg: inj.OutlierConfig = inj.OutlierConfig(),
) -> ModelBundle:
    """The bundle of testbed ``name`` at ``steps`` denoising steps (None: the model's default)."""
    if name not in TESTBEDS:
        raise ValueError(f"testbed: unknown {name!r}; choose from {list(TESTBEDS)}")
    if name == "trained":
        check_trained_dir(Path(trained_dir))
        return shapes_bundle(trained_dir, num_steps=steps)
    base = tiny_wan_bundle(num_steps=steps)
    if name == "stress":
        return dataclasses.replace(base, params=inj.inject_outliers(base.params, stress_cfg)[0])
    return base
