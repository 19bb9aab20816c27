#!/usr/bin/env python3
"""Compile kernels of ``pallas_kernels.testing.CASES`` once with Mosaic GPU's dumps on: the
compiler's resource report (registers, spills; ``MOSAIC_GPU_DUMP_PTXAS``) and the PTX and SASS
(``MOSAIC_GPU_DUMP_PTX`` / ``MOSAIC_GPU_DUMP_SASS``), written under ``--out``.

What a kernel's timing cannot say, its machine code can: whether wgmma issues as one batch per
wait, whether an accumulator went to local memory (``LDL``/``STL``), whether ptxas serialized the
wgmmas. Runs each kernel once on the case's inputs (no timing) and checks its output against the
reference, so a dump is of a kernel that computes the right thing. Off a GPU the wrappers run their
references and nothing is dumped (the script still runs: CI tests it).

    PYTHONPATH=. python3 scripts/dump_kernels.py --kernels w8a8_int8,w8a8_int8_block_n256 \\
        --shape 32760,1536,1536 --out /tmp/dump
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DUMPS = ("MOSAIC_GPU_DUMP_PTXAS", "MOSAIC_GPU_DUMP_PTX", "MOSAIC_GPU_DUMP_SASS")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", required=True, help="comma list of pallas_kernels.testing.CASES names")
    p.add_argument("--shape", default="32760,1536,1536", help="M,K,N")
    p.add_argument("--out", type=Path, required=True, help="folder for the dumps (created)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # Mosaic GPU reads these when it compiles a kernel; set before anything compiles.
    os.environ.update({name: "1" for name in DUMPS} | {"MOSAIC_GPU_DUMP_TO": str(args.out)})
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import jax  # pylint: disable=import-outside-toplevel

    from pallas_kernels import testing  # pylint: disable=import-outside-toplevel

    m, k, n = (int(v) for v in args.shape.split(","))
    names = args.kernels.split(",")
    unknown = [name for name in names if name not in testing.CASES]
    if unknown:
        raise SystemExit(f"dump_kernels.py: unknown kernel case(s) {unknown}; choose from {sorted(testing.CASES)}")
    wrong = 0
    for name in names:
        case = testing.CASES[name]
        inputs = case.make_inputs(jax.random.key(0), m, k, n)
        before = set(args.out.iterdir())
        out = jax.block_until_ready(jax.jit(case.kernel)(*inputs))
        verdict = testing.compare(case, out, jax.jit(case.reference)(*inputs), inputs)
        wrong += not verdict["ok"]
        new = sorted(p.name for p in set(args.out.iterdir()) - before)
        path = testing.kernel_path(name, inputs)
        status = "PASS" if verdict["ok"] else "FAIL"
        print(f"{status} {name} M={m} K={k} N={n} path={path} {verdict['detail']}; new dump files: {new}", flush=True)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
