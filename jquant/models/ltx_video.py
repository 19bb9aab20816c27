"""LTX-Video (diffusers `LTXVideoTransformer3DModel`) in Flax linen.

A PixArt-style video DiT over pre-packed latent tokens [B, S, C] (the pipeline packs with
patch size 1): parameter-free RMSNorms modulated by adaLN-single (a per-block
`scale_shift_table` plus the shared timestep projection, optionally per token), self-attention
with RoPE over the full inner width (fractional 3-D coordinates), cross-attention to the
projected T5 text with padded text keys masked, GELU FFN.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jquant.models.blocks import AdaLayerNormSingle, Attention, FeedForward, LayerNorm, PortModule, RMSNorm, key_mask
from jquant.models.embeddings import EmbedMLP
from jquant.models.port import (
    DiffusersConfig,
    KeyEntry,
    Port,
    adaln_single,
    attention_keys,
    feed_forward,
    linear,
    mlp,
    norm,
)
from jquant.models.roles import cross_attn_block_rules

F32 = jnp.float32
Rope = tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class LTXVideoConfig(DiffusersConfig):
    """Keys of diffusers' LTXVideoTransformer3DModel config.json (defaults: Lightricks/LTX-Video 2B)."""

    CLASS_NAME = "LTXVideoTransformer3DModel"

    in_channels: int = 128
    out_channels: int = 128
    patch_size: int = 1
    patch_size_t: int = 1
    num_attention_heads: int = 32
    attention_head_dim: int = 64
    cross_attention_dim: int = 2048
    num_layers: int = 28
    activation_fn: str = "gelu-approximate"
    qk_norm: str = "rms_norm_across_heads"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    caption_channels: int = 4096
    attention_bias: bool = True
    attention_out_bias: bool = True

    def __post_init__(self) -> None:
        if self.qk_norm != "rms_norm_across_heads":
            raise ValueError(
                f"LTXVideoConfig.qk_norm={self.qk_norm!r}: diffusers only supports 'rms_norm_across_heads'"
            )
        if self.cross_attention_dim != self.inner_dim:
            raise ValueError(
                "LTXVideoConfig: cross_attention_dim must equal heads * head_dim (the caption projection width)"
            )


def rope_frequencies(n: int, theta: float, double_precision: bool = False) -> np.ndarray:
    """theta^linspace(0, 1, n) * pi / 2 as float32 (LTX: float32 math, within an ulp of diffusers';
    LTX-2 with `double_precision`: float64 rounded once)."""
    if double_precision:
        return (theta ** np.linspace(0.0, 1.0, n) * np.pi / 2.0).astype(np.float32)
    freqs = (theta ** np.linspace(0.0, 1.0, n, dtype=np.float32).astype(np.float64)).astype(np.float32)
    return freqs * np.float32(math.pi) / np.float32(2.0)


def fractional_rope(grid: jax.Array, dim: int, freqs: np.ndarray, heads: int, interleaved: bool = True) -> Rope:
    """LTX's RoPE over the full inner width: coordinates grid [B, S, n_axes] in [0, 1]-ish units,
    angle (2 * grid - 1) * freq for every (freq, axis) pair, padded at the front with identity
    channels to `dim`, split into per-head tables [B, S, heads, dim / heads]. `interleaved=False`
    gives LTX-2's "split" layout (see `apply_rope`)."""
    angles = (grid[..., None] * 2 - 1) * jnp.asarray(freqs)  # [B, S, axes, n]
    angles = jnp.swapaxes(angles, -1, -2).reshape(*grid.shape[:2], -1)  # [B, S, n * axes]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    b, s = grid.shape[:2]
    if interleaved:
        cos, sin = jnp.repeat(cos, 2, axis=-1), jnp.repeat(sin, 2, axis=-1)
        pad = dim - cos.shape[-1]
        cos = jnp.concatenate([jnp.ones((b, s, pad), F32), cos], axis=-1)
        sin = jnp.concatenate([jnp.zeros((b, s, pad), F32), sin], axis=-1)
        return cos.reshape(b, s, heads, -1), sin.reshape(b, s, heads, -1)
    pad = dim // 2 - cos.shape[-1]
    cos = jnp.concatenate([jnp.ones((b, s, pad), F32), cos], axis=-1).reshape(b, s, heads, -1)
    sin = jnp.concatenate([jnp.zeros((b, s, pad), F32), sin], axis=-1).reshape(b, s, heads, -1)
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def video_grid(
    cfg: LTXVideoConfig,
    num_frames: int,
    height: int,
    width: int,
    rope_interpolation_scale: Sequence[float] | None,
    video_coords: jax.Array | None,
) -> jax.Array:
    """RoPE coordinates [B or 1, S, 3]: the (frame, row, column) token grid, scaled by
    `rope_interpolation_scale * patch / (20, 2048, 2048)` when given, or `video_coords` [B, 3, S] / base."""
    base = (20.0, 2048.0, 2048.0)
    if video_coords is not None:
        return jnp.stack([video_coords[:, i].astype(F32) / np.float32(base[i]) for i in range(3)], axis=-1)
    axes = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (num_frames, height, width)], indexing="ij")
    grid = np.stack([a.reshape(-1) for a in axes], axis=-1)
    if rope_interpolation_scale is not None:
        patch = (cfg.patch_size_t, cfg.patch_size, cfg.patch_size)
        for i in range(3):
            grid[:, i] = (
                grid[:, i] * np.float32(rope_interpolation_scale[i]) * np.float32(patch[i]) / np.float32(base[i])
            )
    return jnp.asarray(grid)[None]


def ada_values(table: jax.Array, temb: jax.Array) -> list[jax.Array]:
    """`scale_shift_table` [n, D] + timestep projection [B, T, n*D] -> n modulation vectors [B, T, D]."""
    n = table.shape[0]
    values = table.astype(F32)[None, None] + temb.reshape(*temb.shape[:2], n, -1).astype(F32)
    return [values[:, :, i].astype(temb.dtype) for i in range(n)]


class LTXVideoBlock(PortModule):
    """Modulated RMSNorm -> self-attention (RoPE) -> cross-attention to text -> modulated FFN."""

    config: LTXVideoConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array, temb: jax.Array, rope: Rope, mask: jax.Array | None
    ) -> jax.Array:
        cfg = self.config
        dim = cfg.inner_dim
        table = self.param("scale_shift_table", nn.initializers.normal(dim**-0.5), (6, dim))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada_values(table, temb)
        rms = dict(eps=cfg.norm_eps, affine=cfg.norm_elementwise_affine)
        attn = dict(
            heads=cfg.num_attention_heads,
            head_dim=cfg.attention_head_dim,
            qk_norm="rms_norm_across_heads",
            eps=1e-5,
            use_bias=cfg.attention_bias,
            out_bias=cfg.attention_out_bias,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )
        h = RMSNorm(**rms, name="norm1")(x) * (1 + scale_msa) + shift_msa
        x = x + Attention(**attn, name="attn1")(h, rope=rope) * gate_msa
        x = x + Attention(**attn, name="attn2")(x, context, mask=mask)
        h = RMSNorm(**rms, name="norm2")(x) * (1 + scale_mlp) + shift_mlp
        return x + FeedForward(4 * dim, dim, cfg.activation_fn, self.dtype, name="ff")(h) * gate_mlp


def modulated_output(x: jax.Array, table: jax.Array, embedded: jax.Array) -> jax.Array:
    """Final LayerNorm modulated by `scale_shift_table` [2, D] + embedded timestep [B, T, D]."""
    values = table.astype(F32)[None, None] + embedded[:, :, None].astype(F32)
    shift, scale = values[:, :, 0].astype(x.dtype), values[:, :, 1].astype(x.dtype)
    return LayerNorm(1e-6)(x) * (1 + scale) + shift


def token_timesteps(timestep: jax.Array, batch: int) -> jax.Array:
    """Timesteps [B] or per token [B, S], flattened for the embedder."""
    if timestep.ndim not in (1, 2) or timestep.shape[0] != batch:
        raise ValueError(f"timestep must be [B] or [B, tokens] with B={batch}, got {timestep.shape}")
    return timestep.reshape(-1)


class LTXVideoTransformer3D(PortModule):
    """LTX-Video transformer: packed latents [B, S, in_channels], text [B, L, caption_channels],
    timestep [B] or per token [B, S] (0..1000), text mask [B, L] (1 = token) or None; the token
    grid `num_frames, height, width` (Python ints, static) with `rope_interpolation_scale`
    (the pipeline's (temporal compression / frame rate, 32, 32)), or `video_coords` [B, 3, S]
    -> velocity [B, S, out_channels]."""

    config: LTXVideoConfig

    @nn.compact
    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        timestep: jax.Array,
        encoder_attention_mask: jax.Array | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        rope_interpolation_scale: Sequence[float] | None = None,
        video_coords: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        dtype = self.dtype
        batch, tokens = hidden_states.shape[:2]
        if video_coords is None and (num_frames is None or height is None or width is None):
            raise ValueError("LTXVideo: give num_frames, height and width (or video_coords)")
        if video_coords is None and num_frames * height * width != tokens:
            raise ValueError(f"LTXVideo: grid {num_frames}x{height}x{width} != {tokens} tokens")
        grid = video_grid(cfg, num_frames, height, width, rope_interpolation_scale, video_coords)
        rope = fractional_rope(
            grid, cfg.inner_dim, rope_frequencies(cfg.inner_dim // 6, 10000.0), cfg.num_attention_heads
        )

        x = nn.Dense(cfg.inner_dim, dtype=dtype, name="proj_in")(hidden_states.astype(dtype))
        temb, embedded = AdaLayerNormSingle(cfg.inner_dim, 6, dtype, name="time_embed")(
            token_timesteps(timestep, batch)
        )
        temb, embedded = temb.reshape(batch, -1, temb.shape[-1]), embedded.reshape(batch, -1, cfg.inner_dim)
        context = EmbedMLP(cfg.inner_dim, "gelu_tanh", dtype, name="caption_projection")(
            encoder_hidden_states.astype(dtype)
        )
        mask = key_mask(encoder_attention_mask)
        for i in range(cfg.num_layers):
            x = LTXVideoBlock(cfg, dtype, self.attention_impl, name=f"transformer_blocks_{i}")(
                x, context, temb, rope, mask
            )

        table = self.param("scale_shift_table", nn.initializers.normal(cfg.inner_dim**-0.5), (2, cfg.inner_dim))
        return nn.Dense(cfg.out_dim, dtype=dtype, name="proj_out")(modulated_output(x, table, embedded))


def key_map(cfg: LTXVideoConfig) -> list[KeyEntry]:
    """Explicit diffusers <-> Flax key map for an LTX-Video config."""
    entries = linear("proj_in", "proj_in") + [KeyEntry("scale_shift_table", "scale_shift_table")]
    entries += adaln_single("time_embed", "time_embed") + mlp("caption_projection", "caption_projection")
    for i in range(cfg.num_layers):
        f, t = f"transformer_blocks_{i}", f"transformer_blocks.{i}"
        entries.append(KeyEntry(f"{f}/scale_shift_table", f"{t}.scale_shift_table"))
        for a in ("attn1", "attn2"):
            entries += attention_keys(f"{f}/{a}", f"{t}.{a}", cfg.attention_bias, cfg.attention_out_bias)
        if cfg.norm_elementwise_affine:
            entries += norm(f"{f}/norm1", f"{t}.norm1", bias=False) + norm(f"{f}/norm2", f"{t}.norm2", bias=False)
        entries += feed_forward(f"{f}/ff", f"{t}.ff")
    return entries + linear("proj_out", "proj_out")


# Space-time self-attention is `temporal`, as Wan's; text enters only through the cross-attention.
ROLE_RULES = (
    (r"proj_in|caption_projection/.*|time_embed/emb/.*", ("embedder",)),
    (r"time_embed/linear", ("embedder", "modulation")),
    *cross_attn_block_rules(r"transformer_blocks_\d+"),
    (r"proj_out", ("final",)),
)


def dummy_inputs(cfg: LTXVideoConfig) -> dict[str, Any]:
    """Smallest valid inputs: one token, one text token."""
    return {
        "hidden_states": jnp.zeros((1, 1, cfg.in_channels), F32),
        "encoder_hidden_states": jnp.zeros((1, 1, cfg.caption_channels), F32),
        "timestep": jnp.zeros((1,), F32),
        "num_frames": 1,
        "height": 1,
        "width": 1,
    }


PORT = Port(LTXVideoConfig, LTXVideoTransformer3D, key_map, dummy_inputs, ROLE_RULES)
init_params = PORT.init_params  # random float32 params for a config
layer_roles = PORT.layer_roles  # role labels of every Dense kernel of a param tree


def flow_schedule_kwargs(num_steps: int, num_tokens: int, shift_terminal: float | None = 0.1) -> dict[str, Any]:
    """`jquant.sampling.flow_match_schedule(**kwargs)` arguments of the LTX and LTX-2 pipelines:
    sigmas linspace(1, 1/n, n) and the dynamic shift mu of the video token count (0.95 at 1024
    tokens, 2.05 at 4096), plus the scheduler config's `shift_terminal` (0.1 in
    Lightricks/LTX-Video's; pass the checkpoint's value, None for none)."""
    m = (2.05 - 0.95) / (4096 - 1024)
    kwargs: dict[str, Any] = dict(
        sigmas=list(np.linspace(1.0, 1.0 / num_steps, num_steps)),
        use_dynamic_shifting=True,
        mu=num_tokens * m + (0.95 - m * 1024),
    )
    if shift_terminal:
        kwargs["shift_terminal"] = shift_terminal
    return kwargs


# Published config (Lightricks/LTX-Video transformer/config.json = the class defaults).
LTX_VIDEO_2B = LTXVideoConfig()
