"""DiT (diffusers `DiTTransformer2DModel`) in Flax linen: class-conditional adaLN-Zero.

Latents [B, C, H, W] -> [B, C_out, H, W]; with learned sigma (C_out = 2C) the output holds the
noise prediction and the variance channels exactly as diffusers returns them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jquant.models.blocks import (
    FF_ACTIVATIONS,
    AdaLayerNorm,
    Attention,
    FeedForward,
    LayerNorm,
    PortModule,
    modulate,
    patchify,
    unpatchify,
)
from jquant.models.embeddings import sincos_2d_pos_embed
from jquant.models.port import DiffusersConfig, KeyEntry, Port, attention_keys, feed_forward, linear, mlp, norm, patch
from jquant.models.roles import attn_rules, ffn_rules

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class DiTConfig(DiffusersConfig):
    """Keys of diffusers' DiTTransformer2DModel config.json (defaults: DiT-XL/2)."""

    CLASS_NAME = "DiTTransformer2DModel"

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = None
    num_layers: int = 28
    dropout: float = 0.0
    norm_num_groups: int = 32
    attention_bias: bool = True
    sample_size: int = 32
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: int | None = 1000
    upcast_attention: bool = False
    norm_type: str = "ada_norm_zero"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.norm_type != "ada_norm_zero":
            raise ValueError(f"DiTConfig.norm_type must be 'ada_norm_zero', got {self.norm_type!r}")
        if self.num_embeds_ada_norm is None:
            raise ValueError("DiTConfig.num_embeds_ada_norm (number of classes) must be set")
        if self.activation_fn not in FF_ACTIVATIONS:
            raise ValueError(f"DiTConfig.activation_fn {self.activation_fn!r} not in {sorted(FF_ACTIVATIONS)}")

    @property
    def out_dim(self) -> int:
        """Transformer2DModel resolves only a missing `out_channels` to `in_channels`."""
        return self.in_channels if self.out_channels is None else self.out_channels


class DiTPatchEmbed(nn.Module):
    """Patch projection `proj` plus the fixed 2-D sin-cos position embedding."""

    config: DiTConfig
    dtype: Any = F32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
        cfg = self.config
        tokens, grid = patchify(x, (cfg.patch_size, cfg.patch_size))
        tokens = nn.Dense(cfg.inner_dim, dtype=self.dtype, name="proj")(tokens)
        pos = sincos_2d_pos_embed(cfg.inner_dim, grid, base_size=cfg.sample_size // cfg.patch_size)
        return (tokens + pos[None]).astype(tokens.dtype), grid


class DiTBlock(PortModule):
    """diffusers `BasicTransformerBlock` with norm_type="ada_norm_zero" and no cross-attention.
    Returns the block output and its conditioning embedding (the model's final layer reuses
    block 0's)."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x: jax.Array, timestep: jax.Array, class_labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        ada = AdaLayerNorm(6, num_embeddings=cfg.num_embeds_ada_norm, dtype=self.dtype, name="norm1")
        h, (gate_msa, shift_mlp, scale_mlp, gate_mlp), cond = ada(x, timestep=timestep, class_labels=class_labels)
        attn = Attention(
            cfg.num_attention_heads,
            cfg.attention_head_dim,
            use_bias=cfg.attention_bias,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            name="attn1",
        )
        x = gate_msa[:, None] * attn(h) + x
        h = LayerNorm(cfg.norm_eps, affine=cfg.norm_elementwise_affine, name="norm3")(x)
        h = modulate(h, shift_mlp, scale_mlp)
        x = (
            gate_mlp[:, None]
            * FeedForward(4 * cfg.inner_dim, cfg.inner_dim, cfg.activation_fn, self.dtype, name="ff")(h)
            + x
        )
        return x, cond


class DiTTransformer2D(PortModule):
    """DiT: latents [B, C, H, W], timestep [B], class_labels [B] (int; `num_embeds_ada_norm` is the
    null class) -> [B, C_out, H, W]."""

    config: DiTConfig

    @nn.compact
    def __call__(self, hidden_states: jax.Array, timestep: jax.Array, class_labels: jax.Array) -> jax.Array:
        cfg = self.config
        if hidden_states.ndim != 4 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(f"DiT: hidden_states must be [B, {cfg.in_channels}, H, W], got {hidden_states.shape}")
        x, grid = DiTPatchEmbed(cfg, self.dtype, name="pos_embed")(hidden_states.astype(self.dtype))
        cond = None
        for i in range(cfg.num_layers):
            x, block_cond = DiTBlock(cfg, self.dtype, self.attention_impl, name=f"transformer_blocks_{i}")(
                x, timestep, class_labels
            )
            cond = block_cond if cond is None else cond
        shift, scale = jnp.split(nn.Dense(2 * cfg.inner_dim, dtype=self.dtype, name="proj_out_1")(nn.silu(cond)), 2, -1)
        x = modulate(LayerNorm(1e-6, name="norm_out")(x), shift, scale)
        x = nn.Dense(cfg.patch_size**2 * cfg.out_dim, dtype=self.dtype, name="proj_out_2")(x)
        return unpatchify(x, grid, (cfg.patch_size, cfg.patch_size))


def key_map(cfg: DiTConfig) -> list[KeyEntry]:
    """Explicit diffusers <-> Flax key map for a DiT config."""
    p, d = cfg.patch_size, cfg.inner_dim
    entries = patch("pos_embed/proj", "pos_embed.proj", (d, cfg.in_channels, p, p))
    for i in range(cfg.num_layers):
        f, t = f"transformer_blocks_{i}", f"transformer_blocks.{i}"
        emb_f, emb_t = f"{f}/norm1/emb", f"{t}.norm1.emb"
        entries += mlp(f"{emb_f}/timestep_embedder", f"{emb_t}.timestep_embedder")
        entries.append(
            KeyEntry(
                f"{emb_f}/class_embedder/embedding_table/embedding", f"{emb_t}.class_embedder.embedding_table.weight"
            )
        )
        entries += linear(f"{f}/norm1/linear", f"{t}.norm1.linear")
        entries += attention_keys(f"{f}/attn1", f"{t}.attn1", bias=cfg.attention_bias, qk_norm=None)
        if cfg.norm_elementwise_affine:
            entries += norm(f"{f}/norm3", f"{t}.norm3")
        entries += feed_forward(f"{f}/ff", f"{t}.ff")
    return entries + linear("proj_out_1", "proj_out_1") + linear("proj_out_2", "proj_out_2")


ROLE_RULES = (
    (r"pos_embed/proj", ("embedder",)),
    (r"transformer_blocks_\d+/norm1/emb/.*", ("embedder",)),
    (r"transformer_blocks_\d+/norm1/linear", ("modulation",)),
    *attn_rules(r"transformer_blocks_\d+/attn1", "self_attn"),
    *ffn_rules(r"transformer_blocks_\d+/ff"),
    (r"proj_out_1", ("modulation", "final")),
    (r"proj_out_2", ("final",)),
)


def dummy_inputs(cfg: DiTConfig) -> dict[str, jax.Array]:
    """Smallest valid inputs: one patch."""
    p = cfg.patch_size
    return {
        "hidden_states": jnp.zeros((1, cfg.in_channels, p, p), F32),
        "timestep": jnp.zeros((1,), jnp.int32),
        "class_labels": jnp.zeros((1,), jnp.int32),
    }


PORT = Port(DiTConfig, DiTTransformer2D, key_map, dummy_inputs, ROLE_RULES, aliases=("Transformer2DModel",))
init_params = PORT.init_params  # random float32 params for a config
layer_roles = PORT.layer_roles  # role labels of every Dense kernel of a param tree


# Published config (facebook/DiT-XL-2-256 transformer/config.json; learned sigma: 8 out channels).
DIT_XL_2_256 = DiTConfig(out_channels=8)
