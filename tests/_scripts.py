"""Load a script of scripts/ as a module (scripts are not a package), registered in
``sys.modules`` while in use so dataclasses and pickling find it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str, module_name: str | None = None) -> ModuleType:
    """``scripts/<name>.py`` as a module named ``module_name`` (default ``_<name>``)."""
    spec = importlib.util.spec_from_file_location(module_name or f"_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def unload_script(module: ModuleType) -> None:
    sys.modules.pop(module.__name__, None)
