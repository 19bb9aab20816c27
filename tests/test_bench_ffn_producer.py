"""scripts/bench_ffn_producer.py's helpers on the CPU: the block weights decode back, and the
fused and unfused FFNs agree with the float32 reference they are checked against on the GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _scripts import load_script, unload_script


@pytest.fixture(scope="module")
def bench():
    module = load_script("bench_ffn_producer")
    yield module
    unload_script(module)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_block_weights_decode_within_their_rounding(bench, fmt):
    w = jax.random.normal(jax.random.key(0), (256, 384), jnp.float32)
    q, s = bench._block_weight(w, fmt)
    assert q.dtype == bench.FORMATS[fmt] and s.shape == (2, 3)
    err = np.abs(np.asarray(bench._dequant(q, s) - w))
    step = np.repeat(np.repeat(np.asarray(s), 128, 0), 128, 1)
    bound = 0.5 * step if fmt == "int8" else np.maximum(np.abs(np.asarray(w)) * 2.0**-4, step * 2.0**-9)
    assert np.all(err <= bound * 1.0001)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_fused_and_unfused_ffn_match_the_reference(bench, fmt):
    a = bench._operands(fmt, jax.random.key(1), 64, 256, 384)
    xq, xs, wu_q, wu_s, b_up, wd_q, wd_s, b_dn = a
    hq, hs = bench.gemm_act_quant.gemm_act_quant_reference(*a[:5], act="gelu_tanh", fmt=fmt)
    h_ref = bench._dequant(hq, hs) @ bench._dequant(wd_q, wd_s).T + b_dn
    for fn in (bench.fused, bench.unfused):
        assert bench._check(h_ref)(fn(*a, fmt))["ok"]
    wrong = bench._check(h_ref)(jnp.zeros_like(h_ref))
    assert not wrong["ok"]
