"""Temporal fidelity of a test clip against a reference clip: flicker and warp error.

Both need videos ``[B, T, H, W, C]`` with ``T >= 2`` and report one value per clip, ``[B]``,
in the units of the pixel values (flicker) or their square (warp error).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jquant.metrics._video import as_pair
from jquant.metrics.flow import lucas_kanade_flow, warp

Array = jax.Array


def _check_frames(r: Array, what: str) -> None:
    if r.shape[1] < 2:
        raise ValueError(f"{what} needs videos with at least 2 frames, got shape {r.shape}")


@jax.jit
def _flicker(r: Array, t: Array) -> Array:
    e = t - r
    return jnp.mean(jnp.abs(e[:, 1:] - e[:, :-1]), axis=(1, 2, 3, 4))


def temporal_flicker(ref: Array, test: Array) -> Array:
    """Per-clip flicker ``[B]``: how the test clip's frame-to-frame changes deviate.

    ``flicker[b] = mean_{t, h, w, c} |(test[b, t+1] - test[b, t]) - (ref[b, t+1] - ref[b, t])|``
    over ``t = 0 .. T-2``. Zero when the error ``test - ref`` is constant in time (a static
    bias does not flicker); an error alternating ``+a, -a`` between frames gives ``2a``.
    """
    r, t = as_pair(ref, test)
    _check_frames(r, "temporal_flicker")
    return _flicker(r, t)


class WarpErrors(NamedTuple):
    """Per-clip warp errors ``[B]`` under the reference's flow; ``delta = test - ref``."""

    test: Array
    ref: Array
    delta: Array


@jax.jit
def _masked_warp_mse(x: Array, flow: Array) -> Array:
    """Per-clip masked MSE between ``warp(x[t], flow_t)`` and ``x[t+1]``; flow is per pair."""
    b, n_t = x.shape[:2]
    src = x[:, :-1].reshape((-1,) + x.shape[2:])
    dst = x[:, 1:].reshape((-1,) + x.shape[2:])
    warped, valid = warp(src, flow)
    sq = jnp.mean((warped - dst) ** 2, axis=-1).reshape(b, n_t - 1, -1)
    m = valid.astype(sq.dtype).reshape(b, n_t - 1, -1)
    return jnp.sum(sq * m, axis=(1, 2)) / jnp.maximum(jnp.sum(m, axis=(1, 2)), 1.0)


def warp_error(ref: Array, test: Array, *, levels: int = 3, iterations: int = 5) -> WarpErrors:
    """Warp error of both clips under optical flow estimated on the reference.

    For each consecutive pair the flow ``F_t`` from ``ref[t+1]`` into ``ref[t]`` is
    estimated with :func:`lucas_kanade_flow`; then for a clip ``x``::

        E(x) = sum_t sum_p M_t(p) mean_c (warp(x[t], F_t)(p) - x[t+1](p))^2 / sum_t sum_p M_t(p)

    with ``M_t`` the in-frame mask of the warp (no occlusion reasoning). ``E(ref)`` is the
    motion the flow cannot explain (occlusions, flow error); ``delta = E(test) - E(ref)`` is
    the temporal inconsistency the test clip adds, e.g. quantization noise that changes from
    frame to frame: independent noise of variance ``s^2`` per frame adds between ``s^2`` and
    ``2 s^2`` (bilinear warping averages part of the noise in frame t away).
    """
    r, t = as_pair(ref, test)
    _check_frames(r, "warp_error")
    pairs = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
    flow = lucas_kanade_flow(pairs(r[:, 1:]), pairs(r[:, :-1]), levels=levels, iterations=iterations)
    e_t, e_r = _masked_warp_mse(t, flow), _masked_warp_mse(r, flow)
    return WarpErrors(test=e_t, ref=e_r, delta=e_t - e_r)
