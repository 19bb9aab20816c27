"""scripts/attention_timeline.py's trace parsing and summary, on hand-built profiler buffers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "attention_timeline.py"
_spec = importlib.util.spec_from_file_location("_attention_timeline", _PATH)
tl = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tl  # dataclasses look their module up
_spec.loader.exec_module(tl)

NAMES = {0: "softmax", 1: "qk_wait"}


def _buffer(traces: list[list[tuple[int, bool, int]]], entries: int = 128) -> np.ndarray:
    """One block: each trace a list of (name id, begin, clock)."""
    out = np.zeros((len(traces), entries), np.uint32)
    for t, events in enumerate(traces):
        out[t, 1] = 7  # SM id
        out[t, 2] = 2 * len(events)
        for i, (name, begin, clock) in enumerate(events):
            out[t, tl.HEADER + 2 * i] = name | (0 if begin else tl.EXIT_BIT)
            out[t, tl.HEADER + 2 * i + 1] = clock & 0xFFFFFFFF
    return out.reshape(-1)


def _steps(first: int, period: int, length: int, n: int, base: int = 0) -> list[tuple[int, bool, int]]:
    ev = []
    for i in range(n):
        s = base + first + i * period
        ev += [(1, True, s - 20), (1, False, s), (0, True, s), (0, False, s + length)]
    return ev


@pytest.mark.parametrize("base", [1000, 2**32 - 1500])  # the second wraps the 32-bit clock mid-run
def test_pingpong_softmax_is_exclusive_and_steps_are_measured(base):
    wg0 = _steps(100, 300, 120, 10, base)
    wg1 = _steps(250, 300, 120, 10, base)
    buf = _buffer([wg0, wg1, []])
    blocks = tl.parse_traces(buf, 1, 3, NAMES)
    assert blocks[0][0][:2] == [tl.Span("qk_wait", 0, 20), tl.Span("softmax", 20, 140)]  # from the first event
    s = tl.summarize(blocks, skip=2)
    assert s["cycles_per_step_median"] == 300
    assert s["phase_cycles_per_step"] == {"qk_wait": 20.0, "softmax": 120.0}
    assert s["softmax_both_wgs_share"] == 0.0
    assert s["steps_counted"] == 2 * 5


def test_overlapping_softmax_share():
    wg0 = _steps(100, 300, 200, 10)
    wg1 = _steps(150, 300, 200, 10)  # 150 of every 200 cycles overlap
    s = tl.summarize(tl.parse_traces(_buffer([wg0, wg1, []]), 1, 3, NAMES), skip=2)
    assert s["softmax_both_wgs_share"] == pytest.approx(0.75, abs=0.02)


def test_bad_buffers_are_named():
    good = _buffer([_steps(100, 300, 120, 3), [], []])
    with pytest.raises(ValueError, match="not 2 blocks"):
        tl.parse_traces(np.concatenate([good, good[:5]]), 2, 3, NAMES)
    odd = good.copy()
    odd[2] = 3  # an odd number of entries used
    with pytest.raises(ValueError, match="block 0 trace 0"):
        tl.parse_traces(odd, 1, 3, NAMES)
    unmatched = _buffer([[(0, False, 50)], [], []])
    with pytest.raises(ValueError, match="ends without a start"):
        tl.parse_traces(unmatched, 1, 3, NAMES)
    with pytest.raises(ValueError, match="no CTA"):
        tl.summarize(tl.parse_traces(good, 1, 3, NAMES), skip=2)


def test_plot_writes_a_png(tmp_path):
    blocks = tl.parse_traces(_buffer([_steps(100, 300, 120, 12), _steps(250, 300, 120, 12), []]), 1, 3, NAMES)
    path = tmp_path / "t.png"
    tl.plot(blocks, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_three_warpgroups_share_counts_any_other_softmax_once():
    """With three compute warpgroups, warpgroup 0's softmax counts as overlapped while either
    other is in its softmax, and cycles where both others are count once."""
    wg0 = _steps(100, 300, 200, 10)
    wg1 = _steps(150, 300, 100, 10)  # covers wg0's cycles 50-150 of each softmax
    wg2 = _steps(200, 300, 100, 10)  # covers 100-200: together 50-200, i.e. 150 of 200
    blocks = tl.parse_traces(_buffer([wg0, wg1, wg2, []]), 1, 4, NAMES)
    s = tl.summarize(blocks, skip=2, wgs=3)
    assert s["softmax_both_wgs_share"] == pytest.approx(0.75, abs=0.02)
    assert s["steps_counted"] == 3 * 5
    assert tl.summarize(blocks, skip=2)["softmax_both_wgs_share"] == pytest.approx(0.5, abs=0.02)


def test_plot_draws_one_row_per_warpgroup(tmp_path):
    traces = [_steps(100 + 50 * w, 300, 120, 12) for w in range(3)] + [[]]
    blocks = tl.parse_traces(_buffer(traces), 1, 4, NAMES)
    path = tmp_path / "t3.png"
    tl.plot(blocks, path, "three", wgs=3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
