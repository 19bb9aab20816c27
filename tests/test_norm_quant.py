"""The norm + adaLN modulation + per-(token, 128) quantization kernel (pallas_kernels.norm_quant,
issue 19) in Pallas's interpreter against its plain-JAX reference
(fused_producers.norm_modulate_quantize), its refusals, its Triton lowering and its GPU check case.

Not bit for bit (norm_quant's docstring: XLA contracts multiply-adds where it fuses, so the
reference differs from its own jitted run): every code within one step of the format, fewer than
1e-3 of them differing, scales within 1e-6 relative."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fused_producers import one_step

from pallas_kernels import _common, _quant, norm_quant, testing
from pallas_kernels import fused_producers as fp

EPS = 1e-6
#: The reference as the GPU check runs it (jitted: one compile per shape instead of one per op).
reference = jax.jit(fp.norm_modulate_quantize, static_argnames=("eps", "kind", "fmt", "hadamard", "block"))


def _inputs(m: int, k: int, seed: int, dtype, affine: str, per_row: bool) -> tuple:
    """numpy-drawn ``(x, norm_scale, norm_bias, shift, scale)`` (jax.random compiles per shape);
    ``affine``: "" / "w" / "wb"; the modulation ``[M, K]`` (``per_row``) or ``[K]``."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
    x = (2.0 * normal(m, k) + 0.5).astype(dtype)
    w = 1.0 + 0.1 * normal(k) if "w" in affine else None
    b = 0.1 * normal(k) if "b" in affine else None
    shape = (m, k) if per_row else (k,)
    return x, w, b, 0.3 * normal(*shape), 0.3 * normal(*shape)


def _assert_close(out: tuple, ref: tuple, fmt: str) -> None:
    """Codes within one step of the format everywhere, < 1e-3 of them differing; scales 1e-6."""
    (q, s), (qr, sr) = out, ref
    assert q.dtype == qr.dtype and q.shape == qr.shape and s.shape == sr.shape and s.dtype == jnp.float32
    s, sr = np.asarray(s, np.float64), np.asarray(sr, np.float64)
    assert np.max(np.abs(s - sr) / sr) <= 1e-6
    a, b = np.asarray(fp.dequantize_blocks(q, s)), np.asarray(fp.dequantize_blocks(qr, sr))
    step = np.maximum(one_step(a, s, fmt), one_step(b, sr, fmt))
    assert np.all(np.abs(a - b) <= step * (1 + 1e-5)), float(np.max(np.abs(a - b) / step))
    assert np.mean(np.asarray(q, np.float32) != np.asarray(qr, np.float32)) < 1e-3


# Every kind, format, input dtype, affine and modulation form at K = 128, 384 and 1536, each M
# ragged against the default rows per program (64, 16, 4): one compile per case (~0.4 s).
CASES = [
    ("layer", "int8", jnp.bfloat16, "", True, 37, 1536),  # Wan's self-attention / FFN producer
    ("layer", "fp8", jnp.bfloat16, "wb", False, 37, 384),
    ("layer", "int8", jnp.float32, "wb", True, 70, 128),
    ("layer", "fp8", jnp.float32, "", False, 19, 1536),
    ("rms", "int8", jnp.bfloat16, "w", True, 70, 384),
    ("rms", "fp8", jnp.bfloat16, "", True, 37, 128),
    ("rms", "int8", jnp.float32, "", False, 37, 1536),
    ("rms", "fp8", jnp.float32, "wb", True, 37, 1536),
]


@pytest.mark.parametrize("kind, fmt, dtype, affine, per_row, m, k", CASES)
def test_matches_the_reference(kind, fmt, dtype, affine, per_row, m, k):
    args = _inputs(m, k, 0, dtype, affine, per_row)
    out = norm_quant.norm_modulate_quantize_pallas(*args, EPS, kind, fmt, interpret=True)
    ref = reference(*args, eps=EPS, kind=kind, fmt=fmt)
    assert out[0].shape == (m, k) and out[1].shape == (m, k // fp.BLOCK)
    _assert_close(out, ref, fmt)


@settings(max_examples=6, deadline=None)
@given(
    m=st.integers(9, 40),
    kb=st.sampled_from([1, 2, 3, 5]),
    rows=st.sampled_from([1, 4, 16]),
    kind=st.sampled_from(["layer", "rms"]),
    fmt=st.sampled_from(["int8", "fp8"]),
    affine=st.sampled_from(["", "w", "wb"]),
    per_row=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_the_reference_on_any_shape(m, kb, rows, kind, fmt, affine, per_row, seed):
    args = _inputs(m, 128 * kb, seed, jnp.bfloat16, affine, per_row)
    cfg = _quant.QuantizerConfig(rows=rows)
    out = norm_quant.norm_modulate_quantize_pallas(*args, EPS, kind, fmt, interpret=True, config=cfg)
    _assert_close(out, reference(*args, eps=EPS, kind=kind, fmt=fmt), fmt)


@pytest.mark.parametrize(
    "kind, fmt, dtype, per_row, m, k",
    [
        ("layer", "int8", jnp.bfloat16, False, 37, 1536),  # Wan2.1-1.3B's QKV / FFN-up input
        ("layer", "fp8", jnp.bfloat16, True, 19, 384),
        ("rms", "int8", jnp.float32, True, 70, 256),
    ],
)
def test_block_rotation_in_the_producer_matches_rotate_then_quantize(kind, fmt, dtype, per_row, m, k):
    # QuaRot's order-128 block rotation of the float32 modulated rows, then the per-(token, 128)
    # codes: what the unfused path computes (up to its bf16 rounding of the rotated rows).
    args = _inputs(m, k, 1, dtype, "wb", per_row)
    out = norm_quant.norm_modulate_quantize_pallas(*args, EPS, kind, fmt, interpret=True, hadamard=128)
    ref = reference(*args, eps=EPS, kind=kind, fmt=fmt, hadamard=128)
    _assert_close(out, ref, fmt)
    plain = reference(*args, eps=EPS, kind=kind, fmt=fmt)
    assert np.mean(np.asarray(plain[0], np.float32) != np.asarray(ref[0], np.float32)) > 0.5  # it did rotate
    # The rotation is orthogonal: the dequantized rows keep their norms within the rounding.
    rows = lambda q: np.linalg.norm(np.asarray(fp.dequantize_blocks(*q)), axis=-1)  # noqa: E731
    np.testing.assert_allclose(rows(out), rows(plain), rtol=2e-2)


@pytest.mark.parametrize(
    "kind, fmt, dtype, affine, per_row, m, k, hadamard",
    [
        ("layer", "int8", jnp.bfloat16, "", True, 37, 1536, 0),  # Wan's QKV input, per token
        ("rms", "fp8", jnp.float32, "w", False, 70, 384, 0),
        ("layer", "int8", jnp.bfloat16, "wb", False, 19, 1536, 128),  # rotated, then one scale per row
    ],
)
def test_per_token_scales_match_the_reference(kind, fmt, dtype, affine, per_row, m, k, hadamard):
    args = _inputs(m, k, 1, dtype, affine, per_row)
    out = norm_quant.norm_modulate_quantize_pallas(*args, EPS, kind, fmt, interpret=True, hadamard=hadamard, block=k)
    ref = reference(*args, eps=EPS, kind=kind, fmt=fmt, hadamard=hadamard, block=k)
    assert out[0].shape == (m, k) and out[1].shape == (m, 1)
    (q, s), (qr, sr) = out, ref
    assert np.max(np.abs(np.asarray(s, np.float64) / np.asarray(sr, np.float64) - 1)) <= max(1e-6, hadamard * 2.0**-24)
    assert np.mean(np.asarray(q, np.float32) != np.asarray(qr, np.float32)) < 1e-3
    # One scale per row is the row's amax over qmax: the block scales' maximum.
    _, blocks = reference(*args, eps=EPS, kind=kind, fmt=fmt, hadamard=hadamard)
    np.testing.assert_allclose(np.asarray(sr)[:, 0], np.asarray(blocks).max(axis=1), rtol=1e-6)


def test_per_token_waits_for_its_gpu_check(monkeypatch):
    x = jnp.zeros((4, 256), jnp.bfloat16)
    monkeypatch.setattr(norm_quant._common, "on_gpu", lambda: True)  # pylint: disable=protected-access
    monkeypatch.delenv(norm_quant._common.FORCE_ENV, raising=False)  # pylint: disable=protected-access
    monkeypatch.setattr(norm_quant, "TOKEN_GPU_VERIFIED", False)
    assert norm_quant.supports(x) and not norm_quant.supports(x, per_token=True)
    monkeypatch.setattr(norm_quant, "TOKEN_GPU_VERIFIED", True)
    assert norm_quant.supports(x, per_token=True)
    with pytest.raises(ValueError, match="block must be 128 or K=256"):
        norm_quant.norm_modulate_quantize_pallas(x, None, None, x[0], x[0], block=64, interpret=True)


def test_block_rotation_refusals():
    x, v = jnp.zeros((40, 384), jnp.bfloat16), jnp.zeros((384,), jnp.float32)
    with pytest.raises(ValueError, match="no fused block-96 rotation for K=384"):
        norm_quant.norm_modulate_quantize_pallas(x, None, None, v, v, interpret=True, hadamard=96)
    x1, v1 = jnp.zeros((40, 128), jnp.bfloat16), jnp.zeros((128,), jnp.float32)
    with pytest.raises(ValueError, match="no fused block-128 rotation for K=128"):
        norm_quant.norm_modulate_quantize_pallas(x1, None, None, v1, v1, interpret=True, hadamard=128)
    few = _quant.QuantizerConfig(rows=1)
    with pytest.raises(ValueError, match=">= 16 chunks per program"):
        norm_quant.norm_modulate_quantize_pallas(x, None, None, v, v, interpret=True, config=few, hadamard=128)
    with pytest.raises(ValueError, match="block rotation of order 96 does not tile D=1024"):
        fp.norm_modulate_quantize(jnp.zeros((2, 1024)), None, None, jnp.zeros(1024), jnp.zeros(1024), hadamard=96)


def test_block_rotation_waits_for_its_gpu_check(monkeypatch):
    x = jnp.zeros((4, 1536), jnp.bfloat16)
    monkeypatch.setattr(_common, "_default_device_is_gpu", lambda: True)
    monkeypatch.delenv(_common.FORCE_ENV, raising=False)
    assert norm_quant.supports(x) and norm_quant.supports(x, 128) == norm_quant.HADAMARD_GPU_VERIFIED
    assert not norm_quant.supports(x, 96) and not norm_quant.supports(jnp.zeros((4, 128), jnp.bfloat16), 128)
    monkeypatch.setenv(_common.FORCE_ENV, "pallas")
    assert norm_quant.supports(x, 128)


def test_zero_rows_take_the_scale_floor_and_code_zero():
    # x and the modulation zero: LayerNorm's centred row is zero, the variance too (rsqrt(eps)).
    x, z = jnp.zeros((3, 256), jnp.bfloat16), jnp.zeros((256,), jnp.float32)
    q, s = norm_quant.norm_modulate_quantize_pallas(x, None, None, z, z, EPS, "layer", "int8", interpret=True)
    assert np.all(np.asarray(q) == 0) and np.all(np.asarray(s) == np.float32(_quant.SCALE_FLOOR))
    qr, sr = reference(x, None, None, z, z, eps=EPS, kind="layer", fmt="int8")
    assert np.array_equal(np.asarray(q), np.asarray(qr)) and np.array_equal(np.asarray(s), np.asarray(sr))


def test_refuses_what_it_does_not_take():
    v = jnp.zeros((200,), jnp.float32)
    with pytest.raises(ValueError, match=r"x of shape \(4, 200\): K=200 is not a multiple of 128"):
        norm_quant.norm_modulate_quantize_pallas(jnp.zeros((4, 200), jnp.bfloat16), None, None, v, v, interpret=True)
    x, v = jnp.zeros((4, 256), jnp.bfloat16), jnp.zeros((256,), jnp.float32)
    with pytest.raises(ValueError, match=r"2-D float array \[M, K\], got shape \(1, 4, 256\)"):
        norm_quant.norm_modulate_quantize_pallas(x[None], None, None, v, v, interpret=True)
    with pytest.raises(ValueError, match=r"shift of shape \(2, 256\) must be one of \[\(256,\), \(4, 256\)\]"):
        norm_quant.norm_modulate_quantize_pallas(x, None, None, jnp.zeros((2, 256)), v, interpret=True)
    with pytest.raises(ValueError, match=r"norm_scale of shape \(4, 256\) must be one of \[\(256,\)\]"):
        norm_quant.norm_modulate_quantize_pallas(x, jnp.zeros((4, 256)), None, v, v, interpret=True)
    with pytest.raises(ValueError, match="kind must be 'layer' or 'rms'"):
        norm_quant.norm_modulate_quantize_pallas(x, None, None, v, v, kind="group", interpret=True)
    with pytest.raises(ValueError, match="format 'int4' not in"):
        norm_quant.norm_modulate_quantize_pallas(x, None, None, v, v, fmt="int4", interpret=True)
    chunked = _quant.QuantizerConfig(rows=4, single_pass=False)
    with pytest.raises(ValueError, match="needs whole rows in one program"):
        norm_quant.norm_modulate_quantize_pallas(x, None, None, v, v, interpret=True, config=chunked)
    wide, wv = jnp.zeros((1, 129 * 128), jnp.bfloat16), jnp.zeros((129 * 128,), jnp.float32)
    with pytest.raises(ValueError, match=f"K=16512 is too wide .* at most {_quant.SINGLE_PASS_MAX}"):
        norm_quant.norm_modulate_quantize_pallas(wide, None, None, wv, wv, interpret=True)


@pytest.mark.parametrize(
    "kind, fmt, m, k, affine, per_row",
    [("layer", "int8", 37, 1536, True, True), ("rms", "fp8", 5, 5120, False, False)],  # 5120: Wan-14B
)
@pytest.mark.parametrize("hadamard", [0, 128])
@pytest.mark.parametrize("per_token", [False, True])
def test_lowers_to_triton(kind, fmt, m, k, affine, per_row, hadamard, per_token):
    S = jax.ShapeDtypeStruct
    vec = S((m, k) if per_row else (k,), jnp.float32)
    w = S((k,), jnp.bfloat16) if affine else None
    fn = lambda x, w, b, sh, sc: norm_quant.norm_modulate_quantize_pallas(  # noqa: E731
        x, w, b, sh, sc, EPS, kind, fmt, hadamard=hadamard, block=k if per_token else fp.BLOCK
    )
    text = jax.jit(fn).trace(S((m, k), jnp.bfloat16), w, w, vec, vec).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text


def test_supports_a_gpu_unless_xla_is_forced(monkeypatch):
    x = jnp.zeros((4, 256), jnp.bfloat16)
    monkeypatch.delenv(_common.FORCE_ENV, raising=False)
    assert not norm_quant.supports(x)  # the CPU
    monkeypatch.setenv(_common.FORCE_ENV, "pallas")
    assert not norm_quant.supports(x)  # still the CPU
    monkeypatch.setattr(_common, "_default_device_is_gpu", lambda: True)
    assert norm_quant.supports(x)
    assert not norm_quant.supports(jnp.zeros((4, 200), jnp.bfloat16))  # K not whole blocks
    assert not norm_quant.supports(jnp.zeros((0, 256), jnp.bfloat16))
    assert not norm_quant.supports(jnp.zeros((2, 129 * 128), jnp.bfloat16))  # wider than one program
    assert not norm_quant.supports(jnp.zeros((2, 256), jnp.int8))
    monkeypatch.delenv(_common.FORCE_ENV)
    assert norm_quant.supports(x)  # GPU-checked: on by default on a GPU
    monkeypatch.setenv(_common.FORCE_ENV, "xla")
    assert not norm_quant.supports(x)


def test_gpu_check_cases():
    names = ("norm_quant_layer_int8", "norm_quant_layer_fp8", "norm_quant_rms_fp8")
    for name in names:
        case = testing.CASES[name]
        assert case.takes(1, 1536, 1536) and case.takes(16, 3072, 3072)
        assert not case.takes(5, 1000, 520) and case.shape_rule == "K a multiple of 128"
    case = testing.CASES["norm_quant_rms_fp8"]
    inputs = case.make_inputs(jax.random.key(3), 37, 384, 0)
    out, ref = jax.jit(case.kernel)(*inputs), jax.jit(case.reference)(*inputs)  # as the GPU check runs them
    verdict = testing.compare(case, out, ref, inputs)
    assert verdict["ok"], verdict["detail"]
    assert testing.kernel_path("norm_quant_rms_fp8", inputs) == "interpret"
    wrong = (out[0], out[1] * 1.01)  # a scale 1% off fails the check
    assert not testing.compare(case, wrong, ref, inputs)["ok"]
    # The rotated cases: the kernel rotates like the reference, and an unrotated output fails.
    case = testing.CASES["norm_quant_layer_int8_had128"]
    assert case.takes(16, 1536, 0) and not case.takes(16, 128, 0)
    inputs = case.make_inputs(jax.random.key(4), 20, 384, 0)
    out, ref = jax.jit(case.kernel)(*inputs), jax.jit(case.reference)(*inputs)
    assert testing.compare(case, out, ref, inputs)["ok"]
    unrotated = testing.CASES["norm_quant_layer_int8"].reference(*inputs)
    assert not testing.compare(case, unrotated, ref, inputs)["ok"]


def test_rotation_rotates_the_bf16_rounded_rows():
    """The producers' rotation (``_quant.rotate_rounded``, one bf16 MMA): the float32 rotation of
    the rows rounded to bf16, to float32 rounding, and not the exact rotation of the float32 rows
    (which took three MMAs)."""
    from jquant.hadamard import apply_block_hadamard
    from pallas_kernels import _quant
    from pallas_kernels.act_quant import block_matrix

    v = jax.random.normal(jax.random.key(3), (32, 128), jnp.float32) * 3.0
    h = jnp.asarray(block_matrix(256, 128), jnp.bfloat16)
    out = _quant.rotate_rounded(v, h, 128)
    rounded = apply_block_hadamard(_quant.round_to_bf16(v), 128)
    chex.assert_trees_all_close(out, rounded, rtol=1e-6, atol=1e-6)
    exact = apply_block_hadamard(v, 128)
    assert float(jnp.max(jnp.abs(out - exact))) > 1e-4  # the bf16 rounding shows
