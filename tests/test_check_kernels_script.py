"""scripts/check_kernels_gpu.py's row accounting on the CPU: the shapes a case does not take
(``KernelCase.takes``, e.g. a block rotation's width that 128 does not divide) are SKIP rows
with the rule, not failures; a wrong kernel still fails."""

from __future__ import annotations

import dataclasses

import pytest
from _scripts import load_script, unload_script

from pallas_kernels import testing


@pytest.fixture
def script(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    module = load_script("check_kernels_gpu")
    yield module
    unload_script(module)


def test_block_rotation_cases_take_widths_the_block_divides() -> None:
    for name in ("act_quant_block128", "act_quant_block128_fp8"):
        case = testing.CASES[name]
        assert case.takes(5, 1024, 520) and case.takes(1, 128, 7)
        assert not case.takes(5, 1000, 1024) and not case.takes(77, 200, 128)
        assert "multiple of the block 128" in case.shape_rule
    wide = testing.CASES["act_quant_block128_wide"]  # rotates the N-wide activations
    assert wide.takes(5, 1000, 1024) and not wide.takes(5, 1024, 520)
    # The full-width rotation and the GEMMs take every shape.
    for name in ("act_quant_hadamard", "act_quant_hadamard_wide", "w8a8_int8", "w4a8"):
        assert testing.CASES[name].takes(5, 1000, 520) and testing.CASES[name].shape_rule == ""


def test_check_prints_untaken_shapes_as_skips_and_counts_only_failures(script, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(script, "SHAPES", [(3, 256, 128), (3, 200, 136)])
    out = tmp_path / "check.txt"
    rc = script.main(["--kernels", "act_quant_block128,act_quant_block128_wide", "--out", str(out)])
    rows = out.read_text().splitlines()[1:]
    status = {(r.split()[1], r.split()[3]): r.split()[0] for r in rows[:-1]}
    assert status == {
        ("act_quant_block128", "K=256"): "PASS",
        ("act_quant_block128", "K=200"): "SKIP",
        ("act_quant_block128_wide", "K=256"): "PASS",  # N=128
        ("act_quant_block128_wide", "K=200"): "SKIP",  # N=136
    }
    assert all("takes only the rotated width" in r for r in rows if r.startswith("SKIP"))
    assert rows[-1] == "# 0 failure(s), 2 skipped (shapes the kernel does not take)" and rc == 0

    def broken(*args, **kwargs):
        raise RuntimeError("deliberately broken")

    case = script.CASES["act_quant_block128"]
    monkeypatch.setitem(script.CASES, "act_quant_block128", dataclasses.replace(case, kernel=broken))
    rc = script.main(["--kernels", "act_quant_block128", "--out", str(out)])
    rows = out.read_text().splitlines()[1:]
    assert [r.split()[0] for r in rows[:-1]] == ["FAIL", "SKIP"]  # the taken shape fails, the other skips
    assert rows[-1].startswith("# 1 failure(s), 1 skipped") and rc == 1


def test_the_approximate_activation_cases_pass_their_check_in_the_interpreter(script, monkeypatch, tmp_path) -> None:
    # What the GPU check of QuantizerConfig.approx compares, on the CPU: the approximate program
    # against act_reference within the case's tolerances (a ragged and a Wan-wide activation).
    monkeypatch.setattr(script, "SHAPES", [(5, 64, 1000), (3, 64, 8960)])
    out = tmp_path / "check.txt"
    rc = script.main(["--kernels", "act_quant_gelu_int8_approx,act_quant_gelu_fp8_approx", "--out", str(out)])
    rows = out.read_text().splitlines()[1:]
    assert [r.split()[0] for r in rows[:-1]] == ["PASS"] * 4, rows
    assert rows[-1].startswith("# 0 failure(s)") and rc == 0
