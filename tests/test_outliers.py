"""The outlier report (jquant.metrics.outliers) on constructed inputs with known outliers, and the
function-preserving outlier injection (jquant.algorithms.outliers) on the bundled tiny Wan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import calib
from jquant.algorithms import outliers as inj
from jquant.metrics import outliers as rep
from jquant.models import tiny_wan


def test_report_finds_constructed_channel_and_token_outliers() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 64)).astype(np.float32)
    x[:, 3] *= 50.0  # a channel outlier: large on every token
    x[7, 11] = 400.0  # a token spike: one token carries it
    st = calib.batch_stats(jnp.asarray(x), calib.CalibConfig(hessian=False, histogram=False))
    r = rep.from_stats({"layer/kernel": st})["layer/kernel"]
    assert [c for c, _ in r.top[:2]] == [11, 3]
    assert r.ratio > 80 and r.kurtosis > 10
    persistence = dict(zip([c for c, _ in r.top], r.persistence))
    assert persistence[3] > 0.5 and persistence[11] < 0.05  # channel outlier vs token spike
    flat = rep.layer_outliers(np.ones(64))
    assert flat.ratio == 1.0 and flat.kurtosis == 0.0


def test_overlap_and_summary() -> None:
    a = np.ones(16)
    a[[1, 2]] = 10
    b = np.ones(16)
    b[[1, 5]] = 10
    assert rep.top_overlap({"t0": a, "t1": a}, top=2) == 1.0
    assert rep.top_overlap({"t0": a, "t1": b}, top=2) == pytest.approx(1 / 3)
    reports = {"x/kernel": rep.layer_outliers(a), "y/kernel": rep.layer_outliers(np.ones(16))}
    rows = rep.summarize(reports, {"x/kernel": ("ffn.up",), "y/kernel": ("ffn.up",)})
    assert rows[0]["layers"] == 2 and rows[0]["max_ratio"] == 10.0 and rows[0]["worst"] == "x/kernel"
    assert "| ffn.up | 2 |" in rep.markdown(rows)
    with pytest.raises(ValueError, match="finite"):
        rep.layer_outliers(np.array([1.0, np.nan]))


@pytest.fixture(scope="module")
def tiny():
    return tiny_wan.load_tiny()


def _inputs(t: tiny_wan.TinyWan):
    x = jax.random.normal(jax.random.key(0), t.latent_shape(2), jnp.float32)
    return x, jnp.array([700.0, 120.0]), t.text(jnp.array([3, 8]))


def test_injection_preserves_the_float_model_and_plants_outliers(tiny) -> None:
    cfg = inj.OutlierConfig(fraction=0.05, scale=32.0, peak=128.0)
    params, planted = inj.inject_outliers(tiny.params, cfg)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(params))  # methods may use .at[]
    x, t, text = _inputs(tiny)
    before = tiny_wan.velocity(tiny.model, tiny.params, x, t, text)
    after = tiny_wan.velocity(tiny.model, params, x, t, text)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-4, atol=1e-5)
    roles = {"attn1/to_q", "attn1/to_out_0", "attn2/to_q", "attn2/to_k", "attn2/to_out_0", "ffn/net_0/proj"}
    assert {p.split("/", 1)[1].rsplit("/", 1)[0] for p in planted} >= roles
    assert all(p.split("/")[-2] != "net_2" for p in planted)  # FFN down has no affine producer

    def apply_fn(p, batch):
        return tiny_wan.velocity(tiny.model, p, *batch)

    cc = calib.CalibConfig(hessian=False, histogram=False)
    old = rep.from_stats(calib.calibrate(apply_fn, tiny.params, [(x, t, text)], cc, progress=False))
    new = rep.from_stats(calib.calibrate(apply_fn, params, [(x, t, text)], cc, progress=False))
    for path, s in planted.items():
        # the planted channels now lead the layer, by at least half the scale over the old ratio
        assert new[path].ratio >= min(cfg.scale / 2, 4 * old[path].ratio), path
        assert new[path].top[0][0] in set(np.flatnonzero(s > 1).tolist()), path
    untouched = [p for p in old if p not in planted and p.endswith("ffn/net_2/kernel")]
    for path in untouched:
        assert new[path].ratio == pytest.approx(old[path].ratio, rel=1e-3)


def test_injection_refuses_bad_input(tiny) -> None:
    with pytest.raises(ValueError, match="power of two"):
        inj.OutlierConfig(scale=50.0)
    with pytest.raises(ValueError, match="unknown"):
        inj.OutlierConfig(sites=("ffn_down",))
    with pytest.raises(KeyError, match="Wan2.1"):
        inj.inject_outliers({"dense": {"kernel": np.ones((2, 2))}})
    from jquant.formats import parse_spec
    from jquant.qarray import quantize

    params = jax.tree.map(lambda a: a, tiny.params)
    params["blocks_0"]["attn1"]["to_q"]["kernel"] = quantize(
        params["blocks_0"]["attn1"]["to_q"]["kernel"], parse_spec("int8")
    )
    step = inj.transform()
    with pytest.raises(TypeError, match="already quantized"):
        step({"params": params}, None)
