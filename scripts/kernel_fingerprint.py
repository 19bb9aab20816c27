#!/usr/bin/env python3
"""Which attention kernels an edit changed: the Mosaic GPU module each GPU-check case lowers to,
fingerprinted on the CPU, at a git revision and in the working tree.

A kernel edited after its last GPU check is unverified until it is checked again, unless the
edit leaves the kernel itself unchanged (a refactor, a new option that is off). This script
tells the two apart without a GPU: for every case of ``scripts/check_attention_gpu.py`` it
lowers ``quant_attention`` for CUDA (the whole Python-side Mosaic GPU lowering runs on the CPU)
and hashes the kernel module's text without locations, once with ``pallas_kernels`` from a
temporary worktree at ``--rev`` (the commit whose GPU check passed) and once from this tree,
each in its own process. Cases print SAME, CHANGED, or NEW (an option ``--rev`` does not know).
Both sides lower with this machine's JAX, so a JAX upgrade between the two is no concern.

    python3 scripts/kernel_fingerprint.py --rev 36b8638            # every case
    python3 scripts/kernel_fingerprint.py --rev 36b8638 --only kblock,causal

Exits 1 if any case CHANGED, or this tree cannot lower it (ERROR).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_fingerprint(fn, *args) -> str:
    """sha256 of the Mosaic GPU module(s) that lowering ``jax.jit(fn)`` for CUDA builds, printed
    without debug locations (so moving code around a file does not change it)."""
    import jax  # pylint: disable=import-outside-toplevel
    from jax.experimental.mosaic.gpu import core  # pylint: disable=import-outside-toplevel

    texts: list[str] = []
    original = core._run_serde_pass  # the last step before the module is serialized

    def capture(module, *a, **k):
        texts.append(module.operation.get_asm(enable_debug_info=False))
        return original(module, *a, **k)

    core._run_serde_pass = capture
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        core._run_serde_pass = original
    if not texts:
        raise ValueError("no Mosaic GPU kernel was lowered (the call took the reference path)")
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def case_fingerprints(root: Path, cases: list) -> dict[str, str]:
    """``{case name: fingerprint or 'cannot lower: ...'}`` with ``pallas_kernels`` from ``root``
    (an option or value that tree does not know)."""
    os.environ["JQUANT_BACKEND"] = "pallas"
    sys.path.insert(0, str(root))
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from pallas_kernels import attention as pa  # pylint: disable=import-outside-toplevel

    if not Path(pa.__file__).resolve().is_relative_to(root.resolve()):
        raise RuntimeError(f"imported {pa.__file__}, not the tree at {root}")
    out = {}
    for name, b, tq, tk, h, d, _kind, options in cases:
        opts = dict(options)
        lengths = opts.pop("kv_lengths", None)
        q = jax.ShapeDtypeStruct((b, tq, h, d), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((b, tk, h, d), jnp.bfloat16)

        def fn(q, k, v, opts=opts, lengths=lengths):
            kv_lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
            return pa.quant_attention(q, k, v, kv_lengths=kv_lengths, **opts)

        try:
            out[name] = module_fingerprint(fn, q, kv, kv)
        except (TypeError, ValueError) as e:  # an option or value this tree does not have
            out[name] = f"cannot lower: {str(e).splitlines()[0]}"
    return out


def _fingerprints_in_process(root: Path, cases: list) -> dict[str, str]:
    """Runs this script's ``--worker`` mode on ``root`` in a fresh process (one import of
    ``pallas_kernels`` per tree, none of this tree's) and returns its fingerprints."""
    with tempfile.TemporaryDirectory() as tmp:
        todo, done = Path(tmp) / "cases.json", Path(tmp) / "fingerprints.json"
        todo.write_text(json.dumps(cases))
        cmd = [sys.executable, __file__, "--worker", str(root), "--cases", str(todo), "--json-out", str(done)]
        subprocess.run(cmd, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        return json.loads(done.read_text())


def compare(old: dict[str, str], new: dict[str, str]) -> dict[str, str]:
    """``{case: SAME | CHANGED | NEW | ERROR}``: NEW where only the old tree cannot lower the
    case, ERROR where the new one cannot."""
    verdict = {}
    for name, fp in new.items():
        before = old.get(name, "cannot lower: missing")
        if fp.startswith("cannot lower"):
            verdict[name] = "ERROR"
        elif before.startswith("cannot lower"):
            verdict[name] = "NEW"
        else:
            verdict[name] = "SAME" if before == fp else "CHANGED"
    return verdict


def selected_cases(only: str) -> list:
    sys.path.insert(0, str(ROOT / "scripts"))
    import check_attention_gpu  # pylint: disable=import-outside-toplevel

    wanted = [s for s in only.split(",") if s]
    return [c for c in check_attention_gpu.CASES if not wanted or any(w in c[0] for w in wanted)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", help="the git revision to compare the working tree with (e.g. the last GPU-checked commit)")
    p.add_argument("--only", default="", help="comma list of substrings of check_attention_gpu case names")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cases", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        cases = json.loads(args.cases.read_text())
        args.json_out.write_text(json.dumps(case_fingerprints(args.worker, cases)))
        return 0
    if not args.rev:
        p.error("--rev is required")
    cases = selected_cases(args.only)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), args.rev], check=True)
        try:
            old = _fingerprints_in_process(tree, cases)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    new = _fingerprints_in_process(ROOT, cases)
    verdict = compare(old, new)
    for name, v in verdict.items():
        print(f"{v:8} {name}" + (f": {new[name]}" if v == "ERROR" else ""))
    counts = {k: sum(v == k for v in verdict.values()) for k in ("SAME", "CHANGED", "NEW", "ERROR")}
    print(f"{len(verdict)} cases since {args.rev}: " + ", ".join(f"{n} {k.lower()}" for k, n in counts.items()))
    return 1 if counts["CHANGED"] or counts["ERROR"] else 0


if __name__ == "__main__":
    sys.exit(main())
