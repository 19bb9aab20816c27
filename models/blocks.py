"""Shared layers of the DiT ports: norms, feed-forward, adaLN modulation, patchify.

Norms compute in float32 and return the input dtype (as diffusers' FP32LayerNorm and torch's
fused norms do in bf16). Every linear map is an `nn.Dense` so jquant can intercept it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.attention import apply_rope, attention
from models.embeddings import TimestepLabelEmbedding, activation

FF_ACTIVATIONS: dict[str, str] = {"gelu": "gelu", "gelu-approximate": "gelu_tanh"}


class LayerNorm(nn.Module):
    """LayerNorm over the last axis in float32; `affine` adds `scale` and `bias` params."""

    eps: float = 1e-6
    affine: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            dim = x.shape[-1]
            y = y * self.param("scale", nn.initializers.ones, (dim,)).astype(jnp.float32)
            y = y + self.param("bias", nn.initializers.zeros, (dim,)).astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis in float32 with a learned `scale` (torch.nn.RMSNorm)."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
        y = y * self.param("scale", nn.initializers.ones, (x.shape[-1],)).astype(jnp.float32)
        return y.astype(x.dtype)


class LinearAct(nn.Module):
    """Dense `proj` then an activation (diffusers' `GELU` module, i.e. `ff.net.0`)."""

    features: int
    act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return activation(self.act)(nn.Dense(self.features, dtype=self.dtype, name="proj")(x))


class FeedForward(nn.Module):
    """diffusers `FeedForward` with a GELU activation: net_0 (proj + gelu) -> net_2."""

    inner_dim: int
    out_dim: int
    activation_fn: str = "gelu-approximate"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.activation_fn not in FF_ACTIVATIONS:
            raise ValueError(f"FeedForward: activation_fn {self.activation_fn!r} not in {sorted(FF_ACTIVATIONS)}")
        x = LinearAct(self.inner_dim, FF_ACTIVATIONS[self.activation_fn], self.dtype, name="net_0")(x)
        return nn.Dense(self.out_dim, dtype=self.dtype, name="net_2")(x)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """[B, T, H*D] -> [B, T, H, D]."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """[B, T, H, D] -> [B, T, H*D]."""
    return x.reshape(*x.shape[:-2], -1)


class Attention(nn.Module):
    """Self- or cross-attention with to_q/to_k/to_v/to_out_0 Dense layers around `attention`.

    diffusers' `Attention` (DiT: qk_norm=None) and `WanAttention` (qk_norm="rms_norm_across_heads":
    RMSNorm of q and k over all heads; `added_kv` adds Wan I2V's image K/V branch, whose attention
    output is summed with the text one).
    """

    heads: int
    head_dim: int
    qk_norm: str | None = None
    eps: float = 1e-6
    use_bias: bool = True
    added_kv: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
        context_img: jax.Array | None = None,
    ) -> jax.Array:
        if self.qk_norm not in (None, "rms_norm_across_heads"):
            raise ValueError(f"Attention: qk_norm {self.qk_norm!r} not in (None, 'rms_norm_across_heads')")
        inner = self.heads * self.head_dim

        def dense(name: str, bias: bool = self.use_bias) -> nn.Dense:
            return nn.Dense(inner, use_bias=bias, dtype=self.dtype, name=name)

        def qk_norm(y: jax.Array, name: str) -> jax.Array:
            return RMSNorm(self.eps, name=name)(y) if self.qk_norm else y

        src = x if context is None else context
        q = split_heads(qk_norm(dense("to_q")(x), "norm_q"), self.heads)
        k = split_heads(qk_norm(dense("to_k")(src), "norm_k"), self.heads)
        v = split_heads(dense("to_v")(src), self.heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v, implementation=self.attention_impl)
        if self.added_kv:
            if context_img is None:
                raise ValueError("Attention with added_kv needs context_img (the image embedding)")
            k_img = split_heads(qk_norm(dense("add_k_proj")(context_img), "norm_added_k"), self.heads)
            v_img = split_heads(dense("add_v_proj")(context_img), self.heads)
            out = out + attention(q, k_img, v_img, implementation=self.attention_impl)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(merge_heads(out))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation x * (1 + scale) + shift, with shift/scale [B, D] broadcast over tokens."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class AdaLayerNorm(nn.Module):
    """adaLN: `linear(silu(emb))` split into `num_chunks` vectors; the first two modulate LayerNorm(x).

    Covers diffusers' AdaLayerNormZero (6 chunks: shift, scale, gate, shift_mlp, scale_mlp, gate_mlp),
    AdaLayerNormZeroSingle (3) and AdaLayerNormContinuous (2, `scale_first=True`). With
    `num_embeddings` set it owns DiT's timestep+class embedder `emb`, as AdaLayerNormZero does.
    Returns (modulated x, remaining chunks, conditioning embedding).
    """

    num_chunks: int
    eps: float = 1e-6
    scale_first: bool = False
    num_embeddings: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        emb: jax.Array | None = None,
        timestep: jax.Array | None = None,
        class_labels: jax.Array | None = None,
    ) -> tuple[jax.Array, list[jax.Array], jax.Array]:
        dim = x.shape[-1]
        if self.num_embeddings is not None:
            if timestep is None or class_labels is None:
                raise ValueError("AdaLayerNorm with num_embeddings needs timestep and class_labels")
            emb = TimestepLabelEmbedding(self.num_embeddings, dim, self.dtype, name="emb")(timestep, class_labels)
        if emb is None:
            raise ValueError("AdaLayerNorm: emb is required when num_embeddings is None")
        out = nn.Dense(self.num_chunks * dim, dtype=self.dtype, name="linear")(nn.silu(emb))
        chunks = jnp.split(out, self.num_chunks, axis=-1)
        shift, scale = (chunks[1], chunks[0]) if self.scale_first else (chunks[0], chunks[1])
        return modulate(LayerNorm(self.eps)(x), shift, scale), chunks[2:], emb


def patchify(x: jax.Array, patch: Sequence[int]) -> tuple[jax.Array, tuple[int, ...]]:
    """[B, C, *S] -> tokens [B, prod(S/p), C*prod(p)] (features ordered C, p_1..p_n) and the grid S/p.

    A Dense on these tokens with kernel = conv_weight.reshape(out, -1).T equals a Conv with
    kernel = stride = patch, which is how the ports embed patches.
    """
    b, c, *spatial = x.shape
    n = len(patch)
    if len(spatial) != n or any(s % p for s, p in zip(spatial, patch)):
        raise ValueError(f"patchify: spatial shape {tuple(spatial)} not divisible by patch {tuple(patch)}")
    grid = tuple(s // p for s, p in zip(spatial, patch))
    x = x.reshape(b, c, *[d for g, p in zip(grid, patch) for d in (g, p)])
    perm = (0, *[2 + 2 * i for i in range(n)], 1, *[3 + 2 * i for i in range(n)])
    return x.transpose(perm).reshape(b, math.prod(grid), c * math.prod(patch)), grid


def unpatchify(tokens: jax.Array, grid: Sequence[int], patch: Sequence[int]) -> jax.Array:
    """Tokens [B, prod(grid), prod(patch)*C] (features ordered p_1..p_n, C) -> [B, C, *(grid*patch)]."""
    b = tokens.shape[0]
    n = len(patch)
    x = tokens.reshape(b, *grid, *patch, -1)
    perm = (0, 2 * n + 1, *[d for i in range(n) for d in (1 + i, 1 + n + i)])
    return x.transpose(perm).reshape(b, -1, *[g * p for g, p in zip(grid, patch)])
