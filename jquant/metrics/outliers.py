"""Activation-outlier report: how far a layer's input channels stray from the rest, and whether
the same channels do so across tokens, timesteps and CFG branches.

Works on per-channel statistics (``jquant.calib.LayerStats``'s ``absmax``, ``abssum`` and
``count``, or any arrays of that shape), so it runs on whatever a calibration pass collected:

* ``ratio``: largest / median channel absmax (1 for a flat layer; real DiTs: 10-1000).
* ``kurtosis``: excess kurtosis of the channel absmax values across channels (0 for a Gaussian
  spread; heavy for a few dominant channels).
* ``top``: the channels with the largest absmax, with their absmax / median.
* ``persistence``: for each top channel, its mean |x| over its absmax, divided by the same for
  the median channel: near or above 1 when the channel is large on every token (a *channel*
  outlier, which per-channel smoothing fixes), far below 1 when a few tokens carry it (a *token*
  spike, which smoothing cannot fix).
* ``overlap``: Jaccard overlap of the top-channel sets between groups (timestep groups, CFG
  branches): 1 when the same channels are outliers everywhere (one static smoothing vector works).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class LayerOutliers:
    """The report of one layer's input (see the module docstring for each field)."""

    channels: int
    ratio: float
    kurtosis: float
    top: tuple[tuple[int, float], ...]
    persistence: tuple[float, ...]

    def row(self, path: str) -> dict:
        return {
            "layer": path,
            "channels": self.channels,
            "ratio": self.ratio,
            "kurtosis": self.kurtosis,
            "top": [c for c, _ in self.top],
            "top_ratio": [r for _, r in self.top],
            "persistence": list(self.persistence),
        }


def _median_positive(a: np.ndarray) -> float:
    m = float(np.median(a))
    return m if m > 0 else float(np.max(a)) or 1.0


def layer_outliers(
    absmax: np.ndarray, abssum: np.ndarray | None = None, count: float | None = None, *, top: int = 4
) -> LayerOutliers:
    """Report of one layer from its ``[K]`` channel absmax (and mean-|x| inputs for persistence)."""
    a = np.asarray(absmax, np.float64).reshape(-1)
    if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"layer_outliers: absmax must be finite, non-negative and non-empty, got shape {a.shape}")
    med = _median_positive(a)
    order = np.argsort(-a, kind="stable")[: min(top, a.size)]
    sd = a.std()
    kurt = float(np.mean(((a - a.mean()) / sd) ** 4) - 3.0) if sd > 0 else 0.0
    persistence: tuple[float, ...] = ()
    if abssum is not None and count:
        mean_abs = np.asarray(abssum, np.float64).reshape(-1) / float(count)
        fill = np.divide(mean_abs, a, out=np.zeros_like(a), where=a > 0)
        typical = _median_positive(fill)
        persistence = tuple(float(fill[c] / typical) for c in order)
    return LayerOutliers(
        channels=int(a.size),
        ratio=float(a.max() / med),
        kurtosis=kurt,
        top=tuple((int(c), float(a[c] / med)) for c in order),
        persistence=persistence,
    )


def from_stats(stats: Mapping[str, object], top: int = 4) -> dict[str, LayerOutliers]:
    """:func:`layer_outliers` of every layer of a calibration result (``{path: LayerStats}``:
    anything with ``absmax``, ``abssum`` and ``count``)."""
    return {
        path: layer_outliers(np.asarray(st.absmax), np.asarray(st.abssum), float(np.asarray(st.count)), top=top)
        for path, st in stats.items()
    }


def top_overlap(absmax_by_group: Mapping[object, np.ndarray], top: int = 4) -> float:
    """Mean pairwise Jaccard overlap of the ``top`` largest-absmax channels across groups (1.0 with
    fewer than two groups)."""
    sets = [set(np.argsort(-np.asarray(a).reshape(-1), kind="stable")[:top].tolist()) for a in absmax_by_group.values()]
    if len(sets) < 2:
        return 1.0
    scores = [len(a & b) / len(a | b) for i, a in enumerate(sets) for b in sets[i + 1 :]]
    return float(np.mean(scores))


def summarize(reports: Mapping[str, LayerOutliers], roles: Mapping[str, Sequence[str]] | None = None) -> list[dict]:
    """One row per role (the first role label of each layer; ``"-"`` without roles): layers,
    median and largest ``ratio``, median kurtosis, and the worst layer."""
    groups: dict[str, list[tuple[str, LayerOutliers]]] = {}
    for path, rep in reports.items():
        role = (roles or {}).get(path, ("-",))
        groups.setdefault(role[0] if role else "-", []).append((path, rep))
    rows = []
    for role, items in sorted(groups.items()):
        ratios = np.array([r.ratio for _, r in items])
        worst = items[int(np.argmax(ratios))]
        rows.append(
            {
                "role": role,
                "layers": len(items),
                "median_ratio": float(np.median(ratios)),
                "max_ratio": float(ratios.max()),
                "median_kurtosis": float(np.median([r.kurtosis for _, r in items])),
                "worst": worst[0],
            }
        )
    return rows


def markdown(rows: Sequence[Mapping[str, object]]) -> str:
    """The :func:`summarize` rows as a markdown table."""
    head = (
        "| role | layers | median ratio | max ratio | median kurtosis | worst layer |\n|---|---:|---:|---:|---:|---|\n"
    )
    body = "".join(
        f"| {r['role']} | {r['layers']} | {r['median_ratio']:.1f} | {r['max_ratio']:.1f} | "
        f"{r['median_kurtosis']:.1f} | `{r['worst']}` |\n"
        for r in rows
    )
    return head + body


def _channels(rep: LayerOutliers, n: int = 3) -> str:
    """``"c (xR, pP)"`` for the first ``n`` top channels (``p`` only when persistence is known)."""
    parts = []
    for i, (c, r) in enumerate(rep.top[:n]):
        p = f", p{rep.persistence[i]:.2f}" if i < len(rep.persistence) else ""
        parts.append(f"{c} (x{r:.0f}{p})" if r >= 10 else f"{c} (x{r:.1f}{p})")
    return ", ".join(parts)


def worst_layers(reports: Mapping[str, LayerOutliers], n: int = 8) -> list[str]:
    """The ``n`` layers with the largest ``ratio``, largest first (ties in report order)."""
    return sorted(reports, key=lambda p: -reports[p].ratio)[:n]


def format_table(
    reports: Mapping[str, LayerOutliers],
    roles: Mapping[str, Sequence[str]] | None = None,
    overlap: Mapping[str, float] | None = None,
    *,
    worst: int = 8,
) -> str:
    """A fixed-width printout of a report: one line per role (:func:`summarize`, with the worst
    layer's top channels as ``channel (x ratio, p persistence)``), then the ``worst`` layers by
    ratio with their role, kurtosis, top channels and (given ``overlap``) top-channel overlap
    across timestep groups and CFG branches."""
    if not reports:
        raise ValueError("format_table: the report has no layers (did calibration see any linear layer?)")
    rows = summarize(reports, roles)
    head = f"{'role':<14} {'layers':>6} {'ratio med':>9} {'ratio max':>9} {'kurt med':>8}  worst layer: top channels"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['role']:<14} {r['layers']:>6} {r['median_ratio']:>9.1f} {r['max_ratio']:>9.1f} "
            f"{r['median_kurtosis']:>8.1f}  {r['worst']}: {_channels(reports[r['worst']])}"
        )
    paths = worst_layers(reports, worst)
    width = max(len(p) for p in paths)
    head2 = f"{'layer':<{width}} {'role':<14} {'ratio':>7} {'kurt':>7} {'overlap':>7}  top channels (x ratio, p persistence)"
    lines += ["", f"largest ratios ({len(paths)} of {len(reports)} layers):", head2, "-" * len(head2)]
    for p in paths:
        rep = reports[p]
        role = ((roles or {}).get(p) or ("-",))[0]
        ov = f"{overlap[p]:>7.2f}" if overlap is not None and p in overlap else f"{'-':>7}"
        lines.append(f"{p:<{width}} {role:<14} {rep.ratio:>7.1f} {rep.kurtosis:>7.1f} {ov}  {_channels(rep)}")
    return "\n".join(lines)
