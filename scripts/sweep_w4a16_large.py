#!/usr/bin/env python3
"""W4A16 at large M on the GPU: the in-register dequant kernel (:mod:`pallas_kernels.w4a16_gemm`)
under several tilings against the XLA path it replaces (dequantize the prepared weights to bf16,
then XLA's GEMM) and XLA's bf16 GEMM on bf16 weights, same run. Every variant is first checked
against the reference (relative Frobenius error < 1e-2). Prints a table; writes
``benchmarks/w4a16_large-<device>.json``.

    JQUANT_BACKEND=pallas python scripts/sweep_w4a16_large.py    # GPU (Hopper) only

Run from the repository root: ``python scripts/sweep_w4a16_large.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/sweep_w4a16_large.py`` where jquant is not installed (e.g. the GPU machine).
"""

from __future__ import annotations

import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import testing, timing
from pallas_kernels import w4a16_gemm as g
from pallas_kernels import weight_only as wo

SHAPES = [
    (4096, 3072, 3072),
    (4096, 1536, 1536),
    (4096, 3072, 12288),
    (4096, 12288, 3072),
    (4096, 5120, 5120),
    (4096, 1536, 8960),
    (32760, 1536, 1536),
]
CONFIGS = {
    "t256_k64": g.W4A16GemmConfig(256, 64),
    "t256_k128": g.W4A16GemmConfig(256, 128),
    "t128_k128": g.W4A16GemmConfig(128, 128),
    "t128_k64": g.W4A16GemmConfig(128, 64),
}


def _row(m, k, n, name, fn, sets, ref, bf16) -> dict:
    """Checks ``fn`` against ``ref`` on the first set, then times it over all sets."""
    try:
        out = np.asarray(jax.jit(fn)(*sets[0]), np.float32)
        rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        us = timing.time_fn(fn, sets, iterations=10)["us"] if rel < 1e-2 else float("nan")
        error = None
    except Exception as exc:  # pylint: disable=broad-except
        traceback.print_exc()
        rel, us, error = float("nan"), float("nan"), f"{type(exc).__name__}: {str(exc)[:300]}"
    print(
        f"{m:>6} {k:>6} {n:>6} {name:12s} {us:>8.1f} {bf16 / us:>7.2f}  {rel:.1e}" + (f"  {error}" if error else ""),
        flush=True,
    )
    return dict(m=m, k=k, n=n, variant=name, us=us, xla_bf16_us=bf16, speedup_vs_bf16=bf16 / us, rel=rel, error=error)


def main() -> int:
    os.environ.setdefault("JQUANT_BACKEND", "pallas")  # every kernel, verified or not (set here: importing must not)
    import argparse  # pylint: disable=g-import-not-at-top

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="int4 kernel tilings to time")
    args = parser.parse_args()
    configs = {name: CONFIGS[name] for name in args.configs.split(",") if name}
    rows = []
    print(f"{'M':>6} {'K':>6} {'N':>6} {'variant':12s} {'us':>8} {'x bf16':>7}  rel")
    for m, k, n in SHAPES:
        sets = [testing.w4a16_inputs(jax.random.key(i), m, k, n) for i in range(3)]
        prepared = [(x, wo.prepare_w4a16(p, s, k)) for x, p, s in sets]
        ref = np.asarray(wo.w4a16_matmul_reference(*sets[0]), np.float32)
        xw = [(x, jax.random.normal(jax.random.key(200 + i), (n, k), jnp.bfloat16)) for i, (x, _, _) in enumerate(sets)]
        bf16 = timing.time_fn(lambda x, w: lax.dot_general(x, w, (((1,), (1,)), ((), ()))), xw, iterations=10)["us"]
        variants = {
            f"kernel_{name}": (lambda x, p, c=cfg: g.w4a16_large_m(x, p, config=c)) for name, cfg in configs.items()
        }
        variants["xla_dequant"] = lambda x, p: wo.xla_bf16(x, wo.dequantize_prepared(p), None, jnp.bfloat16)
        rows += [_row(m, k, n, name, fn, prepared, ref, bf16) for name, fn in variants.items()]
        # W8A16 int8 per channel: the same kernel vs XLA's convert + GEMM.
        sets = [testing.w8a16_inputs(jax.random.key(i), m, k, n) for i in range(3)]
        ref = np.asarray(wo.w8a16_matmul_reference(*sets[0]), np.float32)
        rows += [
            _row(m, k, n, name, fn, sets, ref, bf16)
            for name, fn in (
                ("w8_kernel", lambda x, w, s: g.w8a16_large_m(x, w, s)),
                ("w8_xla", lambda x, w, s: wo.xla_bf16(x, w.astype(jnp.bfloat16), None, jnp.bfloat16, s)),
            )
        ]
        timing.write_rows("w4a16_large", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
