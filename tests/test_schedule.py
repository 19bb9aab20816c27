"""Timestep grouping and per-step scale tables threaded through a jitted scan."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jquant
import jquant.nn as jnn
from jquant.pipeline import timesteps as schedule


def brute_force_best(x, g):
    import itertools

    t = len(x)
    best = None
    for cuts in itertools.combinations(range(1, t), g - 1):
        ids = np.zeros(t, np.int32)
        for k, c in enumerate(cuts):
            ids[c:] = k + 1
        v = schedule.within_group_spread(x, ids)
        best = v if best is None else min(best, v)
    return best


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=3, max_size=9), st.integers(1, 3))
def test_variance_aware_grouping_is_optimal(vals, g):
    x = np.asarray(vals)[:, None]
    g = min(g, len(vals))
    ids = schedule.variance_aware_groups(x, g)
    assert np.all(np.diff(ids) >= 0) and ids[0] == 0 and ids[-1] == g - 1  # contiguous, all used
    np.testing.assert_allclose(schedule.within_group_spread(x, ids), brute_force_best(x, g), rtol=1e-9, atol=1e-9)


def test_variance_aware_beats_uniform_on_a_step_change():
    x = np.concatenate([np.zeros(3), np.ones(9) * 4.0])[:, None]
    va = schedule.variance_aware_groups(x, 2)
    un = schedule.uniform_groups(12, 2)
    assert schedule.within_group_spread(x, va) == 0.0 < schedule.within_group_spread(x, un)


def test_scale_table_and_step_rows():
    groups = np.array([0, 0, 1, 1, 1])
    table = schedule.scale_table({"a/b": np.array([1.0, 2.0, 3.0, 0.5, 1.0]) * 127}, groups)
    np.testing.assert_allclose(table["a/b"], [2.0, 3.0])
    rows = schedule.step_rows(table, groups)
    chex.assert_shape(rows["a"]["b"]["input_scale"], (5,))
    np.testing.assert_allclose(rows["a"]["b"]["input_scale"], [2, 2, 3, 3, 3])


def test_table_threaded_through_one_jitted_scan():
    """Each step's row reaches the model's static activation quantizer; one trace for all steps."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="proj")(x)

    m = Net()
    x = jax.random.normal(jax.random.key(0), (4, 16))
    v = m.init(jax.random.key(1), x)
    q, _ = jquant.quantize_params(v, "int8")
    scales = jnp.array([0.001, 0.01, 0.1, 1.0])  # very different clipping per step
    rows = {"proj": {"input_scale": scales}}
    traces = []

    def step(carry, row):
        traces.append(1)
        with jnn.quantized("int8/t", static=True):
            y = m.apply({**q, jnn.AUX_COLLECTION: row}, x)
        return carry, y

    _, ys = jax.jit(lambda r: jax.lax.scan(step, 0, r))(rows)
    assert len(traces) == 1
    for i, s in enumerate(scales):
        with jnn.quantized("int8/t", static=True):
            expect = m.apply({**q, jnn.AUX_COLLECTION: {"proj": {"input_scale": s}}}, x)
        chex.assert_trees_all_close(ys[i], expect, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ys[0], ys[3])
