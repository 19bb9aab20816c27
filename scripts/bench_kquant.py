#!/usr/bin/env python3
"""GGUF k-quant GEMMs on the GPU: jquant's Triton kernels against XLA bf16 and XLA's
dequantize-then-dot, on DiT linear shapes, in one run.

For each format (Q4_K, Q5_K, Q6_K, Q8_0), shape and M: the decode kernel is first checked bit for
bit against ``jquant.codecs``' decoder (ggml's formulas, rounded to bf16); every timed output is
checked against the fp32 product with the decoded weights before it is timed. Weights are random
ggml blocks (random code bytes, block scales set to a realistic range), so nothing is encoded on
the host. Rows: ``bf16`` (XLA's GEMM on the decoded bf16 weights: the baseline), ``xla`` (decode
with jquant.codecs in XLA, then the GEMM), ``kernel`` (pallas_kernels.kquant_triton.kquant_matmul:
fused at M <= 16, decode kernel + GEMM above), ``dispatch`` (the same weights as a codec QArray through
``jquant.dispatch.linear``, as a model runs them). Median and min of >= 10 runs. Writes
``benchmarks/kquant-<device>.json``; exits 1 on any FAIL/ERROR row.

    PYTHONPATH=. JQUANT_BACKEND=pallas python scripts/bench_kquant.py [--quick] [--deadline-s S]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jquant import codecs, dispatch
from jquant.formats import parse_spec
from jquant.qarray import QArray
from pallas_kernels import kquant_gemv as kg
from pallas_kernels import kquant_triton as kq
from pallas_kernels import testing, timing

SHAPES = [(1536, 1536), (8960, 1536), (5120, 5120), (5120, 13824), (13824, 5120)]  # (K, N)
MS = [1, 16, 4096]
FORMATS = ["q4_k", "q5_k", "q6_k", "q8_0"]
TOL = 1e-2  # bf16 weights and products, fp32 accumulation, against the fp32 product


def random_blocks(fmt: str, n: int, k: int, seed: int) -> np.ndarray:
    """Random ggml blocks with block scales in [1e-3, 4e-3) times the format's code range."""
    return kq.random_blocks(fmt, n, k, seed, absmax=4e-3 * kq._CODE_RANGE[fmt])  # pylint: disable=protected-access


def as_qarray(blocks: jax.Array, fmt: str) -> QArray:
    """The codec QArray of a Flax kernel ``[K, N]`` whose blocks are ``u8[N, K/block, bytes]``."""
    return QArray(blocks, None, spec=parse_spec(fmt), dtype=jnp.bfloat16, axis=-2)


def nt(x, w):
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))


def gemv_weights(fmt: str, k: int, n: int) -> tuple[list, jax.Array, list]:
    """Four random weights (rotated past L2), the first one decoded in fp32 (the reference) and
    each one decoded in bf16 (the baseline's operand)."""
    blocks = [jnp.asarray(random_blocks(fmt, n, k, s)) for s in range(4)]
    return blocks, kq.decode_reference(blocks[0], fmt, jnp.float32), [kq.decode_reference(b, fmt) for b in blocks]


def gemv_inputs(ref_w: jax.Array, m: int, k: int, seed: int = 7) -> tuple[list, jax.Array, jax.Array]:
    """Four bf16 activations ``[m, k]``, the first one's fp32 product with ``ref_w`` and its
    ``|x| @ |w|`` (the magnitude check_dot's bound scales with)."""
    xs = [jax.random.normal(jax.random.key(seed + i), (m, k), jnp.bfloat16) for i in range(4)]
    x32 = xs[0].astype(jnp.float32)
    return xs, nt(x32, ref_w), nt(jnp.abs(x32), jnp.abs(ref_w))


#: (bn, warps, stages) tilings of the small-M kernel that --sweep times.
SWEEP = [(bn, w, st) for bn in (32, 64, 128) for w in (4, 8) for st in (1, 2)]


def sweep(rows: list[dict], formats: list[str]) -> int:
    """The small-M kernel's tilings on 5120x5120 at M = 1 and 16, checked then timed."""
    k = n = 5120
    bad = 0
    for fmt in formats:
        blocks = [jnp.asarray(random_blocks(fmt, n, k, s)) for s in range(4)]
        ref_w = kq.decode_reference(blocks[0], fmt, jnp.float32)
        for m in (1, 16):
            xs = [jax.random.normal(jax.random.key(7 + i), (m, k), jnp.bfloat16) for i in range(4)]
            ref = nt(xs[0].astype(jnp.float32), ref_w)
            mag = nt(jnp.abs(xs[0]).astype(jnp.float32), jnp.abs(ref_w))
            best = None
            for bn, warps, stages in SWEEP:
                fn = lambda x, b, bn=bn, w=warps, st=stages: kq.kquant_matmul_small_m(  # noqa: E731
                    x, b, fmt, bn=bn, warps=w, stages=st
                )
                r = timing.check_then_time(fn, list(zip(xs, blocks)), lambda o: testing.check_dot(o, ref, mag, TOL))
                name = f"sweep bn={bn} w={warps} s={stages}"
                rows.append({"fmt": fmt, "K": k, "N": n, "M": m, "variant": name, **r})
                bad += r["status"] != "PASS"
                if r["status"] != "PASS":
                    print(f"{fmt} M={m} {name}: {r['status']} {r.get('error', r.get('check'))}"[:400], flush=True)
                elif best is None or r["us"] < best[1]:
                    best = (name, r["us"])
            print(f"{fmt} M={m}: best {best}", flush=True)
    return bad


#: (rows, warps, split) of pallas_kernels.kquant_gemv that --gemv times, per path.
#: split None: the wrapper's own choice (about two programs per SM).
GEMV_FMA = [(32, 4, None), (16, 4, None), (32, 4, 1), (16, 4, 1), (8, 2, 1), (32, 4, 4), (64, 8, 2), (16, 2, None)]
GEMV_MMA = [(32, 4, None), (16, 4, None), (16, 4, 1), (32, 4, 1), (32, 4, 4), (64, 4, 2), (16, 2, None)]


#: --gemv-stages: (rows, warps, split, stages, prefetch) of the CUDA-core path, M = 1, 5120 x 5120.
GEMV_STAGES = [
    (r, w, sp, st, pf) for r, w, sp in [(32, 4, 4), (16, 4, None), (8, 2, 1)] for st, pf in [(1, False), (1, True)]
]


def gemv_stages(rows: list[dict], formats: list[str]) -> int:
    """num_stages and the register prefetch of the CUDA-core path at M = 1: checked, then timed."""
    bad, k, n, m = 0, 5120, 5120, 1
    for fmt in formats:
        blocks, ref_w, wbf = gemv_weights(fmt, k, n)
        xs, ref, mag = gemv_inputs(ref_w, m, k)
        r = timing.check_then_time(
            lambda x, w: nt(x, w), list(zip(xs, wbf)), lambda o: testing.check_dot(o, ref, mag, TOL)
        )
        rows.append({"fmt": fmt, "K": k, "N": n, "M": m, "variant": "bf16", **r})
        line = [f"{fmt} bf16 {r.get('us', float('nan')):.1f}"]
        best = None
        for rr, w, sp, st, pf in GEMV_STAGES:
            name = f"gemv fma r={rr} w={w} s={sp} st={st} pf={int(pf)}"
            r = timing.check_then_time(
                lambda x, b, rr=rr, w=w, sp=sp, st=st, pf=pf: kg.kquant_gemv(
                    x, b, fmt, mma=False, rows=rr, warps=w, split=sp, stages=st, depth=int(pf)
                ),
                list(zip(xs, blocks)),
                lambda o: testing.check_dot(o, ref, mag, TOL),
            )
            rows.append({"fmt": fmt, "K": k, "N": n, "M": m, "variant": name, **r})
            bad += r["status"] != "PASS"
            line.append(
                f"{rr}/{w}/{sp}/{st}/{int(pf)}: {r['us']:.1f}" if r["status"] == "PASS" else f"{name}: {r['status']}"
            )
            if r["status"] == "PASS" and (best is None or r["us"] < best[0]):
                best = (r["us"], dict(rows=rr, warps=w, split=sp, stages=st, depth=int(pf)))
        print("  ".join(line), flush=True)
        del blocks, wbf
        if best is not None:
            bad += gemv_confirm(rows, fmt, best[1])
        timing.write_rows("kquant_gemv_stages", rows)  # after every format: a time limit keeps what ran
    return bad


#: --gemv-depth: (rows, warps, split) x tiles loaded ahead, CUDA-core path, M = 1, 5120 x 5120.
GEMV_DEPTH = [
    (r, w, sp, d)
    for r, w, sp in [(8, 2, 1), (16, 4, 1), (32, 4, 1), (8, 2, 2), (32, 4, 2), (32, 4, 4)]
    for d in (1, 2, 4)
]


def gemv_depth(
    rows: list[dict],
    formats: list[str],
    deadline: float,
    configs: list[tuple] | None = None,
    name: str = "kquant_gemv_depth",
) -> int:
    """How many tiles each program loads ahead (``depth``) against the split, at M = 1 on 5120 x 5120;
    the best on 5120 x 13824 at M = 1 and 2 beside bf16 and today's dispatch, and its parts timed
    alone (the kernel on an already permuted x, the permutation, the split's sum). Checked, then timed."""
    bad, t0 = 0, time.time()
    for fmt in formats:
        best = None
        for (k, n), ms in [((5120, 5120), (1,)), ((5120, 13824), (1, 2))]:
            blocks, ref_w, wbf = gemv_weights(fmt, k, n)
            for m in ms:
                if time.time() - t0 > deadline:
                    print(f"deadline reached before {fmt} {k}x{n} M={m}", file=sys.stderr)
                    return bad
                xs, ref, mag = gemv_inputs(ref_w, m, k)
                check = lambda o, ref=ref, mag=mag: testing.check_dot(o, ref, mag, TOL)  # noqa: E731
                variants = {
                    "bf16": (lambda x, w: nt(x, w), list(zip(xs, wbf)), check),
                    "dispatch": (lambda x, b: kg.dispatch_matmul(x, b, fmt), list(zip(xs, blocks)), check),
                }
                cfgs = (configs or GEMV_DEPTH) if best is None else [best]
                for rr, w, sp, d in cfgs:
                    variants[f"gemv r={rr} w={w} s={sp} d={d}"] = (
                        lambda x, b, rr=rr, w=w, sp=sp, d=d: kg.kquant_gemv(
                            x, b, fmt, mma=False, rows=rr, warps=w, split=sp, depth=d
                        ),
                        list(zip(xs, blocks)),
                        check,
                    )
                if best is not None:  # the best one's parts, each alone
                    rr, w, sp, d = best
                    sp = kg.dividing_split(k, sp)  # what kquant_gemv ran
                    xks = [kg.kernel_x(x, fmt, False) for x in xs]
                    variants["part: kernel"] = (
                        lambda xk, b: kg.launch(xk, b, fmt, m, False, rr, w, 1, sp, d),
                        list(zip(xks, blocks)),
                        lambda o, check=check: check(o.sum(axis=0)[:m].astype(jnp.bfloat16)),
                    )
                    if not np.array_equal(kg.x_order(fmt, False), np.arange(kq.TILE)):  # else no kernel
                        want = np.asarray(xks[0])
                        variants["part: permute x"] = (
                            lambda x: kg.kernel_x(x, fmt, False),
                            [(x,) for x in xs],
                            lambda o, want=want: {"ok": bool(np.array_equal(np.asarray(o), want))},
                        )
                    if sp > 1:
                        parts = [jax.random.normal(jax.random.key(i), (sp, 16, n), jnp.float32) for i in range(4)]
                        want_sum = np.asarray(parts[0]).sum(0)[:m]
                        variants["part: split sum"] = (
                            lambda p: p.sum(axis=0)[:m].astype(jnp.bfloat16),
                            [(p,) for p in parts],
                            lambda o, want_sum=want_sum: {
                                "ok": bool(np.allclose(np.asarray(o, np.float32), want_sum, rtol=1e-2, atol=1e-2))
                            },
                        )
                res = {}
                for label, (fn, sets, chk) in variants.items():
                    r = timing.check_then_time(fn, sets, chk)
                    rows.append({"fmt": fmt, "K": k, "N": n, "M": m, "variant": label, **r})
                    if r["status"] != "PASS":
                        bad += 1
                        print(f"{fmt} {k}x{n} M={m} {label}: {r['status']} {r.get('error', r.get('check'))}"[:300])
                        continue
                    res[label] = r["us"]
                ranked = sorted((us, v) for v, us in res.items() if v.startswith("gemv"))
                if best is None and ranked:
                    best = cfgs[[f"gemv r={c[0]} w={c[1]} s={c[2]} d={c[3]}" for c in cfgs].index(ranked[0][1])]
                cells = "  ".join(f"{v}: {us:.1f}" for v, us in sorted(res.items(), key=lambda kv: kv[1]))
                print(f"{fmt} {k}x{n} M={m}  {cells}", flush=True)
            del blocks, wbf
        timing.write_rows(name, rows)  # after every format: a time limit keeps what ran
    return bad


def gemv_confirm(rows: list[dict], fmt: str, cfg: dict) -> int:
    """The best tiling at M = 1 and 2 on the other DiT shapes, against bf16 and the first small-M kernel."""
    bad = 0
    for k, n in [(5120, 13824), (1536, 1536)]:
        blocks, ref_w, wbf = gemv_weights(fmt, k, n)
        for m in (1, 2):
            xs, ref, mag = gemv_inputs(ref_w, m, k, seed=9)
            res = {}
            for name, fn, sets in [
                ("bf16", lambda x, w: nt(x, w), list(zip(xs, wbf))),
                ("small_m", lambda x, b: kq.kquant_matmul_small_m(x, b, fmt), list(zip(xs, blocks))),
                ("gemv best", lambda x, b: kg.kquant_gemv(x, b, fmt, mma=False, **cfg), list(zip(xs, blocks))),
            ]:
                r = timing.check_then_time(fn, sets, lambda o: testing.check_dot(o, ref, mag, TOL))
                rows.append({"fmt": fmt, "K": k, "N": n, "M": m, "variant": name, "config": str(cfg), **r})
                bad += r["status"] != "PASS"
                res[name] = r.get("us", float("nan")) if r["status"] == "PASS" else r["status"]
            print(f"{fmt} {k}x{n} M={m} {cfg}: {res}", flush=True)
        del blocks, wbf
    return bad


def gemv(rows: list[dict], formats: list[str], deadline: float) -> int:
    """The conversion-free small-M kernels (kquant_gemv) against bf16, XLA's decode-then-dot and the
    first small-M kernel: every tiling on 5120 x 5120, the best two on 5120 x 13824; checked, then timed."""
    bad = 0
    t0 = time.time()
    for fmt in formats:
        best: dict[int, list] = {}
        for k, n in [(5120, 5120), (5120, 13824)]:
            blocks, ref_w, wbf = gemv_weights(fmt, k, n)
            for m in (1, 2, 16):
                if time.time() - t0 > deadline:
                    print(f"deadline reached before {fmt} {k}x{n} M={m}", file=sys.stderr)
                    return bad
                xs, ref, mag = gemv_inputs(ref_w, m, k)
                variants = {
                    "bf16": (lambda x, w: nt(x, w), list(zip(xs, wbf))),
                    "xla": (lambda x, b: nt(x, kq.decode_reference(b, fmt)), list(zip(xs, blocks))),
                    "small_m": (lambda x, b: kq.kquant_matmul_small_m(x, b, fmt), list(zip(xs, blocks))),
                }
                if n == k:
                    cfgs = [(False, *c) for c in GEMV_FMA] if m <= kg.FMA_M_MAX else []
                    cfgs += [(True, *c) for c in (GEMV_MMA[:2] if m == 1 else GEMV_MMA)]
                else:
                    cfgs = best.get(m, [])[:2]
                named = {f"gemv {'mma' if c[0] else 'fma'} r={c[1]} w={c[2]} s={c[3]}": c for c in cfgs}
                for name, (mma, r, w, sp) in named.items():
                    variants[name] = (
                        lambda x, b, mma=mma, r=r, w=w, sp=sp: kg.kquant_gemv(
                            x, b, fmt, mma=mma, rows=r, warps=w, split=sp
                        ),
                        list(zip(xs, blocks)),
                    )
                res = {}
                for name, (fn, sets) in variants.items():
                    r = timing.check_then_time(fn, sets, lambda o: testing.check_dot(o, ref, mag, TOL))
                    rows.append({"fmt": fmt, "K": k, "N": n, "M": m, "variant": name, **r})
                    res[name] = r
                    if r["status"] != "PASS":
                        bad += 1
                        msg = f"{fmt} {k}x{n} M={m} {name}: {r['status']} {r.get('error', r.get('check'))}"
                        print(msg[:300], flush=True)
                ok = {v: r["us"] for v, r in res.items() if r["status"] == "PASS"}
                new = sorted((us, v) for v, us in ok.items() if v in named)
                if n == k:
                    best[m] = [named[v] for _, v in new]
                if new and "bf16" in ok:
                    us, v = new[0]
                    print(
                        f"{fmt:5} {k}x{n:5} M={m:2}  bf16 {ok['bf16']:7.1f}  xla {ok.get('xla', float('nan')):7.1f}  "
                        f"small_m {ok.get('small_m', float('nan')):7.1f}  best gemv {us:7.1f} us ({v})  "
                        f"vs bf16 {ok['bf16'] / us:.2f}x",
                        flush=True,
                    )
            del blocks, wbf
    return bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="two shapes, M in {1, 4096}")
    p.add_argument("--deadline-s", type=float, default=480.0, help="stop starting new rows after this")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--sweep", action="store_true", help="also time the small-M kernel's tilings")
    p.add_argument("--sweep-only", action="store_true", help="only the sweep")
    p.add_argument("--gemv", action="store_true", help="only the conversion-free small-M kernels (kquant_gemv)")
    p.add_argument("--gemv-stages", action="store_true", help="only kquant_gemv's num_stages sweep at M = 1")
    p.add_argument("--gemv-depth", action="store_true", help="only kquant_gemv's load-ahead depth x split sweep")
    p.add_argument("--configs", default="", help="--gemv-depth's tilings: 'rows,warps,split,depth;...'")
    p.add_argument("--tag", default="", help="--gemv-depth writes kquant_gemv_depth-TAG-<device>.json")
    args = p.parse_args()
    os.environ.setdefault("JQUANT_BACKEND", "pallas")
    if not kq.available():
        print("jax-triton is not installed: nothing to measure", file=sys.stderr)
        return 2
    t0 = time.time()
    if args.gemv_depth:
        rows = []
        configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";") if c]
        name = "kquant_gemv_depth" + (f"-{args.tag}" if args.tag else "")
        bad = gemv_depth(rows, args.formats.split(","), args.deadline_s, configs, name)
        path = timing.write_rows(name, rows)
        print(f"wrote {path}; {bad} bad rows")
        return 1 if bad else 0
    if args.gemv_stages:
        rows = []
        bad = gemv_stages(rows, args.formats.split(","))
        path = timing.write_rows("kquant_gemv_stages", rows)
        print(f"wrote {path}; {bad} bad rows")
        return 1 if bad else 0
    if args.gemv:
        rows: list[dict] = []
        bad = gemv(rows, args.formats.split(","), args.deadline_s)
        path = timing.write_rows("kquant_gemv", rows)
        print(f"wrote {path}; {bad} bad rows")
        return 1 if bad else 0
    shapes = SHAPES[2:4] if args.quick else SHAPES
    ms = [1, 4096] if args.quick else MS
    rows: list[dict] = []
    bad = 0
    for fmt in [] if args.sweep_only else args.formats.split(","):
        for k, n in shapes:
            if time.time() - t0 > args.deadline_s:
                print(f"deadline reached before {fmt} {k}x{n}", file=sys.stderr)
                break
            codec = codecs.get_codec(fmt)
            copies = timing.copies_for(n * k * codec.bits_per_weight / 8, limit=6)
            blocks = [jnp.asarray(random_blocks(fmt, n, k, s)) for s in range(copies)]
            ref_w = kq.decode_reference(blocks[0], fmt, jnp.float32)
            try:
                got = kq.kquant_decode(blocks[0], fmt)
                diff = int(jnp.sum(got != ref_w.astype(jnp.bfloat16)))
                row = {"status": "PASS" if diff == 0 else "FAIL", "mismatches": diff}
            except Exception as exc:  # pylint: disable=broad-except
                row = timing.error_row(exc)
            rows.append({"fmt": fmt, "K": k, "N": n, "variant": "decode_exact", **row})
            print(f"{fmt} K={k} N={n} decode vs ggml: {row['status']} {row.get('mismatches', row.get('error'))}")
            bad += row["status"] != "PASS"
            wbf = [kq.decode_reference(b, fmt, jnp.bfloat16) for b in blocks]
            for m in ms:
                xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.bfloat16) for i in range(copies)]
                ref = np.asarray(nt(xs[0].astype(jnp.float32), ref_w))
                mag = np.asarray(nt(jnp.abs(xs[0]).astype(jnp.float32), jnp.abs(ref_w)))

                def check(out, ref=ref, mag=mag):
                    return testing.check_dot(out, jnp.asarray(ref), jnp.asarray(mag), TOL)

                variants = {
                    "bf16": (lambda x, w: nt(x, w), list(zip(xs, wbf))),
                    "xla": (lambda x, b: nt(x, kq.decode_reference(b, fmt)), list(zip(xs, blocks))),
                    "kernel": (lambda x, b: kq.kquant_matmul(x, b, fmt), list(zip(xs, blocks))),
                    # the same through jquant.dispatch.linear, as a model's Dense layer runs it
                    "dispatch": (lambda x, b: dispatch.linear(x, as_qarray(b, fmt)), list(zip(xs, blocks))),
                }
                res = {}
                for name, (fn, sets) in variants.items():
                    r = timing.check_then_time(fn, sets, check)
                    res[name] = r
                    row = {"fmt": fmt, "K": k, "N": n, "M": m, "variant": name, **r}
                    rows.append(row)
                    bad += r["status"] != "PASS"
                if all(res[v]["status"] == "PASS" for v in res):
                    us = {v: res[v]["us"] for v in res}
                    print(
                        f"{fmt:5} K={k:5} N={n:5} M={m:5}  bf16 {us['bf16']:8.1f}  xla {us['xla']:8.1f}  "
                        f"kernel {us['kernel']:8.1f} us  vs bf16 {us['bf16'] / us['kernel']:.2f}x  "
                        f"vs xla {us['xla'] / us['kernel']:.2f}x",
                        flush=True,
                    )
                else:
                    print(f"{fmt} K={k} N={n} M={m}: " + ", ".join(f"{v}={res[v]['status']}" for v in res), flush=True)
            del blocks, wbf
    if args.sweep or args.sweep_only:
        bad += sweep(rows, args.formats.split(","))
    path = timing.write_rows("kquant", rows)
    print(f"wrote {path}; {bad} bad rows")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
