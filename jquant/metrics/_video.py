"""Shared helpers for the metrics: input normalisation and separable Gaussian filtering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def as_video(x: Array, name: str) -> Array:
    """``[B, T, H, W, C]`` float array; a 4-D ``[B, H, W, C]`` image batch becomes ``T = 1``."""
    x = jnp.asarray(x)
    if x.ndim == 4:
        x = x[:, None]
    elif x.ndim != 5:
        raise ValueError(
            f"{name} must be [batch, frames, height, width, channels] or [batch, height, width, channels]; "
            f"got shape {x.shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def as_pair(ref: Array, test: Array) -> tuple[Array, Array]:
    """Both clips as ``[B, T, H, W, C]``; their shapes must agree."""
    r, t = as_video(ref, "ref"), as_video(test, "test")
    if r.shape != t.shape:
        raise ValueError(f"ref and test must have the same shape, got {r.shape} and {t.shape}")
    return r, t


def frames(x: Array) -> Array:
    """``[B, T, H, W, C] -> [B * T, H, W, C]``."""
    return x.reshape((-1,) + x.shape[2:])


def gaussian_kernel_1d(size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of odd ``size`` (the SSIM window is ``outer(g, g)``)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be a positive odd integer, got {size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    return (g / g.sum()).astype(np.float32)


def gaussian_filter(x: Array, kernel_1d: np.ndarray, *, edge_pad: bool) -> Array:
    """Separable depthwise Gaussian filter of ``[N, H, W, C]``, each channel on its own.

    ``edge_pad=False`` is 'valid' filtering (output shrinks by ``size - 1``), as in Wang et
    al.'s SSIM; ``edge_pad=True`` replicates the border so the output keeps the input's size.
    Stack several maps along C to filter them in one call.
    """
    k = kernel_1d.shape[0]
    c = x.shape[-1]
    if edge_pad:
        r = (k - 1) // 2
        x = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    kern = jnp.asarray(kernel_1d, x.dtype)

    def conv(v: Array, w: Array) -> Array:
        return jax.lax.conv_general_dilated(
            v,
            jnp.tile(w, (1, 1, 1, c)),
            window_strides=(1, 1),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=c,
            precision=jax.lax.Precision.HIGHEST,
        )

    return conv(conv(x, kern.reshape(k, 1, 1, 1)), kern.reshape(1, k, 1, 1))
