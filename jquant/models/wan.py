"""Wan2.1 video DiT (diffusers `WanTransformer3DModel`) in Flax linen.

Text-to-video, plus the image-to-video branch (image embedder and per-block added K/V).
Inputs and outputs use diffusers' layout: latents [B, C, F, H, W].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jquant.models.blocks import (
    Attention,
    FeedForward,
    LayerNorm,
    NormModulate,
    PortModule,
    modulate,
    patchify,
    unpatchify,
)
from jquant.models.embeddings import EmbedMLP, timestep_embedding, wan_rope_tables
from jquant.models.port import DiffusersConfig, KeyEntry, Port, attention_keys, feed_forward, linear, mlp, norm, patch
from jquant.models.roles import cross_attn_block_rules

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class WanConfig(DiffusersConfig):
    """Keys of diffusers' WanTransformer3DModel config.json (defaults: Wan2.1 14B)."""

    CLASS_NAME = "WanTransformer3DModel"

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    def __post_init__(self) -> None:
        if len(self.patch_size) != 3:
            raise ValueError(f"WanConfig.patch_size must have 3 entries, got {self.patch_size}")
        if self.pos_embed_seq_len is not None:
            raise ValueError("WanConfig.pos_embed_seq_len (Wan FLF2V image pos-embed) is not supported by this port")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError("WanConfig: image_dim and added_kv_proj_dim must be set together (I2V) or both None")


class WanImageEmbedding(nn.Module):
    """I2V image-feature embedder: LayerNorm -> FeedForward(gelu) -> LayerNorm (eps 1e-5, affine)."""

    features: int
    dtype: Any = F32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = LayerNorm(1e-5, affine=True, name="norm1")(x)
        x = FeedForward(x.shape[-1], self.features, "gelu", self.dtype, name="ff")(x)
        return LayerNorm(1e-5, affine=True, name="norm2")(x)


class WanConditionEmbedder(nn.Module):
    """Timestep -> (temb, 6-way modulation); text (and image) features -> model width."""

    config: WanConfig
    dtype: Any = F32

    @nn.compact
    def __call__(
        self, timestep: jax.Array, text: jax.Array, image: jax.Array | None
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        cfg = self.config
        t = timestep_embedding(timestep, cfg.freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        # diffusers keeps time_embedder in float32 and casts its output to the text dtype.
        temb = EmbedMLP(cfg.inner_dim, "silu", F32, name="time_embedder")(t).astype(self.dtype)
        timestep_proj = nn.Dense(6 * cfg.inner_dim, dtype=self.dtype, name="time_proj")(nn.silu(temb))
        text = EmbedMLP(cfg.inner_dim, "gelu_tanh", self.dtype, name="text_embedder")(text.astype(self.dtype))
        if image is not None:
            image = WanImageEmbedding(cfg.inner_dim, self.dtype, name="image_embedder")(image.astype(self.dtype))
        return temb, timestep_proj, text, image


class WanBlock(PortModule):
    """Self-attention (3-D RoPE) -> cross-attention to text -> FFN, modulated by the shared
    timestep projection plus this block's `scale_shift_table` (in float32, as diffusers)."""

    config: WanConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        timestep_proj: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        context_img: jax.Array | None,
    ) -> jax.Array:
        cfg = self.config
        dim = cfg.inner_dim
        table = self.param("scale_shift_table", nn.initializers.normal(dim**-0.5), (1, 6, dim))
        mod = table.astype(F32) + timestep_proj.astype(F32)
        shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, i] for i in range(6))
        attn = dict(
            heads=cfg.num_attention_heads,
            head_dim=cfg.attention_head_dim,
            qk_norm="rms_norm_across_heads",
            eps=cfg.eps,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )

        h = NormModulate(cfg.eps, name="norm1")(x, shift, scale)
        out = Attention(**attn, name="attn1")(h, rope=rope)
        x = (x.astype(F32) + out * gate[:, None]).astype(x.dtype)

        # The cross-attention norm (no modulation) as a NormModulate: the same float value, and
        # in a quantized run its Q projection takes the producer's codes.
        h = NormModulate(cfg.eps, affine=True, name="norm2")(x) if cfg.cross_attn_norm else x
        added_kv = cfg.added_kv_proj_dim is not None
        x = x + Attention(**attn, added_kv=added_kv, name="attn2")(h, context, context_img=context_img)

        h = NormModulate(cfg.eps, name="norm3")(x, c_shift, c_scale)
        out = FeedForward(cfg.ffn_dim, dim, "gelu-approximate", self.dtype, name="ffn")(h)
        return (x.astype(F32) + out.astype(F32) * c_gate[:, None]).astype(x.dtype)


class WanTransformer3D(PortModule):
    """Wan2.1 transformer: latents [B, C, F, H, W], timestep [B], text [B, L, text_dim]
    (and, for I2V, image features [B, L_img, image_dim]) -> prediction [B, C_out, F, H, W].

    diffusers concatenates image and text context and splits it back assuming 512 text tokens;
    here they are separate arguments, which gives the same result for 512-token text.
    """

    config: WanConfig

    @nn.compact
    def __call__(
        self,
        hidden_states: jax.Array,
        timestep: jax.Array,
        encoder_hidden_states: jax.Array,
        encoder_hidden_states_image: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        if hidden_states.ndim != 5 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(f"Wan: hidden_states must be [B, {cfg.in_channels}, F, H, W], got {hidden_states.shape}")
        if (encoder_hidden_states_image is None) != (cfg.added_kv_proj_dim is None):
            raise ValueError("Wan: encoder_hidden_states_image is required exactly when the config has image_dim")
        batch = hidden_states.shape[0]
        tokens, grid = patchify(hidden_states.astype(self.dtype), cfg.patch_size)
        if max(grid) > cfg.rope_max_seq_len:
            raise ValueError(f"Wan: token grid {grid} exceeds rope_max_seq_len={cfg.rope_max_seq_len}")
        x = nn.Dense(cfg.inner_dim, dtype=self.dtype, name="patch_embedding")(tokens)
        rope = wan_rope_tables(cfg.attention_head_dim, grid)

        temb, timestep_proj, context, context_img = WanConditionEmbedder(cfg, self.dtype, name="condition_embedder")(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        timestep_proj = timestep_proj.reshape(batch, 6, cfg.inner_dim)
        for i in range(cfg.num_layers):
            block = WanBlock(cfg, self.dtype, self.attention_impl, name=f"blocks_{i}")
            x = block(x, context, timestep_proj, rope, context_img)

        table = self.param("scale_shift_table", nn.initializers.normal(cfg.inner_dim**-0.5), (1, 2, cfg.inner_dim))
        mod = table.astype(F32) + temb[:, None].astype(F32)
        x = modulate(LayerNorm(cfg.eps, name="norm_out")(x.astype(F32)), mod[:, 0], mod[:, 1]).astype(x.dtype)
        x = nn.Dense(cfg.out_dim * math.prod(cfg.patch_size), dtype=self.dtype, name="proj_out")(x)
        return unpatchify(x, grid, cfg.patch_size)


def key_map(cfg: WanConfig) -> list[KeyEntry]:
    """Explicit diffusers <-> Flax key map for a Wan config."""
    pt, ph, pw = cfg.patch_size
    d = cfg.inner_dim
    ce = "condition_embedder"
    entries = patch("patch_embedding", "patch_embedding", (d, cfg.in_channels, pt, ph, pw))
    entries += mlp(f"{ce}/time_embedder", f"{ce}.time_embedder") + linear(f"{ce}/time_proj", f"{ce}.time_proj")
    entries += mlp(f"{ce}/text_embedder", f"{ce}.text_embedder")
    if cfg.image_dim is not None:
        img, t_img = f"{ce}/image_embedder", f"{ce}.image_embedder"
        entries += norm(f"{img}/norm1", f"{t_img}.norm1") + feed_forward(f"{img}/ff", f"{t_img}.ff")
        entries += norm(f"{img}/norm2", f"{t_img}.norm2")
    for i in range(cfg.num_layers):
        f, t = f"blocks_{i}", f"blocks.{i}"
        entries.append(KeyEntry(f"{f}/scale_shift_table", f"{t}.scale_shift_table"))
        for a in ("attn1", "attn2"):
            entries += attention_keys(f"{f}/{a}", f"{t}.{a}")
        if cfg.added_kv_proj_dim is not None:
            entries += linear(f"{f}/attn2/add_k_proj", f"{t}.attn2.add_k_proj")
            entries += linear(f"{f}/attn2/add_v_proj", f"{t}.attn2.add_v_proj")
            entries += norm(f"{f}/attn2/norm_added_k", f"{t}.attn2.norm_added_k", bias=False)
        if cfg.cross_attn_norm:
            entries += norm(f"{f}/norm2", f"{t}.norm2")
        entries += feed_forward(f"{f}/ffn", f"{t}.ffn")
    entries += linear("proj_out", "proj_out")
    entries.append(KeyEntry("scale_shift_table", "scale_shift_table"))
    return entries


ROLE_RULES = (
    (r"patch_embedding", ("embedder",)),
    (r"condition_embedder/(time_embedder|text_embedder|image_embedder)/.*", ("embedder",)),
    (r"condition_embedder/time_proj", ("embedder", "modulation")),
    *cross_attn_block_rules(r"blocks_\d+", ff="ffn"),
    (r"proj_out", ("final",)),
)


def dummy_inputs(cfg: WanConfig) -> dict[str, jax.Array]:
    """Smallest valid inputs (one token; 512 text tokens when the I2V branch is on)."""
    pt, ph, pw = cfg.patch_size
    text_len = 512 if cfg.image_dim is not None else 1
    inputs = {
        "hidden_states": jnp.zeros((1, cfg.in_channels, pt, ph, pw), F32),
        "timestep": jnp.zeros((1,), F32),
        "encoder_hidden_states": jnp.zeros((1, text_len, cfg.text_dim), F32),
    }
    if cfg.image_dim is not None:
        inputs["encoder_hidden_states_image"] = jnp.zeros((1, 1, cfg.image_dim), F32)
    return inputs


PORT = Port(
    WanConfig,
    WanTransformer3D,
    key_map,
    dummy_inputs,
    ROLE_RULES,
    keep_fp32=(r"time_embedder/", r"scale_shift_table$", r"/norm[123]/"),
    ignore_unexpected=(r"norm_added_q",),
)
init_params = PORT.init_params  # random float32 params for a config
layer_roles = PORT.layer_roles  # role labels of every Dense kernel of a param tree


# Published configs (diffusers config.json of the Wan-AI/Wan2.1-*-Diffusers transformers).
WAN21_T2V_1_3B = WanConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30)
WAN21_T2V_14B = WanConfig()
WAN21_I2V_14B = WanConfig(image_dim=1280, added_kv_proj_dim=5120, in_channels=36)
