"""Flux (diffusers `FluxTransformer2DModel`) in Flax linen: MM-DiT double-stream blocks,
then single-stream blocks, axes RoPE from `img_ids`/`txt_ids`, optional guidance embedding.

Inputs use diffusers' layout: packed image tokens [B, S, in_channels], text [B, L, joint_dim].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.blocks import AdaLayerNorm, FeedForward, JointAttention, LayerNorm, modulate
from models.embeddings import EmbedMLP, axes_rope_tables, timestep_embedding
from models.port import DiffusersConfig, KeyEntry, Port, linear, norm
from models.roles import assign_roles

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

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels


def _clip_fp16(x: jax.Array) -> jax.Array:
    """diffusers clips the residual stream to the float16 range when running in float16."""
    return jnp.clip(x, -65504, 65504) if x.dtype == jnp.float16 else x


def flux_attention(cfg: FluxConfig, dtype: Any, impl: str | None, double: bool) -> JointAttention:
    """Flux's joint attention: per-head RMSNorm on q/k, [text, image] token order. Double-stream
    blocks give text its own add_{q,k,v}_proj and to_add_out; single-stream blocks (pre_only)
    return the raw attention output of the concatenated tokens."""
    return JointAttention(
        cfg.num_attention_heads,
        cfg.attention_head_dim,
        context_first=True,
        output="split" if double else "none",
        dtype=dtype,
        attention_impl=impl,
        name="attn",
    )


class FluxDoubleBlock(nn.Module):
    """MM-DiT block: separate adaLN-Zero, FFN and projections for image and text, one attention."""

    config: FluxConfig
    dtype: Any = F32
    attention_impl: str | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array, temb: jax.Array, rope: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        dim = cfg.inner_dim
        norm_x, (gate_msa, shift_mlp, scale_mlp, gate_mlp), _ = AdaLayerNorm(6, dtype=self.dtype, name="norm1")(x, temb)
        norm_c, (c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp), _ = AdaLayerNorm(
            6, dtype=self.dtype, name="norm1_context"
        )(context, temb)
        text_len = context.shape[1]
        rope_x, rope_c = (tuple(t[text_len:] for t in rope), tuple(t[:text_len] for t in rope))
        attn = flux_attention(cfg, self.dtype, self.attention_impl, double=True)
        attn_x, attn_c = attn(norm_x, norm_c, rope=rope_x, context_rope=rope_c)

        x = x + gate_msa[:, None] * attn_x
        h = modulate(LayerNorm(1e-6, name="norm2")(x), shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None] * FeedForward(4 * dim, dim, "gelu-approximate", self.dtype, name="ff")(h)

        context = context + c_gate_msa[:, None] * attn_c
        h = modulate(LayerNorm(1e-6, name="norm2_context")(context), c_shift_mlp, c_scale_mlp)
        context = context + c_gate_mlp[:, None] * FeedForward(4 * dim, dim, "gelu-approximate", self.dtype, name="ff_context")(h)
        return _clip_fp16(context), x


class FluxSingleBlock(nn.Module):
    """Single-stream block over [text, image]: attention and MLP in parallel, one fused proj_out."""

    config: FluxConfig
    dtype: Any = F32
    attention_impl: str | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array, temb: jax.Array, rope: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        dim = cfg.inner_dim
        text_len = context.shape[1]
        h = jnp.concatenate([context, x], axis=1)
        norm_h, (gate,), _ = AdaLayerNorm(3, dtype=self.dtype, name="norm")(h, temb)
        mlp = nn.gelu(nn.Dense(4 * dim, dtype=self.dtype, name="proj_mlp")(norm_h), approximate=True)
        attn = flux_attention(cfg, self.dtype, self.attention_impl, double=False)
        out = nn.Dense(dim, dtype=self.dtype, name="proj_out")(jnp.concatenate([attn(norm_h, rope=rope), mlp], axis=-1))
        h = _clip_fp16(h + gate[:, None] * out)
        return h[:, :text_len], h[:, text_len:]


class FluxTimeTextEmbed(nn.Module):
    """Timestep (+ guidance) sinusoid -> MLP, plus pooled text projection (silu)."""

    config: FluxConfig
    dtype: Any = F32

    @nn.compact
    def __call__(self, timestep: jax.Array, guidance: jax.Array | None, pooled: jax.Array) -> jax.Array:
        dim = self.config.inner_dim

        def sinusoid(t: jax.Array) -> jax.Array:
            return timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0).astype(pooled.dtype)

        emb = EmbedMLP(dim, "silu", self.dtype, name="timestep_embedder")(sinusoid(timestep))
        if guidance is not None:
            emb = emb + EmbedMLP(dim, "silu", self.dtype, name="guidance_embedder")(sinusoid(guidance))
        return emb + EmbedMLP(dim, "silu", self.dtype, name="text_embedder")(pooled)


class FluxTransformer2D(nn.Module):
    """Flux transformer: packed latents [B, S, in], text [B, L, joint], pooled [B, pooled_dim],
    timestep [B] in [0, 1], img_ids [S, 3], txt_ids [L, 3], guidance [B] (guidance-distilled
    configs only) -> [B, S, patch^2 * out]."""

    config: FluxConfig
    dtype: Any = F32
    attention_impl: str | None = None

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
        temb = FluxTimeTextEmbed(cfg, dtype, name="time_text_embed")(timestep, guidance, pooled_projections.astype(dtype))
        context = nn.Dense(cfg.inner_dim, dtype=dtype, name="context_embedder")(encoder_hidden_states.astype(dtype))
        rope = axes_rope_tables(jnp.concatenate([txt_ids, img_ids], axis=0), cfg.axes_dims_rope)

        for i in range(cfg.num_layers):
            context, x = FluxDoubleBlock(cfg, dtype, self.attention_impl, name=f"transformer_blocks_{i}")(x, context, temb, rope)
        for i in range(cfg.num_single_layers):
            block = FluxSingleBlock(cfg, dtype, self.attention_impl, name=f"single_transformer_blocks_{i}")
            context, x = block(x, context, temb, rope)

        x, _, _ = AdaLayerNorm(2, scale_first=True, dtype=dtype, name="norm_out")(x, temb)
        return nn.Dense(cfg.patch_size**2 * cfg.out_dim, dtype=dtype, name="proj_out")(x)


def key_map(cfg: FluxConfig) -> list[KeyEntry]:
    """Explicit diffusers <-> Flax key map for a Flux config."""
    tte = "time_text_embed"
    embedders = ["timestep_embedder", "text_embedder"] + (["guidance_embedder"] if cfg.guidance_embeds else [])
    entries = [*linear("x_embedder", "x_embedder"), *linear("context_embedder", "context_embedder")]
    for e in embedders:
        entries += linear(f"{tte}/{e}/linear_1", f"{tte}.{e}.linear_1") + linear(f"{tte}/{e}/linear_2", f"{tte}.{e}.linear_2")
    for i in range(cfg.num_layers):
        f, t = f"transformer_blocks_{i}", f"transformer_blocks.{i}"
        entries += linear(f"{f}/norm1/linear", f"{t}.norm1.linear")
        entries += linear(f"{f}/norm1_context/linear", f"{t}.norm1_context.linear")
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            entries += linear(f"{f}/attn/{proj}", f"{t}.attn.{proj}")
        entries += linear(f"{f}/attn/to_out_0", f"{t}.attn.to_out.0")
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            entries += norm(f"{f}/attn/{n}", f"{t}.attn.{n}", bias=False)
        for ff in ("ff", "ff_context"):
            entries += linear(f"{f}/{ff}/net_0/proj", f"{t}.{ff}.net.0.proj") + linear(f"{f}/{ff}/net_2", f"{t}.{ff}.net.2")
    for i in range(cfg.num_single_layers):
        f, t = f"single_transformer_blocks_{i}", f"single_transformer_blocks.{i}"
        entries += linear(f"{f}/norm/linear", f"{t}.norm.linear")
        entries += linear(f"{f}/proj_mlp", f"{t}.proj_mlp") + linear(f"{f}/proj_out", f"{t}.proj_out")
        for proj in ("to_q", "to_k", "to_v"):
            entries += linear(f"{f}/attn/{proj}", f"{t}.attn.{proj}")
        for n in ("norm_q", "norm_k"):
            entries += norm(f"{f}/attn/{n}", f"{t}.attn.{n}", bias=False)
    return entries + linear("norm_out/linear", "norm_out.linear") + linear("proj_out", "proj_out")


_DOUBLE = r"transformer_blocks_\d+"
_SINGLE = r"single_transformer_blocks_\d+"
ROLE_RULES = (
    (r"x_embedder|context_embedder|time_text_embed/.*", ("embedder",)),
    (rf"{_DOUBLE}/.*", ("double_stream",)),
    (rf"{_DOUBLE}/norm1(_context)?/linear", ("modulation",)),
    (rf"{_DOUBLE}/attn/.*", ("self_attn", "text_fusion")),
    (rf"{_DOUBLE}/attn/(to_[qkv]|add_[qkv]_proj)", ("attn.qkv",)),
    (rf"{_DOUBLE}/attn/(to_out_0|to_add_out)", ("attn.out",)),
    (rf"{_DOUBLE}/ff(_context)?/net_0/proj", ("ffn.up",)),
    (rf"{_DOUBLE}/ff(_context)?/net_2", ("ffn.down",)),
    (rf"{_SINGLE}/.*", ("single_stream",)),
    (rf"{_SINGLE}/norm/linear", ("modulation",)),
    (rf"{_SINGLE}/attn/to_[qkv]", ("attn.qkv", "self_attn", "text_fusion")),
    (rf"{_SINGLE}/proj_mlp", ("ffn.up",)),
    (rf"{_SINGLE}/proj_out", ("attn.out", "ffn.down", "text_fusion")),
    (r"norm_out/linear", ("modulation", "final")),
    (r"proj_out", ("final",)),
)


def layer_roles(params: Any) -> dict[str, tuple[str, ...]]:
    """Role labels of every Dense kernel of a Flux param tree."""
    return assign_roles(params, ROLE_RULES)


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


PORT = Port(
    class_names=("FluxTransformer2DModel",),
    config_cls=FluxConfig,
    module_cls=FluxTransformer2D,
    key_map=key_map,
    dummy_inputs=dummy_inputs,
    layer_roles=layer_roles,
)


def init_params(config: FluxConfig, rng: jax.Array) -> dict[str, Any]:
    """Random float32 Flux params for `config`."""
    return PORT.init_params(config, rng)


# Published configs (black-forest-labs/FLUX.1-{dev,schnell} transformer/config.json).
FLUX1_DEV = FluxConfig(guidance_embeds=True)
FLUX1_SCHNELL = FluxConfig()
