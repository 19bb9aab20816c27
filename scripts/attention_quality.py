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
* ``fp32 + qattn``: float weights, quantized attention alone.

Reports PSNR, SSIM and temporal flicker against fp32 (``jquant.metrics.compare_videos``) and the
bundled classifier's accuracy, and checks the target: quantized attention on every step keeps
PSNR within 1 dB of the same recipe with bf16 attention. Off Hopper quantized attention runs
its plain-JAX reference (same quantization). Writes ``benchmarks/attention_quality.json``.

    python scripts/attention_quality.py [--clips 10] [--steps 20]

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

TARGET_DB = 1.0


@contextlib.contextmanager
def bf16_attention():
    """Attention of the Wan blocks on bf16 Q, K, V with a bf16 output (scoped patch of the name
    `models.blocks` calls), the float baseline a bf16 deployment has."""
    from jquant.models import blocks  # pylint: disable=import-outside-toplevel

    original = blocks.attention

    def rounded(q, k, v, mask=None, *, implementation=None):
        b16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
        return original(*b16, mask, implementation=implementation).astype(q.dtype)

    blocks.attention = rounded
    try:
        yield
    finally:
        blocks.attention = original


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

    ``attention``: None (fp32), ``"bf16"`` or the `quantized_attention` arguments; ``step`` is
    the step_data row: a bool scalar switching quantized attention per step, or None.
    """
    from jquant.models.tiny_wan import velocity  # pylint: disable=import-outside-toplevel

    with contextlib.ExitStack() as stack:
        if attention == "bf16":
            stack.enter_context(bf16_attention())
        elif attention is not None:
            stack.enter_context(quantized_attention(True if step is None else step, **attention))
        if act is not None:
            stack.enter_context(jquant.nn.quantized(act=act))
        return velocity(model, params, x, t, cond)


def recipes(steps: int, float_last: int) -> list[dict[str, Any]]:
    fp8 = dict(qk_format="int8", pv_format="fp8_e4m3")
    bf16 = dict(qk_format="int8", pv_format="bf16")
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
            name="W8A8 + qattn int8/bf16, K per tile, no Hadamard",
            weights="int8",
            act="int8/token",
            attention={**bf16, "k_scales": "block", "hadamard": False},
        ),
        dict(name="fp32 + qattn int8/fp8", weights=None, act=None, attention=fp8),
        dict(name="fp32 + qattn int8/fp8, no Hadamard", weights=None, act=None, attention={**fp8, "hadamard": False}),
    ]


def run(clips: int, steps: int, seed: int, float_last: int) -> dict[str, Any]:
    from jquant import models  # pylint: disable=import-outside-toplevel
    from jquant.models import tiny_wan as tw  # pylint: disable=import-outside-toplevel

    bundle = tw.load_tiny(tw.ASSET_DIR)
    roles = models.layer_roles(bundle.config, bundle.params)
    sampling = bundle.meta["sampling"]
    labels = jnp.arange(clips) % tw.NUM_CLASSES
    x_T = jax.random.normal(jax.random.key(seed), bundle.latent_shape(clips), jnp.float32)
    text, uncond = bundle.text(labels), bundle.null_text(clips)
    rows, reference = [], None
    for recipe in recipes(steps, float_last):
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
    base = by_name["W8A8 + bf16 attn"]["psnr"]
    drop = base - by_name["W8A8 + qattn int8/fp8"]["psnr"]
    drop_bf16 = base - by_name["W8A8 + qattn int8/bf16"]["psnr"]
    drop_switch = base - by_name[f"W8A8 + qattn int8/fp8, float last {float_last}"]["psnr"]
    return {
        "benchmark": "attention_quality",
        "command": " ".join(["python", "scripts/attention_quality.py", *sys.argv[1:]]),
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "clips": clips,
        "steps": steps,
        "seed": seed,
        "guidance_scale": float(sampling["guidance_scale"]),
        "reference": "fp32 weights and activations, float attention, same noise",
        "rows": rows,
        "psnr_drop_db_fp8": drop,
        "psnr_drop_db_bf16": drop_bf16,
        "psnr_drop_db_fp8_float_last": drop_switch,
        "drops_against": "W8A8 + bf16 attn",
        "target_db": TARGET_DB,
        "meets_target_fp8": bool(drop <= TARGET_DB),
        "meets_target_bf16": bool(drop_bf16 <= TARGET_DB),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float-last", type=int, default=2, help="float-attention steps at the end (switch row)")
    p.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks" / "attention_quality.json"
    )
    a = p.parse_args(argv)
    result = run(a.clips, a.steps, a.seed, a.float_last)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"PSNR drop from quantized attention against W8A8 + bf16 attention (target <= {TARGET_DB} dB): "
        f"int8/bf16 {result['psnr_drop_db_bf16']:.2f} dB, int8/fp8 {result['psnr_drop_db_fp8']:.2f} dB, "
        f"int8/fp8 with float last steps {result['psnr_drop_db_fp8_float_last']:.2f} dB"
    )
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
