"""Recipes: the registry, every registered recipe on a tiny Wan, composition, exactness of rotations."""

import jax.numpy as jnp
import numpy as np
import pytest
from _pipeline_util import tiny_bundle

from jquant import policy as pol
from jquant.algorithms.fold import flat_aux as _flat_aux
from jquant.pipeline import calibrate as C
from jquant.pipeline import recipes as rc
from jquant.pipeline import runtime as R
from jquant.pipeline.tables import TableConfig
from jquant.qarray import QArray

# what a block kernel (blocks_0/ffn/net_2, K = 128) and its aux look like after each recipe
EXPECT = {
    "fp8-w": ("fp8_e4m3/c", set()),
    "fp8-wa": ("fp8_e4m3/c", set()),
    "int8-w": ("int8/c", set()),
    "int8-wa-smooth": ("int8/c", {"input_mul"}),
    "w4a16-gptq": ("int4/g64", set()),
    "w4a16-awq": ("int4/g64", {"input_mul"}),
    "nf4": ("nf4/g64", set()),
    "q4_k_m": ("q8_0/g32", set()),  # K = 128 is not a multiple of 256: Q8_0 fallback
    "q5_k_m": ("q8_0/g32", set()),
    "w4-svd": ("int4/g64", {"input_mul", "lowrank_a", "lowrank_b"}),
    "int8-wa-quarot": ("int8/c", {"hadamard", "input_mul"}),
    "fp8-quarot": ("fp8_e4m3/c", {"hadamard", "input_mul"}),
    "w4a4-quarot": ("int4/g64", {"hadamard", "input_mul"}),
    "w4-quarot-svd": ("int4/g64", {"hadamard", "input_mul", "lowrank_a", "lowrank_b"}),
}
SLOW = {
    "w4a4-spinquant": "spinquant -> gptq[uniform-int4/g64]",
    "quip2": "quip[uniform-int4/g64]",
}  # tested cheaper below


@pytest.fixture(scope="module")
def env():
    b = tiny_bundle()
    cal = C.Calibrator(b, C.CalibrationConfig(num_samples=2, batch=2, steps_per_sample=1))
    work = b.workload(2, 0)
    ref = R.float_model(b).sample(b.denoiser, work)
    return b, cal, work, ref


def test_registry_lists_available_and_missing_recipes():
    names = rc.names()
    assert set(names) == set(EXPECT) | set(SLOW)  # every recipe of issue 7
    assert not rc.MISSING
    assert {n: rc.get(n).transform.name for n in SLOW} == SLOW
    with pytest.raises(KeyError, match="unknown recipe 'nope'"):
        rc.get("nope")
    text = rc.describe()
    assert all(n in text for n in names)
    r = rc.get("int8-wa-smooth")
    assert r.act_spec == "int8/t" and r.with_activations(table=None).act_spec == "int8/token"
    assert rc.get("int8-w").act_spec is None and "weight-only" in rc.get("int8-w").label
    with pytest.raises(ValueError, match="bare format"):
        rc.Recipe("x", "", rc.rtn(pol.uniform("int8")), act="int8/t")
    with pytest.raises(ValueError, match="unknown roles"):
        pol.Policy("bad", ((("attn",), "int8"),), None)


SAMPLED = ("int8-wa-smooth", "w4a4-quarot")  # a static table; rotations with int4 activations


@pytest.mark.parametrize("name", list(EXPECT))
def test_every_recipe_quantizes(env, name):
    b, cal, work, ref = env
    recipe = rc.get(name)
    qm = C.quantize(b, recipe, cal)
    fmt, aux = EXPECT[name]
    leaves = dict(_leaf_items(qm.params))
    k = leaves["blocks_0/ffn/net_2/kernel"]
    assert isinstance(k, QArray) and str(k.spec) == fmt
    assert set(_flat_aux(qm.variables).get("blocks_0/ffn/net_2", {})) == aux
    assert not isinstance(leaves["proj_out/kernel"], QArray)  # the head stays in float
    assert (qm.table is not None) == (recipe.table is not None) and qm.act == recipe.act_spec
    assert qm.info["recipe"] == name and qm.info["seconds"]["total"] > 0
    if name in SAMPLED:
        out = qm.sample(b.denoiser, work)
        rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        assert np.isfinite(rel) and rel < (0.15 if recipe.act in (None, "int8", "fp8_e4m3") else 0.6), rel


def _leaf_items(tree):
    from jquant.rules import flatten_with_paths

    return flatten_with_paths(tree)


def test_rotations_are_exact_in_float_and_chains_compose(env):
    b, cal, work, ref = env
    rotated = rc.quarot()(cal.float_variables, cal.context())
    out = R.QuantizedModel(rotated).sample(b.denoiser, work)
    np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-4)  # exact rewrite of the float model
    mine = rc.Recipe(
        "mine",
        "QuaRot then int8 RTN, static single table",
        rc.chain(rc.quarot(), rc.rtn(pol.uniform("int8"))),
        act="int8",
        table=TableConfig("single"),
    )
    assert mine.transform.name == "quarot -> rtn[uniform-int8]" and not mine.transform.needs_stats
    qm = C.quantize(b, mine, cal)
    assert "hadamard" in _flat_aux(qm.variables)["blocks_0/attn1/to_q"]
    assert qm.table.num_groups == 1 and set(qm.table.scales) == set(C.quantized_layers(qm.variables))
    with pytest.raises(TypeError, match="not a Transform"):
        rc.chain(rc.quarot(), "gptq")
    # the slow SpinQuant recipe's building block, cheaper: a few optimizer steps on few rows
    spun = rc.chain(rc.spinquant(steps=2, max_tokens=32), rc.rtn(pol.uniform("int4/g64")))(
        cal.float_variables, cal.context()
    )
    assert "hadamard" in _flat_aux(spun)["blocks_0/attn1/to_q"] and isinstance(
        dict(_leaf_items(spun["params"]))["blocks_0/attn1/to_v/kernel"], QArray
    )
    other = C.Calibrator(tiny_bundle(num_steps=2), C.CalibrationConfig(num_samples=1, batch=1))
    with pytest.raises(ValueError, match="another model bundle"):
        C.quantize(b, mine, other)


def test_every_building_block_is_a_transform_factory():
    u = pol.uniform("int4/g64")
    for make in (rc.rtn, rc.gptq, rc.awq, rc.smoothquant, rc.smoothing, rc.svdquant, rc.loftq, rc.quip, rc.kquant):
        step = make("Q4_K_M") if make is rc.kquant else make(u)
        assert isinstance(step, rc.Transform) and step.name
    assert rc.chain(rc.quarot(), rc.correct(rc.gptq(u))).name == f"quarot -> gptq[{u.name}] + lowrank"
