"""Time GPTQ on one 4096 x 4096 layer and on every linear of a Wan2.1-1.3B-sized model.

    python scripts/bench_gptq.py                      # GPU: 4096^2 layer + 30-block Wan2.1-1.3B linears
    python scripts/bench_gptq.py --tiny               # CPU smoke run (small shapes)
    python scripts/bench_gptq.py --spec int3/g128 --act-order

Weights and Hessians are random (timing only): each layer gets N(0, 1/K) weights and
H = X^T X / T from T = 2K random tokens with a few 20-100x outlier channels, generated
on the device and excluded from the timings. The Wan2.1-1.3B linears per block (dim 1536,
ffn 8960): self-attention q, k, v, o and cross-attention q, k, v, o (1536 x 1536), FFN
up (1536 x 8960) and down (8960 x 1536); 30 blocks, 300 layers.

Per layer shape the first call (compilation included) and the median of repeated calls
are recorded; the model total is the wall time of quantizing all layers in order (each
distinct shape already compiled, as in a real run after its first block), plus its
compile-inclusive first pass. Results go to benchmarks/gptq-<device>.json.

Run from the repository root: ``python scripts/bench_gptq.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/bench_gptq.py`` where jquant is not installed (e.g. the GPU machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jquant.algorithms import gptq

ROOT = Path(__file__).resolve().parents[1]


def random_layer(key: jax.Array, k: int, n: int, tokens_per_channel: int = 2) -> tuple[jax.Array, jax.Array]:
    """(w [K, N], H [K, K]) on the device, ready."""
    kw, kx, ko = jax.random.split(key, 3)
    w = jax.random.normal(kw, (k, n), jnp.float32) / jnp.sqrt(k)
    x = jax.random.normal(kx, (tokens_per_channel * k, k), jnp.float32)
    boost = jnp.ones(k).at[jax.random.choice(ko, k, (4,), replace=False)].set(jnp.asarray([20.0, 40.0, 70.0, 100.0]))
    x = x * boost
    h = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST) / x.shape[0]
    return jax.block_until_ready((w, h))


def time_layer(w: jax.Array, h: jax.Array, spec: str, cfg: gptq.GPTQConfig) -> float:
    t0 = time.perf_counter()
    q = gptq.gptq_layer(w, h, spec, cfg)
    jax.block_until_ready(q.qvalue)
    return time.perf_counter() - t0


def bench_shape(key: jax.Array, k: int, n: int, spec: str, cfg: gptq.GPTQConfig, repeats: int) -> dict:
    w, h = random_layer(key, k, n)
    first = time_layer(w, h, spec, cfg)
    runs = [time_layer(w, h, spec, cfg) for _ in range(repeats)]
    # split the steady state into the damped Cholesky of H^-1 and the column sweep
    chol = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        jax.block_until_ready(gptq.inverse_cholesky(h, damp=cfg.damp, path=f"{k}x{n}")[0])
        chol.append(time.perf_counter() - t0)
    t_chol = statistics.median(chol)
    med = statistics.median(runs)
    return {
        "shape": [k, n],
        "first_call_s": round(first, 4),
        "median_s": round(med, 4),
        "runs_s": [round(r, 4) for r in runs],
        "cholesky_s": round(t_chol, 4),
        "sweep_s": round(max(med - t_chol, 0.0), 4),
        "weights_per_s": round(k * n / med),
    }


def wan_layers(blocks: int, dim: int, ffn: int) -> list[tuple[str, int, int]]:
    out = []
    for b in range(blocks):
        for att in ("attn1", "attn2"):
            for p in ("to_q", "to_k", "to_v", "to_out_0"):
                out.append((f"blocks_{b}/{att}/{p}/kernel", dim, dim))
        out.append((f"blocks_{b}/ffn/net_0/proj/kernel", dim, ffn))
        out.append((f"blocks_{b}/ffn/net_2/kernel", ffn, dim))
    return out


def bench_model(key: jax.Array, blocks: int, dim: int, ffn: int, spec: str, cfg: gptq.GPTQConfig) -> dict:
    layers = wan_layers(blocks, dim, ffn)
    shapes = sorted({(k, n) for _, k, n in layers})
    hessians = {}
    compile_pass = {}
    for i, (k, n) in enumerate(shapes):  # one random problem per distinct shape, compiled once
        w, h = random_layer(jax.random.fold_in(key, i), k, n)
        hessians[(k, n)] = (w, h)
        compile_pass[f"{k}x{n}"] = round(time_layer(w, h, spec, cfg), 4)
    per_shape: dict[str, list[float]] = {}
    t_total = 0.0
    for i, (path, k, n) in enumerate(layers):
        w, h = random_layer(jax.random.fold_in(key, 1000 + i), k, n)  # fresh data per layer, not timed
        t = time_layer(w, h, spec, cfg)
        t_total += t
        per_shape.setdefault(f"{k}x{n}", []).append(t)
    return {
        "blocks": blocks,
        "dim": dim,
        "ffn": ffn,
        "layers": len(layers),
        "weights": sum(k * n for _, k, n in layers),
        "total_s": round(t_total, 3),
        "first_call_per_shape_s": compile_pass,
        "per_shape": {
            s: {"count": len(v), "median_s": round(statistics.median(v), 4), "sum_s": round(sum(v), 3)}
            for s, v in per_shape.items()
        },
    }


def device_slug() -> str:
    d = jax.devices()[0]
    name = d.device_kind if d.platform != "cpu" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small shapes, for a CPU smoke run")
    ap.add_argument("--spec", default="int4/g128")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="output JSON (default benchmarks/gptq-<device>[-tiny].json)")
    args = ap.parse_args(argv)
    cfg = gptq.GPTQConfig(block_size=args.block_size, act_order=args.act_order)
    key = jax.random.key(0)
    if args.tiny:
        layer_k, blocks, dim, ffn = 256, 2, 128, 256
    else:
        layer_k, blocks, dim, ffn = 4096, 30, 1536, 8960
    print(f"device: {jax.devices()[0]}  spec {args.spec}  act_order={args.act_order}", flush=True)
    layer = bench_shape(jax.random.fold_in(key, 1), layer_k, layer_k, args.spec, cfg, args.repeats)
    print(
        f"{layer_k}x{layer_k}: first {layer['first_call_s']} s, median {layer['median_s']} s "
        f"(cholesky {layer['cholesky_s']} s, sweep {layer['sweep_s']} s)",
        flush=True,
    )
    model = bench_model(jax.random.fold_in(key, 2), blocks, dim, ffn, args.spec, cfg)
    print(
        f"Wan-sized model ({model['layers']} linears, {model['weights']:,} weights): {model['total_s']} s", flush=True
    )
    result = {
        "benchmark": "gptq",
        "command": "python scripts/bench_gptq.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
        "spec": args.spec,
        "config": {"block_size": cfg.block_size, "damp": cfg.damp, "act_order": cfg.act_order},
        "tiny": args.tiny,
        "layer": layer,
        "model": {"name": "Wan2.1-1.3B-sized linears" if not args.tiny else "tiny Wan-like linears", **model},
    }
    out = (
        Path(args.out) if args.out else ROOT / "benchmarks" / f"gptq-{device_slug()}{'-tiny' if args.tiny else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
