#!/usr/bin/env python3
"""Compare every Pallas kernel with its plain-JAX reference on the GPU.

Random inputs (fresh per shape, never zeros) on ragged shapes, including sizes
that are not multiples of any tile; for each (kernel, M, K, N) prints PASS/FAIL
and which path ran (the Mosaic GPU kernel or a fallback), or SKIP with the rule where the
kernel does not take the shape (``KernelCase.takes``: e.g. a block rotation's width that the
block does not divide); skips are not failures. GEMMs are judged
elementwise by ``pallas_kernels.testing.compare``: ``|y - y_ref| <= tol * (|x| @ |w|^T
+ |bias|) + ulp(bf16) * |y_ref|`` (the error over that bound is printed, with the
relative Frobenius error for information); quantizers by the fraction of differing
codes and the scale error. Writes the table, headed by the device, date, commit and
JAX version, to ``benchmarks/check_kernels-<device>.txt`` (and ``$OUT`` when set);
exits 1 if any case fails.

Usage (on the GPU machine, repo root): ``PYTHONPATH=. python3 scripts/check_kernels_gpu.py``
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

if jax.devices()[0].platform == "gpu":
    # Exercise every kernel, also those whose default dispatch waits for a GPU check.
    os.environ.setdefault("JQUANT_BACKEND", "pallas")

from jquant.dispatch import kernels as kd  # noqa: E402
from pallas_kernels import testing, timing  # noqa: E402

#: Every kernel's check: the kernels' own and the dispatch's (its token quantizer against jquant's rule).
CASES = {**testing.CASES, **kd.CHECK_CASES}

SHAPES = [  # (M, K, N): GEMV-sized, ragged (no dimension a tile multiple), DiT-sized
    (1, 1536, 1536),
    (16, 3072, 3072),
    (5, 1000, 520),
    (77, 200, 136),
    (1, 64, 8),
    (256, 3072, 3072),
    (300, 1536, 8960),
    (1000, 1000, 520),
    (4096, 3072, 3072),
    (1100, 1000, 136),  # ragged at M >= 1024, where W4A8 / SVDQuant run their kernel
    (2051, 1536, 8960),
]


def _row(status: str, name: str, m: int, k: int, n: int, path: str, detail: str) -> str:
    """One line of the table: PASS / FAIL / SKIP, the case, its shape, the path that ran."""
    return f"{status}  {name:15s} M={m:<5d} K={k:<5d} N={n:<5d} path={path:11s} {detail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kernels", default="", help="comma list (default: all)")
    parser.add_argument(
        "--out",
        default="",
        help="file name in benchmarks/ and $OUT, or an absolute path (default: check_kernels-<device>.txt)",
    )
    args = parser.parse_args(argv)
    names = [n for n in CASES if not args.kernels or n in args.kernels.split(",")]
    device = jax.devices()[0]
    meta = timing.run_metadata("scripts/check_kernels_gpu.py")
    header = (
        f"# check_kernels_gpu.py  device={device.device_kind}  jax={jax.__version__}"
        f"  date={meta['date']}  commit={meta['commit']}  JQUANT_BACKEND={os.environ.get('JQUANT_BACKEND', '')}"
    )
    lines = [header]
    print(header, flush=True)
    failures = skipped = 0
    slug = device.device_kind.replace(" ", "_")

    def write(tail: list[str]) -> None:
        """The table so far (a run cut by a time limit keeps its finished cases)."""
        text = "\n".join(lines + tail) + "\n"
        root = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
        for folder in (root, os.environ.get("OUT")):
            if folder:
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, args.out or f"check_kernels-{slug}.txt"), "w") as f:
                    f.write(text)

    for name in names:
        case = CASES[name]
        kernel, reference = jax.jit(case.kernel), jax.jit(case.reference)
        for i, (m, k, n) in enumerate(SHAPES):
            k = -(-k // case.k_multiple) * case.k_multiple
            if not case.takes(m, k, n):
                skipped += 1
                lines.append(_row("SKIP", name, m, k, n, "-", f"takes only {case.shape_rule}"))
                print(lines[-1], flush=True)
                continue
            key = jax.random.key(1000 * i + 17)
            try:
                inputs = case.make_inputs(key, m, k, n)
                out = kernel(*inputs)
                ref = reference(*inputs)
                verdict = testing.compare(case, out, ref, inputs)
                ok, detail = verdict["ok"], verdict["detail"]
                path = testing.kernel_path(name, inputs)
            except Exception as exc:  # pylint: disable=broad-except
                ok, path = False, "error"
                detail = f"{type(exc).__name__}: {str(exc)[:400]}"
                traceback.print_exc()
            failures += not ok
            lines.append(_row("PASS" if ok else "FAIL", name, m, k, n, path, detail))
            print(lines[-1], flush=True)
        write([f"# partial: stopped after {name} ({failures} failure(s) so far)"])
    lines.append(f"# {failures} failure(s), {skipped} skipped (shapes the kernel does not take)")
    print(lines[-1])
    write([])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
