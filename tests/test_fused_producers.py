"""The fused producers' plain-JAX references (pallas_kernels.fused_producers, issue 19): their
dequantized outputs against the unfused path (the model's norm, modulation and activation in
float, rounded to the model dtype, then jquant's ``<fmt>/token128`` quantizer)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jquant import dispatch
from jquant.models.blocks import LayerNorm, RMSNorm, modulate
from jquant.models.embeddings import ACTIVATIONS
from jquant.qarray import decode_scale, dequantize, quantize
from pallas_kernels import fused_producers as fp

SPEC = {"int8": "int8/token128", "fp8": "fp8_e4m3/token128"}


def one_step(values: np.ndarray, scales: np.ndarray, fmt: str) -> np.ndarray:
    """The format's rounding step at each dequantized value (scales per 128 channels)."""
    s = np.repeat(scales, 128, axis=-1).astype(np.float64)
    if fmt == "int8":
        return s
    q = np.abs(values / s)  # the code's magnitude
    e = np.floor(np.log2(np.maximum(q, 2.0**-6)))  # e4m3: 3 mantissa bits, subnormal below 2^-6
    return s * 2.0 ** (e - 3)


def assert_within_one_step(codes, scales, unfused_q, fmt, exact, rounded):
    """Every fused value is within one rounding step of the format (the larger of the two paths')
    of the unfused one, plus the unfused path's rounding to the model dtype (``rounded`` is what
    it quantized, ``exact`` the float32 values the fused producer quantized): each path is within
    half a step of what it quantized."""
    a = np.asarray(fp.dequantize_blocks(codes, scales), np.float64)
    b = np.asarray(dequantize(unfused_q, jnp.float32), np.float64)
    sb = np.asarray(decode_scale(unfused_q))
    dtype_rounding = np.abs(np.asarray(exact, np.float64) - np.asarray(rounded, np.float64))
    tol = np.maximum(one_step(a, np.asarray(scales), fmt), one_step(b, sb, fmt)) * (1 + 1e-6) + dtype_rounding
    assert np.all(np.abs(a - b) <= tol), float(np.max(np.abs(a - b) / tol))


def unfused_norm_modulate(x, w, bias, shift, scale, eps, kind):
    """The model's path: jquant.models' float32 norm, modulate, rounded to x's dtype."""
    if kind == "layer":
        mod = LayerNorm(eps, affine=w is not None)
        params = {} if w is None else {"params": {"scale": w, "bias": bias}}
    else:
        mod = RMSNorm(eps, affine=w is not None)
        params = {} if w is None else {"params": {"scale": w}}
    h = mod.apply(params, x.astype(jnp.float32))
    return modulate(h, shift, scale).astype(x.dtype)


def _inputs(b, t, kb, seed, dtype):
    """Random inputs drawn with numpy (jax.random would compile its kernels once per shape)."""
    d = 128 * kb
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
    x = (2.0 * normal(b, t, d) + 0.5).astype(dtype)
    shift, scale = 0.3 * normal(b, d), 0.3 * normal(b, d)
    w, bias = 1.0 + 0.1 * normal(d), 0.1 * normal(d)
    return x, shift, scale, w, bias


# Shapes from a few values (one and several tokens, one and two 128-blocks): the eager ops compile
# once per shape, so every new shape costs seconds while the kinds, formats and dtypes cost little.
@settings(max_examples=10, deadline=None)
@given(
    b=st.integers(1, 2),
    t=st.sampled_from([1, 3]),
    kb=st.integers(1, 2),
    kind=st.sampled_from(["layer", "rms"]),
    fmt=st.sampled_from(["int8", "fp8"]),
    affine=st.booleans(),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_norm_modulate_quantize_within_one_step_of_unfused(b, t, kb, kind, fmt, affine, dtype, seed):
    x, shift, scale, w, bias = _inputs(b, t, kb, seed, dtype)
    w, bias = (w, bias if kind == "layer" else None) if affine else (None, None)
    codes, scales = fp.norm_modulate_quantize(x, w, bias, shift, scale, 1e-6, kind, fmt)
    assert codes.shape == x.shape and scales.shape == (b, t, kb) and scales.dtype == jnp.float32
    h = unfused_norm_modulate(x, w, bias, shift, scale, 1e-6, kind)
    exact = fp.norm_modulate(x, w, bias, shift, scale, 1e-6, kind)
    assert_within_one_step(codes, scales, quantize(h, SPEC[fmt], check_finite=False), fmt, exact, h)


def test_norm_modulate_equals_the_models_float_path():
    """In float32 the producer's norm and modulation are the model's formulas (to f32 rounding)."""
    x, shift, scale, w, bias = _inputs(2, 3, 2, 0, jnp.float32)
    for kind in ("layer", "rms"):
        got = fp.norm_modulate(x, w, bias if kind == "layer" else None, shift, scale, 1e-6, kind)
        want = unfused_norm_modulate(x, w, bias if kind == "layer" else None, shift, scale, 1e-6, kind)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(
    rows=st.sampled_from([1, 5]),
    kb=st.sampled_from([1, 3]),
    act=st.sampled_from(["gelu_tanh", "gelu", "silu"]),
    fmt=st.sampled_from(["int8", "fp8"]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_activation_quantize_within_one_step_of_unfused(rows, kb, act, fmt, dtype, seed):
    y = jnp.asarray(3.0 * np.random.default_rng(seed).standard_normal((rows, 128 * kb), np.float32)).astype(dtype)
    codes, scales = fp.activation_quantize(y, act, fmt)
    assert codes.shape == y.shape and scales.shape == (rows, kb)
    exact = ACTIVATIONS[act](y.astype(jnp.float32))  # the model's FFN activation, then its dtype
    unfused = exact.astype(dtype)
    assert_within_one_step(codes, scales, quantize(unfused, SPEC[fmt], check_finite=False), fmt, exact, unfused)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantize_blocks_is_jquants_token128_to_the_bit(fmt):
    y = 4.0 * jax.random.normal(jax.random.key(3), (3, 7, 384))
    y = y.at[0, 0, :128].set(0.0)  # an all-zero block: the floor scale, codes 0
    codes, scales = fp.quantize_blocks(y, fmt)
    q = quantize(y, SPEC[fmt], check_finite=False)
    chex.assert_trees_all_equal(scales, q.scale)
    chex.assert_trees_all_equal(codes.astype(jnp.float32), q.qvalue.astype(jnp.float32))
    assert float(jnp.abs(codes[0, 0, :128].astype(jnp.float32)).max()) == 0.0
    want = ml_dtypes.float8_e4m3fn if fmt == "fp8" else np.int8
    assert codes.dtype == want


def test_producer_feeds_the_block_scaled_gemm():
    """norm_modulate_quantize -> block_scaled_dot: the quantized layer's output (QKV / FFN-up)."""
    x, shift, scale, _, _ = _inputs(1, 6, 2, 4, jnp.float32)
    w = quantize(0.05 * jax.random.normal(jax.random.key(9), (256, 64)), "int8")
    codes, scales = fp.norm_modulate_quantize(x, None, None, shift, scale)
    y = dispatch.block_scaled_dot(
        codes.reshape(-1, 256), scales.reshape(-1, 2), w.qvalue, jnp.broadcast_to(decode_scale(w), (2, 64))
    )
    ref = fp.dequantize_blocks(codes, scales).reshape(-1, 256) @ dequantize(w)
    chex.assert_trees_all_close(y, ref, rtol=1e-5, atol=1e-4)


def test_errors_name_the_problem():
    x = jnp.ones((2, 96))
    with pytest.raises(ValueError, match="96 channels .* multiple of 128"):
        fp.norm_modulate_quantize(x, None, None, jnp.zeros((96,)), jnp.zeros((96,)))
    with pytest.raises(ValueError, match="format 'int4'"):
        fp.quantize_blocks(jnp.ones((2, 128)), "int4")
    with pytest.raises(ValueError, match="activation 'tanh'"):
        fp.activation_quantize(jnp.ones((2, 128)), "tanh")
    with pytest.raises(ValueError, match="kind must be"):
        fp.normalize(jnp.ones((2, 128)), "group")
    with pytest.raises(ValueError, match="shift of shape"):
        fp.norm_modulate(jnp.ones((2, 3, 128)), None, None, jnp.zeros((5, 7)), jnp.zeros((128,)))
