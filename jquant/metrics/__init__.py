"""Fidelity of a quantized model's output against the full-precision output.

Videos are ``[batch, frames, height, width, channels]``; image batches ``[B, H, W, C]`` are
accepted as one-frame videos. Pixel values are in ``[0, data_range]``.
"""

from jquant.metrics.compare import DEFAULT_EXTRACTORS, PairedMetric, compare_videos
from jquant.metrics.flow import lucas_kanade_flow, warp
from jquant.metrics.frechet import (
    FeatureExtractor,
    feature_frechet_distance,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    pooled_pixel_features,
    random_projection_features,
)
from jquant.metrics.pixel import mse, psnr, ssim
from jquant.metrics.temporal import WarpErrors, temporal_flicker, warp_error

__all__ = [
    "DEFAULT_EXTRACTORS",
    "FeatureExtractor",
    "PairedMetric",
    "WarpErrors",
    "compare_videos",
    "feature_frechet_distance",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "lucas_kanade_flow",
    "mse",
    "pooled_pixel_features",
    "psnr",
    "random_projection_features",
    "ssim",
    "temporal_flicker",
    "warp",
    "warp_error",
]
