"""Synthetic linear-layer problems with DiT-like statistics, for tests, tables and benchmarks.

Activations of DiT linears are strongly correlated across channels (a decaying spectrum),
have per-channel offsets, and a few channels run 20-100x larger than the rest; weights are
roughly Gaussian with a sparse set of large entries. :func:`layer_problem` builds such a
pair ``(x [T, K], w [K, N])`` from a seed with numpy (identical on every JAX version).
"""

from __future__ import annotations

import numpy as np


def outlier_activations(
    seed: int,
    tokens: int,
    channels: int,
    *,
    n_outliers: int = 4,
    outlier_scale: tuple[float, float] = (20.0, 100.0),
    decay: float = 0.9,
    noise: float = 0.05,
) -> np.ndarray:
    """x [T, K]: a correlated signal (spectrum ``decay**i``) plus noise and channel offsets,
    with ``n_outliers`` channels scaled by factors drawn from ``outlier_scale``."""
    rng = np.random.default_rng(seed)
    r = min(channels, 64)
    z = rng.standard_normal((tokens, r)) * (decay ** np.arange(r))[None, :] ** 0.5
    mix = rng.standard_normal((r, channels)) / np.sqrt(r)
    x = z @ mix * 3.0 + noise * rng.standard_normal((tokens, channels)) + 0.2 * rng.standard_normal(channels)[None, :]
    if n_outliers:
        idx = rng.choice(channels, n_outliers, replace=False)
        x[:, idx] *= rng.uniform(*outlier_scale, n_outliers)[None, :]
    return x.astype(np.float32)


def heavy_tailed_weights(
    seed: int, k: int, n: int, *, outlier_frac: float = 0.005, outlier_scale: float = 10.0
) -> np.ndarray:
    """w [K, N] ~ N(0, 1/K) with a fraction ``outlier_frac`` of entries ``outlier_scale`` x larger."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)) / np.sqrt(k)
    w[rng.random((k, n)) < outlier_frac] *= outlier_scale
    return w.astype(np.float32)


def layer_problem(
    seed: int, k: int, n: int, tokens: int, *, n_outliers: int = 4, weight_outliers: float = 0.005
) -> tuple[np.ndarray, np.ndarray]:
    """One layer: (activations [T, K] with outlier channels, weights [K, N])."""
    x = outlier_activations(seed, tokens, k, n_outliers=n_outliers)
    w = heavy_tailed_weights(seed + 1, k, n, outlier_frac=weight_outliers)
    return x, w
