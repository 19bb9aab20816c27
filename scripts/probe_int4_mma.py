#!/usr/bin/env python3
"""Is int4 matrix math usable on this GPU? Two cheap measurements.

1. Legacy warp-level ``mma.sync`` throughput for s4 (m16n8k64), s8 (m16n8k32) and
   bf16 (m16n8k16), register operands only (no memory traffic), via CuPy/NVRTC.
   Hopper's wgmma has no 4-bit type; this shows what the old path gives.
2. What XLA does with an int4 x int4 ``dot_general`` (time, and which kind of
   kernel its compiled HLO uses), against int8 and bf16 at the same size.

Prints a table; writes ``int4_probe.json`` to ``$OUT`` (or benchmarks/).

Run from the repository root: ``python scripts/probe_int4_mma.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/probe_int4_mma.py`` where jquant is not installed (e.g. the GPU machine).
"""

from __future__ import annotations

import json
import os
import re
import sys

_SRC = r"""
#define MMA_LOOP(NAME, ASM, CT)                                                 \
extern "C" __global__ void NAME(int iters, int* out) {                          \
  unsigned a0 = threadIdx.x * 2654435761u, a1 = a0 ^ 0x9e3779b9u,               \
           a2 = a1 * 3u, a3 = a2 + 7u, b0 = a3 ^ 0x85ebca6bu, b1 = b0 * 5u;     \
  CT c[4][4];                                                                   \
  for (int j = 0; j < 4; ++j) for (int r = 0; r < 4; ++r) c[j][r] = 0;          \
  for (int i = 0; i < iters; ++i) {                                             \
    _Pragma("unroll") for (int j = 0; j < 4; ++j) {                             \
      asm volatile(ASM : "+r"(c[j][0]), "+r"(c[j][1]), "+r"(c[j][2]),           \
                   "+r"(c[j][3])                                                \
                   : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));     \
    }                                                                           \
  }                                                                             \
  int s = 0;                                                                    \
  for (int j = 0; j < 4; ++j) for (int r = 0; r < 4; ++r) s += (int)c[j][r];    \
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;                               \
}
MMA_LOOP(mma_s4, "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};", int)
MMA_LOOP(mma_s8, "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};", int)
MMA_LOOP(mma_bf16, "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};", unsigned)
"""
# ops per mma instruction: 2*m*n*k
_OPS = {"mma_s4": 2 * 16 * 8 * 64, "mma_s8": 2 * 16 * 8 * 32, "mma_bf16": 2 * 16 * 8 * 16}


def mma_sync_rates() -> dict:
    import cupy as cp  # pylint: disable=g-import-not-at-top

    module = cp.RawModule(code=_SRC, options=("--gpu-architecture=sm_90",))
    sms = cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    blocks, threads, iters = sms * 4, 256, 4096
    out = cp.zeros(blocks * threads, dtype=cp.int32)
    rates = {}
    for name, ops in _OPS.items():
        fn = module.get_function(name)
        fn((blocks,), (threads,), (cp.int32(iters), out))  # warm up
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn((blocks,), (threads,), (cp.int32(iters), out))
        stop.record()
        stop.synchronize()
        ms = cp.cuda.get_elapsed_time(start, stop)
        warps = blocks * threads // 32
        rates[name] = warps * iters * 4 * ops / (ms * 1e-3) / 1e12
    return rates


def xla_int4_dot(size: int = 2048) -> dict:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from jax import lax  # pylint: disable=g-import-not-at-top

    from pallas_kernels import timing  # pylint: disable=g-import-not-at-top

    result = {}
    for name, dt, acc in (
        ("int4", jnp.int4, jnp.int32),
        ("int8", jnp.int8, jnp.int32),
        ("bf16", jnp.bfloat16, jnp.float32),
    ):
        keys = jax.random.split(jax.random.key(0), 4)
        sets = [
            tuple(jax.random.randint(keys[2 * i + j], (size, size), -8, 8, jnp.int32).astype(dt) for j in range(2))
            for i in range(2)
        ]
        fn = lambda a, b, acc=acc: lax.dot_general(  # noqa: E731
            a, b, (((1,), (1,)), ((), ())), preferred_element_type=acc
        )
        hlo = jax.jit(fn).lower(*sets[0]).compile().as_text()
        kinds = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
        t = timing.time_fn(fn, sets, iterations=5)["us"]
        result[name] = {
            "us": round(t, 1),
            "tops": round(2 * size**3 / t / 1e6, 1),
            "custom_calls": kinds,
            "fusion": "fusion" in hlo,
        }
    return result


def main() -> int:
    report = {}
    try:
        report["mma_sync_tops"] = {k: round(v, 1) for k, v in mma_sync_rates().items()}
    except Exception as exc:  # pylint: disable=broad-except
        report["mma_sync_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    try:
        report["xla_dot_2048"] = xla_int4_dot()
    except Exception as exc:  # pylint: disable=broad-except
        report["xla_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    print(json.dumps(report, indent=1))
    folder = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "..", "benchmarks")
    with open(os.path.join(folder, "int4_probe.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
