"""Time one jitted bf16 forward step of a Wan2.1-1.3B-sized transformer loaded from diffusers layout.

Builds the published Wan2.1-T2V-1.3B config with synthetic weights, writes it as a sharded
diffusers checkpoint, loads it back with `models.load_pretrained(..., dtype=bfloat16)` and times
the forward at 480x832, 81 frames (latent 21x60x104 -> 32,760 tokens, 512 text tokens, batch 1).
Writes benchmarks/wan_forward-<device>.json.

    python scripts/bench_wan_forward.py                 # GPU, cuDNN attention
    python scripts/bench_wan_forward.py --attn xla
    python scripts/bench_wan_forward.py --tiny          # CPU smoke test of the same path

Run from the repository root: ``python scripts/bench_wan_forward.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/bench_wan_forward.py`` where jquant is not installed (e.g. the GPU machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jquant import models
from jquant.models import wan

TINY_CONFIG = wan.WanConfig(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="2-layer toy config and a small video (CPU smoke test)")
    p.add_argument(
        "--attn",
        choices=("cudnn", "xla"),
        default=None,
        help="attention implementation (default: cudnn on GPU, xla elsewhere)",
    )
    p.add_argument("--frames", type=int, default=None, help="video frames (default 81; tiny: 5)")
    p.add_argument("--height", type=int, default=None, help="pixels (default 480; tiny: 32)")
    p.add_argument("--width", type=int, default=None, help="pixels (default 832; tiny: 48)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks")
    args = p.parse_args(argv)
    frames, height, width = (5, 32, 48) if args.tiny else (81, 480, 832)
    args.frames = args.frames or frames
    args.height = args.height or height
    args.width = args.width or width
    args.attn = args.attn or ("cudnn" if jax.default_backend() == "gpu" else "xla")
    return args


def synthetic_params(config: wan.WanConfig, seed: int) -> dict[str, Any]:
    """bf16 numpy weights with the port's shapes and sane scales (kernels ~ N(0, 1/fan_in), norm
    scales 1, biases 0, modulation tables ~ N(0, 1/dim)); filled on the host from one pool of 2^24
    normals read at random offsets (values repeat, which does not matter for timing), no init compile."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(1 << 24, dtype=np.float32)

    def fill(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name = path[-1].key
        if name == "scale":
            x = np.ones(leaf.shape, np.float32)
        elif name == "bias":
            x = np.zeros(leaf.shape, np.float32)
        else:
            fan_in = leaf.shape[0] if name == "kernel" else leaf.shape[-1]
            start = int(rng.integers(pool.size))
            x = np.resize(pool[start:], leaf.shape) * np.float32(fan_in**-0.5)
        return x.astype(ml_dtypes.bfloat16)

    return jax.tree_util.tree_map_with_path(fill, models.param_shapes(config))


def latent_shape(config: wan.WanConfig, frames: int, height: int, width: int) -> tuple[int, ...]:
    """Wan VAE latent of a video: 4x temporal (first frame alone) and 8x spatial compression."""
    return (1, config.in_channels, 1 + (frames - 1) // 4, height // 8, width // 8)


def device_slug(device: jax.Device) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-") or device.platform


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = TINY_CONFIG if args.tiny else wan.WAN21_T2V_1_3B
    device = jax.devices()[0]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt_dir or Path(tmp) / "wan"
        t0 = time.perf_counter()
        models.save_pretrained(ckpt, config, synthetic_params(config, args.seed), max_shard_bytes=1 << 30)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model, params = models.load_pretrained(ckpt, dtype=jnp.bfloat16)
        params = jax.block_until_ready(params)
        load_s = time.perf_counter() - t0
    model = model.clone(attention_impl=args.attn)

    shape = latent_shape(config, args.frames, args.height, args.width)
    pt, ph, pw = config.patch_size
    tokens = (shape[2] // pt) * (shape[3] // ph) * (shape[4] // pw)
    k1, k2 = jax.random.split(jax.random.key(args.seed))
    latents = jax.random.normal(k1, shape, jnp.bfloat16)
    text = jax.random.normal(k2, (1, args.text_len, config.text_dim), jnp.bfloat16)
    timestep = jnp.array([999.0], jnp.float32)

    forward = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
    t0 = time.perf_counter()
    compiled = forward.lower(params, latents, timestep, text).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(params, latents, timestep, text))
    times_ms = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(params, latents, timestep, text))
        times_ms.append((time.perf_counter() - t0) * 1e3)
    if not bool(jnp.isfinite(out.astype(jnp.float32)).all()):
        raise RuntimeError("forward produced non-finite values")
    stats = device.memory_stats() or {}
    return {
        "benchmark": "wan_forward",
        "command": " ".join(["python", "scripts/bench_wan_forward.py", *sys.argv[1:]]),
        "device": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "tiny" if args.tiny else "Wan2.1-T2V-1.3B (synthetic weights)",
        "config": dataclasses.asdict(config),
        "param_count": models.param_count(params),
        "dtype": "bfloat16",
        "attention": args.attn,
        "video": {"frames": args.frames, "height": args.height, "width": args.width},
        "latent_shape": list(shape),
        "tokens": tokens,
        "text_len": args.text_len,
        "time_ms": statistics.median(times_ms),
        "times_ms": times_ms,
        "compile_s": compile_s,
        "checkpoint_write_s": write_s,
        "checkpoint_load_s": load_s,
        "peak_bytes": stats.get("peak_bytes_in_use"),
        "bytes_limit": stats.get("bytes_limit"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = f"wan_forward-{'tiny-' if args.tiny else ''}{device_slug(jax.devices()[0])}.json"
    (args.out_dir / name).write_text(json.dumps(result, indent=2) + "\n")
    peak = result["peak_bytes"]
    print(
        f"{result['model']} on {result['device']}: {result['tokens']} tokens, attn={result['attention']}, "
        f"median {result['time_ms']:.1f} ms over {args.runs} runs (compile {result['compile_s']:.1f} s), "
        f"peak {'n/a' if peak is None else f'{peak / 2**30:.2f} GiB'} -> {args.out_dir / name}"
    )
    return result


if __name__ == "__main__":
    main()
