"""A user's own `models.py` or `models/` package ahead on sys.path changes nothing: jquant's
models install as `jquant.models`, and nothing imports a top-level `models`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = """
import sys
import jquant, jquant.models
from jquant.models import tiny_wan
import jquant.cli.demo, jquant.pipeline.denoiser, jquant.cli.quantize
assert jquant.models.__file__.endswith("__init__.py") and "decoy" not in jquant.models.__file__
assert "models" not in sys.modules, sys.modules.get("models")
from jquant import cli
try:
    cli.main(["demo", "--help"])
except SystemExit as e:
    assert e.code == 0
print("OK", tiny_wan.ASSET_DIR.is_dir())
"""


def _decoys(tmp_path: Path) -> dict[str, Path]:
    mod, pkg = tmp_path / "module", tmp_path / "package"
    mod.mkdir()
    (mod / "models.py").write_text('raise RuntimeError("decoy models.py was imported")\n')
    (pkg / "models").mkdir(parents=True)
    (pkg / "models" / "__init__.py").write_text('raise RuntimeError("decoy models/ package was imported")\n')
    return {"models.py": mod, "models/": pkg}


def _env(*paths: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths))}


@pytest.mark.parametrize("decoy", ["models.py", "models/"])
def test_decoy_models_on_the_path_change_nothing(tmp_path, decoy):
    path = _decoys(tmp_path)[decoy]
    r = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=path, env=_env(path), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "OK True" in r.stdout and "jquant demo" in r.stdout  # the demo's help was printed
    # the decoy itself is importable there, so the test would notice if jquant imported it
    r = subprocess.run(
        [sys.executable, "-c", "import models"], cwd=path, env=_env(path), capture_output=True, text=True
    )
    assert r.returncode != 0 and "decoy" in r.stderr


def test_jquant_demo_help_script_with_decoys(tmp_path):
    d = _decoys(tmp_path)
    exe = Path(sys.executable).with_name("jquant")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "jquant.cli"]
    r = subprocess.run(
        [*cmd, "demo", "--help"],
        cwd=d["models.py"],
        env=_env(d["models.py"], d["models/"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "--quick" in r.stdout and "decoy" not in r.stderr
