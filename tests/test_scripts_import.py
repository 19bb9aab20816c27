"""Every script under scripts/ imports cleanly (its top level runs; ``main`` does not).

GPU benchmarks cannot run in CI, so a renamed or moved library function would otherwise
only show up on the GPU machine (as `from jquant.demo import rtn` once did in bench_e2e).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
GPU_ONLY_AT_IMPORT = {"_probe1.py"}  # a one-off H100 probe that measures at import (benchmarks/probe1-h100.log)


@pytest.mark.parametrize(
    "path", sorted(p for p in SCRIPTS.glob("*.py") if p.name not in GPU_ONLY_AT_IMPORT), ids=lambda p: p.name
)
def test_script_imports(path: Path, monkeypatch) -> None:
    name = f"_jquant_script_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up
    monkeypatch.setattr(sys, "argv", [str(path)])
    env = {k: v for k, v in os.environ.items() if k.startswith("JQUANT")}
    spec.loader.exec_module(module)
    after = {k: v for k, v in os.environ.items() if k.startswith("JQUANT")}
    assert after == env, f"{path.name} changes jquant's environment at import: {after} (was {env})"
    assert callable(getattr(module, "main", None)) or path.name.startswith("_"), f"{path.name} has no main()"
