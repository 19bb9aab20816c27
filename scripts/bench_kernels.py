#!/usr/bin/env python3
"""Time every Pallas kernel against XLA's bf16 / int8 / fp8 GEMMs in the same run.

DiT shapes: M in {1, 16, 4096, 32760} x (K, N) in the list below. For each shape
the XLA bf16 GEMM (``x @ w^T``, bf16 out) is timed once, then each kernel, and
for W8A8 kernels XLA's own int8 / fp8 ``dot_general`` with the same epilogue
(their references). Times are medians of CUPTI kernel time over many runs, with
inputs rotated among enough random copies that L2 cannot serve them
(:mod:`pallas_kernels.timing`). One JSON row per (kernel, M, K, N) goes to
``benchmarks/kernels-<device>.json`` (rewritten after every row; also to ``$OUT``).

Usage (GPU machine, repo root)::

    PYTHONPATH=. python3 scripts/bench_kernels.py            # everything
    PYTHONPATH=. python3 scripts/bench_kernels.py --quick    # a subset
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

if jax.devices()[0].platform == "gpu":
  # Exercise every kernel, also those whose default dispatch waits for a GPU check.
  os.environ.setdefault("JQUANT_PALLAS", "kernel")
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from pallas_kernels import testing, timing  # noqa: E402
from pallas_kernels import act_quant  # noqa: E402

KN = [(1536, 1536), (1536, 8960), (8960, 1536), (3072, 3072), (3072, 12288),
      (12288, 3072), (5120, 5120)]
MS = [4096, 16, 32760, 1]
QUICK_KN = [(3072, 3072), (1536, 1536), (3072, 12288)]
QUICK_MS = [4096, 16]
GEMM_KERNELS = ["w8a8_int8", "w8a8_fp8", "w8a8_fp8_block", "w4a8", "svdquant_r32", "w4a16", "w8a16",
                "w4a16_g32", "w8a16_fp8", "w4a16_zp", "nf4_w16", "fp4_w16", "nvfp4_w16"]


def _bf16_gemm(x, w):
  return lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def _bf16_sets(m, k, n, copies, seed):
  keys = jax.random.split(jax.random.key(seed), 2 * copies)
  return [(jax.random.normal(keys[2 * i], (m, k), jnp.bfloat16),
           jax.random.normal(keys[2 * i + 1], (n, k), jnp.bfloat16))
          for i in range(copies)]


def _sets(case, m, k, n, copies, seed):
  keys = jax.random.split(jax.random.key(seed), copies)
  return [case.make_inputs(keys[i], m, k, n) for i in range(copies)]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--kernels", default="", help="comma list (default: all)")
  parser.add_argument("--m", default="", help="comma list of M (default: all)")
  parser.add_argument("--kn", default="", help="K:N pairs, comma separated (e.g. 3072:3072)")
  parser.add_argument("--iterations", type=int, default=10)
  parser.add_argument("--budget-s", type=float, default=1e9,
                      help="start no new shape after this many seconds")
  parser.add_argument("--out", default="")
  args = parser.parse_args()

  ms = QUICK_MS if args.quick else MS
  kns = QUICK_KN if args.quick else KN
  if args.m:
    ms = [int(v) for v in args.m.split(",")]
  if args.kn:
    kns = [tuple(int(v) for v in pair.split(":")) for pair in args.kn.split(",")]
  wanted = args.kernels.split(",") if args.kernels else None
  gemms = [g for g in GEMM_KERNELS if not wanted or g in wanted]
  quants = [q for q in ("act_quant", "act_quant_fp8") if not wanted or q in wanted]

  device = jax.devices()[0]
  slug = device.device_kind.replace(" ", "_")
  meta = {
      "device": device.device_kind,
      "jax": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": "python3 scripts/bench_kernels.py " + " ".join(sys.argv[1:]),
  }
  out_name = args.out or f"kernels-{slug}.json"
  folders = [os.path.join(os.path.dirname(__file__), "..", "benchmarks")]
  if os.environ.get("OUT"):
    folders.append(os.environ["OUT"])
  rows: list[dict] = []

  def flush():
    for folder in folders:
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(folder, out_name), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)

  start = time.time()
  meta["copy_gbps"] = round(timing.copy_bandwidth(args.iterations), 1)
  print(f"{meta['device']} jax {meta['jax']} copy bandwidth {meta['copy_gbps']} GB/s",
        flush=True)
  print(f"{'kernel':15s} {'M':>6s} {'K':>6s} {'N':>6s} {'us':>9s} {'TFLOP/s':>8s}"
        f" {'bf16_us':>9s} {'xla8_us':>9s} {'x_bf16':>7s}", flush=True)

  def emit(row):
    row.update(meta_small)
    rows.append(row)
    flush()
    x8 = row.get("xla_int8_us") or row.get("xla_fp8_us") or row.get("xla_us")
    print(f"{row['kernel']:15s} {row['m']:6d} {row['k']:6d} {row['n'] or 0:6d}"
          f" {row['us']:9.1f} {row.get('tflops', 0):8.1f}"
          f" {row.get('xla_bf16_us') or 0:9.1f} {x8 or 0:9.1f}"
          f" {row.get('speedup_vs_bf16') or 0:7.2f}", flush=True)

  meta_small = {"device": meta["device"], "jax": meta["jax"], "date": meta["date"]}
  for m in ms:
    done_k = set()
    for k, n in kns:
      if time.time() - start > args.budget_s:
        print(f"budget reached, skipping M={m} K={k} N={n}", flush=True)
        continue
      seed = m * 7 + k * 3 + n
      bytes_bf16 = 2 * m * k + 2 * n * k + 2 * m * n
      copies = timing.copies_for(bytes_bf16)
      bf16 = timing.time_fn(_bf16_gemm, _bf16_sets(m, k, n, copies, seed),
                            iterations=args.iterations)["us"]
      xla_lowbit: dict[str, float] = {}
      for name in gemms:
        case = testing.CASES[name]
        try:
          sets = _sets(case, m, k, n, timing.copies_for(case.min_bytes(m, k, n)),
                       seed + 1)
          if case.xla_baseline and case.xla_baseline not in xla_lowbit:
            xla_lowbit[case.xla_baseline] = timing.time_fn(
                case.reference, sets, iterations=args.iterations)["us"]
          fn = case.kernel
          if case.bench_form is not None:
            forms = [case.bench_form(s) for s in sets]
            fn, sets = forms[0][0], [f[1] for f in forms]
          path = testing.kernel_path(name, sets[0])  # x stays first in every form
          t = timing.time_fn(fn, sets, iterations=args.iterations)
          del sets
        except Exception as exc:  # pylint: disable=broad-except
          print(f"{name} M={m} K={k} N={n}: {type(exc).__name__}: {str(exc)[:300]}",
                flush=True)
          continue
        row = {"kernel": name, "m": m, "k": k, "n": n, "us": round(t["us"], 2),
               "tflops": round(case.flops(m, k, n) / t["us"] / 1e6, 1),
               "gbps": round(case.min_bytes(m, k, n) / t["us"] / 1e3, 1),
               "xla_bf16_us": round(bf16, 2),
               "speedup_vs_bf16": round(bf16 / t["us"], 3),
               "copies": t["copies"], "timer": t["method"], "path": path}
        if case.xla_baseline:
          base = xla_lowbit[case.xla_baseline]
          row[f"xla_{case.xla_baseline}_us"] = round(base, 2)
          row[f"speedup_vs_xla_{case.xla_baseline}"] = round(base / t["us"], 3)
        emit(row)
      if k in done_k:
        continue
      done_k.add(k)
      for name in quants:
        case = testing.CASES[name]
        fmt = "int8" if name == "act_quant" else "fp8"
        sets = _sets(case, m, k, n, timing.copies_for(3 * m * k), seed + 2)
        quant = act_quant.quantize_int8 if fmt == "int8" else act_quant.quantize_fp8
        t = timing.time_fn(lambda x: quant(x, method="pallas"), sets,
                           iterations=args.iterations)
        t_xla = timing.time_fn(lambda x: quant(x, method="xla"), sets,
                               iterations=args.iterations)
        gbps = case.min_bytes(m, k, n) / t["us"] / 1e3
        emit({"kernel": name, "m": m, "k": k, "n": None, "us": round(t["us"], 2),
              "gbps": round(gbps, 1),
              "fraction_of_copy_bw": round(gbps / meta["copy_gbps"], 3),
              "xla_us": round(t_xla["us"], 2),
              "xla_fraction_of_copy_bw": round(
                  case.min_bytes(m, k, n) / t_xla["us"] / 1e3 / meta["copy_gbps"], 3),
              "copies": t["copies"], "timer": t["method"]})
  meta["elapsed_s"] = round(time.time() - start, 1)
  flush()
  return 0


if __name__ == "__main__":
  sys.exit(main())
