"""Wan2.1's causal 3-D VAE (diffusers `AutoencoderKLWan`) in Flax linen.

The decoder runs one latent frame at a time and the encoder one chunk of 4 frames (the first
frame alone), exactly as diffusers does: every causal conv keeps the last frames it saw in the
``"cache"`` variable collection, and `WanVAE.decode` / `WanVAE.encode` carry that pytree through
a `lax.scan` over chunks, so the activations held at once are those of one chunk whatever the
clip length. Spatial tiling (`Tiling`) bounds them for large frames (720p), blending
overlapping tiles as diffusers' `tiled_decode` / `tiled_encode` do.

Public layout is diffusers': latents [B, z_dim, T, h, w], videos [B, 3, 1 + 4(T-1), 8h, 8w]
in [-1, 1]. Wan2.2's residual VAE (`is_residual`, `patch_size`) is not ported.

    vae = load_wan_vae("Wan2.1-T2V-1.3B-Diffusers", dtype=jnp.bfloat16)
    video = vae.decode(vae.denormalize(latents))
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jquant.models.port import DiffusersConfig, KeyEntry
from jquant.models.vae_blocks import (
    F32,
    DiagonalGaussian,
    TilePlan,
    conv_keys,
    pad_spatial,
    random_params,
    read_params,
    read_vae_config,
    single_head_attention,
    tiled,
    upsample_nearest2x,
    vector_key,
)

CACHE = "cache"  # variable collection of the causal convs' past frames

_WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508)
_WAN21_MEAN += (0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743)
_WAN21_STD += (3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig(DiffusersConfig):
    """Keys of diffusers' AutoencoderKLWan config.json (defaults: Wan2.1's VAE)."""

    CLASS_NAME = "AutoencoderKLWan"

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = _WAN21_MEAN
    latents_std: tuple[float, ...] = _WAN21_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8

    def __post_init__(self) -> None:
        if self.is_residual or self.patch_size is not None:
            raise ValueError("WanVAEConfig: the Wan2.2 VAE (is_residual / patch_size) is not supported by this port")
        if self.attn_scales:
            raise ValueError(
                "WanVAEConfig.attn_scales: attention in the encoder's down blocks is not ported (diffusers' own encoder fails on it)"
            )
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"WanVAEConfig: temperal_downsample has {len(self.temperal_downsample)} entries, "
                f"dim_mult {len(self.dim_mult)} (needs one fewer)"
            )
        for name, derived in (
            ("scale_factor_spatial", self.spatial_ratio),
            ("scale_factor_temporal", self.temporal_ratio),
        ):
            if getattr(self, name) not in (None, derived):
                raise ValueError(f"WanVAEConfig.{name} is {getattr(self, name)}, the layers give {derived}")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"WanVAEConfig.{name} has {len(getattr(self, name))} entries, z_dim is {self.z_dim}")

    @property
    def spatial_ratio(self) -> int:
        """Pixels per latent along H and W (2 per spatial downsample)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_ratio(self) -> int:
        """Frames per latent frame after the first (2 per temporal downsample)."""
        return 2 ** sum(self.temperal_downsample)


def _encoder_plan(cfg: WanVAEConfig) -> tuple[list[int], list[tuple[str, int, int]]]:
    """(dims, down layers) of the encoder: ("res", in, out) or (resample mode, c, c)."""
    dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
    plan: list[tuple[str, int, int]] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(cfg.num_res_blocks):
            plan.append(("res", a, b))
            a = b
        if i != len(cfg.dim_mult) - 1:
            plan.append(("downsample3d" if cfg.temperal_downsample[i] else "downsample2d", b, b))
    return dims, plan


def _decoder_plan(cfg: WanVAEConfig) -> tuple[list[int], list[tuple[int, int, str | None]]]:
    """(dims, up blocks as (in, out, upsample mode or None)) of the decoder."""
    base = cfg.decoder_base_dim or cfg.base_dim
    dims = [base * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    up = cfg.temperal_downsample[::-1]
    blocks = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        mode = None
        if i != len(cfg.dim_mult) - 1:
            mode = "upsample3d" if up[i] else "upsample2d"
        blocks.append((a // 2 if i > 0 else a, b, mode))
    return dims, blocks


class Conv3d(nn.Module):
    """torch Conv3d on [B, T, H, W, C]. With `causal`, the time axis is left-padded by the
    kernel's extent - 1 frames taken from the `"cache"` collection (zeros at the start of a clip)
    and the cache keeps the last such frames of its input; H and W are zero-padded by k // 2."""

    features: int
    kernel: tuple[int, int, int] = (3, 3, 3)
    stride: tuple[int, int, int] = (1, 1, 1)
    causal: bool = True
    dtype: Any = F32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kt, kh, _ = self.kernel
        if self.causal:
            if kt > 1:
                cache = self.variable(CACHE, "frames", jnp.zeros, (x.shape[0], kt - 1, *x.shape[2:]), x.dtype)
                x = jnp.concatenate([cache.value.astype(x.dtype), x], axis=1)
                cache.value = x[:, -(kt - 1) :]
            x = pad_spatial(x, kh // 2, kh // 2)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel, x.shape[-1], self.features), F32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), F32)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            self.stride,
            "VALID",
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )
        return y + bias.astype(self.dtype)


class WanRMSNorm(nn.Module):
    """diffusers' WanRMS_norm over channels: x / max(||x||, 1e-12) * sqrt(C) * gamma."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        xf = x.astype(F32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        y = (xf / jnp.maximum(norm, 1e-12)).astype(x.dtype)
        return y * (c**0.5) * self.param("gamma", nn.initializers.ones, (c,), F32).astype(x.dtype)


class WanResidualBlock(nn.Module):
    out_dim: int
    dtype: Any = F32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        if x.shape[-1] != self.out_dim:
            h = Conv3d(self.out_dim, (1, 1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        x = nn.silu(WanRMSNorm(name="norm1")(x))
        x = Conv3d(self.out_dim, dtype=self.dtype, name="conv1")(x)
        x = nn.silu(WanRMSNorm(name="norm2")(x))
        return Conv3d(self.out_dim, dtype=self.dtype, name="conv2")(x) + h


class WanAttentionBlock(nn.Module):
    """Single-head self-attention within each frame (the mid block's)."""

    dtype: Any = F32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        y = WanRMSNorm(name="norm")(x).reshape(b * t, h, w, c)
        qkv = nn.Conv(3 * c, (1, 1), dtype=self.dtype, name="to_qkv")(y).reshape(b * t, h * w, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        o = single_head_attention(q, k, v).reshape(b * t, h, w, c)
        return x + nn.Conv(c, (1, 1), dtype=self.dtype, name="proj")(o).reshape(b, t, h, w, c)


class WanResample(nn.Module):
    """Spatial 2x up/down sampling per frame; the 3d modes also double / halve time.

    upsample3d: `time_conv` makes two frames of each input frame, except the clip's first frame
    (`first`), which passes through once. downsample3d: a stride-2 conv over time, the first
    frame passing through and the last frame of each chunk kept for the next."""

    mode: str
    dtype: Any = F32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        b, t, h, w, c = x.shape
        if self.mode == "upsample3d":
            cache = self.variable(CACHE, "frames", jnp.zeros, (b, 2, h, w, c), x.dtype)
            head, rest = (x[:, :1], x[:, 1:]) if first else (x[:, :0], x)
            if rest.shape[1]:
                xc = jnp.concatenate([cache.value.astype(x.dtype), rest], axis=1)
                cache.value = xc[:, -2:]
                y = Conv3d(2 * c, (3, 1, 1), causal=False, dtype=self.dtype, name="time_conv")(xc)
                tr = rest.shape[1]
                y = y.reshape(b, tr, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * tr, h, w, c)
                x = jnp.concatenate([head, y], axis=1)
            else:
                x = head
            t = x.shape[1]
        flat = x.reshape(b * t, h, w, c)
        if self.mode.startswith("upsample"):
            flat = nn.Conv(c // 2, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="resample_1")(
                upsample_nearest2x(flat)
            )
        else:
            flat = jnp.pad(flat, ((0, 0), (0, 1), (0, 1), (0, 0)))
            flat = nn.Conv(c, (3, 3), strides=(2, 2), padding="VALID", dtype=self.dtype, name="resample_1")(flat)
        x = flat.reshape(b, t, *flat.shape[1:])
        if self.mode == "downsample3d":
            cache = self.variable(CACHE, "frames", jnp.zeros, (b, 1, *x.shape[2:]), x.dtype)
            head, src = (x[:, :1], x) if first else (x[:, :0], jnp.concatenate([cache.value.astype(x.dtype), x], 1))
            cache.value = x[:, -1:]
            if src.shape[1] >= 3:
                y = Conv3d(c, (3, 1, 1), (2, 1, 1), causal=False, dtype=self.dtype, name="time_conv")(src)
                head = jnp.concatenate([head, y], axis=1)
            x = head
        return x


class WanMidBlock(nn.Module):
    dtype: Any = F32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = WanResidualBlock(c, self.dtype, name="resnets_0")(x)
        x = WanAttentionBlock(self.dtype, name="attentions_0")(x)
        return WanResidualBlock(c, self.dtype, name="resnets_1")(x)


class WanEncoder3d(nn.Module):
    config: WanVAEConfig
    dtype: Any = F32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        dims, plan = _encoder_plan(self.config)
        x = Conv3d(dims[0], dtype=self.dtype, name="conv_in")(x)
        for n, (kind, _, out) in enumerate(plan):
            name = f"down_blocks_{n}"
            if kind == "res":
                x = WanResidualBlock(out, self.dtype, name=name)(x)
            else:
                x = WanResample(kind, self.dtype, name=name)(x, first)
        x = WanMidBlock(self.dtype, name="mid_block")(x)
        x = nn.silu(WanRMSNorm(name="norm_out")(x))
        return Conv3d(2 * self.config.z_dim, dtype=self.dtype, name="conv_out")(x)


class WanUpBlock(nn.Module):
    out_dim: int
    num_res_blocks: int
    mode: str | None
    dtype: Any = F32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        for j in range(self.num_res_blocks + 1):
            x = WanResidualBlock(self.out_dim, self.dtype, name=f"resnets_{j}")(x)
        if self.mode is not None:
            x = WanResample(self.mode, self.dtype, name="upsamplers_0")(x, first)
        return x


class WanDecoder3d(nn.Module):
    config: WanVAEConfig
    dtype: Any = F32

    @nn.compact
    def __call__(self, x: jax.Array, first: bool) -> jax.Array:
        dims, blocks = _decoder_plan(self.config)
        x = Conv3d(dims[0], dtype=self.dtype, name="conv_in")(x)
        x = WanMidBlock(self.dtype, name="mid_block")(x)
        for i, (_, out, mode) in enumerate(blocks):
            x = WanUpBlock(out, self.config.num_res_blocks, mode, self.dtype, name=f"up_blocks_{i}")(x, first)
        x = nn.silu(WanRMSNorm(name="norm_out")(x))
        return Conv3d(self.config.out_channels, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKLWan(nn.Module):
    """The VAE's modules; `encode_chunk` / `decode_chunk` run one chunk (channel-last) and are
    applied with ``mutable=["cache"]``. `first` marks the chunk that starts a clip; a chunk
    holding a whole clip with `first` computes the same as the clip chunk by chunk."""

    config: WanVAEConfig
    dtype: Any = F32

    def setup(self) -> None:
        z = self.config.z_dim
        self.encoder = WanEncoder3d(self.config, self.dtype)
        self.quant_conv = Conv3d(2 * z, (1, 1, 1), dtype=self.dtype)
        self.post_quant_conv = Conv3d(z, (1, 1, 1), dtype=self.dtype)
        self.decoder = WanDecoder3d(self.config, self.dtype)

    def encode_chunk(self, x: jax.Array, first: bool) -> jax.Array:
        return self.quant_conv(self.encoder(x.astype(self.dtype), first))

    def decode_chunk(self, z: jax.Array, first: bool) -> jax.Array:
        return self.decoder(self.post_quant_conv(z.astype(self.dtype)), first)

    def __call__(self, x: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encode_chunk(x, True), self.decode_chunk(z, True)


def _block_keys(f: str, t: str, kind: str, a: int, b: int) -> list[KeyEntry]:
    """Entries of one residual block, attention block or resample layer."""
    if kind == "res":
        out = [vector_key(f"{f}/norm1/gamma", f"{t}.norm1.gamma", (a, 1, 1, 1))]
        out += conv_keys(f"{f}/conv1", f"{t}.conv1")
        out += [vector_key(f"{f}/norm2/gamma", f"{t}.norm2.gamma", (b, 1, 1, 1))]
        out += conv_keys(f"{f}/conv2", f"{t}.conv2")
        return out + (conv_keys(f"{f}/conv_shortcut", f"{t}.conv_shortcut") if a != b else [])
    if kind == "attn":
        out = [vector_key(f"{f}/norm/gamma", f"{t}.norm.gamma", (a, 1, 1))]
        return out + conv_keys(f"{f}/to_qkv", f"{t}.to_qkv") + conv_keys(f"{f}/proj", f"{t}.proj")
    out = conv_keys(f"{f}/resample_1", f"{t}.resample.1")
    return out + (conv_keys(f"{f}/time_conv", f"{t}.time_conv") if kind.endswith("3d") else [])


def _mid_keys(f: str, t: str, c: int) -> list[KeyEntry]:
    out = _block_keys(f"{f}/resnets_0", f"{t}.resnets.0", "res", c, c)
    out += _block_keys(f"{f}/attentions_0", f"{t}.attentions.0", "attn", c, c)
    return out + _block_keys(f"{f}/resnets_1", f"{t}.resnets.1", "res", c, c)


def key_map(cfg: WanVAEConfig) -> list[KeyEntry]:
    """Every tensor of an AutoencoderKLWan checkpoint and its Flax param path."""
    dims, plan = _encoder_plan(cfg)
    out = conv_keys("encoder/conv_in", "encoder.conv_in")
    for n, (kind, a, b) in enumerate(plan):
        out += _block_keys(f"encoder/down_blocks_{n}", f"encoder.down_blocks.{n}", kind, a, b)
    out += _mid_keys("encoder/mid_block", "encoder.mid_block", dims[-1])
    out += [vector_key("encoder/norm_out/gamma", "encoder.norm_out.gamma", (dims[-1], 1, 1, 1))]
    out += conv_keys("encoder/conv_out", "encoder.conv_out")
    out += conv_keys("quant_conv", "quant_conv") + conv_keys("post_quant_conv", "post_quant_conv")
    ddims, blocks = _decoder_plan(cfg)
    out += conv_keys("decoder/conv_in", "decoder.conv_in")
    out += _mid_keys("decoder/mid_block", "decoder.mid_block", ddims[0])
    for i, (a, b, mode) in enumerate(blocks):
        f, t = f"decoder/up_blocks_{i}", f"decoder.up_blocks.{i}"
        for j in range(cfg.num_res_blocks + 1):
            out += _block_keys(f"{f}/resnets_{j}", f"{t}.resnets.{j}", "res", a if j == 0 else b, b)
        if mode is not None:
            out += _block_keys(f"{f}/upsamplers_0", f"{t}.upsamplers.0", mode, b, b)
    out += [vector_key("decoder/norm_out/gamma", "decoder.norm_out.gamma", (ddims[-1], 1, 1, 1))]
    return out + conv_keys("decoder/conv_out", "decoder.conv_out")


def _dummy(cfg: WanVAEConfig) -> tuple[jax.Array, jax.Array]:
    """Smallest whole-clip inputs that run every layer (a temporal conv sees >= 3 frames)."""
    s = cfg.spatial_ratio
    x = jnp.zeros((1, 1 + cfg.temporal_ratio, s, s, cfg.in_channels), F32)
    return x, jnp.zeros((1, 2, 1, 1, cfg.z_dim), F32)


def param_shapes(cfg: WanVAEConfig) -> dict[str, Any]:
    """Param tree of ShapeDtypeStructs (no allocation)."""
    model = AutoencoderKLWan(cfg)
    return jax.eval_shape(lambda r: model.init(r, *_dummy(cfg))["params"], jax.random.key(0))


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Spatial tiles in output pixels, as diffusers' `enable_tiling` (its defaults)."""

    min_height: int = 256
    min_width: int = 256
    stride_height: int = 192
    stride_width: int = 192


@functools.lru_cache(maxsize=16)
def _jitted(cfg: WanVAEConfig, dtype: jnp.dtype) -> dict[str, Any]:
    """The jitted passes of one (config, dtype); inputs and outputs channel-last."""
    model = AutoencoderKLWan(cfg, dtype)

    def run(params: Any, cache: Any, x: jax.Array, first: bool, method: str) -> tuple[jax.Array, Any]:
        return model.apply({"params": params, **cache}, x, first, method=method, mutable=[CACHE])

    def chunked(params: Any, x: jax.Array, first_len: int, chunk: int, method: str) -> jax.Array:
        out0, cache = run(params, {}, x[:, :first_len], True, method)
        rest = x[:, first_len:]
        n = rest.shape[1] // chunk
        if n == 0:
            return out0
        xs = rest.reshape(rest.shape[0], n, chunk, *rest.shape[2:]).swapaxes(0, 1)

        def step(c: Any, xi: jax.Array) -> tuple[Any, jax.Array]:
            out, c = run(params, c, xi, False, method)
            return c, out

        _, outs = jax.lax.scan(step, cache, xs)
        outs = outs.swapaxes(0, 1).reshape(outs.shape[1], -1, *outs.shape[3:])
        return jnp.concatenate([out0, outs], axis=1)

    chunk_t = cfg.temporal_ratio
    return {
        "decode": jax.jit(lambda p, z: chunked(p, z, 1, 1, "decode_chunk")),
        "encode": jax.jit(lambda p, x: chunked(p, x, 1, chunk_t, "encode_chunk")),
        "decode_whole": jax.jit(lambda p, z: run(p, {}, z, True, "decode_chunk")[0]),
        "encode_whole": jax.jit(lambda p, x: run(p, {}, x, True, "encode_chunk")[0]),
    }


def _to_last(x: jax.Array) -> jax.Array:
    return jnp.moveaxis(x, 1, -1)


def _to_first(x: jax.Array) -> jax.Array:
    return jnp.moveaxis(x, -1, 1)


@dataclasses.dataclass(frozen=True)
class WanVAE:
    """A loaded AutoencoderKLWan: config, params and compute dtype, with diffusers' encode/decode."""

    config: WanVAEConfig
    params: Any
    dtype: Any = F32

    def _fn(self, name: str) -> Any:
        return _jitted(self.config, jnp.dtype(self.dtype))[name]

    def _check(self, x: jax.Array, channels: int, what: str) -> None:
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(f"WanVAE.{what}: expected [B, {channels}, T, H, W], got shape {tuple(x.shape)}")

    def decode(self, z: jax.Array, tiling: Tiling | None = None) -> jax.Array:
        """Latents [B, z_dim, T, h, w] -> video [B, 3, 1 + 4(T-1), 8h, 8w] clamped to [-1, 1],
        one latent frame at a time; with `tiling`, in overlapping spatial tiles when the latent
        is larger than one tile (diffusers' `tiled_decode`)."""
        self._check(z, self.config.z_dim, "decode")
        zl = _to_last(z)
        r = self.config.spatial_ratio
        fn = functools.partial(self._fn("decode"), self.params)
        if tiling is not None and (zl.shape[3] > tiling.min_width // r or zl.shape[2] > tiling.min_height // r):
            plan = TilePlan(
                tile=(tiling.min_height // r, tiling.min_width // r),
                stride=(tiling.stride_height // r, tiling.stride_width // r),
                blend=(tiling.min_height - tiling.stride_height, tiling.min_width - tiling.stride_width),
                keep=(tiling.stride_height, tiling.stride_width),
                crop=(zl.shape[2] * r, zl.shape[3] * r),
            )
            out = tiled(fn, zl, plan)
        else:
            out = fn(zl)
        return jnp.clip(_to_first(out), -1.0, 1.0)

    def decode_whole(self, z: jax.Array) -> jax.Array:
        """`decode` in one pass over all frames (memory grows with the clip; for checking that
        the chunked decode is exact)."""
        self._check(z, self.config.z_dim, "decode_whole")
        return jnp.clip(_to_first(self._fn("decode_whole")(self.params, _to_last(z))), -1.0, 1.0)

    def _frames(self, x: jax.Array, what: str) -> None:
        self._check(x, self.config.in_channels, what)
        t = self.config.temporal_ratio
        if (x.shape[2] - 1) % t:
            raise ValueError(f"WanVAE.{what}: {x.shape[2]} frames; the encoder needs 1 + {t}k frames")

    def encode(self, x: jax.Array, tiling: Tiling | None = None) -> DiagonalGaussian:
        """Video [B, 3, 1 + 4k, H, W] in [-1, 1] -> latent distribution over [B, z_dim, 1 + k, H/8, W/8],
        the first frame alone then 4 frames at a time (diffusers' `encode`; `tiled_encode` with `tiling`)."""
        self._frames(x, "encode")
        xl = _to_last(x)
        r = self.config.spatial_ratio
        fn = functools.partial(self._fn("encode"), self.params)
        if tiling is not None and (xl.shape[3] > tiling.min_width or xl.shape[2] > tiling.min_height):
            lh, lw = tiling.min_height // r, tiling.min_width // r
            sh, sw = tiling.stride_height // r, tiling.stride_width // r
            plan = TilePlan(
                tile=(tiling.min_height, tiling.min_width),
                stride=(tiling.stride_height, tiling.stride_width),
                blend=(lh - sh, lw - sw),
                keep=(sh, sw),
                crop=(xl.shape[2] // r, xl.shape[3] // r),
            )
            moments = tiled(fn, xl, plan)
        else:
            moments = fn(xl)
        return DiagonalGaussian.from_moments(_to_first(moments))

    def encode_whole(self, x: jax.Array) -> DiagonalGaussian:
        """`encode` in one pass over all frames (for checking the chunked encode)."""
        self._frames(x, "encode_whole")
        return DiagonalGaussian.from_moments(_to_first(self._fn("encode_whole")(self.params, _to_last(x))))

    def _stats(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = jnp.asarray(self.config.latents_mean, z.dtype).reshape(shape)
        return mean, jnp.asarray(self.config.latents_std, z.dtype).reshape(shape)

    def denormalize(self, latents: jax.Array) -> jax.Array:
        """The transformer's latents -> the decoder's (`latents * std + mean`, as WanPipeline)."""
        mean, std = self._stats(latents)
        return latents * std + mean

    def normalize(self, z: jax.Array) -> jax.Array:
        """The encoder's latents -> the transformer's (`(z - mean) / std`)."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def decode_bytes(
        self, latent_frames: int, height: int, width: int, batch: int = 1, whole: bool = False
    ) -> dict[str, int]:
        """XLA's memory analysis of `decode` (or `decode_whole`) of a clip of `latent_frames`
        latent frames at `height` x `width` output pixels: bytes of arguments (weights + latents),
        outputs (the video) and temporaries (the working set: for the chunked decode, one
        latent frame's activations plus the cache, whatever the clip length). Compiles, runs nothing."""
        r = self.config.spatial_ratio
        if height % r or width % r:
            raise ValueError(f"WanVAE: height and width must be multiples of {r}, got {height}x{width}")
        shape = (batch, latent_frames, height // r, width // r, self.config.z_dim)
        z = jax.ShapeDtypeStruct(shape, jnp.dtype(self.dtype))
        mem = self._fn("decode_whole" if whole else "decode").lower(self.params, z).compile().memory_analysis()
        return {
            "arguments": int(mem.argument_size_in_bytes),
            "outputs": int(mem.output_size_in_bytes),
            "temporaries": int(mem.temp_size_in_bytes),
        }


def init_wan_vae(config: WanVAEConfig, seed: int = 0, dtype: Any = F32) -> WanVAE:
    """A WanVAE with random params (`vae_blocks.random_params`), for tests and memory tables."""
    return WanVAE(config, random_params(param_shapes(config), seed, dtype), dtype)


def load_wan_vae(path: str | os.PathLike, dtype: Any = F32) -> WanVAE:
    """Load an AutoencoderKLWan from a VAE folder or a pipeline directory (its `vae/`):
    config.json + single or sharded safetensors; params cast to `dtype`, computed in `dtype`."""
    folder, raw = read_vae_config(path, (WanVAEConfig.CLASS_NAME,))
    try:
        config = WanVAEConfig.from_diffusers(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder / 'config.json'}: {e}") from e
    params = read_params(folder, key_map(config), param_shapes(config), dtype)
    return WanVAE(config, params, dtype)
