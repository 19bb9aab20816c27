"""pallas_kernels.kquant_triton off the GPU: the references, the input checks and the dispatch
fallback (the kernels themselves are checked on the GPU by scripts/bench_kquant.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jquant import codecs, dispatch
from jquant.formats import parse_spec
from jquant.qarray import QArray, dequantize, quantize
from pallas_kernels import kquant_triton as kq


@pytest.mark.parametrize("fmt", sorted(kq.FORMATS))
def test_reference_matches_codec_and_dispatch_fallback(fmt: str) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(512, 24)).astype(np.float32) * 0.05  # Flax kernel [K, N]
    q = quantize(jnp.asarray(w), parse_spec(fmt))
    assert q.qvalue.shape == (24, 512 // codecs.get_codec(fmt).block_elems, codecs.get_codec(fmt).block_bytes)
    ref_w = kq.decode_reference(q.qvalue, fmt, jnp.float32)
    np.testing.assert_array_equal(np.asarray(ref_w), np.asarray(dequantize(q, jnp.float32)).T)
    x = jnp.asarray(rng.normal(size=(5, 512)), jnp.float32)
    want = np.asarray(x) @ np.asarray(ref_w).T
    got = kq.matmul_reference(x, q.qvalue, fmt, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # The dispatch falls back to XLA's dequantize-then-dot where the kernel does not apply.
    y = dispatch.linear(x, q)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
    assert not kq.supports(x.astype(jnp.bfloat16), fmt)  # no GPU / no Triton here


def test_tile_bytes() -> None:
    assert kq.tile_bytes("q4_k") == 144 and kq.tile_bytes("q6_k") == 210 and kq.tile_bytes("q8_0") == 8 * 34


def test_bad_inputs_are_named() -> None:
    blocks = jnp.zeros((4, 2, 144), jnp.uint8)
    with pytest.raises(ValueError, match="no kernel"):
        kq.decode_reference(blocks, "q3_k")
    with pytest.raises(ValueError, match=r"uint8\[N, K/256, 176\]"):
        kq.decode_reference(blocks, "q5_k")
    with pytest.raises(ValueError, match="expected q4_k blocks"):
        kq.decode_reference(blocks.astype(jnp.int8), "q4_k")


@pytest.mark.skipif(kq.available(), reason="Triton is installed here")
def test_kernels_need_the_gpu_extra() -> None:
    blocks = jnp.zeros((4, 2, 144), jnp.uint8)
    with pytest.raises(ImportError, match="gpu' extra"):
        kq.kquant_decode(blocks, "q4_k")
    with pytest.raises(ImportError, match="gpu' extra"):
        kq.kquant_matmul_small_m(jnp.zeros((1, 512), jnp.bfloat16), blocks, "q4_k")


def test_as_qarray_layout_is_a_flax_kernel() -> None:
    blocks = jnp.zeros((6, 2, 34 * 1), jnp.uint8)
    q = QArray(blocks, None, spec=parse_spec("q8_0"), dtype=jnp.bfloat16, axis=-2)
    assert q.shape == (64, 6)


@pytest.mark.parametrize("fmt", ["q4_0", "q3_k", "q4_k"])
def test_kernel_dispatch_leaves_block_codes_without_a_kernel_to_xla(fmt: str, monkeypatch) -> None:
    """With the kernel path forced on (as on a Hopper GPU), GGUF types without a kernel (and with
    activations) are handed back to XLA instead of reading a per-channel scale they do not have."""
    from jquant.dispatch import kernels as kd
    from pallas_kernels import _common

    monkeypatch.setattr(kd, "on_gpu", lambda: True)
    monkeypatch.setattr(_common, "on_hopper", lambda: False)  # no kernel applies, none may crash
    w = quantize(jnp.asarray(np.random.default_rng(1).normal(size=(256, 8)), jnp.float32) * 0.05, parse_spec(fmt))
    x = jnp.ones((3, 256), jnp.bfloat16)
    assert kd.maybe_run(x, w, act=None, act_scale=None) is None
    assert kd.maybe_run(x, w, act=parse_spec("int8/token"), act_scale=None) is None
