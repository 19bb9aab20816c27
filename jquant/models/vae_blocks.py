"""Pieces shared by the VAE ports (`wan_vae`, `autoencoder_kl`): conv key entries, norms,
single-head spatial attention, overlapped-tile blending, the latent distribution and the reader
of a pipeline's `vae/` folder.

Layouts: the ports compute channel-last ([B, (T,) H, W, C]); torch conv weights
[O, I, (T,) H, W] are stored as Flax kernels [(T,) H, W, I, O].
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jquant.models.loading import CheckpointError, CheckpointMismatchError, read_config_json, read_tensors
from jquant.models.port import KeyEntry
from jquant.models.safetensors import SafetensorsError, weight_files

F32 = jnp.float32
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class ConvKeyEntry(KeyEntry):
    """A KeyEntry with the VAE layouts: kind "conv" (torch [O, I, *k] <-> Flax [*k, I, O]) and
    "vector" (a per-channel torch param of shape `torch_shape`, e.g. [C, 1, 1], <-> [C])."""

    def _convert(self, array: np.ndarray, to_torch: bool) -> np.ndarray:
        if self.kind == "conv":
            n = array.ndim
            perm = (*range(2, n), 1, 0) if not to_torch else (n - 1, n - 2, *range(n - 2))
            return np.transpose(array, perm)
        if self.kind == "vector":
            if not to_torch:
                return array.reshape(-1)
            if self.torch_shape is None:
                raise ValueError(f"ConvKeyEntry {self.torch_key}: vector entry without torch_shape")
            return array.reshape(self.torch_shape)
        return super()._convert(array, to_torch)


def conv_keys(flax_prefix: str, torch_prefix: str, bias: bool = True) -> list[KeyEntry]:
    """Entries of one torch Conv2d/Conv3d <-> nn.Conv (`kernel`, `bias`)."""
    out: list[KeyEntry] = [ConvKeyEntry(f"{flax_prefix}/kernel", f"{torch_prefix}.weight", "conv")]
    return out + ([KeyEntry(f"{flax_prefix}/bias", f"{torch_prefix}.bias")] if bias else [])


def vector_key(flax_path: str, torch_key: str, torch_shape: tuple[int, ...]) -> KeyEntry:
    """Entry of a per-channel param stored with broadcast axes in torch (Wan's RMS-norm `gamma`)."""
    return ConvKeyEntry(flax_path, torch_key, "vector", torch_shape)


def pad_spatial(x: jax.Array, before: int, after: int) -> jax.Array:
    """Zero-pad the H and W axes ([..., H, W, C]) of a channel-last tensor."""
    widths = [(0, 0)] * (x.ndim - 3) + [(before, after), (before, after), (0, 0)]
    return jnp.pad(x, widths)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm(affine=True) over channel-last input, statistics in float32."""

    groups: int
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.groups:
            raise ValueError(f"GroupNorm: {c} channels not divisible by {self.groups} groups")
        xf = x.astype(F32).reshape(x.shape[0], -1, self.groups, c // self.groups)
        mean = xf.mean((1, 3), keepdims=True)
        var = jnp.square(xf - mean).mean((1, 3), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        y = y * self.param("scale", nn.initializers.ones, (c,)) + self.param("bias", nn.initializers.zeros, (c,))
        return y.astype(x.dtype)


def single_head_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention with one head over the tokens of [N, L, C] inputs (scale 1/sqrt(C)),
    through `jax.nn.dot_product_attention` so a fused kernel is used where the backend has one."""
    return jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]


def upsample_nearest2x(x: jax.Array) -> jax.Array:
    """Nearest 2x upsampling of H and W ([..., H, W, C]); torch's "nearest" and "nearest-exact"
    agree at scale 2."""
    return jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)


@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """The encoder's latent distribution (diffusers' DiagonalGaussianDistribution): `mean` and
    `logvar` clamped to [-30, 20], channel axis 1 as in diffusers."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        mean, logvar = jnp.split(moments, 2, axis=1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)


# ---------------------------------------------------------------------------------------------
# Overlapped spatial tiles, blended as diffusers' tiled_encode / tiled_decode do.


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """How a tiled pass cuts its input and glues the outputs (H and W alike).

    tile, stride: input tile size and step (input pixels); blend: output rows/columns blended with
    the previous tile; keep: output rows/columns kept of each tile; crop: output size to crop the
    glued result to per axis (None: no crop, as AutoencoderKL).
    """

    tile: tuple[int, int]
    stride: tuple[int, int]
    blend: tuple[int, int]
    keep: tuple[int, int]
    crop: tuple[int, int] | None = None


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """`b` with its first `extent` entries along `axis` faded in from `a`'s last ones."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = extent
    w = (jnp.arange(extent, dtype=F32) / extent).reshape(shape).astype(b.dtype)
    head_a = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    head_b = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
    mixed = head_a * (1 - w) + head_b * w
    return jnp.concatenate([mixed, jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis=axis)


def tiled(fn: Callable[[jax.Array], jax.Array], x: jax.Array, plan: TilePlan) -> jax.Array:
    """Apply `fn` to overlapping spatial tiles of channel-last `x` ([..., H, W, C]) and blend them.

    Mirrors diffusers: tiles start every `stride` input pixels; each tile is blended with the
    (already blended) tile above and to its left over `blend` output pixels, then cut to `keep`.
    Cutting the tiles and gluing `fn`'s outputs are one compiled program each (per shape and
    plan), not one per slice and blend; `fn` is called on each tile as it is.
    """
    return _glue([[fn(tile) for tile in row] for row in _cut(x, plan)], plan)


@functools.partial(jax.jit, static_argnums=1)
def _cut(x: jax.Array, plan: TilePlan) -> list[list[jax.Array]]:
    """The input tiles of `tiled`, row by row (the last ones in a row or column smaller)."""
    h_axis, w_axis = x.ndim - 3, x.ndim - 2
    height, width = x.shape[h_axis], x.shape[w_axis]
    rows = []
    for i in range(0, height, plan.stride[0]):
        band = jax.lax.slice_in_dim(x, i, min(i + plan.tile[0], height), axis=h_axis)
        rows.append(
            [
                jax.lax.slice_in_dim(band, j, min(j + plan.tile[1], width), axis=w_axis)
                for j in range(0, width, plan.stride[1])
            ]
        )
    return rows


@functools.partial(jax.jit, static_argnums=1)
def _glue(rows: list[list[jax.Array]], plan: TilePlan) -> jax.Array:
    """`tiled`'s blend of the output tiles into one array (cropped to `plan.crop`)."""
    rows = [list(row) for row in rows]
    ndim = rows[0][0].ndim
    h_axis, w_axis = ndim - 3, ndim - 2
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j in range(len(row)):
            tile = row[j]
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, plan.blend[0], h_axis)
            if j > 0:
                tile = _blend(row[j - 1], tile, plan.blend[1], w_axis)
            row[j] = tile  # diffusers blends in place: later tiles see this blended one
            tile = jax.lax.slice_in_dim(tile, 0, min(plan.keep[0], tile.shape[h_axis]), axis=h_axis)
            kept.append(jax.lax.slice_in_dim(tile, 0, min(plan.keep[1], tile.shape[w_axis]), axis=w_axis))
        out_rows.append(jnp.concatenate(kept, axis=w_axis))
    out = jnp.concatenate(out_rows, axis=h_axis)
    if plan.crop is not None:
        out = jax.lax.slice_in_dim(out, 0, plan.crop[0], axis=h_axis)
        out = jax.lax.slice_in_dim(out, 0, plan.crop[1], axis=w_axis)
    return out


# ---------------------------------------------------------------------------------------------
# Reading a `vae/` folder.


def random_params(shapes: Any, seed: int, dtype: Any) -> Any:
    """Random params of a param tree of ShapeDtypeStructs, drawn with numpy (one compile-free
    pass, unlike flax's per-initializer jits): kernels N(0, 1/fan_in), norm gains one, biases zero."""
    rng = np.random.default_rng(seed)

    def draw(path: tuple[Any, ...], leaf: Any) -> jax.Array:
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            fan_in = math.prod(leaf.shape[:-1])
            value = rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in)
        elif name == "bias":
            value = np.zeros(leaf.shape, np.float32)
        else:
            value = np.ones(leaf.shape, np.float32)
        return jnp.asarray(value, dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def vae_dir(path: str | os.PathLike) -> Path:
    """The VAE model folder of `path`: `path/vae` for a pipeline directory (one with
    model_index.json), else `path` itself."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        sub = path / "vae"
        if not (sub / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is a pipeline directory (model_index.json) but has no vae component: {sub / 'config.json'} missing"
            )
        return sub
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a VAE folder or a pipeline directory)")
    return path


def read_vae_config(path: str | os.PathLike, class_names: tuple[str, ...]) -> tuple[Path, dict[str, Any]]:
    """(folder, raw config.json) of the VAE at `path`, checked to be one of `class_names`."""
    folder = vae_dir(path)
    raw = read_config_json(folder / "config.json")
    name = raw.get("_class_name")
    if name not in class_names:
        raise ValueError(f"{folder / 'config.json'}: _class_name is {name!r}, this loader reads {list(class_names)}")
    return folder, raw


def _files(folder: Path) -> dict[str, Path]:
    for name in (INDEX_NAME, WEIGHTS_NAME):
        if (folder / name).is_file():
            try:
                return weight_files(folder / name)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from e
    raise FileNotFoundError(f"{folder}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")


def read_params(
    folder: Path, entries: list[KeyEntry], shapes: dict[str, Any], dtype: Any, ignore: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The Flax param tree of `entries` read from the safetensors of `folder`, cast to `dtype`.

    Missing or unexpected keys (except those matching `ignore`) and wrong shapes raise one
    :class:`CheckpointMismatchError` listing every problem with its file and key.
    """
    flat_shapes = traverse_util.flatten_dict(shapes, sep="/")
    if {e.flax_path for e in entries} != set(flat_shapes):
        raise AssertionError(
            f"VAE key map out of sync with the module: {sorted({e.flax_path for e in entries} ^ set(flat_shapes))}"
        )
    files = _files(folder)
    missing = sorted(e.torch_key for e in entries if e.torch_key not in files)
    known = {e.torch_key for e in entries}
    unexpected = sorted(k for k in files if k not in known and not any(re.search(p, k) for p in ignore))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{folder} does not match its config.json's key map.\n"
            f"missing keys ({len(missing)}): {missing}\nunexpected keys ({len(unexpected)}): {unexpected}"
        )
    flat = read_tensors(folder, files, entries, {k: v.shape for k, v in flat_shapes.items()}, dtype)
    return traverse_util.unflatten_dict(flat, sep="/")
