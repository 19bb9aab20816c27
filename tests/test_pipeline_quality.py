"""Quality on the bundled trained tiny Wan (same noise and classes for every configuration).

One-step errors (teacher-forced, deterministic) compare activation scale tables: each
step's quantization error without the chaos of sampling; docs/results.md has PSNR over
more clips. Flicker is measured on sampled clips. Settings are small to stay fast; the
orderings asserted held for every evaluation seed tried (0, 1, 2).
"""

import numpy as np
import pytest

from jquant import policy as P
from jquant.pipeline import calibrate as C
from jquant.pipeline import evaluate as E
from jquant.pipeline import recipes as rc
from jquant.pipeline import runtime as R
from jquant.pipeline.denoiser import tiny_wan_bundle
from jquant.pipeline.tables import TableConfig


@pytest.fixture(scope="module")
def env():
    b = tiny_wan_bundle(num_steps=6)
    cal = C.Calibrator(b, C.CalibrationConfig(num_samples=2, batch=2))
    ref = E.reference(b, b.workload(2, 0))
    return b, cal, ref


@pytest.mark.parametrize("weights", ["int8", "int4/g32"])  # W8A8 and W4A8
def test_variance_aware_tables_beat_one_static_table(env, weights):
    b, cal, ref = env
    v = rc.rtn(P.uniform(weights))(cal.float_variables, cal.context())
    single = C.make_table(cal, v, "int8", TableConfig("single"))
    var = C.make_table(cal, v, "int8", TableConfig("variance", 4))
    assert single.num_groups == 1 and var.num_groups == 4
    e_single = E.one_step_errors(b, R.QuantizedModel(v, "int8/t", single), ref)
    e_var = E.one_step_errors(b, R.QuantizedModel(v, "int8/t", var), ref)
    assert e_var.mean() < 0.97 * e_single.mean(), (e_var.mean(), e_single.mean())
    assert np.all(e_var <= e_single * 1.02)  # no step gets worse


def test_role_mixed_precision_beats_uniform_4bit_on_flicker_at_lower_memory(env):
    b, cal, ref = env
    ctx = cal.context()
    uniform = R.QuantizedModel(rc.rtn(P.uniform("int4/g16"))(cal.float_variables, ctx))
    mixed = R.QuantizedModel(rc.rtn(P.TEMPORAL_INT8)(cal.float_variables, ctx))
    assert mixed.weight_bytes <= uniform.weight_bytes
    fu, fm = E.evaluate(b, uniform, ref)["flicker"], E.evaluate(b, mixed, ref)["flicker"]
    assert fm < 0.95 * fu, (fm, fu)
