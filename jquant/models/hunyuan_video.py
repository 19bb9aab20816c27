"""HunyuanVideo (diffusers `HunyuanVideoTransformer3DModel`) in Flax linen.

Text goes through the token refiner (`context_embedder`: masked mean pool -> timestep+text
conditioning, `proj_in`, self-attention refiner blocks), then dual-stream blocks (separate
video/text weights, joint attention) and single-stream blocks (shared weights), the same
`DoubleStreamBlock` / `SingleStreamBlock` as Flux with the token order [video, text], 3-D RoPE
on the video tokens only and padded text keys masked. Guidance-distilled checkpoints embed the
guidance scale (`guidance_embedder`). Latents use diffusers' layout [B, C, F, H, W].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jquant.models.blocks import (
    AdaLayerNorm,
    Attention,
    DoubleStreamBlock,
    FeedForward,
    LayerNorm,
    PatchEmbed,
    PortModule,
    SingleStreamBlock,
    double_stream_keys,
    single_stream_keys,
    unpatchify,
)
from jquant.models.embeddings import CombinedTimestepTextEmbedding, axes_rope_tables, grid_positions
from jquant.models.port import (
    DiffusersConfig,
    KeyEntry,
    Port,
    ada_output_keys,
    attention_keys,
    feed_forward,
    linear,
    mlp,
    norm,
    patch,
)
from jquant.models.roles import ADA_OUTPUT_RULES, STREAM_BLOCK_RULES, attn_rules, ffn_rules

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class HunyuanVideoConfig(DiffusersConfig):
    """Keys of diffusers' HunyuanVideoTransformer3DModel config.json (defaults: HunyuanVideo T2V 13B)."""

    CLASS_NAME = "HunyuanVideoTransformer3DModel"

    in_channels: int = 16
    out_channels: int = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, ...] = (16, 56, 56)
    image_condition_type: str | None = None

    def __post_init__(self) -> None:
        if self.qk_norm != "rms_norm":
            raise ValueError(f"HunyuanVideoConfig.qk_norm={self.qk_norm!r}: only 'rms_norm' exists in diffusers")
        if self.image_condition_type not in (None, "latent_concat"):
            raise ValueError(
                f"HunyuanVideoConfig.image_condition_type={self.image_condition_type!r}: the port covers None and "
                "'latent_concat' (image latents concatenated to the input channels), not 'token_replace'"
            )
        if len(self.rope_axes_dim) != 3 or sum(self.rope_axes_dim) != self.attention_head_dim:
            raise ValueError(
                f"HunyuanVideoConfig: rope_axes_dim {self.rope_axes_dim} must be 3 sizes summing to "
                f"attention_head_dim={self.attention_head_dim}"
            )

    @property
    def mlp_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def patch(self) -> tuple[int, int, int]:
        return (self.patch_size_t, self.patch_size, self.patch_size)


class RefinerBlock(PortModule):
    """Token-refiner block: LayerNorm -> masked self-attention -> LayerNorm -> SiLU MLP, both residuals
    gated by `norm_out/linear(silu(temb))` (diffusers' HunyuanVideoAdaNorm)."""

    config: HunyuanVideoConfig

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        dim = cfg.inner_dim
        attn = Attention(
            cfg.num_attention_heads,
            cfg.attention_head_dim,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            name="attn",
        )
        h = attn(LayerNorm(1e-6, affine=True, name="norm1")(x), mask=mask)
        gate_msa, gate_mlp = jnp.split(AdaGate(2 * dim, self.dtype, name="norm_out")(temb), 2, axis=-1)
        x = x + h * gate_msa[:, None]
        # diffusers builds the refiner with its default mlp_ratio 4.0, whatever the config's mlp_ratio
        ff = FeedForward(4 * dim, dim, "linear-silu", self.dtype, name="ff")
        return x + ff(LayerNorm(1e-6, affine=True, name="norm2")(x)) * gate_mlp[:, None]


class AdaGate(nn.Module):
    """`linear(silu(temb))` under the name `linear` (diffusers' HunyuanVideoAdaNorm)."""

    features: int
    dtype: Any = F32

    @nn.compact
    def __call__(self, temb: jax.Array) -> jax.Array:
        return nn.Dense(self.features, dtype=self.dtype, name="linear")(nn.silu(temb))


class TokenRefiner(PortModule):
    """diffusers' HunyuanVideoTokenRefiner: text [B, L, text_dim] -> refined text [B, L, inner]."""

    config: HunyuanVideoConfig

    @nn.compact
    def __call__(self, text: jax.Array, timestep: jax.Array, mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        if mask is None:
            pooled = text.mean(axis=1)
            self_mask = None
        else:
            m = mask.astype(F32)[..., None]
            pooled = ((text.astype(F32) * m).sum(axis=1) / m.sum(axis=1)).astype(text.dtype)
            valid = mask.astype(bool)
            self_mask = (valid[:, None, :, None] & valid[:, None, None, :]).at[:, :, :, 0].set(True)
        temb = CombinedTimestepTextEmbedding(cfg.inner_dim, self.dtype, name="time_text_embed")(timestep, None, pooled)
        x = nn.Dense(cfg.inner_dim, dtype=self.dtype, name="proj_in")(text)
        return RefinerBlocks(cfg, self.dtype, self.attention_impl, name="token_refiner")(x, temb, self_mask)


class RefinerBlocks(PortModule):
    """diffusers' HunyuanVideoIndividualTokenRefiner: the stack `refiner_blocks_{i}`."""

    config: HunyuanVideoConfig

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, mask: jax.Array | None) -> jax.Array:
        for i in range(self.config.num_refiner_layers):
            x = RefinerBlock(self.config, self.dtype, self.attention_impl, name=f"refiner_blocks_{i}")(x, temb, mask)
        return x


def rope_tables(cfg: HunyuanVideoConfig, grid: tuple[int, int, int]) -> tuple[jax.Array, jax.Array]:
    """3-D RoPE of the (frames, height, width) token grid: axes_dims (t, h, w), theta 256."""
    return axes_rope_tables(jnp.asarray(grid_positions(grid)), cfg.rope_axes_dim, cfg.rope_theta)


class HunyuanVideoTransformer3D(PortModule):
    """HunyuanVideo transformer: latents [B, C, F, H, W], timestep [B] (0..1000), text
    [B, L, text_embed_dim] with mask [B, L] (1 = token, None = all), pooled text [B, pooled_dim],
    guidance [B] (scale * 1000, guidance-distilled configs only) -> velocity [B, C_out, F, H, W]."""

    config: HunyuanVideoConfig

    @nn.compact
    def __call__(
        self,
        hidden_states: jax.Array,
        timestep: jax.Array,
        encoder_hidden_states: jax.Array,
        encoder_attention_mask: jax.Array | None,
        pooled_projections: jax.Array,
        guidance: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        dtype = self.dtype
        if hidden_states.ndim != 5 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(
                f"HunyuanVideo: hidden_states must be [B, {cfg.in_channels}, F, H, W], got {hidden_states.shape}"
            )
        if cfg.guidance_embeds != (guidance is not None):
            raise ValueError(f"HunyuanVideo: guidance must be given exactly when guidance_embeds={cfg.guidance_embeds}")
        x, grid = PatchEmbed(cfg.inner_dim, cfg.patch, dtype=dtype, name="x_embedder")(hidden_states.astype(dtype))
        rope = rope_tables(cfg, grid)
        pooled = pooled_projections.astype(dtype)
        temb = CombinedTimestepTextEmbedding(cfg.inner_dim, dtype, name="time_text_embed")(timestep, guidance, pooled)
        context = TokenRefiner(cfg, dtype, self.attention_impl, name="context_embedder")(
            encoder_hidden_states.astype(dtype), timestep, encoder_attention_mask
        )
        block_args = dict(
            heads=cfg.num_attention_heads,
            head_dim=cfg.attention_head_dim,
            mlp_dim=cfg.mlp_dim,
            dtype=dtype,
            attention_impl=self.attention_impl,
        )
        for i in range(cfg.num_layers):
            block = DoubleStreamBlock(**block_args, name=f"transformer_blocks_{i}")
            x, context = block(x, context, temb, rope, None, encoder_attention_mask)
        for i in range(cfg.num_single_layers):
            block = SingleStreamBlock(**block_args, name=f"single_transformer_blocks_{i}")
            x, context = block(x, context, temb, rope, None, encoder_attention_mask)
        x, _, _ = AdaLayerNorm(2, scale_first=True, dtype=dtype, name="norm_out")(x, temb)
        x = nn.Dense(math.prod(cfg.patch) * cfg.out_channels, dtype=dtype, name="proj_out")(x)
        return unpatchify(x, grid, cfg.patch, channel_major=True)


def key_map(cfg: HunyuanVideoConfig) -> list[KeyEntry]:
    """Explicit diffusers <-> Flax key map for a HunyuanVideo config."""
    d = cfg.inner_dim
    tte, ce = "time_text_embed", "context_embedder"
    entries = patch("x_embedder/proj", "x_embedder.proj", (d, cfg.in_channels, *cfg.patch))
    embedders = ["timestep_embedder", "text_embedder"] + (["guidance_embedder"] if cfg.guidance_embeds else [])
    for e in embedders:
        entries += mlp(f"{tte}/{e}", f"{tte}.{e}")
    for e in ("timestep_embedder", "text_embedder"):
        entries += mlp(f"{ce}/{tte}/{e}", f"{ce}.{tte}.{e}")
    entries += linear(f"{ce}/proj_in", f"{ce}.proj_in")
    for i in range(cfg.num_refiner_layers):
        f, t = f"{ce}/token_refiner/refiner_blocks_{i}", f"{ce}.token_refiner.refiner_blocks.{i}"
        entries += norm(f"{f}/norm1", f"{t}.norm1") + norm(f"{f}/norm2", f"{t}.norm2")
        entries += attention_keys(f"{f}/attn", f"{t}.attn", qk_norm=None) + feed_forward(f"{f}/ff", f"{t}.ff")
        entries += linear(f"{f}/norm_out/linear", f"{t}.norm_out.linear")
    for i in range(cfg.num_layers):
        entries += double_stream_keys(f"transformer_blocks_{i}", f"transformer_blocks.{i}")
    for i in range(cfg.num_single_layers):
        entries += single_stream_keys(f"single_transformer_blocks_{i}", f"single_transformer_blocks.{i}")
    return entries + ada_output_keys()


_REFINER = r"context_embedder/token_refiner/refiner_blocks_\d+"
# Token-refiner layers are text-only self-attention: `self_attn` without `text_fusion`.
ROLE_RULES = (
    (r"x_embedder/proj|time_text_embed/.*|context_embedder/(time_text_embed/.*|proj_in)", ("embedder",)),
    *attn_rules(f"{_REFINER}/attn", "self_attn"),
    *ffn_rules(f"{_REFINER}/ff"),
    (rf"{_REFINER}/norm_out/linear", ("modulation",)),
    *STREAM_BLOCK_RULES,
    *ADA_OUTPUT_RULES,
)


def dummy_inputs(cfg: HunyuanVideoConfig) -> dict[str, jax.Array | None]:
    """Smallest valid inputs: one latent patch, one text token."""
    inputs: dict[str, jax.Array | None] = {
        "hidden_states": jnp.zeros((1, cfg.in_channels, *cfg.patch), F32),
        "timestep": jnp.zeros((1,), F32),
        "encoder_hidden_states": jnp.zeros((1, 1, cfg.text_embed_dim), F32),
        "encoder_attention_mask": None,
        "pooled_projections": jnp.zeros((1, cfg.pooled_projection_dim), F32),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = jnp.zeros((1,), F32)
    return inputs


PORT = Port(HunyuanVideoConfig, HunyuanVideoTransformer3D, key_map, dummy_inputs, ROLE_RULES)
init_params = PORT.init_params  # random float32 params for a config
layer_roles = PORT.layer_roles  # role labels of every Dense kernel of a param tree


def flow_shift_sigmas(num_steps: int) -> np.ndarray:
    """The pipeline's pre-shift sigmas `linspace(1, 0, n + 1)[:-1]`; with the scheduler's shift
    (7.0 for HunyuanVideo T2V) `sample_flow_euler(..., sigmas=..., shift=7.0)` follows it."""
    return np.linspace(1.0, 0.0, num_steps + 1)[:-1]


# Published config (hunyuanvideo-community/HunyuanVideo transformer/config.json = the class defaults).
HUNYUAN_VIDEO_T2V = HunyuanVideoConfig()
