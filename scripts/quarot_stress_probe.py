"""Why QuaRot collapses on the outlier stress testbed (docs/outliers.md): one layer at a time.

For every linear layer that ``jquant.algorithms.outliers.inject_outliers`` plants outliers into,
on input rows captured along the calibration trajectory of the tiny model and of its stress mode:
the relative RMS error of the layer output with int8 activations per token and/or int8 weights
per output channel (RTN or GPTQ), unrotated, after QuaRot's online randomized Hadamard, and after
SmoothQuant's per-channel scaling (alpha 0.5). Also ``energy``: the RMS of a token over the RMS
of its channels that were not planted (per channel), and ``crest``: absmax over RMS of a token
after the rotation. Prints medians over the layers and writes ``benchmarks/quarot_stress_probe.json``.

    PYTHONPATH=. python scripts/quarot_stress_probe.py [--samples 2] [--steps 12]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jquant.algorithms import outliers as inj
from jquant.algorithms import quarot as qr
from jquant.algorithms.gptq import gptq_layer
from jquant.hadamard import apply_hadamard, rht_signs
from jquant.pipeline.calibrate import CalibrationConfig, Calibrator
from jquant.pipeline.denoiser import tiny_wan_bundle


def q_token(x: np.ndarray) -> np.ndarray:
    """int8, symmetric, one scale per row (token)."""
    s = np.abs(x).max(1, keepdims=True) / 127
    return np.round(x / np.where(s > 0, s, 1)) * s


def q_column(w: np.ndarray) -> np.ndarray:
    """int8, symmetric, one scale per output channel (RTN)."""
    s = np.abs(w).max(0, keepdims=True) / 127
    return np.round(w / np.where(s > 0, s, 1)) * s


def q_gptq(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """int8 per output channel by GPTQ on the Hessian of ``x`` (default damping)."""
    h = jnp.asarray(x.T @ x, jnp.float32)
    return np.asarray(gptq_layer(jnp.asarray(w, jnp.float32), h, "int8").dequantize(), np.float64)


def rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def layer_errors(x: np.ndarray, w: np.ndarray, hot: np.ndarray) -> dict[str, float]:
    """The errors of one layer (``x`` [N, K] inputs, ``w`` [K, N] kernel, ``hot`` planted channels)."""
    y = x @ w
    d = np.asarray(rht_signs(w.shape[0], 0), np.float64)
    xr = np.asarray(apply_hadamard(jnp.asarray(x * d, jnp.float32)), np.float64)
    wr = np.asarray(apply_hadamard(jnp.asarray(d[:, None] * w, jnp.float32), axis=0), np.float64)
    s = np.sqrt(np.abs(x).max(0) / np.maximum(np.abs(w).max(1), 1e-12))
    xs, ws = x / s, w * s[:, None]
    return {
        "energy": float(np.sqrt((x**2).mean() / (x[:, ~hot] ** 2).mean())),
        "crest_rotated": float(np.median(np.abs(xr).max(1) / np.sqrt((xr**2).mean(1)))),
        "rotation_exact": rel(xr @ wr, y),
        "A8 plain": rel(q_token(x) @ w, y),
        "A8 rotated": rel(q_token(xr) @ wr, y),
        "A8 smoothed": rel(q_token(xs) @ ws, y),
        "W8 RTN plain": rel(x @ q_column(w), y),
        "W8 RTN rotated": rel(xr @ q_column(wr), y),
        "W8 RTN smoothed": rel(xs @ q_column(ws), y),
        "W8 GPTQ plain": rel(x @ q_gptq(w, x), y),
        "W8 GPTQ rotated": rel(xr @ q_gptq(wr, xr), y),
        "W8A8 GPTQ rotated (int8-wa-quarot)": rel(q_token(xr) @ q_gptq(wr, xr), y),
        "W8A8 RTN smoothed": rel(q_token(xs) @ q_column(ws), y),
    }


def _kernel(params: dict, path: str) -> np.ndarray:
    node = params
    for part in path.split("/"):
        node = node[part]
    return np.asarray(node, np.float64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=2, help="calibration samples (inputs come from the first batch)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--json", default="benchmarks/quarot_stress_probe.json")
    a = p.parse_args(argv)
    base = tiny_wan_bundle(num_steps=a.steps)
    stress, planted = inj.inject_outliers(base.params)
    plan = qr.dit_plan(base.params, base.roles, base.head_dim)
    online = set(qr.online_paths({"params": base.params}, plan))
    mods = [k[: -len("/kernel")] for k in planted]
    res: dict = {
        "command": "PYTHONPATH=. python scripts/quarot_stress_probe.py " + " ".join(argv or sys.argv[1:]),
        "device": f"{jax.devices()[0].device_kind}, jax {jax.__version__}, python {platform.python_version()}",
        "date": datetime.date.today().isoformat(),
        "planted_layers": len(mods),
        "planted_layers_rotated_online": sum(m in online for m in mods),
        "median_over_planted_layers": {},
    }
    print(f"planted layers: {len(mods)}; with QuaRot's online rotation: {res['planted_layers_rotated_online']}")
    for name, params in (("tiny", base.params), ("stress", stress)):
        cal = Calibrator(dataclasses.replace(base, params=params), CalibrationConfig(a.samples, a.samples))
        xs = cal.samples(cal.float_variables, max_tokens=2048)
        rows = [
            layer_errors(np.asarray(xs[m], np.float64), _kernel(params, f"{m}/kernel"), planted[f"{m}/kernel"] > 1)
            for m in mods
        ]
        res["median_over_planted_layers"][name] = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
    med = res["median_over_planted_layers"]
    print(f"{'median over the planted layers':<36} {'tiny':>8} {'stress':>8}")
    for k in med["tiny"]:
        print(f"{k:<36} {med['tiny'][k]:>8.4f} {med['stress'][k]:>8.4f}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
