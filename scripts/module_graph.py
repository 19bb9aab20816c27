"""Print jquant's module graph by floor, as pyproject.toml's import-linter contract defines them.

    python scripts/module_graph.py            # each floor, its packages, and what they import
    python scripts/module_graph.py --edges    # every package-to-package edge

docs/architecture.md draws its floor diagram from this output; tests/test_floors.py checks
that the floors hold (no upward import, no cycle).

Run from the repository root: ``python scripts/module_graph.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/module_graph.py`` where jquant is not installed (e.g. the GPU machine).
"""

from __future__ import annotations

import argparse
import tomllib
from collections import defaultdict
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def floors() -> list[list[str]]:
    """The layers of the ``floors`` contract, top first, each a list of its modules."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c.get("id") == "floors")
    return [[m.strip() for m in layer.replace("|", ":").split(":")] for layer in contract["layers"]]


def owner(module: str, names: list[str]) -> str | None:
    """The floor member (a module or package of ``names``) that ``module`` belongs to."""
    best = None
    for n in names:
        if (module == n or module.startswith(n + ".")) and (best is None or len(n) > len(best)):
            best = n
    return best


def edges(graph: grimp.ImportGraph, names: list[str]) -> dict[str, set[str]]:
    """Imports between floor members (a package's internal imports left out)."""
    out: dict[str, set[str]] = defaultdict(set)
    for mod in graph.modules:
        src = owner(mod, names)
        for imp in graph.find_modules_directly_imported_by(mod):
            dst = owner(imp, names)
            if src and dst and src != dst:
                out[src].add(dst)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--edges", action="store_true", help="print every edge between floor members")
    a = p.parse_args()
    layers = floors()
    names = [n for layer in layers for n in layer]
    graph = grimp.build_graph("jquant", "pallas_kernels", cache_dir=None)
    uncovered = sorted(m for m in graph.modules if owner(m, names) is None and m not in ("jquant", "pallas_kernels"))
    e = edges(graph, names)
    level = {n: len(layers) - 1 - i for i, layer in enumerate(layers) for n in layer}
    for i, layer in enumerate(layers):
        floor = len(layers) - 1 - i
        print(f"floor {floor}: " + ", ".join(layer))
        for n in layer:
            deps = sorted(e.get(n, ()), key=lambda d: (-level[d], d))
            if deps:
                print(f"    {n} -> " + ", ".join(f"{d} ({level[d]})" for d in deps))
    if uncovered:
        print("modules on no floor: " + ", ".join(uncovered))
    if a.edges:
        for src in sorted(e):
            for dst in sorted(e[src]):
                print(f"{src} -> {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
