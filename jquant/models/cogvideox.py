"""CogVideoX (diffusers `CogVideoXTransformer3DModel`) in Flax linen.

One stream of [text, video] tokens through expert transformer blocks: a shared `to_q/k/v`
attention (per-head LayerNorm on q/k, 3-D RoPE on the video tokens in 5B / 1.5 models) and a
shared FFN, but separate "expert" adaptive LayerNorm modulations for the text and the video
tokens (`CogVideoXLayerNormZero`: one norm, two shift/scale/gate sets). CogVideoX-2B uses fixed
3-D sin-cos position embeddings instead of RoPE. Latents use diffusers' layout [B, F, C, H, W].

The RoPE tables, which diffusers' pipeline computes and passes in, are computed here from the
config and the latent grid exactly as `CogVideoXPipeline._prepare_rotary_positional_embeddings`.
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
    FeedForward,
    JointAttention,
    LayerNorm,
    PortModule,
    modulate,
    patchify,
    unpatchify,
)
from jquant.models.embeddings import ACTIVATIONS, EmbedMLP, axes_rope_tables, sincos_1d, timestep_embedding
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
from jquant.models.roles import ADA_OUTPUT_RULES, attn_rules, ffn_rules

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class CogVideoXConfig(DiffusersConfig):
    """Keys of diffusers' CogVideoXTransformer3DModel config.json (defaults: CogVideoX-2B)."""

    CLASS_NAME = "CogVideoXTransformer3DModel"

    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int | None = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None
    text_embed_dim: int = 4096
    num_layers: int = 30
    dropout: float = 0.0
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    patch_size_t: int | None = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True

    def __post_init__(self) -> None:
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise ValueError("CogVideoXConfig: learned positional embeddings without RoPE do not exist in diffusers")
        if self.timestep_activation_fn not in ACTIVATIONS:
            raise ValueError(
                f"CogVideoXConfig.timestep_activation_fn {self.timestep_activation_fn!r} not in {sorted(ACTIVATIONS)}"
            )
        if self.ofs_embed_dim is not None and self.ofs_embed_dim != self.time_embed_dim:
            raise ValueError("CogVideoXConfig: ofs_embed_dim must equal time_embed_dim (the embeddings are summed)")
        if self.patch_size_t is not None and not self.use_rotary_positional_embeddings:
            raise ValueError(
                "CogVideoXConfig: patch_size_t needs RoPE (diffusers' sin-cos table assumes no temporal patching)"
            )
        if (self.inner_dim * 3 // 4) % 4 or self.attention_head_dim % 8:
            raise ValueError("CogVideoXConfig: inner_dim must be divisible by 16 and attention_head_dim by 8")

    @property
    def patch(self) -> tuple[int, int, int]:
        return (self.patch_size_t or 1, self.patch_size, self.patch_size)


def sincos_3d_pos_embed(cfg: CogVideoXConfig, grid: tuple[int, int, int]) -> np.ndarray:
    """diffusers' `get_3d_sincos_pos_embed` for a (frames, height, width) token grid -> [F*H*W, D]:
    a quarter of the channels encode the frame, the rest the (width, height) position."""
    f, h, w = grid
    d = cfg.inner_dim
    s = np.float32(cfg.spatial_interpolation_scale)
    col, row = np.meshgrid(np.arange(w, dtype=np.float32) / s, np.arange(h, dtype=np.float32) / s)
    spatial = np.concatenate([sincos_1d(3 * d // 8, col.reshape(-1)), sincos_1d(3 * d // 8, row.reshape(-1))], axis=1)
    temporal = sincos_1d(d // 4, np.arange(f, dtype=np.float32) / np.float32(cfg.temporal_interpolation_scale))
    out = np.concatenate([np.repeat(temporal[:, None], h * w, axis=1), np.repeat(spatial[None], f, axis=0)], axis=-1)
    return out.reshape(f * h * w, d).astype(np.float32)


def rope_positions(cfg: CogVideoXConfig, grid: tuple[int, int, int]) -> np.ndarray:
    """Per-token (t, h, w) RoPE positions [F*H*W, 3], as the CogVideoX pipeline builds them:
    1.0 models map the grid into the crop of the base grid (sample size // patch), 1.5 models
    (patch_size_t set) use integer positions."""
    f, h, w = grid
    if cfg.patch_size_t is None:
        base_w, base_h = cfg.sample_width // cfg.patch_size, cfg.sample_height // cfg.patch_size
        if h / w > base_h / base_w:
            rh, rw = base_h, int(round(base_h / h * w))
        else:
            rw, rh = base_w, int(round(base_w / w * h))
        top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
        axes = [
            np.linspace(0, f * (f - 1) / f, f, dtype=np.float32),
            np.linspace(top, (top + rh) * (h - 1) / h, h, dtype=np.float32),
            np.linspace(left, (left + rw) * (w - 1) / w, w, dtype=np.float32),
        ]
    else:
        axes = [np.arange(n, dtype=np.float32) for n in grid]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], axis=-1)


def rope_tables(cfg: CogVideoXConfig, grid: tuple[int, int, int]) -> tuple[jax.Array, jax.Array]:
    """3-D RoPE tables [F*H*W, head_dim]: head_dim/4 channels for time, 3/8 each for height, width."""
    hd = cfg.attention_head_dim
    dims = (hd // 4, hd // 8 * 3, hd // 8 * 3)
    return axes_rope_tables(jnp.asarray(rope_positions(cfg, grid)), dims)


class ExpertNormZero(nn.Module):
    """diffusers' CogVideoXLayerNormZero: one LayerNorm `norm`, `linear(silu(temb))` -> separate
    (shift, scale, gate) for the video and the text tokens. Returns (video, text, gate, text_gate)."""

    eps: float
    affine: bool
    dtype: Any = F32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array) -> tuple[jax.Array, ...]:
        out = nn.Dense(6 * x.shape[-1], dtype=self.dtype, name="linear")(nn.silu(temb))
        shift, scale, gate, c_shift, c_scale, c_gate = jnp.split(out, 6, axis=-1)
        ln = LayerNorm(self.eps, self.affine, name="norm")
        return modulate(ln(x), shift, scale), modulate(ln(context), c_shift, c_scale), gate, c_gate


class CogVideoXBlock(PortModule):
    """Expert block: modulated [text, video] -> joint attention (shared weights) -> shared FFN."""

    config: CogVideoXConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array, temb: jax.Array, rope: tuple[jax.Array, jax.Array] | None
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        dim = cfg.inner_dim
        n_ctx = context.shape[1]
        norm = dict(eps=cfg.norm_eps, affine=cfg.norm_elementwise_affine, dtype=self.dtype)
        nx, nc, gate, c_gate = ExpertNormZero(**norm, name="norm1")(x, context, temb)
        attn = JointAttention(
            cfg.num_attention_heads,
            cfg.attention_head_dim,
            qk_norm="layer_norm",
            use_bias=cfg.attention_bias,
            shared_qkv=True,
            context_first=True,
            output="shared",
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            name="attn1",
        )
        ax, ac = attn(nx, nc, rope)
        x = x + gate[:, None] * ax
        context = context + c_gate[:, None] * ac
        nx, nc, gate, c_gate = ExpertNormZero(**norm, name="norm2")(x, context, temb)
        ff = FeedForward(4 * dim, dim, cfg.activation_fn, self.dtype, name="ff")(jnp.concatenate([nc, nx], axis=1))
        return x + gate[:, None] * ff[:, n_ctx:], context + c_gate[:, None] * ff[:, :n_ctx]


class CogVideoXPatchEmbed(nn.Module):
    """Text `text_proj` + video patches `proj` (Conv2d per frame, or Linear over (C, p_t, p, p) in
    1.5 models), concatenated [text, video], plus sin-cos or learned position embeddings."""

    config: CogVideoXConfig
    dtype: Any = F32

    @nn.compact
    def __call__(self, text: jax.Array, latents: jax.Array) -> tuple[jax.Array, jax.Array, tuple[int, int, int]]:
        cfg = self.config
        text = nn.Dense(cfg.inner_dim, dtype=self.dtype, name="text_proj")(text)
        tokens, grid = patchify(latents.transpose(0, 2, 1, 3, 4), cfg.patch)
        video = nn.Dense(
            cfg.inner_dim, use_bias=cfg.patch_bias or cfg.patch_size_t is not None, dtype=self.dtype, name="proj"
        )(tokens)
        if cfg.use_learned_positional_embeddings:
            sample = self.sample_grid(cfg)
            table = self.param(
                "pos_embedding", nn.initializers.zeros, (1, cfg.max_text_seq_length + math.prod(sample), cfg.inner_dim)
            )
            if grid[1:] != sample[1:]:
                raise ValueError(
                    f"CogVideoX: learned position embeddings need the sample grid {sample[1:]}, got {grid[1:]}"
                )
            if grid == sample:
                if text.shape[1] != cfg.max_text_seq_length:
                    raise ValueError(
                        f"CogVideoX: learned position embeddings need {cfg.max_text_seq_length} text tokens, got {text.shape[1]}"
                    )
                n = cfg.max_text_seq_length
                return (text + table[:, :n].astype(text.dtype), video + table[:, n:].astype(video.dtype), grid)
        if not cfg.use_rotary_positional_embeddings or cfg.use_learned_positional_embeddings:
            video = video + jnp.asarray(sincos_3d_pos_embed(cfg, grid), video.dtype)[None]
        return text, video, grid

    @staticmethod
    def sample_grid(cfg: CogVideoXConfig) -> tuple[int, int, int]:
        frames = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
        return (frames, cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size)


class CogVideoXTransformer3D(PortModule):
    """CogVideoX transformer: latents [B, F, C, H, W], text [B, L, text_embed_dim], timestep [B]
    (0..999), `ofs` [B] (I2V 1.5 configs with ofs_embed_dim) -> v-prediction [B, F, C_out, H, W]."""

    config: CogVideoXConfig

    @nn.compact
    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        timestep: jax.Array,
        ofs: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        dtype = self.dtype
        if hidden_states.ndim != 5 or hidden_states.shape[2] != cfg.in_channels:
            raise ValueError(
                f"CogVideoX: hidden_states must be [B, F, {cfg.in_channels}, H, W], got {hidden_states.shape}"
            )
        if (ofs is None) != (cfg.ofs_embed_dim is None):
            raise ValueError("CogVideoX: ofs is required exactly when the config has ofs_embed_dim")
        sinusoid = dict(flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift)
        t = timestep_embedding(timestep, cfg.inner_dim, **sinusoid).astype(dtype)
        emb = EmbedMLP(cfg.time_embed_dim, cfg.timestep_activation_fn, dtype, name="time_embedding")(t)
        if ofs is not None:
            o = timestep_embedding(ofs, cfg.ofs_embed_dim, **sinusoid).astype(dtype)
            emb = emb + EmbedMLP(cfg.ofs_embed_dim, cfg.timestep_activation_fn, dtype, name="ofs_embedding")(o)

        context, x, grid = CogVideoXPatchEmbed(cfg, dtype, name="patch_embed")(
            encoder_hidden_states.astype(dtype), hidden_states.astype(dtype)
        )
        rope = rope_tables(cfg, grid) if cfg.use_rotary_positional_embeddings else None
        for i in range(cfg.num_layers):
            x, context = CogVideoXBlock(cfg, dtype, self.attention_impl, name=f"transformer_blocks_{i}")(
                x, context, emb, rope
            )

        x = LayerNorm(cfg.norm_eps, cfg.norm_elementwise_affine, name="norm_final")(x)
        x, _, _ = AdaLayerNorm(2, eps=cfg.norm_eps, affine=cfg.norm_elementwise_affine, dtype=dtype, name="norm_out")(
            x, emb
        )
        x = nn.Dense(math.prod(cfg.patch) * cfg.out_dim, dtype=dtype, name="proj_out")(x)
        return unpatchify(x, grid, cfg.patch, channel_major=True).transpose(0, 2, 1, 3, 4)


def key_map(cfg: CogVideoXConfig) -> list[KeyEntry]:
    """Explicit diffusers <-> Flax key map for a CogVideoX config."""
    d = cfg.inner_dim
    pe = "patch_embed"
    entries = mlp("time_embedding", "time_embedding")
    if cfg.ofs_embed_dim is not None:
        entries += mlp("ofs_embedding", "ofs_embedding")
    if cfg.patch_size_t is None:
        p = cfg.patch_size
        entries += patch(f"{pe}/proj", f"{pe}.proj", (d, cfg.in_channels, p, p), cfg.patch_bias)
    else:
        entries += linear(f"{pe}/proj", f"{pe}.proj")
    entries += linear(f"{pe}/text_proj", f"{pe}.text_proj")
    if cfg.use_learned_positional_embeddings:
        entries.append(KeyEntry(f"{pe}/pos_embedding", f"{pe}.pos_embedding"))
    affine = cfg.norm_elementwise_affine
    for i in range(cfg.num_layers):
        f, t = f"transformer_blocks_{i}", f"transformer_blocks.{i}"
        for n in ("norm1", "norm2"):
            entries += linear(f"{f}/{n}/linear", f"{t}.{n}.linear")
            entries += norm(f"{f}/{n}/norm", f"{t}.{n}.norm") if affine else []
        entries += attention_keys(f"{f}/attn1", f"{t}.attn1", bias=cfg.attention_bias, qk_norm="layer_norm")
        entries += feed_forward(f"{f}/ff", f"{t}.ff")
    if affine:
        entries += norm("norm_final", "norm_final") + norm("norm_out/norm", "norm_out.norm")
    return entries + ada_output_keys()


_BLOCK = r"transformer_blocks_\d+"
# Text and video share every projection (only the norm1/norm2 modulations are per-modality
# "experts"), so the joint attention's projections are `text_fusion`.
ROLE_RULES = (
    (r"time_embedding/.*|ofs_embedding/.*|patch_embed/(proj|text_proj)", ("embedder",)),
    (rf"{_BLOCK}/norm[12]/linear", ("modulation",)),
    *attn_rules(f"{_BLOCK}/attn1", "self_attn", "text_fusion"),
    *ffn_rules(f"{_BLOCK}/ff"),
    *ADA_OUTPUT_RULES,
)


def dummy_inputs(cfg: CogVideoXConfig) -> dict[str, jax.Array]:
    """Smallest valid inputs (the sample grid and full text length with learned position embeddings)."""
    pt, p, _ = cfg.patch
    f, h, w = CogVideoXPatchEmbed.sample_grid(cfg) if cfg.use_learned_positional_embeddings else (1, 1, 1)
    text_len = cfg.max_text_seq_length if cfg.use_learned_positional_embeddings else 1
    inputs = {
        "hidden_states": jnp.zeros((1, f * pt, cfg.in_channels, h * p, w * p), F32),
        "encoder_hidden_states": jnp.zeros((1, text_len, cfg.text_embed_dim), F32),
        "timestep": jnp.zeros((1,), F32),
    }
    if cfg.ofs_embed_dim is not None:
        inputs["ofs"] = jnp.zeros((1,), F32)
    return inputs


PORT = Port(CogVideoXConfig, CogVideoXTransformer3D, key_map, dummy_inputs, ROLE_RULES)
init_params = PORT.init_params  # random float32 params for a config
layer_roles = PORT.layer_roles  # role labels of every Dense kernel of a param tree


# Published configs (THUDM/CogVideoX-{2b,5b} transformer/config.json).
COGVIDEOX_2B = CogVideoXConfig()
COGVIDEOX_5B = CogVideoXConfig(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
