"""Per-timestep activation scale tables and timestep grouping.

Diffusion activations drift across the denoising trajectory, so one static activation
scale per layer is a compromise. A *scale table* keeps one static scale per layer and per
timestep *group*; the jitted sampler receives the table expanded to one row per step
(``step_rows``) as its ``step_data`` and hands the row of step i to the model as the
``"jquant"`` aux collection: one compilation, the right scale each step.

Grouping (all return a group id per sampling step, ``int[num_steps]``):
  * ``single_group``: one scale for the whole trajectory (the usual static baseline).
  * ``uniform_groups``: contiguous groups of (nearly) equal length.
  * ``variance_aware_groups``: contiguous groups chosen by optimal 1-D segmentation
    (dynamic programming) of the per-step activation statistics, minimizing the
    within-group sum of squared deviations of log-absmax: steps whose ranges agree share
    a scale; where ranges change fast, groups are short.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jquant.formats import QSpec, parse_spec


def single_group(num_steps: int) -> np.ndarray:
    return np.zeros(num_steps, np.int32)


def uniform_groups(num_steps: int, num_groups: int) -> np.ndarray:
    """Contiguous, nearly equal groups: step i -> floor(i * G / T)."""
    if not 1 <= num_groups <= num_steps:
        raise ValueError(f"num_groups must be in [1, {num_steps}], got {num_groups}")
    return (np.arange(num_steps) * num_groups // num_steps).astype(np.int32)


def variance_aware_groups(step_features: np.ndarray, num_groups: int) -> np.ndarray:
    """Optimal contiguous segmentation of per-step feature vectors ``[T, F]``.

    Minimizes the sum over groups of squared distances of each step's features to its
    group mean (exact DP, O(G T^2 F)); features are typically log per-layer absmax.
    """
    x = np.asarray(step_features, np.float64)
    if x.ndim == 1:
        x = x[:, None]
    t = x.shape[0]
    if not 1 <= num_groups <= t:
        raise ValueError(f"num_groups must be in [1, {t}], got {num_groups}")
    if not np.all(np.isfinite(x)):
        raise ValueError("step features contain NaN/Inf")
    c1 = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(x, 0)])
    c2 = np.concatenate([np.zeros(1), np.cumsum((x**2).sum(1))])

    def cost(i: int, j: int) -> float:  # steps i..j-1
        n = j - i
        s = c1[j] - c1[i]
        return float(c2[j] - c2[i] - (s @ s) / n)

    inf = float("inf")
    best = np.full((num_groups + 1, t + 1), inf)
    arg = np.zeros((num_groups + 1, t + 1), np.int64)
    best[0, 0] = 0.0
    for g in range(1, num_groups + 1):
        for j in range(g, t + 1):
            for i in range(g - 1, j):
                v = best[g - 1, i] + cost(i, j)
                if v < best[g, j]:
                    best[g, j], arg[g, j] = v, i
    ids = np.zeros(t, np.int32)
    j = t
    for g in range(num_groups, 0, -1):
        i = arg[g, j]
        ids[i:j] = g - 1
        j = i
    return ids


def within_group_spread(step_features: np.ndarray, groups: np.ndarray) -> float:
    """Sum of squared deviations from group means (what variance-aware grouping minimizes)."""
    x = np.asarray(step_features, np.float64).reshape(len(groups), -1)
    return float(sum(((x[groups == g] - x[groups == g].mean(0)) ** 2).sum() for g in np.unique(groups)))


def scale_table(
    step_absmax: Mapping[str, np.ndarray], groups: np.ndarray, act: QSpec | str = "int8/t"
) -> dict[str, np.ndarray]:
    """Per-layer static scales per group: ``{path: float32[G]}`` from per-step absmax ``[T]``.

    A group's scale covers the largest absmax of its steps (no clipping), divided by the
    format's largest code.
    """
    spec = parse_spec(act)
    qmax = spec.format.qmax
    groups = np.asarray(groups)
    n = int(groups.max()) + 1
    out = {}
    for path, am in step_absmax.items():
        am = np.asarray(am, np.float32).reshape(len(groups), *np.shape(am)[1:])
        per = np.stack([am[groups == g].max(0) for g in range(n)])
        out[path] = np.maximum(per / qmax, 1e-12).astype(np.float32)
    return out


def step_rows(table: Mapping[str, np.ndarray], groups: np.ndarray) -> dict[str, Any]:
    """Expand a group table to one row per step, nested as a ``"jquant"`` collection.

    The result is a pytree whose leaves have leading dimension ``num_steps``: pass it as
    the sampler's ``step_data``; its i-th slice is the aux collection for step i.
    """
    idx = jnp.asarray(np.asarray(groups, np.int32))
    return aux_tree({p: jnp.asarray(v)[idx] for p, v in table.items()})


def aux_tree(flat: Mapping[str, Any], name: str = "input_scale") -> dict[str, Any]:
    """``{'blocks_0/attn/to_q': s}`` -> ``{'blocks_0': {'attn': {'to_q': {name: s}}}}``."""
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node[name] = v
    return tree
