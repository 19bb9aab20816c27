"""A plain install works: no optional extra is needed to import jquant or run its basics.

Each check runs in a fresh interpreter where the optional extras (torch, diffusers, ...,
jax-triton, the test tools) are blocked with ``sys.modules[name] = None``, which makes any
``import`` of them raise ImportError, as on a machine where they are not installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Everything jquant may use only when present: the parity, gpu and test extras.
OPTIONAL = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "jax_triton",
    "triton",
    "scipy",
    "sklearn",
    "hypothesis",
    "pytest",
    "nbclient",
    "nbformat",
    "ipykernel",
)

_PRELUDE = textwrap.dedent(f"""
    import sys
    for name in {OPTIONAL!r}:
        sys.modules[name] = None
""")


def _run(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``body`` after the blocking prelude, from a directory outside the repository."""
    script = tmp_path / "probe.py"
    script.write_text(_PRELUDE + textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
    )


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )


def test_prelude_really_blocks(tmp_path: Path) -> None:
    proc = _run(
        """
        try:
            import torch
        except ImportError:
            print("blocked")
    """,
        tmp_path,
    )
    _check(proc)
    assert proc.stdout.strip() == "blocked"


@pytest.mark.slow
def test_every_public_module_imports_without_extras(tmp_path: Path) -> None:
    proc = _run(
        """
        import importlib, pkgutil
        import jquant, jquant.models, pallas_kernels
        names = []
        for pkg in (jquant, jquant.models, pallas_kernels):
            names.append(pkg.__name__)
            for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                names.append(info.name)
        for name in names:
            importlib.import_module(name)
        print(len(names), "modules")
    """,
        tmp_path,
    )
    _check(proc)
    assert int(proc.stdout.split()[-2]) > 40


@pytest.mark.slow
def test_readme_example_and_cli_help_without_extras(tmp_path: Path) -> None:
    example = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    proc = _run(
        example
        + textwrap.dedent("""
        import contextlib, io
        from jquant.cli import main
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                main(["demo", "--help"])
            except SystemExit as e:
                assert e.code == 0, e.code
        assert "usage" in buf.getvalue().lower()
        print("demo-help-ok")
    """),
        tmp_path,
    )
    _check(proc)
    assert "W8A8 relative error" in proc.stdout and "demo-help-ok" in proc.stdout
