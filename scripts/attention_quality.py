#!/usr/bin/env python3
"""Sampling quality of quantized attention on the bundled trained tiny Wan model.

Samples the same clips (same noise, same digits, CFG) with the jitted flow-match Euler sampler
under several recipes and compares each with the fp32 model with float attention:

* ``W8A8``: int8 weights (per channel) and int8 per-token activations, fp32 attention;
* ``W8A8 + bf16 attn``: the same with attention on bf16 Q, K, V and a bf16 output (what
  cuDNN's bf16 flash attention computes; the model itself runs in fp32);
* ``W8A8 + qattn <qk>/<pv>``: the same with quantized attention on every step and every layer
  (``jquant.attention.quantized_attention``; K smoothed, Hadamard-rotated Q/K);
* ``W8A8 + qattn, float last N``: quantized attention switched off for the last steps through
  ``step_data`` inside the one jitted scan;
* ``fp32 + qattn``: float weights, quantized attention alone;
* ``W8A8 + per-tensor FP8 attn``: cuDNN's FP8 attention numerics emulated
  (:func:`pallas_kernels.attention_ref.per_tensor_fp8_attention`: one amax scale per tensor and
  call for Q, K and V, P x 448 in e4m3, e4m3 output), the public fast path that jquant's
  fine-grained scales are compared against;
* ``W8A8 + int8 Q K^T / P x 255 (or 127), int8 V (emulated)``: the default's int8 Q K^T with P V
  on 8-bit integer codes (:func:`pallas_kernels.attention_ref.integer_pv_attention`), a study of
  a P V format no kernel runs yet.

A second table, ``operator_error``, gives the attention output's relative L2 error against exact
fp32 attention on synthetic inputs: standard normal, ``realistic`` (massive K channels with a
bias, larger Q channels, V channel means) and ``sharp`` (the same with queries 3x larger, so each
softmax row concentrates on few keys), for every jquant variant and per-tensor FP8.

Reports PSNR, SSIM and temporal flicker against fp32 (``jquant.metrics.compare_videos``) and the
bundled classifier's accuracy, and checks the target: quantized attention on every step keeps
PSNR within 0.5 dB of the same recipe with bf16 attention, and flicker within 5% of it. Off Hopper quantized attention runs
its plain-JAX reference (same quantization). Writes ``benchmarks/attention_quality.json``.

    python scripts/attention_quality.py [--clips 10] [--steps 20]
    python scripts/attention_quality.py --operator-only --op-tokens 16384 --op-heads 1 --out X.json

Run from the repository root: ``python scripts/attention_quality.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/attention_quality.py`` where jquant is not installed (e.g. the GPU machine).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

import jquant.nn
from jquant import policy as pol
from jquant.attention import quantized_attention, step_schedule
from jquant.metrics import compare_videos
from jquant.sampling import sample_flow_euler

TARGET_DB = 0.5
TARGET_FLICKER = 0.05  # relative to the same recipe with bf16 attention


@contextlib.contextmanager
def bf16_attention():
    """Attention of the Wan blocks on bf16 Q, K, V with a bf16 output (scoped patch of the name
    `models.blocks` calls), the float baseline a bf16 deployment has."""
    from jquant.models import blocks  # pylint: disable=import-outside-toplevel

    original = blocks.attention

    def rounded(q, k, v, mask=None, *, implementation=None, prologue=None):
        if prologue is not None:  # the layer's Q/K norm and RoPE, before the rounding as before
            q, k = prologue.apply(q, k)
        b16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
        return original(*b16, mask, implementation=implementation).astype(q.dtype)

    blocks.attention = rounded
    try:
        yield
    finally:
        blocks.attention = original


@contextlib.contextmanager
def per_tensor_fp8_attention():
    """Every unmasked attention call on cuDNN's per-tensor FP8 numerics (emulated; masked calls stay float)."""
    from jquant.models.attention import attention_hook  # pylint: disable=import-outside-toplevel
    from pallas_kernels import attention_ref as ar  # pylint: disable=import-outside-toplevel

    def hook(q, k, v, mask, implementation):
        del implementation
        return None if mask is not None else ar.per_tensor_fp8_attention(q, k, v).astype(q.dtype)

    with attention_hook(hook):
        yield


@contextlib.contextmanager
def integer_pv_attention(p_levels: int = 255):
    """Every unmasked attention call on :func:`pallas_kernels.attention_ref.integer_pv_attention`:
    the policy default's int8 Q K^T (Hadamard, K per tile) with P V on 8-bit integer codes (P
    times ``p_levels``), a study emulation no kernel runs yet (masked calls stay float)."""
    from jquant.models.attention import attention_hook  # pylint: disable=import-outside-toplevel
    from pallas_kernels import attention_ref as ar  # pylint: disable=import-outside-toplevel

    def hook(q, k, v, mask, implementation):
        del implementation
        return None if mask is not None else ar.integer_pv_attention(q, k, v, p_levels=p_levels).astype(q.dtype)

    with attention_hook(hook):
        yield


#: Attention recipes given by name rather than as `quantized_attention` arguments.
NAMED_ATTENTION = {
    "bf16": bf16_attention,
    "per_tensor_fp8": per_tensor_fp8_attention,
    "integer_pv": integer_pv_attention,
    "integer_pv_127": functools.partial(integer_pv_attention, 127),
}
INTEGER_PV = "W8A8 + int8 Q K^T / P x 255, int8 V (emulated), K per tile"
INTEGER_PV_127 = "W8A8 + int8 Q K^T / P x 127, int8 V (emulated), K per tile"


def velocity_fn(
    model: Any,
    act: str | None,
    attention: dict | str | None,
    params: Any,
    x: jax.Array,
    t: jax.Array,
    cond: jax.Array,
    step: Any,
) -> jax.Array:
    """Sampler model_fn: the tiny Wan velocity under the recipe's linear and attention contexts.

    ``attention``: None (fp32), a :data:`NAMED_ATTENTION` name or the `quantized_attention` arguments;
    ``step`` is the step_data row: a bool scalar switching quantized attention per step, or None.
    """
    from jquant.models.tiny_wan import velocity  # pylint: disable=import-outside-toplevel

    with contextlib.ExitStack() as stack:
        if isinstance(attention, str):
            stack.enter_context(NAMED_ATTENTION[attention]())
        elif attention is not None:
            stack.enter_context(quantized_attention(True if step is None else step, **attention))
        if act is not None:
            stack.enter_context(jquant.nn.quantized(act=act))
        return velocity(model, params, x, t, cond)


def recipes(steps: int, float_last: int) -> list[dict[str, Any]]:
    fp8 = dict(qk_format="int8", pv_format="fp8_e4m3", k_scales="token")
    bf16 = dict(qk_format="int8", pv_format="bf16", k_scales="token")
    return [
        dict(name="fp32", weights=None, act=None, attention=None),
        dict(name="W8A8", weights="int8", act="int8/token", attention=None),
        dict(name="W8A8 + bf16 attn", weights="int8", act="int8/token", attention="bf16"),
        dict(name="W8A8 + qattn int8/fp8", weights="int8", act="int8/token", attention=fp8),
        dict(name="W8A8 + qattn int8/bf16", weights="int8", act="int8/token", attention=bf16),
        dict(
            name=f"W8A8 + qattn int8/fp8, float last {float_last}",
            weights="int8",
            act="int8/token",
            attention=fp8,
            step_data=step_schedule(steps, float_last=float_last),
        ),
        dict(
            name="W8A8 + qattn int8/fp8, K per tile, no Hadamard",
            weights="int8",
            act="int8/token",
            attention={**fp8, "k_scales": "block", "hadamard": False},
        ),
        dict(
            name="W8A8 + qattn int8/bf16, K per tile",
            weights="int8",
            act="int8/token",
            attention={**bf16, "k_scales": "block"},
        ),
        dict(
            name="W8A8 + qattn int8/fp8, K per tile",
            weights="int8",
            act="int8/token",
            attention={**fp8, "k_scales": "block"},
        ),
        dict(
            name="W8A8 + qattn int8/bf16, K per tile, no Hadamard",
            weights="int8",
            act="int8/token",
            attention={**bf16, "k_scales": "block", "hadamard": False},
        ),
        dict(name="W8A8 + per-tensor FP8 attn", weights="int8", act="int8/token", attention="per_tensor_fp8"),
        dict(name=INTEGER_PV, weights="int8", act="int8/token", attention="integer_pv"),
        dict(name=INTEGER_PV_127, weights="int8", act="int8/token", attention="integer_pv_127"),
        dict(name="fp32 + qattn int8/fp8", weights=None, act=None, attention=fp8),
        dict(name="fp32 + qattn int8/fp8, no Hadamard", weights=None, act=None, attention={**fp8, "hadamard": False}),
    ]


def header() -> dict[str, str]:
    """The JSON's provenance: benchmark, command, device, JAX version, date."""
    return {
        "benchmark": "attention_quality",
        "command": " ".join(["python", "scripts/attention_quality.py", *sys.argv[1:]]),
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run(clips: int, steps: int, seed: int, float_last: int, only: tuple[str, ...] = ()) -> dict[str, Any]:
    from jquant import models  # pylint: disable=import-outside-toplevel
    from jquant.models import tiny_wan as tw  # pylint: disable=import-outside-toplevel

    bundle = tw.load_tiny(tw.ASSET_DIR)
    roles = models.layer_roles(bundle.config, bundle.params)
    sampling = bundle.meta["sampling"]
    labels = jnp.arange(clips) % tw.NUM_CLASSES
    x_T = jax.random.normal(jax.random.key(seed), bundle.latent_shape(clips), jnp.float32)
    text, uncond = bundle.text(labels), bundle.null_text(clips)
    rows, reference = [], None
    kept = ("fp32", "W8A8 + bf16 attn")  # the reference and the baseline every drop is against
    chosen = [r for r in recipes(steps, float_last) if not only or r["name"] in kept + only]
    for recipe in chosen:
        params = (
            bundle.params
            if recipe["weights"] is None
            else pol.uniform(recipe["weights"]).quantize(bundle.params, roles)
        )
        fn = Partial(functools.partial(velocity_fn, bundle.model, recipe["act"], recipe["attention"]), params)
        t0 = time.perf_counter()
        latents = sample_flow_euler(
            fn,
            x_T,
            text,
            num_steps=steps,
            shift=float(sampling["shift"]),
            guidance_scale=float(sampling["guidance_scale"]),
            uncond=uncond,
            step_data=recipe.get("step_data"),
        )
        video = np.asarray(jax.block_until_ready(tw.latents_to_clips(latents)))[..., None]  # [B, F, H, W, 1]
        seconds = time.perf_counter() - t0
        if reference is None:
            reference = video
        metrics = compare_videos(reference, video, feature_extractors={}) if video is not reference else {}
        rows.append(
            {
                "recipe": recipe["name"],
                "attention": recipe["attention"],
                "psnr": metrics.get("psnr"),
                "ssim": metrics.get("ssim"),
                "flicker": metrics.get("flicker"),
                "warp_error_delta": metrics.get("warp_error_delta"),
                "accuracy": tw.sample_accuracy(
                    bundle.classifier, bundle.classifier_params, jnp.asarray(video[..., 0]), labels
                ),
                "seconds": seconds,
            }
        )
        print(
            f"{recipe['name']:42s} PSNR {rows[-1]['psnr'] or float('inf'):7.2f} dB  "
            f"flicker {rows[-1]['flicker'] or 0.0:.2e}  acc {rows[-1]['accuracy']:.2f}  ({seconds:.0f} s)",
            flush=True,
        )
    by_name = {r["recipe"]: r for r in rows}
    base = by_name["W8A8 + bf16 attn"]
    drops = {
        label: base["psnr"] - by_name[name]["psnr"]
        for label, name in (
            ("fp8", "W8A8 + qattn int8/fp8"),
            ("bf16", "W8A8 + qattn int8/bf16"),
            ("fp8_float_last", f"W8A8 + qattn int8/fp8, float last {float_last}"),
            ("per_tensor_fp8", "W8A8 + per-tensor FP8 attn"),
            ("bf16_k_tile", "W8A8 + qattn int8/bf16, K per tile"),
            ("fp8_k_tile", "W8A8 + qattn int8/fp8, K per tile"),
            ("integer_pv_k_tile", INTEGER_PV),
            ("integer_pv_127_k_tile", INTEGER_PV_127),
        )
        if name in by_name
    }
    flicker = {
        label: by_name[name]["flicker"] / base["flicker"] - 1.0
        for label, name in (
            ("fp8", "W8A8 + qattn int8/fp8"),
            ("bf16", "W8A8 + qattn int8/bf16"),
            ("bf16_k_tile", "W8A8 + qattn int8/bf16, K per tile"),
            ("fp8_k_tile", "W8A8 + qattn int8/fp8, K per tile"),
            ("integer_pv_k_tile", INTEGER_PV),
            ("integer_pv_127_k_tile", INTEGER_PV_127),
        )
        if name in by_name
    }
    return {
        **header(),
        "clips": clips,
        "steps": steps,
        "seed": seed,
        "guidance_scale": float(sampling["guidance_scale"]),
        "reference": "fp32 weights and activations, float attention, same noise",
        "rows": rows,
        **{f"psnr_drop_db_{label}": drop for label, drop in drops.items()},
        **{f"flicker_change_{label}": change for label, change in flicker.items()},
        "drops_against": "W8A8 + bf16 attn",
        "target_db": TARGET_DB,
        "target_flicker": TARGET_FLICKER,
        **{
            f"meets_target_{label}": bool(drops[label] <= TARGET_DB and flicker[label] <= TARGET_FLICKER)
            for label in flicker
        },
    }


def operator_variants() -> dict[str, Any]:
    """name -> fn(q, k, v): every jquant attention variant the policy offers, and per-tensor FP8."""
    from pallas_kernels import attention_ref as ar  # pylint: disable=import-outside-toplevel

    def jq(**kw):
        return lambda q, k, v: ar.quant_attention_reference(q, k, v, **kw)

    variants = {"per-tensor FP8 (cuDNN-style)": lambda q, k, v: ar.per_tensor_fp8_attention(q, k, v)}
    for qk in ("int8", "fp8_e4m3"):
        for pv in ("bf16", "fp8_e4m3"):
            for had in (True, False):
                name = f"jquant {qk.split('_')[0]}/{pv.split('_')[0]}{'' if had else ', no Hadamard'}"
                variants[name] = jq(qk_format=qk, pv_format=pv, hadamard=had)
    variants["jquant int8/fp8, K per tile, no Hadamard"] = jq(pv_format="fp8_e4m3", k_scales="block", hadamard=False)
    variants["jquant int8/bf16, K per tile (the default)"] = jq(pv_format="bf16", k_scales="block", hadamard=True)
    variants["jquant int8/fp8, K per tile"] = jq(pv_format="fp8_e4m3", k_scales="block", hadamard=True)
    variants["int8 Q K^T / P x 255, int8 V, K per tile (emulated)"] = ar.integer_pv_attention
    variants["int8 Q K^T / P x 127, int8 V, K per tile (emulated)"] = functools.partial(
        ar.integer_pv_attention, p_levels=127
    )
    return variants


def operator_error(
    tokens: int, heads: int, head_dim: int, seeds: int, variants: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Relative L2 error of each variant's output against exact fp32 attention, mean over ``seeds``,
    for each input kind; with the mean largest probability per row (how sharp the maps are).
    ``variants``: name -> fn(q, k, v), default :func:`operator_variants`."""
    from pallas_kernels import attention_ref as ar  # pylint: disable=import-outside-toplevel

    variants = operator_variants() if variants is None else variants
    rows = []
    for kind in ar.INPUT_KINDS:
        errors: dict[str, list[float]] = {}
        peak = []
        for seed in range(seeds):
            q, k, v = ar.sample_inputs(jax.random.key(seed), 1, tokens, tokens, heads, head_dim, kind=kind)
            exact = ar.exact_attention(q, k, v)
            peak.append(float(jnp.mean(jnp.max(ar.attention_probabilities(q, k), axis=-1))))
            for name, fn in variants.items():
                errors.setdefault(name, []).append(ar.relative_l2(jax.jit(fn)(q, k, v), exact))
        for name, errs in errors.items():
            rows.append(
                {"inputs": kind, "variant": name, "rel_l2": float(np.mean(errs)), "mean_max_p": float(np.mean(peak))}
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float-last", type=int, default=2, help="float-attention steps at the end (switch row)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON to write (default benchmarks/attention_quality.json; with --only, attention_quality_partial.json,"
        " so a partial run never replaces the full table)",
    )
    p.add_argument("--only", default="", help="semicolon list of recipe names to run (with fp32 and W8A8 + bf16 attn)")
    p.add_argument("--no-operator-error", action="store_true", help="skip the operator-error table")
    p.add_argument("--op-tokens", type=int, default=1024, help="tokens of the operator-error inputs")
    p.add_argument("--op-seeds", type=int, default=3, help="input draws averaged in the operator-error table")
    p.add_argument("--op-heads", type=int, default=4, help="heads of the operator-error inputs")
    p.add_argument("--op-variants", default="", help="semicolon list of operator-error variants (default: all)")
    p.add_argument(
        "--operator-only", action="store_true", help="only the operator-error table (no sampling; needs --out)"
    )
    a = p.parse_args(argv)
    only = tuple(n.strip() for n in a.only.split(";") if n.strip())
    names = {r["name"] for r in recipes(a.steps, a.float_last)}
    unknown = [n for n in only if n not in names]
    if unknown:
        p.error(f"--only: unknown recipe(s) {unknown}; choose from {sorted(names)}")
    variants = operator_variants()
    chosen = [n.strip() for n in a.op_variants.split(";") if n.strip()]
    missing = [n for n in chosen if n not in variants]
    if missing:
        p.error(f"--op-variants: unknown variant(s) {missing}; choose from {sorted(variants)}")
    if a.operator_only and (a.no_operator_error or a.out is None):
        p.error("--operator-only needs the operator-error table and an --out file (it must not replace the full table)")
    if chosen:
        variants = {n: variants[n] for n in chosen}
    if a.operator_only:
        result = header()
    else:
        result = run(a.clips, a.steps, a.seed, a.float_last, only)
    if not a.no_operator_error:
        result["operator_error"] = operator_error(a.op_tokens, a.op_heads, 64, a.op_seeds, variants)
        result["operator_error_shape"] = {"batch": 1, "tokens": a.op_tokens, "heads": a.op_heads, "head_dim": 64}
    for row in result.get("operator_error", []):
        print(
            f"{row['inputs']:9s} {row['variant']:42s} rel L2 {row['rel_l2']:.4f}  (mean max p {row['mean_max_p']:.3f})"
        )
    if a.out is None:
        name = "attention_quality_partial.json" if only else "attention_quality.json"
        a.out = Path(__file__).resolve().parents[1] / "benchmarks" / name
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    drops = ", ".join(
        f"{k[len('psnr_drop_db_') :]} {v:.2f} dB" for k, v in result.items() if k.startswith("psnr_drop_db_")
    )
    if drops:
        print(f"PSNR drop against W8A8 + bf16 attention (target <= {TARGET_DB} dB): {drops}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
