"""Optical flow in JAX: coarse-to-fine Lucas-Kanade and bilinear backward warping.

Flow convention: ``flow[n, y, x] = (dx, dy)`` lives on the *target* grid and points into the
*source* frame, so ``warp(source, flow)[y, x] = source[y + dy, x + dx] ~ target[y, x]``.
For a clip translating by ``d`` pixels per frame, the flow from frame ``t+1`` (target) into
frame ``t`` (source) is ``-d``.

This estimator is meant for fidelity metrics (warp error), not for state-of-the-art flow:
it handles smooth motion up to roughly ``2^(levels-1)`` pixels per frame and returns zero
flow in textureless regions (the Tikhonov term ``reg`` keeps the 2x2 systems solvable).
Samples that fall outside the source frame are left out of the least-squares sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jquant.metrics._video import gaussian_filter, gaussian_kernel_1d

Array = jax.Array


@jax.jit
def warp(source: Array, flow: Array) -> tuple[Array, Array]:
    """Bilinear backward warp of ``source [N, H, W, C]`` by ``flow [N, H, W, 2]``.

    Returns ``(warped [N, H, W, C], valid [N, H, W] bool)``; ``valid`` marks target pixels
    whose sample point lies inside the source frame (outside points are border-clamped).
    """
    n, h, w, c = source.shape
    if flow.shape != (n, h, w, 2):
        raise ValueError(f"flow must have shape {(n, h, w, 2)} to warp source {source.shape}, got {flow.shape}")
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=flow.dtype), jnp.arange(w, dtype=flow.dtype), indexing="ij")
    sx, sy = xs + flow[..., 0], ys + flow[..., 1]
    valid = (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
    sx, sy = jnp.clip(sx, 0, w - 1), jnp.clip(sy, 0, h - 1)
    x0 = jnp.clip(jnp.floor(sx), 0, max(w - 2, 0)).astype(jnp.int32)
    y0 = jnp.clip(jnp.floor(sy), 0, max(h - 2, 0)).astype(jnp.int32)
    x1, y1 = jnp.minimum(x0 + 1, w - 1), jnp.minimum(y0 + 1, h - 1)
    wx, wy = (sx - x0)[..., None], (sy - y0)[..., None]
    flat = source.reshape(n, h * w, c)

    def at(yy, xx):
        idx = (yy * w + xx).reshape(n, h * w, 1)
        return jnp.take_along_axis(flat, idx, axis=1).reshape(n, h, w, c)

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy, valid


def _gradients(img: Array) -> tuple[Array, Array]:
    """Central differences of ``[N, H, W, 1]`` with replicated borders."""
    p = jnp.pad(img, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    gx = (p[:, 1:-1, 2:] - p[:, 1:-1, :-2]) / 2
    gy = (p[:, 2:, 1:-1] - p[:, :-2, 1:-1]) / 2
    return gx, gy


def _downsample(img: Array) -> Array:
    """2x2 mean pooling of ``[N, H, W, C]`` (odd sizes get a replicated last row/column)."""
    n, h, w, c = img.shape
    img = jnp.pad(img, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return img.reshape(n, (h + 1) // 2, 2, (w + 1) // 2, 2, c).mean(axis=(2, 4))


def _upsample_flow(flow: Array, h: int, w: int) -> Array:
    """Nearest 2x upsampling of a coarse flow to ``h x w``, with displacements doubled."""
    up = jnp.repeat(jnp.repeat(flow, 2, axis=1), 2, axis=2)[:, :h, :w]
    return 2 * up


def _lk_level(
    target: Array, source: Array, flow: Array, *, iterations: int, kernel: np.ndarray, reg: float, max_step: float
) -> Array:
    gt_x, gt_y = _gradients(target)
    # Source and its gradients are warped together: the linearisation needs grad(source)
    # at p + flow(p), not the gradient of the warped image (which picks up grad(flow)).
    src_stack = jnp.concatenate([source, *_gradients(source)], axis=-1)
    blur = functools.partial(gaussian_filter, kernel_1d=kernel, edge_pad=True)

    def refine(_, f):
        stack, valid = warp(src_stack, f)
        warped, gw_x, gw_y = stack[..., :1], stack[..., 1:2], stack[..., 2:]
        m = valid[..., None].astype(target.dtype)
        ix, iy = m * (gt_x + gw_x) / 2, m * (gt_y + gw_y) / 2
        it = warped - target
        sums = blur(jnp.concatenate([ix * ix, ix * iy, iy * iy, ix * it, iy * it], axis=-1))
        a11, a12, a22, b1, b2 = (sums[..., i : i + 1] for i in range(5))
        lam = reg * jnp.mean(a11 + a22, axis=(1, 2, 3), keepdims=True) + 1e-12
        a11, a22 = a11 + lam, a22 + lam
        det = a11 * a22 - a12 * a12
        du = -(a22 * b1 - a12 * b2) / det
        dv = -(a11 * b2 - a12 * b1) / det
        step = jnp.clip(jnp.concatenate([du, dv], axis=-1), -max_step, max_step)
        return blur(f + step)

    return jax.lax.fori_loop(0, iterations, refine, flow)


def lucas_kanade_flow(
    target: Array,
    source: Array,
    *,
    levels: int = 3,
    iterations: int = 5,
    window: int = 13,
    sigma: float = 3.0,
    reg: float = 1e-2,
) -> Array:
    """Flow ``[N, H, W, 2]`` with ``warp(source, flow) ~ target`` (see module docstring).

    Pyramidal, iterative Lucas-Kanade on the channel-mean image of ``[N, H, W, C]`` frames:
    at each level (coarse to fine, 2x2 mean pooling) the source is warped by the
    current flow and a Gaussian-weighted (``window``, ``sigma``) least-squares increment is
    solved per pixel, ``iterations`` times; each increment is clipped to 1 pixel of that level
    and the updated flow is smoothed with the same Gaussian (keeps the dense field coherent
    and stable near borders and in textureless areas). ``reg`` times the frame's mean gradient
    energy is added to the diagonal of the 2x2 normal equations (Tikhonov damping).
    On a smooth texture translating 1-4 px per frame the interior error is about 0.01-0.04 px
    (median); bilinear interpolation bias sets that floor.
    """
    if target.shape != source.shape or target.ndim != 4:
        raise ValueError(f"target and source must both be [N, H, W, C], got {target.shape} and {source.shape}")
    if levels < 1 or iterations < 1:
        raise ValueError(f"levels and iterations must be >= 1, got {levels}, {iterations}")
    gaussian_kernel_1d(window, sigma)  # validates window and sigma
    # One static signature, however the caller spelled the arguments: one compilation.
    return _lk_flow(jnp.asarray(target), jnp.asarray(source), levels, iterations, window, float(sigma), float(reg))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _lk_flow(target: Array, source: Array, levels: int, iterations: int, window: int, sigma: float, reg: float):
    kernel = gaussian_kernel_1d(window, sigma)
    tgt = jnp.mean(target, axis=-1, keepdims=True)
    src = jnp.mean(source, axis=-1, keepdims=True)
    pyramid = [(tgt, src)]
    while len(pyramid) < levels and min(pyramid[-1][0].shape[1:3]) >= 16:
        pyramid.append((_downsample(pyramid[-1][0]), _downsample(pyramid[-1][1])))
    flow = jnp.zeros(pyramid[-1][0].shape[:3] + (2,), tgt.dtype)
    for k, (t_k, s_k) in enumerate(reversed(pyramid)):
        if k:
            flow = _upsample_flow(flow, *t_k.shape[1:3])
        flow = _lk_level(t_k, s_k, flow, iterations=iterations, kernel=kernel, reg=reg, max_step=1.0)
    return flow
