#!/usr/bin/env python3
"""Where the error of fp8 P V comes from: P's e4m3 rounding, V's, or the MMA's accumulator.

Exact fp32 attention on ``attention_ref.sample_inputs`` (``random``, ``realistic``: massive K
channels, ``sharp``: peaked attention maps) is compared, in relative L2, with P V computed from

* bf16 P and bf16 V (the kernel's bf16 path, V as given);
* e4m3 P (P x 448, as the kernel stores it) with bf16 V, and bf16 P with e4m3 V (V smoothed by its
  per-channel mean, one scale per channel, the mean added after normalizing, as
  ``attention_ref.prepare`` and the kernel do);
* e4m3 P and e4m3 V with an fp32 accumulator (what ``quant_attention_reference`` computes);
* the same with an accumulator that keeps only ``--bits`` mantissa bits after every 32 keys (the
  fp8 tensor-core MMA on Hopper accumulates with reduced precision; DeepSeek-V3's report puts it at
  about 14 bits), either across the whole key axis or restarted every ``--tile`` keys and summed
  in fp32 (two-level accumulation, ``AttentionConfig.fresh_pv``).

The softmax itself is exact, so each row isolates one rounding. CPU; writes
``benchmarks/fp8_pv_error.json``.

    python scripts/fp8_pv_error.py --tokens 2048 --heads 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels import attention_ref as ar  # noqa: E402
from pallas_kernels import timing  # noqa: E402

KINDS = ("random", "realistic", "sharp")
MMA_KEYS = 32  # keys one fp8 wgmma instruction reduces (k = 32)


def keep_mantissa_bits(x: jax.Array, bits: int) -> jax.Array:
    """``x`` rounded to nearest with ``bits`` explicit mantissa bits (fp32 has 23)."""
    m, e = jnp.frexp(x)
    return jnp.ldexp(jnp.round(m * 2.0 ** (bits + 1)) / 2.0 ** (bits + 1), e)


def e4m3(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float8_e4m3fn).astype(jnp.float32)


def bf16(x: jax.Array) -> jax.Array:
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def limited_accumulation(p: jax.Array, v: jax.Array, bits: int, tile: int | None) -> jax.Array:
    """``p [B, H, Q, K] @ v [B, K, H, D]`` -> [B, H, Q, D], the running sum rounded to ``bits``
    mantissa bits after every ``MMA_KEYS`` keys; with ``tile``, restarted every ``tile`` keys and
    the tiles summed in fp32."""
    keys = p.shape[-1]
    acc = outer = jnp.zeros((*p.shape[:3], v.shape[-1]), jnp.float32)
    for k0 in range(0, keys, MMA_KEYS):
        part = jnp.einsum("bhqk,bkhd->bhqd", p[..., k0 : k0 + MMA_KEYS], v[:, k0 : k0 + MMA_KEYS])
        acc = keep_mantissa_bits(acc + part, bits)
        if tile and (k0 + MMA_KEYS) % tile == 0:
            outer, acc = outer + acc, jnp.zeros_like(acc)
    return outer + acc


def decompose(q: jax.Array, k: jax.Array, v: jax.Array, bits: int, tile: int) -> dict[str, float]:
    """Relative L2 error against exact attention of each P V variant (see the module docstring)."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    exact = ar.exact_attention(q, k, v).astype(jnp.float32)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = jnp.exp(s - s.max(-1, keepdims=True))
    norm = jnp.swapaxes(p.sum(-1), 1, 2)[..., None]  # [B, Q, H, 1]
    v_mean = v.mean(1, keepdims=True)  # smoothing; the mean is added back after normalizing
    v_c = v - v_mean
    v_scale = jnp.maximum(jnp.abs(v_c).max(1, keepdims=True), 1e-12) / ar.QMAX["fp8_e4m3"]
    v8 = e4m3(v_c / v_scale) * v_scale
    p8 = e4m3(p * ar.P_SCALE) / ar.P_SCALE

    def out(pv: jax.Array, mean: jax.Array | float = v_mean) -> jax.Array:  # [B, H, Q, D] -> [B, Q, H, D]
        return jnp.swapaxes(pv, 1, 2) / norm + mean

    def dot(pp: jax.Array, vv: jax.Array) -> jax.Array:
        return jnp.einsum("bhqk,bkhd->bhqd", pp, vv)

    rows = {  # bf16 V as the kernel's bf16 path takes it: unsmoothed
        "bf16 P, bf16 V": out(dot(bf16(p), bf16(v)), 0.0),
        "e4m3 P, bf16 V": out(dot(p8, bf16(v)), 0.0),
        "bf16 P, e4m3 V": out(dot(bf16(p), v8)),
        "e4m3 P, e4m3 V, fp32 accumulator": out(dot(p8, v8)),
        f"e4m3 P, e4m3 V, {bits}-bit accumulator": out(limited_accumulation(p8, v8, bits, None)),
        f"e4m3 P, e4m3 V, {bits}-bit accumulator restarted every {tile} keys": out(
            limited_accumulation(p8, v8, bits, tile)
        ),
    }
    return {name: float(ar.relative_l2(o, exact)) for name, o in rows.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--bits", type=int, default=14, help="mantissa bits the emulated MMA accumulator keeps")
    p.add_argument("--tile", type=int, default=256, help="keys per restarted accumulator (two-level)")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks" / "fp8_pv_error.json")
    a = p.parse_args(argv)
    if a.tile % MMA_KEYS or a.tokens < a.tile:
        p.error(f"--tile must be a multiple of {MMA_KEYS} and <= --tokens, got {a.tile}")
    result = {
        "benchmark": "fp8_pv_error",
        **timing.run_metadata("scripts/fp8_pv_error.py", argv),
        "settings": {"tokens": a.tokens, "heads": a.heads, "head_dim": a.head_dim, "bits": a.bits, "tile": a.tile},
        "rows": {},
    }
    for kind in a.kinds.split(","):
        if kind not in KINDS:
            p.error(f"--kinds: unknown input kind {kind!r}; choose from {KINDS}")
        q, k, v = ar.sample_inputs(jax.random.key(0), 1, a.tokens, a.tokens, a.heads, a.head_dim, kind=kind)
        result["rows"][kind] = decompose(q, k, v, a.bits, a.tile)
    names = list(next(iter(result["rows"].values())))
    print(f"{'relative L2 vs exact':56s} " + " ".join(f"{k:>10s}" for k in result["rows"]))
    for n in names:
        print(f"{n:56s} " + " ".join(f"{result['rows'][k][n]:10.4f}" for k in result["rows"]))
    print(f"wrote {timing.write_json(str(a.out), result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
