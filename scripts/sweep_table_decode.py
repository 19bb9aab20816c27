#!/usr/bin/env python3
"""The small-M weight-only kernel per weight format and K per pipeline step: int8 (W8A16),
int4 with group-128 f32 scales (W4A16), int4 with 32-wide blocks (the decode-and-scale path
with an identity decode: the cost of one wgmma per block), FP4 e2m1 (MXFP4 blocks of 32)
and NF4 (block 64), at kstep 128/256/512 (K slices per step whose loads, converts and
wgmmas overlap), beside XLA's bf16 GEMM in the same run. Each variant's output is checked
against its plain-JAX reference first. Prints a table; writes
``benchmarks/table_decode_sweep-<device>.json``.

    python scripts/sweep_table_decode.py     # GPU (Hopper) only

Run from the repository root: ``python scripts/sweep_table_decode.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/sweep_table_decode.py`` where jquant is not installed (e.g. the GPU machine).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import _common, testing, timing, w4_table
from pallas_kernels import weight_only as wo

SHAPES = [(1, 3072, 3072), (1, 3072, 12288), (1, 12288, 3072), (16, 5120, 5120), (16, 3072, 3072)]
# (label, decode, block); block 0: int8 with per-channel scales
VARIANTS = [
    ("int8", "int", 0),
    ("int4/g128", "int", 128),
    ("int4/g32", "int", 32),
    ("mxfp4/b32", "fp4", 32),
    ("nf4/b64", "nf4", 64),
]
KSTEPS = [128, 256, 512]


def _inputs(key, m, k, n, decode, block):
    """(x, prepared, reference output) for one variant."""
    if block == 0:
        x, w, scales = testing.w8a16_inputs(key, m, k, n)
        np_, kp = _common.round_up(n, 128), _common.round_up(k, 128)
        prepared = wo.W4Prepared(w=_common.pad_axis(_common.pad_axis(w, 1, kp), 0, np_), s_t=None, n=n, k=k)
        ref = wo.w8a16_matmul_reference(x, w, jnp.ones_like(scales), out_dtype=jnp.float32)
    elif decode == "int":
        x, packed, scales = testing.w4a16_inputs(key, m, k, n, group=block)
        prepared = wo.prepare_w4a16(packed, scales, k, block)
        ref = wo.w4a16_matmul_reference(x, packed, scales, group_size=block, out_dtype=jnp.float32)
    else:
        x, packed, scales, tensor = testing.table_inputs(key, m, k, n, decode, block, "mx" if decode == "fp4" else "")
        prepared = w4_table.prepare_w4_table(packed, scales, k, fmt=decode, block=block)
        ref = w4_table.w4_table_matmul_reference(
            x, packed, scales, tensor, fmt=decode, block=block, out_dtype=jnp.float32
        )
    return x, prepared, ref


def main() -> int:
    os.environ.setdefault("JQUANT_BACKEND", "pallas")
    sms = _common.num_sms()
    rows = []
    print(
        f"{'M':>3} {'K':>6} {'N':>6} {'variant':>10} {'kstep':>5} {'splits':>6} {'rel_err':>8}"
        f" {'kernel us':>9} {'bf16 us':>8} {'x_bf16':>6}"
    )
    for m, k, n in SHAPES:
        copies = timing.copies_for(n * k / 2)
        xw = [
            (
                jax.random.normal(jax.random.key(100 + i), (m, k), jnp.bfloat16),
                jax.random.normal(jax.random.key(200 + i), (n, k), jnp.bfloat16),
            )
            for i in range(copies)
        ]
        bf16 = timing.time_fn(lambda x, w: lax.dot_general(x, w, (((1,), (1,)), ((), ()))), xw)["us"]
        del xw
        for label, decode, block in VARIANTS:
            sets = [_inputs(jax.random.key(i), m, k, n, decode, block) for i in range(copies)]
            x0, p0, ref0 = sets[0]
            kp = p0.w.shape[1]
            bits = 8 if block == 0 else 4
            for kstep in KSTEPS:
                cfg = wo._pick_config(
                    m,
                    p0.w.shape[0],
                    kp // wo.GROUP,
                    sms,
                    bits,
                    decode,  # pylint: disable=protected-access
                    block or wo.GROUP,
                    kstep,
                )
                if cfg.kstep != kstep:
                    continue
                xs = [_common.pad_axis(_common.pad_axis(x, 1, kp), 0, cfg.tokens) for x, _, _ in sets]
                fn = lambda x, p, cfg=cfg: wo.weight_only_pallas(p.w, x, p.s_t, config=cfg)
                try:
                    y = fn(xs[0], p0).sum(axis=0)[:n, :m].T
                    rel = float(np.linalg.norm(np.asarray(y - ref0)) / np.linalg.norm(np.asarray(ref0)))
                    us = timing.time_fn(fn, [(x, p) for x, (_, p, _) in zip(xs, sets)])["us"]
                except Exception as e:  # noqa: BLE001 - a config that does not lower is a row too
                    print(f"{m:>3} {k:>6} {n:>6} {label:>10} {kstep:>5} failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                rows.append(
                    dict(
                        m=m,
                        k=k,
                        n=n,
                        variant=label,
                        decode=decode,
                        block=block,
                        kstep=kstep,
                        config=dataclasses.asdict(cfg),
                        rel_err=rel,
                        kernel_us=us,
                        xla_bf16_us=bf16,
                        speedup_vs_bf16=bf16 / us,
                    )
                )
                print(
                    f"{m:>3} {k:>6} {n:>6} {label:>10} {kstep:>5} {cfg.splits:>6} {rel:>8.1e} {us:>9.1f}"
                    f" {bf16:>8.1f} {bf16 / us:>6.2f}",
                    flush=True,
                )
            if block:  # the alternative at small M: decode to bf16 once per call, XLA's GEMM
                us = timing.time_fn(
                    lambda x, p: wo.xla_bf16(x, wo.dequantize_prepared(p), None, jnp.float32),
                    [(x, p) for x, p, _ in sets],
                )["us"]
                rows.append(
                    dict(
                        m=m,
                        k=k,
                        n=n,
                        variant=label,
                        decode=decode,
                        block=block,
                        kstep=None,
                        path="xla-dequant",
                        kernel_us=us,
                        xla_bf16_us=bf16,
                        speedup_vs_bf16=bf16 / us,
                    )
                )
                print(
                    f"{m:>3} {k:>6} {n:>6} {label:>10} {'xla':>5} {'':>6} {'':>8} {us:>9.1f}"
                    f" {bf16:>8.1f} {bf16 / us:>6.2f}",
                    flush=True,
                )
            del sets
    timing.write_rows("table_decode_sweep", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
