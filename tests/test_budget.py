"""jquant.training.budget and the wall-time cap of distillation with student rollouts.

The distillation runs read a virtual clock (real time plus the seconds each fake rollout
"costs"), so the budget's decisions are exact and the test stays fast.
"""

from __future__ import annotations

import dataclasses
import time
import types

import pytest
from _pipeline_util import tiny_bundle

from jquant import policy as P
from jquant.pipeline import calibrate as C
from jquant.pipeline import recipes as rc
from jquant.training import distill as D
from jquant.training.budget import step_cost, time_is_up


def test_step_cost_adds_each_steps_share_of_the_rollouts() -> None:
    assert step_cost(0.01) == 0.01  # no rollouts: the step alone
    assert step_cost(0.01, 40.0, 2000, 50) == pytest.approx(0.01 + 40.0 / 2000)
    # Chunks longer than the rollout period: at most one rollout a chunk.
    assert step_cost(0.01, 5.0, 2, 50) == pytest.approx(0.01 + 5.0 / 50)
    assert step_cost(0.01, 5.0, 0, 50) == 0.01  # rollout_every 0: never
    with pytest.raises(ValueError, match="step_cost"):
        step_cost(0.0)
    with pytest.raises(ValueError, match="step_cost"):
        step_cost(0.01, -1.0, 2)


def test_time_is_up_only_with_a_budget() -> None:
    assert time_is_up(10.0, 10.0) and time_is_up(11.0, 10.0)
    assert not time_is_up(9.9, 10.0)
    assert not time_is_up(1e9, 0.0)  # 0: no budget


@pytest.fixture(scope="module")
def setup():
    bundle = tiny_bundle(num_steps=3)
    cal = C.Calibrator(bundle, C.CalibrationConfig(num_samples=2, batch=2))
    qm = C.quantize(bundle, rc.Recipe("w4a8", "rtn int4/g32 + int8 tokens", rc.rtn(P.uniform("int4/g32")), "int8"), cal)
    data = D.teacher_data(bundle, [bundle.workload(2, 7), bundle.workload(2, 8, 2)])
    return bundle, qm, data


def _virtual_rollouts(monkeypatch, data: D.DistillData, costs: list[float]) -> list[float]:
    """Make distill's clock real time plus ``offset`` and its rollouts free in real time: the
    i-th rollout advances the clock by ``costs[i]`` (the last repeats) and returns the teacher
    data's second half. Returns the offset holder."""
    offset = [0.0]
    calls = [0]
    monkeypatch.setattr(D, "time", types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0]))

    def student_data(bundle, model, workloads) -> D.DistillData:
        offset[0] += costs[min(calls[0], len(costs) - 1)]
        calls[0] += 1
        h = data.num_samples // 2
        return dataclasses.replace(
            data,
            xs=data.xs[:, h:],
            cond=data.cond[h:],
            uncond=data.uncond[h:],
            y_cond=data.y_cond[:, h:],
            y_uncond=data.y_uncond[:, h:],
        )

    monkeypatch.setattr(D, "student_data", student_data)
    return offset


def test_distill_fits_its_steps_to_the_budget_with_the_rollouts_cost(setup, monkeypatch) -> None:
    bundle, qm, data = setup
    _virtual_rollouts(monkeypatch, data, [100.0])
    cfg = D.DistillConfig(steps=1000, batch=2, chunk=1, max_seconds=300.0, rollout_every=2)
    res = D.distill(bundle, qm, data, cfg)
    info = res.model.info["distill"]
    # Chunk 2 alone fits all 1000 steps; the rollout at step 2 (100 s) makes a step cost ~50 s,
    # and the ~200 s left fit 3 more (the real seconds spent are far below 50): 5 steps, one
    # more rollout (step 4), and the run ends on its own, inside the budget.
    assert info["steps_run"] == 5 and res.losses.shape == (5,)
    assert info["rollouts"] == 2 and not info["stopped_by_budget"]
    assert 200.0 <= res.seconds <= cfg.max_seconds


def test_distill_stops_at_the_budget_when_rollouts_get_dearer(setup, monkeypatch) -> None:
    bundle, qm, data = setup
    _virtual_rollouts(monkeypatch, data, [0.0, 0.0, 60.0])  # the fits see two free rollouts
    cfg = D.DistillConfig(steps=1000, batch=2, chunk=1, max_seconds=150.0, rollout_every=2)
    res = D.distill(bundle, qm, data, cfg)
    info = res.model.info["distill"]
    # Rollouts at steps 6, 8 and 10 (180 s): the budget is passed after the one at step 10, a
    # hard stop there.
    assert info["stopped_by_budget"] and info["steps_run"] == 10 < cfg.steps
    assert res.losses.shape == (10,) and info["rollouts"] == 5
    assert cfg.max_seconds <= res.seconds <= cfg.max_seconds + 60.0  # one chunk (and its rollout) past it


def test_distill_refits_on_the_second_rollout_when_rollouts_get_cheaper(setup, monkeypatch) -> None:
    # The first rollout compiles the student's sampler. Fitted to it alone, this run would stop
    # at 5 steps (as above); the second rollout's 1 s refits it to every step asked for.
    bundle, qm, data = setup
    _virtual_rollouts(monkeypatch, data, [100.0, 1.0])
    cfg = D.DistillConfig(steps=24, batch=2, chunk=1, max_seconds=300.0, rollout_every=2)
    res = D.distill(bundle, qm, data, cfg)
    info = res.model.info["distill"]
    assert info["steps_run"] == 24 and not info["stopped_by_budget"] and info["rollouts"] == 11
    assert 100.0 + 10.0 <= res.seconds <= cfg.max_seconds
