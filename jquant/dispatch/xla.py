"""The XLA side of the dispatch: activation quantization (dynamic per token, per token per N
channels, or static scales), the int8 / fp8 ``dot_general`` with scales in the epilogue, its
block-scaled form (:func:`block_scaled_dot`), and the SVDQuant low-rank branch.

:mod:`jquant.dispatch` decides; this module and :mod:`jquant.dispatch.kernels` execute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jquant.formats import QSpec
from jquant.qarray import QArray, decode_scale, quantize

Array = jax.Array
_INT8 = ("int8",)


_FP8 = ("fp8_e4m3", "fp8_e5m2")


def token_block(act: QSpec | None) -> int | None:
    """Channels per activation scale of a dynamic ``<fmt>/tokenN`` spec (N), else None."""
    if act is None or act.granularity != "token":
        return None
    return act.group_size


def is_per_token(act: QSpec | None) -> bool:
    """Whether ``act`` is dynamic with one scale per token (``<fmt>/token``)."""
    return act is not None and act.granularity == "token" and token_block(act) is None


def quantize_activation(x: Array, act: QSpec, act_scale: Array | None) -> QArray:
    """Quantize activations [..., K]: dynamic per token (per token per N channels for
    ``<fmt>/tokenN``), or with a static scale.

    A static ``act_scale`` is either one scale (any size-1 array: per tensor) or a per-token
    scale array broadcastable to ``x.shape[:-1] + (1,)`` (e.g. ``[B, 1, 1]``: one scale per
    CFG branch row; ``[B, L, 1]``: one per token, as per-frame video tables expand to).
    """
    if act_scale is not None:
        s = jnp.asarray(act_scale, jnp.float32)
        if s.size == 1:
            spec = act if act.granularity == "tensor" else QSpec(act.fmt, "tensor", symmetric=act.symmetric, axis=-1)
            return quantize(x, spec, scale=s.reshape((1,) * x.ndim), check_finite=False)
        want = x.shape[:-1] + (1,)
        if s.ndim > x.ndim or not all(a in (1, b) for a, b in zip(s.shape[::-1], want[::-1])):
            raise ValueError(
                f"static activation scale of shape {s.shape} does not broadcast to the per-token shape {want}"
            )
        spec = QSpec(act.fmt, "token", symmetric=act.symmetric, axis=-1)
        return quantize(x, spec, scale=jnp.broadcast_to(s, want), check_finite=False)
    if act.granularity != "token":
        act = QSpec(act.fmt, "token", symmetric=act.symmetric, axis=-1, scale_dtype=act.scale_dtype)
    return quantize(x, act, check_finite=False)


def _weight_scale_row(w: QArray) -> Array | None:
    """Per-output-channel scale [N] if ``w`` (2-D, (K, N)) has no scale variation along K."""
    if w.ndim != 2 or w.zero_point is not None or w.scale.shape[0] != 1 or w.spec.scaling:
        return None
    return decode_scale(w)[0]


def _int_path_ok(xq_fmt: str, w: QArray) -> bool:
    same = (xq_fmt in _INT8 and w.spec.fmt in _INT8) or (xq_fmt in _FP8 and w.spec.fmt in _FP8)
    return same and _weight_scale_row(w) is not None


def _weight_k_scales(w: QArray, block: int) -> Array | None:
    """Weight scales expanded to ``[K / block, N]`` when they are constant within each ``block``
    rows of K (per channel, groups or 2-D blocks of a multiple of ``block`` along K), else None."""
    if w.ndim != 2 or w.zero_point is not None or w.spec.scaling or w.scale is None:
        return None
    k, n = w.shape
    s = decode_scale(w)  # [K / bk, N / bn]
    bk, bn = k // s.shape[0], n // s.shape[1]
    if k % block or bk % block:
        return None
    return jnp.repeat(jnp.repeat(s, bk // block, axis=0), bn, axis=1)


def block_scaled_dot(x_q: Array, x_scale: Array, w_q: Array, w_scale: Array, block: int = 128) -> Array:
    """``y[m, n] = sum_b (sum_{k in b} x_q[m, k] w_q[k, n]) * x_scale[m, b] * w_scale[b, n]`` in f32.

    What a block-scaled GEMM computes: ``x_q`` ``[M, K]`` codes with one scale per token per
    ``block`` channels (``x_scale`` ``[M, K / block]``), ``w_q`` ``[K, N]`` codes with scales
    ``w_scale`` ``[K / block, N]``. Each K block's partial product is exact (int8 codes: as bf16
    with f32 accumulation, exact because the codes are integers below 2^8 and a 128-wide block's
    sum stays below 2^22; fp8: in f32), is scaled in f32 and added to the running f32 sum.
    """
    m, k = x_q.shape
    n = w_q.shape[1]
    if k % block or x_scale.shape != (m, k // block) or w_q.shape[0] != k or w_scale.shape != (k // block, n):
        raise ValueError(
            f"block_scaled_dot: x_q {x_q.shape}, x_scale {x_scale.shape}, w_q {w_q.shape}, w_scale "
            f"{w_scale.shape} do not describe [M, K] x [K, N] with {block}-wide K blocks"
        )
    if x_q.dtype == jnp.int8:  # float GEMMs, as for fp8, instead of an int8 batched dot
        x_q, w_q = x_q.astype(jnp.bfloat16), w_q.astype(jnp.bfloat16)
    kb = k // block
    part = jax.lax.dot_general(  # [KB, M, N]: one partial product per K block
        x_q.reshape(m, kb, block),
        w_q.reshape(kb, block, n),
        (((2,), (1,)), ((1,), (0,))),
        preferred_element_type=jnp.float32,
    )
    scaled = part * x_scale.astype(jnp.float32).T[:, :, None] * w_scale[:, None, :]
    return jnp.sum(scaled, axis=0)


def block_scaled_linear(xq: QArray, w: QArray) -> Array | None:
    """f32 ``x @ w`` for ``<fmt>/tokenN`` activations ``xq`` [..., K] through :func:`block_scaled_dot`,
    or None where the formats differ (int8 with int8, fp8 with fp8) or ``w``'s scales vary
    within N rows of K."""
    g = token_block(xq.spec)
    same = (xq.spec.fmt in _INT8 and w.spec.fmt in _INT8) or (xq.spec.fmt in _FP8 and w.spec.fmt in _FP8)
    ws = _weight_k_scales(w, g) if g and same else None
    if ws is None:
        return None
    k = xq.shape[-1]
    lead = xq.shape[:-1]
    xs = decode_scale(xq).reshape(-1, k // g)
    y = block_scaled_dot(xq.qvalue.reshape(-1, k), xs, w.qvalue, ws, g)
    return y.reshape(*lead, w.shape[1])


def add_lowrank(y: Array, x: Array, lowrank: tuple[Array, Array], contract: int = 1) -> Array:
    """``y + (x @ A) @ B`` in x's dtype (x's last ``contract`` axes flattened)."""
    a, b = lowrank
    xl = x.reshape(*x.shape[: x.ndim - contract], -1)
    return y + ((xl @ a.astype(x.dtype)) @ b.astype(x.dtype)).reshape(y.shape).astype(y.dtype)


def _float_dot(x: Array, w: Array, contract: int) -> Array:
    nd = x.ndim
    dims = ((tuple(range(nd - contract, nd)), tuple(range(contract))), ((), ()))
    return jax.lax.dot_general(x, w, dims)
