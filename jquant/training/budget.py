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
