"""Degenerate and out-of-range inputs: every spec quantizes them within its format's error bound
or refuses with a ValueError that names the param path; never NaN, Inf or silent garbage.

The specs are enumerated from jquant.formats, so a new format or granularity is covered here
without editing this file. Inputs: empty, all-zero, zero blocks (adaLN-zero), constant, tiny
(1e-30, subnormal), huge (1e30, near float32 max), mixed-sign extremes and a single outlier.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jquant
import jquant.nn as jnn
from jquant.dispatch import quantize_activation
from jquant.formats import CODEC_FORMATS, FORMATS, FP4_SCALINGS, SCALE_DTYPES, np_dtype, parse_spec
from jquant.qarray import SCALE_FLOOR, codes, decode_scale

PATH = "blocks/0/attn/q/kernel"
GRANULARITIES = ("", "/t", "/c", "/g16", "/token", "/b16x16")


def _specs(name: str) -> list[str]:
    """The specs of format ``name`` the grammar accepts: every granularity with float32 scales,
    and the default granularity with each narrower scale dtype (scale storage does not depend
    on the granularity; fewer specs keep the JAX compiles, and CI time, down)."""
    out = []
    for opts in [*GRANULARITIES, *(f"/s={d}" for d in SCALE_DTYPES if d != "float32")]:
        try:
            out.append(str(parse_spec(name + opts)))
        except ValueError:
            pass  # e.g. codecs fix their blocks, mx/nv their scale encodings
    return sorted(set(out))


NAMES = [*FORMATS, *FP4_SCALINGS, *CODEC_FORMATS]
ALL_SPECS = [s for n in NAMES for s in _specs(n)]
KINDS = ("zero", "zero_block", "const", "tiny", "subnormal", "huge", "near_max", "mixed_extremes", "outlier", "normal")


GGUF_LEVELS = {
    "q8_0": 127,
    "q4_k": 63 * 15 + 63,
    "q5_k": 63 * 31 + 63,
    "q6_k": 127 * 32,
    "q4_0": 8,  # d (q - 8)
    "q5_0": 16,  # d (q - 16)
    "q4_1": 15 + 1,  # d q + m, m a float16 of its own
    "q5_1": 31 + 1,
    "q2_k": 15 * 3 + 15,  # d sc q - dmin m, 4-bit sc and m
    "q3_k": 32 * 4,  # d (sc - 32) (q - 4)
}


def _shape(spec) -> tuple[int, int]:
    return (256, 8) if spec.fmt in CODEC_FORMATS else (64, 32)


def make_input(kind: str, shape, mag: float, seed: int) -> np.ndarray:
    """A float32 array of ``kind`` (``mag`` scales the kinds that take a magnitude)."""
    assert kind in KINDS
    rng = np.random.default_rng(seed)
    sign = rng.choice([-1.0, 1.0], size=shape)
    if kind == "zero":
        return np.zeros(shape, np.float32)
    if kind == "zero_block":  # adaLN-zero style: whole output channels and input rows exactly zero
        x = rng.standard_normal(shape)
        x[:, rng.integers(0, shape[1])] = 0.0
        x[: shape[0] // 2] = 0.0
        return x.astype(np.float32)
    if kind == "const":
        return np.full(shape, mag * sign[0, 0], np.float32)
    if kind == "tiny":
        return (sign * 1e-30 * mag).astype(np.float32)
    if kind == "subnormal":
        return (sign * 1e-40 * mag).astype(np.float32)
    if kind == "huge":
        return (sign * 1e30 * mag).astype(np.float32)
    if kind == "near_max":
        return (sign * np.finfo(np.float32).max * min(mag, 1.0)).astype(np.float32)
    if kind == "mixed_extremes":  # huge and tiny of both signs side by side
        big = rng.random(shape) < 0.5
        return (sign * np.where(big, 1e30 * mag, 1e-30)).astype(np.float32)
    if kind == "outlier":
        x = rng.standard_normal(shape) * 1e-3
        x[rng.integers(0, shape[0]), rng.integers(0, shape[1])] = 1e6 * mag * sign[0, 0]
        return x.astype(np.float32)
    return (rng.standard_normal(shape) * mag).astype(np.float32)


def _block_full(q, shape) -> np.ndarray:
    """Per-element decoded fp32 scale."""
    s = np.asarray(decode_scale(q), np.float64)
    return np.kron(s, np.ones(tuple(a // b for a, b in zip(shape, s.shape))))


def error_bound(x: np.ndarray, q, spec) -> np.ndarray:
    """The largest decode error the format allows at each element, at the stored (clamped) scale.

    int: half a step; float (fp8): half an ulp of x/scale, or half the smallest subnormal step;
    tables (nf4, fp4, mx, nv): half the widest gap between table values, plus for mx the OCP
    saturation of the largest value (its power-of-two scale can put amax above 6); GGUF codecs:
    a full step of a ``bits``-bit grid over each block's max |x|.
    """
    xf = np.abs(x.astype(np.float64))
    tol = 2e-6 * xf + 2e-38  # f32 arithmetic; XLA on the CPU flushes subnormal inputs to zero
    f = spec.format
    if f.kind == "codec":
        n = parse_spec(spec.fmt).group_size
        blk = xf.reshape(x.shape[0] // n, n, -1).max(1, keepdims=True)
        step = 2 * blk / (2 ** int(spec.fmt[1]) - 1)
        # ggml's float16 super-scale d is rounded to 2^-25 once it is subnormal, and a value is
        # d times at most GGUF_LEVELS (sub-scale x code, plus the 6-bit min for q4_k/q5_k).
        step = step + GGUF_LEVELS[spec.fmt] * 2.0**-25
        return np.broadcast_to(np.maximum(step, SCALE_FLOOR), (x.shape[0] // n, n, x.shape[1])).reshape(x.shape) + tol
    s = _block_full(q, x.shape)
    y = xf / s
    if f.kind == "int":
        return s / 2 + tol
    if f.kind == "float":
        fi = ml_dtypes.finfo(np_dtype(f.storage))
        return s * np.maximum(y * float(fi.eps) / 2, float(fi.smallest_subnormal) / 2) + tol
    table = np.sort(np.asarray(f.table, np.float64))
    over = np.maximum(y - f.qmax, 0.0)
    if spec.scaling != "mx":  # the scale covers the block: no saturation
        assert np.all(over <= 1e-5 * f.qmax), f"{spec}: x / scale up to {y.max()} exceeds {f.qmax}"
    return s * (np.max(np.diff(table)) / 2 + over) + tol


def check(x: np.ndarray, spec_str: str, path: str = PATH) -> str:
    """Quantize ``x``; assert a valid result or a clear refusal. Returns 'ok' or 'refused'."""
    spec = parse_spec(spec_str)
    try:
        q = jquant.quantize(x, spec, path=path)
    except ValueError as e:
        msg = str(e)
        assert msg.startswith(path + ": ") and len(msg) > len(path) + 10, msg
        assert not (x.size == 0 or np.all(x == 0)), f"{spec}: refused an empty/all-zero input: {msg}"
        return "refused"
    y = np.asarray(jquant.dequantize(q), np.float64)
    assert q.shape == x.shape and y.shape == x.shape and y.dtype == np.float64
    assert np.all(np.isfinite(y)), f"{spec}: non-finite decode"
    if x.size == 0:
        return "ok"
    if spec.fmt not in CODEC_FORMATS:
        s = np.asarray(decode_scale(q), np.float64)
        assert np.all(np.isfinite(s)) and np.all(s > 0), f"{spec}: scales {s.min()}..{s.max()}"
        c = np.asarray(codes(q)).astype(np.float64)
        assert np.all(np.isfinite(c)), f"{spec}: non-finite codes"
        np.testing.assert_array_equal(y[x == 0], 0.0, err_msg=f"{spec}: a zero did not decode to zero")
    elif np.all(x == 0):
        np.testing.assert_array_equal(y, 0.0)
    err = np.abs(y - x.astype(np.float64))
    bound = error_bound(x, q, spec)
    worst = np.unravel_index(np.argmax(err - bound), x.shape)
    assert np.all(err <= bound), f"{spec}: error {err[worst]:.3g} > bound {bound[worst]:.3g} at x={x[worst]:.3g}"
    return "ok"


def check_kinds(spec: str, kinds, mag: float, seed: int) -> None:
    """:func:`check` all-zero, empty and ``kinds`` inputs under one spec (one shape, so JAX
    compiles the spec's ops once)."""
    shape = _shape(parse_spec(spec))
    for kind in ("zero", *kinds):
        try:
            check(make_input(kind, shape, mag, seed), spec)
        except AssertionError as e:
            raise AssertionError(f"kind={kind}: {e}") from None
    empty = [(0, shape[1]), (shape[0], 0), (0, 0)][len(spec) % 3]  # one per spec: each shape compiles
    assert check(np.zeros(empty, np.float32), spec) == "ok"


# Every format x granularity (and scale dtype), GGUF codecs included: they go through
# jquant.quantize like every format (jquant/algorithms/kquants.py is being rewritten), and
# quantize refuses a tensor their float16 block scales lose as a whole.
@pytest.mark.parametrize("spec", ALL_SPECS)
@settings(max_examples=2, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(KINDS[1:]), min_size=3, max_size=3, unique=True),
    mag=st.sampled_from([1.0, 0.5, 3.0, 1e-3, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_degenerate_inputs_decode_within_bound_or_refuse(spec, kinds, mag, seed):
    check_kinds(spec, kinds, mag, seed)


def test_empty_bf16_and_fake_quant():
    for spec in ("int4/g16", "nvfp4", "q4_k"):
        q = jquant.quantize(jnp.zeros((0, 16), jnp.bfloat16), spec, path=PATH)
        assert jquant.dequantize(q).dtype == jnp.bfloat16 and q.nbytes <= 4  # nvfp4: its fp32 tensor scale
        assert jquant.fake_quant(jnp.zeros((256, 0)), spec).shape == (256, 0)


def test_empty_param_in_a_tree_round_trips():
    tree = {"a": {"kernel": jnp.zeros((0, 16))}, "b": {"kernel": jnp.ones((32, 16))}}
    q, report = jquant.quantize_params(tree, "int4/g16")
    assert isinstance(q["a"]["kernel"], jquant.QArray) and q["a"]["kernel"].shape == (0, 16)
    assert jquant.dequantize(q["a"]["kernel"]).shape == (0, 16)
    assert {r.path for r in report.rows} == {"a/kernel", "b/kernel"}


@pytest.mark.parametrize(
    "shape, spec, needles",
    [
        ((100, 16), "int4/g128", ["group size 128", "size 100"]),
        ((100, 16), "nf4", ["group size 64", "size 100"]),
        ((100, 16), "q4_k", ["256", "size 100"]),
        ((100, 16), "int8/b64x16", ["64x16", "(100, 16)"]),
        ((32, 16), "int8/axis=2", ["axis 2", "rank 2"]),
        ((32, 16), "q8_0/axis=-3", ["axis -3", "rank 2"]),
        ((32,), "int8/b1x32", ["rank >= 2"]),
    ],
)
def test_layout_errors_name_path_and_sizes(shape, spec, needles):
    with pytest.raises(ValueError) as e:
        jquant.quantize(jnp.ones(shape), spec, path=PATH)
    assert str(e.value).startswith(PATH + ": ")
    for s in needles:
        assert s in str(e.value)


@pytest.mark.parametrize(
    "spec", ["q4_k/g32", "q8_0/c", "q6_k/token", "q5_k/s=float16", "mxfp4/s=float16", "nvfp4/s=bfloat16"]
)
def test_fixed_layouts_refuse_options_they_would_ignore(spec):
    with pytest.raises(ValueError):
        parse_spec(spec)


def test_scale_dtype_range_errors_are_clear():
    x = np.full((32, 16), 1e8, np.float32)
    with pytest.raises(
        ValueError,
        match=f"^{PATH}: values up to 1e\\+08 overflow the float16 scale range of int8/c/s=float16.*use s=float32",
    ):
        jquant.quantize(x, "int8/s=float16", path=PATH)
    with pytest.raises(ValueError, match=f"^{PATH}: values up to 1e-06 underflow the float16 scale range"):
        jquant.quantize(x * 1e-14, "int8/s=float16", path=PATH)
    with pytest.raises(ValueError, match=f"^{PATH}: values up to 3.4e\\+38 exceed the largest magnitude"):
        jquant.quantize(x * 0 + np.finfo(np.float32).max, "int8", path=PATH)
    assert jquant.quantize(x * 1e-14, "int8/s=bfloat16", path=PATH).scale.dtype == jnp.bfloat16  # bf16 has the range
    with pytest.raises(ValueError, match=f"^{PATH}: a given scale must be positive"):
        jquant.quantize(x, "int8/t", path=PATH, scale=jnp.zeros((1, 1)))


def test_fake_quant_zeros_and_refusals():
    z = jnp.zeros((32, 16))
    y, g = jax.value_and_grad(lambda a: jnp.sum(jquant.fake_quant(a, "int4/g16/s=float16")))(z)
    assert float(y) == 0.0 and np.all(np.asarray(g) == 1.0)
    jit_y = jax.jit(lambda a: jquant.fake_quant(a, "fp8_e4m3/s=float16"))(z)
    np.testing.assert_array_equal(np.asarray(jit_y), 0.0)
    with pytest.raises(ValueError, match=f"^{PATH}: "):
        jquant.fake_quant(z + 1e8, "int8/s=float16", path=PATH)


@pytest.mark.parametrize("act", ["int8/token", "fp8_e4m3/token", "int8/token/s=float16", "uint8/token", "int4/token"])
def test_dynamic_token_rows_zero_tiny_huge(act):
    """Per-token activation scales: a zero row gives zeros, tiny/huge rows stay finite (traced:
    they saturate into the scale range rather than refuse)."""
    x = np.random.default_rng(0).standard_normal((6, 32)).astype(np.float32)
    x[0] = 0.0
    x[1] *= 1e-30
    x[2] *= 1e30
    x[3, 5] = 3e38
    spec = parse_spec(act)
    y = np.asarray(jax.jit(lambda a: jquant.dequantize(quantize_activation(a, spec, None)))(jnp.asarray(x)))
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[0], 0.0)
    rel = np.abs(y[4:] - x[4:]).max() / np.abs(x[4:]).max()
    assert rel < 0.2


def test_dynamic_token_all_zero_activation_through_a_model():
    model = nn.Dense(16)
    params = model.init(jax.random.key(0), jnp.ones((1, 32)))
    qp = {"params": jquant.quantize_params(params["params"], "int8")[0]}
    x = jnp.zeros((2, 3, 32)).at[1].set(1.0)
    for act in ("int8/token", "int8/token/s=float16", "fp8_e4m3/token"):
        y = jax.jit(lambda v, a: jnn.apply(model, v, a, act=act))(qp, x)
        assert np.all(np.isfinite(np.asarray(y)))
        np.testing.assert_allclose(np.asarray(y[0]), np.broadcast_to(np.asarray(params["params"]["bias"]), (3, 16)))
