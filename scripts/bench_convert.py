#!/usr/bin/env python3
"""Throughput of int32 -> float32 conversion on the GPU: the conversion instruction against the
magic-number form, float32 -> bf16 rounding, and ``ex2.approx.ftz.f32`` (the attention softmax's
exponential, alone and followed by the bf16 rounding of P), in Triton kernels that do nothing else.

Why: the block-scaled int8 GEMM converts every int32 partial accumulator once per 128-wide K
block, and the small-M k-quant kernels decode codes to floats; whether the conversion unit
(documented at 16 results per SM per clock on Hopper, an eighth of the fp32 rate) bounds them
decides what to optimise. The attention kernel's softmax runs one ``exp2`` and half a packed bf16
rounding per score; whether the two share the quarter-rate pipe, and at what rate, bounds it.
Each kernel runs ``ITERS`` dependent rounds over a register-resident
vector per thread; every variant's output is checked against the exact integer arithmetic
(numpy) before it is timed. Prints conversions per SM per clock at the measured clock.

    PYTHONPATH=. python3 scripts/bench_convert.py   (needs jax-triton: the ``gpu`` extra)
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import timing

try:
    import jax_triton as jt
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - needs the gpu extra
    jt = triton = tl = None

ITERS = 2048
VEC = 8  # values per thread
THREADS = 256
X_MAX = 256  # inputs < 2^8, so x + i < 2^12 and fp32 sums of ITERS of them stay exact (< 2^24)

if triton is not None:  # pragma: no cover - needs Triton

    @triton.jit
    def _kernel(x_ptr, out_ptr, MODE: tl.constexpr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        acc = tl.zeros((BLOCK,), tl.float32)
        for i in range(ITERS):
            v = x + i  # the integer each round converts (its range unknown to the compiler)
            if MODE == 0:  # conversion instruction (cvt.rn.f32.s32: I2FP on sm_90)
                f = v.to(tl.float32)
            elif MODE == 4:  # conversion of a known-small integer (the compiler picks I2F)
                f = (v & 0xFF).to(tl.float32)
            elif MODE == 1:  # magic number: OR into 2^23's mantissa, subtract 2^23
                f = (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            elif MODE == 2:  # no conversion: the same op count as MODE 1, wrong values (timing floor)
                f = v.to(tl.float32, bitcast=True) - 8388608.0
            elif MODE == 3:  # magic-number conversion, then round to bf16 and back (cvt.rn.bf16x2.f32)
                f = ((v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0).to(tl.bfloat16).to(tl.float32)
            else:  # MODE 5: exp2 of a value in [-2^-4 * 2^12, 0] (MUFU.EX2); MODE 6: and round it to bf16
                g = ((v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) * -0.0625
                f = tl.inline_asm_elementwise(
                    "ex2.approx.ftz.f32 $0, $1;", "=f,f", [g], dtype=tl.float32, is_pure=True, pack=1
                )
                if MODE == 6:
                    f = f.to(tl.bfloat16).to(tl.float32)
            acc += f
        tl.store(out_ptr + offs, acc)


def reference(x: np.ndarray, mode: int) -> np.ndarray:
    """The exact sum each thread computes (sums of ITERS integers < 2^8 stay below 2^24)."""
    i = np.arange(ITERS, dtype=np.int64)
    v = x[:, None].astype(np.int64) + i[None, :]
    if mode == 4:
        v = v & 0xFF
    if mode == 3:
        v = np.asarray(jnp.asarray(v.astype(np.float32), jnp.bfloat16).astype(jnp.float32)).astype(np.float64)
    if mode in (5, 6):
        v = np.exp2(v.astype(np.float64) * -0.0625)
        if mode == 6:
            v = np.asarray(jnp.asarray(v.astype(np.float32), jnp.bfloat16).astype(jnp.float32)).astype(np.float64)
    return v.sum(axis=1)


def main() -> int:
    if jt is None:
        print("jax-triton is not installed: nothing to measure", file=sys.stderr)
        return 2
    sms = jax.devices()[0].core_count if hasattr(jax.devices()[0], "core_count") else 132
    n = sms * 8 * THREADS * VEC  # 8 CTAs of 256 threads per SM
    x = jax.random.randint(jax.random.key(0), (n,), 0, X_MAX, jnp.int32)
    xs = np.asarray(x)
    rows, bad = [], 0
    names = {
        0: "cvt.rn.f32.s32",
        1: "magic number",
        2: "floor (no conversion)",
        3: "magic + round to bf16",
        4: "cvt of a byte (I2F)",
        5: "ex2.approx.ftz",
        6: "ex2 + round to bf16",
    }
    for mode, name in names.items():

        def fn(v, mode=mode):
            return jt.triton_call(
                v,
                kernel=_kernel,
                out_shape=jax.ShapeDtypeStruct(v.shape, jnp.float32),
                grid=(v.shape[0] // (THREADS * VEC),),
                num_warps=THREADS // 32,
                MODE=mode,
                ITERS=ITERS,
                BLOCK=THREADS * VEC,
            )

        def check(out, mode=mode):
            if mode == 2:
                return {"ok": True, "note": "timing floor: values not meaningful"}
            ref = reference(xs[:4096], mode)
            err = float(np.max(np.abs(np.asarray(out[:4096], np.float64) - ref) / np.maximum(np.abs(ref), 1)))
            # ex2.approx is within 2 ulp, so a value near a bf16 tie may round the other way
            tol = {5: 1e-4, 6: 1e-3}.get(mode, 1e-6)
            return {"ok": err < tol, "max_rel_err": err}

        r = timing.check_then_time(fn, [(x,)], check)
        conversions = n * ITERS
        if r["status"] == "PASS":
            clock_hz = 1.98e9  # H200 boost clock; the rate below is per clock at that clock
            r["per_sm_per_clock"] = conversions / (r["us"] * 1e-6) / sms / clock_hz
            print(f"{name:24} {r['us']:9.1f} us  {r['per_sm_per_clock']:6.1f} per SM per clock", flush=True)
        else:
            bad += 1
            print(f"{name}: {r['status']} {r.get('check', r.get('error'))}", flush=True)
        rows.append({"variant": name, "mode": mode, "values": conversions, **r})
    path = timing.write_rows("convert", rows)
    print(f"wrote {path}; {bad} bad rows")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
