"""LTX-2 (diffusers `LTX2VideoTransformer3DModel`) in Flax linen: the joint audio+video DiT.

Each block runs a video stream and an audio stream side by side, each with LTX-style
modulated self-attention (RoPE over fractional pixel-space / seconds coordinates),
cross-attention to its text embedding and a GELU FFN, and links them with audio->video and
video->audio cross-attention (modulated by their own adaLN-single tables, with temporal RoPE
on both sides). Covers the config options of diffusers 0.42.1: interleaved or split RoPE, gated
attention, LTX-2.3's prompt (cross-attention) modulation with or without its own adaLN-single,
bias-free FFNs, key-frame position embedding, and the call options spatio-temporal guidance
(`perturbed_attn` configs), modality isolation and cross-modality timesteps.

Not ported: `video_self_attention_mask` (IC-LoRA's soft self-attention mask: the shared
`attention` takes boolean masks) and `attention_kwargs`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jquant.models.blocks import AdaLayerNormSingle, Attention, FeedForward, PortModule, RMSNorm, key_mask
from jquant.models.embeddings import EmbedMLP
from jquant.models.ltx_video import (
    ada_values,
    fractional_rope,
    modulated_output,
    rope_frequencies,
    token_timesteps,
)
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
class LTX2Config(DiffusersConfig):
    """Keys of diffusers' LTX2VideoTransformer3DModel config.json (defaults: the class defaults, LTX-2 19B)."""

    CLASS_NAME = "LTX2VideoTransformer3DModel"

    in_channels: int = 128
    out_channels: int | None = 128
    patch_size: int = 1
    patch_size_t: int = 1
    num_attention_heads: int = 32
    attention_head_dim: int = 128
    cross_attention_dim: int = 4096
    vae_scale_factors: tuple[int, int, int] = (8, 32, 32)
    pos_embed_max_pos: int = 20
    base_height: int = 2048
    base_width: int = 2048
    gated_attn: bool = False
    cross_attn_mod: bool = False
    audio_in_channels: int = 128
    audio_out_channels: int | None = 128
    audio_patch_size: int = 1
    audio_patch_size_t: int = 1
    audio_num_attention_heads: int = 32
    audio_attention_head_dim: int = 64
    audio_cross_attention_dim: int = 2048
    audio_scale_factor: int = 4
    audio_pos_embed_max_pos: int = 20
    audio_sampling_rate: int = 16000
    audio_hop_length: int = 160
    audio_gated_attn: bool = False
    audio_cross_attn_mod: bool = False
    num_layers: int = 48
    activation_fn: str = "gelu-approximate"
    qk_norm: str = "rms_norm_across_heads"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    caption_channels: int = 3840
    attention_bias: bool = True
    attention_out_bias: bool = True
    rope_theta: float = 10000.0
    rope_double_precision: bool = True
    causal_offset: int = 1
    timestep_scale_multiplier: int = 1000
    cross_attn_timestep_scale_multiplier: int = 1000
    rope_type: str = "interleaved"
    use_prompt_embeddings: bool = True
    perturbed_attn: bool = False
    ff_bias: bool = True
    audio_ff_bias: bool = True
    use_prompt_adaln_single: bool = True
    use_keyframes_abs_pos_embedding: bool = False

    def __post_init__(self) -> None:
        if self.qk_norm != "rms_norm_across_heads":
            raise ValueError(f"LTX2Config.qk_norm={self.qk_norm!r}: diffusers only supports 'rms_norm_across_heads'")
        if self.rope_type not in ("interleaved", "split"):
            raise ValueError(f"LTX2Config.rope_type={self.rope_type!r} not in ('interleaved', 'split')")
        if len(self.vae_scale_factors) != 3:
            raise ValueError(f"LTX2Config.vae_scale_factors must have 3 entries, got {self.vae_scale_factors}")
        if self.audio_cross_attention_dim != self.audio_inner_dim:
            raise ValueError(
                "LTX2Config: audio_cross_attention_dim must equal the audio attention width (its RoPE width)"
            )
        if self.rope_type == "split" and self.num_attention_heads != self.audio_num_attention_heads:
            raise ValueError("LTX2Config: split RoPE needs num_attention_heads == audio_num_attention_heads")

    @property
    def audio_inner_dim(self) -> int:
        return self.audio_num_attention_heads * self.audio_attention_head_dim

    @property
    def prompt_modulation(self) -> bool:
        return self.cross_attn_mod or self.audio_cross_attn_mod


def video_coords_grid(cfg: LTX2Config, num_frames: int, height: int, width: int, fps: float) -> np.ndarray:
    """diffusers' `prepare_video_coords` for one sample: per-patch [start, end) in pixel space,
    frames in seconds (causal first frame) -> [1, 3, N, 2] float32."""
    patch = (cfg.patch_size_t, cfg.patch_size, cfg.patch_size)
    axes = [np.arange(0, n, p, dtype=np.float32) for n, p in zip((num_frames, height, width), patch)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=0).reshape(3, -1)
    coords = np.stack([grid, grid + np.asarray(patch, np.float32)[:, None]], axis=-1)
    coords = coords * np.asarray(cfg.vae_scale_factors, np.float32)[:, None, None]
    frames = np.maximum(coords[0] + np.float32(cfg.causal_offset) - np.float32(cfg.vae_scale_factors[0]), 0)
    coords[0] = frames / np.float32(fps)
    return coords[None].astype(np.float32)


def audio_coords_grid(cfg: LTX2Config, num_frames: int) -> np.ndarray:
    """diffusers' `prepare_audio_coords`: per-latent [start, end) in seconds -> [1, 1, N, 2] float32."""
    asf, pt = np.float32(cfg.audio_scale_factor), cfg.audio_patch_size_t
    grid = np.arange(0, num_frames, pt, dtype=np.float32)

    def seconds(mel: np.ndarray) -> np.ndarray:
        mel = np.maximum(mel + np.float32(cfg.causal_offset) - asf, 0)
        return mel * np.float32(cfg.audio_hop_length) / np.float32(cfg.audio_sampling_rate)

    return np.stack([seconds(grid * asf), seconds((grid + np.float32(pt)) * asf)], axis=-1)[None, None].astype(
        np.float32
    )


def rope_from_coords(cfg: LTX2Config, coords: jax.Array, dim: int, max_positions: Sequence[float], heads: int) -> Rope:
    """LTX-2's RoPE for coordinates [B, n_axes, N, 2] (patch bounds, centre used) normalised by
    `max_positions`: per-head tables [B, N, heads, dim / heads]."""
    centre = (coords[..., 0].astype(F32) + coords[..., 1].astype(F32)) / 2.0
    grid = jnp.stack([centre[:, i] / np.float32(max_positions[i]) for i in range(coords.shape[1])], axis=-1)
    freqs = rope_frequencies(dim // (2 * coords.shape[1]), cfg.rope_theta, cfg.rope_double_precision)
    return fractional_rope(grid, dim, freqs, heads, interleaved=cfg.rope_type == "interleaved")


class LTX2Block(PortModule):
    """One audio+video block (see the module docstring)."""

    config: LTX2Config
    perturbed: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, a: jax.Array, inputs: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        dim, adim = cfg.inner_dim, cfg.audio_inner_dim
        rms = dict(eps=cfg.norm_eps, affine=cfg.norm_elementwise_affine)
        base = dict(
            qk_norm="rms_norm_across_heads",
            use_bias=cfg.attention_bias,
            out_bias=cfg.attention_out_bias,
            interleaved_rope=cfg.rope_type == "interleaved",
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )
        video_attn = dict(base, heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim, gated=cfg.gated_attn)
        audio_attn = dict(
            base, heads=cfg.audio_num_attention_heads, head_dim=cfg.audio_attention_head_dim, gated=cfg.audio_gated_attn
        )
        a2v_attn = dict(audio_attn, gated=cfg.gated_attn)
        perturb = inputs["perturb"] if self.perturbed else None

        def table(name: str, rows: int, width: int, scaled: bool = True) -> jax.Array:
            init = nn.initializers.normal(width**-0.5 if scaled else 1.0)
            return self.param(name, init, (rows, width))

        v_rows = 9 if cfg.cross_attn_mod else 6
        a_rows = 9 if cfg.audio_cross_attn_mod else 6
        vmod = ada_values(table("scale_shift_table", v_rows, dim), inputs["temb"])
        amod = ada_values(table("audio_scale_shift_table", a_rows, adim), inputs["temb_audio"])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = vmod[:6]
        a_shift_msa, a_scale_msa, a_gate_msa, a_shift_mlp, a_scale_mlp, a_gate_mlp = amod[:6]

        h = RMSNorm(**rms, name="norm1")(x) * (1 + scale_msa) + shift_msa
        x = x + Attention(**video_attn, name="attn1")(h, rope=inputs["video_rope"], perturb=perturb) * gate_msa
        h = RMSNorm(**rms, name="audio_norm1")(a) * (1 + a_scale_msa) + a_shift_msa
        a = a + Attention(**audio_attn, name="audio_attn1")(h, rope=inputs["audio_rope"], perturb=perturb) * a_gate_msa

        context, a_context = inputs["context"], inputs["audio_context"]
        if cfg.prompt_modulation:
            prompt = table("prompt_scale_shift_table", 2, dim, scaled=False)
            a_prompt = table("audio_prompt_scale_shift_table", 2, adim, scaled=False)
            if inputs["temb_prompt"] is not None:
                shift_kv, scale_kv = ada_values(prompt, inputs["temb_prompt"])
                a_shift_kv, a_scale_kv = ada_values(a_prompt, inputs["temb_prompt_audio"])
            else:
                shift_kv, scale_kv = prompt[0].astype(x.dtype), prompt[1].astype(x.dtype)
                a_shift_kv, a_scale_kv = a_prompt[0].astype(a.dtype), a_prompt[1].astype(a.dtype)
            context = context * (1 + scale_kv) + shift_kv
            a_context = a_context * (1 + a_scale_kv) + a_shift_kv

        h = RMSNorm(**rms, name="norm2")(x)
        if cfg.cross_attn_mod:
            h = h * (1 + vmod[7]) + vmod[6]
        out = Attention(**video_attn, name="attn2")(h, context, mask=inputs["mask"])
        x = x + (out * vmod[8] if cfg.cross_attn_mod else out)
        h = RMSNorm(**rms, name="audio_norm2")(a)
        if cfg.audio_cross_attn_mod:
            h = h * (1 + amod[7]) + amod[6]
        out = Attention(**audio_attn, name="audio_attn2")(h, a_context, mask=inputs["audio_mask"])
        a = a + (out * amod[8] if cfg.audio_cross_attn_mod else out)

        v_ca = table("video_a2v_cross_attn_scale_shift_table", 5, dim, scaled=False)
        a_ca = table("audio_a2v_cross_attn_scale_shift_table", 5, adim, scaled=False)
        if not inputs["isolate_modalities"]:
            nx = RMSNorm(**rms, name="audio_to_video_norm")(x)
            na = RMSNorm(**rms, name="video_to_audio_norm")(a)
            v_a2v_scale, v_a2v_shift, v_v2a_scale, v_v2a_shift = ada_values(v_ca[:4], inputs["temb_ca"])
            (a2v_gate,) = ada_values(v_ca[4:], inputs["temb_ca_gate"])
            a_a2v_scale, a_a2v_shift, a_v2a_scale, a_v2a_shift = ada_values(a_ca[:4], inputs["temb_ca_audio"])
            (v2a_gate,) = ada_values(a_ca[4:], inputs["temb_ca_audio_gate"])

            def cross(
                name: str, attn: dict[str, Any], q: jax.Array, kv: jax.Array, q_rope: str, kv_rope: str
            ) -> jax.Array:
                """Cross-modal attention: queries from one stream, keys/values from the other."""
                return Attention(**attn, name=name)(q, kv, rope=inputs[q_rope], key_rope=inputs[kv_rope])

            v_q, a_kv = nx * (1 + v_a2v_scale) + v_a2v_shift, na * (1 + a_a2v_scale) + a_a2v_shift
            a_q, v_kv = na * (1 + a_v2a_scale) + a_v2a_shift, nx * (1 + v_v2a_scale) + v_v2a_shift
            x_new = x + a2v_gate * cross("audio_to_video_attn", a2v_attn, v_q, a_kv, "ca_video_rope", "ca_audio_rope")
            a = a + v2a_gate * cross("video_to_audio_attn", audio_attn, a_q, v_kv, "ca_audio_rope", "ca_video_rope")
            x = x_new

        h = RMSNorm(**rms, name="norm3")(x) * (1 + scale_mlp) + shift_mlp
        x = x + FeedForward(4 * dim, dim, cfg.activation_fn, self.dtype, cfg.ff_bias, name="ff")(h) * gate_mlp
        h = RMSNorm(**rms, name="audio_norm3")(a) * (1 + a_scale_mlp) + a_shift_mlp
        a = (
            a
            + FeedForward(4 * adim, adim, cfg.activation_fn, self.dtype, cfg.audio_ff_bias, name="audio_ff")(h)
            * a_gate_mlp
        )
        return x, a


class LTX2VideoTransformer3D(PortModule):
    """LTX-2 transformer: packed video latents [B, S, in], audio latents [B, S_a, audio_in], text
    embeddings for video and audio [B, L, caption_channels] (the pipeline's connector outputs),
    timestep [B] or [B, S] (0..1000) -> (video velocity [B, S, out], audio velocity [B, S_a, audio_out]).

    RoPE coordinates come from the static grid `num_frames, height, width, fps, audio_num_frames`
    (Python numbers) or from `video_coords` [B, 3, S, 2] / `audio_coords` [B, 1, S_a, 2].
    `sigma`/`audio_sigma` [B] feed LTX-2.3's prompt modulation and `use_cross_timestep`.
    `spatio_temporal_guidance_blocks` (static indices) with `perturbation_mask` [B] (0 = perturb;
    default all) replace self-attention by its values in those blocks, for `perturbed_attn` configs.
    """

    config: LTX2Config

    @nn.compact
    def __call__(
        self,
        hidden_states: jax.Array,
        audio_hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        audio_encoder_hidden_states: jax.Array,
        timestep: jax.Array,
        audio_timestep: jax.Array | None = None,
        sigma: jax.Array | None = None,
        audio_sigma: jax.Array | None = None,
        encoder_attention_mask: jax.Array | None = None,
        audio_encoder_attention_mask: jax.Array | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        fps: float = 24.0,
        audio_num_frames: int | None = None,
        video_coords: jax.Array | None = None,
        audio_coords: jax.Array | None = None,
        isolate_modalities: bool = False,
        spatio_temporal_guidance_blocks: Sequence[int] = (),
        perturbation_mask: jax.Array | None = None,
        use_cross_timestep: bool = False,
        video_keyframes_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        dtype = self.dtype
        batch = hidden_states.shape[0]
        audio_timestep = timestep if audio_timestep is None else audio_timestep
        audio_sigma = sigma if audio_sigma is None else audio_sigma
        needs_sigma = use_cross_timestep or (cfg.prompt_modulation and cfg.use_prompt_adaln_single)
        if needs_sigma and sigma is None:
            raise ValueError(
                "LTX2: sigma is required with use_cross_timestep or prompt modulation (the pipeline passes the timestep)"
            )

        if video_coords is None:
            if None in (num_frames, height, width):
                raise ValueError("LTX2: give num_frames, height and width (or video_coords)")
            video_coords = jnp.asarray(video_coords_grid(cfg, num_frames, height, width, fps))
        if audio_coords is None:
            if audio_num_frames is None:
                raise ValueError("LTX2: give audio_num_frames (or audio_coords)")
            audio_coords = jnp.asarray(audio_coords_grid(cfg, audio_num_frames))
        video_max = (cfg.pos_embed_max_pos, cfg.base_height, cfg.base_width)
        cross_max = (max(cfg.pos_embed_max_pos, cfg.audio_pos_embed_max_pos),)
        a_heads = cfg.audio_num_attention_heads
        inputs: dict[str, Any] = {
            "video_rope": rope_from_coords(cfg, video_coords, cfg.inner_dim, video_max, cfg.num_attention_heads),
            "audio_rope": rope_from_coords(
                cfg, audio_coords, cfg.audio_inner_dim, (cfg.audio_pos_embed_max_pos,), a_heads
            ),
            "ca_video_rope": rope_from_coords(
                cfg, video_coords[:, :1], cfg.audio_cross_attention_dim, cross_max, a_heads
            ),
            "ca_audio_rope": rope_from_coords(
                cfg, audio_coords[:, :1], cfg.audio_cross_attention_dim, cross_max, a_heads
            ),
            "mask": key_mask(encoder_attention_mask),
            "audio_mask": key_mask(audio_encoder_attention_mask),
            "isolate_modalities": isolate_modalities,
        }

        x = nn.Dense(cfg.inner_dim, dtype=dtype, name="proj_in")(hidden_states.astype(dtype))
        a = nn.Dense(cfg.audio_inner_dim, dtype=dtype, name="audio_proj_in")(audio_hidden_states.astype(dtype))
        if cfg.use_keyframes_abs_pos_embedding:
            kf = self.param("keyframes_abs_pos_embedding", nn.initializers.zeros, (1, cfg.inner_dim))
            if video_keyframes_mask is not None:
                x = x + (video_keyframes_mask > 0).astype(x.dtype) * kf.astype(x.dtype)

        def adaln(name: str, dim: int, params: int, t: jax.Array) -> tuple[jax.Array, jax.Array]:
            mod, emb = AdaLayerNormSingle(dim, params, dtype, name=name)(token_timesteps(t, batch))
            return mod.reshape(batch, -1, mod.shape[-1]), emb.reshape(batch, -1, dim)

        dim, adim = cfg.inner_dim, cfg.audio_inner_dim
        inputs["temb"], embedded = adaln("time_embed", dim, 9 if cfg.cross_attn_mod else 6, timestep)
        inputs["temb_audio"], a_embedded = adaln(
            "audio_time_embed", adim, 9 if cfg.audio_cross_attn_mod else 6, audio_timestep
        )
        inputs["temb_prompt"] = inputs["temb_prompt_audio"] = None
        if cfg.prompt_modulation and cfg.use_prompt_adaln_single:
            inputs["temb_prompt"] = adaln("prompt_adaln", dim, 2, sigma)[0]
            inputs["temb_prompt_audio"] = adaln("audio_prompt_adaln", adim, 2, audio_sigma)[0]
        gate_factor = cfg.cross_attn_timestep_scale_multiplier / cfg.timestep_scale_multiplier
        v_ca_t = audio_sigma if use_cross_timestep else timestep
        a_ca_t = sigma if use_cross_timestep else audio_timestep
        inputs["temb_ca"] = adaln("av_cross_attn_video_scale_shift", dim, 4, v_ca_t)[0]
        inputs["temb_ca_gate"] = adaln("av_cross_attn_video_a2v_gate", dim, 1, v_ca_t * gate_factor)[0]
        inputs["temb_ca_audio"] = adaln("av_cross_attn_audio_scale_shift", adim, 4, a_ca_t)[0]
        inputs["temb_ca_audio_gate"] = adaln("av_cross_attn_audio_v2a_gate", adim, 1, a_ca_t * gate_factor)[0]

        context, a_context = encoder_hidden_states.astype(dtype), audio_encoder_hidden_states.astype(dtype)
        if cfg.use_prompt_embeddings:
            context = EmbedMLP(dim, "gelu_tanh", dtype, name="caption_projection")(context)
            a_context = EmbedMLP(adim, "gelu_tanh", dtype, name="audio_caption_projection")(a_context)
        inputs["context"], inputs["audio_context"] = context, a_context

        stg = set(spatio_temporal_guidance_blocks)
        if stg:
            pm = jnp.zeros((batch,), F32) if perturbation_mask is None else perturbation_mask.astype(F32)
            inputs["perturb"] = pm.reshape(batch, 1, 1, 1)
        for i in range(cfg.num_layers):
            perturbed = cfg.perturbed_attn and i in stg
            block = LTX2Block(cfg, dtype, self.attention_impl, perturbed=perturbed, name=f"transformer_blocks_{i}")
            x, a = block(x, a, inputs)

        table = self.param("scale_shift_table", nn.initializers.normal(dim**-0.5), (2, dim))
        a_table = self.param("audio_scale_shift_table", nn.initializers.normal(adim**-0.5), (2, adim))
        video = nn.Dense(cfg.out_dim, dtype=dtype, name="proj_out")(modulated_output(x, table, embedded))
        audio_out = cfg.audio_out_channels or cfg.audio_in_channels
        audio = nn.Dense(audio_out, dtype=dtype, name="audio_proj_out")(modulated_output(a, a_table, a_embedded))
        return video, audio


def key_map(cfg: LTX2Config) -> list[KeyEntry]:
    """Explicit diffusers <-> Flax key map for an LTX-2 config."""
    entries = linear("proj_in", "proj_in") + linear("audio_proj_in", "audio_proj_in")
    if cfg.use_keyframes_abs_pos_embedding:
        entries.append(KeyEntry("keyframes_abs_pos_embedding", "keyframes_abs_pos_embedding"))
    if cfg.use_prompt_embeddings:
        entries += mlp("caption_projection", "caption_projection") + mlp(
            "audio_caption_projection", "audio_caption_projection"
        )
    adalns = ["time_embed", "audio_time_embed", "av_cross_attn_video_scale_shift", "av_cross_attn_audio_scale_shift"]
    adalns += ["av_cross_attn_video_a2v_gate", "av_cross_attn_audio_v2a_gate"]
    if cfg.prompt_modulation and cfg.use_prompt_adaln_single:
        adalns += ["prompt_adaln", "audio_prompt_adaln"]
    for n in adalns:
        entries += adaln_single(n, n)
    for n in ("scale_shift_table", "audio_scale_shift_table"):
        entries.append(KeyEntry(n, n))
    attn = dict(bias=cfg.attention_bias, out_bias=cfg.attention_out_bias)
    gates = {
        "attn1": cfg.gated_attn,
        "attn2": cfg.gated_attn,
        "audio_to_video_attn": cfg.gated_attn,
        "audio_attn1": cfg.audio_gated_attn,
        "audio_attn2": cfg.audio_gated_attn,
        "video_to_audio_attn": cfg.audio_gated_attn,
    }
    tables = ["scale_shift_table", "audio_scale_shift_table", "video_a2v_cross_attn_scale_shift_table"]
    tables += ["audio_a2v_cross_attn_scale_shift_table"]
    if cfg.prompt_modulation:
        tables += ["prompt_scale_shift_table", "audio_prompt_scale_shift_table"]
    norms = [
        "norm1",
        "audio_norm1",
        "norm2",
        "audio_norm2",
        "audio_to_video_norm",
        "video_to_audio_norm",
        "norm3",
        "audio_norm3",
    ]
    for i in range(cfg.num_layers):
        f, t = f"transformer_blocks_{i}", f"transformer_blocks.{i}"
        for a, gated in gates.items():
            entries += attention_keys(f"{f}/{a}", f"{t}.{a}", gated=gated, **attn)
        for ff, bias in (("ff", cfg.ff_bias), ("audio_ff", cfg.audio_ff_bias)):
            entries += feed_forward(f"{f}/{ff}", f"{t}.{ff}", bias)
        entries += [KeyEntry(f"{f}/{n}", f"{t}.{n}") for n in tables]
        if cfg.norm_elementwise_affine:
            entries += [e for n in norms for e in norm(f"{f}/{n}", f"{t}.{n}", bias=False)]
    return entries + linear("proj_out", "proj_out") + linear("audio_proj_out", "audio_proj_out")


_BLOCK = r"transformer_blocks_\d+"
_CROSS_MODAL = rf"{_BLOCK}/(audio_to_video|video_to_audio)_attn"
# The audio<->video attentions are `cross_attn` + `temporal` (they mix the modalities along time,
# with temporal RoPE); the per-head output gates (`to_gate_logits`) are `modulation`.
ROLE_RULES = (
    (r"(audio_)?proj_in|(audio_)?caption_projection/.*|[a-z_0-9]+/emb/timestep_embedder/.*", ("embedder",)),
    (
        r"(audio_)?time_embed/linear|(audio_)?prompt_adaln/linear|av_cross_attn_[a-z0-9_]+/linear",
        ("embedder", "modulation"),
    ),
    *cross_attn_block_rules(_BLOCK, "(audio_)?"),
    (rf"{_CROSS_MODAL}/.*", ("cross_attn", "temporal")),
    (rf"{_CROSS_MODAL}/to_[qkv]", ("attn.qkv",)),
    (rf"{_CROSS_MODAL}/to_[kv]", ("cross_attn.kv",)),
    (rf"{_CROSS_MODAL}/to_out_0", ("attn.out",)),
    (rf"{_BLOCK}/[a-z_0-9]+/to_gate_logits", ("modulation",)),
    (r"(audio_)?proj_out", ("final",)),
)


def dummy_inputs(cfg: LTX2Config) -> dict[str, Any]:
    """Smallest valid inputs: one video and one audio token, one text token each."""
    inputs: dict[str, Any] = {
        "hidden_states": jnp.zeros((1, 1, cfg.in_channels), F32),
        "audio_hidden_states": jnp.zeros((1, 1, cfg.audio_in_channels), F32),
        "encoder_hidden_states": jnp.zeros(
            (1, 1, cfg.caption_channels if cfg.use_prompt_embeddings else cfg.cross_attention_dim), F32
        ),
        "audio_encoder_hidden_states": jnp.zeros(
            (1, 1, cfg.caption_channels if cfg.use_prompt_embeddings else cfg.audio_cross_attention_dim), F32
        ),
        "timestep": jnp.zeros((1,), F32),
        "sigma": jnp.zeros((1,), F32),
        "num_frames": 1,
        "height": 1,
        "width": 1,
        "audio_num_frames": 1,
    }
    return inputs


PORT = Port(LTX2Config, LTX2VideoTransformer3D, key_map, dummy_inputs, ROLE_RULES)
init_params = PORT.init_params  # random float32 params for a config
layer_roles = PORT.layer_roles  # role labels of every Dense kernel of a param tree


def pack_av(video: jax.Array, audio: jax.Array) -> jax.Array:
    """Video [B, S, C] and audio [B, S_a, C_a] latents as one [B, S*C + S_a*C_a] array, so a
    single-array sampler (`sample_flow_euler`) steps both with the same sigmas, as the LTX-2
    pipeline does with its copied scheduler."""
    return jnp.concatenate([video.reshape(video.shape[0], -1), audio.reshape(audio.shape[0], -1)], axis=1)


def unpack_av(x: jax.Array, video_shape: Sequence[int], audio_shape: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Inverse of `pack_av`; shapes without the batch axis."""
    n = int(np.prod(video_shape))
    return x[:, :n].reshape(x.shape[0], *video_shape), x[:, n:].reshape(x.shape[0], *audio_shape)


# Published config: LTX-2 (Lightricks/LTX-2, 19B audio-video) = the class defaults of diffusers 0.42.1.
LTX2_19B = LTX2Config()
