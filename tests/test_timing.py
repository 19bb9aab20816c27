"""pallas_kernels.timing's per-kernel breakdown: the aggregation of CUPTI's per-iteration lists."""

from __future__ import annotations

import jax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import timing


def test_summarize_sums_launches_within_a_run_and_sorts():
    runs = [[("a", 0.010), ("b", 0.002), ("a", 0.005)], [("a", 0.012), ("b", 0.001), ("a", 0.004)]] * 3
    rows = timing.summarize_kernels(runs)
    assert [r["kernel"] for r in rows] == ["a", "b"]
    assert rows[0]["launches"] == 2
    assert rows[0]["us"] == pytest.approx(15.5) and rows[0]["us_min"] == pytest.approx(15.0)
    assert rows[1]["us"] == pytest.approx(1.5) and rows[1]["us_min"] == pytest.approx(1.0)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    st.lists(
        st.lists(st.tuples(st.sampled_from("abc"), st.floats(1e-4, 10.0)), min_size=1, max_size=6),
        min_size=1,
        max_size=5,
    )
)
def test_summarize_properties(runs):
    rows = timing.summarize_kernels(runs)
    assert {r["kernel"] for r in rows} == {name for run in runs for name, _ in run}
    assert all(0 < r["us_min"] <= r["us"] for r in rows)
    assert [r["us"] for r in rows] == sorted((r["us"] for r in rows), reverse=True)


def test_kernel_breakdown_needs_a_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="needs a GPU for CUPTI"):
        timing.kernel_breakdown(lambda x: x + 1, (jax.numpy.ones(4),))
