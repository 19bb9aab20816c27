"""cuDNN's FP8 flash attention with per-tensor scales: the fastest public baseline on Hopper.

JAX exposes it only through a private module (``jax._src.cudnn.fused_attention_stablehlo``,
function ``_dot_product_attention_fp8``; ``../shared/notes/cudnn_fp8_attention.md`` says how it
was found). This wrapper is the one place that touches that API, and
:func:`unavailable_reason` says in words why it cannot run, so a benchmark row can record the
reason instead of crashing when a JAX release moves it. The numerics it implements are emulated
in plain JAX by :func:`pallas_kernels.attention_ref.per_tensor_fp8_attention`.
"""

from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp

from pallas_kernels import attention_ref as ref

PRIVATE_MODULE = "jax._src.cudnn.fused_attention_stablehlo"
_FUNCTION = "_dot_product_attention_fp8"


def _module():
    return importlib.import_module(PRIVATE_MODULE)


def unavailable_reason() -> str | None:
    """None where cuDNN's FP8 attention can run here; otherwise why not (no GPU, API moved)."""
    if jax.default_backend() != "gpu":
        return f"no GPU (backend {jax.default_backend()!r})"
    try:
        mod = _module()
    except ImportError as e:
        return f"{PRIVATE_MODULE} does not import: {e}"
    missing = [
        name
        for name in (_FUNCTION, "fp8_params_keys", "AttentionLayout", "check_cudnn_version")
        if not hasattr(mod, name)
    ]
    if missing:
        return f"{PRIVATE_MODULE} lacks {missing} in JAX {jax.__version__}"
    return None


def quantize(q: jax.Array, k: jax.Array, v: jax.Array, scales: str = "amax") -> tuple[tuple[jax.Array, ...], dict]:
    """e4m3 codes of Q, K, V with one scale each, and the scale dict (see ``per_tensor_fp8_scales``)."""
    s = ref.per_tensor_fp8_scales(q, k, v, scales)
    codes = tuple(
        ref.encode(x.astype(jnp.float32), s[f"descale_{name}"], "fp8_e4m3") for name, x in zip("qkv", (q, k, v))
    )
    return codes, s


def cudnn_fp8_attention(
    q8: jax.Array, k8: jax.Array, v8: jax.Array, scales: dict, *, sm_scale: float | None = None
) -> jax.Array:
    """cuDNN's FP8 forward on e4m3 codes [B, T, H, D] (non-causal); e4m3 output codes [B, Tq, H, D].

    ``scales`` from :func:`quantize`; the output's value is ``codes * scales["descale_o"]``.
    Raises RuntimeError with :func:`unavailable_reason`'s words where it cannot run.
    """
    why = unavailable_reason()
    if why is not None:
        raise RuntimeError(f"cuDNN FP8 attention unavailable: {why}")
    mod = _module()
    one = lambda x: jnp.reshape(jnp.asarray(x, jnp.float32), (1, 1, 1, 1))  # noqa: E731
    params = {name: one(1.0) for name in mod.fp8_params_keys}
    params.update(
        descale_q=one(scales["descale_q"]),
        descale_k=one(scales["descale_k"]),
        descale_v=one(scales["descale_v"]),
        descale_s=one(1.0 / scales["scale_s"]),
        scale_s=one(scales["scale_s"]),
        scale_o=one(1.0 / scales["descale_o"]),
    )
    scale = 1.0 / math.sqrt(q8.shape[-1]) if sm_scale is None else float(sm_scale)
    outputs = getattr(mod, _FUNCTION)(
        query=q8,
        key=k8,
        value=v8,
        fp8_params=params,
        scale=scale,
        use_causal_mask=False,
        layout=mod.AttentionLayout.BTNH.value,
        cudnn_version=mod.check_cudnn_version(),
    )
    return outputs[0]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, sm_scale: float | None = None) -> jax.Array:
    """cuDNN's FP8 forward on float Q, K, V [B, T, H, D]: per-tensor amax scales taken here (one
    reduction over each tensor, part of the cost a per-tensor FP8 user pays), e4m3 codes, the
    e4m3 output decoded back to ``q.dtype``. What a model's attention call becomes with it."""
    codes, scales = quantize(q, k, v)
    out = cudnn_fp8_attention(*codes, scales, sm_scale=sm_scale)
    return (out.astype(jnp.float32) * scales["descale_o"]).astype(q.dtype)
