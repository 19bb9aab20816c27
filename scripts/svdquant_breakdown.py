"""SVDQuant path on the GPU, part by part (4096x3072x3072, rank 32): the W4A8 GEMM with bf16 and fp32
output, the low-rank branch, and the sum. Prints microseconds (CUPTI). ``PYTHONPATH=. python3 scripts/svdquant_breakdown.py``"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from pallas_kernels import testing, timing, w4a8  # noqa: E402


def main() -> None:
    m, k, n = 4096, 3072, 3072
    sets = [testing.svdquant_r32_inputs(jax.random.key(i), m, k, n) for i in range(4)]
    T = lambda f, s: timing.time_fn(f, s, iterations=10)["us"]
    print("w4a8 bf16 out", T(lambda x, xq, xs, p, ws, l1, l2, b: w4a8.w4a8_matmul(xq, xs, p, ws, b), sets))
    print("w4a8 f32 out", T(lambda x, xq, xs, p, ws, l1, l2, b: w4a8.w4a8_matmul(xq, xs, p, ws, b, jnp.float32), sets))
    print("x@l1", T(lambda x, xq, xs, p, ws, l1, l2, b: lax.dot_general(x, l1, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32), sets))
    print("lowrank", T(lambda x, xq, xs, p, ws, l1, l2, b: w4a8._lowrank(x, l1, l2), sets))
    print("lowrank bf16 out", T(lambda x, xq, xs, p, ws, l1, l2, b: (x @ l1) @ l2, sets))
    print("svdquant", T(lambda *a: w4a8.svdquant_matmul(*a), sets))
    print("w4a8 bf16 + branch bf16 add", T(lambda x, xq, xs, p, ws, l1, l2, b: w4a8.w4a8_matmul(xq, xs, p, ws, b) + (x @ l1) @ l2, sets))


if __name__ == "__main__":
    main()
