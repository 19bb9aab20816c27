"""pallas_kernels.attn_prep: Q/K rotation, smoothing and quantization in one pass, against the reference."""

from __future__ import annotations

import functools
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jquant.attention as jattn
from jquant.models import blocks
from jquant.models.attention import QKPrologue, apply_rope, attention, attention_hook
from jquant.models.blocks import RMSNorm, split_heads
from pallas_kernels import attention as pa
from pallas_kernels import attention_ref as ar
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
    with pytest.raises(ValueError, match=r"warps must be one of \(4, 8, 16\), got 32"):
        ap.prep_tokens_pallas(x, fmt="int8", hadamard=True, tokens_padded=128, warps=32)


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


# The Q/K prologue (models.attention.QKPrologue): the layer's RMSNorm across heads and RoPE, folded in.


def _rope_tables(seed: int, t: int, d: int) -> tuple[jax.Array, jax.Array]:
    """[T, D] float32 tables, each angle repeated over its pair (Wan's layout)."""
    angles = jax.random.uniform(jax.random.key(seed), (t, d // 2), minval=0.0, maxval=6.3)
    return jnp.repeat(jnp.cos(angles), 2, axis=-1), jnp.repeat(jnp.sin(angles), 2, axis=-1)


def _prologue(h: int, d: int, t: int, norm: bool = True, rope: bool = True, seed: int = 7) -> QKPrologue:
    """Realistic norm weights (1 + 0.1 noise) and random angles."""
    weights = 1.0 + 0.1 * jax.random.normal(jax.random.key(seed), (2, h * d))
    return QKPrologue(
        norm=(weights[0], weights[1]) if norm else None, eps=1e-6, rope=_rope_tables(seed + 1, t, d) if rope else None
    )


@pytest.mark.parametrize(
    "norm,rope,role,fmt,hadamard,smooth,per_tile,t,d",
    [
        (True, False, "q", "int8", True, False, False, 70, 64),  # norm only
        (False, True, "k", "fp8_e4m3", False, True, True, 70, 64),  # RoPE only
        (True, True, "q", "int8", True, False, False, 70, 64),  # Wan's Q
        (True, True, "k", "int8", True, True, True, 70, 64),  # Wan's K, one scale per tile
        (True, True, "k", "fp8_e4m3", True, True, False, 128, 128),  # whole tiles, per-token K
        (True, True, "q", "fp8_e4m3", False, False, False, 100, 128),  # no rotation, no smoothing
    ],
)
def test_prologue_in_the_kernel_matches_the_reference(norm, rope, role, fmt, hadamard, smooth, per_tile, t, d):
    x = _x(3, 1, t, 2, d)
    p = _prologue(2, d, t, norm=norm, rope=rope)
    r = ap.compare(
        x, fmt=fmt, hadamard=hadamard, smooth=smooth, per_tile=per_tile, tile=64, interpret=True, prologue=p, role=role
    )
    assert r["ok"], r


@pytest.mark.parametrize(
    "with_prologue,per_tile,heads_inner", [(False, False, False), (False, True, True), (True, True, None)]
)
def test_several_tiles_a_program_give_the_same_codes(with_prologue, per_tile, heads_inner):
    """A program looping over 2 or 4 tiles of its head (the +-1 matrix read once) computes what
    one program a tile does, bit for bit: a partial last tile, batch 2, both launch orders."""
    x = _x(9, 2, 230, 2, 64)
    norm, rope = ap.prologue_operands(x, _prologue(2, 64, 230), "k") if with_prologue else (None, None)
    mean = ap.key_mean(x, True) if per_tile else None
    kw = dict(fmt="int8", hadamard=True, tokens_padded=256, tile=64, interpret=True, per_tile=per_tile, mean=mean)
    kw.update(norm=norm, rope=rope, heads_inner=heads_inner)
    one = ap.prep_tokens_pallas(x, **kw)
    for tiles in (2, 4):
        chex.assert_trees_all_equal(ap.prep_tokens_pallas(x, tiles_per_program=tiles, stages=2, **kw), one)
    assert float(jnp.abs(one[0].astype(jnp.float32)).sum()) > 0
    with pytest.raises(ValueError, match="tiles_per_program=3 must divide the 4 tiles"):
        ap.prep_tokens_pallas(x, tiles_per_program=3, **kw)


@pytest.mark.parametrize("with_prologue,per_tile", [(False, False), (True, False), (True, True)])
def test_launch_orders_give_the_same_codes(with_prologue, per_tile):
    """Heads inner or outer only reorders the programs: the same codes and scales, bit for bit
    (batch 2, 3 heads, a partial last tile: every program id in play)."""
    x = _x(8, 2, 70, 3, 64)
    norm, rope = ap.prologue_operands(x, _prologue(3, 64, 70), "k") if with_prologue else (None, None)
    kw = dict(fmt="int8", hadamard=True, tokens_padded=128, tile=64, interpret=True, per_tile=per_tile)
    outer = ap.prep_tokens_pallas(x, norm=norm, rope=rope, heads_inner=False, **kw)
    inner = ap.prep_tokens_pallas(x, norm=norm, rope=rope, heads_inner=True, **kw)
    default = ap.prep_tokens_pallas(x, norm=norm, rope=rope, **kw)
    chex.assert_trees_all_equal(outer, inner)
    chex.assert_trees_all_equal(outer, default)
    assert float(jnp.abs(outer[0].astype(jnp.float32)).sum()) > 0


def test_rope_launches_heads_inner_and_the_verified_path_stays_outer():
    """The grid the kernel is launched with: (H, tiles, B) with a RoPE, (B, tiles, H) without
    (the GPU-checked launch, unchanged)."""
    import jax.experimental.pallas as pl  # pylint: disable=import-outside-toplevel

    grids, real = [], pl.pallas_call

    def spy(*args, grid, **kw):
        grids.append(grid)
        return real(*args, grid=grid, **kw)

    x = _x(9, 2, 70, 3, 64)
    norm, rope = ap.prologue_operands(x, _prologue(3, 64, 70), "q")
    kw = dict(fmt="int8", hadamard=False, tokens_padded=128, tile=64, interpret=True)
    with mock.patch.object(pl, "pallas_call", spy):
        ap.prep_tokens_pallas(x, **kw)
        ap.prep_tokens_pallas(x, norm=norm, **kw)
        ap.prep_tokens_pallas(x, norm=norm, rope=rope, **kw)
        ap.prep_tokens_pallas(x, rope=rope, heads_inner=False, **kw)
    assert grids == [(2, 2, 3), (2, 2, 3), (3, 2, 2), (2, 2, 3)]


def test_unweighted_norm_equals_unit_weights():
    """``norm=(r, None)`` skips the weight multiply: the same codes as a weight of ones."""
    x = _x(4, 1, 70, 2, 64)
    r = QKPrologue(eps=1e-6).inverse_rms(x)
    kw = dict(fmt="int8", hadamard=True, tokens_padded=128, tile=64, interpret=True)
    plain = ap.prep_tokens_pallas(x, norm=(r, None), **kw)
    ones = ap.prep_tokens_pallas(x, norm=(r, jnp.ones((128,), jnp.float32)), **kw)
    chex.assert_trees_all_equal(plain, ones)


def test_compare_catches_a_kernel_that_skips_the_rope():
    x = _x(5, 1, 70, 2, 64)
    real = ap.prep_tokens_pallas
    with mock.patch.object(ap, "prep_tokens_pallas", lambda x, **kw: real(x, **{**kw, "rope": None})):
        r = ap.compare(x, fmt="int8", hadamard=True, smooth=False, per_tile=False, tile=64, interpret=True,
                       prologue=_prologue(2, 64, 70), role="q")  # fmt: skip
    assert not r["ok"]


def _old_layer_sequence(raw: jax.Array, weight: jax.Array, rope, heads: int, eps: float) -> jax.Array:
    """What blocks.Attention computed before the prologue: RMSNorm module on the [B, T, H*D]
    projection, split into heads, then apply_rope."""
    normed = RMSNorm(eps).apply({"params": {"scale": weight}}, raw)
    return apply_rope(split_heads(normed, heads), *rope, interleaved=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_qk_prologue_is_the_layer_sequence_bit_for_bit(dtype):
    b, t, h, d = 2, 24, 3, 16
    q_raw, k_raw = (jax.random.normal(jax.random.key(s), (b, t, h * d)).astype(dtype) for s in (1, 2))
    p = _prologue(h, d, t)
    want = [_old_layer_sequence(x, w, p.rope, h, p.eps) for x, w in zip((q_raw, k_raw), p.norm)]
    got = p.apply(split_heads(q_raw, h), split_heads(k_raw, h))
    chex.assert_trees_all_equal(got, tuple(want))
    jitted = jax.jit(lambda q, k: p.apply(q, k))(split_heads(q_raw, h), split_heads(k_raw, h))
    old_jitted = jax.jit(lambda q, k: [_old_layer_sequence(x, w, p.rope, h, p.eps) for x, w in zip((q, k), p.norm)])
    chex.assert_trees_all_equal(jitted, tuple(old_jitted(q_raw, k_raw)))


def test_self_attention_layer_hands_over_a_prologue_with_the_same_output():
    """blocks.Attention as Wan's attn1 (norm across heads, [T, D] RoPE tables) passes the prologue,
    and its output is bit-identical to the layer applying the norm and RoPE itself; as attn2
    (cross-attention) it passes none."""
    layer = blocks.Attention(heads=2, head_dim=16, qk_norm="rms_norm_across_heads", dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (1, 12, 32)).astype(jnp.bfloat16)
    text = jax.random.normal(jax.random.key(1), (1, 5, 32)).astype(jnp.bfloat16)
    rope = _rope_tables(2, 12, 16)
    params = layer.init(jax.random.key(3), x, rope=rope)
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(4), a.shape, a.dtype), params)
    calls = []
    real = blocks.attention

    def spy(*a, **kw):
        calls.append(kw.get("prologue") is not None)
        return real(*a, **kw)

    with mock.patch.object(blocks, "attention", spy):
        new = layer.apply(params, x, rope=rope)
        layer.apply(params, x, text)
    assert calls == [True, False]
    with mock.patch.object(blocks.Attention, "_prologue_fits", lambda *a: False):
        old = layer.apply(params, x, rope=rope)
    chex.assert_trees_all_equal(new, old)


def test_attention_applies_the_prologue_for_hooks_that_do_not_take_it():
    q, k, v = (_x(s, 1, 40, 2, 64) for s in range(3))
    p = _prologue(2, 64, 40)
    qa, ka = p.apply(q, k)
    chex.assert_trees_all_equal(attention(q, k, v, prologue=p), attention(qa, ka, v))
    seen = {}

    def plain(q, k, v, mask, implementation):
        seen["plain"] = (q, k)

    def fused(q, k, v, mask, implementation, *, prologue):
        seen["fused"] = (q, k, prologue)

    with attention_hook(plain), attention_hook(fused, takes_prologue=True):
        attention(q, k, v, prologue=p)
    chex.assert_trees_all_equal(seen["plain"], (qa, ka))
    assert seen["fused"][0] is q and seen["fused"][1] is k and seen["fused"][2] is p


def test_quantized_attention_with_a_prologue_equals_it_applied_first():
    """Through the quantized hook (on the CPU: the reference, the prologue applied in XLA), with a
    bool and with a traced ``enabled`` (its float branch applies the prologue too)."""
    q, k, v = (_x(s, 1, 64, 2, 64) for s in range(3))
    p = _prologue(2, 64, 64)

    @jax.jit
    def both(on, q, k, v):
        with jattn.quantized_attention(enabled=True if on is None else on):
            return attention(q, k, v, prologue=p), attention(*p.apply(q, k), v)

    for on in (None, jnp.asarray(True), jnp.asarray(False)):
        fused, first = both(on, q, k, v)
        assert ar.relative_l2(fused, first) <= 1e-3, on


def _operand_kwargs(block_k: int = 128, k_scales: str = "block") -> dict:
    return dict(
        causal=False,
        kv_lengths=None,
        qk_format="int8",
        pv_format="bf16",
        config=pa.AttentionConfig(k_scales=k_scales, block_k=block_k),
        smooth_k=True,
        hadamard=True,
        sm_scale=0.1,
    )


_REAL_PREP = ap.prep_tokens_pallas


def _spy_prep(calls: list, x: jax.Array, **kwargs) -> tuple[jax.Array, jax.Array]:
    """The interpreted kernel, recording whether each call applies a norm and a RoPE."""
    calls.append((kwargs.get("norm") is not None, kwargs.get("rope") is not None))
    return _REAL_PREP(x, **{**kwargs, "interpret": True})


@pytest.mark.parametrize("k_scales", ["block", "token"])
def test_kernel_operands_with_the_prologue_equal_it_applied_first(k_scales):
    """The fused pass applying the prologue (interpreted) gives the XLA path's operands for the
    prologue's q and k: codes within one step, scales within MAX_SCALE_REL, K smoothed by the
    mean of the prologue's K."""
    q, k, v = (_x(s, 1, 100, 2, 64) for s in range(3))
    p = _prologue(2, 64, 100)
    kw = _operand_kwargs(k_scales=k_scales)
    calls = []
    with (
        mock.patch.object(ap, "supports", lambda *a: True),
        mock.patch.object(ap, "supports_prologue", lambda prologue: True),
        mock.patch.object(ap, "prep_tokens_pallas", functools.partial(_spy_prep, calls)),
    ):
        fused, _ = pa.prepare_kernel_operands(q, k, v, prologue=p, **kw)
    assert calls == [(True, True), (True, True)]
    plain, _ = pa.prepare_kernel_operands(*p.apply(q, k), v, **kw)  # on the CPU: the XLA path
    for i, (a, b) in enumerate(zip(fused, plain)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        a32, b32 = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
        if i < 2:
            assert np.mean(a32 != b32) <= ap.MAX_CODES_DIFFERING and np.abs(a32 - b32).max() <= 1, i
        else:
            np.testing.assert_allclose(a32, b32, rtol=ap.MAX_SCALE_REL, atol=0, err_msg=str(i))


def test_prologue_kernel_off_by_default_runs_the_kernel_on_xla_applied_q_and_k():
    """The prologue kernel is not the default (its program changed after its GPU check, and the
    step has not timed it faster): the fused pass runs without norm / RoPE (applied in XLA
    first), unless JQUANT_BACKEND=pallas forces the prologue kernel."""
    assert not (ap.PROLOGUE_GPU_VERIFIED and ap.PROLOGUE_DEFAULT)
    q, k, v = (_x(s, 1, 128, 2, 64) for s in range(3))
    p = _prologue(2, 64, 128)
    for env, expected in (("auto", (False, False)), ("pallas", (True, True))):
        calls = []

        def record(x, *, fmt, tokens_padded, per_tile=False, tile=128, **kw):
            calls.append((kw.get("norm") is not None, kw.get("rope") is not None))
            b, _, h, d = x.shape
            scales = jnp.ones((b, h, tokens_padded // tile if per_tile else tokens_padded), jnp.float32)
            return jnp.zeros((b, tokens_padded, h, d), ar.CODE_DTYPES[fmt]), scales

        with (
            mock.patch.dict("os.environ", {"JQUANT_BACKEND": env}),
            mock.patch.object(ap, "supports", lambda *a: True),
            mock.patch.object(ap, "prep_tokens_pallas", record),
        ):
            pa.prepare_kernel_operands(q, k, v, prologue=p, **_operand_kwargs())
        assert calls == [expected, expected], env


def test_prologue_refusals_name_the_shapes():
    w = jnp.ones((128,))
    cos = jnp.ones((70, 64))
    with pytest.raises(ValueError, match=r"rope must be \(cos, sin\), each \[T, D\], got shapes \[\(70, 2, 64\)"):
        QKPrologue(rope=(jnp.ones((70, 2, 64)), jnp.ones((70, 2, 64))))
    with pytest.raises(ValueError, match=r"norm must be \(q weight, k weight\), each \[H\*D\], got shapes"):
        QKPrologue(norm=(w, jnp.ones((64,))))
    x = _x(0, 1, 70, 2, 64)
    with pytest.raises(ValueError, match=r"rope tables \(60, 64\) do not match q\(1, 70, 2, 64\)"):
        QKPrologue(rope=(cos[:60], cos[:60])).apply(x, x)
    with pytest.raises(ValueError, match=r"norm weights \(64,\) do not match q\(1, 70, 2, 64\)"):
        attention(x, x, x, prologue=QKPrologue(norm=(w[:64], w[:64])))
    kw = dict(fmt="int8", hadamard=True, tokens_padded=128, tile=64, interpret=True)
    with pytest.raises(ValueError, match=r"rope tables must be \[T, D\] = \(70, 64\), got cos \(60, 64\)"):
        ap.prep_tokens_pallas(x, rope=(cos[:60], cos[:60]), **kw)
    with pytest.raises(ValueError, match=r"inverse RMS must be \[B, T\] = \(1, 70\), got \(70,\)"):
        ap.prep_tokens_pallas(x, norm=(jnp.ones((70,)), None), **kw)
    with pytest.raises(ValueError, match=r"norm weight must be \[H\*D\] = \(128,\), got \(64,\)"):
        ap.prep_tokens_pallas(x, norm=(jnp.ones((1, 70)), w[:64]), **kw)
    with pytest.raises(ValueError, match="takes bf16 x"):
        ap.prep_tokens_pallas(x.astype(jnp.float32), rope=(cos, cos), **kw)
    with pytest.raises(ValueError, match="role must be one of"):
        ap.prologue_operands(x, _prologue(2, 64, 70), "v")


@pytest.mark.parametrize("per_tile", [False, True])
@pytest.mark.parametrize("warps", [None, 16])
def test_prologue_kernel_lowers_to_triton(per_tile, warps):
    """Wan2.1-1.3B's Q and K with the norm and RoPE (the default warps and bench_qk_prep's 16)."""
    t, h, d = 32760, 12, 128

    def fn(x, r, w, cos, sin, mean):
        return ap.prep_tokens_pallas(
            x,
            fmt="int8",
            hadamard=True,
            mean=mean if per_tile else None,
            per_tile=per_tile,
            tokens_padded=32768,
            norm=(r, w),
            rope=(cos, sin),
            warps=warps,
        )

    args = [S((1, t, h, d), jnp.bfloat16), S((1, t), jnp.float32), S((h * d,), jnp.float32)]
    args += [S((t, d), jnp.float32)] * 2 + [S((1, h, d), jnp.float32)]
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text
