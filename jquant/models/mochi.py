"""Mochi-1 (diffusers `MochiTransformer3DModel`) in Flax linen.

Asymmetric MM-DiT: video tokens have width `inner_dim` (3072), text tokens their own narrower
width `pooled_projection_dim` (1536); they meet in a joint attention whose text side projects
from and back to the text width (`add_{q,k,v}_proj`, `to_add_out`). Norms are RMSNorms with
scale-only modulation and tanh-gated residuals; the FFNs are SwiGLU; RoPE frequencies are a
learned per-head parameter (`pos_frequencies`). Padded text tokens are dropped from attention.
The last block is `context_pre_only` (no text output). Latents use diffusers' layout [B, C, F, H, W].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jquant.models.attention import attention
from jquant.models.blocks import (
    AdaLayerNorm,
    FeedForward,
    JointAttention,
    PatchEmbed,
    PortModule,
    key_mask,
    split_heads,
    unpatchify,
)
from jquant.models.embeddings import EmbedMLP, timestep_embedding
from jquant.models.port import DiffusersConfig, KeyEntry, Port, ada_output_keys, feed_forward, linear, mlp, norm, patch
from jquant.models.roles import ADA_OUTPUT_RULES, joint_block_rules

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class MochiConfig(DiffusersConfig):
    """Keys of diffusers' MochiTransformer3DModel config.json (defaults: genmo/mochi-1-preview)."""

    CLASS_NAME = "MochiTransformer3DModel"

    patch_size: int = 2
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 48
    pooled_projection_dim: int = 1536
    in_channels: int = 12
    out_channels: int | None = None
    qk_norm: str = "rms_norm"
    text_embed_dim: int = 4096
    time_embed_dim: int = 256
    activation_fn: str = "swiglu"
    max_sequence_length: int = 256

    def __post_init__(self) -> None:
        if self.qk_norm != "rms_norm" or self.activation_fn != "swiglu":
            raise ValueError("MochiConfig: diffusers' Mochi only has qk_norm='rms_norm' and activation_fn='swiglu'")
        if self.text_embed_dim % 8:
            raise ValueError(f"MochiConfig.text_embed_dim={self.text_embed_dim} must split into the pooler's 8 heads")

    @property
    def patch(self) -> tuple[int, int, int]:
        return (1, self.patch_size, self.patch_size)


def modulated_rms(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """diffusers' MochiModulatedRMSNorm: parameter-free RMSNorm in float32 times `scale` [B, D]."""
    xf = x.astype(F32)
    out = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps) * scale[:, None].astype(F32)
    return out.astype(x.dtype)


class ScaleModulation(nn.Module):
    """`<dense_name>(silu(temb))` split into `num_chunks` vectors of width `features`: the linear of
    diffusers' MochiRMSNormZero (4 chunks, `linear`) and MochiLayerNormContinuous (1, `linear_1`)."""

    features: int
    num_chunks: int
    dense_name: str = "linear"
    dtype: Any = F32

    @nn.compact
    def __call__(self, temb: jax.Array) -> list[jax.Array]:
        out = nn.Dense(self.num_chunks * self.features, dtype=self.dtype, name=self.dense_name)(nn.silu(temb))
        return jnp.split(out, self.num_chunks, axis=-1)


class AttentionPool(nn.Module):
    """diffusers' MochiAttentionPool: a query from the masked mean of the text tokens attends over
    [mean, tokens] (8 heads) -> `to_out` -> [B, out_dim]."""

    heads: int
    out_dim: int
    dtype: Any = F32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        d = x.shape[-1]
        if mask is None:
            pooled = x.mean(axis=1, keepdims=True)
            keys = None
        else:
            m = mask.astype(x.dtype)[..., None]
            pooled = (x * (m / jnp.maximum(m.sum(axis=1, keepdims=True), 1))).sum(axis=1, keepdims=True)
            keys = key_mask(jnp.concatenate([jnp.ones((x.shape[0], 1), bool), mask.astype(bool)], axis=1))
        x = jnp.concatenate([pooled, x], axis=1)
        kv = nn.Dense(2 * d, dtype=self.dtype, name="to_kv")(x)
        k, v = split_heads(kv[..., :d], self.heads), split_heads(kv[..., d:], self.heads)
        q = split_heads(nn.Dense(d, dtype=self.dtype, name="to_q")(x[:, :1]), self.heads)
        out = attention(q, k, v, keys)  # one query, head_dim 512: always XLA's attention
        return nn.Dense(self.out_dim, dtype=self.dtype, name="to_out")(out.reshape(x.shape[0], d))


class MochiTimeCaptionEmbed(nn.Module):
    """diffusers' MochiCombinedTimestepCaptionEmbedding: (timestep MLP + attention-pooled text) as the
    conditioning [B, inner], and the text tokens projected to the text width (`caption_proj`)."""

    config: MochiConfig
    dtype: Any = F32

    @nn.compact
    def __call__(self, timestep: jax.Array, text: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        t = timestep_embedding(timestep, cfg.time_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0).astype(
            self.dtype
        )
        temb = EmbedMLP(cfg.inner_dim, "silu", self.dtype, name="timestep_embedder")(t)
        pooled = AttentionPool(8, cfg.inner_dim, self.dtype, name="pooler")(text, mask)
        caption = nn.Dense(cfg.pooled_projection_dim, dtype=self.dtype, name="caption_proj")(text)
        return temb + pooled, caption


class MochiBlock(PortModule):
    """Mochi block: scale-modulated RMSNorms, asymmetric joint attention, tanh-gated residuals,
    SwiGLU FFNs for video and (except in the last, `context_pre_only`, block) text."""

    config: MochiConfig
    context_pre_only: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        temb: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        mask: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        dim, cdim, eps = cfg.inner_dim, cfg.pooled_projection_dim, 1e-6
        scale_msa, gate_msa, scale_mlp, gate_mlp = ScaleModulation(dim, 4, dtype=self.dtype, name="norm1")(temb)
        nx = modulated_rms(x, 1 + scale_msa, eps)
        if self.context_pre_only:
            (c_scale,) = ScaleModulation(cdim, 1, "linear_1", self.dtype, name="norm1_context")(temb)
        else:
            c_scale, c_gate_msa, c_scale_mlp, c_gate_mlp = ScaleModulation(
                cdim, 4, dtype=self.dtype, name="norm1_context"
            )(temb)
        nc = modulated_rms(context, 1 + c_scale, eps)
        attn = JointAttention(
            cfg.num_attention_heads,
            cfg.attention_head_dim,
            eps=1e-5,
            use_bias=False,
            added_bias=False,
            output="x_only" if self.context_pre_only else "split",
            compact_masked_context=True,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            name="attn1",
        )
        ax, ac = attn(nx, nc, rope, None, mask)
        x = x + modulated_rms(ax, jnp.tanh(gate_msa), eps)
        ff = FeedForward((4 * dim * 2) // 3, dim, "swiglu", self.dtype, use_bias=False, name="ff")
        x = x + modulated_rms(ff(modulated_rms(x, 1 + scale_mlp, eps)), jnp.tanh(gate_mlp), eps)
        if self.context_pre_only:
            return x, context
        context = context + modulated_rms(ac, jnp.tanh(c_gate_msa), eps)
        ff_c = FeedForward((4 * cdim * 2) // 3, cdim, "swiglu", self.dtype, use_bias=False, name="ff_context")
        context = context + modulated_rms(ff_c(modulated_rms(context, 1 + c_scale_mlp, eps)), jnp.tanh(c_gate_mlp), eps)
        return x, context


def rope_positions(grid: tuple[int, int, int], base: int = 192) -> np.ndarray:
    """diffusers' MochiRoPE positions [F*H*W, 3]: frame index, and patch centres of a grid rescaled
    to the base area 192 x 192 (centred on 0)."""
    f, h, w = grid
    scale = np.float32((base * base / (h * w)) ** 0.5)

    def centers(n: int) -> np.ndarray:
        edges = np.linspace(-n * scale / 2, n * scale / 2, n + 1, dtype=np.float32)
        return (edges[:-1] + edges[1:]) / np.float32(2)

    mesh = np.meshgrid(np.arange(f, dtype=np.float32), centers(h), centers(w), indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], axis=-1)


def rope_tables(pos_frequencies: jax.Array, grid: tuple[int, int, int]) -> tuple[jax.Array, jax.Array]:
    """Per-head RoPE tables [F*H*W, heads, head_dim] from the learned frequencies [3, heads, head_dim/2]."""
    angles = jnp.einsum("nd,dhf->nhf", jnp.asarray(rope_positions(grid)), pos_frequencies.astype(F32))
    return jnp.repeat(jnp.cos(angles), 2, axis=-1), jnp.repeat(jnp.sin(angles), 2, axis=-1)


class MochiTransformer3D(PortModule):
    """Mochi transformer: latents [B, C, F, H, W], text [B, L, text_embed_dim], timestep [B]
    (0..1000), text mask [B, L] (1 = token) or None (all real) -> [B, C_out, F, H, W]. Padded text
    tokens are dropped from attention; their outputs are left-aligned then zeroed, as diffusers' gather."""

    config: MochiConfig

    @nn.compact
    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        timestep: jax.Array,
        encoder_attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        dtype = self.dtype
        if hidden_states.ndim != 5 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(f"Mochi: hidden_states must be [B, {cfg.in_channels}, F, H, W], got {hidden_states.shape}")
        if encoder_attention_mask is not None and encoder_attention_mask.shape != encoder_hidden_states.shape[:2]:
            raise ValueError(f"Mochi: encoder_attention_mask {encoder_attention_mask.shape} must be [B, L] of the text")
        temb, context = MochiTimeCaptionEmbed(cfg, dtype, name="time_embed")(
            timestep, encoder_hidden_states.astype(dtype), encoder_attention_mask
        )
        x, grid = PatchEmbed(cfg.inner_dim, cfg.patch, dtype=dtype, name="patch_embed")(hidden_states.astype(dtype))
        freqs = self.param(
            "pos_frequencies", nn.initializers.zeros, (3, cfg.num_attention_heads, cfg.attention_head_dim // 2)
        )
        rope = rope_tables(freqs, grid)
        for i in range(cfg.num_layers):
            last = i == cfg.num_layers - 1
            block = MochiBlock(cfg, dtype, self.attention_impl, context_pre_only=last, name=f"transformer_blocks_{i}")
            x, context = block(x, context, temb, rope, encoder_attention_mask)
        x, _, _ = AdaLayerNorm(2, scale_first=True, dtype=dtype, name="norm_out")(x, temb)
        x = nn.Dense(cfg.patch_size**2 * cfg.out_dim, dtype=dtype, name="proj_out")(x)
        return unpatchify(x, grid, cfg.patch)


def key_map(cfg: MochiConfig) -> list[KeyEntry]:
    """Explicit diffusers <-> Flax key map for a Mochi config."""
    d, p = cfg.inner_dim, cfg.patch_size
    te = "time_embed"
    entries = [
        *patch("patch_embed/proj", "patch_embed.proj", (d, cfg.in_channels, p, p)),
        *mlp(f"{te}/timestep_embedder", f"{te}.timestep_embedder"),
        *mlp(f"{te}/pooler", f"{te}.pooler", ("to_kv", "to_q", "to_out")),
        *linear(f"{te}/caption_proj", f"{te}.caption_proj"),
        KeyEntry("pos_frequencies", "pos_frequencies"),
    ]
    for i in range(cfg.num_layers):
        last = i == cfg.num_layers - 1
        f, t = f"transformer_blocks_{i}", f"transformer_blocks.{i}"
        entries += linear(f"{f}/norm1/linear", f"{t}.norm1.linear")
        ctx_linear = "linear_1" if last else "linear"
        entries += linear(f"{f}/norm1_context/{ctx_linear}", f"{t}.norm1_context.{ctx_linear}")
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            entries += linear(f"{f}/attn1/{proj}", f"{t}.attn1.{proj}", bias=False)
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            entries += norm(f"{f}/attn1/{n}", f"{t}.attn1.{n}", bias=False)
        entries += linear(f"{f}/attn1/to_out_0", f"{t}.attn1.to_out.0")
        for ff in ("ff",) if last else ("ff", "ff_context"):
            entries += feed_forward(f"{f}/{ff}", f"{t}.{ff}", bias=False)
        if not last:
            entries += linear(f"{f}/attn1/to_add_out", f"{t}.attn1.to_add_out")
    return entries + ada_output_keys()


_BLOCK = r"transformer_blocks_\d+"
# Every projection of the joint attention is `text_fusion` (text and video meet there); the
# text-side ones are the `add_*` projections and `to_add_out`, which map between the text and the
# video widths.
ROLE_RULES = (
    (r"patch_embed/proj|time_embed/(timestep_embedder|pooler)/.*|time_embed/caption_proj", ("embedder",)),
    (rf"{_BLOCK}/norm1(_context)?/linear(_1)?", ("modulation",)),
    *joint_block_rules(_BLOCK, "attn1"),
    *ADA_OUTPUT_RULES,
)


def dummy_inputs(cfg: MochiConfig) -> dict[str, jax.Array]:
    """Smallest valid inputs: one latent patch, one text token."""
    p = cfg.patch_size
    return {
        "hidden_states": jnp.zeros((1, cfg.in_channels, 1, p, p), F32),
        "encoder_hidden_states": jnp.zeros((1, 1, cfg.text_embed_dim), F32),
        "timestep": jnp.zeros((1,), F32),
    }


PORT = Port(MochiConfig, MochiTransformer3D, key_map, dummy_inputs, ROLE_RULES)
init_params = PORT.init_params  # random float32 params for a config
layer_roles = PORT.layer_roles  # role labels of every Dense kernel of a param tree


def linear_quadratic_sigmas(
    num_steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> np.ndarray:
    """The Mochi pipeline's `linear_quadratic_schedule` (pre-inversion sigmas, one per step): linear
    to `threshold_noise` over the first half, then quadratic. Sample with
    `sample_flow_euler(..., schedule=flow_match_schedule(sigmas=..., invert_sigmas=True))`."""
    if linear_steps is None:
        linear_steps = num_steps // 2
    if not 0 < linear_steps < num_steps:
        raise ValueError(f"linear_quadratic_sigmas: need 0 < linear_steps={linear_steps} < num_steps={num_steps}")
    lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    diff = linear_steps - threshold_noise * num_steps
    quad_steps = num_steps - linear_steps
    quad_coef = diff / (linear_steps * quad_steps**2)
    lin_coef = threshold_noise / linear_steps - 2 * diff / (quad_steps**2)
    const = quad_coef * (linear_steps**2)
    quad = [quad_coef * (i**2) + lin_coef * i + const for i in range(linear_steps, num_steps)]
    return np.asarray([1.0 - x for x in lin + quad])


# Published config (genmo/mochi-1-preview transformer/config.json = the class defaults).
MOCHI_1_PREVIEW = MochiConfig()
