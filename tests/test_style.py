"""One style across the repository: ruff's formatter and linter, configured in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [("format", "--check", "."), ("check", ".")], ids=["format", "lint"])
def test_ruff_is_clean(args: tuple[str, ...]) -> None:
    proc = _ruff(*args)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
