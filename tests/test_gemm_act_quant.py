"""The FFN-up producer (pallas_kernels.gemm_act_quant): its reference against numpy, the kernel's
lowering to Mosaic GPU for every operand / output format, and its errors on bad input."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pallas_kernels import _common, gemm_act_quant, testing

FORMATS = {"int8": testing.w8a8_int8_block_inputs, "fp8": testing.w8a8_fp8_block_inputs}


def _numpy_reference(x, xs, w, ws, b):
    """float64 numpy: dequantize both block-scaled operands, dot, bias, gelu (tanh form)."""
    k = x.shape[1]
    xf = np.asarray(x.astype(jnp.float32), np.float64) * np.repeat(np.asarray(xs, np.float64), 128, 1)[:, :k]
    wsr = np.repeat(np.repeat(np.asarray(ws, np.float64), 128, 0)[: w.shape[0]], 128, 1)[:, :k]
    wf = np.asarray(w.astype(jnp.float32), np.float64) * wsr
    y = xf @ wf.T + np.asarray(b, np.float64)[None]
    return 0.5 * y * (1 + np.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))


@pytest.mark.parametrize("operands", sorted(FORMATS))
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_reference_matches_numpy_within_one_step(operands, fmt):
    x, xs, w, ws, b = testing.gemm_act_quant_inputs(
        testing._int8 if operands == "int8" else testing._fp8, jax.random.key(3), 37, 320, 256
    )
    codes, scales = gemm_act_quant.gemm_act_quant_reference(x, xs, w, ws, b, fmt=fmt)
    assert codes.shape == (37, 256) and scales.shape == (37, 2) and scales.dtype == jnp.float32
    assert codes.dtype == (jnp.int8 if fmt == "int8" else jnp.float8_e4m3fn)
    want = _numpy_reference(x, xs, w, ws, b).reshape(37, 2, 128)
    want_scale = np.abs(want).max(-1) / (127.0 if fmt == "int8" else 448.0)
    np.testing.assert_allclose(np.asarray(scales), want_scale, rtol=1e-5)
    got = np.asarray(codes.astype(jnp.float32)).reshape(37, 2, 128) * np.asarray(scales)[..., None]
    # Within one step of the format at each value: int8 half a step of the scale; e4m3 3 bits.
    step = want_scale[..., None] if fmt == "int8" else np.maximum(np.abs(want) * 2.0**-3, want_scale[..., None] * 2**-6)
    assert np.all(np.abs(got - want) <= step * 1.0001)
    assert np.std(want) > 0.5  # the inputs reach gelu's curved part, not only its linear tail


def test_rotated_reference_is_the_block_hadamard_of_the_bf16_activation():
    # hadamard=128: each 128-wide slice of bf16(gelu(y)) times the normalized Sylvester matrix.
    from jquant.hadamard import hadamard_matrix

    x, xs, w, ws, b = testing.gemm_act_quant_inputs(testing._int8, jax.random.key(5), 9, 256, 384)
    codes, scales = gemm_act_quant.gemm_act_quant_reference(x, xs, w, ws, b, fmt="int8", hadamard=128)
    h = np.asarray(_numpy_reference(x, xs, w, ws, b), np.float32)
    h = np.asarray(jnp.asarray(h).astype(jnp.bfloat16).astype(jnp.float32), np.float64).reshape(9, 3, 128)
    want = h @ np.asarray(hadamard_matrix(128), np.float64)
    want_scale = np.abs(want).max(-1) / 127.0
    np.testing.assert_allclose(np.asarray(scales), want_scale, rtol=2e-3)
    got = np.asarray(codes.astype(jnp.float32)).reshape(9, 3, 128) * np.asarray(scales)[..., None]
    assert np.all(np.abs(got - want) <= want_scale[..., None] * 0.52)
    with pytest.raises(ValueError, match="hadamard must be 0 or 128"):
        gemm_act_quant.gemm_act_quant(x, xs, w, ws, b, hadamard=64)


@pytest.mark.parametrize("operands", sorted(FORMATS))
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("m,k,n,rotation", [(5, 320, 256, 0), (300, 1536, 384, 128), (256, 3072, 3072, 0)])
def test_kernel_lowers_to_mosaic_gpu(operands, fmt, m, k, n, rotation, monkeypatch):
    monkeypatch.setenv(_common.FORCE_ENV, "pallas")
    x, xs, w, ws, b = FORMATS[operands](jax.random.key(0), m, k, n)

    def call(*a):
        return gemm_act_quant.gemm_act_quant(*a, act="gelu_tanh", fmt=fmt, hadamard=rotation)

    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, xs, w, ws, b)]
    lowered = jax.jit(call).trace(*shapes).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
    codes, scales = lowered.out_info
    assert codes.shape == (m, n) and scales.shape == (m, n // 128)


def test_activations_without_a_kernel_formula_run_the_reference(monkeypatch):
    monkeypatch.setenv(_common.FORCE_ENV, "pallas")
    x, xs, w, ws, b = testing.w8a8_int8_block_inputs(jax.random.key(1), 8, 256, 128)
    assert not gemm_act_quant.supports(x, w, "silu")
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, xs, w, ws, b)]
    text = (
        jax.jit(lambda *a: gemm_act_quant.gemm_act_quant(*a, act="silu"))
        .trace(*shapes)
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert "mosaic_gpu" not in text


def test_bad_inputs_raise_named_errors():
    x, xs, w, ws, b = testing.w8a8_int8_block_inputs(jax.random.key(0), 4, 256, 136)
    with pytest.raises(ValueError, match=r"gemm_act_quant: N=136 .* multiple of 128"):
        gemm_act_quant.gemm_act_quant(x, xs, w, ws, b)
    x, xs, w, ws, b = testing.w8a8_int8_block_inputs(jax.random.key(0), 4, 256, 128)
    with pytest.raises(ValueError, match="activation 'swish'"):
        gemm_act_quant.gemm_act_quant(x, xs, w, ws, b, act="swish")
    with pytest.raises(ValueError, match="output format 'int4'"):
        gemm_act_quant.gemm_act_quant(x, xs, w, ws, b, fmt="int4")
    with pytest.raises(ValueError, match=r"gemm_act_quant: w_q .*dtype"):
        gemm_act_quant.gemm_act_quant(x, xs, w.astype(jnp.float8_e4m3fn), ws, b)
    with pytest.raises(ValueError, match=r"gemm_act_quant: x_scale must be"):
        gemm_act_quant.gemm_act_quant(x, xs[:, :1], w, ws, b)
    with pytest.raises(ValueError, match="int8 or float8_e4m3fn"):
        gemm_act_quant.gemm_act_quant(x.astype(jnp.bfloat16), xs, w, ws, b)


def test_column_multiplier_flips_the_codes_it_signs():
    # mul (QuaRot's +-1 signs, FFN-down's input_mul) multiplies the activation before it is
    # quantized: without a rotation each code flips with its sign, the scales stay; with one, the
    # reference is the block Hadamard of bf16(gelu(y) * signs).
    from jquant.hadamard import hadamard_matrix

    x, xs, w, ws, b, signs = testing.gemm_act_quant_signed_inputs(testing._int8, jax.random.key(6), 9, 256, 384)
    assert set(np.unique(np.asarray(signs))) == {-1.0, 1.0}
    plain = gemm_act_quant.gemm_act_quant_reference(x, xs, w, ws, b, fmt="int8")
    signed = gemm_act_quant.gemm_act_quant_reference(x, xs, w, ws, b, signs, fmt="int8")
    np.testing.assert_array_equal(np.asarray(signed[0]), np.asarray(plain[0]) * np.asarray(signs, np.int8))
    np.testing.assert_array_equal(np.asarray(signed[1]), np.asarray(plain[1]))
    codes, scales = gemm_act_quant.gemm_act_quant(x, xs, w, ws, b, signs, fmt="int8", hadamard=128)
    h = np.asarray(_numpy_reference(x, xs, w, ws, b), np.float32) * np.asarray(signs)[None]
    h = np.asarray(jnp.asarray(h).astype(jnp.bfloat16).astype(jnp.float32), np.float64).reshape(9, 3, 128)
    want = h @ np.asarray(hadamard_matrix(128), np.float64)
    want_scale = np.abs(want).max(-1) / 127.0
    np.testing.assert_allclose(np.asarray(scales), want_scale, rtol=2e-3)
    got = np.asarray(codes.astype(jnp.float32)).reshape(9, 3, 128) * np.asarray(scales)[..., None]
    assert np.all(np.abs(got - want) <= want_scale[..., None] * 0.52)
    with pytest.raises(ValueError, match=r"gemm_act_quant: mul must hold one multiplier per output channel \(384,\)"):
        gemm_act_quant.gemm_act_quant(x, xs, w, ws, b, signs[:128])


@pytest.mark.parametrize("rotation,cta_n", [(128, None), (0, 256), (0, 128)])
def test_kernel_with_a_column_multiplier_lowers_to_mosaic_gpu(rotation, cta_n, monkeypatch):
    monkeypatch.setenv(_common.FORCE_ENV, "pallas")
    x, xs, w, ws, b, signs = testing.gemm_act_quant_signed_inputs(testing._int8, jax.random.key(0), 300, 1536, 384)
    config = gemm_act_quant.w8a8.block_config(cta_n, bool(rotation)) if cta_n else None

    def call(*a):
        return gemm_act_quant.gemm_act_quant(*a, act="gelu_tanh", fmt="int8", hadamard=rotation, config=config)

    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, xs, w, ws, b, signs)]
    lowered = jax.jit(call).trace(*shapes).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
    codes, scales = lowered.out_info
    assert codes.shape == (300, 384) and scales.shape == (300, 3)
    monkeypatch.delenv(_common.FORCE_ENV)
    monkeypatch.setattr(_common, "on_hopper", lambda: True)
    monkeypatch.setattr(_common, "on_gpu", lambda: True)
    # A default run takes the kernel with a multiplier only as its GPU check says (MUL_GPU_VERIFIED).
    assert gemm_act_quant.supports(x, w, "gelu_tanh", rotation)
    assert gemm_act_quant.supports(x, w, "gelu_tanh", rotation, mul=True) == gemm_act_quant.MUL_GPU_VERIFIED


@given(seed=st.integers(0, 2**16), col=st.integers(0, 127), spread=st.floats(0.0, 6.0))
def test_one_bf16_flip_before_the_rotation_moves_the_scale_within_the_checks_bound(seed, col, spread):
    """The bound the rotated ``gemm_act_quant`` check cases use for their scales (testing.py): one
    activation rounded to its other bf16 neighbour before the order-128 rotation moves the
    block's amax after it by at most 2^-7 relative, whatever the values' spread."""
    from jquant.hadamard import apply_block_hadamard  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(seed)
    v = (rng.standard_normal(128) * np.exp(spread * rng.standard_normal(128))).astype(np.float32)
    v = np.asarray(jnp.asarray(v, jnp.bfloat16).astype(jnp.float32))
    w = v.copy()
    w[col] = np.nextafter(jnp.asarray(v[col], jnp.bfloat16), jnp.asarray(np.inf, jnp.bfloat16)).astype(np.float32)

    def amax(a):
        return float(jnp.max(jnp.abs(apply_block_hadamard(jnp.asarray(a, jnp.float32), 128))))

    bound = [c.quant_tol[1] for n, c in testing.CASES.items() if n.startswith("gemm_act_quant") and "had128" in n]
    assert bound and set(bound) == {2.0**-7}
    assert abs(amax(w) - amax(v)) <= 2.0**-7 * amax(v) * (1 + 1e-5)
