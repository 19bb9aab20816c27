"""The XLA side of the dispatch: activation quantization (dynamic per token or static scales),
the int8 / fp8 ``dot_general`` with scales in the epilogue, and the SVDQuant low-rank branch.

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


def quantize_activation(x: Array, act: QSpec, act_scale: Array | None) -> QArray:
    """Quantize activations [..., K]: dynamic per token, or with a static scale.

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


def add_lowrank(y: Array, x: Array, lowrank: tuple[Array, Array], contract: int = 1) -> Array:
    """``y + (x @ A) @ B`` in x's dtype (x's last ``contract`` axes flattened)."""
    a, b = lowrank
    xl = x.reshape(*x.shape[: x.ndim - contract], -1)
    return y + ((xl @ a.astype(x.dtype)) @ b.astype(x.dtype)).reshape(y.shape).astype(y.dtype)


def _float_dot(x: Array, w: Array, contract: int) -> Array:
    nd = x.ndim
    dims = ((tuple(range(nd - contract, nd)), tuple(range(contract))), ((), ()))
    return jax.lax.dot_general(x, w, dims)
