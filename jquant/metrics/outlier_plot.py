"""A picture of the activation-outlier report (:mod:`jquant.metrics.outliers`): every linear layer
in depth order, its largest / median channel absmax on a log axis (coloured by layer role), and
under it the persistence of its largest channel (near or above 1: a channel outlier on every
token; far below 1: a token spike).

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no display, no global state).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from jquant.metrics.outliers import LayerOutliers

_BLOCK = re.compile(r"^(.*blocks)_(\d+)$")
_TAIL_ROLES = ("final",)
#: Figure size (inches) and resolution of :func:`plot_outliers`: the PNG is 1000 x 600 pixels.
FIGSIZE = (10.0, 6.0)
DPI = 100


@dataclasses.dataclass(frozen=True)
class OutlierPlot:
    """What :func:`plot_outliers` draws, in drawing order (one entry per layer).

    Attributes:
      paths: kernel paths, ordered by depth.
      roles: each layer's first role label (``"-"`` without roles).
      ratio: largest / median channel absmax (top panel, log axis).
      persistence: persistence of the largest channel (bottom panel; NaN where unknown).
      block: the block index of each layer (-1 before the first block, one past the last after it).
      group: each layer's tick label: ``emb`` (before the blocks), the block number (``sN`` in a
        ``single*`` stack), ``head`` (after them).
    """

    paths: tuple[str, ...]
    roles: tuple[str, ...]
    ratio: np.ndarray
    persistence: np.ndarray
    block: np.ndarray
    group: tuple[str, ...]


def depth_key(path: str, role: str = "-") -> tuple[int, int, int]:
    """Sort key by depth: non-block layers first (embedders), then ``*blocks_N`` by ``N`` (a
    ``single*`` stack after the others, as in Flux), then the head (role ``final``)."""
    for part in path.split("/"):
        m = _BLOCK.match(part)
        if m:
            return (1, int("single" in m.group(1)), int(m.group(2)))
    return (2 if role in _TAIL_ROLES else 0, 0, 0)


def plot_data(reports: Mapping[str, LayerOutliers], roles: Mapping[str, Sequence[str]] | None = None) -> OutlierPlot:
    """The arrays :func:`plot_outliers` draws: one entry per layer of ``reports``, by depth."""
    if not reports:
        raise ValueError("plot_data: the report has no layers")
    role_of = {p: ((roles or {}).get(p) or ("-",))[0] for p in reports}
    pos = {p: i for i, p in enumerate(reports)}
    paths = tuple(sorted(reports, key=lambda p: (depth_key(p, role_of[p]), pos[p])))
    keys = [depth_key(p, role_of[p]) for p in paths]
    blocks_seen = sorted({(k[1], k[2]) for k in keys if k[0] == 1})
    index = {b: i for i, b in enumerate(blocks_seen)}
    block = np.array([-1 if k[0] == 0 else len(blocks_seen) if k[0] == 2 else index[(k[1], k[2])] for k in keys])
    group = tuple(("emb", f"{'s' * k[1]}{k[2]}", "head")[k[0]] for k in keys)
    return OutlierPlot(
        paths=paths,
        roles=tuple(role_of[p] for p in paths),
        ratio=np.array([reports[p].ratio for p in paths], np.float64),
        persistence=np.array(
            [reports[p].persistence[0] if reports[p].persistence else np.nan for p in paths], np.float64
        ),
        block=block,
        group=group,
    )


def _block_ticks(data: OutlierPlot) -> tuple[list[float], list[str]]:
    """Tick positions (centre of each block's run of layers) and their group labels."""
    pos, lab = [], []
    for b in np.unique(data.block):
        idx = np.flatnonzero(data.block == b)
        pos.append(float(idx.mean()))
        lab.append(data.group[idx[0]])
    return pos, lab


def outlier_figure(data: OutlierPlot, title: str | None = None) -> Figure:
    """Two panels over the layer index: ratio (log) coloured by role; top-channel persistence (log)."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    x = np.arange(len(data.paths))
    colours = {r: f"C{i % 10}" for i, r in enumerate(sorted(set(data.roles)))}
    for role, c in colours.items():
        sel = np.array([r == role for r in data.roles])
        top.scatter(x[sel], data.ratio[sel], s=18, color=c, label=role, zorder=3)
        ok = sel & np.isfinite(data.persistence)
        bottom.scatter(x[ok], data.persistence[ok], s=12, color=c, zorder=3)
    starts = np.flatnonzero(np.diff(data.block) != 0) + 0.5
    for ax in (top, bottom):
        for s in starts:
            ax.axvline(s, color="0.85", lw=0.8, zorder=1)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
        ax.grid(True, axis="y", which="major", alpha=0.3)
    top.set_ylabel("largest / median\nchannel absmax")
    top.legend(fontsize=8, ncol=len(colours), loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False)
    bottom.set_ylabel("persistence of\nlargest channel")
    pos, lab = _block_ticks(data)
    bottom.set_xticks(pos, lab)
    bottom.set_xlabel("linear layers by depth, grouped by block (emb: embedders, head: output projection)")
    fig.suptitle(title or "activation outliers of linear-layer inputs")
    fig.tight_layout()
    return fig


def plot_outliers(
    reports: Mapping[str, LayerOutliers],
    path: str | Path,
    roles: Mapping[str, Sequence[str]] | None = None,
    *,
    title: str | None = None,
) -> OutlierPlot:
    """Draw the report (:func:`outlier_figure`) to a PNG at ``path`` (``FIGSIZE`` at ``DPI``) and
    return the plotted arrays."""
    data = plot_data(reports, roles)
    fig = outlier_figure(data, title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return data
