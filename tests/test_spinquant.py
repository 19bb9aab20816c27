"""SpinQuant (jquant.algorithms.spinquant): Cayley rotations learned with optax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jquant.algorithms import quarot as Q
from jquant.algorithms import spinquant as S
from jquant.algorithms.linear_tree import capture_inputs, jitted_apply, relative_error
from jquant.algorithms.synthetic import layer_problem
from jquant.algorithms.toy import outlier_block
from jquant.hadamard import random_hadamard
from jquant.qarray import dequantize, quantize
from jquant.rules import quantize_params

VO = ((("to_v",), ("to_out",)),)


@settings(max_examples=8, deadline=None)
@given(n=st.sampled_from([8, 32]), seed=st.integers(0, 1000), scale=st.floats(0.01, 3.0))
def test_cayley_is_orthogonal(n, seed, scale):
    p = jnp.asarray(scale * np.random.default_rng(seed).standard_normal((n, n)), jnp.float32)
    assert S.orthogonality_error(S.cayley(p)) < 1e-5


def test_ste_quant_matches_rtn_and_passes_gradients():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((64, 32)), jnp.float32)
    np.testing.assert_allclose(S.ste_quant(w, "int4"), dequantize(quantize(w, "int4")), atol=1e-6)
    g = jax.grad(lambda a: jnp.sum(S.ste_quant(a, "int4") ** 2))(w)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
    with pytest.raises(ValueError, match="symmetric int"):
        S.ste_quant(w, "nf4")


def test_learned_rotation_beats_its_rht_start_on_structured_outliers():
    act = "int4/token"
    x, w = map(jnp.asarray, layer_problem(0, 64, 64, 256))
    r, losses = S.learn_rotation(x, w, S.SpinQuantConfig(act=act, steps=80, lr=2e-3))
    assert S.orthogonality_error(r) < 1e-5
    assert float(losses[-1]) < 0.9 * float(losses[0]), losses
    r0 = random_hadamard(64, 0)

    def err(rot):  # the real quantized error (QArray path), not the training loss
        xq = dequantize(quantize(x @ rot, act))
        return relative_error(xq @ dequantize(quantize(rot.T @ w, "int4")), x @ w)

    assert err(r) < err(r0)


@pytest.fixture(scope="module")
def block():
    blk, variables, (x, c) = outlier_block(
        seed=0, dim=128, heads=4, mlp=256, tokens=32, batch=4, qk_norm=True, use_rope=True
    )
    return blk, variables, x, c, capture_inputs(blk, variables, x, c)


def test_spinquant_tree_is_exact_and_beats_quarot(block):
    blk, variables, x, c, samples = block
    run = jitted_apply(blk)
    y = run(variables, x, c)
    act = "int4/token"
    cfg = S.SpinQuantConfig(act=act, vo_groups=VO, head_dim=32, skip="adaLN", steps=100, lr=2e-3)
    spun, curves = S.spinquant_with_losses(variables, samples, cfg)
    assert float(curves[0][-1]) < float(curves[0][0])
    assert relative_error(run(spun, x, c), y) < 1e-5
    # steps=0 is QuaRot with the same seed
    same = S.spinquant(variables, samples, S.SpinQuantConfig(vo_groups=VO, head_dim=32, skip="adaLN", steps=0))
    rotated = Q.quarot(variables, None, Q.QuaRotConfig(skip="adaLN", vo_groups=VO, head_dim=32))
    np.testing.assert_allclose(same["params"]["to_out"]["kernel"], rotated["params"]["to_out"]["kernel"], atol=1e-5)

    def err(v):  # quantize the layers the learned rotation touches
        q = {**v, "params": quantize_params(v["params"], [("to_v|to_out", "int4"), (".*", None)])[0]}
        return relative_error(run(q, x, c, act=act), y)

    assert err(spun) < err(rotated)


def test_spinquant_needs_samples_and_groups(block):
    blk, variables, x, c, _ = block
    with pytest.raises(KeyError, match="no activation samples for layer 'to_v'"):
        S.spinquant(variables, {}, S.SpinQuantConfig(vo_groups=VO, head_dim=32, steps=1))
    with pytest.raises(ValueError, match="vo_groups is empty"):
        S.spinquant(variables, {}, S.SpinQuantConfig())
    with pytest.raises(ValueError, match="optimizer must be"):
        S.learn_rotation(x[0], variables["params"]["to_q"]["kernel"], S.SpinQuantConfig(optimizer="lbfgs", steps=1))
    with pytest.raises(ValueError, match="nothing is quantized"):
        S.learn_rotation(x[0], variables["params"]["to_q"]["kernel"], S.SpinQuantConfig(w_spec=None, act=None, steps=1))
