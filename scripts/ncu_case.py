#!/usr/bin/env python3
"""Runs one GPU kernel once, for Nsight Compute to profile: where a kernel's time goes (stall
reasons, issue rate, memory throughput), which CUPTI timings alone cannot say.

Cases: a ``pallas_kernels.testing.CASES`` name on a ``K -> N`` GEMM at ``--m`` rows (the inputs
are made by the case, the kernel is run twice so the second launch is a warm one), or
``gemv:FMT:ROWS:WARPS:SPLIT:DEPTH`` for :func:`pallas_kernels.kquant_gemv.kquant_gemv` at M = 1,
or ``attn:VARIANT:HEADSxTOKENS`` for a ``scripts/bench_attention.py`` variant (``cudnn``,
``cudnn-fp8``, ``kernel-int8-fp8-bk256``, ...) at batch 1, head_dim 128. The output is checked
against the case's reference before the script exits 0.

    ncu --clock-control none --section WarpStateStats ... python3 scripts/ncu_case.py w8a8_int8 --k 1536 --n 1536
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels import testing  # noqa: E402


def run_gemv(spec: str, k: int, n: int) -> dict:
    """kquant_gemv at M = 1 on random ggml blocks, checked against the decoded fp32 product."""
    from pallas_kernels import kquant_gemv as kg  # pylint: disable=import-outside-toplevel
    from pallas_kernels import kquant_triton as kq  # pylint: disable=import-outside-toplevel

    _, fmt, rows, warps, split, depth = spec.split(":")
    blocks = jnp.asarray(kq.random_blocks(fmt, n, k, 0, absmax=4e-3 * kq._CODE_RANGE[fmt]))  # pylint: disable=protected-access
    x = jax.random.normal(jax.random.key(1), (1, k), jnp.bfloat16)
    fn = jax.jit(
        lambda x, b: kg.kquant_gemv(
            x, b, fmt, mma=False, rows=int(rows), warps=int(warps), split=int(split), depth=int(depth)
        )
    )
    out = jax.block_until_ready(fn(x, blocks))
    out = jax.block_until_ready(fn(x, blocks))
    w = kq.decode_reference(blocks, fmt, jnp.float32)
    x32 = x.astype(jnp.float32)
    ref = x32 @ w.T
    return testing.check_dot(out, ref, jnp.abs(x32) @ jnp.abs(w).T, 1e-2)


def run_attention(spec: str, check_rows: int = 64) -> dict:
    """One ``bench_attention.py`` variant on its prepared operands, checked as that script checks it."""
    import importlib.util  # pylint: disable=import-outside-toplevel

    from pallas_kernels import attention_ref as ar  # pylint: disable=import-outside-toplevel

    _, variant, shape = spec.split(":")
    heads, tokens = (int(v) for v in shape.split("x"))
    path = Path(__file__).resolve().parent / "bench_attention.py"
    loader = importlib.util.spec_from_file_location("_bench_attention", path)
    bench = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(bench)
    fn, prepare, finish, reference, pv = bench.variant_fn(variant, 128)
    q, k, v = ar.sample_inputs(jax.random.key(0), 1, tokens, tokens, heads, bench.HEAD_DIM)
    args, extra = prepare(q, k, v)
    out = jax.block_until_ready(fn(*args))
    out = jax.block_until_ready(fn(*args))
    return bench.check_fn((q, k, v), extra, finish, reference, pv, check_rows)(out)


def run_case(name: str, m: int, k: int, n: int) -> dict:
    case = testing.CASES[name]
    inputs = case.make_inputs(jax.random.key(0), m, k, n)
    fn = jax.jit(case.kernel)
    out = jax.block_until_ready(fn(*inputs))
    out = jax.block_until_ready(fn(*inputs))
    ref = jax.block_until_ready(jax.jit(case.reference)(*inputs))
    return testing.compare(case, out, ref, inputs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("case")
    p.add_argument("--m", type=int, default=32760)
    p.add_argument("--k", type=int, default=1536)
    p.add_argument("--n", type=int, default=1536)
    args = p.parse_args(argv)
    if not args.case.startswith(("gemv:", "attn:")) and args.case not in testing.CASES:
        raise SystemExit(
            f"ncu_case: unknown kernel case {args.case!r}; one of {sorted(testing.CASES)} or gemv:FMT:ROWS:WARPS:SPLIT:DEPTH or attn:VARIANT:HEADSxTOKENS"
        )
    if args.case.startswith("gemv:"):
        verdict = run_gemv(args.case, args.k, args.n)
    elif args.case.startswith("attn:"):
        verdict = run_attention(args.case)
    else:
        verdict = run_case(args.case, args.m, args.k, args.n)
    print(f"{args.case}: check {'PASS' if verdict.get('ok') else 'FAIL'} {verdict}", flush=True)
    return 0 if verdict.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
