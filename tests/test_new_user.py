"""A new user's first minutes, in a fresh venv: the notebook's setup cell installs the checkout
next to it (a clone named `jquant`, the Colab path) with the README's command, editable with the
constraints; then, from a folder outside the repository, `jquant demo --help`, `jquant formats`,
the README's API example and a short `jquant demo --quick`. pip's cache and the configured index only.

Slow (minutes: the install dominates); prints the wall and CPU time of every step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_readme import README  # the README's python block, extracted as tests/test_readme.py does

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
pytestmark = pytest.mark.slow


def _copy_checkout(dst: Path) -> Path:
    """The working tree's files (tracked and untracked, minus ignored), as a fresh clone would
    have them plus local edits; so the install writes nothing into the real checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode()
        files = [f for f in out.split("\0") if f and (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: copy without the usual clutter
        skip = shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", "build", ".pytest_cache", ".hypothesis", "jquant-demo"
        )
        shutil.copytree(ROOT, dst, ignore=skip)
        return dst
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    return dst


def test_fresh_venv_install_cli_readme_demo_and_notebook_setup(tmp_path):
    times: dict[str, tuple[float, float]] = {}  # wall and CPU seconds of each step
    src = _copy_checkout(tmp_path / "src" / "jquant")
    venv = tmp_path / "venv"
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    py = bindir / "python"
    # pip installs without compiling bytecode (PIP_COMPILE=0: all of jax, scipy, matplotlib, ...) and
    # Python caches the bytecode of the modules the steps import, at first import (the install 37 -> 23 s
    # of CPU). XLA:CPU's elemental emitters compile the demo's programs in about half the time.
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    flags = f"{env.get('XLA_FLAGS', '')} --xla_cpu_use_fusion_emitters=false".strip()
    env.update(
        PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), PIP_COMPILE="0", XLA_FLAGS=flags
    )
    work = tmp_path / "work"  # outside the repository: nothing imports from the checkout by accident
    work.mkdir()

    def children_cpu() -> float:  # finished child processes' CPU seconds (0 where the OS does not say)
        t = os.times()
        return t.children_user + t.children_system

    def run(name: str, cmd: list, cwd: Path = work, timeout: int = 900) -> subprocess.CompletedProcess:
        t0, c0 = time.perf_counter(), children_cpu()
        r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        times[name] = (time.perf_counter() - t0, children_cpu() - c0)
        assert r.returncode == 0, f"{name} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
        return r

    try:
        run("create venv", [sys.executable, "-m", "venv", venv])
        # The notebook's setup cell where jquant is missing: it installs the clone beside it the
        # README's way (`pip install -e <checkout> -c constraints.txt`) and imports it in the same
        # interpreter; `python -c` puts the working directory first on sys.path, as a notebook
        # kernel does. That install then serves the command-line steps below.
        colab = tmp_path / "colab"
        colab.mkdir()
        (colab / "jquant").symlink_to(src, target_is_directory=True)
        cell = "".join(next(c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code")["source"])
        check = "\nimport jquant.models, jquant.pipeline.denoiser\nprint('models at', jquant.models.__file__)\n"
        out = run("notebook setup cell (installs)", [py, "-c", cell + check], cwd=colab).stdout
        assert "installing: pip install -e" in out and "constraints.txt" in out, out
        assert f"jquant 0.1.0 from {src.resolve() / 'jquant'}" in out, out
        assert f"models at {src.resolve() / 'jquant' / 'models'}" in out
        out = run("notebook setup cell (rerun)", [py, "-c", cell], cwd=colab).stdout
        assert "installing" not in out and "jquant 0.1.0 from" in out

        assert "--quick" in run("jquant demo --help", ["jquant", "demo", "--help"]).stdout
        formats = run("jquant formats", ["jquant", "formats"]).stdout
        names = "int8 int4 int3 int2 uint8 uint4 uint3 uint2 fp8_e4m3 fp8_e5m2 nf4 fp4 mxfp4 nvfp4 q8_0 q4_k q5_k q6_k"
        assert all(re.search(rf"^{n}\s", formats, re.M) for n in names.split())
        example = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
        (work / "readme_example.py").write_text(example)
        assert "W8A8 relative error" in run("README API example", [py, "readme_example.py"]).stdout
        # The demo end to end from the fresh install, kept short (one clip, three steps, the GGUF
        # recipe: no calibration); tests/test_demo.py runs the calibrated recipes in-process.
        quick = ["--quick", "--clips", "1", "--steps", "3", "--recipes", "q4_k_m"]
        demo = run("jquant demo --quick (1 clip)", ["jquant", "demo", *quick, "--out", work / "demo"])
        assert (
            "q4_k_m" in demo.stdout and "PSNR" in demo.stdout and "1/2 fp32: sampling 1 clip x 3 steps" in demo.stderr
        )
        assert {"grid.png", "clips.gif", "step_error.png", "results.json"} <= {
            p.name for p in (work / "demo").iterdir()
        }
    finally:
        steps = ", ".join(f"{k} {wall:.1f} s (CPU {cpu:.1f} s)" for k, (wall, cpu) in times.items())
        print(f"\nnew-user timings: {steps}", file=sys.stderr)
