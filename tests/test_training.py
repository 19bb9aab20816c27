"""jquant.training: LSQ fake quantization, the training forward, distillation, QAT, checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _pipeline_util import tiny_bundle
from hypothesis import given
from hypothesis import strategies as st

from jquant import nn as jnn
from jquant import policy as P
from jquant.formats import parse_spec
from jquant.pipeline import calibrate as C
from jquant.pipeline import recipes as rc
from jquant.pipeline.runtime import QuantizedModel
from jquant.qarray import QArray, codes, dequantize, quantize
from jquant.rules import quantize_params
from jquant.training import distill as D
from jquant.training import fakequant as F
from jquant.training import qat as Q


# --- LSQ -------------------------------------------------------------------------------------------------
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 2.0))
def test_lsq_forward_is_quantize_dequantize_and_gradients_are_lsq(seed: int, s: float) -> None:
    x = jax.random.normal(jax.random.key(seed), (16, 8)) * 3
    sc = jnp.full((2, 8), s, jnp.float32)  # int4 blocks of 8 along K
    spec = parse_spec("int4/g8")
    y = F.lsq(x, F.expand_blocks(sc, x.shape), -7.0, 7.0, 0.5)
    np.testing.assert_allclose(y, dequantize(quantize(x, spec, scale=sc)), rtol=1e-6, atol=1e-6)
    g = jax.random.normal(jax.random.key(seed + 1), x.shape)
    dx, ds = jax.grad(lambda a, b: jnp.sum(g * F.lsq(a, F.expand_blocks(b, a.shape), -7.0, 7.0, 0.5)), (0, 1))(x, sc)
    v = x / s
    inside = (v >= -7) & (v <= 7)
    np.testing.assert_allclose(dx, np.where(inside, g, 0.0), rtol=1e-6)
    per = np.where(v < -7, -7.0, np.where(v > 7, 7.0, np.round(v) - v)) * g * 0.5
    np.testing.assert_allclose(ds, per.reshape(2, 8, 8).sum(axis=1), rtol=1e-4, atol=1e-4)


def test_lsq_refuses_formats_it_cannot_train() -> None:
    fq = F.FakeQuant(jnp.ones((8, 4)), jnp.ones((1, 4)), parse_spec("nf4/g8"))
    with pytest.raises(ValueError, match="layer/kernel: LSQ trains symmetric integer"):
        fq.value("layer/kernel")


def test_fake_quant_roundtrip_is_exact() -> None:
    w = jax.random.normal(jax.random.key(0), (64, 32)) * 0.1
    q = quantize(w, "int4/g16")
    fq = F.from_quantized({"k": q})["k"]
    np.testing.assert_array_equal(fq.value(), dequantize(q))  # step 0 is the PTQ model
    back = F.to_quantized({"k": fq})["k"]
    assert isinstance(back, QArray) and back.spec == q.spec
    np.testing.assert_array_equal(codes(back), codes(q))


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16)(nn.gelu(nn.Dense(32)(x)))


@pytest.mark.parametrize("act", [None, "int8/token", "int4/token"])
def test_training_forward_matches_quantized_execution(act) -> None:
    m = _MLP()
    x = jax.random.normal(jax.random.key(1), (2, 5, 64))
    params = m.init(jax.random.key(0), x)["params"]
    qp = quantize_params(params, "int4/g32")[0]
    with jnn.quantized(act, backend="xla"):
        ref = m.apply({"params": qp}, x)
    with F.fake_quantized(act):
        out = m.apply({"params": F.from_quantized(qp)}, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # and it is differentiable in the latent weights and scales
    grads = jax.grad(lambda p: jnp.sum(_apply_fq(m, p, x, act) ** 2))(F.from_quantized(qp))
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves) and any(np.abs(g).sum() > 0 for g in leaves)


@pytest.mark.parametrize("block", [None, 16])
def test_training_forward_rotates_as_the_aux_entry_says(block) -> None:
    """A full-width or block-diagonal online Hadamard (aux ``hadamard``) is applied in training
    exactly as jquant.nn applies it in quantized execution."""
    m = _MLP()
    x = jax.random.normal(jax.random.key(1), (2, 5, 64))
    params = m.init(jax.random.key(0), x)["params"]
    qp = quantize_params(params, "int4/g32")[0]
    aux = {"Dense_0": {"hadamard": jnn.hadamard_entry(block)}}
    with jnn.quantized("int8/token", backend="xla"):
        ref = m.apply({"params": qp, jnn.AUX_COLLECTION: aux}, x)
    with F.fake_quantized("int8/token"):
        out = m.apply({"params": F.from_quantized(qp), jnn.AUX_COLLECTION: aux}, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    with F.fake_quantized("int8/token"):  # the entry matters: no rotation gives another output
        plain = m.apply({"params": F.from_quantized(qp)}, x)
    assert float(jnp.abs(plain - out).max()) > 1e-3


def _apply_fq(m, p, x, act):
    with F.fake_quantized(act):
        return m.apply({"params": p}, x)


def test_static_activation_scales_train_by_lsq() -> None:
    m = _MLP()
    x = jax.random.normal(jax.random.key(1), (2, 5, 64))
    fq = F.from_quantized(quantize_params(m.init(jax.random.key(0), x)["params"], "int8")[0])
    scales = {"Dense_0": jnp.float32(0.02), "Dense_1": jnp.float32(0.02)}

    def f(sc):
        with F.fake_quantized("int8/t", sc):
            return jnp.sum(m.apply({"params": fq}, x) ** 2)

    g = jax.grad(f)(scales)
    assert all(float(jnp.abs(v)) > 0 for v in g.values())
    with pytest.raises(KeyError, match="Dense_1: static training activations but no scale"):
        f({"Dense_0": jnp.float32(0.02)})


# --- distillation / QAT on a tiny random Wan ---------------------------------------------------------
@pytest.fixture(scope="module")
def setup():
    bundle = tiny_bundle(num_steps=3)
    cal = C.Calibrator(bundle, C.CalibrationConfig(num_samples=2, batch=2))
    qm = C.quantize(bundle, rc.Recipe("w4a8", "rtn int4/g32 + int8 tokens", rc.rtn(P.uniform("int4/g32")), "int8"), cal)
    data = D.teacher_data(bundle, [bundle.workload(4, 7)])
    return bundle, cal, qm, data


def test_distillation_lowers_the_loss_and_exports_qarrays(setup) -> None:
    bundle, _, qm, data = setup
    cfg = D.DistillConfig(steps=12, batch=4, lr=1e-4, scale_lr=1e-4)
    res = D.distill(bundle, qm, data, cfg)
    assert res.losses.shape == (12,)
    assert D.mean_loss(bundle, res.model, data) < 0.9 * D.mean_loss(bundle, qm, data)
    kernels = [x for x in jax.tree.leaves(res.model.params, is_leaf=lambda z: isinstance(z, QArray))]
    assert any(isinstance(k, QArray) for k in kernels)
    assert res.model.act == qm.act and res.model.name.endswith("+distill")
    lat = res.model.sample(bundle.denoiser, bundle.workload(2, 0))  # runs in the jitted sampler
    assert np.isfinite(np.asarray(lat)).all()


def test_distillation_trains_and_keeps_the_models_act_rules(setup) -> None:
    # A mixed policy (here: FFN activations left in 16 bits) is part of the model being trained:
    # the training loss sees it, and the student carries it.
    bundle, _, qm, data = setup
    mixed = dataclasses.replace(qm, act_rules=(("ffn/", None),))
    assert D.mean_loss(bundle, mixed, data) != pytest.approx(D.mean_loss(bundle, qm, data), rel=1e-3)
    res = D.distill(bundle, mixed, data, D.DistillConfig(steps=2, batch=2, lr=1e-4, scale_lr=1e-4))
    assert res.model.act_rules == (("ffn/", None),)


def test_distillation_in_scanned_chunks_equals_step_by_step_and_fits_a_time_cap(setup) -> None:
    bundle, _, qm, data = setup
    cfg = D.DistillConfig(steps=4, batch=2, lr=1e-4, scale_lr=1e-4)
    one = D.distill(bundle, qm, data, cfg)
    two = D.distill(bundle, qm, data, dataclasses.replace(cfg, chunk=2))
    np.testing.assert_allclose(two.losses, one.losses, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(two.params, one.params, rtol=1e-5, atol=1e-7)
    capped = D.distill(bundle, qm, data, dataclasses.replace(cfg, steps=50, chunk=1, max_seconds=1e-6))
    assert capped.losses.shape == (2,) and capped.model.info["distill"]["steps_run"] == 2
    with pytest.raises(ValueError, match="chunk"):
        D.DistillConfig(chunk=0)


def test_distillation_with_student_rollouts_trains_on_the_students_own_trajectories(setup) -> None:
    bundle, _, qm, _ = setup
    data = D.teacher_data(bundle, [bundle.workload(2, 7), bundle.workload(2, 8, 2)])
    assert len(data.workloads) == 2 and data.num_samples == 4
    # The student's trajectories differ from the teacher's: labelled where the student went.
    st = D.student_data(bundle, qm, data.workloads[1:])
    assert st.xs.shape == (data.xs.shape[0], 2, *data.xs.shape[2:])
    assert not np.allclose(np.asarray(st.xs[1:]), np.asarray(data.xs[1:, 2:]))
    chex.assert_trees_all_close(st.xs[0], data.xs[0, 2:])  # same start noise
    cfg = D.DistillConfig(steps=4, batch=4, lr=1e-4, scale_lr=1e-4)
    plain = D.distill(bundle, qm, data, cfg)
    roll = D.distill(bundle, qm, data, dataclasses.replace(cfg, rollout_every=2))
    np.testing.assert_allclose(roll.losses[:2], plain.losses[:2], rtol=1e-6)  # before the first rollout
    assert not np.allclose(roll.losses[2:], plain.losses[2:])  # after it: another training set
    with pytest.raises(ValueError, match=">= 2 workloads"):
        D.distill(
            bundle,
            qm,
            dataclasses.replace(data, workloads=data.workloads[:1]),
            dataclasses.replace(cfg, rollout_every=2),
        )


def test_distillation_trains_a_static_scale_table(setup) -> None:
    bundle, cal, _, data = setup
    recipe = rc.Recipe("w8a8", "int8 static", rc.rtn(P.uniform("int8")), "int8", rc.VARIANCE_TABLE)
    qm = C.quantize(bundle, recipe, cal)
    cfg = D.DistillConfig(steps=4, batch=2, lr=0.0, scale_lr=1e-3, feature_weight=0.5)
    res = D.distill(bundle, qm, data, cfg)
    moved = [not np.allclose(res.model.table.scales[p], qm.table.scales[p]) for p in qm.table.scales]
    assert any(moved) and res.model.table.groups.tolist() == qm.table.groups.tolist()
    assert np.isfinite(res.losses).all()


def test_qat_on_the_task_loss_runs_and_learns(setup) -> None:
    bundle, _, qm, _ = setup

    def draw(key):
        x0 = jax.random.normal(key, (2, *bundle.workload(1, 0).x_T.shape[1:])) * 0.5
        return x0, bundle.workload(2, 0).cond

    res = Q.qat(bundle, qm, D.DistillConfig(steps=10, batch=2, lr=1e-3), batches=draw)
    assert res.losses[-3:].mean() < res.losses[:3].mean()
    with pytest.raises(ValueError, match="static scale tables"):
        Q.qat(bundle, QuantizedModel(qm.variables, "int8/t", _table(setup), "x"), D.DistillConfig(steps=1))


def _table(setup):
    bundle, cal, _, _ = setup
    return C.quantize(bundle, rc.Recipe("t", "t", rc.rtn(P.uniform("int8")), "int8", rc.VARIANCE_TABLE), cal).table


def test_training_state_checkpoint_roundtrip(setup, tmp_path: Path) -> None:
    _, _, qm, _ = setup
    params = F.from_quantized(qm.params)
    opt = D.optimizer(D.DistillConfig(), D._labels(params, {}, True)[0])
    state = (params, opt.init(params))
    D.save_state(tmp_path / "ck", state, 7)
    back, step = D.restore_state(tmp_path / "ck", state)
    assert step == 7
    chex.assert_trees_all_equal(back, state)
    with pytest.raises(Exception, match="arrays"):
        D.restore_state(tmp_path / "ck", (params,))


def test_distill_refuses_a_float_start(setup) -> None:
    bundle, _, _, data = setup
    with pytest.raises(ValueError, match="no QArray kernels"):
        D.distill(bundle, QuantizedModel({"params": bundle.params}, None, None, "fp32"), data)


def test_tiny_wan_batches_are_clips_of_the_conditioned_digits() -> None:
    from jquant.pipeline.denoiser import tiny_wan_bundle

    b = tiny_wan_bundle(num_steps=2)
    x0, text = Q.tiny_wan_batches(b, 6, drop_prob=0.5)(jax.random.key(3))
    assert x0.shape == b.workload(6, 0).x_T.shape and text.shape == b.workload(6, 0).cond.shape
    assert float(x0.min()) >= -1.0 and float(x0.max()) <= 1.0 and float(x0.max()) > 0.0  # ink on a -1 background
    null = b.extra["tiny"].null_text(6)
    dropped = np.all(np.asarray(text) == np.asarray(null), axis=(1, 2))
    assert 0 < dropped.sum() < 6  # some rows dropped to the null text, some kept their class text


def test_steps_that_fit_rounds_to_whole_chunks_within_done_and_total() -> None:
    from jquant.training.budget import steps_that_fit

    assert steps_that_fit(100, 20000, 0.01, 5.0, 50) == 100 + 500  # 500 steps fit, whole chunks
    assert steps_that_fit(100, 20000, 0.01, 5.2, 50) == 600  # 520 fit, rounded down to 500
    assert steps_that_fit(100, 300, 0.01, 5.0) == 300  # never above the asked total
    assert steps_that_fit(100, 300, 0.01, -3.0) == 100  # an overspent budget keeps what ran
    with pytest.raises(ValueError, match="per_step_s"):
        steps_that_fit(1, 2, 0.0, 1.0)
