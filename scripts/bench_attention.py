#!/usr/bin/env python3
"""Time quantized attention against cuDNN's and XLA's bf16 attention on video-DiT shapes.

Shapes (batch 1, non-causal self-attention, head_dim 128): 12 heads at 8,190 and 32,760
tokens (Wan2.1-1.3B at 480x832, 21 and 81 frames... 8,190 is the 5-second 240p-class
size), 24 heads at 32,760 and 75,000 tokens (HunyuanVideo-class). Variants:

* ``cudnn``: ``jax.nn.dot_product_attention(..., implementation="cudnn")`` in bf16;
* ``xla``: the same with ``implementation="xla"`` (only where the scores fit in memory);
* ``kernel <qk>/<pv>``: the Mosaic GPU kernel alone on operands quantized beforehand;
* ``total <qk>/<pv>``: :func:`pallas_kernels.attention.quant_attention` from bf16 inputs,
  quantization included, with its default loop (overlapped for bf16 P V; what a model pays);
* ``cudnn-fp8``: cuDNN's FP8 flash attention on per-tensor e4m3 codes (``pallas_kernels.cudnn_fp8``).

Off Hopper the kernel rows time the plain-JAX reference instead (marked ``reference``).
Every timed output is checked before it is timed (``pallas_kernels.timing.check_then_time``) on
``--check-rows`` query rows: cuDNN / XLA against exact fp32 attention, the kernel and ``total``
rows against ``attention_ref.quant_attention_reference`` with the same options. Attention
outputs are sums of ``p_j v_j``, so the error is bounded elementwise by ``tol * (P @ |V|)``
(``tol``: P rounded to bf16, 2^-8, or to e4m3, 2^-4; ``P @ |V|`` from exact attention on
``|V|``) plus one bf16 unit of the output, and the relative L2 error must stay under twice
``scripts/check_attention_gpu.py``'s tolerance. A row that fails is FAIL, one that raises
ERROR (the message in the row); the script then exits 1. Times are the median and the minimum
of >= 10 CUPTI kernel-time runs (``pallas_kernels.timing.time_fn``) over input sets rotated
past L2. Writes ``benchmarks/attention-<device>.json`` (device, date, commit, JAX version,
command) after every row, and a copy under ``$OUT`` when set, so a run cut short keeps what
it measured.

    PYTHONPATH=. python3 scripts/bench_attention.py            # all shapes
    PYTHONPATH=. python3 scripts/bench_attention.py --shapes 12x8190 --variants cudnn,kernel-int8-fp8
    PYTHONPATH=. python3 scripts/bench_attention.py --tiny     # CPU dry run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels import (  # noqa: E402
    _common,  # noqa: E402
    cudnn_fp8,  # noqa: E402
    testing,
    timing,
)
from pallas_kernels import attention as pa  # noqa: E402
from pallas_kernels import attention_ref as ar  # noqa: E402

SHAPES = {
    "12x8190": (12, 8190),
    "12x32760": (12, 32760),
    "24x32760": (24, 32760),
    "24x75000": (24, 75000),
    "40x75600": (40, 75600),  # Wan2.1-14B at 720p: 1280x720, 81 frames
}
VARIANT_HELP = (
    "cudnn | cudnn-fp8 | xla | {kernel,total}-{int8,fp8}-{bf16,fp8}[-cvt][-kblock][-had][-bk64|-bk256][-s3][-ovl][-free][-smax][-hexp|-hmax][-noinit][-fresh][-psmem][-round][-wg3][-pint][-polyN][-msN][-unp|-pad]"
    " (cvt: int8 scores to float by the conversion instruction instead of the magic-number"
    " add; kblock: one K scale per key tile instead of per key; had: Hadamard rotation of Q and K (total only); bkN: key tile; sN: pipeline stages; ovl: FA3's intra-warpgroup overlap; free: no schedule barrier between the compute warpgroups; smax: with kblock, the row max on the scaled scores instead of the raw ones; hexp / hmax: hand the softmax turn over once the exponentials / row maxima are done; noinit: the int32 Q K^T accumulator starts at 0, not at the magic bias; fresh: each tile's P V in a fresh accumulator, added with one FMA; psmem: bf16 P through shared memory; round: the round-robin loop (each warpgroup issues P V and the next Q K^T in its turn); wg3: three compute warpgroups, with round; pint: bf16 P rounded with integer arithmetic instead of the conversion instruction; polyN: the last N keys of each tile take exp2 from the polynomial on the FMA pipe; msN: the row max over N column slices, combined as a tree; unp / pad (total only): V and the output at the true token count, or padded to the query tile; without either, pa.UNPADDED_DEFAULT)"
)
DEFAULT_VARIANTS = (
    "cudnn",
    "cudnn-fp8",
    "xla",
    "kernel-int8-bf16",
    "kernel-int8-bf16-kblock",
    "kernel-int8-fp8",
    "kernel-int8-fp8-bk256",
    "total-int8-bf16",
    "total-int8-fp8",
)
XLA_MAX_SCORE_BYTES = 8 << 30  # bf16 scores of one call; larger shapes skip the XLA row
HEAD_DIM = 128
ASSUMED_TFLOPS = 500.0  # only to pick iteration counts
# Elementwise bound factor on P @ |V| by how P is rounded for the P V product (bf16: 2^-8 per
# probability, with room for the scores' own rounding; e4m3: 2^-4), and the relative L2 error
# allowed: twice scripts/check_attention_gpu.py's kernel-vs-reference tolerance.
BOUND_TOL = {"bf16": 1e-2, "fp8_e4m3": 2.0**-4, "fp8_out": 2.0**-3}
REL_TOL = {"bf16": 2e-2, "fp8_e4m3": 8e-2, "fp8_out": 8e-2}
BASELINES = ("cudnn", "cudnn-fp8", "xla")
_WRAPPER_ARGS = frozenset(inspect.signature(pa.quant_attention).parameters)


def device_slug(device: jax.Device) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-") or device.platform


def parse_variant(variant: str, block_k: int) -> tuple[str, str, str, pa.AttentionConfig, bool]:
    """``kernel-int8-fp8-magic-bk256`` -> ("kernel", "int8", "fp8_e4m3", config, hadamard); raises ValueError."""
    parts = variant.split("-")
    if (
        len(parts) < 3
        or parts[0] not in ("kernel", "total")
        or parts[1] not in ("int8", "fp8")
        or parts[2] not in ("bf16", "fp8")
    ):
        raise ValueError(f"unknown variant {variant!r}: {VARIANT_HELP}")
    options = {"block_k": block_k}
    hadamard = False
    for extra in parts[3:]:
        if extra in ("magic", "cvt"):
            options["int_to_float"] = extra
        elif re.fullmatch(r"bk(64|128|256)", extra):
            options["block_k"] = int(extra[2:])
        elif extra == "kblock":
            options["k_scales"] = "block"
        elif extra == "had" and parts[0] == "total":
            hadamard = True
        elif re.fullmatch(r"s[2-6]", extra):
            options["stages"] = int(extra[1:])
        elif extra == "ovl":
            options["overlap"] = True
        elif extra == "free":
            options["schedule"] = "none"
        elif extra == "smax":
            options["raw_max"] = False
        elif extra in ("hexp", "hmax"):
            options["handoff"] = extra[1:]
        elif extra == "noinit":
            options["magic_init"] = False
        elif extra == "fresh":
            options["fresh_pv"] = True
        elif extra == "psmem":
            options["p_smem"] = True
        elif extra == "round":
            options["schedule"] = "round"
        elif extra == "wg3":
            options["warpgroups"] = 3
        elif extra == "pint":
            options["p_round"] = "int"
        elif re.fullmatch(r"poly(64|128|192)", extra):
            options["exp_poly"] = int(extra[4:])
        elif re.fullmatch(r"ms(2|4|8)", extra):
            options["max_split"] = int(extra[2:])
        elif extra in ("unp", "pad") and parts[0] == "total":
            options["unpadded"] = extra == "unp"
        else:
            raise ValueError(f"unknown variant option {extra!r} in {variant!r}: {VARIANT_HELP}")
    qk = "int8" if parts[1] == "int8" else "fp8_e4m3"
    pv = "bf16" if parts[2] == "bf16" else "fp8_e4m3"
    return parts[0], qk, pv, pa.AttentionConfig(**options), hadamard


def prepare_fn(qk: str, pv: str, config: pa.AttentionConfig):
    """``fn(q, k, v) -> (operands, v_mean)``: the kernel's operand pass (quantization, smoothing,
    padding, V layout) as ``quant_attention`` runs it before the kernel."""
    return functools.partial(
        pa.prepare_kernel_operands,
        causal=False,
        kv_lengths=None,
        qk_format=qk,
        pv_format=pv,
        config=config,
        smooth_k=True,
        hadamard=False,
        sm_scale=1.0 / HEAD_DIM**0.5,
    )


def prep_breakdown(variant: str, heads: int, tokens: int, block_k: int) -> dict:
    """Where a kernel variant's operand pass spends its time: each XLA kernel's CUPTI time (median
    and minimum of >= 10 runs), and the bytes a single pass would move (Q, K, V read once, codes
    and scales written once) with the time they take at the device's measured copy bandwidth."""
    kind, qk, pv, config, _ = parse_variant(variant, block_k)
    q, k, v = ar.sample_inputs(jax.random.key(0), 1, tokens, tokens, heads, HEAD_DIM)
    kernels = timing.kernel_breakdown(prepare_fn(qk, pv, config), (q, k, v))
    elems = tokens * heads * HEAD_DIM
    one_pass = 3 * 2 * elems + 2 * elems + (1 if pv != "bf16" else 2) * elems + 2 * 4 * tokens * heads
    bandwidth = timing.copy_bandwidth()
    return {
        "section": "prep",
        "kernels": kernels,
        "us": sum(r["us"] for r in kernels),
        "one_pass_bytes": one_pass,
        "copy_gbps": bandwidth,
        "one_pass_us": one_pass / bandwidth / 1e3,
    }


def variant_fn(variant: str, block_k: int):
    """``(fn, prepare, finish, reference, pv)`` for a variant: ``prepare(q, k, v)`` -> ``(args, extra)``,
    ``fn(*args)`` is what is timed, ``finish(out, extra)`` -> the attention output ``[B, Tq, H, D]``,
    ``reference(q, k, v)`` what it is checked against (``None``: exact attention), ``pv`` the P V
    format (the check's tolerance)."""
    if variant in ("cudnn", "xla"):

        def fn(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, implementation=variant)

        return fn, lambda q, k, v: ((q, k, v), None), lambda out, extra: out, None, "bf16"
    if variant == "cudnn-fp8":
        return _cudnn_fp8_variant()
    kind, qk, pv, config, hadamard = parse_variant(variant, block_k)

    def reference(q, k, v):
        return ar.quant_attention_reference(
            q, k, v, qk_format=qk, pv_format=pv, block_k=config.block_k, k_scales=config.k_scales, hadamard=hadamard
        )

    if kind == "total":
        # Every AttentionConfig field quant_attention takes, so a new kernel option reaches it too.
        tuning = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in _WRAPPER_ARGS}
        tuning["overlap"] = config.overlap or None  # without -ovl: quant_attention's own choice

        def total(q, k, v):
            return pa.quant_attention(q, k, v, qk_format=qk, pv_format=pv, hadamard=hadamard, **tuning)

        return total, lambda q, k, v: ((q, k, v), None), lambda out, extra: out, reference, pv
    on_kernel = pa.supports(
        jnp.zeros((1, 1, 1, HEAD_DIM)),
        jnp.zeros((1, 1, 1, HEAD_DIM)),
        causal=False,
        kv_lengths=None,
        qk_format=qk,
        pv_format=pv,
        smooth_k=True,
        config=config,
    )
    if not on_kernel:
        return reference, lambda q, k, v: ((q, k, v), None), lambda out, extra: out, reference, pv
    operands_fn = prepare_fn(qk, pv, config)

    def prepare(q, k, v):
        operands, v_mean = jax.jit(operands_fn)(q, k, v)
        return tuple(operands), (q.shape[1], v_mean)

    def finish(out, extra):  # quant_attention's epilogue: the padded query rows off, the V mean back
        tokens, v_mean = extra
        out = out[:, :tokens]
        return out if v_mean is None else (out.astype(jnp.float32) + v_mean[:, None]).astype(out.dtype)

    def kernel(*operands):
        return pa.attention_pallas(*operands, causal=False, config=config)

    return kernel, prepare, finish, reference, pv


def _cudnn_fp8_variant():
    """cuDNN's FP8 forward on per-tensor e4m3 codes (amax scales, quantized before timing, as the
    kernel rows are), checked against its numerics emulated in plain JAX. Its output is e4m3 too
    (P and the output each rounded once more than jquant's), hence the ``fp8_out`` tolerance."""
    why = cudnn_fp8.unavailable_reason()
    if why is not None:
        raise RuntimeError(f"cudnn-fp8: {why}")

    first: dict = {}  # the first input set's scales: the one the check runs on

    def prepare(q, k, v):
        codes, scales = jax.jit(cudnn_fp8.quantize)(q, k, v)
        first.setdefault("scales", scales)
        return (*codes, scales), scales["descale_o"]

    def fn(q8, k8, v8, scales):
        return cudnn_fp8.cudnn_fp8_attention(q8, k8, v8, scales)

    def finish(out, descale_o):
        return out.astype(jnp.float32) * descale_o

    def reference(q, k, v):  # q: the checked rows only, so the scales come from the whole tensors
        return ar.per_tensor_fp8_attention(q, k, v, scales=first["scales"])

    return fn, prepare, finish, reference, "fp8_out"


def check_fn(raw, extra, finish, reference, pv: str, check_rows: int):
    """``check(out)`` for a variant's output on the first input set ``raw = (q, k, v)``: on
    ``check_rows`` query rows spread over the sequence, against ``reference`` (exact attention when
    None) within ``BOUND_TOL[pv] * (P @ |V|)`` elementwise and ``REL_TOL[pv]`` in relative L2."""
    q, k, v = raw
    tokens = q.shape[1]
    rows = jnp.unique(jnp.linspace(0, tokens - 1, min(check_rows, tokens)).astype(jnp.int32))
    q_sub = q[:, rows]
    magnitude = jax.jit(lambda q, k, v: ar.exact_attention(q, k, jnp.abs(v)))(q_sub, k, v)
    if reference is None:
        ref = jax.jit(lambda q, k, v: ar.exact_attention(q, k, v))(q_sub, k, v)
    else:
        ref = jax.jit(reference)(q_sub, k, v)

    def check(out):
        got = finish(out, extra)[:, rows]
        return testing.check_dot(got, ref, magnitude, BOUND_TOL[pv], rel_tol=REL_TOL[pv])

    return check


def time_variant(variant: str, heads: int, tokens: int, block_k: int, seed: int, check_rows: int) -> dict:
    fn, prepare, finish, reference, pv = variant_fn(variant, block_k)
    bytes_per_set = 3 * tokens * heads * HEAD_DIM * 2
    copies = timing.copies_for(bytes_per_set, limit=4)
    sets, first = [], None
    for c in range(copies):
        q, k, v = ar.sample_inputs(jax.random.key(seed + c), 1, tokens, tokens, heads, HEAD_DIM)
        args, extra = prepare(q, k, v)
        sets.append(tuple(args))
        if first is None:
            first = ((q, k, v), extra)
    flops = 4.0 * heads * tokens * tokens * HEAD_DIM
    est_us = flops / (ASSUMED_TFLOPS * 1e6)
    iterations = int(max(timing.MIN_RUNS, min(20, 3e5 / max(est_us * copies, 1.0))))
    stats = timing.check_then_time(fn, sets, check_fn(*first, finish, reference, pv, check_rows), iterations=iterations)
    if "us" in stats:
        stats["tflops"] = flops / (stats["us"] * 1e6)
    stats["iterations"] = iterations
    stats["checked_against"] = "exact fp32 attention" if reference is None else "quant_attention_reference"
    return stats


def speedups(row: dict, baselines: dict[str, dict | None]) -> dict:
    """A timed row's times against each baseline timed before it in the same run: the baseline's
    median and minimum, and the speedups median / median and min / min."""
    out: dict = {}
    if "us" not in row:
        return out
    for name, base in baselines.items():
        if base is None:
            continue
        tag = name.replace("-", "_")
        out[f"{tag}_us"] = base["us"]
        out[f"{tag}_us_min"] = base["us_min"]
        out[f"speedup_vs_{tag}"] = base["us"] / row["us"]
        out[f"speedup_vs_{tag}_min"] = base["us_min"] / row["us_min"]
    return out


def run_prep_breakdown(result: dict, shapes: dict, variants: list[str], args: argparse.Namespace) -> int:
    """``--prep-breakdown``: :func:`prep_breakdown` rows for each shape and kernel variant, written to
    ``attention-prep-<device>.json``; exits 1 if any row errored."""
    result["benchmark"] = "attention operand pass"
    name = f"attention-prep-{device_slug(jax.devices()[0])}.json"
    for shape_name, (heads, tokens) in shapes.items():
        for variant in variants:
            row = {"shape": shape_name, "heads": heads, "tokens": tokens, "variant": variant}
            try:
                row.update(status="PASS", **prep_breakdown(variant, heads, tokens, args.block_k))
            except Exception as e:  # pylint: disable=broad-except
                row.update(timing.error_row(e))
            result["rows"].append(row)
            timing.write_json(name, result, folder=str(args.out_dir))
            if row["status"] != "PASS":
                print(f"{shape_name:9s} {variant:24s} ERROR {row['error'][:300]}", flush=True)
                continue
            print(
                f"{shape_name:9s} {variant:24s} operand pass {row['us']:8.1f} us in {len(row['kernels'])} kernels;"
                f" one pass would be {row['one_pass_us']:6.1f} us",
                flush=True,
            )
            for k in row["kernels"][:8]:
                print(f"    {k['us']:8.1f} us  x{k['launches']}  {k['kernel'][:90]}", flush=True)
    bad = sum(r["status"] != "PASS" for r in result["rows"])
    result["failures"] = bad
    timing.write_json(name, result, folder=str(args.out_dir))
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {VARIANT_HELP}")
    parser.add_argument("--block-k", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--deadline-s", type=float, default=170.0, help="skip rows started after this")
    parser.add_argument("--check-rows", type=int, default=128, help="query rows each output is checked on")
    parser.add_argument(
        "--prep-breakdown",
        action="store_true",
        help="instead of timing variants, time each XLA kernel of the kernel variants' operand pass (GPU only)",
    )
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks")
    args = parser.parse_args(argv)
    shapes = {"2x256": (2, 256)} if args.tiny else {}
    for name in [] if args.tiny else args.shapes.split(","):
        if name not in SHAPES:
            parser.error(f"--shapes: unknown shape {name!r}; choose from {list(SHAPES)}")
        shapes[name] = SHAPES[name]
    variants = args.variants.split(",")
    for v in variants:
        if v not in BASELINES:
            try:
                parse_variant(v, args.block_k)
            except ValueError as e:
                parser.error(f"--variants: {e}")
    if jax.default_backend() != "gpu":
        variants = [v for v in variants if v != "cudnn"]
    if "cudnn-fp8" in variants and cudnn_fp8.unavailable_reason() is not None:
        print(f"cudnn-fp8 skipped: {cudnn_fp8.unavailable_reason()}", flush=True)
        variants = [v for v in variants if v != "cudnn-fp8"]
    start = time.perf_counter()
    device = jax.devices()[0]
    result = {
        "benchmark": "attention",
        **timing.run_metadata("scripts/bench_attention.py", sys.argv[1:] if argv is None else argv),
        "jax_version": jax.__version__,
        "timing": "us: median, us_min: minimum over >= 10 CUPTI-timed runs; each output checked first",
        "head_dim": HEAD_DIM,
        "batch": 1,
        "block_k": args.block_k,
        "kernel_on_device": _common.on_hopper(),
        "bound_tol": BOUND_TOL,
        "rel_tol": REL_TOL,
        "check_rows": args.check_rows,
        "rows": [],
    }
    name = f"attention-{device_slug(device)}{'-tiny' if args.tiny else ''}.json"

    def save():
        timing.write_json(name, result, folder=str(args.out_dir))

    if args.prep_breakdown:
        return run_prep_breakdown(result, shapes, [v for v in variants if v.startswith("kernel-")], args)
    for shape_name, (heads, tokens) in shapes.items():
        baselines: dict[str, dict] = {"cudnn": None, "cudnn-fp8": None}
        for variant in variants:
            row = {"shape": shape_name, "heads": heads, "tokens": tokens, "variant": variant}
            if time.perf_counter() - start > args.deadline_s:
                row.update(status="SKIP", skipped="deadline")
            elif variant == "xla" and heads * tokens * tokens * 2 > XLA_MAX_SCORE_BYTES:
                row.update(status="SKIP", skipped="scores do not fit in memory")
            else:
                try:
                    row.update(
                        time_variant(
                            variant, heads, tokens, args.block_k, seed=len(result["rows"]), check_rows=args.check_rows
                        )
                    )
                except Exception as e:  # pylint: disable=broad-except
                    row.update(timing.error_row(e))
                if variant == "cudnn-fp8" and "us" in row:
                    row["cudnn_fp8_scales"] = "per tensor, amax / 448 (Q, K, V), P x 448, output e4m3"
                if variant in baselines and "us" in row:
                    baselines[variant] = row
                row.update(speedups(row, baselines))
            result["rows"].append(row)
            save()
            if "us" in row:
                extra = (
                    f"  cudnn {row['cudnn_us']:11.1f} / {row['cudnn_us_min']:11.1f} us  x{row['speedup_vs_cudnn']:.2f}"
                    if "speedup_vs_cudnn" in row
                    else ""
                ) + (f"  vs fp8 x{row['speedup_vs_cudnn_fp8']:.2f}" if "speedup_vs_cudnn_fp8" in row else "")
                print(
                    f"{shape_name:9s} {variant:24s} PASS {row['us']:11.1f} us (min {row['us_min']:11.1f})"
                    f" {row['tflops']:7.1f} TFLOP/s{extra}",
                    flush=True,
                )
            else:
                why = row.get("skipped") or (row.get("check") or {}).get("detail") or row.get("error", "")
                print(f"{shape_name:9s} {variant:24s} {row['status']:5s} {why[:300]}", flush=True)
    bad = [r for r in result["rows"] if r.get("status") in ("FAIL", "ERROR")]
    result["failures"] = len(bad)
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    save()
    print(f"done in {time.perf_counter() - start:.0f} s: {len(bad)} failed or errored row(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
