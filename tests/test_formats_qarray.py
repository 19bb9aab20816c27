"""Number formats, spec grammar and QArray: rounding bounds, packing, STE, footprints."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jquant
from jquant.formats import FP4_TABLE, NF4_TABLE, parse_spec
from jquant.qarray import codes, decode_scale, pack, unpack

SPECS = [
    "int8",
    "int8/t",
    "int4/g16",
    "uint4/g16",
    "int3/g16",
    "int2/c",
    "uint2/g8",
    "uint8/c",
    "fp8_e4m3",
    "fp8_e5m2",
    "nf4/g16",
    "fp4/g16",
    "mxfp4",
    "nvfp4",
    "int8/token",
    "int8/b16x8",
    "int4/g32/s=bfloat16",
]

floats = hnp.arrays(
    np.float32, st.tuples(st.sampled_from([32, 64]), st.sampled_from([8, 24])), elements=st.floats(-100, 100, width=32)
)


@pytest.mark.parametrize("s", SPECS)
def test_spec_string_round_trip(s):
    spec = parse_spec(s)
    assert parse_spec(str(spec)) == spec


@pytest.mark.parametrize("bad", ["int5", "int4/g0x", "fp8_e4m3/asym", "int4/zz", "", "nf4/b3"])
def test_bad_specs_raise(bad):
    with pytest.raises(ValueError):
        parse_spec(bad)


@settings(max_examples=25, deadline=None)
@given(floats, st.sampled_from(["int8", "int4/g16", "int3/g8", "int2/c", "int8/t", "int8/b8x8"]))
def test_int_rtn_error_at_most_half_scale(x, s):
    q = jquant.quantize(x, s)
    err = np.abs(np.asarray(jquant.dequantize(q)) - x)
    scale = np.asarray(decode_scale(q))
    block = tuple(a // b for a, b in zip(x.shape, scale.shape))
    full = np.kron(scale, np.ones(block, np.float32))
    assert np.all(err <= full / 2 + 1e-5 * (1 + np.abs(x)))


@settings(max_examples=25, deadline=None)
@given(floats, st.sampled_from(["uint4/g16", "uint8/c", "uint2/g8"]))
def test_asymmetric_error_at_most_half_scale(x, s):
    q = jquant.quantize(x, s)
    assert q.zero_point is not None
    err = np.abs(np.asarray(jquant.dequantize(q)) - x)
    full = np.kron(np.asarray(decode_scale(q)), np.ones((x.shape[0] // q.scale.shape[0], 1), np.float32))
    assert np.all(err <= full / 2 + 1e-5 * (1 + np.abs(x)))


@settings(max_examples=20, deadline=None)
@given(floats, st.sampled_from(["fp8_e4m3", "fp8_e5m2"]))
def test_fp8_matches_ml_dtypes_rounding(x, s):
    q = jquant.quantize(x, s)
    scale = np.asarray(decode_scale(q))
    dt = ml_dtypes.float8_e4m3fn if s == "fp8_e4m3" else ml_dtypes.float8_e5m2
    fmax = float(ml_dtypes.finfo(dt).max)
    expected = np.clip(x / scale, -fmax, fmax).astype(dt)
    np.testing.assert_array_equal(np.asarray(q.qvalue).view(np.uint8), expected.view(np.uint8))


# One shape (the other tests draw the four): a new shape compiles each format's quantizer again,
# and the property is about the values, which hypothesis still draws.
@settings(max_examples=20, deadline=None)
@given(
    hnp.arrays(np.float32, (32, 24), elements=st.floats(-100, 100, width=32)),
    st.sampled_from([("nf4/g16", NF4_TABLE), ("fp4/g16", FP4_TABLE), ("mxfp4", FP4_TABLE), ("nvfp4", FP4_TABLE)]),
)
def test_table_formats_pick_nearest_code(x, case):
    s, table = case
    x = np.concatenate([x] * 2, axis=0)  # 32-element groups for mxfp4
    q = jquant.quantize(x, s)
    scale = np.kron(np.asarray(decode_scale(q)), np.ones((x.shape[0] // q.scale.shape[0], 1), np.float32))
    y = np.clip(x / scale, -max(table), max(table))
    chosen = np.asarray(table, np.float32)[np.asarray(codes(q)).astype(int)]
    best = np.min(np.abs(y[..., None] - np.asarray(table, np.float32)), axis=-1)
    np.testing.assert_allclose(np.abs(y - chosen), best, atol=1e-5)


def test_mxfp4_scales_are_powers_of_two_and_nvfp4_has_tensor_scale():
    x = jax.random.normal(jax.random.key(0), (64, 16)) * 3
    mx = jquant.quantize(x, "mxfp4")
    chex.assert_type(mx.scale, jnp.uint8)
    chex.assert_shape(mx.scale, (2, 16))
    s = np.asarray(decode_scale(mx))
    np.testing.assert_array_equal(np.log2(s), np.round(np.log2(s)))
    nv = jquant.quantize(x, "nvfp4")
    chex.assert_type(nv.scale, jnp.float8_e4m3fn)
    chex.assert_shape(nv.scale2, ())


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 9), st.integers(1, 5), st.sampled_from([4, 2]), st.booleans(), st.integers(0, 1))
def test_pack_unpack_round_trip(n, m, bits, signed, axis):
    rng = np.random.default_rng(n * 31 + m)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    c = rng.integers(lo, hi + 1, size=(n, m)).astype(np.int8 if signed else np.uint8)
    p, pad = pack(jnp.asarray(c), bits, axis)
    chex.assert_type(p, jnp.uint8)
    assert p.shape[axis] == -(-c.shape[axis] * bits // 8)
    np.testing.assert_array_equal(np.asarray(unpack(p, bits, axis, pad, signed)), c)


def test_nibble_layout_is_low_then_high():
    c = jnp.array([[1], [-2], [7], [-8]], jnp.int8)
    p, _ = pack(c, 4, 0)
    np.testing.assert_array_equal(np.asarray(p)[:, 0], [0x1 | (0xE << 4), 0x7 | (0x8 << 4)])


def test_fake_quant_straight_through_gradient():
    x = jax.random.normal(jax.random.key(1), (32, 8))
    w = jax.random.normal(jax.random.key(2), (32, 8))
    g = jax.grad(lambda x: jnp.sum(jquant.fake_quant(x, "int4/g16") * w))(x)
    chex.assert_trees_all_close(g, w)
    y = jquant.fake_quant(x, "int4/g16")
    chex.assert_trees_all_close(y, jquant.dequantize(jquant.quantize(x, "int4/g16")))


def test_nbytes_targets_4096_square_bf16():
    w = jax.random.normal(jax.random.key(0), (4096, 4096), jnp.bfloat16)
    base = w.size * 2
    assert jquant.quantize(w, "int8").nbytes <= 0.51 * base
    assert jquant.quantize(w, "int4/g128").nbytes <= 0.27 * base


def test_jit_vmap_scan():
    x = jax.random.normal(jax.random.key(0), (3, 32, 16))
    q = jax.jit(jax.vmap(lambda a: jquant.quantize(a, "int4/g16")))(x)
    assert q.shape == (3, 32, 16)
    y = jax.vmap(jquant.dequantize)(q)
    chex.assert_shape(y, (3, 32, 16))

    def body(c, qi):
        return c + jnp.sum(jquant.dequantize(qi)), None

    tot, _ = jax.lax.scan(body, 0.0, q)
    np.testing.assert_allclose(float(tot), float(jnp.sum(y)), rtol=1e-5)
    chex.assert_trees_all_close(jquant.dequantize(q), y)  # stacked QArray dequantizes directly


def test_logical_dtype_kept():
    x = jnp.ones((16, 4), jnp.bfloat16)
    q = jquant.quantize(x, "int8")
    assert q.dtype == jnp.bfloat16 and jquant.dequantize(q).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "x, spec, msg",
    [
        (jnp.array([[1.0, jnp.nan], [0.0, 1.0]]), "int8", "NaN/Inf"),
        (jnp.ones((10, 4)), "int4/g4x", "unknown option"),
        (jnp.ones((10, 4)), "int4/g4", "does not divide"),
        (jnp.ones((10, 4), jnp.int32), "int8", "floating"),
        (jnp.ones((10, 4)), "int9", "unknown format"),
        (jnp.ones((10, 4)), "int8/b3x4", "does not divide"),
    ],
)
def test_bad_input_errors_name_the_path(x, spec, msg):
    with pytest.raises((ValueError, TypeError), match=msg) as e:
        jquant.quantize(x, spec, path="blocks/0/kernel")
    if "unknown" not in msg:
        assert "blocks/0/kernel" in str(e.value)
