"""W4A8 on the GPU, variant by variant (M=4096 and 32760): the int8 GEMM on int8 weights (the ceiling), the
earlier path (one XLA pass widening the int4 weights to int8, then the int8 GEMM), and the W4A8
kernel (int4 tiles widened in registers) under several tilings (``w4a8.W4A8Config``: tokens per
CTA, 64-row weight blocks per warpgroup). Each variant is checked against the
reference first. Prints a table (CUPTI microseconds, ratios over the int8 GEMM) and writes
``benchmarks/w4a8_sweep-<device>.json``.

    python scripts/sweep_w4a8.py     # GPU (Hopper) only

Run from the repository root: ``python scripts/sweep_w4a8.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/sweep_w4a8.py`` where jquant is not installed (e.g. the GPU machine).
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import testing, timing, w4a8, w8a8

SHAPES = [
    (4096, 1536, 1536),
    (4096, 3072, 3072),
    (4096, 3072, 12288),
    (4096, 12288, 3072),
    (4096, 5120, 5120),
    (32760, 1536, 1536),
    (32760, 3072, 3072),
]
CONFIGS = {
    "t256_b1": w4a8.W4A8Config(tokens=256, blocks=1),
    "t128_b2": w4a8.W4A8Config(tokens=128, blocks=2),
    "t128_b1": w4a8.W4A8Config(tokens=128, blocks=1),
    "t192_b1": w4a8.W4A8Config(tokens=192, blocks=1),
}


def main() -> None:
    rows = []
    cols = ("int8", "xla_widen", *CONFIGS)
    print(f"{'M':>5} {'K':>6} {'N':>6} " + " ".join(f"{c:>11}" for c in cols))
    for m, k, n in SHAPES:
        sets = [testing.w4a8_inputs(jax.random.key(i), m, k, n) for i in range(4)]
        sets8 = [(x, xs, w4a8.int4_view(p, k).astype(jnp.int8), ws, b) for x, xs, p, ws, b in sets]
        want = np.asarray(w4a8.w4a8_matmul_reference(*sets[0], out_dtype=jnp.float32))
        T = lambda f, s: timing.time_fn(f, s, iterations=10)["us"]
        fns = {
            "int8": (w8a8.int8_matmul, sets8),
            "xla_widen": (
                lambda x, xs, p, ws, b: w8a8.int8_matmul(x, xs, w4a8.int4_view(p, k).astype(jnp.int8), ws, b),
                sets,
            ),
        }
        for name, cfg in CONFIGS.items():
            fns[name] = (lambda x, xs, p, ws, b, cfg=cfg: w4a8.w4a8_matmul(x, xs, p, ws, b, config=cfg), sets)
        us, err = {}, {}
        for name, (fn, s) in fns.items():
            got = np.asarray(jax.jit(fn)(*s[0]).astype(jnp.float32))
            err[name] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            us[name] = T(fn, s) if err[name] < 1e-2 else float("nan")
        rows.append(
            dict(m=m, k=k, n=n, **{f"{c}_us": round(us[c], 2) for c in cols}, **{f"{c}_rel_err": err[c] for c in cols})
        )
        print(f"{m:>5} {k:>6} {n:>6} " + " ".join(f"{us[c]:>11.1f}" for c in cols), flush=True)
    timing.write_rows("w4a8_sweep", rows)


if __name__ == "__main__":
    main()
