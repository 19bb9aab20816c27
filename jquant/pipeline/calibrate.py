"""Calibrate on the denoising trajectory and apply a recipe: ``quantize(bundle, recipe)``.

:class:`Calibrator` records the float model's trajectories once (several seeds and
classes/prompts, every step, both CFG branches, every frame) and replays them on any
variables it is asked about: :meth:`Calibrator.stats` gives the pooled
``{kernel path: LayerStats}`` the weight algorithms read (collected per
``(timestep group, CFG branch)`` and merged), :meth:`Calibrator.ranges` the per-step
ranges scale tables are built from. Results are cached per variables object, so a recipe
that asks twice about the same tree calibrates once.

:func:`quantize` runs a recipe's transform with a :class:`~jquant.pipeline.recipes.Context` bound
to the calibrator, then (static activations) calibrates the per-step ranges of the result
and builds its scale table, and returns a :class:`~jquant.pipeline.runtime.QuantizedModel`
with timings.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from jquant import calib
from jquant.coded import CodedArray
from jquant.pipeline import trajectory as tj
from jquant.pipeline.denoiser import ModelBundle, Workload
from jquant.pipeline.runtime import QuantizedModel
from jquant.pipeline.tables import ScaleTable, TableConfig, build_table
from jquant.qarray import QArray
from jquant.rules import flatten_with_paths
from jquant.transform import Context

if TYPE_CHECKING:  # only for annotations: recipes builds on this module's package
    from jquant.pipeline.recipes import Recipe

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Calibration data: ``num_samples`` samples in batches of ``batch``, noise seeds
    ``seed, seed + 1, ...``, classes/prompts cycling from ``start``.

    Attributes:
      steps_per_sample: steps of each sample replayed for the weight statistics (None: all;
        fewer keeps Hessian collection cheap, offset per sample to cover the trajectory).
        Per-step ranges for tables always use every step.
      stat_groups: uniform timestep groups the statistics are keyed by (with the branch).
    """

    num_samples: int = 4
    batch: int = 4
    seed: int = 1234
    start: int = 0
    steps_per_sample: int | None = None
    stat_groups: int = 4

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.batch < 1:
            raise ValueError(
                f"CalibrationConfig: num_samples and batch must be >= 1, got {self.num_samples}, {self.batch}"
            )

    def workloads(self, bundle: ModelBundle) -> list[Workload]:
        out, done, j = [], 0, 0
        while done < self.num_samples:
            n = min(self.batch, self.num_samples - done)
            out.append(bundle.workload(n, self.seed + j, self.start + done))
            done, j = done + n, j + 1
        return out


class Calibrator:
    """Trajectory statistics of a bundle's model, recorded once and replayed per variables."""

    def __init__(
        self, bundle: ModelBundle, config: CalibrationConfig = CalibrationConfig(), *, progress: bool = False
    ) -> None:
        self.bundle, self.config, self.progress = bundle, config, progress
        self._traj: tj.Trajectories | None = None
        self._stats: dict[int, tuple[Variables, calib.Stats]] = {}
        self._ranges: dict[int, tuple[Variables, tj.StepRanges]] = {}
        self.seconds: dict[str, float] = {"record": 0.0, "stats": 0.0, "ranges": 0.0}
        self.float_variables: Variables = {"params": bundle.params}  # one object: its statistics are cached

    @property
    def trajectories(self) -> tj.Trajectories:
        if self._traj is None:
            t0 = time.perf_counter()
            self._traj = tj.record(self.bundle.denoiser, self.bundle.params, self.config.workloads(self.bundle))
            self.seconds["record"] += time.perf_counter() - t0
        return self._traj

    def stats_by_key(self, variables: Variables) -> dict[tuple[int, int], calib.Stats]:
        """``{(timestep group, branch): {kernel path: LayerStats}}`` of ``variables``."""
        t0 = time.perf_counter()
        traj = self.trajectories
        groups = np.minimum(np.arange(traj.num_steps) * self.config.stat_groups // traj.num_steps, traj.num_steps - 1)
        cfg = calib.CalibConfig(hessian=True, histogram=False)
        out = tj.layer_stats(
            self.bundle.denoiser,
            variables,
            traj,
            groups=groups,
            steps_per_sample=self.config.steps_per_sample,
            config=cfg,
            progress=self.progress,
        )
        self.seconds["stats"] += time.perf_counter() - t0
        return out

    def stats(self, variables: Variables) -> calib.Stats:
        """Pooled statistics of ``variables`` (cached per variables object)."""
        hit = self._stats.get(id(variables))
        if hit is None or hit[0] is not variables:
            hit = self._stats[id(variables)] = (variables, tj.pooled_stats(self.stats_by_key(variables)))
        return hit[1]

    def ranges(self, variables: Variables) -> tj.StepRanges:
        """Per-step, per-branch, per-frame input ranges of ``variables`` (cached)."""
        hit = self._ranges.get(id(variables))
        if hit is None or hit[0] is not variables:
            t0 = time.perf_counter()
            r = tj.step_ranges(self.bundle.denoiser, variables, self.trajectories, progress=self.progress)
            self.seconds["ranges"] += time.perf_counter() - t0
            hit = self._ranges[id(variables)] = (variables, r)
        return hit[1]

    def samples(self, variables: Variables, max_tokens: int = 2048) -> dict[str, Any]:
        """Input rows of every layer over the trajectory (``trajectory.capture_samples``)."""
        t0 = time.perf_counter()
        out = tj.capture_samples(self.bundle.denoiser, variables, self.trajectories, max_tokens)
        self.seconds["stats"] += time.perf_counter() - t0
        return out

    def context(self) -> Context:

        cfg = self.bundle.config
        width = int(getattr(cfg, "inner_dim", 0) or cfg.num_attention_heads * cfg.attention_head_dim)
        return Context(self.bundle.roles, self.bundle.head_dim, width, self.stats, self.samples)


def quantized_layers(variables: Variables) -> list[str]:
    """Module paths whose kernel is quantized (QArray or a coded array)."""
    return [
        p[: -len("/kernel")]
        for p, leaf in flatten_with_paths(variables["params"])
        if p.endswith("/kernel") and isinstance(leaf, (QArray, CodedArray))
    ]


def make_table(cal: Calibrator, variables: Variables, act: str, config: TableConfig) -> ScaleTable:
    """A static scale table for the quantized layers of ``variables``."""
    return build_table(cal.ranges(variables), f"{act}/t", config, layers=quantized_layers(variables))


def quantize(bundle: ModelBundle, recipe: Recipe, calibrator: Calibrator | None = None) -> QuantizedModel:
    """Apply ``recipe`` to ``bundle``'s float params (calibrating on its trajectory as the
    recipe's steps need) and return the runnable :class:`QuantizedModel`.

    ``info`` holds the recipe's steps, activation label and seconds spent (transform,
    statistics, ranges, recording).
    """
    cal = calibrator or Calibrator(bundle)
    if cal.bundle is not bundle:
        raise ValueError("quantize: the calibrator was built for another model bundle")
    before = dict(cal.seconds)
    t0 = time.perf_counter()
    variables = recipe.transform(cal.float_variables, cal.context())
    t_transform = time.perf_counter() - t0
    table = None
    if recipe.act is not None and recipe.table is not None:
        table = make_table(cal, variables, recipe.act, recipe.table)
    spent = {k: cal.seconds[k] - before[k] for k in cal.seconds}
    info = {
        "recipe": recipe.name,
        "steps": recipe.transform.name,
        "activations": recipe.label,
        "seconds": {
            "transform_total": t_transform,
            "calibration_stats": spent["stats"],
            "calibration_record": spent["record"],
            "table_ranges": spent["ranges"],
            "total": time.perf_counter() - t0,
        },
    }
    return QuantizedModel(variables, recipe.act_spec, table, recipe.name, info)
