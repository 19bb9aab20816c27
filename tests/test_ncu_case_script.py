"""scripts/ncu_case.py on the CPU: it runs a kernel case once and judges it against its reference
(here the wrappers fall back to their references), and names an unknown case."""

from __future__ import annotations

import pytest
from _scripts import load_script, unload_script


@pytest.fixture()
def script():
    module = load_script("ncu_case")
    yield module
    unload_script(module)


def test_runs_and_checks_a_case(script, capsys):
    assert script.main(["w8a8_int8_block_n256", "--m", "64", "--k", "256", "--n", "256"]) == 0
    assert "w8a8_int8_block_n256: check PASS" in capsys.readouterr().out


def test_unknown_case_is_named(script):
    with pytest.raises(SystemExit, match="unknown kernel case 'no_such'"):
        script.main(["no_such"])


def test_runs_and_checks_an_attention_variant(script, capsys):
    assert script.main(["attn:kernel-int8-fp8:2x256"]) == 0
    assert "attn:kernel-int8-fp8:2x256: check PASS" in capsys.readouterr().out
