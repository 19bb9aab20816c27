"""Static activation scale tables per timestep group (and CFG branch, and video frame).

A :class:`ScaleTable` holds, for every quantized layer, static activation scales of shape
``[G, Bn, Fn]``: ``G`` timestep groups (:mod:`jquant.pipeline.timesteps`: one group, uniform splits,
or variance-aware optimal segmentation of the per-step ranges), ``Bn`` = 2 with separate
scales for the unconditional and conditional CFG branches (else 1), ``Fn`` = frames with
per-frame scales for layers whose input is the frame-major video token sequence (else 1).

In the sampler the table is ``step_data`` (one row per step, ``table.step_data()``); the
model function turns step i's row into each layer's ``input_scale`` (:func:`expand`):
a scalar (per tensor), ``[2B, 1, 1]`` (one scale per CFG branch row of the batched
``[uncond; cond]`` call), or ``[2B, L, 1]`` (each token gets its frame's scale), which
:func:`jquant.dispatch.quantize_activation` takes as a per-token static scale. One
compilation serves every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import parse_spec
from jquant.pipeline import timesteps
from jquant.pipeline.trajectory import StepRanges

Array = jax.Array
Grouping = Literal["single", "uniform", "variance"]


@dataclasses.dataclass(frozen=True)
class TableConfig:
    """How a scale table is grouped.

    Attributes:
      grouping: ``"single"`` (one static scale for the whole trajectory), ``"uniform"``
        (``groups`` contiguous equal splits) or ``"variance"`` (variance-aware optimal
        contiguous segmentation of the per-step log ranges into ``groups`` groups).
      groups: number of timestep groups (ignored for ``"single"``).
      per_branch: separate scales for the unconditional and conditional CFG branches.
      per_frame: separate scales per video frame for layers fed the video tokens.
      margin: multiplies every calibrated range (> 1 leaves headroom for unseen inputs).
    """

    grouping: Grouping = "variance"
    groups: int = 4
    per_branch: bool = False
    per_frame: bool = False
    margin: float = 1.0

    def __post_init__(self) -> None:
        if self.grouping not in ("single", "uniform", "variance"):
            raise ValueError(f"TableConfig.grouping must be single, uniform or variance, got {self.grouping!r}")
        if self.groups < 1:
            raise ValueError(f"TableConfig.groups must be >= 1, got {self.groups}")
        if not self.margin > 0:
            raise ValueError(f"TableConfig.margin must be > 0, got {self.margin}")

    def describe(self) -> str:
        g = "1 group" if self.grouping == "single" else f"{self.groups} {self.grouping} groups"
        extra = [s for s, on in (("per CFG branch", self.per_branch), ("per frame", self.per_frame)) if on]
        return ", ".join([g, *extra])


@dataclasses.dataclass(frozen=True, eq=False)
class ScaleTable:
    """Static activation scales per (timestep group, CFG branch, frame) for each layer.

    Attributes:
      act: the static activation spec (e.g. ``"int8/t"``).
      groups: int32 ``[T]``: the group of each sampling step.
      scales: ``{module path: float32 [G, Bn, Fn]}``.
      ranks: ``{module path: rank of the layer's input}``.
      video: module paths with per-frame scales.
      frames: video frames the per-frame scales are for.
      config: how the table was built.
    """

    act: str
    groups: np.ndarray
    scales: dict[str, np.ndarray]
    ranks: dict[str, int]
    video: frozenset[str]
    frames: int
    config: TableConfig

    @property
    def num_steps(self) -> int:
        return int(len(self.groups))

    @property
    def num_groups(self) -> int:
        return int(self.groups.max()) + 1

    @property
    def nbytes(self) -> int:
        return int(sum(v.nbytes for v in self.scales.values()))

    def layout(self) -> tuple:
        """Hashable static structure (what the compiled sampler depends on)."""
        return tuple((p, self.ranks[p], p in self.video, *self.scales[p].shape[1:]) for p in sorted(self.scales)) + (
            self.act,
        )

    def step_data(self) -> dict[str, Array]:
        """``{module path: [T, Bn, Fn]}``: the sampler's ``step_data`` (row i = step i)."""
        idx = np.asarray(self.groups, np.int32)
        return {p: jnp.asarray(v[idx]) for p, v in self.scales.items()}

    def to_tree(self) -> dict[str, Any]:
        """Arrays and metadata as a checkpointable tree (see :meth:`from_tree`)."""
        return {
            "groups": np.asarray(self.groups, np.int32),
            "scales": {p: np.asarray(v) for p, v in self.scales.items()},
            "meta": {
                "act": self.act,
                "frames": self.frames,
                "ranks": dict(self.ranks),
                "video": sorted(self.video),
                "config": dataclasses.asdict(self.config),
            },
        }

    @classmethod
    def from_tree(cls, tree: Mapping[str, Any], meta: Mapping[str, Any]) -> "ScaleTable":
        return cls(
            act=meta["act"],
            groups=np.asarray(tree["groups"], np.int32),
            scales={p: np.asarray(v, np.float32) for p, v in tree["scales"].items()},
            ranks={p: int(r) for p, r in meta["ranks"].items()},
            video=frozenset(meta["video"]),
            frames=int(meta["frames"]),
            config=TableConfig(**meta["config"]),
        )


def group_steps(ranges: StepRanges, config: TableConfig, layers: Collection[str] | None = None) -> np.ndarray:
    """Group id per sampling step (``int32 [T]``) by ``config.grouping``; the variance-aware
    features are the log ranges of ``layers`` (default: every observed layer)."""
    t = ranges.num_steps
    if config.grouping == "single":
        return timesteps.single_group(t)
    g = min(config.groups, t)
    if config.grouping == "uniform":
        return timesteps.uniform_groups(t, g)
    feats = ranges.features()
    if layers is not None:
        names = list(ranges.absmax)
        cols = [names.index(p) for p in layers if p in ranges.absmax]
        if not cols:
            raise ValueError("group_steps: none of the given layers was observed during calibration")
        feats = feats[:, cols]
    return timesteps.variance_aware_groups(feats, g)


def build_table(
    ranges: StepRanges, act: str, config: TableConfig = TableConfig(), layers: Collection[str] | None = None
) -> ScaleTable:
    """Static scales ``absmax * margin / qmax`` per group (max over each group's steps).

    ``layers``: module paths to include (those with quantized kernels); default all observed.
    """
    spec = parse_spec(act)
    if spec.dynamic:
        raise ValueError(f"a scale table needs a static activation spec (e.g. 'int8/t'), got {act!r}")
    act = str(spec)
    paths = [p for p in ranges.absmax if layers is None or p in layers]
    if layers is not None:
        missing = sorted(set(layers) - set(ranges.absmax))
        if missing:
            raise KeyError(f"build_table: layers {missing[:6]} were not observed during calibration")
    groups = group_steps(ranges, config, paths)
    per_step = {}
    for p in paths:
        a = ranges.absmax[p] * config.margin  # [T, 2, F]
        if not config.per_branch:
            a = a.max(axis=1, keepdims=True)
        if not (config.per_frame and p in ranges.video):
            a = a.max(axis=2, keepdims=True)
        per_step[p] = a
    scales = timesteps.scale_table(per_step, groups, spec)
    video = frozenset(p for p in paths if config.per_frame and p in ranges.video)
    return ScaleTable(act, groups, scales, {p: ranges.ranks[p] for p in paths}, video, ranges.frames, config)


def expand(s: Array, rank: int, video: bool, batch: int, cfg: bool, frames: int, tokens: int) -> Array:
    """One layer's step row ``[Bn, Fn]`` -> its ``input_scale`` for an input of ``rank``.

    ``batch`` rows are ``[uncond; cond]`` under CFG (``cfg``), else conditional only;
    ``tokens`` video tokens in ``frames`` frame-major frames.
    """
    bn, fn = s.shape
    if bn == 2 and not cfg:
        s = s[1:]
    if fn > 1:
        if not video:
            s = jnp.max(s, axis=1, keepdims=True)
        else:
            if fn != frames or tokens % fn:
                raise ValueError(
                    f"scale table has {fn} frame scales but the input has {frames} frames / {tokens} tokens"
                )
            s = jnp.repeat(s, tokens // fn, axis=1)
    if s.size == 1:
        return s.reshape(())
    if s.shape[0] == 2:
        if batch % 2:
            raise ValueError(f"per-branch scales need an even CFG batch, got {batch}")
        s = jnp.repeat(s, batch // 2, axis=0)
    if rank < 3:
        return s[:, :1].reshape(s.shape[0], *([1] * (rank - 1)))
    return s.reshape(s.shape[0], *([1] * (rank - 3)), s.shape[1], 1)
