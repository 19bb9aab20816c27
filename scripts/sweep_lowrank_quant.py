#!/usr/bin/env python3
"""SVDQuant's down-projection fused into the activation quantizer, on the GPU.

Part 1, the quantizer alone: for each shape, every :class:`LowrankQuantConfig` variant is checked
against :func:`lowrank_quant.reference` (codes and scales bit for bit, ``h`` to 1e-2) and timed
beside the plain quantizer (``act_quant.quantize_int8``, what the dispatch runs without a branch)
and the quantizer + XLA's ``x @ L1``; fraction of the copy bandwidth for the bytes the fused
kernel must move.

Part 2, one whole SVDQuant linear (rank 32) against the same linear without the branch, both
from bf16 activations: ``quantize -> W4A8 GEMM`` (base), ``quantize + XLA down-projection ->
W4A8 GEMM with the up-projection in its epilogue`` (before), ``fused quantizer -> the same GEMM``
(after). The issue's target: the branch costs at most 15% over the base.

Prints tables and writes ``benchmarks/lowrank_quant-<device>.json``.

    JQUANT_BACKEND=pallas python scripts/sweep_lowrank_quant.py   # GPU (Hopper)

Run from the repository root: ``python scripts/sweep_lowrank_quant.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/sweep_lowrank_quant.py`` where jquant is not installed (e.g. the GPU machine).
"""

import os
import traceback

import jax
import numpy as np

from pallas_kernels import act_quant, lowrank_quant, testing, timing, w4a8

RANK = 32
QUANT_SHAPES = [(4096, 1536), (4096, 3072), (4096, 5120), (4096, 12288), (32760, 1536), (32760, 3072)]
LINEAR_SHAPES = [
    (4096, 3072, 3072),
    (4096, 1536, 1536),
    (4096, 3072, 12288),
    (4096, 12288, 3072),
    (4096, 5120, 5120),
    (32760, 1536, 1536),
    (32760, 1536, 8960),
]
C = lowrank_quant.LowrankQuantConfig


def configs(k: int) -> dict:
    out = {}
    for rows, warps, chunk, single in [
        (16, 8, 512, True),
        (16, 4, 512, True),
        (16, 8, 256, True),
        (16, 16, 512, True),
        (16, 8, 512, False),
        (16, 4, 512, False),
        (16, 8, 1024, False),
        (32, 8, 256, False),
        (16, 4, 256, False),
    ]:
        cfg = C(rows, warps, chunk, single)
        try:
            cfg.check(k)
        except ValueError:
            continue
        out[f"r{rows}_w{warps}_c{chunk}_{'one' if single else 'two'}"] = cfg
    return out


def part1(copy: float) -> list[dict]:
    rows = []
    print(f"{'M':>6} {'K':>6} {'variant':22s} {'us':>8} {'%copy':>6}")
    for m, k in QUANT_SHAPES:
        n_bytes = 3 * m * k + 4 * m + 2 * m * RANK + 2 * k * RANK
        sets = [
            testing.act_quant_lowrank_inputs(jax.random.key(i), m, k, 0, RANK)
            for i in range(timing.copies_for(n_bytes))
        ]
        want = jax.jit(lowrank_quant.reference)(*sets[0])
        variants = {
            f"fused_{n}": (lambda x, l1, c=c: lowrank_quant.quantize_lowrank_pallas(x, l1, config=c))
            for n, c in configs(k).items()
        }
        variants["default"] = lambda x, l1: lowrank_quant.quantize_lowrank_pallas(x, l1)
        variants["quant_only"] = lambda x, l1: act_quant.quantize_int8(x)
        variants["quant+xla_down"] = lambda x, l1: (*act_quant.quantize_int8(x), w4a8.down_projection(x, l1))
        variants["xla_down_only"] = lambda x, l1: w4a8.down_projection(x, l1)
        for name, fn in variants.items():
            error = None
            try:
                got = jax.jit(fn)(*sets[0])
                ok = True
                if name.startswith(("fused", "default")):
                    ok = all(
                        np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
                        for a, b in zip(got[:2], want[:2])
                    )
                    h, hr = np.asarray(got[2], np.float32), np.asarray(want[2], np.float32)
                    ok = ok and float(np.linalg.norm(h - hr) / np.linalg.norm(hr)) < 1e-2
                us = timing.time_fn(fn, sets, iterations=10)["us"] if ok else float("nan")
            except Exception as exc:  # pylint: disable=broad-except
                traceback.print_exc()
                ok, us, error = False, float("nan"), f"{type(exc).__name__}: {str(exc)[:300]}"
            frac = n_bytes / us / 1e3 / copy
            rows.append(
                dict(
                    part="quantizer",
                    m=m,
                    k=k,
                    rank=RANK,
                    variant=name,
                    ok=ok,
                    us=round(us, 2),
                    fraction_of_copy_bw=round(frac, 3),
                    error=error,
                )
            )
            print(
                f"{m:>6} {k:>6} {name:22s} {us:>8.1f} {100 * frac:>5.1f}%"
                + ("" if ok else "  FAIL")
                + (f" {error}" if error else ""),
                flush=True,
            )
    return rows


def part2() -> list[dict]:
    rows = []
    print(f"{'M':>6} {'K':>6} {'N':>6} {'base':>8} {'before':>8} {'after':>8} {'before/base':>11} {'after/base':>10}")
    for m, k, n in LINEAR_SHAPES:
        sets = []
        for i in range(3):
            x, _, _, packed, ws, l1, l2, _ = testing.svdquant_r32_inputs(jax.random.key(i), m, k, n)
            sets.append((x, packed, ws, l1, l2))

        def base(x, packed, ws, l1, l2):
            xq, xs = act_quant.quantize_int8(x)
            return w4a8.w4a8_matmul(xq, xs, packed, ws)

        def before(x, packed, ws, l1, l2):
            xq, xs = act_quant.quantize_int8(x)
            return w4a8.w4a8_matmul(xq, xs, packed, ws, lowrank=w4a8.lowrank_operands(x, l1, l2))

        def after(x, packed, ws, l1, l2):
            xq, xs, h = lowrank_quant.quantize_lowrank(x, l1)
            return w4a8.w4a8_matmul(xq, xs, packed, ws, lowrank=(h, l2.T))

        try:
            a = np.asarray(jax.jit(after)(*sets[0]), np.float32)
            b = np.asarray(jax.jit(before)(*sets[0]), np.float32)
            rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
            t = {
                name: timing.time_fn(fn, sets, iterations=10)["us"]
                for name, fn in (("base", base), ("before", before), ("after", after))
            }
            error = None
        except Exception as exc:  # pylint: disable=broad-except
            traceback.print_exc()
            rel, t, error = (
                float("nan"),
                dict(base=float("nan"), before=float("nan"), after=float("nan")),
                str(exc)[:300],
            )
        rows.append(
            dict(
                part="linear",
                m=m,
                k=k,
                n=n,
                rank=RANK,
                base_us=t["base"],
                before_us=t["before"],
                after_us=t["after"],
                before_over_base=t["before"] / t["base"],
                after_over_base=t["after"] / t["base"],
                rel_after_vs_before=rel,
                error=error,
            )
        )
        print(
            f"{m:>6} {k:>6} {n:>6} {t['base']:>8.1f} {t['before']:>8.1f} {t['after']:>8.1f}"
            f" {t['before'] / t['base']:>11.3f} {t['after'] / t['base']:>10.3f}  rel={rel:.1e}",
            flush=True,
        )
    return rows


def main() -> None:
    os.environ.setdefault("JQUANT_BACKEND", "pallas")  # every kernel, verified or not (set here: importing must not)
    copy = timing.copy_bandwidth()
    print(f"{jax.devices()[0].device_kind} jax {jax.__version__} copy bandwidth {copy:.0f} GB/s")
    rows = part1(copy)
    timing.write_rows("lowrank_quant", rows)
    rows += part2()
    timing.write_rows("lowrank_quant", rows)


if __name__ == "__main__":
    main()
