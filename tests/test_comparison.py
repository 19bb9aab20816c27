"""The comparison tables' library side (jquant.algorithms.comparison): the toy problems' Context
runs the library's transforms exactly as the explicit calls the tables used to make."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import policy
from jquant.algorithms import comparison as cmp
from jquant.algorithms import fold, gptq, quarot, rtn, smoothquant, svd
from jquant.algorithms import layerwise as lw
from jquant.algorithms.linear_tree import get_kernel
from jquant.algorithms.synthetic import layer_problem
from jquant.algorithms.toy import layer_roles
from jquant.rules import quantize_params

W4 = policy.uniform("int4")


@pytest.fixture(scope="module")
def block():
    return cmp.block_toy(0, dim=64, mlp=128, batch=4, tokens=16)


@pytest.fixture(scope="module")
def layer():
    return cmp.layer_toy(0, 64, 32, 128)


def _same(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(bool(jnp.array_equal(x, y)) for x, y in zip(la, lb))


def test_toy_roles_keep_the_modulation_in_float(block, layer):
    assert block.roles["adaLN/kernel"] == ("modulation",)
    assert W4.plan(block.roles)["adaLN/kernel"] is None
    assert set(W4.plan(layer.roles).values()) == {"int4"}
    assert layer_roles(layer.variables) == layer.roles


def test_rtn_and_gptq_transforms_match_the_explicit_rules(block):
    ctx, v = block.context(), block.variables
    rules = [("adaLN", None), (".*", "int4")]
    assert _same(rtn.transform(W4)(v, ctx), {**v, "params": quantize_params(v["params"], rules)[0]})
    assert _same(gptq.transform(W4)(v, ctx), {**v, "params": gptq.gptq(v["params"], block.stats(v), rules)})


def test_stats_are_cached_per_variables_object(block):
    v = block.variables
    assert block.stats(v) is block.stats(v)
    assert block.stats(dict(v)) is not block.stats(v)


def test_quarot_plan_of_the_toy_block_is_its_hand_written_plan(block):
    plan = quarot.dit_plan(block.variables["params"], block.roles, block.head_dim, seed=3)
    hand = quarot.QuaRotConfig(skip="adaLN", vo_groups=((("to_v",), ("to_out",)),), head_dim=block.head_dim, seed=3)
    assert plan.vo_groups == hand.vo_groups
    assert quarot.online_paths(block.variables, plan) == quarot.online_paths(block.variables, hand)
    assert _same(quarot.transform(seed=3)(block.variables, block.context()), quarot.quarot(block.variables, None, hand))


def test_rotation_and_smoothing_keep_the_float_output(block):
    ctx = block.context()
    for t in (quarot.transform(seed=0), smoothquant.smoothing(W4, alpha=0.5, act="int8/token")):
        e, e_ho = block.error(t(block.variables, ctx), None)
        assert e < 1e-9 and e_ho < 1e-9, t.name


def test_smoothing_is_smoothquant_search_folded(layer):
    ctx, v = layer.context(), layer.variables
    cfg = smoothquant.SmoothQuantConfig(alpha=0.5, act="int8/token")
    scales, _ = smoothquant.smoothquant_search(v["params"], layer.stats(v), [(".*", "int4")], cfg)
    params, aux = fold.smooth(v["params"], scales)
    want = {**v, "params": params, "jquant": fold.aux_collection(aux)}
    assert _same(smoothquant.smoothing(W4, alpha=0.5, act="int8/token")(v, ctx), want)


def test_loftq_transform_is_loftq(layer):
    v = layer.variables
    got = svd.loftq_transform(W4, rank=4, iters=2)(v, layer.context())
    assert _same(got, svd.loftq(v, None, svd.LoftQConfig(rules=[(".*", "int4")], rank=4, iters=2)))


def test_bits_per_weight_counts_codes_scales_and_branches(layer):
    ctx, v = layer.context(), layer.variables
    q = rtn.transform(W4)(v, ctx)
    assert cmp.bits_per_weight(q) == pytest.approx(lw.nominal_bits_per_weight(get_kernel(q, "layer")))
    qc = svd.lowrank_correction(v, q, layer.stats(v), svd.CorrectionConfig(rank=4))
    k, n = get_kernel(v, "layer").shape
    assert cmp.bits_per_weight(qc) - cmp.bits_per_weight(q) == pytest.approx(16 * 4 * (k + n) / (k * n))
    assert cmp.bits_per_weight(v) == 0.0


def test_layer_data_splits_one_draw():
    x, x_ho, w = cmp.layer_data(1, 16, 8, 10)
    x_all, w_all = layer_problem(1, 16, 8, 20)
    np.testing.assert_array_equal(np.concatenate([x, x_ho]), x_all)
    np.testing.assert_array_equal(w, w_all)


def test_table_groups_rows_and_marks_missing_errors():
    rows = [
        cmp.Row("g1", "a", "int4", 4.5, 1e-3, 2e-3),
        cmp.Row("g1", "b", "int8", 8.25, float("nan"), 1e-4, "x"),
        cmp.Row("g2", "c", "int3", 3.0, 0.5, 0.25),
    ]
    text = cmp.table(rows)
    assert text.count("| method |") == 2 and "**g1**" in text and "**g2**" in text
    assert "| a | `int4` | 4.500 | 1.00e-03 | 2.00e-03 |  |" in text
    assert "| b | `int8` | 8.250 | - | 1.00e-04 | x |" in text


def test_splice_and_keep_sections():
    page = cmp.splice("# page\n", "rotations", "first")
    assert page == "# page\n\n<!-- rotations -->\nfirst\n<!-- /rotations -->\n"
    page = cmp.splice(page, "rotations", "second\n")
    assert "second" in page and "first" not in page
    fresh = cmp.keep(page, "# regenerated\n")
    assert fresh.startswith("# regenerated\n") and "<!-- rotations -->\nsecond\n<!-- /rotations -->" in fresh
