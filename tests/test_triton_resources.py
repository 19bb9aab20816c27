"""scripts/triton_resources.py: Triton kernels compiled for sm_90a on the CPU, their registers and spills.

Needs the ``triton`` wheel (the ``test`` extra on Linux), whose bundled ptxas assembles the PTX.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import triton_resources as tr  # noqa: E402

pytestmark = pytest.mark.skipif(
    not all(Path(tr._bundled(tool)).exists() for tool in ("ptxas", "cuobjdump")),
    reason="the triton wheel has no ptxas / cuobjdump",
)


def test_the_step_programs_do_not_spill_and_the_table_says_so(tmp_path, capsys):
    """The Triton programs the Wan step runs (or is meant to) fit in registers: the guard against
    an edit that spills (the first Q/K prologue held 255 registers and spilled 292 bytes)."""
    out = tmp_path / "resources.json"
    only = ",".join(tr.NO_SPILL)  # substrings: the prologue's sweep programs come along
    assert tr.main(["--only", only, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["device"].startswith("none") and data["triton"] and data["commit"]
    rows = {r["case"]: r for r in data["rows"]}
    assert set(tr.NO_SPILL) <= set(rows)
    for name in tr.NO_SPILL:
        (kernel,) = rows[name]["kernels"]
        assert kernel["spill_stores"] == kernel["spill_loads"] == kernel["local"] == 0, rows[name]
        assert 0 < kernel["registers"] <= 255 and kernel["sass"] > 100, rows[name]
    prologue = rows["attn_prep q prologue"]["kernels"][0]
    assert prologue["warps"] == 8  # prep_tokens_pallas's default for a 128 x 128 tile
    # the approximate GELU program issues fewer instructions than the exact one
    assert (
        rows["act_quant gelu bias k8960 approx"]["kernels"][0]["sass"]
        < rows["act_quant gelu bias k8960"]["kernels"][0]["sass"]
    )
    assert "attn_prep q prologue" in capsys.readouterr().out


def test_programs_an_sm_holds_are_bound_by_what_runs_out_first():
    assert tr.ctas_per_sm(114, 8, 65536) == 2  # the operand pass: registers (2 x 29,696 of 65,536)
    assert tr.ctas_per_sm(92, 8, 114688) == 2  # two pipeline stages: shared memory
    assert tr.ctas_per_sm(32, 4, 32) == 16  # threads (2,048 / 128)
    assert tr.ctas_per_sm(16, 1, 0) == 32  # the CTA limit
    assert tr.ctas_per_sm(121, 8, 0) == 2  # 121 registers are allocated as 128


def test_a_spilling_no_spill_case_and_a_failed_one_fail_the_run():
    ok = {"case": "attn_prep q prologue", "kernels": [{"spill_stores": 0, "spill_loads": 0}]}
    spills = {"case": "attn_prep q prologue", "kernels": [{"spill_stores": 8, "spill_loads": 8}]}
    sweep = {"case": "attn_prep q prologue w16", "kernels": [{"spill_stores": 8, "spill_loads": 8}]}
    assert [tr.verdict(r) for r in (ok, spills, sweep)] == ["ok", "SPILLS", "ok"]
    assert tr.verdict({"case": "x", "error": "ValueError: no"}) == "ERROR"


def test_a_case_that_cannot_lower_is_an_error_row_not_a_crash():
    row = tr.measure(("bad", "attn_prep", {"fmt": "int8", "hadamard": True, "warps": 3}))
    assert "warps must be one of" in row["error"] and tr.verdict(row) == "ERROR"


def test_an_unknown_only_filter_is_refused():
    with pytest.raises(SystemExit):
        tr.main(["--only", "no such case"])
