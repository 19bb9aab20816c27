"""One call that measures a test clip against its full-precision reference for reports."""

from __future__ import annotations

import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jquant.metrics._video import as_pair
from jquant.metrics.frechet import (
    FeatureExtractor,
    frechet_distance,
    pooled_pixel_features,
)
from jquant.metrics.pixel import mse, psnr, ssim
from jquant.metrics.temporal import temporal_flicker, warp_error

Array = jax.Array
PairedMetric = Callable[[Array, Array], Array]
"""``(ref, test) -> value`` (scalar or per-sample); e.g. a user's LPIPS network. Reported as the mean."""

DEFAULT_EXTRACTORS: Mapping[str, FeatureExtractor] = {"pooled_pixels": pooled_pixel_features}


def _f(x: Array) -> float:
    return float(np.mean(np.asarray(x, dtype=np.float64)))


def compare_videos(
    ref: Array,
    test: Array,
    *,
    data_range: float = 1.0,
    ssim_win_size: int = 11,
    feature_extractors: Mapping[str, FeatureExtractor] | None = None,
    paired_metrics: Mapping[str, PairedMetric] | None = None,
    flow_levels: int = 3,
) -> dict[str, float]:
    """All fidelity metrics of ``test`` against ``ref`` as Python floats.

    Args:
      ref, test: ``[B, T, H, W, C]`` videos or ``[B, H, W, C]`` images, values in
        ``[0, data_range]``.
      data_range: pixel value range (1.0 for ``[0, 1]``, 255 for 8-bit, 2 for ``[-1, 1]``).
      ssim_win_size: SSIM window; frames need at least this many pixels per side.
      feature_extractors: name -> :class:`FeatureExtractor`; each gives ``fd_<name>``.
        Defaults to ``{"pooled_pixels": pooled_pixel_features}``; pass ``{}`` for none.
      paired_metrics: name -> ``(ref, test) -> value`` hooks (e.g. LPIPS), reported as means.
      flow_levels: pyramid levels of the warp-error flow.

    Returns:
      ``mse``, ``psnr`` (mean of per-frame dB; ``inf`` if a frame is identical), ``psnr_min``,
      ``ssim``, ``ssim_min``; with ``T >= 2`` also ``flicker``, ``warp_error_ref``,
      ``warp_error_test``, ``warp_error_delta``; ``fd_<name>`` per extractor when both sides
      yield at least 2 feature rows; and one key per paired metric.
    """
    r, t = as_pair(ref, test)
    p = np.asarray(psnr(r, t, data_range=data_range), np.float64)
    s = np.asarray(ssim(r, t, data_range=data_range, win_size=ssim_win_size), np.float64)
    out: dict[str, float] = {
        "mse": _f(mse(r, t)),
        "psnr": float(np.mean(p)) if np.all(np.isfinite(p)) else math.inf,
        "psnr_min": float(np.min(p)),
        "ssim": float(np.mean(s)),
        "ssim_min": float(np.min(s)),
    }
    if r.shape[1] >= 2:
        out["flicker"] = _f(temporal_flicker(r, t))
        we = warp_error(r, t, levels=flow_levels)
        out.update(warp_error_ref=_f(we.ref), warp_error_test=_f(we.test), warp_error_delta=_f(we.delta))
    extractors = DEFAULT_EXTRACTORS if feature_extractors is None else feature_extractors
    for name, extract in extractors.items():
        fa, fb = jnp.asarray(extract(r)), jnp.asarray(extract(t))
        if fa.ndim != 2 or fb.ndim != 2:
            raise ValueError(f"feature extractor {name!r} must return [N, D], got {fa.shape} and {fb.shape}")
        if min(fa.shape[0], fb.shape[0]) >= 2:
            out[f"fd_{name}"] = float(frechet_distance(fa, fb))
    for name, metric in (paired_metrics or {}).items():
        out[name] = _f(metric(r, t))
    return out
