"""Trajectory-aware calibration: statistics over the whole denoising trajectory.

Diffusion activations drift from the noisiest step to the last and differ between the
conditional and unconditional (CFG) branches, so calibration must see all of them. The
observers of :mod:`jquant.calib` cannot reach inside the sampler's ``lax.scan``, so the
trajectory is recorded first and replayed:

1. :func:`record` runs the *float* sampler (``return_trajectory=True``) on several
   workloads (seeds x classes/prompts) and keeps every step's input ``x_t``.
2. Every step ``i`` of every sample is replayed as two model calls, ``(x_t, t_i, uncond)``
   (branch 0) and ``(x_t, t_i, cond)`` (branch 1), each through a jitted observed step:

   * :func:`step_ranges`: per layer, per step, per branch and per video frame, the
     absolute maximum of the layer's input (cheap: what scale tables are built from);
   * :func:`layer_stats`: :class:`jquant.calib.LayerStats` (Hessian, absmax, histogram)
     keyed by ``(timestep group, branch)``, accumulated by :func:`jquant.calib.make_step`
     (the step is cached per model, so trees of a structure already seen are not
     traced again); :func:`jquant.calib.merge` pools them for the weight algorithms. A
     subset of the steps per sample (``steps_per_sample``, offset per sample so that
     together the samples cover the trajectory) keeps this pass cheap.

Every frame is observed (the whole clip goes through the model); per-frame maxima keep
the frames apart for per-frame scale tables. The replay uses the variables it is given,
so after a rotation or smoothing the same trajectory is re-observed on the rewritten
model (the statistics of each layer's *effective* input, after ``input_mul`` and
``hadamard``).
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from tqdm.auto import tqdm

from jquant import calib
from jquant import nn as jnn
from jquant.pipeline.denoiser import Denoiser, Variables, Workload

Array = jax.Array
UNCOND, COND = 0, 1


class _FloatStep:
    """The sampler's model function for the float model: ``(params, x, t, cond, slice)``."""

    def __init__(self, den: Denoiser) -> None:
        self.den = den

    def __call__(self, params: Any, x: Array, t: Array, cond: Any, step_slice: Any) -> Array:
        return self.den.apply({"params": params}, x, t, cond)


_FLOAT_FNS: "weakref.WeakKeyDictionary[Denoiser, _FloatStep]" = weakref.WeakKeyDictionary()


def float_model_fn(den: Denoiser, params: Any) -> Partial:
    """The float model as a sampler ``model_fn``: one function object per Denoiser (so
    repeated sampling hits the jit cache) with the params as traced inputs."""
    fn = _FLOAT_FNS.get(den)
    if fn is None:
        fn = _FLOAT_FNS[den] = _FloatStep(den)
    return Partial(fn, params)


@dataclasses.dataclass(frozen=True, eq=False)
class Trajectories:
    """Recorded float trajectories: ``items[j] = (workload, x [T + 1, B, ...])``, x_T first."""

    timesteps: np.ndarray
    items: tuple[tuple[Workload, Array], ...]
    cfg: bool
    frames: int
    tokens: int

    @property
    def num_steps(self) -> int:
        return int(len(self.timesteps))

    @property
    def branches(self) -> tuple[int, ...]:
        return (UNCOND, COND) if self.cfg else (COND,)

    def steps_for(self, sample: int, steps_per_sample: int | None) -> np.ndarray:
        """The steps replayed for workload ``sample``: all, or ``steps_per_sample`` of them
        evenly spaced and offset by the sample index (so the samples cover the trajectory)."""
        t = self.num_steps
        if steps_per_sample is None or steps_per_sample >= t:
            return np.arange(t)
        if steps_per_sample < 1:
            raise ValueError(f"steps_per_sample must be >= 1, got {steps_per_sample}")
        return np.unique((np.arange(steps_per_sample) * t // steps_per_sample + sample) % t)

    def batches(
        self, *, steps_per_sample: int | None = None, groups: np.ndarray | None = None
    ) -> Iterator[dict[str, Any]]:
        """Model inputs ``{"x", "t", "cond", "key"}``, one per (sample, step, branch);
        ``key = [group of the step, branch]`` (group 0 without ``groups``)."""
        g = np.zeros(self.num_steps, np.int32) if groups is None else np.asarray(groups, np.int32)
        if g.shape != (self.num_steps,):
            raise ValueError(f"groups must have one entry per step ({self.num_steps}), got shape {g.shape}")
        for j, (work, traj) in enumerate(self.items):
            for i in self.steps_for(j, steps_per_sample):
                for br in self.branches:
                    cond = work.cond if br == COND else work.uncond
                    yield {
                        "x": traj[i],
                        "t": jnp.asarray(self.timesteps[i]),
                        "cond": cond,
                        "key": np.array([g[i], br], np.int32),
                        "step": int(i),
                    }


def record(den: Denoiser, params: Any, workloads: Sequence[Workload]) -> Trajectories:
    """Run the float sampler on every workload and keep the trajectories (step 1 of 2)."""
    if not workloads:
        raise ValueError("record: give at least one workload")
    fn = float_model_fn(den, params)
    items = []
    for w in workloads:
        _, traj = den.sample(fn, w, return_trajectory=True)
        items.append((w, jax.block_until_ready(traj)))
    shape = tuple(workloads[0].x_T.shape)
    frames, tokens = den.frames_fn(shape) if den.frames_fn is not None else (1, -1)
    return Trajectories(den.timesteps(), tuple(items), den.cfg, int(frames), int(tokens))


# --- per-step ranges ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepRanges:
    """Per-layer input absmax over the trajectory.

    Attributes:
      absmax: ``{module path: float32 [T, 2, F]}`` (branch 0 = unconditional, 1 =
        conditional; ``F`` = frames for layers whose input is the video token sequence,
        else 1). Without CFG the unconditional row repeats the conditional one.
      ranks: ``{module path: rank of the layer's input}``.
      video: module paths whose input's token axis (-2) is the frame-major video sequence.
      frames: video frames (latent) the per-frame maxima are over; 1 for images.
      timesteps: the sampler's timesteps [T].
    """

    absmax: dict[str, np.ndarray]
    ranks: dict[str, int]
    video: frozenset[str]
    frames: int
    timesteps: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(len(self.timesteps))

    def features(self) -> np.ndarray:
        """``[T, layers]`` log2 of each layer's absmax per step (max over branches and frames):
        the features variance-aware grouping segments."""
        cols = [np.log2(np.maximum(a.reshape(a.shape[0], -1).max(1), 1e-12)) for a in self.absmax.values()]
        return np.stack(cols, axis=1)


def _range_fn(den: Denoiser, frames: int, tokens: int, meta: dict[str, Any]):
    def fn(variables: Variables, x: Array, t: Array, cond: Any) -> dict[str, Array]:
        out: dict[str, Array] = {}

        def obs(path: str, a: Array) -> None:
            am = jnp.max(jnp.abs(a.astype(jnp.float32)), axis=-1)
            video = frames > 1 and a.ndim >= 3 and a.shape[-2] == tokens
            per = am.reshape(-1, frames, tokens // frames).max(axis=(0, 2)) if video else jnp.max(am)[None]
            meta.setdefault("ranks", {})[path] = a.ndim
            if video:
                meta.setdefault("video", set()).add(path)
            if path in out and out[path].shape != per.shape:
                per = jnp.maximum(jnp.max(out[path]), jnp.max(per))[None]
                meta.setdefault("video", set()).discard(path)
            out[path] = jnp.maximum(out[path], per) if path in out else per

        with jnn.observe(obs):
            den.apply(variables, x, t, cond)
        return out

    return jax.jit(fn)


# Jitted replay steps, one per (Denoiser, layout): later calls on trees of an already seen
# structure reuse the compiled step instead of tracing the model again.
_RANGE_FNS: "weakref.WeakKeyDictionary[Denoiser, dict]" = weakref.WeakKeyDictionary()
_STAT_STEPS: "weakref.WeakKeyDictionary[Denoiser, dict]" = weakref.WeakKeyDictionary()


def _cached_range_fn(den: Denoiser, frames: int, tokens: int) -> tuple[Any, dict[str, Any]]:
    per = _RANGE_FNS.setdefault(den, {})
    if (frames, tokens) not in per:
        meta: dict[str, Any] = {}
        per[(frames, tokens)] = (_range_fn(den, frames, tokens, meta), meta)
    return per[(frames, tokens)]


def step_ranges(den: Denoiser, variables: Variables, traj: Trajectories, *, progress: bool = False) -> StepRanges:
    """Replay every step of every recorded sample (both branches) and reduce each layer's
    input to its absmax per (step, branch, frame)."""
    fn, meta = _cached_range_fn(den, traj.frames, traj.tokens)
    acc: dict[str, np.ndarray] = {}
    it = traj.batches()
    if progress:
        it = tqdm(it, desc="step ranges", leave=False, total=len(traj.items) * traj.num_steps * len(traj.branches))
    for b in it:
        part = jax.device_get(fn(variables, b["x"], b["t"], b["cond"]))
        i, br = b["step"], int(b["key"][1])
        for path, v in part.items():
            if path not in acc:
                acc[path] = np.zeros((traj.num_steps, 2, v.shape[0]), np.float32)
            acc[path][i, br] = np.maximum(acc[path][i, br], v)
    if not acc:
        raise ValueError("step_ranges: no linear layer was observed (does the model use flax Dense layers?)")
    if not traj.cfg:
        for a in acc.values():
            a[:, UNCOND] = a[:, COND]
    video = frozenset(p for p in meta.get("video", ()) if p in acc)
    return StepRanges(acc, {p: meta["ranks"][p] for p in acc}, video, traj.frames if video else 1, traj.timesteps)


# --- activation samples ---------------------------------------------------------------------------
def _capture_fn(den: Denoiser, keep: int):
    def fn(variables: Variables, x: Array, t: Array, cond: Any) -> dict[str, Array]:
        out: dict[str, Array] = {}

        def obs(path: str, a: Array) -> None:
            rows = a.reshape(-1, a.shape[-1]).astype(jnp.float32)
            stride = max(1, rows.shape[0] // keep)
            out.setdefault(path, rows[::stride][:keep])

        with jnn.observe(obs):
            den.apply(variables, x, t, cond)
        return out

    return jax.jit(fn)


def capture_samples(
    den: Denoiser, variables: Variables, traj: Trajectories, max_tokens: int = 2048
) -> dict[str, Array]:
    """Input rows ``{module path: [N <= max_tokens, K]}`` of every layer, drawn evenly from
    every step and both branches of the first recorded workload (methods that optimize on
    activations, e.g. SpinQuant, take these)."""
    batches = list(itertools.islice(traj.batches(), traj.num_steps * len(traj.branches)))  # the first workload
    keep = max(1, -(-max_tokens // len(batches)))
    fn = _capture_fn(den, keep)
    parts: dict[str, list[Array]] = {}
    for b in batches:
        for path, rows in fn(variables, b["x"], b["t"], b["cond"]).items():
            parts.setdefault(path, []).append(rows)
    return {p: jnp.concatenate(v)[:max_tokens] for p, v in parts.items()}


# --- full layer statistics ------------------------------------------------------------------------
def _calib_apply(den: Denoiser):
    def apply_fn(variables: Variables, batch: dict[str, Any]) -> Array:
        return den.apply(variables, batch["x"], batch["t"], batch["cond"])

    return apply_fn


def layer_stats(
    den: Denoiser,
    variables: Variables,
    traj: Trajectories,
    *,
    groups: np.ndarray | None = None,
    steps_per_sample: int | None = None,
    config: calib.CalibConfig | None = None,
    progress: bool = False,
) -> dict[tuple[int, int], calib.Stats]:
    """:class:`jquant.calib.LayerStats` per layer, keyed by ``(timestep group, branch)``.

    Pool with ``calib.merge(*result.values())`` for methods that want one set.
    """
    config = config or calib.CalibConfig()
    steps = _STAT_STEPS.setdefault(den, {})
    if config not in steps:
        steps[config] = calib.make_step(_calib_apply(den), config)
    step = steps[config]
    it = traj.batches(steps_per_sample=steps_per_sample, groups=groups)
    if progress:
        it = tqdm(it, desc="trajectory calibration", leave=False)
    out: dict[tuple[int, int], calib.Stats] = {}
    template = None
    for b in it:
        key = (int(b["key"][0]), int(b["key"][1]))
        batch = {k: b[k] for k in ("x", "t", "cond")}
        if key not in out:
            template = template if template is not None else calib.init(_calib_apply(den), variables, batch, config)
            out[key] = jax.tree.map(jnp.zeros_like, template)
        out[key] = step(out[key], variables, batch)
    if not out:
        raise ValueError("layer_stats: no calibration batches (empty trajectories)")
    for s in out.values():
        calib.validate(s)
    return out


def pooled_stats(per_key: dict[Any, calib.Stats]) -> calib.Stats:
    """All groups and branches pooled into one ``{kernel path: LayerStats}``."""
    return calib.merge(*per_key.values())
