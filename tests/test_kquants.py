"""GGUF block codecs: ggml byte layout (checked by the gguf package's decoder), error bounds, sizes.

Byte equality with ggml's own quantizer is in tests/test_kquants_ggml.py (stored fixtures)."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st

from jquant.codecs import CODECS, GGML_CODECS, get_codec

GGML = {name: T[name.upper()] for name in GGML_CODECS}
# Relative RMS error bound on Gaussian data, per type (measured: q4_0 0.085, q4_1 0.077, q5_0 0.043,
# q5_1 0.038, q8_0 0.0053, q2_k 0.294, q3_k 0.150, q4_k 0.070, q5_k 0.036, q6_k 0.0175).
REL_RMSE = {
    "q4_0": 0.095,
    "q4_1": 0.085,
    "q5_0": 0.047,
    "q5_1": 0.042,
    "q8_0": 0.007,
    "q2_k": 0.32,
    "q3_k": 0.165,
    "q4_k": 0.077,
    "q5_k": 0.04,
    "q6_k": 0.02,
}
# Quantization levels per block range: every value decodes within range * 1/levels.
LEVELS = {
    "q4_0": 15,
    "q4_1": 15,
    "q5_0": 31,
    "q5_1": 31,
    "q8_0": 127,
    "q2_k": 3,
    "q3_k": 7,
    "q4_k": 15,
    "q5_k": 31,
    "q6_k": 31,
}
# Plain round-to-nearest with a min/max (or absmax) grid in the same layout: the search must beat it.
NAIVE_LEVELS = {"q4_k": 15, "q5_k": 31}


def _data(kind: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "outliers":  # a few channels 20-100x larger, as in DiT activations/weights
        cols = rng.choice(shape[-1], size=max(1, shape[-1] // 64), replace=False)
        x[..., cols] *= rng.uniform(20, 100, size=cols.size).astype(np.float32)
    elif kind == "mixed_scale":
        x *= np.exp(rng.uniform(-8, 4, size=shape[:-1] + (1,))).astype(np.float32)
    elif kind == "sparse":
        x *= rng.random(shape) < 0.05
    return x


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("name", sorted(GGML_CODECS))
@pytest.mark.parametrize("kind", ["gauss", "outliers", "mixed_scale", "sparse"])
@pytest.mark.parametrize("shape", [(512,), (3, 256), (2, 3, 1024)])
def test_decode_matches_gguf_package_bit_exactly(name: str, kind: str, shape: tuple[int, ...]) -> None:
    codec = GGML_CODECS[name]
    x = _data(kind, shape, seed=len(shape))
    blocks = codec.encode(x)
    assert blocks.dtype == np.uint8
    assert blocks.shape == shape[:-1] + (shape[-1] // codec.block_elems, codec.block_bytes)
    ours = np.asarray(jax.jit(codec.decode)(jnp.asarray(blocks)))
    ref = gguf.quants.dequantize(blocks.reshape(shape[:-1] + (-1,)), GGML[name])
    assert ours.shape == ref.shape == shape
    np.testing.assert_array_equal(_bits(ours), _bits(ref))


@settings(max_examples=15, deadline=None)
@given(
    name=st.sampled_from(sorted(GGML_CODECS)),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-12, 6),
    offset=st.floats(-3, 3),
)
def test_decode_matches_gguf_package_on_random_scales(name: str, seed: int, log_scale: float, offset: float) -> None:
    codec = GGML_CODECS[name]
    x = ((_data("outliers", (2, 256), seed) + offset) * np.float32(np.exp(log_scale))).astype(np.float32)
    blocks = codec.encode(x)
    ref = gguf.quants.dequantize(blocks.reshape(2, -1), GGML[name])
    np.testing.assert_array_equal(_bits(codec.decode(blocks)), _bits(ref))


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_bytes_equal_gguf_package_quantizer(name: str) -> None:
    """The gguf package ports these five reference quantizers too (not the k-quants). Data
    without zeros: the port differs from ggml in the sign of zero scales and mins (ggml writes
    d = -0.0 for an all-zero Q4_0 block, and m = -0.0 when a block's first minimum is -0.0; so
    does jquant, see test_kquants_ggml.py)."""
    x = np.concatenate([_data("outliers", (4, 256)), _data("mixed_scale", (4, 256), 1)])
    np.testing.assert_array_equal(GGML_CODECS[name].encode(x).reshape(len(x), -1), gguf.quants.quantize(x, GGML[name]))


@pytest.mark.parametrize("name", sorted(GGML_CODECS))
def test_roundtrip_error_bound(name: str) -> None:
    codec = GGML_CODECS[name]
    x = _data("gauss", (16, 2048), seed=3)
    y = np.asarray(codec.decode(codec.encode(x)))
    rel = np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2))
    assert rel < REL_RMSE[name], (name, rel)
    # every value stays within one quantization step of the block's range
    step = 1 / LEVELS[name]
    blk = x.reshape(-1, codec.block_elems)
    rng = np.abs(blk).max(-1, keepdims=True) * 2
    assert np.all(np.abs((y - x).reshape(blk.shape)) <= rng * step * 1.01)


@pytest.mark.parametrize("name", sorted(NAIVE_LEVELS))
def test_scale_search_beats_plain_min_max_grid(name: str) -> None:
    x = _data("gauss", (8, 1024), seed=5)
    y = np.asarray(CODECS[name].decode(CODECS[name].encode(x)))
    sub = x.reshape(-1, 32)
    lo = np.minimum(sub.min(-1, keepdims=True), 0)
    step = (sub.max(-1, keepdims=True) - lo) / NAIVE_LEVELS[name]
    naive = np.clip(np.rint((sub - lo) / step), 0, NAIVE_LEVELS[name]) * step + lo
    assert np.mean((y - x) ** 2) < 0.95 * np.mean((naive.reshape(x.shape) - x) ** 2)


@pytest.mark.parametrize("name", sorted(GGML_CODECS))
def test_degenerate_blocks(name: str) -> None:
    codec = GGML_CODECS[name]
    n = 512
    rows = np.stack(
        [
            np.zeros(n),
            np.full(n, 3.0),
            np.full(n, -0.7),
            np.eye(1, n, 7)[0] * 5,
            np.random.default_rng(0).standard_normal(n) * 1e-30,
        ]
    ).astype(np.float32)
    y = np.asarray(codec.decode(codec.encode(rows)))
    np.testing.assert_array_equal(y[0], 0)
    np.testing.assert_allclose(y[1:4], rows[1:4], atol=2e-3)
    assert np.abs(y[4]).max() <= 1e-29
    # values near the bottom of the f16 scale range (~1e-6): no worse than zeros, except in
    # Q4_K/Q5_K, where ggml's quantizer keeps the offset -dmin*m of sub-blocks whose scale
    # rounds to 0 (about 9x the error of zeros here); jquant writes ggml's bytes, so the same.
    tiny = (np.random.default_rng(1).standard_normal((2, n)) * 1e-6).astype(np.float32)
    yt = np.asarray(codec.decode(codec.encode(tiny)))
    if name in ("q4_k", "q5_k"):
        assert np.abs(yt - tiny).max() <= 2 * np.abs(tiny).max()
    else:
        assert np.sum((yt - tiny) ** 2) <= np.sum(tiny**2) * 1.0001


def test_bits_per_weight_and_sizes() -> None:
    expect = {
        "q4_0": (32, 18, 4.5),
        "q4_1": (32, 20, 5.0),
        "q5_0": (32, 22, 5.5),
        "q5_1": (32, 24, 6.0),
        "q8_0": (32, 34, 8.5),
        "q2_k": (256, 84, 2.625),
        "q3_k": (256, 110, 3.4375),
        "q4_k": (256, 144, 4.5),
        "q5_k": (256, 176, 5.5),
        "q6_k": (256, 210, 6.5625),
    }
    assert sorted(expect) == sorted(GGML_CODECS)
    for name, (elems, nbytes, bpw) in expect.items():
        c = GGML_CODECS[name]
        assert (c.block_elems, c.block_bytes, c.bits_per_weight) == (elems, nbytes, bpw)
        assert c.block_bytes * 8 / c.block_elems == bpw
        assert gguf.GGML_QUANT_SIZES[GGML[name]] == (elems, nbytes)
        assert int(GGML[name]) == c.ggml_type


def test_decode_is_jittable_under_vmap() -> None:
    codec = CODECS["q4_k"]
    x = _data("gauss", (4, 2, 256))
    blocks = jnp.asarray(codec.encode(x))
    np.testing.assert_array_equal(jax.vmap(jax.jit(codec.decode))(blocks), codec.decode(blocks))


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        CODECS["q4_k"].encode(np.zeros((2, 300), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        CODECS["q6_k"].encode(np.full((256,), np.nan, np.float32))
    with pytest.raises(ValueError, match="overflows float16"):
        CODECS["q8_0"].encode(np.full((32,), 1e9, np.float32))
    with pytest.raises(ValueError, match="floating-point"):
        CODECS["q5_k"].encode(np.zeros((256,), np.int32))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., nb, 144\)"):
        CODECS["q4_k"].decode(jnp.zeros((2, 176), jnp.uint8))
    with pytest.raises(ValueError, match="unknown GGUF block codec"):
        get_codec("iq2_xs")
    assert get_codec("Q6_K") is CODECS["q6_k"]
    assert get_codec("Q3_K") is GGML_CODECS["q3_k"]


def test_codecs_are_the_qarray_formats() -> None:
    """CODECS (used by QArray, the GGUF reader/writer, the mixes) is GGML_CODECS restricted to
    the spec names jquant.formats knows; the four original spec names keep working."""
    from jquant.formats import CODEC_FORMATS, parse_spec
    from jquant.qarray import dequantize, quantize

    assert sorted(CODECS) == sorted(set(CODEC_FORMATS) & set(GGML_CODECS))
    assert {"q8_0", "q4_k", "q5_k", "q6_k"} <= set(CODECS)
    x = jnp.asarray(_data("gauss", (512, 8)))
    for name in ("q8_0", "q4_k", "q5_k", "q6_k"):
        q = quantize(x, parse_spec(name))
        ref = CODECS[name].decode(CODECS[name].encode(np.asarray(x).T)).T
        np.testing.assert_array_equal(np.asarray(dequantize(q, jnp.float32)), np.asarray(ref))
