"""QArray as an array: transpose / T and reshape are exact views (nothing decodes)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jquant
from jquant.formats import FORMATS

SPECS = ["int8", "int4/g32", "uint4/g16", "nf4/g32", "fp8_e4m3", "int8/t", "mxfp4", "nvfp4", "int3/g32"]
# The property's input, made in one compiled program per (spec, shape): eager quantize compiles
# each of its ops for every new shape (~0.5 s an example); the views and decodes stay eager.
_quantize = jax.jit(jquant.quantize, static_argnums=1)


@settings(max_examples=12)
@given(spec=st.sampled_from(SPECS), k=st.sampled_from([32, 64]), n=st.sampled_from([1, 5, 9]), seed=st.integers(0, 99))
def test_transpose_is_exact_and_round_trips(spec: str, k: int, n: int, seed: int) -> None:
    w = jax.random.normal(jax.random.key(seed), (k, n))
    q = _quantize(w, spec)
    t = q.T
    assert t.shape == (n, k) and t.dtype == q.dtype and t.ndim == 2
    chex.assert_trees_all_equal(jquant.dequantize(t), jquant.dequantize(q).T)
    chex.assert_trees_all_equal(jquant.dequantize(t.T), jquant.dequantize(q))
    assert t.nbytes == q.nbytes


@pytest.mark.parametrize("spec", ["int8", "int4/g32", "uint4/g16", "fp8_e4m3/t"])
def test_reshape_splits_and_merges_output_axes(spec: str) -> None:
    w = jax.random.normal(jax.random.key(0), (64, 12))
    q = jquant.quantize(w, spec)
    r = q.reshape(64, 3, 4)
    assert r.shape == (64, 3, 4)
    chex.assert_trees_all_equal(jquant.dequantize(r), jquant.dequantize(q).reshape(64, 3, 4))
    back = r.reshape(64, -1)
    chex.assert_trees_all_equal(jquant.dequantize(back), jquant.dequantize(q))


def test_reshape_refuses_to_cut_blocks_or_move_the_contraction_axis() -> None:
    q = jquant.quantize(jnp.ones((64, 12)), "int8/b16x4")
    with pytest.raises(ValueError, match="blocks span"):
        q.reshape(64, 3, 4)
    with pytest.raises(ValueError, match="contraction axis"):
        jquant.quantize(jnp.ones((64, 12)), "int8").reshape(32, 24)


def test_codec_transpose_relabels_the_block_axis() -> None:
    w = jax.random.normal(jax.random.key(1), (4, 256))
    q = jquant.quantize(w, "q8_0/g32/axis=1")
    assert q.spec.fmt not in FORMATS and q.T.shape == (256, 4)
    chex.assert_trees_all_equal(jquant.dequantize(q.T), jquant.dequantize(q).T)


def test_a_qarray_attribute_of_an_nnx_module_is_data() -> None:
    from flax import nnx

    class Holder(nnx.Module):
        def __init__(self) -> None:
            self.w = jquant.quantize(jnp.ones((32, 4)), "int8")

    h = Holder()
    assert nnx.is_data(h.w)
    graphdef, state = nnx.split(h)
    back = nnx.merge(graphdef, state)
    assert isinstance(back.w, jquant.QArray)
    chex.assert_trees_all_equal(jquant.dequantize(back.w), jquant.dequantize(h.w))
