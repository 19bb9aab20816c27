"""Per-layer activation specs (``jquant.nn.quantized(act_rules=...)``, ``QuantizedModel.act_rules``):
a mixed policy such as int4 activations with int8 on the FFN layers."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import dispatch
from jquant import nn as jnn
from jquant.formats import parse_spec
from jquant.pipeline import artifacts
from jquant.pipeline.runtime import QuantizedModel
from jquant.qarray import quantize


class _TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(64, use_bias=False, name="ffn")(nn.Dense(64, use_bias=False, name="attn")(x))


def _qparams():
    x = jax.random.normal(jax.random.key(0), (5, 64), jnp.float32)
    params = _TwoLayers().init(jax.random.key(1), x)["params"]
    return x, jax.tree.map(lambda w: quantize(w, "int8"), params)


def _by_hand(x, q, first, second):
    spec = lambda s: None if s is None else parse_spec(s)
    h = dispatch.linear(x, q["attn"]["kernel"], act=spec(first), backend="xla")
    return dispatch.linear(h, q["ffn"]["kernel"], act=spec(second), backend="xla")


@pytest.mark.parametrize("rule,second", [("int8/token", "int8/token"), (None, None)])
def test_the_first_matching_rule_sets_a_layers_activations(rule, second):
    x, q = _qparams()
    with jnn.quantized("int4/token", act_rules=(("ffn", rule), ("attn|ffn", "fp8_e4m3/token")), backend="xla"):
        got = _TwoLayers().apply({"params": q}, x)
    # attn: the second rule (fp8); ffn: the first (int8, or 16-bit activations for None)
    chex.assert_trees_all_close(got, _by_hand(x, q, "fp8_e4m3/token", second), rtol=1e-6, atol=1e-6)
    with jnn.quantized("int4/token", backend="xla"):  # without rules: int4 everywhere, which differs
        plain = _TwoLayers().apply({"params": q}, x)
    chex.assert_trees_all_close(plain, _by_hand(x, q, "int4/token", "int4/token"), rtol=1e-6, atol=1e-6)
    assert not np.allclose(plain, got)


def test_bad_rules_are_named():
    with pytest.raises(ValueError, match=r"act_rules\[0\] .*: bad regular expression"):
        jnn.compile_act_rules([("ffn(", "int8/token")])
    with pytest.raises(ValueError, match=r"act_rules\[1\]: 'int8/t' is static"):
        jnn.compile_act_rules([("attn", None), ("ffn", "int8/t")])
    with pytest.raises(ValueError, match=r"act_rules\[0\]: expected a \(regex, spec or None\) pair"):
        jnn.compile_act_rules(["ffn"])
    with pytest.raises(ValueError, match="dynamic activations only"):
        with jnn.quantized("int8/t", static=True, act_rules=(("ffn", "int8/token"),)):
            pass
    _, q = _qparams()
    with pytest.raises(ValueError, match=r"act_rules\[0\] .*: bad regular expression"):
        QuantizedModel({"params": q}, "int4/token", act_rules=(("[", "int8/token"),))


def test_rules_survive_save_and_load(tmp_path):
    _, q = _qparams()
    qm = QuantizedModel({"params": q}, "int4/token", name="mixed", act_rules=(("ffn", parse_spec("int8/token")),))
    assert qm.act_rules == (("ffn", "int8/token"),)  # specs kept as their strings
    artifacts.save_quantized(tmp_path, qm, {})
    back, meta = artifacts.load_quantized(tmp_path)
    assert back.act_rules == qm.act_rules and meta["act_rules"] == [["ffn", "int8/token"]]


def test_training_forward_starts_at_the_mixed_model():
    # The fake-quant training forward with the same rules is the PTQ model's forward at step 0.
    from jquant.training.fakequant import fake_quantized, from_quantized

    x, q = _qparams()
    rules = (("ffn", "int8/token"),)
    with jnn.quantized("int4/token", act_rules=rules, backend="xla"):
        want = _TwoLayers().apply({"params": q}, x)
    with fake_quantized("int4/token", act_rules=rules):
        got = _TwoLayers().apply({"params": from_quantized(q)}, x)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    with fake_quantized("int4/token"):  # without the rules: int4 on the FFN too
        plain = _TwoLayers().apply({"params": from_quantized(q)}, x)
    assert not np.allclose(plain, want, rtol=1e-5, atol=1e-5)
