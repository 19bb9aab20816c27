#!/usr/bin/env python3
"""One denoising step of a Wan2.1-1.3B-sized model: bf16 + cuDNN attention against W8A8 + quantized attention.

The published Wan2.1-T2V-1.3B config with synthetic weights (``scripts/bench_wan_forward.py``'s
generator), one jitted forward (= one flow-matching step without CFG) at 480x832, 81 frames
(32,760 tokens, 512 text tokens, batch 1). Variants:

* ``bf16``: bf16 weights and activations, attention ``cudnn`` (``xla`` off GPU);
* ``w8a8``: int8 weights (per output channel; embedders, modulation and the output head stay
  bf16, as in ``jquant demo``) and dynamic int8 per-token activations through
  ``jquant.nn.quantized(act="int8/token")``, attention as ``bf16``;
* ``w8a8-qattn-bf16`` / ``w8a8-qattn-fp8``: W8A8 plus quantized attention on every layer
  (``jquant.attention.quantized_attention``: int8 Q K^T with smoothed, Hadamard-rotated K;
  P V in bf16 or fp8);
* ``bf16-qattn-fp8``: quantized attention alone.

For each: median wall time of the compiled step over ``--runs`` runs after ``--warmup``, compile
time, weight bytes (QArrays counted packed) and XLA's memory analysis of the compiled step
(argument, output and temporary bytes). Writes ``benchmarks/e2e-<device>.json`` after every
variant (and a copy under ``$OUT`` when set).

    PYTHONPATH=. python3 scripts/bench_e2e.py                # GPU
    PYTHONPATH=. python3 scripts/bench_e2e.py --tiny         # CPU smoke test (toy config)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jquant.nn  # noqa: E402
from jquant import models  # noqa: E402
from jquant.attention import quantized_attention  # noqa: E402
from jquant.pipeline import policy as pol  # noqa: E402
from jquant.pipeline.runtime import tree_bytes as weight_bytes  # noqa: E402
from jquant.models import wan  # noqa: E402

_WAN_FORWARD = Path(__file__).resolve().parent / "bench_wan_forward.py"
_spec = importlib.util.spec_from_file_location("bench_wan_forward", _WAN_FORWARD)
wan_forward = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wan_forward)

TINY_CONFIG = dataclasses.replace(wan_forward.TINY_CONFIG, attention_head_dim=64)
VARIANTS: dict[str, dict[str, Any]] = {
    "bf16": dict(weights=None, act=None, attention=None),
    "w8a8": dict(weights="int8", act="int8/token", attention=None),
    "w8a8-qattn-bf16": dict(weights="int8", act="int8/token", attention=dict(pv_format="bf16")),
    "w8a8-qattn-fp8": dict(weights="int8", act="int8/token", attention=dict(pv_format="fp8_e4m3")),
    "bf16-qattn-fp8": dict(weights=None, act=None, attention=dict(pv_format="fp8_e4m3")),
    "w8a8-qattn-bf16-kblock": dict(weights="int8", act="int8/token",
                                   attention=dict(pv_format="bf16", k_scales="block", hadamard=False)),
    "w8a8-qattn-fp8-kblock": dict(weights="int8", act="int8/token",
                                  attention=dict(pv_format="fp8_e4m3", k_scales="block", hadamard=False)),
    "bf16-qattn-fp8-kblock": dict(weights=None, act=None,
                                  attention=dict(pv_format="fp8_e4m3", k_scales="block", hadamard=False)),
    "bf16-qattn-fp8-nohad": dict(weights=None, act=None, attention=dict(pv_format="fp8_e4m3", hadamard=False)),
}
DEFAULT_VARIANTS = ("bf16", "w8a8", "w8a8-qattn-bf16", "w8a8-qattn-fp8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="2-layer toy config and a small video (CPU smoke test)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--frames", type=int, default=None, help="video frames (default 81; tiny: 5)")
    p.add_argument("--height", type=int, default=None, help="pixels (default 480; tiny: 32)")
    p.add_argument("--width", type=int, default=None, help="pixels (default 832; tiny: 48)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=150.0, help="skip variants started after this")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks")
    args = p.parse_args(argv)
    frames, height, width = (5, 32, 48) if args.tiny else (81, 480, 832)
    args.frames = args.frames or frames
    args.height = args.height or height
    args.width = args.width or width
    args.variants = args.variants.split(",")
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r}; choose from {list(VARIANTS)}")
    return args


def step_fn(model: Any, act: str | None, attention: dict | None):
    """The jitted step: model.apply under the variant's linear and attention contexts."""

    def step(params, x, t, text):
        with contextlib.ExitStack() as stack:
            if attention is not None:
                stack.enter_context(quantized_attention(**attention))
            if act is not None:
                stack.enter_context(jquant.nn.quantized(act=act))
            return model.apply({"params": params}, x, t, text)

    return jax.jit(step)


def _memory(compiled: Any) -> dict[str, int | None]:
    try:
        m = compiled.memory_analysis()
    except Exception:  # pylint: disable=broad-except  (not every backend reports it)
        return {}
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {k: int(getattr(m, k)) for k in keys if getattr(m, k, None) is not None}


def time_variant(name: str, model: Any, params_bf16: Any, roles: dict, inputs: tuple, args) -> dict[str, Any]:
    spec = VARIANTS[name]
    params = params_bf16 if spec["weights"] is None else pol.uniform(spec["weights"]).quantize(params_bf16, roles)
    fn = step_fn(model, spec["act"], spec["attention"])
    t0 = time.perf_counter()
    compiled = fn.lower(params, *inputs).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        out = jax.block_until_ready(compiled(params, *inputs))
    times_ms = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(params, *inputs))
        times_ms.append((time.perf_counter() - t0) * 1e3)
    if not bool(jnp.isfinite(out.astype(jnp.float32)).all()):
        raise RuntimeError(f"{name}: the step produced non-finite values")
    return {
        "variant": name, "weights": spec["weights"], "act": spec["act"], "attention": spec["attention"],
        "time_ms": statistics.median(times_ms), "times_ms": times_ms, "compile_s": compile_s,
        "weight_bytes": weight_bytes(params), "memory": _memory(compiled),
        "output": out,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = TINY_CONFIG if args.tiny else wan.WAN21_T2V_1_3B
    device = jax.devices()[0]
    attn_impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    start = time.perf_counter()
    model = wan.PORT.module(config, dtype=jnp.bfloat16).clone(attention_impl=attn_impl)
    params = jax.tree_util.tree_map(jnp.asarray, wan_forward.synthetic_params(config, args.seed))
    roles = models.layer_roles(config, params)
    shape = wan_forward.latent_shape(config, args.frames, args.height, args.width)
    pt, ph, pw = config.patch_size
    tokens = (shape[2] // pt) * (shape[3] // ph) * (shape[4] // pw)
    k1, k2 = jax.random.split(jax.random.key(args.seed))
    inputs = (jax.random.normal(k1, shape, jnp.bfloat16), jnp.array([999.0], jnp.float32),
              jax.random.normal(k2, (1, args.text_len, config.text_dim), jnp.bfloat16))
    result = {
        "benchmark": "e2e_step",
        "command": " ".join(["python", "scripts/bench_e2e.py", *sys.argv[1:]]),
        "device": device.device_kind, "platform": device.platform, "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "tiny" if args.tiny else "Wan2.1-T2V-1.3B (synthetic weights)",
        "param_count": models.param_count(params), "float_attention": attn_impl,
        "video": {"frames": args.frames, "height": args.height, "width": args.width},
        "latent_shape": list(shape), "tokens": tokens, "text_len": args.text_len, "rows": [],
    }
    paths = [args.out_dir / f"e2e-{'tiny-' if args.tiny else ''}{wan_forward.device_slug(device)}.json"]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / paths[0].name)

    def save() -> None:
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(result, indent=1) + "\n")

    baseline, baseline_out = None, None
    for name in args.variants:
        row: dict[str, Any] = {"variant": name}
        if time.perf_counter() - start > args.deadline_s:
            row["skipped"] = "deadline"
        else:
            try:
                row = time_variant(name, model, params, roles, inputs, args)
                out = row.pop("output").astype(jnp.float32)
                if baseline is None and name == "bf16":
                    baseline, baseline_out = row["time_ms"], out
                if baseline is not None:
                    row["speedup_vs_bf16"] = baseline / row["time_ms"]
                    row["rel_l2_vs_bf16"] = float(jnp.linalg.norm(out - baseline_out) / jnp.linalg.norm(baseline_out))
            except Exception as e:  # pylint: disable=broad-except
                row["error"] = f"{type(e).__name__}: {e}"[:3000]
                row["traceback"] = traceback.format_exc()[-4000:]
        result["rows"].append(row)
        save()
        if "time_ms" in row:
            extra = f"  x{row['speedup_vs_bf16']:.2f} vs bf16" if "speedup_vs_bf16" in row else ""
            temp = row["memory"].get("temp_size_in_bytes")
            print(f"{name:18s} {row['time_ms']:9.1f} ms  weights {row['weight_bytes'] / 2**20:8.1f} MiB  temp "
                  f"{'n/a' if temp is None else f'{temp / 2**20:.1f} MiB'}  compile {row['compile_s']:.0f} s{extra}",
                  flush=True)
        else:
            print(f"{name:18s} {row.get('skipped') or row.get('error', '')[:300]}", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    return run(args)


if __name__ == "__main__":
    main()
