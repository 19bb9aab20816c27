"""Flux (diffusers `FluxTransformer2DModel`) in Flax linen: MM-DiT double-stream blocks,
then single-stream blocks, axes RoPE from `img_ids`/`txt_ids`, optional guidance embedding.

Inputs use diffusers' layout: packed image tokens [B, S, in_channels], text [B, L, joint_dim].
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jquant.models.blocks import (
    AdaLayerNorm,
    DoubleStreamBlock,
    PortModule,
    SingleStreamBlock,
    double_stream_keys,
    single_stream_keys,
)
from jquant.models.embeddings import CombinedTimestepTextEmbedding, axes_rope_tables
from jquant.models.port import DiffusersConfig, KeyEntry, Port, ada_output_keys, linear, mlp
from jquant.models.roles import ADA_OUTPUT_RULES, STREAM_BLOCK_RULES

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class FluxConfig(DiffusersConfig):
    """Keys of diffusers' FluxTransformer2DModel config.json (defaults: FLUX.1-schnell)."""

    CLASS_NAME = "FluxTransformer2DModel"

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"FluxConfig: sum(axes_dims_rope)={sum(self.axes_dims_rope)} != attention_head_dim={self.attention_head_dim}"
            )


class FluxTransformer2D(PortModule):
    """Flux transformer: packed latents [B, S, in], text [B, L, joint], pooled [B, pooled_dim],
    timestep [B] in [0, 1], img_ids [S, 3], txt_ids [L, 3], guidance [B] (guidance-distilled
    configs only) -> [B, S, patch^2 * out]."""

    config: FluxConfig

    @nn.compact
    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
        timestep: jax.Array,
        img_ids: jax.Array,
        txt_ids: jax.Array,
        guidance: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        if cfg.guidance_embeds != (guidance is not None):
            raise ValueError(f"Flux: guidance must be given exactly when guidance_embeds={cfg.guidance_embeds}")
        if img_ids.ndim != 2 or txt_ids.ndim != 2:
            raise ValueError(f"Flux: img_ids/txt_ids must be 2-D [tokens, axes], got {img_ids.shape}, {txt_ids.shape}")
        dtype = self.dtype
        x = nn.Dense(cfg.inner_dim, dtype=dtype, name="x_embedder")(hidden_states.astype(dtype))
        timestep = timestep.astype(dtype) * 1000
        guidance = None if guidance is None else guidance.astype(dtype) * 1000
        temb = CombinedTimestepTextEmbedding(cfg.inner_dim, dtype, name="time_text_embed")(
            timestep, guidance, pooled_projections.astype(dtype)
        )
        context = nn.Dense(cfg.inner_dim, dtype=dtype, name="context_embedder")(encoder_hidden_states.astype(dtype))
        rope = axes_rope_tables(img_ids, cfg.axes_dims_rope)
        context_rope = axes_rope_tables(txt_ids, cfg.axes_dims_rope)
        block_args = dict(
            heads=cfg.num_attention_heads,
            head_dim=cfg.attention_head_dim,
            mlp_dim=4 * cfg.inner_dim,
            context_first=True,
            clip_fp16=True,
            dtype=dtype,
            attention_impl=self.attention_impl,
        )
        for i in range(cfg.num_layers):
            block = DoubleStreamBlock(**block_args, name=f"transformer_blocks_{i}")
            x, context = block(x, context, temb, rope, context_rope)
        for i in range(cfg.num_single_layers):
            block = SingleStreamBlock(**block_args, name=f"single_transformer_blocks_{i}")
            x, context = block(x, context, temb, rope, context_rope)

        x, _, _ = AdaLayerNorm(2, scale_first=True, dtype=dtype, name="norm_out")(x, temb)
        return nn.Dense(cfg.patch_size**2 * cfg.out_dim, dtype=dtype, name="proj_out")(x)


def key_map(cfg: FluxConfig) -> list[KeyEntry]:
    """Explicit diffusers <-> Flax key map for a Flux config."""
    tte = "time_text_embed"
    embedders = ["timestep_embedder", "text_embedder"] + (["guidance_embedder"] if cfg.guidance_embeds else [])
    entries = [*linear("x_embedder", "x_embedder"), *linear("context_embedder", "context_embedder")]
    for e in embedders:
        entries += mlp(f"{tte}/{e}", f"{tte}.{e}")
    for i in range(cfg.num_layers):
        entries += double_stream_keys(f"transformer_blocks_{i}", f"transformer_blocks.{i}")
    for i in range(cfg.num_single_layers):
        entries += single_stream_keys(f"single_transformer_blocks_{i}", f"single_transformer_blocks.{i}")
    return entries + ada_output_keys()


ROLE_RULES = (
    (r"x_embedder|context_embedder|time_text_embed/.*", ("embedder",)),
    *STREAM_BLOCK_RULES,
    *ADA_OUTPUT_RULES,
)


def dummy_inputs(cfg: FluxConfig) -> dict[str, jax.Array]:
    """Smallest valid inputs: one image and one text token."""
    n_axes = len(cfg.axes_dims_rope)
    inputs = {
        "hidden_states": jnp.zeros((1, 1, cfg.in_channels), F32),
        "encoder_hidden_states": jnp.zeros((1, 1, cfg.joint_attention_dim), F32),
        "pooled_projections": jnp.zeros((1, cfg.pooled_projection_dim), F32),
        "timestep": jnp.zeros((1,), F32),
        "img_ids": jnp.zeros((1, n_axes), F32),
        "txt_ids": jnp.zeros((1, n_axes), F32),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = jnp.zeros((1,), F32)
    return inputs


PORT = Port(FluxConfig, FluxTransformer2D, key_map, dummy_inputs, ROLE_RULES)
init_params = PORT.init_params  # random float32 params for a config
layer_roles = PORT.layer_roles  # role labels of every Dense kernel of a param tree


# Published configs (black-forest-labs/FLUX.1-{dev,schnell} transformer/config.json).
FLUX1_DEV = FluxConfig(guidance_embeds=True)
FLUX1_SCHNELL = FluxConfig()
