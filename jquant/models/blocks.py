"""Shared layers of the DiT ports: norms, feed-forward, adaLN modulation, patchify.

Norms compute in float32 and return the input dtype (as diffusers' FP32LayerNorm and torch's
fused norms do in bf16). Every linear map is an `nn.Dense` so jquant can intercept it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jquant.models.attention import QKPrologue, apply_rope, attention, rms_norm
from jquant.models.embeddings import (
    EmbedMLP,
    TimestepLabelEmbedding,
    activation,
    timestep_embedding,
)
from jquant.models.port import KeyEntry, feed_forward, linear, norm

# diffusers FeedForward activation_fn -> (activation, gated). Gated ("swiglu") projects to twice the
# inner width and multiplies the first half by act(second half).
FF_ACTIVATIONS: dict[str, tuple[str, bool]] = {
    "gelu": ("gelu", False),
    "gelu-approximate": ("gelu_tanh", False),
    "linear-silu": ("silu", False),
    "swiglu": ("silu", True),
}


class PortModule(nn.Module):
    """Fields of a port's config-driven modules: the port's config, the compute dtype and the
    attention backend (`attention` implementation; None = JAX's default)."""

    config: Any
    dtype: Any = jnp.float32
    attention_impl: str | None = None


class LayerNorm(nn.Module):
    """LayerNorm over the last axis in float32; `affine` adds `scale` and `bias` params."""

    eps: float = 1e-6
    affine: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self._normalize(x)

    def _normalize(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            dim = x.shape[-1]
            y = y * self.param("scale", nn.initializers.ones, (dim,)).astype(jnp.float32)
            y = y + self.param("bias", nn.initializers.zeros, (dim,)).astype(jnp.float32)
        return y.astype(x.dtype)


class NormModulate(LayerNorm):
    """``modulate(LayerNorm(x), shift, scale)``, returned in x's dtype: the adaLN input of a
    block's attention or FFN (params and their paths as :class:`LayerNorm`'s). ``upcast``: norm
    and modulation in float32 (Wan, as diffusers); False keeps x's dtype throughout (the MM-DiT
    blocks' ``modulate(LayerNorm(x), ...)``).

    One module, so that a quantized run can hand its consumers the codes of a fused
    norm + modulation + quantization kernel instead (``jquant.nn``; issue 19's producer);
    float execution is exactly the expression it replaces. Without ``shift`` and ``scale`` it is
    the norm alone (``LayerNorm(x)`` in x's dtype; Wan's cross-attention norm), so that norm's
    consumer can take a producer's codes too."""

    upcast: bool = True

    @nn.compact
    def __call__(  # type: ignore[override]
        self, x: jax.Array, shift: jax.Array | None = None, scale: jax.Array | None = None
    ) -> jax.Array:
        if (shift is None) != (scale is None):
            raise ValueError(f"NormModulate {self.name!r}: shift and scale go together, got only one")
        y = self._normalize(x.astype(jnp.float32) if self.upcast else x)
        if shift is not None:
            y = modulate(y, shift, scale)
        return y.astype(x.dtype) if self.upcast else y


class RMSNorm(nn.Module):
    """RMSNorm over the last axis in float32 with a learned `scale` (torch.nn.RMSNorm); without
    `affine` it has no params (diffusers' `RMSNorm(dim, eps, elementwise_affine=False)`).

    `weight(features)` returns the learned scale alone (None without `affine`): a layer that
    hands its norm to attention as a `QKPrologue` reads it there, under the same param path."""

    eps: float = 1e-6
    affine: bool = True

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight(x.shape[-1]), self.eps)

    @nn.compact
    def weight(self, features: int) -> jax.Array | None:
        return self.param("scale", nn.initializers.ones, (features,)) if self.affine else None


class LinearAct(nn.Module):
    """Dense `proj` then an activation: diffusers' `GELU` / `LinearActivation` module (`ff.net.0`),
    or with `gated` its `SwiGLU`: proj to 2*features, first half * act(second half)."""

    features: int
    act: str
    dtype: Any = jnp.float32
    gated: bool = False
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = 2 * self.features if self.gated else self.features
        h = nn.Dense(width, use_bias=self.use_bias, dtype=self.dtype, name="proj")(x)
        if self.gated:
            h, gate = jnp.split(h, 2, axis=-1)
            return h * activation(self.act)(gate)
        return activation(self.act)(h)


class FeedForward(nn.Module):
    """diffusers `FeedForward`: net_0 (proj + activation, see FF_ACTIVATIONS) -> net_2."""

    inner_dim: int
    out_dim: int
    activation_fn: str = "gelu-approximate"
    dtype: Any = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.activation_fn not in FF_ACTIVATIONS:
            raise ValueError(f"FeedForward: activation_fn {self.activation_fn!r} not in {sorted(FF_ACTIVATIONS)}")
        act, gated = FF_ACTIVATIONS[self.activation_fn]
        x = LinearAct(self.inner_dim, act, self.dtype, gated, self.use_bias, name="net_0")(x)
        return nn.Dense(self.out_dim, use_bias=self.use_bias, dtype=self.dtype, name="net_2")(x)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """[B, T, H*D] -> [B, T, H, D]."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """[B, T, H, D] -> [B, T, H*D]."""
    return x.reshape(*x.shape[:-2], -1)


def key_mask(mask: jax.Array | None) -> jax.Array | None:
    """[B, Tk] boolean key mask (True = attend) -> [B, 1, 1, Tk] for `attention`; None passes through."""
    if mask is None:
        return None
    if mask.ndim != 2:
        raise ValueError(f"key mask must be [batch, tokens], got shape {mask.shape}")
    return mask.astype(bool)[:, None, None, :]


class Attention(nn.Module):
    """Self- or cross-attention with to_q/to_k/to_v/to_out_0 Dense layers around `attention`.

    diffusers' `Attention` (DiT, HunyuanVideo's token refiner: qk_norm=None), `WanAttention` and
    `LTXAttention` / `LTX2Attention` (qk_norm="rms_norm_across_heads": RMSNorm of q and k over all
    heads). `added_kv` adds Wan I2V's image K/V branch, whose attention output is summed with the
    text one; `gated` adds LTX-2's per-head output gate `2 * sigmoid(to_gate_logits(x))`.
    Call options: `mask` (boolean, broadcastable to [B, H, Tq, Tk]), `rope` for q (and k unless
    `key_rope` is given: LTX-2's audio<->video attention), `perturb` [B, 1, 1, 1] in [0, 1]
    (LTX-2's spatio-temporal guidance: output = v + perturb * (attention - v), self-attention only).
    `interleaved_rope=False` selects LTX-2's "split" RoPE pairing (see `apply_rope`).
    """

    heads: int
    head_dim: int
    qk_norm: str | None = None
    eps: float = 1e-6
    use_bias: bool = True
    added_kv: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    out_bias: bool = True
    gated: bool = False
    interleaved_rope: bool = True

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
        context_img: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        key_rope: tuple[jax.Array, jax.Array] | None = None,
        perturb: jax.Array | None = None,
    ) -> jax.Array:
        if self.qk_norm not in (None, "rms_norm_across_heads"):
            raise ValueError(f"Attention: qk_norm {self.qk_norm!r} not in (None, 'rms_norm_across_heads')")
        inner = self.heads * self.head_dim

        def dense(name: str, bias: bool = self.use_bias) -> nn.Dense:
            return nn.Dense(inner, use_bias=bias, dtype=self.dtype, name=name)

        def qk_norm(y: jax.Array, name: str) -> jax.Array:
            return RMSNorm(self.eps, name=name)(y) if self.qk_norm else y

        src = x if context is None else context
        if self._prologue_fits(context, rope, key_rope):
            # The norm and RoPE go to attention as a prologue (the quantized path fuses them into
            # its operand kernel; every other path applies them first: the same bits as below).
            q, k = split_heads(dense("to_q")(x), self.heads), split_heads(dense("to_k")(src), self.heads)
            v = split_heads(dense("to_v")(src), self.heads)
            norm = None
            if self.qk_norm:
                norm = tuple(RMSNorm(self.eps, name=n).weight(q.shape[2] * q.shape[3]) for n in ("norm_q", "norm_k"))
            out = attention(
                q, k, v, mask, implementation=self.attention_impl, prologue=QKPrologue(norm, self.eps, rope)
            )
        else:
            q = split_heads(qk_norm(dense("to_q")(x), "norm_q"), self.heads)
            k = split_heads(qk_norm(dense("to_k")(src), "norm_k"), self.heads)
            v = split_heads(dense("to_v")(src), self.heads)
            if rope is not None:
                q = apply_rope(q, *rope, interleaved=self.interleaved_rope)
                k = apply_rope(k, *(rope if key_rope is None else key_rope), interleaved=self.interleaved_rope)
            out = attention(q, k, v, mask, implementation=self.attention_impl)
        if perturb is not None:
            out = (v + perturb * (out - v)).astype(out.dtype)
        if self.added_kv:
            if context_img is None:
                raise ValueError("Attention with added_kv needs context_img (the image embedding)")
            k_img = split_heads(qk_norm(dense("add_k_proj")(context_img), "norm_added_k"), self.heads)
            v_img = split_heads(dense("add_v_proj")(context_img), self.heads)
            out = out + attention(q, k_img, v_img, implementation=self.attention_impl)
        if self.gated:
            gates = 2.0 * nn.sigmoid(nn.Dense(self.heads, dtype=self.dtype, name="to_gate_logits")(x))
            out = out * gates[..., None].astype(out.dtype)
        return nn.Dense(x.shape[-1], use_bias=self.out_bias, dtype=self.dtype, name="to_out_0")(merge_heads(out))

    def _prologue_fits(
        self,
        context: jax.Array | None,
        rope: tuple[jax.Array, jax.Array] | None,
        key_rope: tuple[jax.Array, jax.Array] | None,
    ) -> bool:
        """Whether a `QKPrologue` states this call's Q/K preparation exactly: self-attention
        (q and k of the same tokens, used by this one attention call), the norm across heads or
        none, interleaved RoPE with [T, D] tables (or none), and something to apply."""
        if context is not None or self.added_kv or key_rope is not None:
            return False
        if rope is not None and (not self.interleaved_rope or rope[0].ndim != 2 or rope[0].shape != rope[1].shape):
            return False
        return bool(self.qk_norm) or rope is not None


JOINT_OUTPUTS = ("split", "x_only", "shared", "none")


class JointAttention(nn.Module):
    """Joint attention: video/image tokens `x` and text tokens `context` in one softmax (MM-DiT).

    Covers Flux's and HunyuanVideo's double- and single-stream attention, CogVideoX's expert
    attention and Mochi's asymmetric attention (text width != video width):

    - `shared_qkv=False`: context gets its own add_{q,k,v}_proj (and norm_added_{q,k});
      `shared_qkv=True`: one to_{q,k,v} projects both (single-stream, CogVideoX).
    - `qk_norm`: per-head "rms_norm" or "layer_norm" (affine), or None.
    - `context_first`: softmax token order [context, x] (Flux, CogVideoX) instead of [x, context].
    - `output`: "split" = to_out_0 on x and to_add_out on context (back to the context width);
      "x_only" = to_out_0 on x, context output dropped (Mochi's last block, context_pre_only);
      "shared" = one to_out_0 over all tokens (CogVideoX); "none" = raw attention (single-stream).
    - `rope` rotates x's q/k, `context_rope` the context's (None = not rotated).
    - `context_mask` [B, L] (True = real token) hides padded text keys. With
      `compact_masked_context` (Mochi) the text outputs are left-aligned per sample and zeroed
      after the valid count, as diffusers' per-sample gather does.

    Returns (x_out, context_out) when `context` is given (context_out None for "x_only"), else x_out.
    """

    heads: int
    head_dim: int
    qk_norm: str | None = "rms_norm"
    eps: float = 1e-6
    use_bias: bool = True
    added_bias: bool = True
    out_bias: bool = True
    shared_qkv: bool = False
    context_first: bool = False
    output: str = "split"
    compact_masked_context: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
        context_rope: tuple[jax.Array, jax.Array] | None = None,
        context_mask: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array | None]:
        if self.qk_norm not in (None, "rms_norm", "layer_norm"):
            raise ValueError(f"JointAttention: qk_norm {self.qk_norm!r} not in (None, 'rms_norm', 'layer_norm')")
        if self.output not in JOINT_OUTPUTS:
            raise ValueError(f"JointAttention: output {self.output!r} not in {JOINT_OUTPUTS}")
        inner = self.heads * self.head_dim

        def project(h: jax.Array, names: tuple[str, str, str], norms: tuple[str, str], bias: bool) -> list[jax.Array]:
            q, k, v = (
                split_heads(nn.Dense(inner, use_bias=bias, dtype=self.dtype, name=n)(h), self.heads) for n in names
            )
            if self.qk_norm == "rms_norm":
                q, k = RMSNorm(self.eps, name=norms[0])(q), RMSNorm(self.eps, name=norms[1])(k)
            elif self.qk_norm == "layer_norm":
                q = LayerNorm(self.eps, affine=True, name=norms[0])(q)
                k = LayerNorm(self.eps, affine=True, name=norms[1])(k)
            return [q, k, v]

        def rotate(qkv: list[jax.Array], tables: tuple[jax.Array, jax.Array] | None) -> list[jax.Array]:
            return qkv if tables is None else [apply_rope(qkv[0], *tables), apply_rope(qkv[1], *tables), qkv[2]]

        own = ("to_q", "to_k", "to_v"), ("norm_q", "norm_k")
        if context is None:
            q, k, v = rotate(project(x, *own, self.use_bias), rope)
            out = merge_heads(attention(q, k, v, implementation=self.attention_impl))
            if self.output == "none":
                return out
            return nn.Dense(x.shape[-1], use_bias=self.out_bias, dtype=self.dtype, name="to_out_0")(out)

        if self.shared_qkv:
            n_ctx = context.shape[1]
            joint = jnp.concatenate([context, x] if self.context_first else [x, context], axis=1)
            qkv = project(joint, *own, self.use_bias)
            ctx = [a[:, :n_ctx] if self.context_first else a[:, -n_ctx:] for a in qkv]
            xs = [a[:, n_ctx:] if self.context_first else a[:, :-n_ctx] for a in qkv]
        else:
            xs = project(x, *own, self.use_bias)
            added = ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k")
            ctx = project(context, *added, self.added_bias)
        xs, ctx = rotate(xs, rope), rotate(ctx, context_rope)
        q, k, v = (jnp.concatenate([c, s] if self.context_first else [s, c], axis=1) for s, c in zip(xs, ctx))
        mask = None
        if context_mask is not None:
            x_keys = jnp.ones((x.shape[0], x.shape[1]), bool)
            keys = [context_mask.astype(bool), x_keys] if self.context_first else [x_keys, context_mask.astype(bool)]
            mask = key_mask(jnp.concatenate(keys, axis=1))
        out = merge_heads(attention(q, k, v, mask, implementation=self.attention_impl))

        n_ctx = context.shape[1]
        if self.output == "shared":
            out = nn.Dense(x.shape[-1], use_bias=self.out_bias, dtype=self.dtype, name="to_out_0")(out)
        x_out, ctx_out = (out[:, n_ctx:], out[:, :n_ctx]) if self.context_first else (out[:, :-n_ctx], out[:, -n_ctx:])
        if self.output in ("shared", "none"):
            return x_out, ctx_out
        if self.compact_masked_context and context_mask is not None:
            ctx_out = compact_tokens(ctx_out, context_mask)
        x_out = nn.Dense(x.shape[-1], use_bias=self.out_bias, dtype=self.dtype, name="to_out_0")(x_out)
        if self.output == "x_only":
            return x_out, None
        return x_out, nn.Dense(context.shape[-1], use_bias=self.out_bias, dtype=self.dtype, name="to_add_out")(ctx_out)


def compact_tokens(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Per sample, move the tokens where mask [B, T] is True to the front (keeping order) and zero
    the rest: what gathering the valid tokens and zero-padding back to T gives."""
    mask = mask.astype(bool)
    order = jnp.argsort(~mask, axis=1, stable=True)
    gathered = jnp.take_along_axis(x, order[..., None], axis=1)
    keep = jnp.arange(x.shape[1])[None, :] < mask.sum(axis=1, keepdims=True)
    return jnp.where(keep[..., None], gathered, jnp.zeros_like(gathered))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation x * (1 + scale) + shift, with shift/scale [B, D] broadcast over tokens."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class AdaLayerNorm(nn.Module):
    """adaLN: `linear(silu(emb))` split into `num_chunks` vectors; the first two modulate LayerNorm(x).

    Covers diffusers' AdaLayerNormZero (6 chunks: shift, scale, gate, shift_mlp, scale_mlp, gate_mlp),
    AdaLayerNormZeroSingle (3), AdaLayerNormContinuous (2, `scale_first=True`) and CogVideoX's
    AdaLayerNorm(chunk_dim=1) (2, `affine=True`: the LayerNorm `norm` has scale and bias). With
    `num_embeddings` set it owns DiT's timestep+class embedder `emb`, as AdaLayerNormZero does.
    Returns (modulated x, remaining chunks, conditioning embedding).
    """

    num_chunks: int
    eps: float = 1e-6
    scale_first: bool = False
    num_embeddings: int | None = None
    dtype: Any = jnp.float32
    affine: bool = False

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
        return modulate(LayerNorm(self.eps, self.affine, name="norm")(x), shift, scale), chunks[2:], emb


class TimestepEmbedder(nn.Module):
    """diffusers' `Timesteps(256, flip_sin_to_cos=True, shift=0)` + `TimestepEmbedding` under the name
    `timestep_embedder` (PixArt's `CombinedTimestepSizeEmbeddings` without size conditions)."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array) -> jax.Array:
        t = timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=0).astype(self.dtype)
        return EmbedMLP(self.dim, "silu", self.dtype, name="timestep_embedder")(t)


class AdaLayerNormSingle(nn.Module):
    """PixArt's adaLN-single (LTX-Video, LTX-2): timestep [N] -> `emb` (TimestepEmbedder) -> embedded
    [N, dim]; `linear(silu(embedded))` gives the [N, num_params * dim] modulation.
    Returns (modulation, embedded)."""

    dim: int
    num_params: int = 6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array) -> tuple[jax.Array, jax.Array]:
        embedded = TimestepEmbedder(self.dim, self.dtype, name="emb")(timestep)
        return nn.Dense(self.num_params * self.dim, dtype=self.dtype, name="linear")(nn.silu(embedded)), embedded


Rope = tuple[jax.Array, jax.Array]


def clip_fp16(x: jax.Array) -> jax.Array:
    """diffusers (Flux) clips the residual stream to the float16 range when running in float16."""
    return jnp.clip(x, -65504, 65504) if x.dtype == jnp.float16 else x


Attend = Callable[..., tuple[jax.Array, jax.Array]]  # a stream block's `attend(norm_x, norm_c, **options)`


class _StreamBlock(nn.Module):
    """Fields and call shared by the double- and single-stream blocks: attention heads and head
    width, the MLP width, softmax token order ([text, image] when `context_first`), Flux's fp16
    clipping. Subclasses implement `forward`."""

    heads: int
    head_dim: int
    mlp_dim: int
    context_first: bool = False
    clip_fp16: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        temb: jax.Array,
        rope: Rope | None = None,
        context_rope: Rope | None = None,
        context_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """(x, context) after the block; one signature for both kinds, so a port stacks either."""

        def attend(norm_x: jax.Array, norm_c: jax.Array, **options: Any) -> tuple[jax.Array, jax.Array]:
            """The block's joint attention `attn` over (x, context) with the rope tables and mask."""
            attn = JointAttention(
                self.heads,
                self.head_dim,
                context_first=self.context_first,
                dtype=self.dtype,
                attention_impl=self.attention_impl,
                name="attn",
                **options,
            )
            return attn(norm_x, norm_c, rope, context_rope, context_mask)

        return self.forward(x, context, temb, attend)

    def forward(self, x: jax.Array, context: jax.Array, temb: jax.Array, attend: Attend) -> tuple[jax.Array, jax.Array]:
        """The block's own math; `attend(norm_x, norm_c, **JointAttention options)` runs `attn`.
        Each concrete block (DoubleStreamBlock, SingleStreamBlock) defines it."""
        raise TypeError(f"{type(self).__name__} is a _StreamBlock without its own forward()")


class DoubleStreamBlock(_StreamBlock):
    """MM-DiT double-stream block (Flux, HunyuanVideo): separate adaLN-Zero (`norm1`,
    `norm1_context`), FFNs (`ff`, `ff_context`) and q/k/v weights for image/video and text, one
    joint attention `attn`. `context_first` is the softmax token order ([text, image] in Flux).
    Returns (x, context)."""

    def forward(self, x: jax.Array, context: jax.Array, temb: jax.Array, attend: Attend) -> tuple[jax.Array, jax.Array]:
        dim = x.shape[-1]
        norm_x, (gate_msa, shift_mlp, scale_mlp, gate_mlp), _ = AdaLayerNorm(6, dtype=self.dtype, name="norm1")(x, temb)
        norm_c, (c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp), _ = AdaLayerNorm(
            6, dtype=self.dtype, name="norm1_context"
        )(context, temb)
        attn_x, attn_c = attend(norm_x, norm_c)

        x = x + gate_msa[:, None] * attn_x
        h = NormModulate(1e-6, upcast=False, name="norm2")(x, shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None] * FeedForward(self.mlp_dim, dim, "gelu-approximate", self.dtype, name="ff")(h)

        context = context + c_gate_msa[:, None] * attn_c
        h = NormModulate(1e-6, upcast=False, name="norm2_context")(context, c_shift_mlp, c_scale_mlp)
        ff_c = FeedForward(self.mlp_dim, dim, "gelu-approximate", self.dtype, name="ff_context")(h)
        context = context + c_gate_mlp[:, None] * ff_c
        return x, (clip_fp16(context) if self.clip_fp16 else context)


class SingleStreamBlock(_StreamBlock):
    """Single-stream block (Flux, HunyuanVideo) over image/video and text tokens with shared weights:
    adaLN (`norm`, 3 chunks), attention and a GELU MLP (`proj_mlp`) in parallel, one fused
    `proj_out`. Returns (x, context)."""

    def forward(self, x: jax.Array, context: jax.Array, temb: jax.Array, attend: Attend) -> tuple[jax.Array, jax.Array]:
        dim = x.shape[-1]
        n_ctx = context.shape[1]
        h = jnp.concatenate([context, x] if self.context_first else [x, context], axis=1)
        norm_h, (gate,), _ = AdaLayerNorm(3, dtype=self.dtype, name="norm")(h, temb)
        mlp = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="proj_mlp")(norm_h), approximate=True)
        norm_c, norm_x = (
            (norm_h[:, :n_ctx], norm_h[:, n_ctx:]) if self.context_first else (norm_h[:, -n_ctx:], norm_h[:, :-n_ctx])
        )
        attn_x, attn_c = attend(norm_x, norm_c, shared_qkv=True, output="none")
        attn_out = jnp.concatenate([attn_c, attn_x] if self.context_first else [attn_x, attn_c], axis=1)
        out = nn.Dense(dim, dtype=self.dtype, name="proj_out")(jnp.concatenate([attn_out, mlp], axis=-1))
        h = h + gate[:, None] * out
        if self.clip_fp16:
            h = clip_fp16(h)
        return (h[:, n_ctx:], h[:, :n_ctx]) if self.context_first else (h[:, :-n_ctx], h[:, -n_ctx:])


def double_stream_keys(f: str, t: str) -> list[KeyEntry]:
    """Key map of a DoubleStreamBlock at Flax path `f` / diffusers prefix `t`."""
    entries = linear(f"{f}/norm1/linear", f"{t}.norm1.linear") + linear(
        f"{f}/norm1_context/linear", f"{t}.norm1_context.linear"
    )
    for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        entries += linear(f"{f}/attn/{proj}", f"{t}.attn.{proj}")
    entries += linear(f"{f}/attn/to_out_0", f"{t}.attn.to_out.0")
    for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        entries += norm(f"{f}/attn/{n}", f"{t}.attn.{n}", bias=False)
    return entries + feed_forward(f"{f}/ff", f"{t}.ff") + feed_forward(f"{f}/ff_context", f"{t}.ff_context")


def single_stream_keys(f: str, t: str) -> list[KeyEntry]:
    """Key map of a SingleStreamBlock at Flax path `f` / diffusers prefix `t`."""
    entries = linear(f"{f}/norm/linear", f"{t}.norm.linear")
    entries += linear(f"{f}/proj_mlp", f"{t}.proj_mlp") + linear(f"{f}/proj_out", f"{t}.proj_out")
    for proj in ("to_q", "to_k", "to_v"):
        entries += linear(f"{f}/attn/{proj}", f"{t}.attn.{proj}")
    for n in ("norm_q", "norm_k"):
        entries += norm(f"{f}/attn/{n}", f"{t}.attn.{n}", bias=False)
    return entries


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


class PatchEmbed(nn.Module):
    """Latents [B, C, *S] -> patch tokens via `patchify` and the Dense `proj` (a strided Conv in
    diffusers: HunyuanVideo's `x_embedder`, Mochi's per-frame `patch_embed`). Returns (tokens, grid)."""

    features: int
    patch: tuple[int, ...]
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
        tokens, grid = patchify(x, self.patch)
        return nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype, name="proj")(tokens), grid


def unpatchify(
    tokens: jax.Array, grid: Sequence[int], patch: Sequence[int], *, channel_major: bool = False
) -> jax.Array:
    """Tokens [B, prod(grid), prod(patch)*C] -> [B, C, *(grid*patch)]. Features are ordered
    (p_1..p_n, C) (Wan, Mochi, DiT) or, with `channel_major`, (C, p_1..p_n) (HunyuanVideo)."""
    b = tokens.shape[0]
    n = len(patch)
    if channel_major:
        x = tokens.reshape(b, *grid, -1, *patch)
        perm = (0, n + 1, *[d for i in range(n) for d in (1 + i, n + 2 + i)])
    else:
        x = tokens.reshape(b, *grid, *patch, -1)
        perm = (0, 2 * n + 1, *[d for i in range(n) for d in (1 + i, 1 + n + i)])
    return x.transpose(perm).reshape(b, -1, *[g * p for g, p in zip(grid, patch)])
