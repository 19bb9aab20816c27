"""The one attention function every port calls, rotary position embedding, and the Q/K prologue.

Layout everywhere is [batch, tokens, heads, head_dim]. Keeping a single entry point means
a quantized or fused attention kernel can be swapped in here without touching the ports:
a library installs a hook for the duration of a ``with attention_hook(fn):`` block
(``jquant.attention.quantized_attention`` does), and the ports import nothing of it.

A port may hand :func:`attention` the raw Q/K projections with a :class:`QKPrologue` (the Q/K
RMSNorm and RoPE still to apply) instead of the prepared q and k: a hook installed with
``takes_prologue=True`` receives it and may fuse it into its own pass over Q and K (the quantized
attention's operand kernel does); every other hook, and the float path, get ``prologue.apply``'s
q and k, so their results are the same as when the port applied it itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

IMPLEMENTATIONS: tuple[str | None, ...] = (None, "xla", "cudnn")
QK_ROLES: tuple[str, ...] = ("q", "k")

#: ``hook(q, k, v, mask, implementation) -> output or None`` (None: not handled, fall through).
#: Installed with ``takes_prologue=True`` it is called with a keyword ``prologue=`` as well
#: (a :class:`QKPrologue` or None), and q and k are then the raw projections when it is given.
AttentionHook = Callable[..., "jax.Array | None"]
_HOOKS = threading.local()


def _hooks() -> list[tuple[AttentionHook, bool]]:
    if not hasattr(_HOOKS, "stack"):
        _HOOKS.stack = []
    return _HOOKS.stack


@contextlib.contextmanager
def attention_hook(hook: AttentionHook, *, takes_prologue: bool = False) -> Iterator[None]:
    """Offer every :func:`attention` call traced in this block (this thread) to ``hook`` first;
    the innermost hook that returns an array wins.

    ``takes_prologue``: ``hook`` accepts ``prologue=`` and applies a given :class:`QKPrologue` to
    its raw q and k itself; otherwise it sees q and k with the prologue already applied.
    """
    entry = (hook, takes_prologue)
    _hooks().append(entry)
    try:
        yield
    finally:
        _hooks().remove(entry)


def inverse_rms(x: jax.Array, eps: float) -> jax.Array:
    """``rsqrt(mean(x^2) + eps)`` over the last axis in float32, keeping it as size 1: RMSNorm's
    per-row factor (:func:`rms_norm`'s, and the quantized operand kernel's norm input)."""
    xf = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm over the last axis in float32, times ``scale`` if given, cast back to x's dtype:
    the one arithmetic of ``blocks.RMSNorm`` and :class:`QKPrologue` (so both give the same bits)."""
    y = x.astype(jnp.float32) * inverse_rms(x, eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class QKPrologue:
    """What a self-attention layer still does to its raw Q/K projections [B, T, H, D] before
    attention: RMSNorm of each token across all heads (over H*D, ``blocks.RMSNorm``'s arithmetic;
    Wan's and LTX's ``rms_norm_across_heads``), then the interleaved RoPE (:func:`apply_rope`).

    ``norm``: the learned norm weights (q's, k's), each [H*D], or None for no norm; ``eps``: the
    norm's epsilon; ``rope``: the (cos, sin) tables [T, D] shared by all heads, or None.

    Why: applied by :func:`attention`'s caller, the norm and the RoPE are separate passes over Q
    and K (a reduction and two elementwise fusions per tensor on the GPU); handed over as a
    prologue, a hook can fold them into its own single read of Q and K.
    """

    norm: tuple[jax.Array, jax.Array] | None = None
    eps: float = 1e-6
    rope: tuple[jax.Array, jax.Array] | None = None

    def __post_init__(self) -> None:
        if self.norm is not None:
            if len(self.norm) != 2 or any(w.ndim != 1 for w in self.norm) or self.norm[0].shape != self.norm[1].shape:
                shapes = [getattr(w, "shape", None) for w in self.norm]
                raise ValueError(f"QKPrologue: norm must be (q weight, k weight), each [H*D], got shapes {shapes}")
        if self.rope is not None:
            if len(self.rope) != 2 or any(t.ndim != 2 for t in self.rope) or self.rope[0].shape != self.rope[1].shape:
                shapes = [getattr(t, "shape", None) for t in self.rope]
                raise ValueError(f"QKPrologue: rope must be (cos, sin), each [T, D], got shapes {shapes}")
            if self.rope[0].shape[1] % 2:
                raise ValueError(f"QKPrologue: rope tables {self.rope[0].shape} need an even head_dim (channel pairs)")

    def check(self, q: jax.Array, k: jax.Array) -> None:
        """Raises ValueError unless q and k [B, T, H, D] fit the weights and tables."""
        if q.ndim != 4 or k.ndim != 4 or q.shape[2:] != k.shape[2:]:
            raise ValueError(f"QKPrologue: q and k must be [B, T, H, D] with the same H, D, got q{q.shape} k{k.shape}")
        width = q.shape[2] * q.shape[3]
        if self.norm is not None and self.norm[0].shape != (width,):
            raise ValueError(
                f"QKPrologue: norm weights {self.norm[0].shape} do not match q{q.shape} (want [H*D] = [{width}])"
            )
        if self.rope is not None:
            for name, x in (("q", q), ("k", k)):
                if self.rope[0].shape != (x.shape[1], x.shape[3]):
                    raise ValueError(
                        f"QKPrologue: rope tables {self.rope[0].shape} do not match {name}{x.shape} (want [T, D])"
                    )

    def apply_one(self, x: jax.Array, role: str) -> jax.Array:
        """The prologue of ``x`` [B, T, H, D] as q (``role="q"``) or k (``"k"``: k's norm weight)."""
        if role not in QK_ROLES:
            raise ValueError(f"QKPrologue: role must be one of {QK_ROLES}, got {role!r}")
        self.check(x, x)
        if self.norm is not None:
            weight = self.norm[QK_ROLES.index(role)]
            x = rms_norm(x.reshape(*x.shape[:2], -1), weight, self.eps).reshape(x.shape)
        if self.rope is not None:
            x = apply_rope(x, *self.rope, interleaved=True)
        return x

    def apply(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(q, k) as the layer would hand them to attention: normed across heads, then rotated."""
        self.check(q, k)
        return self.apply_one(q, "q"), self.apply_one(k, "k")

    def inverse_rms(self, x: jax.Array) -> jax.Array:
        """The norm's per-token factor of ``x`` [B, T, H, D] over its whole H*D row, [B, T] float32."""
        return inverse_rms(x.reshape(*x.shape[:2], -1), self.eps)[..., 0]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    implementation: str | None = None,
    prologue: QKPrologue | None = None,
) -> jax.Array:
    """Scaled dot-product attention, softmax(q k^T / sqrt(d)) v.

    q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; mask: boolean, broadcastable to [B, H, Tq, Tk]
    (True = attend). `implementation` is passed to `jax.nn.dot_product_attention`:
    None (JAX's default choice, XLA as of JAX 0.10/0.11), "xla" or "cudnn" (GPU, bf16/fp16).
    `prologue`: q and k are the raw projections and this is computed on
    ``prologue.apply(q, k)``; hooks installed with ``takes_prologue=True`` get it as it is.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention: implementation={implementation!r}, expected one of {IMPLEMENTATIONS}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: expected [B, T, H, D] inputs, got q{q.shape} k{k.shape} v{v.shape}")
    if prologue is not None:
        prologue.check(q, k)
    applied: tuple[jax.Array, jax.Array] | None = None  # prologue.apply(q, k), traced once when needed
    for hook, takes_prologue in reversed(_hooks()):  # e.g. jquant's quantized attention (docs/attention.md)
        if takes_prologue:
            out = hook(q, k, v, mask, implementation, prologue=prologue)
        else:
            if applied is None:
                applied = (q, k) if prologue is None else prologue.apply(q, k)
            out = hook(*applied, v, mask, implementation)
        if out is not None:
            return out
    if applied is None:
        applied = (q, k) if prologue is None else prologue.apply(q, k)
    return jax.nn.dot_product_attention(*applied, v, mask=mask, implementation=implementation)


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
