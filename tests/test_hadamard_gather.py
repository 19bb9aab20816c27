"""CPU tests for the gathered-layout fused Hadamard quantizer (pallas_kernels.hadamard_gather).

The kernel runs here under ``interpret=True``; scripts/check_kernels_gpu.py's
``act_quant_hadamard_wide`` case runs the compiled one on the GPU.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.hadamard import hadamard_matrix, kron_factors
from pallas_kernels import _quant, act_quant, testing
from pallas_kernels import hadamard_gather as hg


def _assert_is_hadamard(signs: np.ndarray, k: int) -> None:
    """``signs / sqrt(k)`` equals ``hadamard_matrix(k)`` entry by entry (atol 1e-6), compared in
    float64 a block of rows at a time: one float64 pass over a whole 8960 x 8960 matrix took
    ~25 s, the blocks ~1.5 s."""
    h = np.asarray(hadamard_matrix(k))
    assert signs.shape == h.shape == (k, k)
    for i in range(0, k, 512):
        np.testing.assert_allclose(signs[i : i + 512].astype(np.float64) / np.sqrt(k), h[i : i + 512], atol=1e-6)


@pytest.mark.parametrize("k", [8960, 560, 96, 1024, 12])
def test_kron_factors_rebuild_the_matrix(k):
    # The factors are +-1 int8 matrices, so their kron is exact in int8 (in float64: ~14 s at 8960).
    _assert_is_hadamard(functools.reduce(np.kron, kron_factors(k)), k)


@pytest.mark.parametrize("k", [8960, 560, 288, 336, 4480])
def test_layout_covers_every_column_once(k):
    lay = hg.gather_layout(k)
    assert lay.width <= act_quant.SINGLE_PASS_MAX and max(lay.pads) <= hg.GROUP_MAX
    assert int(np.prod(lay.dims)) == k and all(p >= 16 and p & (p - 1) == 0 for p in lay.pads)
    col, valid = hg.columns(lay)
    np.testing.assert_array_equal(np.sort(col[valid]), np.arange(k))
    # The padded kron of the group matrices is the order-k matrix on the real lanes. The group
    # matrices hold only -1, 0 and 1 (checked), so int8 holds them and their kron exactly.
    mats = [m.astype(np.int8) for m in lay.mats]
    assert all(np.array_equal(i8, m) for i8, m in zip(mats, lay.mats))
    full = functools.reduce(np.kron, mats)
    dense = np.zeros((k, k), np.int8)
    dense[np.ix_(col[valid], col[valid])] = full[np.ix_(valid, valid)]
    _assert_is_hadamard(dense, k)


def test_wan_ffn_width_layout():
    # 8960 = 20 x 28 x 16 (two Paley factors): 32 x 32 x 16 lanes; 13824 and 1000 have none.
    lay = hg.gather_layout(8960)
    assert (lay.dims, lay.pads) == ((20, 28, 16), (32, 32, 16))
    assert hg.gather_layout(13824) is None and hg.gather_layout(1000) is None
    # Narrow rows rotate in XLA (the [outer, inner] kernel stored wrong scales at K=8 on the GPU:
    # an inner factor under 16); a single Kronecker group is not a gathered layout.
    assert hg.gather_layout(8) is None and hg.gather_layout(200) is None
    assert act_quant.hadamard_layout(8) is None and act_quant.hadamard_layout(12) is None
    assert hg.gather_layout(1024) is not None and len(hg.gather_layout(1024).pads) >= 2
    assert act_quant.hadamard_layout(8960) is None


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("m,k", [(3, 560), (17, 288), (2, 336), (2, 8960)])
def test_interpret_matches_rotate_then_quantize(fmt, m, k):
    x = (jax.random.normal(jax.random.key(m + k), (m, k)) * 3).astype(jnp.bfloat16)
    q, s = hg.quantize_hadamard_gather(x, fmt, interpret=True)
    qr, sr = _quant.reference(x, fmt, hadamard=True)
    chex.assert_trees_all_equal((q, s), (qr, sr))
    # Through act_quant's entry point: the gathered kernel where the [outer, inner] view is missing.
    chex.assert_trees_all_equal(
        act_quant.quantize_int8(x, method="pallas", hadamard=True)[0]
        if fmt == "int8"
        else act_quant.quantize_fp8(x, method="pallas", hadamard=True)[0],
        qr,
    )


def test_off_the_gpu_and_unmappable_widths():
    x = jnp.ones((2, 8960), jnp.bfloat16)
    assert not act_quant.supports(x, hadamard=True)
    assert testing.kernel_path("act_quant_hadamard_wide", (x,)) == "xla"
    with pytest.raises(ValueError, match="no fused Hadamard for K=1000"):
        hg.quantize_hadamard_gather(jnp.ones((2, 1000), jnp.bfloat16), "int8", interpret=True)


def test_lowers_to_triton():
    text = (
        jax.jit(lambda v: hg.quantize_hadamard_gather(v, "int8"))
        .trace(jax.ShapeDtypeStruct((37, 8960), jnp.bfloat16))
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert "xla.gpu.triton" in text
