"""The second bundled model (issue 25): the shipped weights load, stay within the size budget,
and the outlier statistics docs/outliers.md quotes are the ones its training log recorded."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jquant.models import shapes_model as sm
from jquant.models import tiny_wan as tw

SHIPPED = Path(tw.ASSET_DIR).parent / "shapes_model"
ROOT = Path(__file__).resolve().parents[1]


def test_shipped_model_is_bf16_within_30_mb_and_loads() -> None:
    files = sorted(SHIPPED.rglob("*.safetensors"))
    assert files and sum(f.stat().st_size for f in files) <= 30e6
    for f in files:
        with safe_open(str(f), "np") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"BF16"}, f
    m = sm.load_shapes_model(SHIPPED)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(m.params))
    assert n == m.meta["params"]["transformer"]
    text = m.text(["a red circle moves left", ""])
    assert text.shape[0] == 2 and bool(jnp.all(jnp.isfinite(text)))


def test_meta_outliers_are_the_last_training_report_and_docs_quote_them() -> None:
    meta = json.loads((SHIPPED / sm.META_NAME).read_text())
    lines = [json.loads(x) for x in (SHIPPED / meta["outliers"]["log"]).read_text().splitlines() if x.strip()]
    last = lines[-1]
    assert last["step"] == meta["training"]["steps"]
    for part in ("transformer", "text_encoder"):
        assert meta["outliers"]["final"][part]["max_ratio"] == last[part]["max_ratio"]
    doc = (ROOT / "docs" / "outliers.md").read_text()
    assert f"{meta['outliers']['final']['transformer']['max_ratio']:.1f}" in doc
    assert f"{meta['outliers']['final']['transformer']['residual_max_ratio']:.1f}" in doc
