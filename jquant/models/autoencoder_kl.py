"""diffusers' image VAE `AutoencoderKL` (Flux, SD3, SDXL) in Flax linen.

Encoder and decoder of `diffusers.models.autoencoders.vae` (DownEncoderBlock2D / UpDecoderBlock2D
resnets, one-head attention in the mid block), with or without `quant_conv` / `post_quant_conv`
(Flux has neither), and diffusers' tiled encode/decode (overlapping tiles of `sample_size`
pixels, 1/4 overlap, blended). Public layout is diffusers': latents [B, C, h, w], images
[B, 3, H, W] in about [-1, 1] (decode does not clamp, as diffusers).

    vae = load_autoencoder_kl("FLUX.1-dev", dtype=jnp.bfloat16)   # pipeline dir or its vae/
    image = vae.decode(vae.denormalize(latents))
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jquant.models.port import DiffusersConfig, KeyEntry, linear, norm
from jquant.models.vae_blocks import (
    F32,
    DiagonalGaussian,
    GroupNorm,
    TilePlan,
    conv_keys,
    random_params,
    read_params,
    read_vae_config,
    single_head_attention,
    tiled,
    upsample_nearest2x,
)


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(DiffusersConfig):
    """Keys of diffusers' AutoencoderKL config.json (defaults: diffusers'; Flux sets 16 latent
    channels, four blocks of (128, 256, 512, 512), scaling 0.3611, shift 0.1159, no quant convs)."""

    CLASS_NAME = "AutoencoderKL"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if set(self.down_block_types) != {"DownEncoderBlock2D"} or len(self.down_block_types) != n:
            raise ValueError(
                f"AutoencoderKLConfig: down_block_types must be {n} x DownEncoderBlock2D, got {self.down_block_types}"
            )
        if set(self.up_block_types) != {"UpDecoderBlock2D"} or len(self.up_block_types) != n:
            raise ValueError(
                f"AutoencoderKLConfig: up_block_types must be {n} x UpDecoderBlock2D, got {self.up_block_types}"
            )
        if self.act_fn != "silu":
            raise ValueError(f"AutoencoderKLConfig: act_fn {self.act_fn!r} is not supported (silu only)")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"AutoencoderKLConfig: block_out_channels {bad} not divisible by norm_num_groups {self.norm_num_groups}"
            )

    @property
    def spatial_ratio(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def tile_size(self) -> int:
        """diffusers' `tile_sample_min_size`: the config's sample_size (its first entry if a list)."""
        return self.sample_size[0] if isinstance(self.sample_size, tuple) else self.sample_size


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D without time embedding: GroupNorm-SiLU-conv twice, 1x1 shortcut."""

    out_dim: int
    groups: int
    dtype: Any = F32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(GroupNorm(self.groups, name="norm1")(x))
        h = nn.Conv(self.out_dim, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv1")(h)
        h = nn.silu(GroupNorm(self.groups, name="norm2")(h))
        h = nn.Conv(self.out_dim, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_dim:
            x = nn.Conv(self.out_dim, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class AttentionBlock(nn.Module):
    """The mid block's `Attention`: GroupNorm, one head over all pixels, residual."""

    groups: int
    dtype: Any = F32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = GroupNorm(self.groups, name="group_norm")(x).reshape(b, h * w, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(y) for n in ("to_q", "to_k", "to_v"))
        o = nn.Dense(c, dtype=self.dtype, name="to_out_0")(single_head_attention(q, k, v))
        return x + o.reshape(b, h, w, c)


class MidBlock2D(nn.Module):
    groups: int
    attention: bool
    dtype: Any = F32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, self.dtype, name="resnets_0")(x)
        if self.attention:
            x = AttentionBlock(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(c, self.groups, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
    config: AutoencoderKLConfig
    dtype: Any = F32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, g, d = self.config, self.config.norm_num_groups, self.dtype
        chans = cfg.block_out_channels
        x = nn.Conv(chans[0], (3, 3), padding=((1, 1), (1, 1)), dtype=d, name="conv_in")(x)
        for i, c in enumerate(chans):
            for j in range(cfg.layers_per_block):
                x = ResnetBlock2D(c, g, d, name=f"down_blocks_{i}_resnets_{j}")(x)
            if i != len(chans) - 1:
                x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
                x = nn.Conv(
                    c, (3, 3), strides=(2, 2), padding="VALID", dtype=d, name=f"down_blocks_{i}_downsamplers_0"
                )(x)
        x = MidBlock2D(g, cfg.mid_block_add_attention, d, name="mid_block")(x)
        x = nn.silu(GroupNorm(g, name="conv_norm_out")(x))
        return nn.Conv(2 * cfg.latent_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=d, name="conv_out")(x)


class Decoder(nn.Module):
    config: AutoencoderKLConfig
    dtype: Any = F32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, g, d = self.config, self.config.norm_num_groups, self.dtype
        chans = cfg.block_out_channels[::-1]
        x = nn.Conv(chans[0], (3, 3), padding=((1, 1), (1, 1)), dtype=d, name="conv_in")(z)
        x = MidBlock2D(g, cfg.mid_block_add_attention, d, name="mid_block")(x)
        for i, c in enumerate(chans):
            for j in range(cfg.layers_per_block + 1):
                x = ResnetBlock2D(c, g, d, name=f"up_blocks_{i}_resnets_{j}")(x)
            if i != len(chans) - 1:
                x = nn.Conv(c, (3, 3), padding=((1, 1), (1, 1)), dtype=d, name=f"up_blocks_{i}_upsamplers_0")(
                    upsample_nearest2x(x)
                )
        x = nn.silu(GroupNorm(g, name="conv_norm_out")(x))
        return nn.Conv(cfg.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=d, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """Encoder (+ quant_conv) and (post_quant_conv +) decoder on channel-last images."""

    config: AutoencoderKLConfig
    dtype: Any = F32

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), dtype=self.dtype)

    def encode(self, x: jax.Array) -> jax.Array:
        h = self.encoder(x.astype(self.dtype))
        return self.quant_conv(h) if self.config.use_quant_conv else h

    def decode(self, z: jax.Array) -> jax.Array:
        z = z.astype(self.dtype)
        return self.decoder(self.post_quant_conv(z) if self.config.use_post_quant_conv else z)

    def __call__(self, x: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encode(x), self.decode(z)


def _resnet_keys(f: str, t: str, a: int, b: int) -> list[KeyEntry]:
    out = norm(f"{f}/norm1", f"{t}.norm1") + conv_keys(f"{f}/conv1", f"{t}.conv1")
    out += norm(f"{f}/norm2", f"{t}.norm2") + conv_keys(f"{f}/conv2", f"{t}.conv2")
    return out + (conv_keys(f"{f}/conv_shortcut", f"{t}.conv_shortcut") if a != b else [])


def _mid_keys(f: str, t: str, c: int, attention: bool) -> list[KeyEntry]:
    out = _resnet_keys(f"{f}/resnets_0", f"{t}.resnets.0", c, c)
    if attention:
        a, ta = f"{f}/attentions_0", f"{t}.attentions.0"
        out += norm(f"{a}/group_norm", f"{ta}.group_norm")
        out += [e for n in ("to_q", "to_k", "to_v") for e in linear(f"{a}/{n}", f"{ta}.{n}")]
        out += linear(f"{a}/to_out_0", f"{ta}.to_out.0")
    return out + _resnet_keys(f"{f}/resnets_1", f"{t}.resnets.1", c, c)


def key_map(cfg: AutoencoderKLConfig) -> list[KeyEntry]:
    """Every tensor of an AutoencoderKL checkpoint and its Flax param path."""
    chans = cfg.block_out_channels
    out = conv_keys("encoder/conv_in", "encoder.conv_in")
    prev = chans[0]
    for i, c in enumerate(chans):
        for j in range(cfg.layers_per_block):
            out += _resnet_keys(f"encoder/down_blocks_{i}_resnets_{j}", f"encoder.down_blocks.{i}.resnets.{j}", prev, c)
            prev = c
        if i != len(chans) - 1:
            out += conv_keys(f"encoder/down_blocks_{i}_downsamplers_0", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    out += _mid_keys("encoder/mid_block", "encoder.mid_block", chans[-1], cfg.mid_block_add_attention)
    out += norm("encoder/conv_norm_out", "encoder.conv_norm_out") + conv_keys("encoder/conv_out", "encoder.conv_out")
    out += conv_keys("decoder/conv_in", "decoder.conv_in")
    out += _mid_keys("decoder/mid_block", "decoder.mid_block", chans[-1], cfg.mid_block_add_attention)
    prev = chans[-1]
    for i, c in enumerate(chans[::-1]):
        for j in range(cfg.layers_per_block + 1):
            out += _resnet_keys(f"decoder/up_blocks_{i}_resnets_{j}", f"decoder.up_blocks.{i}.resnets.{j}", prev, c)
            prev = c
        if i != len(chans) - 1:
            out += conv_keys(f"decoder/up_blocks_{i}_upsamplers_0", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    out += norm("decoder/conv_norm_out", "decoder.conv_norm_out") + conv_keys("decoder/conv_out", "decoder.conv_out")
    if cfg.use_quant_conv:
        out += conv_keys("quant_conv", "quant_conv")
    if cfg.use_post_quant_conv:
        out += conv_keys("post_quant_conv", "post_quant_conv")
    return out


def _dummy(cfg: AutoencoderKLConfig) -> tuple[jax.Array, jax.Array]:
    s = cfg.spatial_ratio
    return jnp.zeros((1, s, s, cfg.in_channels), F32), jnp.zeros((1, 1, 1, cfg.latent_channels), F32)


def param_shapes(cfg: AutoencoderKLConfig) -> dict[str, Any]:
    """Param tree of ShapeDtypeStructs (no allocation)."""
    model = AutoencoderKL(cfg)
    return jax.eval_shape(lambda r: model.init(r, *_dummy(cfg))["params"], jax.random.key(0))


@dataclasses.dataclass(frozen=True)
class Tiling:
    """diffusers' AutoencoderKL tiling: tiles of `sample_size` pixels (None: the config's
    sample_size), overlapping by `overlap_factor`."""

    sample_size: int | None = None
    overlap_factor: float = 0.25


@functools.lru_cache(maxsize=16)
def _jitted(cfg: AutoencoderKLConfig, dtype: jnp.dtype) -> dict[str, Any]:
    model = AutoencoderKL(cfg, dtype)
    return {
        "encode": jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode")),
        "decode": jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode")),
    }


@dataclasses.dataclass(frozen=True)
class KLVAE:
    """A loaded AutoencoderKL: config, params and compute dtype, with diffusers' encode/decode."""

    config: AutoencoderKLConfig
    params: Any
    dtype: Any = F32

    def _fn(self, name: str) -> Any:
        return functools.partial(_jitted(self.config, jnp.dtype(self.dtype))[name], self.params)

    def decode_bytes(self, height: int, width: int, batch: int = 1) -> dict[str, int]:
        """XLA's memory analysis of the untiled `decode` of a `height` x `width` image (output
        pixels): bytes of arguments (weights + latents), outputs and temporaries. Compiles, runs nothing."""
        r = self.config.spatial_ratio
        if height % r or width % r:
            raise ValueError(f"AutoencoderKL: height and width must be multiples of {r}, got {height}x{width}")
        z = jax.ShapeDtypeStruct((batch, height // r, width // r, self.config.latent_channels), jnp.dtype(self.dtype))
        fn = _jitted(self.config, jnp.dtype(self.dtype))["decode"]
        mem = fn.lower(self.params, z).compile().memory_analysis()
        return {
            "arguments": int(mem.argument_size_in_bytes),
            "outputs": int(mem.output_size_in_bytes),
            "temporaries": int(mem.temp_size_in_bytes),
        }

    def _sizes(self, tiling: Tiling) -> tuple[int, int]:
        sample = tiling.sample_size or self.config.tile_size
        return sample, int(sample / self.config.spatial_ratio)

    def _check(self, x: jax.Array, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"KLVAE.{what}: expected [B, {channels}, H, W], got shape {tuple(x.shape)}")

    def decode(self, z: jax.Array, tiling: Tiling | None = None) -> jax.Array:
        """Latents [B, C, h, w] -> images [B, 3, rh, rw] (r = 2 per up block); with `tiling`, in
        overlapping tiles when the latent is larger than one (diffusers' `tiled_decode`)."""
        self._check(z, self.config.latent_channels, "decode")
        zl = jnp.moveaxis(z, 1, -1)
        if tiling is not None:
            sample, latent = self._sizes(tiling)
            if zl.shape[1] > latent or zl.shape[2] > latent:
                blend = int(sample * tiling.overlap_factor)
                stride = int(latent * (1 - tiling.overlap_factor))
                plan = TilePlan((latent, latent), (stride, stride), (blend, blend), (sample - blend,) * 2)
                return jnp.moveaxis(tiled(self._fn("decode"), zl, plan), -1, 1)
        return jnp.moveaxis(self._fn("decode")(zl), -1, 1)

    def encode(self, x: jax.Array, tiling: Tiling | None = None) -> DiagonalGaussian:
        """Images [B, 3, H, W] -> latent distribution over [B, C, H/r, W/r] (diffusers' `encode`,
        `_tiled_encode` with `tiling` when the image is larger than one tile)."""
        self._check(x, self.config.in_channels, "encode")
        r = self.config.spatial_ratio
        if x.shape[2] % r or x.shape[3] % r:
            raise ValueError(f"KLVAE.encode: height and width must be multiples of {r}, got {x.shape[2]}x{x.shape[3]}")
        xl = jnp.moveaxis(x, 1, -1)
        if tiling is not None:
            sample, latent = self._sizes(tiling)
            if xl.shape[1] > sample or xl.shape[2] > sample:
                blend = int(latent * tiling.overlap_factor)
                stride = int(sample * (1 - tiling.overlap_factor))
                plan = TilePlan((sample, sample), (stride, stride), (blend, blend), (latent - blend,) * 2)
                return DiagonalGaussian.from_moments(jnp.moveaxis(tiled(self._fn("encode"), xl, plan), -1, 1))
        return DiagonalGaussian.from_moments(jnp.moveaxis(self._fn("encode")(xl), -1, 1))

    def denormalize(self, latents: jax.Array) -> jax.Array:
        """The transformer's latents -> the decoder's: `latents / scaling_factor + shift_factor`
        (FluxPipeline)."""
        return latents / self.config.scaling_factor + (self.config.shift_factor or 0.0)

    def normalize(self, z: jax.Array) -> jax.Array:
        """The encoder's latents -> the transformer's: `(z - shift_factor) * scaling_factor`."""
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor


def init_autoencoder_kl(config: AutoencoderKLConfig, seed: int = 0, dtype: Any = F32) -> KLVAE:
    """A KLVAE with random params (`vae_blocks.random_params`), for tests and memory tables."""
    return KLVAE(config, random_params(param_shapes(config), seed, dtype), dtype)


def load_autoencoder_kl(path: str | os.PathLike, dtype: Any = F32) -> KLVAE:
    """Load an AutoencoderKL from a VAE folder or a pipeline directory (its `vae/`):
    config.json + single or sharded safetensors; params cast to `dtype`, computed in `dtype`."""
    folder, raw = read_vae_config(path, (AutoencoderKLConfig.CLASS_NAME,))
    try:
        config = AutoencoderKLConfig.from_diffusers(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder / 'config.json'}: {e}") from e
    return KLVAE(config, read_params(folder, key_map(config), param_shapes(config), dtype), dtype)
