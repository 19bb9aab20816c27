"""Per-frame pixel fidelity: MSE, PSNR and SSIM.

Inputs are videos ``[B, T, H, W, C]`` or images ``[B, H, W, C]`` (treated as ``T = 1``),
with pixel values in ``[0, data_range]`` (or any interval of that width: only differences
and the constants ``(K * data_range)^2`` depend on it). Outputs are per frame, ``[B, T]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jquant.metrics._video import as_pair, frames, gaussian_filter, gaussian_kernel_1d

Array = jax.Array


@jax.jit
def _mse(r: Array, t: Array) -> Array:
    return jnp.mean((r - t) ** 2, axis=(2, 3, 4))


def mse(ref: Array, test: Array) -> Array:
    """Mean squared error per frame, ``[B, T]``."""
    r, t = as_pair(ref, test)
    return _mse(r, t)


def psnr(ref: Array, test: Array, *, data_range: float = 1.0) -> Array:
    """PSNR in dB per frame, ``[B, T]``: ``10 log10(data_range^2 / MSE)``; ``inf`` where equal."""
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    err = mse(ref, test)
    return jnp.where(err == 0, jnp.inf, 10.0 * jnp.log10(data_range**2 / jnp.where(err == 0, 1.0, err)))


@functools.partial(jax.jit, static_argnames=("win_size", "sigma", "data_range", "k1", "k2"))
def _ssim_frames(r: Array, t: Array, *, win_size: int, sigma: float, data_range: float, k1: float, k2: float):
    g = gaussian_kernel_1d(win_size, sigma)
    f = functools.partial(gaussian_filter, kernel_1d=g, edge_pad=False)
    mu_r, mu_t = f(r), f(t)
    var_r = f(r * r) - mu_r**2
    var_t = f(t * t) - mu_t**2
    cov = f(r * t) - mu_r * mu_t
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_r * mu_t + c1) * (2 * cov + c2)) / ((mu_r**2 + mu_t**2 + c1) * (var_r + var_t + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def ssim(
    ref: Array,
    test: Array,
    *,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Array:
    """Structural similarity per frame, ``[B, T]`` (Wang et al. 2004).

    Each channel gets the SSIM map under an ``win_size x win_size`` Gaussian window
    (``sigma``) with population (biased) local statistics, computed only where the window
    fits ('valid', like the reference MATLAB code and ``tf.image.ssim``); the map is averaged
    over positions and channels. Frames must be at least ``win_size`` pixels on each side.
    """
    r, t = as_pair(ref, test)
    h, w = r.shape[2:4]
    if min(h, w) < win_size:
        raise ValueError(f"ssim: frames are {h}x{w}, smaller than win_size={win_size}; pass a smaller win_size")
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    out = _ssim_frames(
        frames(r),
        frames(t),
        win_size=win_size,
        sigma=float(sigma),
        data_range=float(data_range),
        k1=float(k1),
        k2=float(k2),
    )
    return out.reshape(r.shape[:2])
