#!/usr/bin/env python3
"""Where a W8A8 linear's time goes inside a model: XLA bf16 GEMM against jquant's whole dispatch
(`jquant.dispatch.linear` with int8 per-channel weights and dynamic int8 per-token activations,
also with QuaRot's online Hadamard: full width, ``hadamard=True``, and block-diagonal of order
128, ``hadamard=128``, issue 26's candidate), W4A8 (int4 per-channel weights) plain and with the
block rotation, and the parts (activation quantization as the dispatch runs it, i.e. the
quantizer kernel, and as XLA runs it; the weight-code transpose; the Mosaic GEMM alone), on
Wan2.1-1.3B's linear shapes at 32,760 tokens (``BENCH_SHAPES=all``: Wan2.1-14B's too;
``BENCH_SHAPES=norm``: only the 1.3B linears a norm feeds). Each
rotated linear's output is checked against XLA's path on the rotated activations, and the plain
W4A8 one against its XLA path, before it is timed (rel. L2 <= 2e-2); a wrong row is printed and
the script exits 1. Where a norm feeds the linear (K the model width: QKV, FFN-up) it also times
the linear as a quantized step runs it, from its norm producer (LayerNorm + modulation + optional
block-128 rotation + per-token codes in one pass, then the W8A8 / W4A8 GEMM on the codes) against
the norm + bf16 GEMM in XLA, and the rotating producer under a few programs. Prints a table; writes
``benchmarks/linear_path-<device>.json``.

    python scripts/bench_linear_path.py     # GPU (Hopper); BENCH_TAG=... names the JSON
    JQUANT_BACKEND=pallas python scripts/bench_linear_path.py   # also the kernels not GPU-checked yet

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
from jquant.hadamard import apply_block_hadamard, online_block
from jquant.qarray import QArray, decode_scale, quantize
from pallas_kernels import _quant, fused_producers, norm_quant, timing, w8a8
from pallas_kernels.attention_ref import relative_l2

M = int(os.environ.get("BENCH_M", 32760))
SHAPES = [(1536, 1536), (1536, 8960), (8960, 1536)]  # attention projections, FFN up, FFN down
SHAPES_14B = [(5120, 5120), (5120, 13824), (13824, 5120)]
BLOCK = 128  # the block-diagonal rotation's order (QuaRotConfig.online_block)


def xla_check(x: jax.Array, q, act):
    """``check`` for :func:`timing.time_fn`: within 2e-2 in relative L2 of XLA's quantized linear
    on ``x``."""
    ref = dispatch.linear(x, q, act=act, backend="xla")

    def check(out) -> dict:
        err = relative_l2(out, ref)
        return {"ok": err <= 2e-2, "rel_l2": err}

    return check


def rotated_check(x: jax.Array, q, act, rotation: bool | int):
    """:func:`xla_check` on the rotated activations; ``rotation=False``: on ``x`` itself."""
    xr = apply_block_hadamard(x, online_block(rotation), axis=-1).astype(x.dtype) if rotation else x
    return xla_check(xr, q, act)


#: Programs of the rotating norm producer timed beside its default (``_quant.pick_config``).
PRODUCER_CONFIGS = tuple(_quant.QuantizerConfig(rows=r, warps=w) for r in (4, 8, 16) for w in (4, 8))


def produce(x, shift, scale, rotation: int, config=None):
    """The norm producer (``norm_quant``): LayerNorm + adaLN modulation (+ QuaRot's block
    rotation) + per-token codes in one pass; ``(codes, scales)``."""
    return norm_quant.norm_modulate_quantize_pallas(
        x, None, None, shift, scale, hadamard=rotation, block=x.shape[1], config=config
    )


def producer_linear(x, q, shift, scale, act, rotation: int):
    """A linear fed by its norm producer, as Wan's QKV and FFN-up run in a quantized step:
    :func:`produce`, then the per-token GEMM on its codes (``dispatch.linear_quantized``)."""
    codes, scales = produce(x, shift, scale, rotation)
    return dispatch.linear_quantized(QArray(codes, scales, spec=act, dtype=x.dtype, axis=-1), q)


def norm_linear_bf16(x, w, shift, scale):
    """Its float counterpart: the modulated LayerNorm in XLA, rounded to bf16, times bf16 weights."""
    return fused_producers.norm_modulate(x, None, None, shift, scale).astype(x.dtype) @ w


def producer_check(x, q, shift, scale, act, rotation: int):
    """``check`` for a producer-fed linear: :func:`xla_check` on the modulated (and rotated)
    activations (the producer quantizes float32 values, the XLA path their bf16 rounding)."""
    y = fused_producers.norm_modulate(x, None, None, shift, scale)
    if rotation:
        y = apply_block_hadamard(y, rotation, axis=-1)
    return xla_check(y.astype(x.dtype), q, act)


def producer_columns(k: int, sets: list, q4: list, act) -> tuple[dict, int]:
    """Issue 26's per-linear comparison where a norm feeds the linear (K = the model width): the
    norm + bf16 GEMM in XLA against the producer + W8A8 / W4A8 GEMM, plain and with the block-128
    rotation, each checked first; and the rotating producer alone under each of
    :data:`PRODUCER_CONFIGS` (codes equal to the default program's). ``({}, 0)`` where the
    producer kernel does not run here."""
    if not norm_quant.supports(sets[0][0], hadamard=BLOCK, per_token=True):
        return {}, 0
    keys = jax.random.split(jax.random.key(100 + k), 2)
    shift, scale = (0.1 * jax.random.normal(kk, (k,), jnp.float32) for kk in keys)
    out: dict = {}
    wrong = 0
    out["norm_bf16_us"] = timing.time_fn(norm_linear_bf16, [(x, wb, shift, scale) for x, wb, _ in sets])["us"]
    for label, weights in (("w8a8", [(x, q) for x, _, q in sets]), ("w4a8", q4)):
        for rot in (0, BLOCK):
            name = f"producer_{label}" + (f"_block{rot}" if rot else "")
            t = timing.time_fn(
                lambda x, q, rot=rot: producer_linear(x, q, shift, scale, act, rot),
                weights,
                check=producer_check(weights[0][0], weights[0][1], shift, scale, act, rot),
            )
            out[f"{name}_check"] = t.get("check")
            if "us" not in t:
                wrong += 1
                print(f"  WRONG {name} K={k}: {t['check']}", flush=True)
                continue
            out[f"{name}_us"] = t["us"]
            out[f"{name}_speedup_vs_norm_bf16"] = out["norm_bf16_us"] / t["us"]
    x = sets[0][0]
    default = jax.block_until_ready(jax.jit(lambda x: produce(x, shift, scale, BLOCK))(x))
    configs = {}
    for cfg in PRODUCER_CONFIGS:
        label = f"rows{cfg.rows}_warps{cfg.warps}"
        run = jax.jit(lambda x, cfg=cfg: produce(x, shift, scale, BLOCK, cfg))
        try:
            same = run(x)
        except Exception as e:  # pylint: disable=broad-except  (a program the kernel refuses)
            configs[label] = {"error": str(e)[:200]}
            continue
        if not all(bool(jnp.array_equal(a, b)) for a, b in zip(same, default)):
            configs[label] = {"error": "codes differ from the default program's"}
            wrong += 1
            continue
        configs[label] = {"us": timing.time_fn(run, [(x,) for x, _, _ in sets])["us"]}
    default_cfg = _quant.pick_config(k)
    out["producer_block_default_config"] = f"rows{default_cfg.rows}_warps{default_cfg.warps}"
    out["producer_block_configs"] = configs
    return out, wrong


def main() -> int:
    act = parse_spec("int8/token")
    rows, wrong = [], 0
    shapes = SHAPES + (SHAPES_14B if os.environ.get("BENCH_SHAPES") == "all" else [])
    if os.environ.get("BENCH_SHAPES") == "norm":  # only the 1.3B linears a norm feeds (QKV, FFN up)
        shapes = [s for s in SHAPES if s[0] == SHAPES[0][0]]
    print(
        f"{'K':>5} {'N':>5} {'bf16':>8} {'linear':>8} {'+hadam':>8} {'+blk128':>8} {'act q':>8} {'xla q':>8} "
        f"{'w.T':>8} {'gemm':>8} {'w4a8':>8} {'w4+blk':>8}  (us)"
    )
    for k, n in shapes:
        sets = []
        for i in range(3):
            kx, kw = jax.random.split(jax.random.key(i))
            x = jax.random.normal(kx, (M, k), jnp.bfloat16)
            w = jax.random.normal(kw, (k, n), jnp.float32) * 0.02
            sets.append((x, w.astype(jnp.bfloat16), quantize(w, parse_spec("int8"))))
        bf16 = timing.time_fn(lambda x, w: x @ w, [(x, wb) for x, wb, _ in sets])["us"]
        lin = timing.time_fn(lambda x, q: dispatch.linear(x, q, act=act), [(x, q) for x, _, q in sets])["us"]
        # QuaRot's online rotations, each output checked first: full width (fused into the
        # quantizer where act_quant.hadamard_layout or the gathered layout takes K) and
        # block-diagonal of order 128 (fused where act_quant.block_matrix takes K and the
        # kernel is enabled, else rotated in XLA first).
        rotated = {}
        for label, rot in (("hadamard", True), (f"block{BLOCK}", BLOCK)):
            t = timing.time_fn(
                lambda x, q, rot=rot: dispatch.linear(x, q, act=act, hadamard=rot),
                [(x, q) for x, _, q in sets],
                check=rotated_check(sets[0][0], sets[0][2], act, rot),
            )
            rotated[label] = t
            if "us" not in t:
                wrong += 1
                print(f"  WRONG {label} K={k} N={n}: {t['check']}", flush=True)
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
        lin_h, lin_b = (rotated[key].get("us", float("nan")) for key in ("hadamard", f"block{BLOCK}"))
        # W4A8 (int4 per-channel weights, the same int8 activations): plain and with the block
        # rotation, each checked first (issue 26's second target).
        q4 = [(x, quantize(w.astype(jnp.float32), parse_spec("int4"))) for x, w, _ in sets]
        w4 = {}
        for label, rot in (("w4a8", False), (f"w4a8_block{BLOCK}", BLOCK)):
            check = rotated_check(q4[0][0], q4[0][1], act, rot)
            w4[label] = timing.time_fn(
                lambda x, q, rot=rot: dispatch.linear(x, q, act=act, hadamard=rot), q4, check=check
            )
            if "us" not in w4[label]:
                wrong += 1
                print(f"  WRONG {label} K={k} N={n}: {w4[label]['check']}", flush=True)
        w4_plain, w4_blk = (w4[key].get("us", float("nan")) for key in ("w4a8", f"w4a8_block{BLOCK}"))
        norm_fed = k in (SHAPES[0][0], SHAPES_14B[0][0])  # the model width: QKV and FFN-up inputs
        produced, bad = producer_columns(k, sets, q4, act) if norm_fed else ({}, 0)
        wrong += bad
        rows.append(
            dict(
                m=M,
                k=k,
                n=n,
                xla_bf16_us=bf16,
                linear_us=lin,
                linear_hadamard_us=lin_h,
                linear_hadamard_check=rotated["hadamard"].get("check"),
                linear_block_us=lin_b,
                linear_block_check=rotated[f"block{BLOCK}"].get("check"),
                block=BLOCK,
                block_fused=kernel_dispatch.act_quant.supports(sets[0][0], hadamard=BLOCK),
                act_quant_us=aq,
                act_quant_xla_us=aq_xla,
                weight_transpose_us=tr,
                gemm_us=gemm,
                speedup_vs_bf16=bf16 / lin,
                block_speedup_vs_bf16=bf16 / lin_b,
                w4a8_us=w4_plain,
                w4a8_block_us=w4_blk,
                w4a8_block_check=w4[f"w4a8_block{BLOCK}"].get("check"),
                w4a8_block_speedup_vs_bf16=bf16 / w4_blk,
                **produced,
            )
        )
        print(
            f"{k:>5} {n:>5} {bf16:>8.1f} {lin:>8.1f} {lin_h:>8.1f} {lin_b:>8.1f} {aq:>8.1f} {aq_xla:>8.1f} "
            f"{tr:>8.1f} {gemm:>8.1f} {w4_plain:>8.1f} {w4_blk:>8.1f}",
            flush=True,
        )
        if produced:
            print(
                f"      from the norm: norm+bf16 {produced['norm_bf16_us']:.1f}  producer + "
                + "  ".join(
                    f"{lab} {produced.get(f'producer_{lab}_us', float('nan')):.1f}"
                    for lab in ("w8a8", f"w8a8_block{BLOCK}", "w4a8", f"w4a8_block{BLOCK}")
                )
                + "  rotating producer alone: "
                + " ".join(
                    f"{c} {v.get('us', float('nan')):.1f}" for c, v in produced["producer_block_configs"].items()
                ),
                flush=True,
            )
    tag = os.environ.get("BENCH_TAG", "")  # e.g. "jax_triton" when the gpu extra is installed
    timing.write_rows("linear_path" + (f"-{tag}" if tag else ""), rows)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
