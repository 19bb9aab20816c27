"""SVDQuant path on the GPU, part by part (rank 32): the W4A8 GEMM alone, the fused path (h = x @ L1
in XLA, h @ L2 added in the int8 kernel's epilogue), the unfused path (W4A8 GEMM, branch in XLA, a
separate add), the fused path with 128-token tiles, and the down-projection alone, with the overhead ratios over the GEMM. Prints a table
(CUPTI microseconds) and writes ``benchmarks/svdquant_breakdown-<device>.json``.

    python scripts/svdquant_breakdown.py     # GPU (Hopper) only

Run from the repository root: ``python scripts/svdquant_breakdown.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/svdquant_breakdown.py`` where jquant is not installed (e.g. the GPU machine).
"""

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import testing, timing, w4a8

SHAPES = [(4096, 3072, 3072), (4096, 1536, 1536), (4096, 3072, 12288), (4096, 12288, 3072), (4096, 5120, 5120)]


def _unfused(x, xq, xs, p, ws, l1, l2, b):
    return w4a8.w4a8_matmul(xq, xs, p, ws, b) + w4a8._lowrank(x, l1, l2).astype(jnp.bfloat16)


def main() -> None:
    rows = []
    print(
        f"{'M':>5} {'K':>6} {'N':>6} {'gemm':>8} {'fused':>8} {'unfused':>8} {'f_t128':>8} {'x@l1':>7} {'fused/gemm':>10} {'unfused/gemm':>12}"
    )
    for m, k, n in SHAPES:
        sets = [testing.svdquant_r32_inputs(jax.random.key(i), m, k, n) for i in range(4)]
        T = lambda f: timing.time_fn(f, sets, iterations=10)["us"]
        gemm = T(lambda x, xq, xs, p, ws, l1, l2, b: w4a8.w4a8_matmul(xq, xs, p, ws, b))
        fused = T(w4a8.svdquant_matmul)
        t128 = w4a8.W4A8Config(tokens=128)
        fused128 = T(
            lambda x, xq, xs, p, ws, l1, l2, b: w4a8.w4a8_matmul(
                xq, xs, p, ws, b, lowrank=w4a8.lowrank_operands(x, l1, l2), config=t128
            )
        )
        unfused = T(_unfused)
        down = T(
            lambda x, xq, xs, p, ws, l1, l2, b: lax.dot_general(
                x, l1, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
            ).astype(jnp.bfloat16)
        )
        rows.append(
            dict(
                m=m,
                k=k,
                n=n,
                rank=32,
                w4a8_us=gemm,
                fused_us=fused,
                fused_t128_us=fused128,
                unfused_us=unfused,
                down_proj_us=down,
                fused_over_gemm=fused / gemm,
                unfused_over_gemm=unfused / gemm,
            )
        )
        print(
            f"{m:>5} {k:>6} {n:>6} {gemm:>8.1f} {fused:>8.1f} {unfused:>8.1f} {fused128:>8.1f} {down:>7.1f}"
            f" {fused / gemm:>10.3f} {unfused / gemm:>12.3f}",
            flush=True,
        )
    timing.write_rows("svdquant_breakdown", rows)


if __name__ == "__main__":
    main()
