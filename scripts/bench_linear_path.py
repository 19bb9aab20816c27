#!/usr/bin/env python3
"""Where a W8A8 linear's time goes inside a model: XLA bf16 GEMM against jquant's whole dispatch
(`jquant.dispatch.linear` with int8 per-channel weights and dynamic int8 per-token activations,
also with QuaRot's online Hadamard, ``hadamard=True``) and its parts (activation quantization as the dispatch runs it, i.e. the quantizer kernel, and
as XLA runs it; the weight-code transpose; the Mosaic GEMM alone), on Wan2.1-1.3B's linear
shapes at 32,760 tokens. Prints a table; writes
``benchmarks/linear_path-<device>.json``.

    python scripts/bench_linear_path.py     # GPU (Hopper); BENCH_TAG=... names the JSON

Run from the repository root: ``python scripts/bench_linear_path.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/bench_linear_path.py`` where jquant is not installed (e.g. the GPU machine).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

from jquant import dispatch
from jquant.dispatch import kernels as kernel_dispatch
from jquant.formats import parse_spec
from jquant.qarray import decode_scale, quantize
from pallas_kernels import timing, w8a8

M = int(os.environ.get("BENCH_M", 32760))
SHAPES = [(1536, 1536), (1536, 8960), (8960, 1536)]  # attention projections, FFN up, FFN down


def main() -> int:
    act = parse_spec("int8/token")
    rows = []
    print(
        f"{'K':>5} {'N':>5} {'bf16':>8} {'linear':>8} {'+hadam':>8} {'act q':>8} {'xla q':>8} {'w.T':>8} {'gemm':>8}  (us)"
    )
    for k, n in SHAPES:
        sets = []
        for i in range(3):
            kx, kw = jax.random.split(jax.random.key(i))
            x = jax.random.normal(kx, (M, k), jnp.bfloat16)
            w = jax.random.normal(kw, (k, n), jnp.float32) * 0.02
            sets.append((x, w.astype(jnp.bfloat16), quantize(w, parse_spec("int8"))))
        bf16 = timing.time_fn(lambda x, w: x @ w, [(x, wb) for x, wb, _ in sets])["us"]
        lin = timing.time_fn(lambda x, q: dispatch.linear(x, q, act=act), [(x, q) for x, _, q in sets])["us"]
        # QuaRot's online rotation: fused into the quantizer where act_quant.hadamard_layout takes K
        # (1536), an XLA rotation first elsewhere (8960).
        lin_h = timing.time_fn(
            lambda x, q: dispatch.linear(x, q, act=act, hadamard=True), [(x, q) for x, _, q in sets]
        )["us"]
        aq = timing.time_fn(lambda x: kernel_dispatch.quantize_tokens(x, act, None), [(x,) for x, _, _ in sets])["us"]
        aq_xla = timing.time_fn(
            lambda x: dispatch.quantize_activation(x, act, None).qvalue, [(x,) for x, _, _ in sets]
        )["us"]
        tr = timing.time_fn(lambda q: q.qvalue.T, [(q,) for _, _, q in sets])["us"]
        ops = []
        for x, _, q in sets:
            xq = dispatch.quantize_activation(x, act, None)
            ops.append((xq.qvalue, jnp.broadcast_to(decode_scale(xq), (M, 1)), q.qvalue.T, decode_scale(q)[0]))
        gemm = timing.time_fn(lambda a, s, b, t: w8a8.int8_matmul(a, s, b, t), ops)["us"]
        rows.append(
            dict(
                m=M,
                k=k,
                n=n,
                xla_bf16_us=bf16,
                linear_us=lin,
                linear_hadamard_us=lin_h,
                act_quant_us=aq,
                act_quant_xla_us=aq_xla,
                weight_transpose_us=tr,
                gemm_us=gemm,
                speedup_vs_bf16=bf16 / lin,
            )
        )
        print(
            f"{k:>5} {n:>5} {bf16:>8.1f} {lin:>8.1f} {lin_h:>8.1f} {aq:>8.1f} {aq_xla:>8.1f} {tr:>8.1f} {gemm:>8.1f}",
            flush=True,
        )
    tag = os.environ.get("BENCH_TAG", "")  # e.g. "jax_triton" when the gpu extra is installed
    timing.write_rows("linear_path" + (f"-{tag}" if tag else ""), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
