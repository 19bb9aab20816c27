"""CPU tests for the quantizer with SVDQuant's down-projection fused in (pallas_kernels.lowrank_quant).

The kernel runs here under ``interpret=True`` (the GPU check, scripts/check_kernels_gpu.py's
``act_quant_lowrank`` case, runs the compiled one); its Triton lowering is checked by tracing
for CUDA.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import _common, _quant, lowrank_quant, testing, w4a8

CONFIGS = [
    lowrank_quant.LowrankQuantConfig(single_pass=True),
    lowrank_quant.LowrankQuantConfig(single_pass=False, chunk=256),
    lowrank_quant.LowrankQuantConfig(rows=32, warps=4, chunk=64, single_pass=True),
]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))  # one program a shape (eager: one a random op)
def _inputs(m, k, r, seed=0):
    kx, kl = jax.random.split(jax.random.key(seed))
    x = (jax.random.normal(kx, (m, k)) * 3).astype(jnp.bfloat16)
    return x, (jax.random.normal(kl, (k, r)) / k**0.5).astype(jnp.bfloat16)


# The kernel (interpreted) and the references, each one program a shape: eager, each op of them
# compiles again for every new shape.
_kernel = jax.jit(lowrank_quant.quantize_lowrank_pallas, static_argnums=2, static_argnames=("interpret", "config"))
_reference = jax.jit(lowrank_quant.reference, static_argnums=2)
_quant_reference = jax.jit(_quant.reference, static_argnums=1)
_down_projection = jax.jit(w4a8.down_projection)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"r{c.rows}c{c.chunk}{'s' if c.single_pass else 't'}")
@pytest.mark.parametrize("m,k,r", [(37, 1000, 32), (16, 64, 16), (3, 1536, 64), (20, 200, 32)])
def test_interpret_matches_quantizer_and_down_projection(fmt, config, m, k, r):
    # Codes and scales are act_quant's to the bit; h is x @ L1 (bf16 of an f32 sum).
    x, l1 = _inputs(m, k, r)
    try:
        config.check(k)
    except ValueError:
        pytest.skip("does not fit in registers")
    q, s, h = _kernel(x, l1, fmt, interpret=True, config=config)
    qr, sr = _quant_reference(x, fmt)
    chex.assert_trees_all_equal((q, s), (qr, sr))
    chex.assert_shape(h, (m, r))
    chex.assert_type(h, jnp.bfloat16)
    chex.assert_trees_all_close(
        np.asarray(h, np.float32), np.asarray(_down_projection(x, l1), np.float32), rtol=1e-2, atol=1e-2
    )


# Ragged shapes from a few values (rows: one, one past a 16-row tile, two tiles and a part; K: one
# column, part of a 512-chunk, a chunk and a ragged tail): every new shape compiles the interpreted
# kernel again, and hypothesis still draws the values.
@settings(max_examples=15, deadline=None)
@given(m=st.sampled_from([1, 17, 40]), k=st.sampled_from([1, 129, 700]), seed=st.integers(0, 2**16))
def test_ragged_shapes_property(m, k, seed):
    x, l1 = _inputs(m, k, 16, seed)
    q, s, h = _kernel(x, l1, "int8", interpret=True)
    qr, sr, hr = _reference(x, l1, "int8")
    chex.assert_trees_all_equal((q, s), (qr, sr))
    chex.assert_trees_all_close(np.asarray(h, np.float32), np.asarray(hr, np.float32), rtol=1e-2, atol=1e-2)


def test_bad_inputs_raise_named_errors():
    x, l1 = _inputs(4, 64, 32)
    with pytest.raises(ValueError, match=r"l1 must be \[K, r\]"):
        lowrank_quant.quantize_lowrank(x, l1[:32])
    with pytest.raises(ValueError, match="rank 24 must be a power of two"):
        lowrank_quant.quantize_lowrank(x, l1[:, :24])
    with pytest.raises(ValueError, match="floating point"):
        lowrank_quant.quantize_lowrank(x.astype(jnp.int8), l1)
    with pytest.raises(ValueError, match="do not fit in registers"):
        lowrank_quant.quantize_lowrank_pallas(
            jnp.zeros((2, 8192), jnp.bfloat16),
            jnp.zeros((8192, 32), jnp.bfloat16),
            interpret=True,
            config=lowrank_quant.LowrankQuantConfig(single_pass=True),
        )
    with pytest.raises(ValueError, match="powers of two"):
        lowrank_quant.quantize_lowrank_pallas(x, l1, interpret=True, config=lowrank_quant.LowrankQuantConfig(rows=8))


def test_cpu_falls_back_to_the_reference():
    x, l1 = _inputs(5, 300, 32)
    assert not lowrank_quant.supports(x, l1)
    chex.assert_trees_all_equal(lowrank_quant.quantize_lowrank(x, l1), lowrank_quant.reference(x, l1))
    assert testing.kernel_path("act_quant_lowrank", (x, l1)) == "xla"


@pytest.mark.parametrize("k", [1536, 5120, 20000])
def test_lowers_to_triton(k):
    # One pass with the pieces in registers up to 2048-wide rows (8 warps), two passes beyond.
    cfg = lowrank_quant.pick_config(k)
    assert cfg.single_pass == (k <= 2048)
    text = (
        jax.jit(lambda v, l: lowrank_quant.quantize_lowrank_pallas(v, l))
        .trace(jax.ShapeDtypeStruct((40, k), jnp.bfloat16), jax.ShapeDtypeStruct((k, 32), jnp.bfloat16))
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert "xla.gpu.triton" in text


def test_kernel_case_is_registered():
    case = testing.CASES["act_quant_lowrank"]
    x, l1 = case.make_inputs(jax.random.key(0), 9, 130, 0)
    chex.assert_shape((x, l1), ((9, 130), (130, 32)))
    out, ref = case.kernel(x, l1), case.reference(x, l1)
    assert len(out) == 3
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), np.asarray(ref[0], np.float32))
    assert _common.cdiv(case.min_bytes(9, 130, 0), 1) > 0
