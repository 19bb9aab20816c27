#!/usr/bin/env python3
"""A Wan FFN (up, gelu_tanh, down) at 32,760 tokens: XLA bf16 against the block-scaled 8-bit path
with and without the FFN-up producer (issue 19).

Rows per (format, width): the FFN's input arrives as codes (a fused norm producer made them), so
every variant starts from ``x`` int8 / e4m3 codes with one scale per token per 128 channels:

* ``bf16``: ``gelu_tanh(x @ w_up + b) @ w_down`` in XLA on bf16 values (the baseline);
* ``unfused``: the block-scaled GEMM writes the hidden activation in bf16, XLA applies gelu and
  quantizes it per (token, 128) (one more read and write of the widest activation), the
  block-scaled GEMM consumes it;
* ``fused``: ``gemm_act_quant`` writes the codes and scales straight from the FFN-up GEMM's
  registers, the block-scaled GEMM consumes them; ``fused_rot`` the same with QuaRot's order-128
  block rotation in the epilogue (issue 26: FFN-down's online rotation; timed with the same
  FFN-down weights, which a QuaRot model would carry rotated, and checked against the rotated
  reference codes times those weights);
* ``down``: FFN-down's GEMM alone on those codes, the whole FFN-down linear once its activation is
  quantized by its producer (issue 19's per-linear target), and ``down_bf16`` its XLA bf16 GEMM.

Every output is checked against the float32 reference of the same arithmetic before it is timed
(dequantized codes, float32 dots; the 8-bit rows with the hidden activation quantized by
``gemm_act_quant_reference``, since fp8's own rounding of it is ~2.5%): relative L2 <= 2e-2.
A wrong row is printed and the script exits 1. CUPTI kernel time, median and minimum of >= 10
runs, inputs rotated past L2 (``pallas_kernels.timing``). Writes
``benchmarks/ffn_producer-<device>.json``.

    JQUANT_BACKEND=pallas PYTHONPATH=. python3 scripts/bench_ffn_producer.py   # until gemm_act_quant is GPU-checked
    BENCH_SHAPES=all ...   # Wan2.1-14B's FFN too; BENCH_FORMATS=int8 for one format
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels import fused_producers, gemm_act_quant, timing, w8a8  # noqa: E402

M = int(os.environ.get("BENCH_M", 32760))
SHAPES = [(1536, 8960)]  # Wan2.1-1.3B: dim, ffn_dim
SHAPES_14B = [(5120, 13824)]
FORMATS = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
TOL = 2e-2


def _operands(fmt: str, key, m: int, d: int, f: int):
    """FFN-up input codes + scales, both block-scaled weights ([N, K] codes), biases, chosen so the
    pre-activation has a standard deviation near 1 (gelu's curved part matters)."""
    kx, ku, kd, kb, kc = jax.random.split(key, 5)
    x = jax.random.normal(kx, (m, d), jnp.float32)
    xq, xs = fused_producers.quantize_blocks(x, fmt)
    w_up = jax.random.normal(ku, (f, d), jnp.float32) / jnp.sqrt(d)
    w_dn = jax.random.normal(kd, (d, f), jnp.float32) / jnp.sqrt(f)
    wu_q, wu_s = _block_weight(w_up, fmt)
    wd_q, wd_s = _block_weight(w_dn, fmt)
    b_up = 0.1 * jax.random.normal(kb, (f,), jnp.float32)
    b_dn = 0.1 * jax.random.normal(kc, (d,), jnp.float32)
    return xq, xs, wu_q, wu_s, b_up, wd_q, wd_s, b_dn


def _block_weight(w: jax.Array, fmt: str):
    """``w [N, K]`` as 128 x 128-block codes and ``[N/128, K/128]`` scales (jquant's rule)."""
    n, k = w.shape
    blocks = w.reshape(n // 128, 128, k // 128, 128)
    amax = jnp.max(jnp.abs(blocks), axis=(1, 3))
    scale = jnp.maximum(amax / (127.0 if fmt == "int8" else 448.0), 1e-12)
    q = blocks / scale[:, None, :, None]
    q = jnp.round(q) if fmt == "int8" else q
    return q.reshape(n, k).astype(FORMATS[fmt]), scale


def _dequant(q, s):
    """Block codes ``[R, C]`` with ``[R/128 or R, C/128]`` scales back to float32."""
    r, c = q.shape
    rows = 128 if s.shape[0] != r else 1
    return (q.astype(jnp.float32).reshape(r // rows, rows, c // 128, 128) * s[:, None, :, None]).reshape(r, c)


def _gelu(v):
    return jax.nn.gelu(v, approximate=True)


def unfused(xq, xs, wu_q, wu_s, b_up, wd_q, wd_s, b_dn, fmt):
    run = w8a8.int8_block_matmul if fmt == "int8" else w8a8.fp8_block_matmul
    h = run(xq, xs, wu_q, wu_s, b_up, jnp.bfloat16)
    hq, hs = fused_producers.quantize_blocks(_gelu(h.astype(jnp.float32)).astype(jnp.bfloat16), fmt)
    return run(hq, hs, wd_q, wd_s, b_dn, jnp.bfloat16)


def fused(xq, xs, wu_q, wu_s, b_up, wd_q, wd_s, b_dn, fmt, hadamard=0):
    run = w8a8.int8_block_matmul if fmt == "int8" else w8a8.fp8_block_matmul
    hq, hs = gemm_act_quant.gemm_act_quant(xq, xs, wu_q, wu_s, b_up, act="gelu_tanh", fmt=fmt, hadamard=hadamard)
    return run(hq, hs, wd_q, wd_s, b_dn, jnp.bfloat16)


def _check(ref):
    def check(out) -> dict:
        err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
        return {"ok": bool(err <= TOL) and bool(jnp.all(jnp.isfinite(out))), "rel_l2": err}

    return check


def main() -> int:
    rows, wrong = [], 0
    shapes = SHAPES + (SHAPES_14B if os.environ.get("BENCH_SHAPES") == "all" else [])
    print(
        f"{'fmt':>5} {'d':>5} {'f':>6} {'bf16':>9} {'unfused':>9} {'fused':>9} {'f+rot':>9} {'down':>8} {'down16':>8}"
        "  (us, median)"
    )
    for d, f in shapes:
        for fmt in os.environ.get("BENCH_FORMATS", ",".join(FORMATS)).split(","):
            sets = [_operands(fmt, jax.random.key(i), M, d, f) for i in range(2)]
            xq, xs, wu_q, wu_s, b_up, wd_q, wd_s, b_dn = sets[0]
            x32, wu32, wd32 = _dequant(xq, xs), _dequant(wu_q, wu_s), _dequant(wd_q, wd_s)
            h32 = _gelu(x32 @ wu32.T + b_up)
            ref = h32 @ wd32.T + b_dn
            floats = [
                (
                    _dequant(a[0], a[1]).astype(jnp.bfloat16),
                    _dequant(a[2], a[3]).T.astype(jnp.bfloat16),
                    a[4],
                    _dequant(a[5], a[6]).T.astype(jnp.bfloat16),
                    a[7],
                )
                for a in sets
            ]
            hq_sets = [gemm_act_quant.gemm_act_quant_reference(*a[:5], act="gelu_tanh", fmt=fmt) for a in sets]
            h_ref = _dequant(*hq_sets[0]) @ wd32.T + b_dn
            rot_codes = gemm_act_quant.gemm_act_quant_reference(*sets[0][:5], act="gelu_tanh", fmt=fmt, hadamard=128)
            rot_ref = _dequant(*rot_codes) @ wd32.T + b_dn
            run_dn = w8a8.int8_block_matmul if fmt == "int8" else w8a8.fp8_block_matmul
            row = {"fmt": fmt, "d": d, "f": f, "m": M}
            timed = {
                "bf16": (
                    lambda x, wu, bu, wd, bd: (
                        ((_gelu((x @ wu).astype(jnp.float32) + bu)).astype(jnp.bfloat16) @ wd) + bd
                    ),
                    floats,
                    ref,
                ),
                "unfused": (lambda *a: unfused(*a, fmt), sets, h_ref),
                "fused": (lambda *a: fused(*a, fmt), sets, h_ref),
                "fused_rot": (lambda *a: fused(*a, fmt, hadamard=128), sets, rot_ref),
                "down": (
                    lambda hq, hs, a: run_dn(hq, hs, a[5], a[6], a[7], jnp.bfloat16),
                    [(h[0], h[1], a) for h, a in zip(hq_sets, sets)],
                    h_ref,
                ),
                "down_bf16": (
                    lambda h, wd, bd: h @ wd + bd,
                    [(_dequant(*h).astype(jnp.bfloat16), fl[3], fl[4]) for h, fl in zip(hq_sets, floats)],
                    h_ref,
                ),
            }
            for name, (fn, inputs, want) in timed.items():
                try:
                    t = timing.time_fn(fn, inputs, check=_check(want))
                except Exception as exc:  # noqa: BLE001 - a row that raises is an ERROR row
                    row[name] = timing.error_row(exc)
                    wrong += 1
                    continue
                if "us" not in t:
                    wrong += 1
                row[name] = t
            us = {k: row[k].get("us", float("nan")) for k in timed}
            row["fused_vs_bf16"] = us["bf16"] / us["fused"]
            row["fused_vs_unfused"] = us["unfused"] / us["fused"]
            row["fused_rot_vs_bf16"] = us["bf16"] / us["fused_rot"]
            row["down_vs_bf16"] = us["down_bf16"] / us["down"]
            rows.append(row)
            print(
                f"{fmt:>5} {d:>5} {f:>6} {us['bf16']:9.1f} {us['unfused']:9.1f} {us['fused']:9.1f} {us['fused_rot']:9.1f} "
                f"{us['down']:8.1f} {us['down_bf16']:8.1f}"
            )
    record = {
        **timing.run_metadata(__file__),
        "backend": os.environ.get("JQUANT_BACKEND", "auto"),
        "kernel_verified": gemm_act_quant.GPU_VERIFIED,
        "rows": rows,
    }
    path = timing.write_json(f"ffn_producer-{timing.device_slug()}.json", record)
    print(f"wrote {path}; {wrong} wrong row(s)")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
