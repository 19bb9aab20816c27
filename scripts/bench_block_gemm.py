#!/usr/bin/env python3
"""The block-scaled 8-bit GEMM's tile width on Wan's linears (issues 19 and 26).

Per format (int8, fp8) and Wan linear ``K -> N`` at ``BENCH_M`` tokens (32,760: 480p, 81 frames),
one run times:

* ``bf16``: XLA's bf16 GEMM on the dequantized operands (the baseline);
* ``token``: the per-token-scaled 8-bit GEMM (``w8a8.int8_matmul`` / ``fp8_matmul``, a 128 x 256
  tile without per-slice promotion): what a block-scaled GEMM could reach at best;
* ``n128`` / ``n256``: the block-scaled GEMM (one scale per token per 128 channels, 128 x 128
  weight blocks) on the 128 x 128 and on the 128 x 256 tile (``w8a8.BlockConfig.cta_n``);
* for the FFN-up shapes, the FFN-up producer (``gemm_act_quant``: + gelu_tanh + per-(token, 128)
  int8 codes) on both tiles, with and without QuaRot's block-128 rotation (``prod*`` rows).

Each output is judged against its float32 reference first (``testing.compare``: the kernels'
GPU-check bounds; bf16 with ``BF16_TOL`` |x||w|, two bf16 roundings of the operands); a wrong or
failing row is printed and the script exits 1. CUPTI kernel time, median and minimum of >= 10
runs, inputs rotated past L2. Writes ``benchmarks/block_gemm-<device>.json``.

    PYTHONPATH=. python3 scripts/bench_block_gemm.py            # Wan2.1-1.3B and 14B linears
    BENCH_SHAPES=1.3b BENCH_FORMATS=int8 BENCH_ROWS=token,n256 ...  # fewer rows (bf16 always)
    BENCH_TAG=14b ...                                          # block_gemm-14b-<device>.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels import testing, timing  # noqa: E402

M = int(os.environ.get("BENCH_M", 32760))
SHAPES = {
    "1.3b": [(1536, 1536), (1536, 8960), (8960, 1536)],
    "14b": [(5120, 5120), (5120, 13824), (13824, 5120)],
}
FFN_UP = {(1536, 8960), (5120, 13824)}
BF16_TOL = 8e-3  # each bf16 operand rounding is 2^-9 relative: the sum of two, with margin


def _rows_for(fmt: str, k: int, n: int) -> dict[str, str]:
    """Row name -> kernel case of :data:`testing.CASES` for one format and shape."""
    rows = {
        "token": f"w8a8_{fmt}",
        "n128": f"w8a8_{fmt}_block_n128",
        "n256": f"w8a8_{fmt}_block_n256",
    }
    if fmt == "int8" and (k, n) in FFN_UP:
        rows |= {
            "prod128": "gemm_act_quant_int8_n128",
            "prod256": "gemm_act_quant_int8_n256",
            "prod128_rot": "gemm_act_quant_int8_had128",
            "prod256_rot": "gemm_act_quant_int8_had128_n256",
        }
    only = os.environ.get("BENCH_ROWS")
    return {r: c for r, c in rows.items() if not only or r in only.split(",")}


def _time_case(name: str, k: int, n: int) -> dict:
    case = testing.CASES[name]
    sets = [case.make_inputs(jax.random.key(i), M, k, n) for i in range(2)]
    ref = jax.block_until_ready(jax.jit(case.reference)(*sets[0]))
    row = timing.check_then_time(case.kernel, sets, lambda out: testing.compare(case, out, ref, sets[0]))
    row["path"] = testing.kernel_path(name, sets[0])
    return row


def _time_bf16(fmt: str, k: int, n: int) -> dict:
    """XLA bf16 on the block case's dequantized operands, judged against their float32 product."""
    name = f"w8a8_{fmt}_block"
    case = testing.CASES[name]
    sets = []
    for i in range(2):
        x, w, bias = testing.dequantized_operands(name, case.make_inputs(jax.random.key(i), M, k, n))
        sets.append((x.astype(jnp.bfloat16), w.T.astype(jnp.bfloat16), bias.astype(jnp.float32)))
    x32, w32 = sets[0][0].astype(jnp.float32), sets[0][1].T.astype(jnp.float32)
    ref = jnp.dot(x32, w32.T, precision=jax.lax.Precision.HIGHEST) + sets[0][2]
    magnitude = testing.abs_dot(x32, w32) + jnp.abs(sets[0][2])

    def fn(x, w_t, bias):
        return (jnp.dot(x, w_t, preferred_element_type=jnp.float32) + bias).astype(jnp.bfloat16)

    return timing.check_then_time(fn, sets, lambda out: testing.check_dot(out, ref, magnitude, BF16_TOL))


def _write(rows: list[dict], complete: bool) -> str:
    record = {**timing.run_metadata(__file__), "rows": rows, "complete": complete}
    tag = os.environ.get("BENCH_TAG")
    return timing.write_json(f"block_gemm-{tag + '-' if tag else ''}{timing.device_slug()}.json", record)


def main() -> int:
    which = os.environ.get("BENCH_SHAPES", "all")
    shapes = [s for key, group in SHAPES.items() if which in ("all", key) for s in group]
    formats = os.environ.get("BENCH_FORMATS", "int8,fp8").split(",")
    rows, wrong = [], 0
    for fmt in formats:
        for k, n in shapes:
            row = {"fmt": fmt, "m": M, "k": k, "n": n, "bf16": _time_bf16(fmt, k, n)}
            for label, name in _rows_for(fmt, k, n).items():
                row[label] = _time_case(name, k, n)
            for label, result in row.items():
                if isinstance(result, dict) and result.get("status") != "PASS":
                    wrong += 1
                    print(f"WRONG {fmt} {k}->{n} {label}: {result.get('check', result.get('error'))}", flush=True)
            us = {label: r.get("us") for label, r in row.items() if isinstance(r, dict)}
            for label in ("token", "n128", "n256"):
                if us.get(label) and us.get("bf16"):
                    row[f"{label}_vs_bf16"] = us["bf16"] / us[label]
            rows.append(row)
            text = "  ".join(f"{label} {v:8.1f}" for label, v in us.items() if v)
            print(f"{fmt:>4} {k:>5}->{n:<5} {text}", flush=True)
            _write(rows, complete=False)  # a run cut short by a time limit keeps what it measured
    path = _write(rows, complete=True)
    cols = ("bf16", "token", "n128", "n256")
    print(f"\n{'fmt':>4} {'K->N':>12} " + " ".join(f"{c:>8}" for c in cols) + "  (us, median)")
    for r in rows:
        get = lambda label: r.get(label, {}).get("us", float("nan"))  # noqa: E731
        print(f"{r['fmt']:>4} {r['k']:>5}->{r['n']:<6} " + " ".join(f"{get(c):8.1f}" for c in cols))
    print(f"wrote {path}; {wrong} wrong row(s)")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
