"""scripts/fp8_pv_error.py: the rounding helpers and the decomposition's structure, on tiny inputs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "fp8_pv_error.py"
_spec = importlib.util.spec_from_file_location("_fp8_pv_error", _PATH)
fe = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fe
_spec.loader.exec_module(fe)

from pallas_kernels import attention_ref as ar  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32), st.integers(1, 22))
def test_keep_mantissa_bits_rounds_to_the_nearest_representable(x, bits):
    got = float(fe.keep_mantissa_bits(jnp.float32(x), bits))
    if x == 0:
        assert got == 0
        return
    ulp = 2.0 ** (np.floor(np.log2(abs(x))) - bits)
    assert abs(got - x) <= ulp / 2 * (1 + 1e-6)
    assert float(fe.keep_mantissa_bits(jnp.float32(got), bits)) == got  # idempotent


def test_full_precision_accumulator_matches_fp32_and_restart_at_the_end_changes_nothing():
    key = jax.random.key(0)
    p = jax.nn.softmax(jax.random.normal(key, (1, 2, 8, 128)), axis=-1)
    v = jax.random.normal(jax.random.key(1), (1, 128, 2, 16))
    ref = jnp.einsum("bhqk,bkhd->bhqd", p, v)
    np.testing.assert_allclose(fe.limited_accumulation(p, v, 23, None), ref, rtol=1e-5, atol=1e-6)
    coarse = fe.limited_accumulation(p, v, 4, None)
    np.testing.assert_array_equal(fe.limited_accumulation(p, v, 4, 128), coarse)
    assert float(ar.relative_l2(coarse, ref)) > 1e-3  # 4 bits is visibly coarse
    assert float(ar.relative_l2(fe.limited_accumulation(p, v, 4, 32), ref)) < float(ar.relative_l2(coarse, ref))


@pytest.mark.parametrize("kind", ["realistic", "sharp"])
def test_each_rounding_adds_error_and_bf16_is_the_floor(kind):
    q, k, v = ar.sample_inputs(jax.random.key(0), 1, 256, 256, 2, 64, kind=kind)
    rows = fe.decompose(q, k, v, bits=23, tile=64)
    names = list(rows)
    assert rows["bf16 P, bf16 V"] < min(rows[n] for n in names[1:])
    both = rows["e4m3 P, e4m3 V, fp32 accumulator"]
    assert both >= 0.9 * max(rows["e4m3 P, bf16 V"], rows["bf16 P, e4m3 V"])
    assert rows["e4m3 P, e4m3 V, 23-bit accumulator"] == pytest.approx(both, rel=1e-3)


def test_cli_writes_json(tmp_path):
    out = tmp_path / "e.json"
    assert (
        fe.main(
            [
                "--tokens",
                "128",
                "--heads",
                "1",
                "--head-dim",
                "64",
                "--tile",
                "64",
                "--kinds",
                "sharp",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert set(data["rows"]) == {"sharp"} and len(data["rows"]["sharp"]) == 6
    with pytest.raises(SystemExit):
        fe.main(["--tile", "48"])
