"""Fitting a training run to a wall-time budget (``--max-seconds``, ``DistillConfig.max_seconds``).

Every trainer here times its first compiled chunks and then fixes the number of optimizer steps,
so the learning-rate schedule can span the steps that really run.
"""

from __future__ import annotations


def steps_that_fit(done: int, total: int, per_step_s: float, seconds_left: float, multiple: int = 1) -> int:
    """The run's new total: ``done`` plus whole ``multiple``s of the steps that fit in
    ``seconds_left`` at ``per_step_s`` each, never above ``total`` nor below ``done``."""
    if per_step_s <= 0 or multiple < 1:
        raise ValueError(f"steps_that_fit: per_step_s > 0 and multiple >= 1, got {per_step_s}, {multiple}")
    fit = done + int(max(0.0, seconds_left) / per_step_s) // multiple * multiple
    return max(done, min(total, fit))


def step_cost(per_step_s: float, rollout_s: float = 0.0, rollout_every: int = 0, chunk: int = 1) -> float:
    """Seconds one step costs on average: ``per_step_s`` plus its share of the periodic work a
    trainer does between chunks (``rollout_s`` every ``rollout_every`` steps; 0: none).

    Such work runs after a chunk that crosses a multiple of ``rollout_every``, so with chunks of
    ``chunk`` steps it comes at most once a chunk: every ``max(rollout_every, chunk)`` steps."""
    if per_step_s <= 0 or rollout_s < 0 or rollout_every < 0 or chunk < 1:
        raise ValueError(
            f"step_cost: per_step_s > 0, rollout_s >= 0, rollout_every >= 0 and chunk >= 1, got "
            f"{per_step_s}, {rollout_s}, {rollout_every}, {chunk}"
        )
    return per_step_s + (rollout_s / max(rollout_every, chunk) if rollout_every else 0.0)


def time_is_up(elapsed_s: float, max_seconds: float) -> bool:
    """Whether a budget is set (``max_seconds > 0``) and ``elapsed_s`` has reached it: the hard stop
    behind a fitted total, for the costs the fit could not foresee."""
    return max_seconds > 0 and elapsed_s >= max_seconds
