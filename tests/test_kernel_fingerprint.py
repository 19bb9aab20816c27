"""scripts/kernel_fingerprint.py: the kernel-module fingerprint and the SAME/CHANGED/NEW verdicts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "kernel_fingerprint.py"
_spec = importlib.util.spec_from_file_location("_kernel_fingerprint", _PATH)
kf = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = kf
_spec.loader.exec_module(kf)


def test_compare_verdicts():
    old = {"a": "f1", "b": "f2", "c": "cannot lower: unknown option"}
    new = {"a": "f1", "b": "f3", "c": "f4", "d": "f5", "e": "cannot lower: bad value"}
    assert kf.compare(old, new) == {"a": "SAME", "b": "CHANGED", "c": "NEW", "d": "NEW", "e": "ERROR"}


def test_fingerprint_is_stable_and_sees_a_kernel_change(monkeypatch):
    """The same call lowers to the same fingerprint twice; an option that changes the kernel's
    arithmetic (P rounded by integer ops) changes it; a call that takes the reference raises."""
    pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
    import jax
    import jax.numpy as jnp

    from pallas_kernels import attention as pa

    monkeypatch.setenv("JQUANT_BACKEND", "pallas")
    shape = jax.ShapeDtypeStruct((1, 300, 2, 128), jnp.bfloat16)

    def fp(**kw):
        return kf.module_fingerprint(lambda q, k, v: pa.quant_attention(q, k, v, k_scales="block", **kw), *[shape] * 3)

    first = fp()
    assert len(first) == 16
    assert fp() == first
    assert fp(p_round="int") != first
    with pytest.raises(ValueError, match="no Mosaic GPU kernel"):
        kf.module_fingerprint(
            lambda q, k, v: pa.quant_attention(q, k, v, smooth_k=False), *[shape] * 3
        )  # padding without smoothing: the reference


def test_triton_cases_lower_and_their_fingerprints_see_a_program_change():
    """Every --triton case lowers in this tree (a distinct module each); the same call gives the
    same fingerprint, another program of the same kernel a different one, a call without a Triton
    kernel raises."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import act_quant

    prints = kf.triton_case_fingerprints(Path(__file__).resolve().parents[1], kf.TRITON_CASES)
    assert not [v for v in prints.values() if v.startswith("cannot lower")], prints
    assert len(set(prints.values())) == len(kf.TRITON_CASES)
    x = jax.ShapeDtypeStruct((64, 8960), jnp.bfloat16)

    def fp(cfg=None):
        return kf.triton_fingerprint(lambda v: act_quant.quantize_pallas(v, "int8", config=cfg), x)

    assert fp() == fp() != prints["act_quant fp8 k8960"]  # the int8 codes: another module
    assert fp(act_quant.QuantizerConfig(rows=2, warps=8)) != fp()
    with pytest.raises(ValueError, match="no Triton kernel"):
        kf.triton_fingerprint(lambda v: v * 2, x)
