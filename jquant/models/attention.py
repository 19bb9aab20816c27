"""The one attention function every port calls, and rotary position embedding.

Layout everywhere is [batch, tokens, heads, head_dim]. Keeping a single entry point means
a quantized or fused attention kernel can be swapped in here without touching the ports:
a library installs a hook for the duration of a ``with attention_hook(fn):`` block
(``jquant.attention.quantized_attention`` does), and the ports import nothing of it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

IMPLEMENTATIONS: tuple[str | None, ...] = (None, "xla", "cudnn")

#: ``hook(q, k, v, mask, implementation) -> output or None`` (None: not handled, fall through).
AttentionHook = Callable[[jax.Array, jax.Array, jax.Array, "jax.Array | None", "str | None"], "jax.Array | None"]
_HOOKS = threading.local()


def _hooks() -> list[AttentionHook]:
    if not hasattr(_HOOKS, "stack"):
        _HOOKS.stack = []
    return _HOOKS.stack


@contextlib.contextmanager
def attention_hook(hook: AttentionHook) -> Iterator[None]:
    """Offer every :func:`attention` call traced in this block (this thread) to ``hook`` first;
    the innermost hook that returns an array wins."""
    _hooks().append(hook)
    try:
        yield
    finally:
        _hooks().remove(hook)


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
    for hook in reversed(_hooks()):  # e.g. jquant's quantized attention (docs/attention.md)
        out = hook(q, k, v, mask, implementation)
        if out is not None:
            return out
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleaved: bool = True) -> jax.Array:
    """Rotate channel pairs of x [B, T, H, D] by angles given as cos/sin tables.

    Tables are [T, D] (shared by all heads), [T, H, D] (per head: Mochi, LTX's inner-dim RoPE)
    or [B, T, H, D] (per sample: LTX/LTX-2 coordinates given at run time), each angle repeated
    over its pair. `interleaved=True` pairs (x[2i], x[2i+1]) as diffusers'
    `repeat_interleave_real` (Wan, Flux, HunyuanVideo, CogVideoX, LTX); `interleaved=False`
    pairs (x[i], x[i + D/2]) as LTX-2's "split" RoPE, with tables [..., D] = [cos, cos].

    Computed in float32 and cast back to x's dtype, like diffusers' `apply_rotary_emb`.
    """
    if cos.shape != sin.shape:
        raise ValueError(f"apply_rope: cos {cos.shape} and sin {sin.shape} differ")
    b, t, h, d = x.shape
    if cos.ndim == 2 and cos.shape == (t, d):
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    elif cos.ndim == 3 and cos.shape == (t, h, d):
        cos, sin = cos[None], sin[None]
    elif not (cos.ndim == 4 and cos.shape[1:] == (t, h, d) and cos.shape[0] in (1, b)):
        raise ValueError(
            f"apply_rope: tables {cos.shape} do not match x{x.shape} (want [T, D], [T, H, D] or [B, T, H, D])"
        )
    xf = x.astype(jnp.float32)
    if interleaved:
        # (-x[2i+1], x[2i]) as a reversal within each pair and a sign: an elementwise op XLA fuses
        # with its producer (the Q/K norm); a stack is a concatenate, a pass of its own on the GPU.
        pairs = xf.reshape(*x.shape[:-1], -1, 2)
        rotated = (jnp.flip(pairs, axis=-1) * jnp.array([-1.0, 1.0], jnp.float32)).reshape(x.shape)
    else:
        first, second = jnp.split(xf, 2, axis=-1)
        rotated = jnp.concatenate([-second, first], axis=-1)
    out = xf * cos + rotated * sin
    return out.astype(x.dtype)
