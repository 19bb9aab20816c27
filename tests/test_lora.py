"""Run-time LoRA on quantized bases, merging, LoftQ init and QLoRA fine-tuning (jquant.training.lora)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _pipeline_util import tiny_bundle

from jquant import nn as jnn
from jquant.algorithms.linear_tree import get_aux, get_kernel, update_layer
from jquant.qarray import QArray, dequantize
from jquant.rules import quantize_params
from jquant.training import lora as L


@pytest.fixture(scope="module")
def wan():
    b = tiny_bundle(num_steps=2)
    w = b.workload(2, 0)
    return b, w


def _run(b, v, w):
    with jnn.quantized(None):
        return np.asarray(b.denoiser.apply(v, w.x_T, jnp.float32(600.0), w.cond))


def _adapters(v, pattern=r"blocks_0/(attn1/to_q|ffn/net_2)", rank=4, scale=0.05, seed=0):
    ads = L.init_adapters(v, L.select_paths(v, pattern), rank, jax.random.key(seed), alpha=8.0)
    return {
        p: L.Adapter(a.a, scale * jax.random.normal(jax.random.key(i + 10), a.b.shape), a.alpha)
        for i, (p, a) in enumerate(ads.items())
    }


def test_runtime_lora_on_int4_equals_the_merged_float_model_within_the_base_error(wan) -> None:
    b, w = wan
    fv = {"params": b.params}
    qv = {"params": quantize_params(b.params, [(r"blocks_.*kernel", "int4/g32")])[0]}
    ads = _adapters(fv, scale=0.5)
    y_f, y_q = _run(b, fv, w), _run(b, qv, w)
    y_f_merged = _run(b, L.merge_lora(fv, ads), w)
    y_q_lora = _run(b, L.apply_lora(qv, ads), w)
    assert isinstance(get_kernel(L.apply_lora(qv, ads), "blocks_0/attn1/to_q"), QArray)  # base stays packed
    lora_effect = np.abs(y_f_merged - y_f).max()
    base_err = np.abs(y_q - y_f).max()
    assert lora_effect > 3 * base_err  # the adapter matters more than the quantization
    assert np.abs(y_q_lora - y_f_merged).max() <= 1.5 * base_err + 1e-6
    # exactly: dequantized base + adapter
    deq = {"params": jax.tree.map(lambda x: dequantize(x) if isinstance(x, QArray) else x, qv["params"],
                                  is_leaf=lambda x: isinstance(x, QArray))}  # fmt: skip
    np.testing.assert_allclose(y_q_lora, _run(b, L.merge_lora(deq, ads), w), rtol=1e-4, atol=1e-4)


def test_strength_scales_the_branch_and_zero_is_the_base(wan) -> None:
    b, w = wan
    qv = {"params": quantize_params(b.params, [(r"blocks_.*kernel", "int4/g32")])[0]}
    ads = _adapters(qv)
    np.testing.assert_allclose(_run(b, L.apply_lora(qv, ads, 0.0), w), _run(b, qv, w), atol=1e-6)
    a1 = get_aux(L.apply_lora(qv, ads, 1.0), "blocks_0/attn1/to_q")["lowrank_b"]
    a2 = get_aux(L.apply_lora(qv, ads, 2.0), "blocks_0/attn1/to_q")["lowrank_b"]
    np.testing.assert_allclose(a2, 2 * a1, rtol=1e-6)
    ad = ads["blocks_0/attn1/to_q"]
    np.testing.assert_allclose(a1, ad.b * (ad.alpha / ad.rank), rtol=1e-6)


def test_lora_adds_to_an_existing_low_rank_branch(wan) -> None:
    b, w = wan
    qv = {"params": quantize_params(b.params, [(r"blocks_.*kernel", "int4/g32")])[0]}
    path = "blocks_0/attn1/to_q"
    k, n = get_kernel(qv, path).shape
    svd = update_layer(qv, path, aux={"lowrank_a": jnp.ones((k, 2)) * 0.01, "lowrank_b": jnp.ones((2, n)) * 0.01})
    ads = {path: _adapters(qv)[path]}
    both = L.apply_lora(svd, ads)
    assert get_aux(both, path)["lowrank_a"].shape == (k, 2 + 4)
    y = _run(b, both, w)
    y_svd, y_lora = _run(b, svd, w), _run(b, L.apply_lora(qv, ads), w)
    y0 = _run(b, qv, w)
    # one layer's two branches add (the model is nonlinear, so compare the first layer's output effect)
    assert np.abs(y - y0).max() > np.abs(y_svd - y0).max() * 0.5 and np.abs(y - y_lora).max() > 0


def test_bad_adapters_are_refused_with_the_path(wan) -> None:
    b, _ = wan
    v = {"params": b.params}
    ad = L.Adapter(jnp.zeros((3, 2)), jnp.zeros((2, 5)), 2.0)
    with pytest.raises(ValueError, match="blocks_0/attn1/to_q: adapter A"):
        L.apply_lora(v, {"blocks_0/attn1/to_q": ad})
    with pytest.raises(KeyError, match="nope"):
        L.apply_lora(v, {"nope": ad})
    k, n = get_kernel(v, "blocks_0/attn1/to_q").shape
    rot = update_layer(v, "blocks_0/attn1/to_q", aux={"hadamard": jnp.ones(())})
    with pytest.raises(ValueError, match="online Hadamard"):
        L.apply_lora(rot, {"blocks_0/attn1/to_q": L.Adapter(jnp.zeros((k, 2)), jnp.zeros((2, n)))})
    with pytest.raises(ValueError, match="matches no 2-D linear layer"):
        L.select_paths(v, "no_such_layer")


def test_merge_and_requantize(wan) -> None:
    b, w = wan
    qv = {"params": quantize_params(b.params, [(r"blocks_.*kernel", "int4/g32")])[0]}
    ads = _adapters(qv)
    merged = L.merge_lora(qv, ads, requantize=True)
    k = get_kernel(merged, "blocks_0/attn1/to_q")
    assert isinstance(k, QArray) and k.spec == get_kernel(qv, "blocks_0/attn1/to_q").spec
    ref = dequantize(get_kernel(qv, "blocks_0/attn1/to_q")) + ads["blocks_0/attn1/to_q"].delta()
    step = float(jnp.abs(ref).max()) / 7
    assert float(jnp.abs(dequantize(k) - ref).max()) <= step


def test_loftq_init_fits_the_float_weight_better_than_the_base_alone(wan) -> None:
    b, _ = wan
    fv = {"params": b.params}
    paths = L.select_paths(fv, r"blocks_0/attn1/to_(q|k)")
    qv, ads = L.loftq_init(fv, paths, "nf4/g32", rank=4, iters=2)
    for p in paths:
        w = get_kernel(fv, p)
        base = dequantize(get_kernel(qv, p))
        assert float(jnp.linalg.norm(w - base - ads[p].delta())) < float(jnp.linalg.norm(w - base))


def test_qlora_finetune_lowers_the_loss_with_a_frozen_nf4_base(wan) -> None:
    b, w = wan
    qv = {"params": quantize_params(b.params, [(r"blocks_.*kernel", "nf4/g32")])[0]}
    ads = L.init_adapters(qv, L.select_paths(qv, r"blocks_0/(attn1/to_(q|v)|ffn/net_2)"), 4, jax.random.key(0))
    target = jnp.zeros_like(w.x_T) + 0.5  # a new behaviour: everything denoises towards a flat 0.5 clip

    def batches(key):
        return target, w.cond

    trained, losses, secs = L.qlora_finetune(b.denoiser.module, qv, ads, batches, L.QLoRAConfig(steps=15, lr=3e-2))
    assert losses[-4:].mean() < 0.9 * losses[:4].mean() and secs > 0
    base = get_kernel(qv, "blocks_0/attn1/to_q")
    assert isinstance(base, QArray)  # the base was not touched
    assert float(jnp.abs(trained["blocks_0/attn1/to_q"].b).max()) > 0


@pytest.mark.parametrize("spec", ["q8_0", "q4_k", "nf4/g64", "int4/g64"])
def test_runtime_lora_over_any_qarray_base(spec: str) -> None:
    """GGUF block codecs (k-quants), NF4 and int4 bases: base + branch == dequantized base + merged adapter."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(32)(nn.gelu(nn.Dense(256)(x)))

    m, x = Net(), jax.random.normal(jax.random.key(0), (3, 256))
    params = m.init(jax.random.key(1), x)["params"]
    qv = {"params": quantize_params(params, [(r"Dense_.*kernel", spec)])[0]}
    ads = _adapters(qv, r"Dense_", rank=4, scale=0.3)
    with jnn.quantized(None):
        y = m.apply(L.apply_lora(qv, ads, 0.5), x)
    deq = {"params": jax.tree.map(lambda z: dequantize(z) if isinstance(z, QArray) else z, qv["params"],
                                  is_leaf=lambda z: isinstance(z, QArray))}  # fmt: skip
    ref = m.apply(L.merge_lora(deq, ads, 0.5), x)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    assert not np.allclose(y, m.apply(deq, x), atol=1e-3)  # the adapter changed the output
