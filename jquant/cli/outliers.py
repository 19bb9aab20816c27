"""``--outliers`` of ``jquant quantize`` and ``jquant eval``: the activation-outlier report of the
float model on the calibration workload.

Prints :func:`jquant.metrics.outliers.format_table` (one line per layer role, then the layers
with the largest channel-absmax ratio, their top channels and persistence) and writes
``outliers.json`` (every layer's row, the role summary, the top-channel overlap across timestep
groups and CFG branches) and ``outliers.png`` (:func:`jquant.metrics.outlier_plot.plot_outliers`)
into the output folder. Costs one pass of the float model over the recorded calibration
trajectories (no Hessians), on top of recording them once (shared with the quantization).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jquant import calib
from jquant.metrics import outliers as rep
from jquant.metrics.outlier_plot import plot_outliers
from jquant.pipeline import trajectory as tj
from jquant.pipeline.calibrate import CalibrationConfig, Calibrator
from jquant.pipeline.denoiser import ModelBundle

JSON_NAME = "outliers.json"
PNG_NAME = "outliers.png"
HELP = f"print the float model's activation-outlier report on the calibration workload; write {JSON_NAME}, {PNG_NAME}"


def stats_by_key(cal: Calibrator) -> dict[tuple[int, int], calib.Stats]:
    """``{(timestep group, branch): {kernel path: LayerStats}}`` of the float model: absmax and
    mean |x| only (no Hessians), over the calibrator's trajectories and timestep groups."""
    traj = cal.trajectories
    n = traj.num_steps
    groups = np.minimum(np.arange(n) * cal.config.stat_groups // n, n - 1)
    return tj.layer_stats(
        cal.bundle.denoiser,
        cal.float_variables,
        traj,
        groups=groups,
        steps_per_sample=cal.config.steps_per_sample,
        config=calib.CalibConfig(hessian=False, histogram=False),
        progress=cal.progress,
    )


def build(cal: Calibrator, top: int = 4) -> dict[str, Any]:
    """The report as JSON-able data: ``layers`` (one :meth:`LayerOutliers.row` each, with its roles
    and ``overlap``), ``roles`` (:func:`summarize`), ``median_ratio``, ``max_ratio``, and the
    :class:`LayerOutliers` objects under ``"_reports"`` (dropped when written)."""
    by_key = stats_by_key(cal)
    reports = rep.from_stats(tj.pooled_stats(by_key), top=top)
    overlap = {p: rep.top_overlap({k: np.asarray(s[p].absmax) for k, s in by_key.items()}, top) for p in reports}
    roles = cal.bundle.roles
    ratios = np.array([r.ratio for r in reports.values()])
    return {
        "median_ratio": float(np.median(ratios)),
        "max_ratio": float(ratios.max()),
        "median_top_overlap": float(np.median(list(overlap.values()))),
        "groups": sorted([list(k) for k in by_key]),
        "roles": rep.summarize(reports, roles),
        "layers": [{**r.row(p), "roles": list(roles.get(p, ())), "overlap": overlap[p]} for p, r in reports.items()],
        "_reports": reports,
        "_overlap": overlap,
    }


def report(cal: Calibrator, out_dir: str | Path, *, top: int = 4, echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Print the outlier report of ``cal``'s float model and write ``outliers.json`` and
    ``outliers.png`` into ``out_dir`` (created). Returns the written data (see :func:`build`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = build(cal, top)
    reports, overlap = data.pop("_reports"), data.pop("_overlap")
    echo(
        f"activation outliers of the float model ({len(reports)} linear inputs; "
        f"largest/median channel absmax: median {data['median_ratio']:.1f}, max {data['max_ratio']:.1f}; "
        f"top-channel overlap across timestep groups and CFG branches: median {data['median_top_overlap']:.2f})"
    )
    echo(rep.format_table(reports, cal.bundle.roles, overlap))
    (out / JSON_NAME).write_text(json.dumps(data, indent=1) + "\n")
    plot_outliers(reports, out / PNG_NAME, cal.bundle.roles, title=f"activation outliers: {cal.bundle.denoiser.name}")
    echo(f"wrote {out / JSON_NAME}, {out / PNG_NAME}")
    return data


def report_recorded(bundle: ModelBundle, meta: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """:func:`report` on the calibration workload recorded in a ``jquant quantize`` output's
    ``meta["calibration"]`` (the defaults for keys it lacks)."""
    known = {f.name for f in dataclasses.fields(CalibrationConfig)}
    config = CalibrationConfig(**{k: v for k, v in (meta.get("calibration") or {}).items() if k in known})
    return report(Calibrator(bundle, config), out_dir)
