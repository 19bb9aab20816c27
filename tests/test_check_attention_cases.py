"""scripts/check_attention_gpu.py's cases: every option reaches what takes it (a case that the
kernel's wrapper or the reference rejects fails on the GPU only, after the device time is spent)."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "check_attention_gpu.py"
_spec = importlib.util.spec_from_file_location("_check_attention_gpu", _PATH)
ck = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ck
_spec.loader.exec_module(ck)

from pallas_kernels import attention as pa  # noqa: E402
from pallas_kernels import attention_ref as ar  # noqa: E402

WRAPPER = frozenset(inspect.signature(pa.quant_attention).parameters)
REFERENCE = frozenset(inspect.signature(ar.quant_attention_reference).parameters)


@pytest.mark.parametrize("case", ck.CASES, ids=[c[0] for c in ck.CASES])
def test_case_options_are_accepted(case):
    options = case[-1]
    assert set(options) <= WRAPPER, f"{case[0]}: quant_attention does not take {set(options) - WRAPPER}"
    ref_keys = {k for k in options if k not in ck.KERNEL_ONLY}
    assert ref_keys <= REFERENCE, f"{case[0]}: the reference does not take {ref_keys - REFERENCE}"
    pa.AttentionConfig(**{k: v for k, v in options.items() if k in ck.CONFIG_FIELDS})


def test_kernel_only_options_are_the_tuning_fields():
    assert {"stages", "overlap", "schedule", "raw_max", "handoff", "magic_init", "fresh_pv"} <= ck.KERNEL_ONLY
    assert not ck.KERNEL_ONLY & {"qk_format", "pv_format", "block_k", "k_scales", "causal"}


def test_a_case_with_kernel_only_options_runs_off_the_gpu():
    case = next(c for c in ck.CASES if c[-1].get("fresh_pv") and c[-1].get("kv_lengths"))
    small = (case[0], 1, 256, 256, 1, case[5], case[6], {**case[-1], "kv_lengths": (200,)})
    row = ck.run_case(0, small)
    assert row["path"] == "reference" and row["pass"] and row["kernel_vs_reference"] == 0.0


def test_prep_cases_run_in_the_interpreter(monkeypatch):
    """Every PREP / PREP_PROLOGUE case's options reach attn_prep.compare and pass, shrunk to 70
    tokens and 2 heads and run by Pallas's interpreter (the GPU runs them at full size)."""
    from pallas_kernels import attn_prep  # pylint: disable=import-outside-toplevel

    small = [(b, 70, min(h, 2), d, *rest) for b, _, h, d, *rest in ck.PREP_CASES]
    small_pro = [(b, 70, min(h, 2), d, *rest[:-1], (1, 2, 35)) for b, _, h, d, *rest in ck.PREP_PROLOGUE_CASES]
    monkeypatch.setattr(ck, "PREP_CASES", small)
    monkeypatch.setattr(ck, "PREP_PROLOGUE_CASES", small_pro)
    seen = []
    real = attn_prep.compare

    def interpreted(x, **kw):
        seen.append(kw.get("heads_inner"))
        return real(x, **kw, interpret=True)

    monkeypatch.setattr(attn_prep, "compare", interpreted)
    rows = ck.run_prep_cases()
    assert len(rows) == len(small) + len(small_pro)
    assert all(r["pass"] for r in rows), [r for r in rows if not r["pass"]]
    assert seen.count(False) == 1  # the one case that pins the other launch order


def test_unpadded_cases_take_the_unpadded_path():
    """The GPU check's ``unpadded`` cases have token counts the option takes (else the kernel
    would quietly run the padded layout and the check would verify nothing new)."""
    cases = [c for c in ck.CASES if c[-1].get("unpadded")]
    assert len(cases) >= 3
    for name, _b, tq, tk, *_ in cases:
        assert tq % pa.UNPADDED_MULTIPLE == 0 and tk % pa.UNPADDED_MULTIPLE == 0, name
    assert any(-c[2] % 128 > 64 for c in cases)  # a whole 64-row warpgroup tile past the last query
