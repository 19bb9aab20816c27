"""Frechet distance between Gaussian fits of two feature sets, with pluggable features.

``FD = |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2)``, the formula
behind FID and FVD. The matrix square root is taken by eigendecomposition of symmetric PSD
matrices (``C_a^1/2`` first, then the symmetric product), with negative round-off eigenvalues
clipped to zero: stable for rank-deficient covariances (fewer samples than dimensions) where
``sqrtm(C_a C_b)`` of a non-symmetric product is not. Matmuls run at HIGHEST precision; the
computation uses the features' dtype (float32 unless x64 is enabled).

The FD values depend entirely on the feature extractor. The built-in extractors need no
download and carry no semantics; for FID/FVD-comparable numbers pass your own network (an
Inception, CLIP or I3D apply function) as a :class:`FeatureExtractor`.
"""

from __future__ import annotations

import functools
from typing import Protocol

import jax
import jax.numpy as jnp

from jquant.metrics._video import as_video

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST


class FeatureExtractor(Protocol):
    """Maps videos ``[B, T, H, W, C]`` to features ``[N, D]`` (one row per sample).

    Any ``Callable[[Array], Array]`` fits: a jitted CLIP image tower applied per frame, an I3D
    network applied per clip, or the built-ins below. Inputs are the same arrays given to the
    metric (same value range); resizing/normalising for a network is the extractor's job.
    """

    def __call__(self, videos: Array, /) -> Array: ...


def gaussian_stats(features: Array) -> tuple[Array, Array]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of ``[N, D]`` features (N >= 2)."""
    f = jnp.asarray(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2 samples, got shape {f.shape}")
    return _stats(f.astype(jnp.promote_types(f.dtype, jnp.float32)))


@jax.jit
def _stats(f: Array) -> tuple[Array, Array]:
    mu = jnp.mean(f, axis=0)
    c = f - mu
    return mu, jnp.matmul(c.T, c, precision=_HI) / (f.shape[0] - 1)


def _psd_sqrt(m: Array) -> Array:
    w, v = jnp.linalg.eigh((m + m.T) / 2)
    return jnp.matmul(v * jnp.sqrt(jnp.clip(w, 0.0)), v.T, precision=_HI)


@jax.jit
def frechet_distance_from_stats(mu_a: Array, cov_a: Array, mu_b: Array, cov_b: Array) -> Array:
    """Frechet distance between ``N(mu_a, cov_a)`` and ``N(mu_b, cov_b)`` (scalar, >= 0)."""
    sa = _psd_sqrt(cov_a)
    m = jnp.matmul(jnp.matmul(sa, cov_b, precision=_HI), sa, precision=_HI)
    eig = jnp.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = jnp.sum(jnp.sqrt(jnp.clip(eig, 0.0)))
    d = mu_a - mu_b
    fd = jnp.dot(d, d, precision=_HI) + jnp.trace(cov_a) + jnp.trace(cov_b) - 2 * tr_sqrt
    return jnp.maximum(fd, 0.0)


def frechet_distance(feats_a: Array, feats_b: Array) -> Array:
    """Frechet distance between two feature sets ``[N_a, D]`` and ``[N_b, D]`` (scalar)."""
    mu_a, cov_a = gaussian_stats(feats_a)
    mu_b, cov_b = gaussian_stats(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b)


def pooled_pixel_features(videos: Array, *, grid: int = 4) -> Array:
    """Deterministic per-frame pixel statistics, ``[B * T, C * (grid^2 + 3)]``.

    Per frame and channel: the mean, the standard deviation, the mean absolute change from
    the previous frame (0 for the first frame), and the means of a ``grid x grid`` partition
    of the frame (layout). It needs no weights and is sensitive to colour shifts, contrast
    loss, blockwise brightness errors and temporal jitter. It is NOT a perceptual or semantic
    feature: its FD is not comparable to FID/FVD and is blind to fine texture.
    """
    v = as_video(videos, "videos")
    h, w = v.shape[2:4]
    if grid < 1 or h < grid or w < grid:
        raise ValueError(f"pooled_pixel_features: frames {h}x{w} do not fit grid={grid}")
    return _pooled(v, grid)


@functools.partial(jax.jit, static_argnames=("grid",))
def _pooled(v: Array, grid: int) -> Array:
    b, t, h, w, c = v.shape
    x = v.reshape(b * t, h, w, c)
    mean, std = jnp.mean(x, axis=(1, 2)), jnp.std(x, axis=(1, 2))
    diff = jnp.abs(v[:, 1:] - v[:, :-1]).mean(axis=(2, 3))
    diff = jnp.concatenate([jnp.zeros((b, 1, c), v.dtype), diff], axis=1).reshape(b * t, c)
    hh, ww = (h // grid) * grid, (w // grid) * grid
    cells = x[:, :hh, :ww].reshape(b * t, grid, hh // grid, grid, ww // grid, c).mean(axis=(2, 4))
    return jnp.concatenate([mean, std, diff, cells.reshape(b * t, -1)], axis=-1)


def random_projection_features(dim: int = 64, *, size: int = 16, seed: int = 0) -> FeatureExtractor:
    """Extractor: each frame resized to ``size x size`` and linearly projected to ``dim``.

    The projection matrix is a fixed Gaussian (``seed``, variance ``1 / (size^2 C)``), so
    distances between frames are approximately preserved (Johnson-Lindenstrauss) and the FD is
    a cheap, reproducible stand-in for a pixel-space FD. It is NOT perceptual: it weighs every
    pixel alike and knows nothing of content. Output ``[B * T, dim]``.
    """
    if dim < 1 or size < 1:
        raise ValueError(f"dim and size must be >= 1, got dim={dim}, size={size}")

    @jax.jit
    def project(v: Array) -> Array:
        b, t, _, _, c = v.shape
        x = jax.image.resize(v.reshape((b * t,) + v.shape[2:]), (b * t, size, size, c), "linear", antialias=True)
        d_in = size * size * c
        proj = jax.random.normal(jax.random.key(seed), (d_in, dim), x.dtype) / jnp.sqrt(d_in).astype(x.dtype)
        return jnp.matmul(x.reshape(b * t, d_in), proj, precision=_HI)

    def extract(videos: Array) -> Array:
        return project(as_video(videos, "videos"))

    return extract


def feature_frechet_distance(ref: Array, test: Array, extractor: FeatureExtractor = pooled_pixel_features) -> Array:
    """``frechet_distance(extractor(ref), extractor(test))``."""
    return frechet_distance(extractor(ref), extractor(test))
