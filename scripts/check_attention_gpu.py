#!/usr/bin/env python3
"""Check the quantized attention kernel against its reference and exact fp32 attention on the GPU.

For each case (formats, head_dim, causal, ragged lengths, random or realistic inputs: a few K
channels 10-50x larger, V with channel means), fresh inputs are drawn and three relative L2
errors are printed (the reference and exact attention run on the host CPU): kernel vs exact fp32 softmax attention, reference vs exact, and kernel vs
reference. A case PASSES when the kernel output is finite, within 1e-2 (bf16 P V) or 4e-2 (fp8 P V:
P is rounded against the running maximum in the kernel, the final one in the reference) of
the reference, and no more than 1.3x the reference's own error (+0.5%) from exact attention;
the error against exact attention is also reported against the 3% target. Which path ran ("kernel" or "reference" fallback) is printed too.

Writes ``benchmarks/check_attention-<device>.json`` (device, date, commit, JAX version, command;
a copy under ``$OUT`` when set) and exits 1 if any case fails or errors.

    PYTHONPATH=. python3 scripts/check_attention_gpu.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import attention as pa  # noqa: E402
from pallas_kernels import attention_ref as ar  # noqa: E402
from pallas_kernels import timing  # noqa: E402

# The kernel quantizes P against the running row maximum and the reference against the
# final one, so with fp8 P the two round differently (each about 2.5% from exact).
KERNEL_VS_REFERENCE_TOL = {"bf16": 1e-2, "fp8_e4m3": 4e-2}
TARGET_VS_EXACT = 3e-2

# (name, batch, q_tokens, kv_tokens, heads, head_dim, kind, options)
CASES = [
    ("int8/bf16 d128", 2, 1000, 1000, 3, 128, "random", dict(qk_format="int8", pv_format="bf16")),
    ("int8/fp8 d128", 2, 1000, 1000, 3, 128, "random", dict(qk_format="int8", pv_format="fp8_e4m3")),
    ("fp8/fp8 d128", 2, 1000, 1000, 3, 128, "random", dict(qk_format="fp8_e4m3", pv_format="fp8_e4m3")),
    ("fp8/bf16 d64", 1, 777, 777, 2, 64, "random", dict(qk_format="fp8_e4m3", pv_format="bf16")),
    ("int8/fp8 d64", 1, 777, 777, 2, 64, "random", dict(qk_format="int8", pv_format="fp8_e4m3")),
    (
        "int8/fp8 lengths",
        3,
        700,
        1000,
        2,
        128,
        "random",
        dict(qk_format="int8", pv_format="fp8_e4m3", kv_lengths=(1000, 517, 3)),
    ),
    ("int8/fp8 bk256", 1, 1000, 1000, 2, 128, "random", dict(qk_format="int8", pv_format="fp8_e4m3", block_k=256)),
    (
        "int8/fp8 kblock lengths",
        3,
        700,
        1000,
        2,
        128,
        "random",
        dict(qk_format="int8", pv_format="fp8_e4m3", k_scales="block", kv_lengths=(1000, 517, 3)),
    ),
    (
        "int8/bf16 kblock cvt d64",
        1,
        777,
        777,
        2,
        64,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", int_to_float="cvt"),
    ),
    (
        "int8/bf16 bk64 stages3",
        1,
        1000,
        1000,
        2,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", block_k=64, stages=3),
    ),
    (
        "int8/fp8 magic d128",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(qk_format="int8", pv_format="fp8_e4m3", int_to_float="magic"),
    ),
    (
        "int8/bf16 magic d64",
        1,
        777,
        777,
        2,
        64,
        "random",
        dict(qk_format="int8", pv_format="bf16", int_to_float="magic"),
    ),
    (
        "realistic int8/fp8 hadamard",
        2,
        2048,
        2048,
        4,
        128,
        "realistic",
        dict(qk_format="int8", pv_format="fp8_e4m3", hadamard=True),
    ),
    (
        "realistic int8/bf16 hadamard",
        2,
        2048,
        2048,
        4,
        128,
        "realistic",
        dict(qk_format="int8", pv_format="bf16", hadamard=True),
    ),
    ("realistic int8/fp8", 2, 2048, 2048, 4, 128, "realistic", dict(qk_format="int8", pv_format="fp8_e4m3")),
    (
        "realistic int8/fp8 hadamard lengths",
        2,
        1500,
        1500,
        4,
        128,
        "realistic",
        dict(qk_format="int8", pv_format="fp8_e4m3", hadamard=True, kv_lengths=(1500, 1111)),
    ),
    # Causal last: a pipeline bug there would hang rather than fail, and the rest is saved first.
    (
        "int8/fp8 causal d128",
        1,
        1000,
        1000,
        2,
        128,
        "random",
        dict(qk_format="int8", pv_format="fp8_e4m3", causal=True),
    ),
    ("int8/bf16 causal d64", 1, 900, 900, 2, 64, "random", dict(qk_format="int8", pv_format="bf16", causal=True)),
    (
        "int8/fp8 kblock causal d128",
        1,
        1000,
        1000,
        2,
        128,
        "random",
        dict(qk_format="int8", pv_format="fp8_e4m3", causal=True, k_scales="block"),
    ),
    (
        "realistic int8/fp8 hadamard magic causal",
        1,
        2048,
        2048,
        4,
        128,
        "realistic",
        dict(qk_format="int8", pv_format="fp8_e4m3", hadamard=True, int_to_float="magic", causal=True),
    ),
    ("ovl int8/bf16 d128", 2, 1000, 1000, 3, 128, "random", dict(qk_format="int8", pv_format="bf16", overlap=True)),
    ("ovl int8/fp8 d128", 2, 1000, 1000, 3, 128, "random", dict(qk_format="int8", pv_format="fp8_e4m3", overlap=True)),
    (
        "ovl free int8/fp8 kblock lengths",
        3,
        1000,
        1000,
        2,
        128,
        "random",
        dict(
            qk_format="int8",
            pv_format="fp8_e4m3",
            k_scales="block",
            kv_lengths=(1000, 517, 3),
            overlap=True,
            schedule="none",
        ),
    ),
    (
        "ovl int8/bf16 d64 bk64 realistic",
        1,
        777,
        777,
        2,
        64,
        "realistic",
        dict(qk_format="int8", pv_format="bf16", block_k=64, hadamard=True, overlap=True),
    ),
    ("free int8/bf16 d128", 2, 1000, 1000, 3, 128, "random", dict(qk_format="int8", pv_format="bf16", schedule="none")),
    # Per-tile K scales: the max on the raw scores (raw_max, the default) and the scaled max.
    (
        "kblock int8/bf16 d128",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block"),
    ),
    (
        "kblock int8/bf16 realistic hadamard lengths",
        2,
        1500,
        1500,
        4,
        128,
        "realistic",
        dict(qk_format="int8", pv_format="bf16", hadamard=True, k_scales="block", kv_lengths=(1500, 1111)),
    ),
    (
        "kblock int8/bf16 cvt d64",
        1,
        777,
        777,
        2,
        64,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", int_to_float="cvt", block_k=64),
    ),
    (
        "kblock fp8/fp8 d128",
        1,
        1000,
        1000,
        2,
        128,
        "random",
        dict(qk_format="fp8_e4m3", pv_format="fp8_e4m3", k_scales="block"),
    ),
    (
        "kblock int8/fp8 bk256 d128",
        1,
        1000,
        1000,
        2,
        128,
        "random",
        dict(qk_format="int8", pv_format="fp8_e4m3", k_scales="block", block_k=256),
    ),
    (
        "kblock scaledmax int8/bf16 d128",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", raw_max=False),
    ),
    (
        "kblock ovl int8/bf16 d128",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", overlap=True),
    ),
    (
        "kblock int8/bf16 causal d64",
        1,
        900,
        900,
        2,
        64,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", causal=True),
    ),
    # The softmax turn handed over early, and the int32 accumulator without the magic start.
    (
        "hmax kblock int8/bf16 d128",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", handoff="max"),
    ),
    (
        "hexp int8/bf16 realistic hadamard lengths",
        2,
        1500,
        1500,
        4,
        128,
        "realistic",
        dict(qk_format="int8", pv_format="bf16", hadamard=True, kv_lengths=(1500, 1111), handoff="exp"),
    ),
    (
        "hmax kblock int8/fp8 bk256 d128",
        1,
        1000,
        1000,
        2,
        128,
        "random",
        dict(qk_format="int8", pv_format="fp8_e4m3", k_scales="block", block_k=256, handoff="max"),
    ),
    (
        "hmax kblock int8/bf16 causal d64",
        1,
        900,
        900,
        2,
        64,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", causal=True, handoff="max"),
    ),
    (
        "fresh kblock int8/bf16 d128",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", fresh_pv=True),
    ),
    (
        "fresh kblock int8/fp8 bk256 lengths",
        2,
        1000,
        1000,
        2,
        128,
        "random",
        dict(
            qk_format="int8", pv_format="fp8_e4m3", k_scales="block", block_k=256, fresh_pv=True, kv_lengths=(1000, 517)
        ),
    ),
    (
        "fresh int8/fp8 causal d128",
        1,
        1000,
        1000,
        2,
        128,
        "random",
        dict(qk_format="int8", pv_format="fp8_e4m3", causal=True, fresh_pv=True),
    ),
    (
        "fresh int8/bf16 realistic hadamard",
        2,
        2048,
        2048,
        4,
        128,
        "realistic",
        dict(qk_format="int8", pv_format="bf16", hadamard=True, fresh_pv=True),
    ),
    (
        "psmem kblock int8/bf16 d128",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", p_smem=True),
    ),
    (
        "psmem ovl kblock int8/bf16 lengths",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", p_smem=True, overlap=True, kv_lengths=(1000, 517)),
    ),
    (
        "psmem ovl free kblock int8/bf16 d128",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", p_smem=True, overlap=True, schedule="none"),
    ),
    (
        "psmem int8/bf16 causal d64",
        1,
        900,
        900,
        2,
        64,
        "random",
        dict(qk_format="int8", pv_format="bf16", causal=True, p_smem=True),
    ),
    (
        "psmem ovl int8/bf16 realistic hadamard d64 bk64",
        1,
        777,
        777,
        2,
        64,
        "realistic",
        dict(qk_format="int8", pv_format="bf16", hadamard=True, block_k=64, overlap=True, p_smem=True),
    ),
    (
        "round kblock int8/bf16 d128",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", schedule="round"),
    ),
    (
        "round wg3 kblock int8/bf16 lengths",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(
            qk_format="int8", pv_format="bf16", k_scales="block", schedule="round", warpgroups=3, kv_lengths=(1000, 517)
        ),
    ),
    (
        "round wg3 psmem kblock int8/bf16 realistic hadamard",
        2,
        2048,
        2048,
        4,
        128,
        "realistic",
        dict(
            qk_format="int8",
            pv_format="bf16",
            k_scales="block",
            hadamard=True,
            schedule="round",
            warpgroups=3,
            p_smem=True,
        ),
    ),
    (
        "round wg3 kblock int8/fp8 d128",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(qk_format="int8", pv_format="fp8_e4m3", k_scales="block", schedule="round", warpgroups=3),
    ),
    (
        "round wg3 cvt int8/bf16 d64 bk64",
        1,
        777,
        777,
        2,
        64,
        "realistic",
        dict(qk_format="int8", pv_format="bf16", int_to_float="cvt", block_k=64, schedule="round", warpgroups=3),
    ),
    (
        "round wg3 fp8/fp8 d128",
        1,
        1000,
        1000,
        2,
        128,
        "random",
        dict(qk_format="fp8_e4m3", pv_format="fp8_e4m3", schedule="round", warpgroups=3),
    ),
    (
        "pint kblock int8/bf16 d128",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", p_round="int"),
    ),
    (
        "pint round kblock int8/bf16 realistic hadamard",
        2,
        2048,
        2048,
        4,
        128,
        "realistic",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", hadamard=True, schedule="round", p_round="int"),
    ),
    (
        "pint ovl int8/bf16 lengths",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", overlap=True, p_round="int", kv_lengths=(1000, 517)),
    ),
    (
        "pint int8/bf16 causal d64",
        1,
        900,
        900,
        2,
        64,
        "random",
        dict(qk_format="int8", pv_format="bf16", causal=True, p_round="int"),
    ),
    (
        "poly64 kblock int8/bf16 d128",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", exp_poly=64),
    ),
    (
        "poly64 int8/bf16 realistic hadamard lengths",
        2,
        2048,
        2048,
        4,
        128,
        "realistic",
        dict(qk_format="int8", pv_format="bf16", hadamard=True, exp_poly=64, kv_lengths=(2048, 1111)),
    ),
    (
        "poly64 int8/bf16 causal d64",
        1,
        900,
        900,
        2,
        64,
        "random",
        dict(qk_format="int8", pv_format="bf16", causal=True, exp_poly=64),
    ),
    (
        "ms4 kblock int8/bf16 d128",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", max_split=4),
    ),
    (
        "ms8 kblock int8/bf16 realistic hadamard lengths",
        2,
        2048,
        2048,
        4,
        128,
        "realistic",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", hadamard=True, max_split=8, kv_lengths=(2048, 1111)),
    ),
    (
        "ms4 kblock int8/fp8 bk256",
        1,
        1000,
        1000,
        2,
        128,
        "random",
        dict(qk_format="int8", pv_format="fp8_e4m3", k_scales="block", block_k=256, max_split=4),
    ),
    (
        "noinit kblock int8/bf16 d128",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", magic_init=False),
    ),
    # V and the output at the caller's token counts (AttentionConfig.unpadded): TMA's zero fill
    # past the last key, its skipped stores past the last query (a whole 64-row tile past it at
    # 696 queries: 768 padded). Token counts are multiples of 8 (attention.UNPADDED_MULTIPLE).
    (
        "unpadded int8/bf16 d128",
        2,
        1000,
        1000,
        3,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", unpadded=True),
    ),
    (
        "unpadded int8/bf16 kblock hadamard (the policy's default)",
        1,
        1000,
        1000,
        2,
        128,
        "realistic",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", hadamard=True, unpadded=True),
    ),
    (
        "unpadded int8/bf16 lengths",
        3,
        696,
        1000,
        2,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", kv_lengths=(1000, 517, 3), unpadded=True),
    ),
    # a partial V tile among the first `stages` copies the memory warpgroup issues (static starts)
    ("unpadded int8/bf16 t200", 1, 200, 200, 2, 128, "random", dict(qk_format="int8", pv_format="bf16", unpadded=True)),
    (
        "unpadded int8/bf16 causal kblock",
        1,
        776,
        776,
        2,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", causal=True, unpadded=True),
    ),
    (  # Wan2.1-1.3B's cross-attention: 32,760 queries over 512 text keys (half the step's output slices)
        "unpadded int8/bf16 kblock cross 32760x512",
        1,
        32760,
        512,
        2,
        128,
        "random",
        dict(qk_format="int8", pv_format="bf16", k_scales="block", hadamard=True, unpadded=True),
    ),
    (
        "unpadded int8/fp8 causal d64",
        1,
        776,
        776,
        2,
        64,
        "random",
        dict(qk_format="int8", pv_format="fp8_e4m3", causal=True, unpadded=True),
    ),
]
#: Case options that tune the kernel only (the reference does not take them), and those that
#: are AttentionConfig fields.
CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(pa.AttentionConfig))
KERNEL_ONLY = CONFIG_FIELDS - frozenset(inspect.signature(ar.quant_attention_reference).parameters)
QUICK = {
    "int8/bf16 d128",
    "int8/fp8 d128",
    "int8/bf16 magic d64",
    "int8/fp8 causal d128",
    "int8/bf16 causal d64",
    "int8/fp8 lengths",
    "realistic int8/bf16 hadamard",
    "int8/fp8 kblock lengths",
}


def device_slug(device: jax.Device) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-") or device.platform


def run_case(seed: int, case) -> dict:
    name, b, tq, tk, h, d, kind, options = case
    opts = dict(options)
    if "kv_lengths" in opts:
        opts["kv_lengths"] = jnp.asarray(opts["kv_lengths"], jnp.int32)
    q, k, v = ar.sample_inputs(jax.random.key(seed), b, tq, tk, h, d, kind=kind)
    kernel_opts = dict(opts)
    ref_opts = {key: val for key, val in opts.items() if key not in KERNEL_ONLY}
    config = pa.AttentionConfig(**{key: val for key, val in opts.items() if key in CONFIG_FIELDS})
    path = (
        "kernel"
        if pa.supports(
            q,
            k,
            causal=opts.get("causal", False),
            kv_lengths=opts.get("kv_lengths"),
            qk_format=opts["qk_format"],
            pv_format=opts["pv_format"],
            smooth_k=True,
            config=config,
        )
        else "reference"
    )
    t0 = time.perf_counter()
    out = jax.block_until_ready(jax.jit(lambda q, k, v: pa.quant_attention(q, k, v, **kernel_opts))(q, k, v))
    seconds = time.perf_counter() - t0
    # The reference and exact attention run on the host CPU: XLA's GPU simplifier may fold the
    # reference's fp8 round trips away, which would make it look more accurate than it is.
    cpu = jax.devices("cpu")[0]
    q_c, k_c, v_c = (jax.device_put(x, cpu) for x in (q, k, v))
    ref_opts_c = {key: (jax.device_put(val, cpu) if key == "kv_lengths" else val) for key, val in ref_opts.items()}
    with jax.default_device(cpu):
        ref = jax.jit(lambda q, k, v: ar.quant_attention_reference(q, k, v, **ref_opts_c))(q_c, k_c, v_c)
        exact = jax.jit(
            lambda q, k, v: ar.exact_attention(
                q, k, v, causal=opts.get("causal", False), kv_lengths=ref_opts_c.get("kv_lengths")
            )
        )(q_c, k_c, v_c)
    finite = bool(np.isfinite(np.asarray(out, np.float32)).all())
    rel_kr = ar.relative_l2(out, ref)
    rel_ke = ar.relative_l2(out, exact)
    rel_re = ar.relative_l2(ref, exact)
    return {
        "case": name,
        "shape": [b, tq, tk, h, d],
        "inputs": kind,
        "options": {key: (list(val) if isinstance(val, tuple) else val) for key, val in options.items()},
        "path": path,
        "finite": finite,
        "kernel_vs_reference": rel_kr,
        "kernel_vs_exact": rel_ke,
        "reference_vs_exact": rel_re,
        "compile_and_run_s": seconds,
        "pass": (finite and rel_kr <= KERNEL_VS_REFERENCE_TOL[opts["pv_format"]] and rel_ke <= 1.3 * rel_re + 5e-3),
        "meets_3pct_target": rel_ke <= TARGET_VS_EXACT,
    }


#: attn_prep's check: (batch, tokens, heads, head_dim, format, hadamard, smooth, per-tile K, tile)
PREP_CASES = [
    (1, 32760, 12, 128, "int8", True, False, False, 128),  # Wan2.1-1.3B Q
    (1, 32760, 12, 128, "int8", True, True, True, 128),  # its K, one scale per 128-key tile
    (1, 32760, 12, 128, "int8", True, True, False, 128),  # its K, per token
    (1, 32760, 12, 128, "fp8_e4m3", True, True, True, 256),
    (2, 1000, 3, 64, "int8", True, True, False, 128),
    (2, 1000, 3, 64, "fp8_e4m3", False, False, False, 128),
    (1, 777, 2, 128, "int8", False, True, True, 128),
]


#: attn_prep with the Q/K prologue (RMSNorm across heads, interleaved RoPE) applied in the kernel:
#: (batch, tokens, heads, head_dim, format, hadamard, smooth, per-tile K, tile, role, parts, Wan RoPE grid)
PREP_PROLOGUE_CASES = [
    (1, 32760, 12, 128, "int8", True, False, False, 128, "q", "norm+rope", (21, 30, 52)),  # Wan2.1-1.3B Q
    (1, 32760, 12, 128, "int8", True, True, True, 128, "k", "norm+rope", (21, 30, 52)),  # its K, per tile
    (1, 32760, 12, 128, "fp8_e4m3", True, True, False, 128, "k", "norm+rope", (21, 30, 52)),
    (2, 777, 3, 64, "int8", True, True, False, 128, "k", "norm+rope", (7, 3, 37)),  # odd T, d 64
    (1, 777, 2, 128, "fp8_e4m3", False, False, False, 128, "q", "norm", (7, 3, 37)),
    (1, 777, 2, 128, "int8", True, True, True, 128, "k", "rope", (7, 3, 37)),
    # the other launch order with the RoPE (attn_prep.ROPE_HEADS_INNER picks one), Wan's Q
    (1, 32760, 12, 128, "int8", True, False, False, 128, "q", "norm+rope+heads_outer", (21, 30, 52)),
]


def _prep_input(i: int, b: int, t: int, h: int, d: int) -> jax.Array:
    key = jax.random.key(2000 + i)
    spread = jnp.linspace(0.3, 6.0, d)
    return (jax.random.normal(key, (b, t, h, d)) * spread + 0.5).astype(jnp.bfloat16)


def _prep_row(name: str, compare) -> dict:
    """One attn_prep.compare row, printed; an exception becomes a failing row."""
    try:
        r = compare()
        row = {"case": name, "pass": r["ok"], "path": "attn_prep", **r}
        print(
            f"{name:72s} differing {r['codes_differing']:.1e} steps {r['max_code_steps']:.0f} "
            f"scale {r['scale_rel']:.1e}  {'PASS' if r['ok'] else 'FAIL'}",
            flush=True,
        )
    except Exception as e:  # pylint: disable=broad-except
        row = {"case": name, "pass": False, "error": f"{type(e).__name__}: {e}"[:4000]}
        print(f"{name:72s} ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
    return row


def run_prep_cases() -> list[dict]:
    """attn_prep.compare on the GPU (the compiled Triton program) for every :data:`PREP_CASES`
    and :data:`PREP_PROLOGUE_CASES` row (the latter with norm weights 1 + 0.1 noise and Wan's RoPE
    tables)."""
    from jquant.models.attention import QKPrologue  # pylint: disable=import-outside-toplevel
    from jquant.models.embeddings import wan_rope_tables  # pylint: disable=import-outside-toplevel
    from pallas_kernels import attn_prep  # pylint: disable=import-outside-toplevel

    rows = []
    for i, (b, t, h, d, fmt, had, smooth, per_tile, tile) in enumerate(PREP_CASES):
        layout = "tile" + str(tile) if per_tile else "token"
        name = f"prep {fmt} b{b} t{t} h{h} d{d} had{int(had)} smooth{int(smooth)} {layout}"
        x = _prep_input(i, b, t, h, d)
        kw = dict(fmt=fmt, hadamard=had, smooth=smooth, per_tile=per_tile, tile=tile)
        rows.append(_prep_row(name, lambda x=x, kw=kw: attn_prep.compare(x, **kw)))
    for i, (b, t, h, d, fmt, had, smooth, per_tile, tile, role, parts, grid) in enumerate(PREP_PROLOGUE_CASES):
        layout = "tile" + str(tile) if per_tile else "token"
        name = f"prep {role} {parts} {fmt} b{b} t{t} h{h} d{d} had{int(had)} smooth{int(smooth)} {layout}"
        x = _prep_input(100 + i, b, t, h, d)
        weights = 1.0 + 0.1 * jax.random.normal(jax.random.key(3000 + i), (2, h * d))
        prologue = QKPrologue(
            norm=(weights[0], weights[1]) if "norm" in parts else None,
            rope=wan_rope_tables(d, grid) if "rope" in parts else None,
        )
        kw = dict(fmt=fmt, hadamard=had, smooth=smooth, per_tile=per_tile, tile=tile, prologue=prologue, role=role)
        if "heads_outer" in parts:
            kw["heads_inner"] = False
        rows.append(_prep_row(name, lambda x=x, kw=kw: attn_prep.compare(x, **kw)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the core cases")
    parser.add_argument("--only", default="", help="comma list of substrings: run the cases whose name has one")
    parser.add_argument("--deadline-s", type=float, default=150.0, help="skip cases started after this")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks")
    parser.add_argument(
        "--prep",
        action="store_true",
        help="also check pallas_kernels.attn_prep (the fused Q/K pass, with and without the Q/K norm + RoPE "
        "prologue) against its reference first (PREP_CASES, PREP_PROLOGUE_CASES)",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    device = jax.devices()[0]
    result = {
        "benchmark": "check_attention",
        **timing.run_metadata("scripts/check_attention_gpu.py"),
        "jax_version": jax.__version__,
        "tolerance_kernel_vs_reference": KERNEL_VS_REFERENCE_TOL,
        "cases": [],
    }
    paths = [args.out_dir / f"check_attention-{device_slug(device)}.json"]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / "check_attention.json")

    def save():
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(result, indent=1))

    pa.CAUSAL_ON_KERNEL = True  # exercise the causal kernel path whatever the default
    only = [w for w in args.only.split(",") if w]
    cases = [c for c in CASES if (not args.quick or c[0] in QUICK) and (not only or any(w in c[0] for w in only))]
    if args.prep:
        for row in run_prep_cases():
            result["cases"].append(row)
            save()
    print(f"{'case':38s} {'path':9s} {'k-vs-ref':>9s} {'k-vs-exact':>10s} {'ref-vs-exact':>12s}  status")
    for i, case in enumerate(cases):
        if time.perf_counter() - start > args.deadline_s:
            result["cases"].append({"case": case[0], "skipped": "deadline"})
            continue
        try:
            row = run_case(1000 + i, case)
            status = "PASS" if row["pass"] else "FAIL"
            print(
                f"{case[0]:38s} {row['path']:9s} {row['kernel_vs_reference']:9.2e} {row['kernel_vs_exact']:10.2e} "
                f"{row['reference_vs_exact']:12.2e}  {status}",
                flush=True,
            )
        except Exception as e:  # pylint: disable=broad-except
            row = {
                "case": case[0],
                "pass": False,
                "error": f"{type(e).__name__}: {e}"[:4000],
                "traceback": traceback.format_exc()[-6000:],
            }
            print(f"{case[0]:38s} ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
        result["cases"].append(row)
        save()
    ran = [c for c in result["cases"] if "skipped" not in c]
    result["all_pass"] = bool(ran) and all(c.get("pass") for c in ran)
    save()
    print("ALL PASS" if result["all_pass"] else "SOME FAILED", f"({time.perf_counter() - start:.0f} s)")
    return 0 if result["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
