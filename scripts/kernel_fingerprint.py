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
    python3 scripts/kernel_fingerprint.py --rev 56ca68d --triton   # the Triton-lowered kernels

``--triton`` does the same for the Pallas kernels lowered through Triton (the activation
quantizer's default programs, the fused norm + modulation + quantization, the attention operand
pass: :data:`TRITON_CASES`), hashing the Triton module each lowers to, without locations.

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


def triton_modules(fn, *args) -> list[str]:
    """The Triton module(s) that lowering ``jax.jit(fn)`` for CUDA builds (Pallas on Triton), in
    lowering order, printed without debug locations."""
    import jax  # pylint: disable=import-outside-toplevel
    from jax._src.pallas.triton import pallas_call_registration as reg  # pylint: disable=import-outside-toplevel

    texts: list[str] = []
    original = reg.lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = original(*a, **k)
        texts.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    reg.lowering.lower_jaxpr_to_triton_module = capture
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = original
    return texts


def triton_fingerprint(fn, *args) -> str:
    """sha256 of the Triton module(s) that lowering ``jax.jit(fn)`` for CUDA builds (Pallas on
    Triton), printed without debug locations."""
    texts = triton_modules(fn, *args)
    if not texts:
        raise ValueError("no Triton kernel was lowered")
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


#: ``--triton`` cases: (name, kernel, options) with the kernels' default programs at Wan's
#: widths; an option a tree does not know makes its side "cannot lower".
TRITON_CASES: list[tuple[str, str, dict]] = [
    ("act_quant int8 k1536", "act_quant", {"k": 1536, "fmt": "int8"}),
    ("act_quant fp8 k8960", "act_quant", {"k": 8960, "fmt": "fp8"}),
    ("act_quant int8 k20000 chunked", "act_quant", {"k": 20000, "fmt": "int8"}),
    ("act_quant gelu bias k8960", "act_quant", {"k": 8960, "fmt": "int8", "activation": "gelu_tanh", "bias": True}),
    ("act_quant gelu k13824", "act_quant", {"k": 13824, "fmt": "fp8", "activation": "gelu_tanh"}),
    (
        "act_quant gelu bias k8960 approx",
        "act_quant",
        {
            "k": 8960,
            "fmt": "int8",
            "activation": "gelu_tanh",
            "bias": True,
            "config": {"rows": 1, "warps": 4, "single_pass": True, "approx": True},
        },
    ),
    ("act_quant hadamard k1536", "act_quant", {"k": 1536, "fmt": "int8", "hadamard": True}),
    ("act_quant block128 k8960", "act_quant", {"k": 8960, "fmt": "int8", "hadamard": 128}),
    ("norm_quant rms token k1536", "norm_quant", {"k": 1536, "kind": "rms", "block": 1536}),
    ("norm_quant layer block128 k1536", "norm_quant", {"k": 1536, "kind": "layer", "block": 128}),
    ("attn_prep q int8", "attn_prep", {"fmt": "int8", "hadamard": True}),
    ("attn_prep k int8 tile", "attn_prep", {"fmt": "int8", "hadamard": True, "mean": True, "per_tile": True}),
    ("attn_prep q fp8", "attn_prep", {"fmt": "fp8_e4m3", "hadamard": False}),
    ("attn_prep q prologue", "attn_prep", {"fmt": "int8", "hadamard": True, "norm": True, "rope": True}),
    (
        "attn_prep q prologue heads outer",
        "attn_prep",
        {"fmt": "int8", "hadamard": True, "norm": True, "rope": True, "heads_inner": False},
    ),
]


def triton_call(kernel: str, options: dict):
    """``(fn, args)`` lowering one :data:`TRITON_CASES` kernel on ShapeDtypeStructs (64 tokens for
    the quantizers, Wan2.1-1.3B's 32,760 x 12 heads for the attention operand pass)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from pallas_kernels import act_quant, attn_prep, norm_quant  # pylint: disable=import-outside-toplevel

    S = jax.ShapeDtypeStruct
    opts = dict(options)
    if kernel == "act_quant":
        k, fmt, bias = opts.pop("k"), opts.pop("fmt"), opts.pop("bias", False)
        if "config" in opts:  # a program other than the default, as QuantizerConfig's fields
            opts["config"] = act_quant.QuantizerConfig(**opts["config"])
        args = [S((64, k), jnp.bfloat16)] + ([S((k,), jnp.float32)] if bias else [])
        return (lambda x, b=None: act_quant.quantize_pallas(x, fmt, bias=b, **opts)), args
    if kernel == "norm_quant":
        k = opts.pop("k")
        vec = S((k,), jnp.float32)

        def norm(x, w, shift, scale):
            return norm_quant.norm_modulate_quantize_pallas(x, w, None, shift, scale, 1e-6, fmt="int8", **opts)

        return norm, [S((64, k), jnp.bfloat16), vec, vec, vec]
    if kernel == "attn_prep":
        t, h, d = 32760, 12, 128
        args = [S((1, t, h, d), jnp.bfloat16)]
        mean, norm, rope = opts.pop("mean", False), opts.pop("norm", False), opts.pop("rope", False)
        extra = {}
        if mean:
            extra["mean"] = len(args)
            args.append(S((1, h, d), jnp.float32))
        if norm:
            extra["norm"] = len(args)
            args += [S((1, t), jnp.float32), S((h * d,), jnp.float32)]
        if rope:
            extra["rope"] = len(args)
            args += [S((t, d), jnp.float32)] * 2

        def prep(*a):
            kw = dict(opts, tokens_padded=32768)
            if mean:
                kw["mean"] = a[extra["mean"]]
            if norm:
                kw["norm"] = (a[extra["norm"]], a[extra["norm"] + 1])
            if rope:
                kw["rope"] = (a[extra["rope"]], a[extra["rope"] + 1])
            return attn_prep.prep_tokens_pallas(a[0], **kw)

        return prep, args
    raise ValueError(f"kernel_fingerprint: unknown Triton kernel {kernel!r}")


def _use_tree(root: Path) -> None:
    """Puts ``root`` first on ``sys.path`` and checks that ``pallas_kernels`` comes from it."""
    sys.path.insert(0, str(root))
    import pallas_kernels  # pylint: disable=import-outside-toplevel

    if not Path(pallas_kernels.__file__).resolve().is_relative_to(root.resolve()):
        raise RuntimeError(f"imported {pallas_kernels.__file__}, not the tree at {root}")


def _each_case(cases: list, fingerprint) -> dict[str, str]:
    """``{case name: fingerprint(case) or 'cannot lower: ...'}`` (an option or value the tree
    does not know)."""
    out = {}
    for case in cases:
        try:
            out[case[0]] = fingerprint(case)
        except (TypeError, ValueError) as e:
            out[case[0]] = f"cannot lower: {str(e).splitlines()[0]}"
    return out


def triton_case_fingerprints(root: Path, cases: list) -> dict[str, str]:
    """:func:`case_fingerprints` for :data:`TRITON_CASES` entries."""
    _use_tree(root)

    def fingerprint(case) -> str:
        fn, args = triton_call(case[1], case[2])
        return triton_fingerprint(fn, *args)

    return _each_case(cases, fingerprint)


def case_fingerprints(root: Path, cases: list) -> dict[str, str]:
    """``{case name: fingerprint or 'cannot lower: ...'}`` of ``check_attention_gpu`` cases with
    ``pallas_kernels`` from ``root``."""
    os.environ["JQUANT_BACKEND"] = "pallas"
    _use_tree(root)
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from pallas_kernels import attention as pa  # pylint: disable=import-outside-toplevel

    def fingerprint(case) -> str:
        _name, b, tq, tk, h, d, _kind, options = case
        opts = dict(options)
        lengths = opts.pop("kv_lengths", None)
        q = jax.ShapeDtypeStruct((b, tq, h, d), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((b, tk, h, d), jnp.bfloat16)

        def fn(q, k, v):
            kv_lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
            return pa.quant_attention(q, k, v, kv_lengths=kv_lengths, **opts)

        return module_fingerprint(fn, q, kv, kv)

    return _each_case(cases, fingerprint)


def _fingerprints_in_process(root: Path, cases: list) -> dict[str, str]:
    """Runs this script's ``--worker`` mode on ``root`` in a fresh process (one import of
    ``pallas_kernels`` per tree, none of this tree's) and returns its fingerprints."""
    with tempfile.TemporaryDirectory() as tmp:
        todo, done = Path(tmp) / "cases.json", Path(tmp) / "fingerprints.json"
        todo.write_text(json.dumps(cases))
        cmd = [sys.executable, __file__, "--worker", str(root), "--cases", str(todo), "--json-out", str(done)]
        if cases and len(cases[0]) == 3:  # TRITON_CASES entries
            cmd.append("--triton")
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
    p.add_argument("--triton", action="store_true", help="the Triton-lowered kernels (TRITON_CASES) instead")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cases", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        cases = json.loads(args.cases.read_text())
        worker = triton_case_fingerprints if args.triton else case_fingerprints
        args.json_out.write_text(json.dumps(worker(args.worker, cases)))
        return 0
    if not args.rev:
        p.error("--rev is required")
    if args.triton:
        wanted = [w for w in args.only.split(",") if w]
        cases = [c for c in TRITON_CASES if not wanted or any(w in c[0] for w in wanted)]
    else:
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
