"""A tiny random Wan bundle shared by the pipeline tests (not a test module)."""

from __future__ import annotations

import functools

import jax

from jquant import models
from jquant.models.dit import DiTConfig
from jquant.models.flux import FluxConfig
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

#: Tiny Flux and DiT configs for the policy and rule tests.
FLUX = FluxConfig(
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    in_channels=16,
    axes_dims_rope=(4, 6, 6),
)
DIT = DiTConfig(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=1, sample_size=8, num_embeds_ada_norm=10
)


@functools.lru_cache(maxsize=None)
def tiny_bundle(num_steps: int = 3, guidance: float = 3.0) -> D.ModelBundle:
    """1-layer Wan, 2 frames of 8x8 (8 video tokens), 4 text tokens, random weights."""
    params = models.init_params(CONFIG, jax.random.key(0))
    model = models.WanTransformer3D(CONFIG)
    return D.wan_bundle(
        model, params, CONFIG, num_steps=num_steps, shift=1.0, guidance_scale=guidance, frames=2, size=8, text_tokens=4
    )
