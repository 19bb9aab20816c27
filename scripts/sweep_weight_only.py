#!/usr/bin/env python3
"""Where the small-M weight-only kernel spends its time: split-K and pipeline depth swept on
the GEMV shapes, kernel alone and the whole call (pad, kernel, split reduction) beside XLA's
bf16 GEMM, same run. Prints a table; writes ``benchmarks/weight_only_sweep-<device>.json``.

    python scripts/sweep_weight_only.py     # GPU (Hopper) only

Run from the repository root: ``python scripts/sweep_weight_only.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/sweep_weight_only.py`` where jquant is not installed (e.g. the GPU machine).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common, testing, timing
from pallas_kernels import weight_only as wo

SHAPES = [(1, 3072, 3072), (1, 12288, 3072), (1, 3072, 12288), (16, 5120, 5120)]
SPLITS = [1, 2, 4, 8, 16]
STAGES = [2, 4, 8]


def main() -> int:
    os.environ.setdefault("JQUANT_BACKEND", "pallas")
    sms = _common.num_sms()
    rows = []
    print(
        f"{'M':>3} {'K':>6} {'N':>6} {'splits':>6} {'stages':>6} {'kernel us':>9} {'GB/s':>7} {'call us':>8} {'bf16 us':>8}"
    )
    for m, k, n in SHAPES:
        sets = [testing.w4a16_inputs(jax.random.key(i), m, k, n) for i in range(timing.copies_for(n * k / 2))]
        prepared = [wo.prepare_w4a16(p, s, k) for _, p, s in sets]
        xw = [
            (
                jax.random.normal(jax.random.key(100 + i), (m, k), jnp.bfloat16),
                jax.random.normal(jax.random.key(200 + i), (n, k), jnp.bfloat16),
            )
            for i in range(len(sets))
        ]
        bf16 = timing.time_fn(lambda x, w: lax.dot_general(x, w, (((1,), (1,)), ((), ()))), xw)["us"]
        call = timing.time_fn(
            lambda x, p: wo.w4a16_matmul_prepared(x, p), [(x, p) for (x, _, _), p in zip(sets, prepared)]
        )["us"]
        k_steps = prepared[0].w.shape[1] // wo.GROUP
        for splits in SPLITS:
            if k_steps % splits:
                continue
            for stages in STAGES:
                cfg = wo.WeightOnlyConfig(tokens=16, splits=splits, stages=stages)
                xs = [_common.pad_axis(_common.pad_axis(x, 1, prepared[0].w.shape[1]), 0, 16) for x, _, _ in sets]
                try:
                    us = timing.time_fn(
                        lambda x, p: wo.weight_only_pallas(p.w, x, p.s_t, config=cfg), list(zip(xs, prepared))
                    )["us"]
                except Exception as e:  # noqa: BLE001 - a config that does not lower is a row too
                    print(f"{m:>3} {k:>6} {n:>6} {splits:>6} {stages:>6}  failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
                gbs = n * k / 2 / us / 1e3
                rows.append(
                    dict(
                        m=m,
                        k=k,
                        n=n,
                        splits=splits,
                        stages=stages,
                        kernel_us=us,
                        weight_gbs=gbs,
                        call_us=call,
                        xla_bf16_us=bf16,
                        default=wo._pick_config(m, prepared[0].w.shape[0], k_steps, sms, 4).__dict__,
                    )
                )
                print(
                    f"{m:>3} {k:>6} {n:>6} {splits:>6} {stages:>6} {us:>9.1f} {gbs:>7.0f} {call:>8.1f} {bf16:>8.1f}",
                    flush=True,
                )
    timing.write_rows("weight_only_sweep", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
