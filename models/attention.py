"""The one attention function every port calls, and rotary position embedding.

Layout everywhere is [batch, tokens, heads, head_dim]. Keeping a single entry point means
a quantized or fused attention kernel can be swapped in here without touching the ports.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS: tuple[str | None, ...] = (None, "xla", "cudnn")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    implementation: str | None = None,
) -> jax.Array:
    """Scaled dot-product attention, softmax(q k^T / sqrt(d)) v.

    q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; mask: boolean, broadcastable to [B, H, Tq, Tk]
    (True = attend). `implementation` is passed to `jax.nn.dot_product_attention`:
    None (JAX's default choice, XLA as of JAX 0.10/0.11), "xla" or "cudnn" (GPU, bf16/fp16).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention: implementation={implementation!r}, expected one of {IMPLEMENTATIONS}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: expected [B, T, H, D] inputs, got q{q.shape} k{k.shape} v{v.shape}")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) of x [B, T, H, D] by angles with
    cos/sin tables [T, D] (each angle repeated twice, as diffusers' `repeat_interleave_real`).

    Computed in float32 and cast back to x's dtype, like diffusers' `apply_rotary_emb`.
    Wan's and Flux's rotations are the same formula; only their tables differ.
    """
    if cos.shape != sin.shape or cos.shape != (x.shape[1], x.shape[3]):
        raise ValueError(f"apply_rope: tables {cos.shape}/{sin.shape} do not match x{x.shape} (want [T, D])")
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)
