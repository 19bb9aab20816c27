"""A tiny random Wan bundle shared by the pipeline tests (not a test module)."""

from __future__ import annotations

import functools

import jax

from jquant import models
from jquant.models.wan import WanConfig
from jquant.pipeline import denoiser as D

CONFIG = WanConfig(
    patch_size=(1, 4, 4),
    num_attention_heads=1,
    attention_head_dim=64,
    in_channels=1,
    out_channels=1,
    text_dim=16,
    freq_dim=32,
    ffn_dim=128,
    num_layers=1,
)


@functools.lru_cache(maxsize=None)
def tiny_bundle(num_steps: int = 3, guidance: float = 3.0) -> D.ModelBundle:
    """1-layer Wan, 2 frames of 8x8 (8 video tokens), 4 text tokens, random weights."""
    params = models.init_params(CONFIG, jax.random.key(0))
    model = models.WanTransformer3D(CONFIG)
    return D.wan_bundle(
        model, params, CONFIG, num_steps=num_steps, shift=1.0, guidance_scale=guidance, frames=2, size=8, text_tokens=4
    )
