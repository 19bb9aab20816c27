"""Calibration: streaming statistics on linen and NNX models, groups, sequential mode, errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jquant import calib
from jquant.algorithms import rtn
from jquant.qarray import QArray


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(16, name="a")(x))
        h = nn.DenseGeneral((2, 8), name="heads")(h)
        h = nn.DenseGeneral(12, axis=(-2, -1), name="out")(h)  # contracts two axes: K = 16
        return nn.Dense(4, name="b")(h)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


NET = Net()
PARAMS = NET.init(jax.random.key(0), jnp.ones((2, 5, 8)))["params"]
APPLY = lambda p, b: NET.apply({"params": p}, b)  # noqa: E731
RNG = np.random.default_rng(0)
BATCHES = [jnp.asarray(RNG.standard_normal((2, 5, 8)) * np.linspace(0.1, 10, 8), jnp.float32) for _ in range(3)]
X = np.concatenate([np.asarray(b).reshape(-1, 8) for b in BATCHES]).astype(np.float64)


@pytest.fixture(scope="module")
def stats():
    return calib.calibrate(APPLY, PARAMS, BATCHES, progress=False)


def test_linen_stats_match_direct_computation(stats):
    assert set(stats) == {"a/kernel", "heads/kernel", "out/kernel", "b/kernel"}
    s = stats["a/kernel"]
    chex.assert_trees_all_close(float(s.count), float(len(X)))
    np.testing.assert_allclose(s.mean, X.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.absmean, np.abs(X).mean(0), rtol=1e-5)
    np.testing.assert_allclose(s.absmax, np.abs(X).max(0), rtol=1e-6)
    np.testing.assert_allclose(s.hessian, X.T @ X, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(s.covariance(), np.cov(X.T), rtol=1e-4, atol=1e-4)
    assert int(s.hist.sum()) == X.size
    # DenseGeneral over two axes: the Hessian is over the flattened 2 x 8 = 16 inputs
    assert stats["out/kernel"].hessian.shape == (16, 16)


def test_percentiles_within_one_bin(stats):
    s = stats["a/kernel"]
    est = np.asarray(s.percentile([50.0, 90.0, 100.0]))
    ref = np.percentile(np.abs(X), [50.0, 90.0, 100.0], axis=0)
    ratio = est / ref
    width = 2.0 ** (1.0 / s.bins_per_octave)
    assert np.all(ratio < width * 1.05) and np.all(ratio > 1.0 / (width * 1.05))
    np.testing.assert_allclose(est[-1], s.absmax, rtol=1e-6)  # the 100th percentile is the absmax


def test_jitted_step_api_equals_calibrate(stats):
    st0 = calib.init(APPLY, PARAMS, BATCHES[0])
    step = calib.make_step(APPLY)
    for b in BATCHES:
        st0 = step(st0, PARAMS, b)
    chex.assert_trees_all_close(st0, stats, rtol=1e-6)


def test_nnx_model_calibrates_by_graph_path():
    graphdef, state = nnx.split(NNXNet(nnx.Rngs(0)))
    s = calib.calibrate(lambda model, b: model(b), state, BATCHES, graphdef=graphdef, progress=False)
    assert set(s) == {"l1/kernel", "l2/kernel"}
    np.testing.assert_allclose(s["l1/kernel"].hessian, X.T @ X, rtol=1e-5, atol=1e-4)
    assert float(s["l2/kernel"].count) == len(X)


def test_groups_are_kept_separately_and_merge_to_the_whole(stats):
    # group by batch index parity (stands in for timestep group / CFG branch)
    keyed = [(i % 2, b) for i, b in enumerate(BATCHES)]
    groups = calib.calibrate(
        lambda p, kb: APPLY(p, kb[1]), PARAMS, keyed, key_fn=lambda kb: f"g{kb[0]}", progress=False
    )
    assert set(groups) == {"g0", "g1"}
    x0 = np.concatenate([np.asarray(BATCHES[i]).reshape(-1, 8) for i in (0, 2)])
    np.testing.assert_allclose(groups["g0"]["a/kernel"].hessian, x0.T @ x0, rtol=1e-5, atol=1e-4)
    assert float(groups["g1"]["a/kernel"].count) == 10
    chex.assert_trees_all_close(calib.merge(*groups.values()), stats, rtol=1e-5, atol=1e-4)


@settings(max_examples=6, deadline=None)
@given(st.integers(1, 19), st.integers(0, 2**31 - 1))
def test_streaming_equals_one_batch(cut, seed):
    x = np.random.default_rng(seed).standard_normal((20, 6)).astype(np.float32) * 3
    cfg = calib.CalibConfig(bins_per_octave=2)
    whole = calib.batch_stats(jnp.asarray(x), cfg)
    parts = calib.combine(calib.batch_stats(jnp.asarray(x[:cut]), cfg), calib.batch_stats(jnp.asarray(x[cut:]), cfg))
    chex.assert_trees_all_close(parts, whole, rtol=1e-5, atol=1e-5)


def test_bad_calibration_data_errors():
    with pytest.raises(ValueError, match="empty calibration data"):
        calib.calibrate(APPLY, PARAMS, [], progress=False)
    with pytest.raises(ValueError, match="zero tokens"):
        calib.calibrate(APPLY, PARAMS, [jnp.zeros((0, 5, 8))], progress=False)
    with pytest.raises(ValueError, match="no linear layer"):
        calib.calibrate(APPLY, PARAMS, BATCHES[:1], calib.CalibConfig(layers="nothing_matches"), progress=False)
    with pytest.raises(TypeError, match="once per block"):
        calib.sequential(APPLY, PARAMS, iter(BATCHES), [["a/kernel"]], lambda p, s, ls: p)
    with pytest.raises(ValueError, match="not kernel paths"):
        calib.sequential(APPLY, PARAMS, BATCHES, [["a/nope"]], lambda p, s, ls: p)


def test_sequential_calibrates_each_block_on_the_quantized_model(stats):
    seen = []

    def quantize_block(p, s, layers):
        seen.append((set(layers), s))
        assert set(s) == set(layers)  # only the block's layers are collected
        return rtn.rtn(p, None, "int4", layers=layers)

    blocks = [["a/kernel"], "heads|out|b/"]  # exact paths or a regex over kernel paths
    out = calib.sequential(APPLY, PARAMS, BATCHES, blocks, quantize_block, progress=False)
    assert all(isinstance(out[k]["kernel"], QArray) for k in ("a", "heads", "out", "b"))
    assert seen[1][0] == {"heads/kernel", "out/kernel", "b/kernel"}
    # the second block's inputs come from the *quantized* first layer
    qa = rtn.rtn(PARAMS, None, "int4", layers=["a/kernel"])
    ref = calib.calibrate(APPLY, qa, BATCHES, calib.CalibConfig(layers=frozenset({"heads/kernel"})), progress=False)
    h_seq = seen[1][1]["heads/kernel"].hessian
    np.testing.assert_allclose(h_seq, ref["heads/kernel"].hessian, rtol=1e-5, atol=1e-4)
    assert not np.allclose(h_seq, stats["heads/kernel"].hessian, rtol=1e-4)
