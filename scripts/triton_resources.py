#!/usr/bin/env python3
"""What the Pallas-on-Triton kernels cost in registers, spills and instructions, without a GPU.

Each case is lowered by this machine's JAX for CUDA (the Python-side Pallas -> Triton lowering
runs on the CPU), the Triton module is compiled for sm_90a by the ``triton`` package installed
here, and the PTX is assembled by the ptxas that wheel bundles, with ``-v``: registers per
thread, spill stores and loads, stack; with the shared memory, how many programs an SM holds.
The cubin's SASS gives the instruction count and how many are local-memory accesses (spills) or
block barriers.

Why: a kernel that spills runs at a fraction of the copy bandwidth, and whether one does is
known before any device time is spent. The Q/K prologue of the attention operand pass took
344 us a call on an H200 against 96 us for the plain pass (``benchmarks/notes.md``, twenty-fourth
session); this script showed that program at 255 registers with 292 bytes spilled, and the
rewrite at 185 and none.

The numbers model the device, they are not the device's: there, XLA compiles the same module
with the Triton it bundles and its own ptxas, whose choices can differ (CUDA 13.0's ptxas,
``--ptxas``, gave this one's counts for every case).

    python3 scripts/triton_resources.py                         # every case, a table
    python3 scripts/triton_resources.py --only prologue --json benchmarks/triton_resources.json

Exits 1 if a case fails to lower or compile, or a :data:`NO_SPILL` case spills.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import kernel_fingerprint as kf  # noqa: E402  (the Triton cases and their calls live there)

#: Cases beyond ``kernel_fingerprint.TRITON_CASES``: programs a benchmark sweeps.
VARIANT_CASES: list[tuple[str, str, dict]] = [
    (
        "attn_prep k prologue",
        "attn_prep",
        {"fmt": "int8", "hadamard": True, "mean": True, "per_tile": True, "norm": True, "rope": True},
    ),
    (
        "attn_prep q prologue w16",
        "attn_prep",
        {"fmt": "int8", "hadamard": True, "norm": True, "rope": True, "warps": 16},
    ),
    (
        "attn_prep q prologue t64",
        "attn_prep",
        {"fmt": "int8", "hadamard": True, "norm": True, "rope": True, "tile": 64},
    ),
    ("attn_prep q int8 tpp4 s2", "attn_prep", {"fmt": "int8", "hadamard": True, "tiles_per_program": 4, "stages": 2}),
    (
        "attn_prep k int8 tile tpp4 s2",
        "attn_prep",
        {"fmt": "int8", "hadamard": True, "mean": True, "per_tile": True, "tiles_per_program": 4, "stages": 2},
    ),
    *(
        (
            f"act_quant gelu bias k{k} {fmt} approx",
            "act_quant",
            {
                "k": k,
                "fmt": fmt,
                "activation": "gelu_tanh",
                "bias": True,
                "config": {"rows": 1, "warps": 4, "single_pass": True, "approx": True},
            },
        )
        for k, fmt in ((8960, "fp8"), (13824, "int8"))
    ),
]
#: Cases that must not spill: the programs the Wan step runs by default, or is meant to.
NO_SPILL = (
    "act_quant int8 k1536",
    "act_quant gelu bias k8960",
    "act_quant gelu bias k8960 approx",
    "norm_quant rms token k1536",
    "attn_prep q int8",
    "attn_prep k int8 tile",
    "attn_prep q prologue",
    "attn_prep k prologue",
)
ARCH = "sm_90a"
#: An H100 / H200 SM: registers, shared memory (bytes; 1 KB of it reserved per CTA), threads, CTAs.
SM_REGISTERS, SM_SHARED, SM_THREADS, SM_CTAS, CTA_RESERVED = 65536, 233472, 2048, 32, 1024


def ctas_per_sm(registers: int, warps: int, shared: int) -> int:
    """How many programs an SM holds at once: registers (allocated per warp, a thread's rounded up
    to a multiple of 8), shared memory, threads and the CTA limit, whichever binds first."""
    per_warp = -(-registers // 8) * 8 * 32
    return min(
        SM_REGISTERS // (per_warp * warps),
        SM_SHARED // (shared + CTA_RESERVED),
        SM_THREADS // (32 * warps),
        SM_CTAS,
    )


def lower(kernel: str, options: dict) -> list[tuple[str, int, int]]:
    """``[(Triton module text, num_warps, num_stages)]`` of every pallas_call a case lowers to."""
    import jax.experimental.pallas as pl  # pylint: disable=import-outside-toplevel

    params = []
    original_call = pl.pallas_call

    def capture_call(*a, **k):
        cp = k.get("compiler_params")
        params.append((getattr(cp, "num_warps", None) or 4, getattr(cp, "num_stages", None) or 3))
        return original_call(*a, **k)

    fn, args = kf.triton_call(kernel, options)
    pl.pallas_call = capture_call
    try:
        modules = kf.triton_modules(fn, *args)
    finally:
        pl.pallas_call = original_call
    if len(modules) != len(params):
        raise RuntimeError(f"{len(modules)} Triton modules but {len(params)} pallas_calls")
    return [(m, w, s) for m, (w, s) in zip(modules, params)]


def _bundled(tool: str) -> str:
    import triton  # pylint: disable=import-outside-toplevel

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


#: The ptxas that assembles the PTX (``--ptxas``; default: the one the triton wheel bundles).
PTXAS: list[str] = []


def ptxas() -> str:
    return PTXAS[0] if PTXAS else _bundled("ptxas")


def compile_module(text: str, warps: int, stages: int, workdir: Path) -> dict:
    """Registers, spills, shared memory and SASS counts of one Triton module on sm_90a."""
    import triton  # pylint: disable=import-outside-toplevel
    from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel

    src = workdir / "kernel.ttir"
    src.write_text(text)
    compiled = triton.compile(
        str(src), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages}
    )
    ptx = workdir / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    info = subprocess.run(
        [ptxas(), f"-arch={ARCH}", "-v", str(ptx), "-o", str(workdir / "kernel.cubin")],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    sass = subprocess.run(
        [_bundled("cuobjdump"), "-sass", str(workdir / "kernel.cubin")], capture_output=True, text=True, check=True
    ).stdout
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)

    def number(pattern: str) -> int:
        m = re.search(pattern, info)
        return int(m.group(1)) if m else 0

    return {
        "warps": warps,
        "stages": stages,
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack": number(r"(\d+) bytes stack frame"),
        "shared": int(compiled.metadata.shared),
        "ctas_per_sm": ctas_per_sm(number(r"Used (\d+) registers"), warps, int(compiled.metadata.shared)),
        "sass": len(ops),
        "local": sum(op.startswith(("LDL", "STL")) for op in ops),
        "barriers": sum(op.startswith("BAR") for op in ops),
    }


def measure(case: tuple[str, str, dict]) -> dict:
    """One row: the case's name and each of its kernels' resources (``error`` if any step fails)."""
    name, kernel, options = case
    row: dict = {"case": name, "kernel": kernel, "options": options}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            row["kernels"] = [compile_module(t, w, s, Path(tmp)) for t, w, s in lower(kernel, options)]
    except Exception as e:  # pylint: disable=broad-except  # reported per row, the run goes on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return row


def verdict(row: dict) -> str:
    """ERROR, SPILLS (a :data:`NO_SPILL` case that spills) or ok."""
    if "error" in row:
        return "ERROR"
    if row["case"] in NO_SPILL and any(k["spill_stores"] or k["spill_loads"] for k in row["kernels"]):
        return "SPILLS"
    return "ok"


def _versions() -> dict:
    import jax  # pylint: disable=import-outside-toplevel
    import triton  # pylint: disable=import-outside-toplevel

    version = subprocess.run([ptxas(), "--version"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "device": f"none: compiled on the CPU for {ARCH}",
        "jax": jax.__version__,
        "triton": triton.__version__,
        "ptxas": next((line for line in version.splitlines() if "release" in line), version),
        "commit": os.environ.get("JQUANT_COMMIT", commit),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated substrings of case names")
    p.add_argument("--json", type=Path, help="write the rows and versions here")
    p.add_argument("--ptxas", default="", help="assemble with this ptxas (e.g. a CUDA 13 one) instead of the wheel's")
    args = p.parse_args(argv)
    PTXAS[:] = [args.ptxas] if args.ptxas else []
    keys = [k for k in args.only.split(",") if k]
    cases = [c for c in kf.TRITON_CASES + VARIANT_CASES if not keys or any(k in c[0] for k in keys)]
    if not cases:
        p.error(f"no case matches --only {args.only!r}")
    rows = [measure(c) for c in cases]
    print(
        f"{'case':<38} {'warps':>5} {'regs':>5} {'spill':>6} {'smem':>7} {'cta/sm':>6} {'sass':>6} {'local':>5}  verdict"
    )
    for row in rows:
        v = verdict(row)
        if "error" in row:
            print(f"{row['case']:<38} {row['error']}  {v}")
        for k in row.get("kernels", []):
            spill = k["spill_stores"] + k["spill_loads"]
            print(
                f"{row['case']:<38} {k['warps']:>5} {k['registers']:>5} {spill:>6} {k['shared']:>7}"
                f" {k['ctas_per_sm']:>6} {k['sass']:>6} {k['local']:>5}  {v}"
            )
    if args.json:
        args.json.write_text(json.dumps({**_versions(), "rows": rows}, indent=1) + "\n")
    return 1 if any(verdict(r) != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
