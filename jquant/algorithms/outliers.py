"""Function-preserving outlier injection: a stress testbed with the activation outliers of real DiTs.

The bundled tiny model has almost none (largest/median channel absmax of a linear input is 2.2,
median over layers), while real DiTs and LLMs have a few input channels 10-1000x above the
median. Those channels are what SmoothQuant, AWQ, QuaRot, SpinQuant and SVDQuant exist for, so
method orderings measured without them say little. This module plants them without changing
what the float model computes: for a linear ``y = x W`` whose input channel ``c`` is made by a
linear producer (or a norm's affine, or an adaLN modulation), scale the producer's output
channel ``c`` by ``s`` and row ``c`` of ``W`` by ``1 / s``. With ``s`` a power of two the float
model is unchanged up to fp32 rounding (tested), and every quantizer now sees a channel ``s``
times larger.

Sites in a Wan2.1 block (every linear input whose producer is affine in it):

* ``attn1`` q/k/v inputs and ``ffn`` up input: the adaLN modulation ``(1 + scale) * norm(x) +
  shift``; ``scale`` and ``shift`` come from the block's ``scale_shift_table`` plus the shared
  ``condition_embedder/time_proj`` output, so the channel is scaled in both (every block at once).
* ``attn2`` q input: ``norm2``'s affine (``cross_attn_norm``).
* ``attn2`` k/v inputs: the text embedding ``condition_embedder/text_embedder/linear_2`` (every
  block's cross-attention reads it).
* ``attn1`` / ``attn2`` output projection input: the attention output is linear in V, so ``to_v``'s
  output channel (and ``add_v_proj``'s, I2V) carries the scale through.

The FFN down projection (after GELU) has no affine producer and is left as it is.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from jquant.rules import flatten_with_paths
from jquant.transform import Context, Transform, Variables

#: The input-channel scales published measurements motivate: a few channels at 10-1000x the
#: median (SmoothQuant: ~100x in LLM activations; Massive Activations, Sun et al. 2024: up to
#: 10^3-10^4x in specific dimensions; DiT PTQ papers: salient outliers concentrated in a few
#: channels). Defaults: 1% of the channels (at least 2) at 64x, one in each site at 256x.
DEFAULT_FRACTION = 0.01
DEFAULT_SCALE = 64.0
DEFAULT_PEAK = 256.0
SITES = ("modulation", "cross_q", "text", "attn_v")


@dataclasses.dataclass(frozen=True)
class OutlierConfig:
    """Which channels get which power-of-two scale, per site.

    Attributes:
      fraction: share of a site's channels that become outliers (at least ``min_channels``).
      scale: their scale (a power of two, so the rewrite is exact in float).
      peak: the first channel's scale (a power of two, >= ``scale``): the largest outlier.
      min_channels: the fewest outlier channels per site.
      sites: which of :data:`SITES` to plant.
      seed: channel choice.
    """

    fraction: float = DEFAULT_FRACTION
    scale: float = DEFAULT_SCALE
    peak: float = DEFAULT_PEAK
    min_channels: int = 2
    sites: tuple[str, ...] = SITES
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("scale", "peak"):
            v = getattr(self, name)
            if not (v >= 1 and float(np.log2(v)).is_integer()):
                raise ValueError(f"OutlierConfig.{name} must be a power of two >= 1 (exact rescaling), got {v}")
        if self.peak < self.scale:
            raise ValueError(f"OutlierConfig.peak ({self.peak}) must be >= scale ({self.scale})")
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"OutlierConfig.fraction must be in [0, 1], got {self.fraction}")
        unknown = set(self.sites) - set(SITES)
        if unknown:
            raise ValueError(f"OutlierConfig.sites: unknown {sorted(unknown)}; known: {SITES}")


def channel_scales(width: int, config: OutlierConfig, salt: int) -> np.ndarray:
    """``[width]`` float32 multipliers: 1 for most channels, ``scale`` / ``peak`` for the chosen ones."""
    n = min(width, max(config.min_channels, int(round(config.fraction * width))))
    rng = np.random.default_rng([config.seed, salt])
    chosen = rng.choice(width, size=n, replace=False)
    s = np.ones(width, np.float32)
    s[chosen] = config.scale
    s[chosen[0]] = config.peak
    return s


def _get(tree: dict, path: str) -> Any:
    node = tree
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"inject_outliers: the model has no param {path!r} (expected a Wan2.1 port)")
        node = node[part]
    return node


def _set(tree: dict, path: str, value: Any) -> None:
    *head, last = path.split("/")
    node = tree
    for part in head:
        node = node[part]
    node[last] = value


def _copy(tree: Any) -> Any:
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _scale(tree: dict, path: str, s: np.ndarray, axis: int) -> None:
    """Multiply the param at ``path`` by ``s`` along ``axis`` (float32 math, dtype kept)."""
    a = _get(tree, path)
    if not hasattr(a, "dtype") or not np.issubdtype(np.asarray(a).dtype, np.floating):
        raise TypeError(f"inject_outliers: {path} is not a float array (inject before quantizing)")
    arr = np.asarray(a)
    shape = [1] * arr.ndim
    shape[axis] = -1
    _set(tree, path, jnp.asarray((arr.astype(np.float32) * s.reshape(shape)).astype(arr.dtype)))


def _blocks(params: dict) -> list[str]:
    names = [k for k in params if re.fullmatch(r"blocks_\d+", k)]
    if not names or "condition_embedder" not in params:
        raise KeyError("inject_outliers: expected a Wan2.1 port's params (blocks_N, condition_embedder)")
    return sorted(names, key=lambda n: int(n.split("_")[1]))


def inject_outliers(params: dict, config: OutlierConfig | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """A Wan2.1 port's params with outlier input channels planted (float output unchanged), and
    ``{linear kernel path: [K] input-channel multiplier}`` for every linear whose input changed."""
    cfg = config or OutlierConfig()
    p = _copy(params)
    blocks = _blocks(p)
    dim = np.asarray(_get(p, f"{blocks[0]}/scale_shift_table")).shape[-1]
    planted: dict[str, np.ndarray] = {}

    if "modulation" in cfg.sites:
        # (1 + scale) * n + shift -> s * that: scale' = s * scale + (s - 1), shift' = s * shift, for
        # table + time_proj; time_proj is shared, so the same channels in every block.
        for idx, (i_shift, i_scale, targets) in enumerate(
            ((0, 1, ("attn1/to_q", "attn1/to_k", "attn1/to_v")), (3, 4, ("ffn/net_0/proj",)))
        ):
            s = channel_scales(dim, cfg, salt=idx)
            full = np.ones(6 * dim, np.float32)
            full[i_shift * dim : (i_shift + 1) * dim] = s
            full[i_scale * dim : (i_scale + 1) * dim] = s
            _scale(p, "condition_embedder/time_proj/kernel", full, 1)
            _scale(p, "condition_embedder/time_proj/bias", full, 0)
            for b in blocks:
                table = np.asarray(_get(p, f"{b}/scale_shift_table"))
                t = table.astype(np.float32).copy()
                t[:, i_shift] *= s
                t[:, i_scale] = t[:, i_scale] * s + (s - 1)
                _set(p, f"{b}/scale_shift_table", jnp.asarray(t.astype(table.dtype)))
                for tgt in targets:
                    _scale(p, f"{b}/{tgt}/kernel", 1 / s, 0)
                    planted[f"{b}/{tgt}/kernel"] = s
    if "text" in cfg.sites:
        s = channel_scales(dim, cfg, salt=2)
        _scale(p, "condition_embedder/text_embedder/linear_2/kernel", s, 1)
        _scale(p, "condition_embedder/text_embedder/linear_2/bias", s, 0)
        for b in blocks:
            for tgt in ("attn2/to_k", "attn2/to_v"):
                _scale(p, f"{b}/{tgt}/kernel", 1 / s, 0)
                planted[f"{b}/{tgt}/kernel"] = s
    for i, b in enumerate(blocks):
        if "cross_q" in cfg.sites and "norm2" in p[b]:
            s = channel_scales(dim, cfg, salt=1000 + i)
            for leaf in p[b]["norm2"]:
                _scale(p, f"{b}/norm2/{leaf}", s, 0)
            _scale(p, f"{b}/attn2/to_q/kernel", 1 / s, 0)
            planted[f"{b}/attn2/to_q/kernel"] = s
        if "attn_v" in cfg.sites:
            for j, attn in enumerate(("attn1", "attn2")):
                s = channel_scales(dim, cfg, salt=2000 + 2 * i + j)
                for v in ("to_v", "add_v_proj"):
                    if v in p[b][attn]:
                        _scale(p, f"{b}/{attn}/{v}/kernel", s, 1)
                        if "bias" in p[b][attn][v]:
                            _scale(p, f"{b}/{attn}/{v}/bias", s, 0)
                _scale(p, f"{b}/{attn}/to_out_0/kernel", 1 / s, 0)
                planted[f"{b}/{attn}/to_out_0/kernel"] = s
    return p, planted


def transform(config: OutlierConfig | None = None) -> Transform:
    """:func:`inject_outliers` as a recipe step (first in a chain: it needs float params)."""

    def fn(v: Variables, ctx: Context) -> Variables:
        del ctx
        for path, leaf in flatten_with_paths(v["params"]):
            if not np.issubdtype(np.asarray(leaf).dtype, np.floating):
                raise TypeError(f"outliers.transform: {path} is already quantized; inject into the float model")
        params, _ = inject_outliers(v["params"], config)
        return {**v, "params": params}

    return Transform("inject_outliers", fn)
