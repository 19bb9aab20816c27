"""Timestep, positional and rotary embeddings, matching diffusers' `embeddings.py`."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Look up an activation by diffusers' name ("silu", "gelu", "gelu_tanh")."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    downscale_freq_shift: float,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of 1-D timesteps [N] -> [N, dim] in float32.

    Same flags as diffusers' `get_timestep_embedding`: Wan and Flux use
    (flip_sin_to_cos=True, shift=0); DiT uses (True, 1).
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timestep_embedding: timesteps must be 1-D [N], got shape {timesteps.shape}")
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :] * scale
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def rope_inv_freqs(dim: int, theta: float = 10000.0) -> np.ndarray:
    """Inverse frequencies 1 / theta^(2i/dim), i < dim/2, in float64 (as diffusers)."""
    if dim % 2:
        raise ValueError(f"rope_inv_freqs: rotary dim must be even, got {dim}")
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def _interleave(angles: Any, xp: Any) -> tuple[Any, Any]:
    return xp.repeat(xp.cos(angles), 2, axis=-1), xp.repeat(xp.sin(angles), 2, axis=-1)


def wan_rope_tables(head_dim: int, grid: tuple[int, int, int], theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """Wan's 3-D RoPE: head_dim split into (t, h, w) parts, h = w = 2*(head_dim//6),
    positions from a static (frames, height, width) token grid. Returns cos, sin [F*H*W, head_dim].
    """
    h_dim = w_dim = 2 * (head_dim // 6)
    t_dim = head_dim - h_dim - w_dim
    f, h, w = grid
    parts = []
    for axis, (dim, n) in enumerate(zip((t_dim, h_dim, w_dim), (f, h, w))):
        angles = np.outer(np.arange(n, dtype=np.float64), rope_inv_freqs(dim, theta))
        shape = [1, 1, 1, angles.shape[1]]
        shape[axis] = n
        parts.append(np.broadcast_to(angles.reshape(shape), (f, h, w, angles.shape[1])))
    angles = np.concatenate(parts, axis=-1).reshape(f * h * w, -1)
    cos, sin = _interleave(angles, np)
    return jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32)


def axes_rope_tables(ids: jax.Array, axes_dim: Sequence[int], theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """Flux's axes RoPE: ids [S, n_axes] positions, axis i uses axes_dim[i] channels.
    Returns cos, sin [S, sum(axes_dim)] in float32.
    """
    if ids.ndim != 2 or ids.shape[1] != len(axes_dim):
        raise ValueError(f"axes_rope_tables: ids must be [S, {len(axes_dim)}], got {ids.shape}")
    pos = ids.astype(jnp.float32)
    angles = jnp.concatenate(
        [pos[:, i : i + 1] * jnp.asarray(rope_inv_freqs(d, theta), jnp.float32)[None] for i, d in enumerate(axes_dim)],
        axis=-1,
    )
    return _interleave(angles, jnp)


def grid_positions(grid: Sequence[int]) -> np.ndarray:
    """Integer coordinates of every cell of a token grid in row-major order -> [prod(grid), len(grid)]
    float32 (the ids HunyuanVideo's and Flux-style axes RoPE take)."""
    axes = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in grid], indexing="ij")
    return np.stack([a.reshape(-1) for a in axes], axis=-1)


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """diffusers' `get_1d_sincos_pos_embed_from_grid`: positions [M] -> [M, dim] = [sin, cos] of
    pos * 10000^(-i / (dim/2)), in float64."""
    if dim % 2:
        raise ValueError(f"sincos_1d: dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(np.asarray(pos, np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_pos_embed(embed_dim: int, grid: tuple[int, int], base_size: int) -> jax.Array:
    """DiT's fixed 2-D sin-cos position embedding for an (h, w) token grid -> [h*w, embed_dim].

    Matches diffusers' `get_2d_sincos_pos_embed(..., base_size, interpolation_scale=1)`: first half
    encodes the column coordinate, second half the row coordinate, each as [sin, cos].
    """
    if embed_dim % 4:
        raise ValueError(f"sincos_2d_pos_embed: embed_dim must be divisible by 4, got {embed_dim}")
    h, w = grid
    rows = np.arange(h, dtype=np.float64) / (h / base_size)
    cols = np.arange(w, dtype=np.float64) / (w / base_size)
    col_grid, row_grid = np.meshgrid(cols, rows)  # each [h, w]
    emb = np.concatenate([sincos_1d(embed_dim // 2, col_grid), sincos_1d(embed_dim // 2, row_grid)], axis=1)
    return jnp.asarray(emb, jnp.float32)


class EmbedMLP(nn.Module):
    """linear_1 -> act -> linear_2: diffusers' `TimestepEmbedding` (act "silu") and
    `PixArtAlphaTextProjection` (act "gelu_tanh" for text, "silu" for Flux's pooled text)."""

    features: int
    act: str = "silu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        x = activation(self.act)(x)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(x)


class LabelEmbedding(nn.Module):
    """diffusers `LabelEmbedding`: a class table with one extra row (the CFG "null" class)."""

    num_classes: int
    features: int

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        table = nn.Embed(self.num_classes + 1, self.features, name="embedding_table")
        return table(labels)


class TimestepLabelEmbedding(nn.Module):
    """diffusers `CombinedTimestepLabelEmbeddings` (DiT): sinusoid(256, flip, shift 1) -> MLP, plus class."""

    num_classes: int
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array, labels: jax.Array) -> jax.Array:
        t = timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=1).astype(self.dtype)
        t = EmbedMLP(self.features, "silu", self.dtype, name="timestep_embedder")(t)
        return t + LabelEmbedding(self.num_classes, self.features, name="class_embedder")(labels).astype(self.dtype)


class CombinedTimestepTextEmbedding(nn.Module):
    """Timestep (+ guidance) sinusoid(256) -> MLPs, plus the pooled text projection (silu), summed:
    diffusers' `CombinedTimestep(Guidance)TextProjEmbeddings` (Flux, HunyuanVideo and its token
    refiner). Submodules `timestep_embedder`, `guidance_embedder` (when guidance is given),
    `text_embedder`."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array, guidance: jax.Array | None, pooled: jax.Array) -> jax.Array:
        def sinusoid(t: jax.Array) -> jax.Array:
            return timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0).astype(pooled.dtype)

        emb = EmbedMLP(self.features, "silu", self.dtype, name="timestep_embedder")(sinusoid(timestep))
        if guidance is not None:
            emb = emb + EmbedMLP(self.features, "silu", self.dtype, name="guidance_embedder")(sinusoid(guidance))
        return emb + EmbedMLP(self.features, "silu", self.dtype, name="text_embedder")(pooled)
