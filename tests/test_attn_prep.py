"""pallas_kernels.attn_prep: Q/K rotation, smoothing and quantization in one pass, against the reference."""

from __future__ import annotations

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import attention as pa
from pallas_kernels import attn_prep as ap

S = jax.ShapeDtypeStruct


def _x(seed: int, b: int, t: int, h: int, d: int) -> jax.Array:
    """Tokens with channel offsets and spreads (smoothing and rotation have something to do)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    spread = jnp.linspace(0.3, 6.0, d)
    return (jax.random.normal(k1, (b, t, h, d)) * spread + jax.random.normal(k2, (1, 1, h, d))).astype(jnp.bfloat16)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 2),
    t=st.integers(1, 300),
    h=st.integers(1, 3),
    d=st.sampled_from(ap.HEAD_DIMS),
    fmt=st.sampled_from(["int8", "fp8_e4m3"]),
    hadamard=st.booleans(),
    smooth=st.booleans(),
    per_tile=st.booleans(),
    tile=st.sampled_from([64, 128]),
)
def test_matches_reference(seed, b, t, h, d, fmt, hadamard, smooth, per_tile, tile):
    x = _x(seed, b, t, h, d)
    r = ap.compare(x, fmt=fmt, hadamard=hadamard, smooth=smooth, per_tile=per_tile, tile=tile, interpret=True)
    assert r["ok"], r


def test_compare_catches_a_wrong_kernel():
    """A kernel that skipped the rotation would not pass its own check."""
    x = _x(0, 1, 200, 2, 128)
    real = ap.prep_tokens_pallas
    with mock.patch.object(ap, "prep_tokens_pallas", lambda x, **kw: real(x, **{**kw, "hadamard": False})):
        r = ap.compare(x, fmt="int8", hadamard=True, smooth=True, per_tile=False, interpret=True)
    assert not r["ok"] and r["codes_differing"] > 0.5


@pytest.mark.parametrize(
    "pv_format,k_scales,block_k", [("bf16", "block", 128), ("fp8_e4m3", "token", 128), ("fp8_e4m3", "block", 256)]
)
def test_kernel_operands_equal_the_xla_path(pv_format, k_scales, block_k):
    """prepare_kernel_operands with the fused Q/K pass gives the XLA path's six operands: codes,
    scales in the kernel's padded layouts, the pad-key count, V untouched (bf16) or quantized."""
    q, k, v = (_x(s, 1, 300, 2, 128) for s in range(3))
    cfg = pa.AttentionConfig(k_scales=k_scales, block_k=block_k)
    kw = dict(
        causal=False,
        kv_lengths=None,
        qk_format="int8",
        pv_format=pv_format,
        config=cfg,
        smooth_k=True,
        hadamard=True,
        sm_scale=0.1,
    )
    interpreted = functools.partial(ap.prep_tokens_pallas, interpret=True)
    with mock.patch.object(ap, "supports", lambda *a: True), mock.patch.object(ap, "prep_tokens_pallas", interpreted):
        fused, fused_mean = pa.prepare_kernel_operands(q, k, v, **kw)
    plain, plain_mean = pa.prepare_kernel_operands(q, k, v, **kw)  # on the CPU: the XLA path
    assert len(fused) == len(plain) == 6
    for i, (a, b) in enumerate(zip(fused, plain)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        a32, b32 = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
        if i < 2:  # Q and K codes: a code on a rounding boundary may move one step
            assert np.mean(a32 != b32) <= ap.MAX_CODES_DIFFERING and np.abs(a32 - b32).max() <= 1, i
        else:
            np.testing.assert_allclose(a32, b32, rtol=ap.MAX_SCALE_REL, atol=0, err_msg=str(i))
    assert (fused_mean is None) == (plain_mean is None)


def test_layouts_without_whole_128_token_tiles_keep_the_xla_path():
    """64-key tiles over 300 keys pad K to 320 tokens, not whole 128-token programs: the XLA
    pass runs instead of a refused kernel call."""
    q, k, v = (_x(s, 1, 300, 2, 64) for s in range(3))
    kw = dict(
        causal=False,
        kv_lengths=None,
        qk_format="int8",
        pv_format="bf16",
        config=pa.AttentionConfig(block_k=64),
        smooth_k=True,
        hadamard=True,
        sm_scale=0.1,
    )

    def refuse(*a, **k):
        raise AssertionError("attn_prep must not run here")

    with mock.patch.object(ap, "supports", lambda *a: True), mock.patch.object(ap, "prep_tokens_pallas", refuse):
        ops, _ = pa.prepare_kernel_operands(q, k, v, **kw)
    assert ops[1].shape == (1, 320, 2, 64)


def test_refusals_name_the_problem():
    x = _x(0, 1, 100, 2, 128)
    with pytest.raises(ValueError, match=r"attn_prep: x must be \[B, T, H, D\]"):
        ap.prep_tokens_pallas(x[0], fmt="int8", hadamard=True, tokens_padded=128)
    with pytest.raises(ValueError, match="head_dim must be one of"):
        ap.prep_tokens_pallas(x[..., :96], fmt="int8", hadamard=True, tokens_padded=128)
    with pytest.raises(ValueError, match="format must be one of"):
        ap.prep_tokens_pallas(x, fmt="int4", hadamard=True, tokens_padded=128)
    with pytest.raises(ValueError, match="tokens_padded=64 must be >= T=100"):
        ap.prep_tokens_pallas(x, fmt="int8", hadamard=True, tokens_padded=64, tile=64)
    with pytest.raises(ValueError, match="multiple of the tile 128"):
        ap.prep_tokens_pallas(x, fmt="int8", hadamard=True, tokens_padded=192)
    with pytest.raises(ValueError, match=r"mean must be \[B, H, D\]"):
        ap.prep_tokens_pallas(x, fmt="int8", hadamard=True, tokens_padded=128, mean=jnp.zeros((1, 2, 64)))


def test_not_taken_on_the_cpu_or_with_lengths():
    q = jnp.zeros((1, 64, 2, 128), jnp.bfloat16)
    assert not ap.supports(q, q, None)  # no GPU here
    with mock.patch.object(ap._common, "on_gpu", lambda: True):  # pylint: disable=protected-access
        with mock.patch.object(ap._common, "kernel_enabled", lambda verified: True):  # pylint: disable=protected-access
            assert ap.supports(q, q, None)
            assert not ap.supports(q, q, jnp.array([10]))
            assert not ap.supports(q.astype(jnp.float32), q, None)


@pytest.mark.parametrize(
    "d,fmt,per_tile,smooth", [(128, "int8", False, False), (128, "int8", True, True), (64, "fp8_e4m3", False, True)]
)
def test_lowers_to_triton(d, fmt, per_tile, smooth):
    fn = functools.partial(ap.prep_tokens_pallas, fmt=fmt, hadamard=True, per_tile=per_tile, tokens_padded=32768)
    args = [S((1, 32760, 12, d), jnp.bfloat16)]
    if smooth:
        fn = functools.partial(lambda x, m, f: f(x, mean=m), f=fn)
        args.append(S((1, 12, d), jnp.float32))
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text
