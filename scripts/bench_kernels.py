#!/usr/bin/env python3
"""Check every Pallas kernel against its reference, then time it against XLA in the same run.

Kernel table (default): DiT shapes, M in {1, 16, 4096, 32760} x the (K, N) list below. For
each shape the XLA bf16 GEMM (``x @ w^T``, bf16 out) is checked and timed once, then each
kernel, and for the W8A8 kernels XLA's own int8 / fp8 ``dot_general`` with the same epilogue
(their references). Every timed function's output is first compared with its reference
(``pallas_kernels.testing.compare``: dot products elementwise within ``tol * (|x| @ |w|^T)``
plus one bf16 unit of the output); a function that fails is a FAIL row with the error bound
it broke, never a speed, and one that raises is an ERROR row with the exception. Times are the
median and the minimum of >= 10 CUPTI kernel-time runs, inputs rotated among enough random
copies that L2 cannot serve them (:mod:`pallas_kernels.timing`).

``--dispatch``: the measurement behind ``jquant.dispatch.kernels.PATH_TABLE`` (Task: the
dispatch never makes a layer slower than bf16). For the Wan2.1-1.3B linear shapes and M in
``dispatch.MEASURED_M`` it checks and times every path a layer can take through
``jquant.dispatch.kernels.maybe_run`` / ``jquant.dispatch.linear`` (W8A8 kernel, XLA W8A8, the
weight-only kernel, dequantize + XLA bf16) for int8 and fp8 W8A8 and int8 and int4/g128
weight-only layers, beside XLA's bf16 dot; derives the table (``dispatch.derive_table``),
installs it, and times ``linear(..., backend="auto")`` at M in {1, 16, 256} and on the
Wan2.1-1.3B step shapes against bf16 (section ``verify``). The table to paste into
``jquant/dispatch/kernels.py`` is printed and stored under ``table``.

Writes ``benchmarks/kernels-<device>.json`` (``dispatch-<device>.json`` with ``--dispatch``;
``--out`` renames it) after every row, with the device, date, commit, JAX version and command,
and a copy under ``$OUT`` when set. Exits 1 if any row FAILed or ERRORed.

Usage (GPU machine, repo root)::

    PYTHONPATH=. python3 scripts/bench_kernels.py            # everything
    PYTHONPATH=. python3 scripts/bench_kernels.py --quick    # a subset
    PYTHONPATH=. python3 scripts/bench_kernels.py --dispatch # the dispatch table
    PYTHONPATH=. python3 scripts/bench_kernels.py --tiny [--dispatch]  # CPU dry run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from jquant.dispatch import kernels as kd  # noqa: E402
from pallas_kernels import (  # noqa: E402
    act_quant,  # noqa: E402
    testing,
    timing,
)

#: Every kernel's check: the kernels' own and the dispatch's (its token quantizer against jquant's rule).
CASES = {**testing.CASES, **kd.CHECK_CASES}

KN = [(1536, 1536), (1536, 8960), (8960, 1536), (3072, 3072), (3072, 12288), (12288, 3072), (5120, 5120)]
MS = [4096, 16, 32760, 1]
QUICK_KN = [(3072, 3072), (1536, 1536), (3072, 12288)]
QUICK_MS = [4096, 16]
TINY_KN = [(256, 128)]
TINY_MS = [20, 1]
GEMM_KERNELS = [
    "w8a8_int8",
    "w8a8_fp8",
    "w8a8_fp8_block",
    "w8a8_int8_block",
    "w4a8",
    "svdquant_r32",
    "w4a16",
    "w8a16",
    "w4a16_g32",
    "w8a16_fp8",
    "w4a16_zp",
    "nf4_w16",
    "fp4_w16",
    "nvfp4_w16",
]
QUANTIZERS = ["act_quant", "act_quant_fp8"]

# --dispatch: Wan2.1-1.3B's linear shapes (K, N). Its attention has separate to_q/to_k/to_v
# (models/wan.py), so no fused 1536 -> 4608; 256 -> 1536 and 1536 -> 9216 are the time
# embedding and the 6-way modulation projection.
WAN_KN = [(1536, 1536), (1536, 8960), (8960, 1536), (256, 1536), (1536, 9216)]
# One Wan2.1-1.3B step at 480x832x81 (32,760 tokens, 512 text tokens), batch 1: (M, K, N).
WAN_STEP = [
    (32760, 1536, 1536),
    (32760, 1536, 8960),
    (32760, 8960, 1536),  # attention, FFN
    (512, 1536, 1536),
    (512, 4096, 1536),  # cross-attention K/V, text embedding
    (1, 256, 1536),
    (1, 1536, 1536),
    (1, 1536, 9216),
]  # time embedding, modulation
VERIFY_MS = (1, 16, 256)
TINY_WAN_KN = [(256, 128), (128, 256)]
TINY_DISPATCH_MS = (1, 16, 40)
TINY_WAN_STEP = [(40, 256, 128), (1, 128, 256)]
# Layer kind -> (weight spec, activation spec) of jquant.quantize / parse_spec.
KIND_SPECS = {
    "int8/w8a8": ("int8", "int8/token"),
    "fp8/w8a8": ("fp8_e4m3", "fp8_e4m3/token"),
    "int8/w16": ("int8", None),
    "int4g128/w16": ("int4/g128", None),
}


def _bf16_gemm(x, w):
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def _bf16_sets(m, k, n, copies, seed):
    keys = jax.random.split(jax.random.key(seed), 2 * copies)
    return [
        (jax.random.normal(keys[2 * i], (m, k), jnp.bfloat16), jax.random.normal(keys[2 * i + 1], (n, k), jnp.bfloat16))
        for i in range(copies)
    ]


def _sets(case, m, k, n, copies, seed):
    keys = jax.random.split(jax.random.key(seed), copies)
    return [case.make_inputs(keys[i], m, k, n) for i in range(copies)]


class Recorder:
    """Rows + the run's record, written after every row; prints each row (errors included)."""

    def __init__(self, out_name: str, meta: dict):
        self.out_name, self.meta, self.rows = out_name, meta, []

    def flush(self, **extra):
        self.meta.update(extra)
        timing.write_json(self.out_name, {"meta": self.meta, "rows": self.rows})

    def emit(self, row: dict) -> dict:
        self.rows.append(row)
        self.flush()
        name = row.get("kernel") or f"{row.get('kind')}:{row.get('path')}"
        line = f"{name:24s} {row['m']:6d} {row['k']:6d} {row['n'] or 0:6d} {row['status']:5s}"
        if "us" in row:
            base = row.get("xla_bf16_us")
            line += (
                f" {row['us']:9.2f} {row['us_min']:9.2f}"
                + (f" {base:9.2f} {row['xla_bf16_us_min']:9.2f}" if base else f" {'':9s} {'':9s}")
                + (f" {row['speedup_vs_bf16']:6.2f}x" if row.get("speedup_vs_bf16") else "")
                + (f" {row['path_ran']}" if row.get("path_ran") else "")
            )
        elif row["status"] in ("FAIL", "ERROR", "N/A"):
            line += "  " + (row.get("check", {}).get("detail") or row.get("error") or row.get("reason", ""))[:400]
        print(line, flush=True)
        return row

    def failures(self) -> list[dict]:
        return [r for r in self.rows if r["status"] in ("FAIL", "ERROR")]


def _times(t: dict, prefix: str = "") -> dict:
    out = {f"{prefix}us": round(t["us"], 3), f"{prefix}us_min": round(t["us_min"], 3)}
    if not prefix:
        out.update(runs=t["runs"], copies=t["copies"], timer=t["method"])
    return out


def _check_summary(t: dict) -> dict:
    c = t.get("check") or {}
    return {k: c[k] for k in ("detail", "bound_ratio", "rel", "mismatch_frac", "scale_rel") if k in c}


def bench_bf16(rec: Recorder, m, k, n, args, seed) -> dict | None:
    """The XLA bf16 GEMM, checked against the f32 product, then timed; its row (None if not PASS)."""
    sets = _bf16_sets(m, k, n, timing.copies_for(2 * m * k + 2 * n * k + 2 * m * n, limit=args.copies), seed)
    x, w = sets[0]
    ref = testing.weight_only.dot_nt_f32(x, w)
    t = timing.check_then_time(
        _bf16_gemm, sets, lambda out: testing.check_gemm(out, ref, x, w), iterations=args.iterations
    )
    row = rec.emit(
        {
            "kernel": "xla_bf16",
            "m": m,
            "k": k,
            "n": n,
            "status": t["status"],
            **({"error": t["error"]} if "error" in t else {}),
            "check": _check_summary(t),
            **(_times(t) if "us" in t else {}),
        }
    )
    return row if row["status"] == "PASS" else None


def _with_baseline(row: dict, bf16: dict | None, flops: float | None = None, nbytes: float | None = None):
    if "us" not in row:
        return row
    if flops:
        row["tflops"] = round(flops / row["us"] / 1e6, 1)
    if nbytes:
        row["gbps"] = round(nbytes / row["us"] / 1e3, 1)
    if bf16 is not None:
        row.update(
            xla_bf16_us=bf16["us"], xla_bf16_us_min=bf16["us_min"], speedup_vs_bf16=round(bf16["us"] / row["us"], 3)
        )
    return row


def bench_gemm(rec: Recorder, name: str, m, k, n, args, seed, bf16, xla_lowbit: dict):
    """One kernel at one shape: reference on the raw inputs, the kernel (or its bench form) checked
    against it, then timed; the XLA low-bit baseline likewise (once per shape and kind)."""
    case = CASES[name]
    k = -(-k // case.k_multiple) * case.k_multiple
    row = {"kernel": name, "m": m, "k": k, "n": n}
    try:
        sets = _sets(case, m, k, n, timing.copies_for(case.min_bytes(m, k, n), limit=args.copies), seed)
        row["path"] = testing.kernel_path(name, sets[0])
        ref = jax.jit(case.reference)(*sets[0])
        check = lambda out: testing.compare(case, out, ref, sets[0])
        if case.xla_baseline and case.xla_baseline not in xla_lowbit:
            base = timing.check_then_time(case.reference, sets, _exact_check(case, sets[0]), iterations=args.iterations)
            xla_lowbit[case.xla_baseline] = base
            rec.emit(
                {
                    "kernel": f"xla_{case.xla_baseline}",
                    "m": m,
                    "k": k,
                    "n": n,
                    "status": base["status"],
                    **({"error": base["error"]} if "error" in base else {}),
                    "check": _check_summary(base),
                    **(_times(base) if "us" in base else {}),
                }
            )
        fn = case.kernel
        if case.bench_form is not None:
            forms = [case.bench_form(s) for s in sets]
            fn, timed_sets = forms[0][0], [f[1] for f in forms]
        else:
            timed_sets = sets
        t = timing.check_then_time(fn, timed_sets, check, iterations=args.iterations)
    except Exception as exc:  # pylint: disable=broad-except
        t = timing.error_row(exc)
    row.update(status=t["status"], check=_check_summary(t))
    if "error" in t:
        row["error"] = t["error"]
    if "us" in t:
        row.update(_times(t))
        _with_baseline(row, bf16, case.flops(m, k, n), case.min_bytes(m, k, n))
        base = xla_lowbit.get(case.xla_baseline)
        if base is not None and "us" in base:
            row[f"xla_{case.xla_baseline}_us"] = round(base["us"], 3)
            row[f"xla_{case.xla_baseline}_us_min"] = round(base["us_min"], 3)
            row[f"speedup_vs_xla_{case.xla_baseline}"] = round(base["us"] / row["us"], 3)
    rec.emit(row)


def _exact_check(case, inputs):
    """The XLA low-bit baseline (the case's reference) against a float32 product of its dequantized
    operands (highest precision): it is what every kernel is judged by, so it is judged too."""
    x, w, bias = testing.dequantized_operands(case.name, inputs)
    exact = testing.weight_only.dot_nt_f32(x, w)
    if bias is not None:
        exact = exact + bias.reshape(1, -1)
    return lambda out: testing.compare(case, out, exact, inputs)


def bench_quantizer(rec: Recorder, name: str, m, k, args, seed, copy_gbps):
    case = CASES[name]
    quant = act_quant.quantize_int8 if name == "act_quant" else act_quant.quantize_fp8
    for method in ("pallas", "xla"):
        row = {"kernel": f"{name}:{method}", "m": m, "k": k, "n": None}
        try:
            sets = _sets(case, m, k, 0, timing.copies_for(3 * m * k, limit=args.copies), seed)
            ref = jax.jit(case.reference)(*sets[0])
            t = timing.check_then_time(
                lambda x, method=method: quant(x, method=method),
                sets,
                lambda out: testing.compare(case, out, ref, sets[0]),
                iterations=args.iterations,
            )
        except Exception as exc:  # pylint: disable=broad-except
            t = timing.error_row(exc)
        row.update(status=t["status"], check=_check_summary(t))
        if "error" in t:
            row["error"] = t["error"]
        if "us" in t:
            row.update(_times(t))
            gbps = case.min_bytes(m, k, 0) / t["us"] / 1e3
            row["gbps"] = round(gbps, 1)
            if copy_gbps:
                row["fraction_of_copy_bw"] = round(gbps / copy_gbps, 3)
        rec.emit(row)


# --------------------------------------------------------------------------
# --dispatch: every path of a layer, the table, and the dispatch against bf16.
# --------------------------------------------------------------------------


class PathUnavailable(Exception):
    """The kernel path does not apply to this layer (maybe_run returned None)."""


def _layer_fn(kind: str, path: str):
    """``fn(x, w) -> y`` running ``path`` ("auto": the dispatch's choice) for a ``kind`` layer."""
    from jquant.dispatch import linear  # pylint: disable=g-import-not-at-top
    from jquant.formats import parse_spec  # pylint: disable=g-import-not-at-top

    act_spec = KIND_SPECS[kind][1]
    act = None if act_spec is None else parse_spec(act_spec)

    def fn(x, w):
        if path == "auto":
            return linear(x, w, act=act, backend="auto")
        if path == "xla_w8a8":
            return linear(x, w, act=act, backend="xla")
        if path == "xla_w16":
            return linear(x, w, act=None, backend="xla")
        y = kd.maybe_run(x, w, act=act, act_scale=None, path=path)
        if y is None:
            raise PathUnavailable(f"{path}: no kernel applies to {kind} at M={x.shape[0]} here")
        return y

    return fn


def _layer_reference(kind: str, path: str, x, w):
    """``(y_ref, magnitude, tol)`` for a path's output: float32 products (highest precision) of the
    dequantized weights with x, or with its quantize-dequantized tokens on the W8A8 paths."""
    from jquant.dispatch import quantize_activation  # pylint: disable=g-import-not-at-top
    from jquant.formats import parse_spec  # pylint: disable=g-import-not-at-top
    from jquant.qarray import dequantize  # pylint: disable=g-import-not-at-top

    act_spec = KIND_SPECS[kind][1]
    xf = x.astype(jnp.float32)
    if path in ("w8a8", "xla_w8a8"):
        xf = dequantize(quantize_activation(x, parse_spec(act_spec), None), jnp.float32)
    wt = dequantize(w, jnp.float32).T  # [N, K]
    ref = testing.weight_only.dot_nt_f32(xf, wt)
    # W8A8: exact integer / fp32 products of the codes; weight-only: weights rounded to bf16.
    return ref, testing.abs_dot(xf, wt), (1e-3 if path in ("w8a8", "xla_w8a8") else 8e-3)


def _layer_sets(kind, m, k, n, copies, seed):
    import jquant  # pylint: disable=g-import-not-at-top

    keys = jax.random.split(jax.random.key(seed), 2 * copies)
    return [
        (
            jax.random.normal(keys[2 * i], (m, k), jnp.bfloat16),
            jquant.quantize(jax.random.normal(keys[2 * i + 1], (k, n), jnp.float32) / k**0.5, KIND_SPECS[kind][0]),
        )
        for i in range(copies)
    ]


def layer_sets(kind, m, k, n, args, seed):
    """Rotated ``(x, w)`` input sets for a ``kind`` layer (one per copy), shared by its paths."""
    wbytes = k * n * (0.5 if kind.startswith("int4") else 1)
    return _layer_sets(kind, m, k, n, timing.copies_for(2 * m * k + wbytes + 2 * m * n, limit=args.copies), seed)


def bench_layer(rec: Recorder, section: str, kind: str, path: str, m, k, n, args, seed, bf16, sets=None) -> dict:
    row = {"section": section, "kind": kind, "path": path, "m": m, "k": k, "n": n}
    try:
        sets = sets or layer_sets(kind, m, k, n, args, seed)
        judged = path
        if path == "auto":
            judged = (
                kd.choose_path(kind, m, k, n)
                if jax.default_backend() == "gpu"
                else ("xla_w8a8" if kind.endswith("w8a8") else "xla_w16")
            )
            row["path_ran"] = judged
        ref, mag, tol = _layer_reference(kind, judged, *sets[0])
        t = timing.check_then_time(
            _layer_fn(kind, path), sets, lambda out: testing.check_dot(out, ref, mag, tol), iterations=args.iterations
        )
    except Exception as exc:  # pylint: disable=broad-except
        t = timing.error_row(exc)
    if t["status"] == "ERROR" and t["error"].startswith("PathUnavailable"):
        row.update(status="N/A", reason=t["error"])
    else:
        row.update(status=t["status"], check=_check_summary(t))
        if "error" in t:
            row["error"] = t["error"]
    if "us" in t:
        row.update(_times(t))
        _with_baseline(row, bf16, 2.0 * m * k * n)
    return rec.emit(row)


def run_dispatch(rec: Recorder, args, deadline) -> None:
    kns = TINY_WAN_KN if args.tiny else WAN_KN
    ms = TINY_DISPATCH_MS if args.tiny else kd.MEASURED_M
    step = TINY_WAN_STEP if args.tiny else WAN_STEP
    if args.m:
        ms = tuple(int(v) for v in args.m.split(","))
    if args.kn:
        kns = [tuple(int(v) for v in pair.split(":")) for pair in args.kn.split(",")]
    kinds = [kd_ for kd_ in KIND_SPECS if not args.kernels or kd_ in args.kernels.split(",")]
    bf16_rows: dict[tuple[int, int, int], dict | None] = {}

    def bf16_at(m, k, n):
        if (m, k, n) not in bf16_rows:
            row = bench_bf16(rec, m, k, n, args, seed=m * 7 + k * 3 + n)
            row = rec.rows[-1]
            row["section"] = "bf16"
            bf16_rows[(m, k, n)] = row if row["status"] == "PASS" else None
        return bf16_rows[(m, k, n)]

    print(
        f"{'kind:path':24s} {'M':>6s} {'K':>6s} {'N':>6s} {'':5s} {'us':>9s} {'us_min':>9s}"
        f" {'bf16_us':>9s} {'bf16_min':>9s}  x_bf16",
        flush=True,
    )
    for m in ms:
        for k, n in kns:
            if time.time() > deadline:
                rec.emit(
                    {
                        "section": "paths",
                        "kind": "*",
                        "path": "*",
                        "m": m,
                        "k": k,
                        "n": n,
                        "status": "SKIP",
                        "reason": "budget",
                    }
                )
                continue
            bf16 = bf16_at(m, k, n)
            for kind in kinds:
                try:
                    sets = layer_sets(kind, m, k, n, args, m * 7 + k * 3 + n + 1)
                except Exception:  # pylint: disable=broad-except  (each path's row reports it)
                    sets = None
                for path in kd.KIND_PATHS[kind]:
                    bench_layer(rec, "paths", kind, path, m, k, n, args, m * 7 + k * 3 + n + 1, bf16, sets)
                del sets
    table = kd.derive_table([r for r in rec.rows if r.get("section") == "paths"])
    rec.flush(table=[[*key, [list(e) for e in entries]] for key, entries in table.items()])
    print("\nPATH_TABLE = {", flush=True)
    for key, entries in table.items():
        print(f"    {key!r}: {entries!r},", flush=True)
    print("}\n", flush=True)
    # The dispatch with the derived table, against bf16: M in VERIFY_MS on every measured shape, and
    # the Wan2.1-1.3B step shapes.
    committed, kd.PATH_TABLE = kd.PATH_TABLE, table
    try:
        verify = sorted({(m, k, n) for m in ms if m in VERIFY_MS or args.tiny for k, n in kns} | set(step))
        for m, k, n in verify:
            if time.time() > deadline:
                rec.emit(
                    {
                        "section": "verify",
                        "kind": "*",
                        "path": "auto",
                        "m": m,
                        "k": k,
                        "n": n,
                        "status": "SKIP",
                        "reason": "budget",
                    }
                )
                continue
            bf16 = bf16_at(m, k, n)
            for kind in kinds:
                bench_layer(rec, "verify", kind, "auto", m, k, n, args, m * 7 + k * 3 + n + 2, bf16)
    finally:
        kd.PATH_TABLE = committed
    slower = [
        r
        for r in rec.rows
        if r.get("section") == "verify" and r.get("speedup_vs_bf16") is not None and r["speedup_vs_bf16"] < 1.0
    ]
    rec.flush(
        slower_than_bf16=[
            {k: r[k] for k in ("kind", "m", "k", "n", "path_ran", "us", "xla_bf16_us", "speedup_vs_bf16")}
            for r in slower
        ]
    )
    print(f"\ndispatch (auto) slower than bf16 on {len(slower)} layer shape(s):", flush=True)
    for r in slower:
        print(
            f"  {r['kind']:14s} M={r['m']:<6d} K={r['k']:<5d} N={r['n']:<5d} {r['path_ran']:9s}"
            f" {r['us']:8.2f} us vs bf16 {r['xla_bf16_us']:8.2f} us ({r['speedup_vs_bf16']:.2f}x)",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, few copies (CPU dry run)")
    parser.add_argument("--dispatch", action="store_true", help="the per-shape path measurement (see above)")
    parser.add_argument("--kernels", default="", help="comma list (default: all; with --dispatch: layer kinds)")
    parser.add_argument("--m", default="", help="comma list of M (default: all)")
    parser.add_argument("--kn", default="", help="K:N pairs, comma separated (e.g. 3072:3072)")
    parser.add_argument("--iterations", type=int, default=timing.MIN_RUNS, help="timed runs (at least 10)")
    parser.add_argument("--copies", type=int, default=24, help="most input sets rotated per timing")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no new shape after this many seconds")
    parser.add_argument("--out", default="", help="file name in benchmarks/")
    args = parser.parse_args(argv)
    if args.tiny:
        args.copies = min(args.copies, 2)
    if args.dispatch and os.environ.get("JQUANT_BACKEND", "").strip().lower() not in ("", "auto"):
        parser.error("--dispatch measures what backend='auto' runs: unset JQUANT_BACKEND")
    gpu = jax.devices()[0].platform == "gpu"
    if gpu and not args.dispatch:
        # Exercise every kernel, also those whose default dispatch waits for a GPU check (the
        # dispatch measurement runs what the dispatch runs by default).
        os.environ.setdefault("JQUANT_BACKEND", "pallas")

    start = time.time()
    deadline = start + args.budget_s
    meta = timing.run_metadata("scripts/bench_kernels.py", sys.argv[1:] if argv is None else argv)
    meta["timing"] = (
        "us: median, us_min: minimum over `runs` (>= 10) CUPTI-timed runs (wall clock off GPU), "
        "inputs rotated among `copies` sets; every timed output checked against its reference first"
    )
    meta["jquant_backend"] = os.environ.get("JQUANT_BACKEND", "")
    slug = timing.device_slug()
    rec = Recorder(
        args.out or f"{'dispatch' if args.dispatch else 'kernels'}-{'tiny-' if args.tiny else ''}{slug}.json", meta
    )
    if gpu:
        meta["copy_gbps"] = round(timing.copy_bandwidth(args.iterations), 1)
    print(
        f"{meta['device']} jax {meta['jax']} commit {meta['commit']} copy bandwidth {meta.get('copy_gbps')} GB/s",
        flush=True,
    )

    if args.dispatch:
        run_dispatch(rec, args, deadline)
    else:
        ms = TINY_MS if args.tiny else QUICK_MS if args.quick else MS
        kns = TINY_KN if args.tiny else QUICK_KN if args.quick else KN
        if args.m:
            ms = [int(v) for v in args.m.split(",")]
        if args.kn:
            kns = [tuple(int(v) for v in pair.split(":")) for pair in args.kn.split(",")]
        wanted = args.kernels.split(",") if args.kernels else None
        unknown = [w for w in wanted or () if w not in CASES]
        if unknown:
            parser.error(f"--kernels: unknown {unknown}; choose from {GEMM_KERNELS + QUANTIZERS}")
        gemms = [g for g in GEMM_KERNELS if not wanted or g in wanted]
        quants = [q for q in QUANTIZERS if not wanted or q in wanted]
        print(
            f"{'kernel':24s} {'M':>6s} {'K':>6s} {'N':>6s} {'':5s} {'us':>9s} {'us_min':>9s}"
            f" {'bf16_us':>9s} {'bf16_min':>9s}  x_bf16",
            flush=True,
        )
        for m in ms:
            done_k = set()
            for k, n in kns:
                if time.time() > deadline:
                    rec.emit({"kernel": "*", "m": m, "k": k, "n": n, "status": "SKIP", "reason": "budget"})
                    continue
                seed = m * 7 + k * 3 + n
                bf16 = bench_bf16(rec, m, k, n, args, seed) if gemms else None
                xla_lowbit: dict[str, dict] = {}
                for name in gemms:
                    bench_gemm(rec, name, m, k, n, args, seed + 1, bf16, xla_lowbit)
                if k not in done_k:
                    done_k.add(k)
                    for name in quants:
                        bench_quantizer(rec, name, m, k, args, seed + 2, meta.get("copy_gbps"))
    failures = rec.failures()
    rec.flush(elapsed_s=round(time.time() - start, 1), failures=len(failures))
    statuses = [r["status"] for r in rec.rows]
    print(
        f"\n{statuses.count('PASS')} PASS, {statuses.count('FAIL')} FAIL, {statuses.count('ERROR')} ERROR,"
        f" {statuses.count('N/A')} N/A, {statuses.count('SKIP')} SKIP",
        flush=True,
    )
    for r in failures:
        print(
            f"  {r['status']} {r.get('kernel') or r.get('kind') + ':' + r.get('path')} M={r['m']} K={r['k']}"
            f" N={r['n']}: {(r.get('check') or {}).get('detail') or r.get('error', '')}"[:500],
            flush=True,
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
