"""Time one jitted bf16 forward step of each Models II port at its published full size.

For HunyuanVideo, CogVideoX-5B, Mochi-1, LTX-Video and LTX-2 the published config gets random
bf16 weights made on the device (`jax.eval_shape` of the module's init for the shapes, then
`jax.random` per tensor, drawn flat: no checkpoint on disk, no full init compile),
then one jitted forward (batch 1, no CFG) runs at a native resolution and frame count of the model:

| model | video | latent (C, F, H, W) | video tokens | text tokens |
|---|---|---|---|---|
| HunyuanVideo 13B | 544x960, 61 frames (VAE 4x/8x) | 16, 16, 68, 120 | 32,640 | 256 |
| CogVideoX-5B | 480x720, 49 frames (4x/8x) | 16, 13, 60, 90 | 17,550 | 226 |
| Mochi-1 10B | 480x848, 85 frames (6x/8x) | 12, 15, 60, 106 | 23,850 | 256 |
| LTX-Video 2B | 480x704, 161 frames (8x/32x) | 128, 21, 15, 22 | 6,930 | 128 |
| LTX-2 19B | 512x768, 121 frames at 24 fps (8x/32x) + 126 audio latents | 128, 16, 16, 24 | 6,144 | 1,024 (x2) |

HunyuanVideo and Mochi are run below their 720p / 163-frame maxima to keep the whole script
within a few GPU minutes (attention dominates there: cost grows with tokens squared); all text
tokens are real (no masks), so cuDNN's fused attention applies everywhere. Reports the median
time, compile time, XLA's memory analysis of the compiled forward (params + inputs + temporaries)
and the process's peak device memory, in benchmarks/models_forward-<device>.json.

    python scripts/bench_models_forward.py                       # all five, GPU, cuDNN attention
    python scripts/bench_models_forward.py --models ltx_video mochi --attn xla
    python scripts/bench_models_forward.py --tiny                # CPU smoke test (2-layer configs)

Run from the repository root: ``python scripts/bench_models_forward.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/bench_models_forward.py`` where jquant is not installed (e.g. the GPU machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import math
import re
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

from jquant import models
from jquant.models import cogvideox, hunyuan_video, ltx2, ltx_video, mochi

BF16 = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Bench:
    """One model: published and tiny configs, the video it stands for, and its forward inputs.

    `inputs(cfg, tiny, key)` -> (array kwargs, static kwargs, info) for `module.apply`.
    """

    label: str
    config: Any
    tiny_config: Any
    video: str
    inputs: Callable[[Any, bool, jax.Array], tuple[dict[str, jax.Array], dict[str, Any], dict[str, Any]]]


def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(key, shape, BF16)


def hunyuan_inputs(cfg: hunyuan_video.HunyuanVideoConfig, tiny: bool, key: jax.Array):
    f, h, w, text = (2, 8, 12, 8) if tiny else (16, 68, 120, 256)
    k = jax.random.split(key, 3)
    arrays = {
        "hidden_states": _normal(k[0], (1, cfg.in_channels, f, h, w)),
        "timestep": jnp.array([999.0], jnp.float32),
        "encoder_hidden_states": _normal(k[1], (1, text, cfg.text_embed_dim)),
        "pooled_projections": _normal(k[2], (1, cfg.pooled_projection_dim)),
        "guidance": jnp.array([6000.0], jnp.float32),
    }
    tokens = f // cfg.patch_size_t * (h // cfg.patch_size) * (w // cfg.patch_size)
    return (
        arrays,
        {"encoder_attention_mask": None},
        {"latent_shape": [1, cfg.in_channels, f, h, w], "tokens": tokens, "text_len": text},
    )


def cogvideox_inputs(cfg: cogvideox.CogVideoXConfig, tiny: bool, key: jax.Array):
    f, h, w, text = (2, 8, 12, 8) if tiny else (13, 60, 90, 226)
    k = jax.random.split(key, 2)
    arrays = {
        "hidden_states": _normal(k[0], (1, f, cfg.in_channels, h, w)),
        "encoder_hidden_states": _normal(k[1], (1, text, cfg.text_embed_dim)),
        "timestep": jnp.array([999], jnp.int32),
    }
    tokens = f * (h // cfg.patch_size) * (w // cfg.patch_size)
    return arrays, {}, {"latent_shape": [1, f, cfg.in_channels, h, w], "tokens": tokens, "text_len": text}


def mochi_inputs(cfg: mochi.MochiConfig, tiny: bool, key: jax.Array):
    f, h, w, text = (2, 8, 12, 8) if tiny else (15, 60, 106, 256)
    k = jax.random.split(key, 2)
    arrays = {
        "hidden_states": _normal(k[0], (1, cfg.in_channels, f, h, w)),
        "encoder_hidden_states": _normal(k[1], (1, text, cfg.text_embed_dim)),
        "timestep": jnp.array([500.0], jnp.float32),
    }
    tokens = f * (h // cfg.patch_size) * (w // cfg.patch_size)
    return (
        arrays,
        {"encoder_attention_mask": None},
        {"latent_shape": [1, cfg.in_channels, f, h, w], "tokens": tokens, "text_len": text},
    )


def ltx_inputs(cfg: ltx_video.LTXVideoConfig, tiny: bool, key: jax.Array):
    f, h, w, text = (2, 3, 4, 8) if tiny else (21, 15, 22, 128)
    k = jax.random.split(key, 2)
    arrays = {
        "hidden_states": _normal(k[0], (1, f * h * w, cfg.in_channels)),
        "encoder_hidden_states": _normal(k[1], (1, text, cfg.caption_channels)),
        "timestep": jnp.array([999.0], jnp.float32),
    }
    static = {"num_frames": f, "height": h, "width": w, "rope_interpolation_scale": (8 / 25, 32, 32)}
    return arrays, static, {"latent_shape": [1, cfg.in_channels, f, h, w], "tokens": f * h * w, "text_len": text}


def ltx2_inputs(cfg: ltx2.LTX2Config, tiny: bool, key: jax.Array):
    f, h, w, audio, text = (2, 3, 4, 5, 8) if tiny else (16, 16, 24, 126, 1024)
    k = jax.random.split(key, 4)
    arrays = {
        "hidden_states": _normal(k[0], (1, f * h * w, cfg.in_channels)),
        "audio_hidden_states": _normal(k[1], (1, audio, cfg.audio_in_channels)),
        "encoder_hidden_states": _normal(k[2], (1, text, cfg.caption_channels)),
        "audio_encoder_hidden_states": _normal(k[3], (1, text, cfg.caption_channels)),
        "timestep": jnp.array([999.0], jnp.float32),
        "sigma": jnp.array([999.0], jnp.float32),
    }
    static = {"num_frames": f, "height": h, "width": w, "fps": 24.0, "audio_num_frames": audio}
    info = {"latent_shape": [1, cfg.in_channels, f, h, w], "tokens": f * h * w, "audio_tokens": audio, "text_len": text}
    return arrays, static, info


TINY = dict(num_attention_heads=2, num_layers=2)
BENCHES: dict[str, Bench] = {
    "hunyuan_video": Bench(
        "HunyuanVideo T2V 13B",
        hunyuan_video.HUNYUAN_VIDEO_T2V,
        hunyuan_video.HunyuanVideoConfig(
            **TINY,
            attention_head_dim=16,
            num_single_layers=1,
            num_refiner_layers=1,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(4, 6, 6),
        ),
        "544x960, 61 frames",
        hunyuan_inputs,
    ),
    "cogvideox": Bench(
        "CogVideoX-5B",
        cogvideox.COGVIDEOX_5B,
        cogvideox.CogVideoXConfig(
            **TINY, attention_head_dim=16, time_embed_dim=16, text_embed_dim=16, use_rotary_positional_embeddings=True
        ),
        "480x720, 49 frames",
        cogvideox_inputs,
    ),
    "mochi": Bench(
        "Mochi-1 preview 10B",
        mochi.MOCHI_1_PREVIEW,
        mochi.MochiConfig(
            **TINY, attention_head_dim=16, pooled_projection_dim=16, text_embed_dim=16, time_embed_dim=16
        ),
        "480x848, 85 frames",
        mochi_inputs,
    ),
    "ltx_video": Bench(
        "LTX-Video 2B",
        ltx_video.LTX_VIDEO_2B,
        ltx_video.LTXVideoConfig(
            **TINY, attention_head_dim=16, cross_attention_dim=32, in_channels=8, out_channels=8, caption_channels=16
        ),
        "480x704, 161 frames",
        ltx_inputs,
    ),
    "ltx2": Bench(
        "LTX-2 19B (audio+video)",
        ltx2.LTX2_19B,
        ltx2.LTX2Config(
            **TINY,
            attention_head_dim=16,
            cross_attention_dim=32,
            in_channels=8,
            out_channels=8,
            audio_in_channels=8,
            audio_out_channels=8,
            audio_num_attention_heads=2,
            audio_attention_head_dim=8,
            audio_cross_attention_dim=16,
            caption_channels=16,
        ),
        "512x768, 121 frames at 24 fps, with audio",
        ltx2_inputs,
    ),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models", nargs="+", choices=sorted(BENCHES), default=list(BENCHES), help="which models (default: all)"
    )
    p.add_argument("--tiny", action="store_true", help="2-layer toy configs and small videos (CPU smoke test)")
    p.add_argument(
        "--attn",
        choices=("cudnn", "xla"),
        default=None,
        help="attention implementation (default: cudnn on GPU, xla elsewhere)",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks")
    args = p.parse_args(argv)
    args.attn = args.attn or ("cudnn" if jax.default_backend() == "gpu" else "xla")
    return args


def _bucket(n: int) -> int:
    """The power of two at or above ``n``: the length a tensor's random numbers are drawn at."""
    return 1 << max(n - 1, 0).bit_length()


@functools.partial(jax.jit, static_argnums=1)
def _normal_flat(key: jax.Array, size: int, scale: jax.Array) -> jax.Array:
    return jax.random.normal(key, (size,), BF16) * scale


@functools.partial(jax.jit, static_argnums=1)
def _first(flat: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return flat[: math.prod(shape)].reshape(shape)


def _random_leaf(key: jax.Array, shape: tuple[int, ...], kind: str) -> jax.Array:
    """Ones, zeros, or ``jax.random.normal(key, shape, bf16) / sqrt(fan)``, bit for bit, as the first
    numbers of a flat draw of the next power-of-two length (threefry's counter is each element's
    flat index): one compiled random program per length, not one per tensor shape (the tiny
    configs' shapes took most of the --tiny run's CPU compiles)."""
    if kind == "ones":
        return jnp.ones(shape, BF16)
    if kind == "zeros":
        return jnp.zeros(shape, BF16)
    fan = shape[0] if kind == "kernel" else shape[-1]
    return _first(_normal_flat(key, _bucket(math.prod(shape)), jnp.asarray(fan**-0.5, BF16)), shape)


def random_params(config: Any, key: jax.Array) -> dict[str, Any]:
    """bf16 weights with the port's shapes (`jax.eval_shape`), made on the device one tensor at a
    time (one random program per power-of-two length): kernels ~ N(0, 1/fan_in), norm scales 1,
    biases 0, other tables (modulation, positions) ~ N(0, 1/width)."""

    def make(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = path[-1].key
        kind = {"scale": "ones", "bias": "zeros", "kernel": "kernel"}.get(name, "table")
        digest = zlib.crc32(jax.tree_util.keystr(path).encode())
        return _random_leaf(jax.random.fold_in(key, digest), tuple(leaf.shape), kind)

    return jax.tree_util.tree_map_with_path(make, models.param_shapes(config))


def memory_analysis(compiled: Any) -> dict[str, int | None]:
    """XLA's static memory accounting of the compiled forward (None where the backend has none)."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):  # some backends do not implement it
        stats = None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    out = {f: (getattr(stats, f, None) if stats is not None else None) for f in fields}
    sizes = [out[f] for f in fields[:3]]
    out["forward_bytes"] = None if any(s is None for s in sizes) else sum(sizes) - (out["alias_size_in_bytes"] or 0)
    return out


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    bench = BENCHES[name]
    config = bench.tiny_config if args.tiny else bench.config
    port = models.port_for_config(config)
    key_params, key_inputs = jax.random.split(jax.random.fold_in(jax.random.key(args.seed), len(name)))
    t0 = time.perf_counter()
    params = jax.block_until_ready(random_params(config, key_params))
    init_s = time.perf_counter() - t0
    arrays, static, info = bench.inputs(config, args.tiny, key_inputs)
    model = port.module(config, BF16).clone(attention_impl=args.attn)
    forward = jax.jit(lambda p, a: model.apply({"params": p}, **a, **static))
    t0 = time.perf_counter()
    compiled = forward.lower(params, arrays).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(params, arrays))
    times_ms = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(params, arrays))
        times_ms.append((time.perf_counter() - t0) * 1e3)
    finite = all(bool(jnp.isfinite(o.astype(jnp.float32)).all()) for o in jax.tree.leaves(out))
    stats = jax.devices()[0].memory_stats() or {}
    result = {
        "model": bench.label + (" (tiny)" if args.tiny else ""),
        "class": config.CLASS_NAME,
        "config": config.to_diffusers(),
        "param_count": models.param_count(params),
        "video": bench.video if not args.tiny else "tiny",
        **info,
        "time_ms": statistics.median(times_ms),
        "times_ms": times_ms,
        "compile_s": compile_s,
        "init_s": init_s,
        "output_finite": finite,
        **memory_analysis(compiled),
        "process_peak_bytes_in_use": stats.get("peak_bytes_in_use"),
    }
    del params, arrays, out, compiled
    gc.collect()
    return result


def device_slug(device: jax.Device) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-") or device.platform


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = jax.devices()[0]
    results = {}
    start = time.perf_counter()
    for name in args.models:
        r = results[name] = run_one(name, args)
        mem = r["forward_bytes"]
        print(
            f"{r['model']}: {r['tokens']} video tokens, median {r['time_ms']:.1f} ms (compile {r['compile_s']:.1f} s, "
            f"init {r['init_s']:.1f} s), forward memory {'n/a' if mem is None else f'{mem / 2**30:.2f} GiB'}"
            f"{'' if r['output_finite'] else ', NON-FINITE output'} [{time.perf_counter() - start:.0f} s so far]",
            flush=True,
        )
    report = {
        "benchmark": "models_forward",
        "command": " ".join(["python", "scripts/bench_models_forward.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": "bfloat16",
        "attention": args.attn,
        "batch": 1,
        "total_s": time.perf_counter() - start,
        "results": results,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"models_forward-{'tiny-' if args.tiny else ''}{device_slug(device)}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {path}")
    return report


if __name__ == "__main__":
    main()
