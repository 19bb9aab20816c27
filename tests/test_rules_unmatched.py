"""Rule lists: a rule that matches no leaf (a typo) is reported, a bad regex or spec names its rule,
and the library's own rule lists (policies on the bundled ports) never trip the warning."""

import re
import warnings

import jax.numpy as jnp
import pytest
from _pipeline_util import CONFIG, DIT, FLUX

import jquant
from jquant import models
from jquant import policy as P
from jquant.rules import UnmatchedRuleWarning, normalize_rules


def tree():
    x = jnp.ones((32, 16))
    return {
        "blocks_0": {"attn": {"to_q": {"kernel": x}, "to_k": {"kernel": x}}, "norm": {"scale": jnp.ones(16)}},
        "proj_out": {"kernel": x},
    }


def test_a_rule_matching_no_leaf_warns_naming_it_and_the_others_still_apply():
    with pytest.warns(UnmatchedRuleWarning, match=r"'attn/to_qkv' matches no leaf path of the tree's 4 leaves"):
        q, _ = jquant.quantize_params(tree(), [("attn/to_qkv", "int4/g16"), ("to_q", "int8"), (".*", None)])
    assert isinstance(q["blocks_0"]["attn"]["to_q"]["kernel"], jquant.QArray)
    assert not isinstance(q["proj_out"]["kernel"], jquant.QArray)


def test_strict_raises_naming_every_unmatched_rule():
    with pytest.raises(ValueError, match=r"rules 'to_qkv', 'ffn/' match no leaf path"):
        jquant.quantize_params(tree(), [("to_qkv", "int8"), ("ffn/", "int4/g16"), (".*", None)], strict=True)


def test_legitimately_idle_rules_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedRuleWarning)
        # a catch-all after rules that already decide every layer, a rule for a leaf the defaults skip,
        # a single spec, and a single spec on an empty tree
        jquant.quantize_params(tree(), [("kernel", "int8"), ("norm", None), (".*", "int4/g16")])
        jquant.quantize_params(tree(), "int8")
        jquant.quantize_params({}, "int8")
        normalize_rules([(re.compile("to_k"), "int8")], tree(), strict=True)


@pytest.mark.parametrize(
    "rules, needles",
    [
        ([("blocks_(0", "int8")], ["rule 0 'blocks_(0'", "bad regular expression", "position"]),
        ([(".*", "int8"), ("to_[q", None)], ["rule 1 'to_[q'"]),
        ([("to_q", "int4/g16x")], ["rule 0 'to_q'", "unknown option"]),
        ([("to_q", "int8", "extra")], ["rule 0", "pair"]),
    ],
)
def test_bad_rules_raise_naming_the_rule(rules, needles):
    with pytest.raises(ValueError) as e:
        jquant.quantize_params(tree(), rules)
    for s in needles:
        assert s in str(e.value)


@pytest.mark.parametrize("cfg", [CONFIG, FLUX, DIT], ids=["wan", "flux", "dit"])
def test_policy_rules_on_bundled_ports_match(cfg):
    """Policies label every kernel by role, so each exact-path rule matches: no warning, even strict."""
    shapes = models.param_shapes(cfg)
    roles = models.layer_roles(cfg, shapes)
    for policy in [*P.POLICIES.values(), P.uniform("int8")]:
        normalize_rules(policy.rules(roles), shapes, strict=True)
