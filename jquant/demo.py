"""`jquant demo`: the bundled tiny video model through a set of quantization recipes.

Loads `models/assets/tiny_wan` (a small Wan2.1-architecture model trained on moving digits by
`scripts/train_tiny.py`), samples one clip per digit class with the jitted flow-match Euler
sampler and classifier-free guidance in full precision, then quantizes it with each recipe of
`jquant.recipe` (calibrating on the denoising trajectory: several seeds and classes, every
step, both CFG branches) and samples again on the same noise and classes.

Default recipes (fast on a 2-core CPU; ``--recipes all`` runs every registered one):

* ``int8-wa-smooth``: SmoothQuant, int8 weights, int8 activations with static scales from a
  variance-aware per-timestep table;
* ``w4a16-gptq``: GPTQ int4 weights in groups of 64 on trajectory Hessians;
* ``q4_k_m``: the GGUF Q4_K_M mix by layer role.

Embedders, the adaLN modulation and the output head stay in float in every recipe. One table
row per recipe: bits per quantized weight, weight memory (all params and aux), PSNR and SSIM
per frame against the fp32 clips, temporal flicker, the bundled classifier's accuracy on the
clips (the share it names as the conditioned digit; docs/tiny_model.md) and the sampling time
without compilation. Written under ``--out``: ``grid.png`` and ``clips.gif`` (the clips side by
side), ``step_error.png`` (latent error after each denoising step, per recipe) and
``results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_RECIPES: tuple[str, ...] = ("int8-wa-smooth", "w4a16-gptq", "q4_k_m")


def _clip_grid(rows: Sequence[np.ndarray], names: Sequence[str], scale: int) -> list[np.ndarray]:
    """Per frame t, one uint8 image: a row per format, a column per clip (clips [N, F, H, W])."""
    from PIL import Image, ImageDraw

    n, f, h, w = rows[0].shape
    label_w, gap = 150, 4
    width = label_w + n * (w * scale + gap)
    height = len(rows) * (h * scale + gap) + gap
    frames = []
    for t in range(f):
        canvas = Image.new("L", (width, height), 48)  # grey gutters between black clip cells
        draw = ImageDraw.Draw(canvas)
        for r, (clips, name) in enumerate(zip(rows, names)):
            y = gap + r * (h * scale + gap)
            draw.text((4, y + h * scale // 2 - 6), name, fill=255)
            for i in range(n):
                img = Image.fromarray(np.uint8(np.round(255 * clips[i, t]))).resize((w * scale, h * scale), Image.NEAREST)
                canvas.paste(img, (label_w + i * (w * scale + gap), y))
        frames.append(np.asarray(canvas))
    return frames


def _filmstrips(rows: Sequence[np.ndarray], names: Sequence[str], scale: int) -> np.ndarray:
    """One uint8 image: a row per clip; per format, the clip's frames left to right, formats side
    by side under a header naming them."""
    from PIL import Image, ImageDraw

    n, f, h, w = rows[0].shape
    gap, head = 3 * scale, 16
    block = f * w * scale
    canvas = Image.new("L", (len(rows) * (block + gap) - gap, head + n * (h * scale + gap)), 64)
    draw = ImageDraw.Draw(canvas)
    for c, (clips, name) in enumerate(zip(rows, names)):
        x0 = c * (block + gap)
        draw.text((x0 + 4, 2), name, fill=255)
        for i in range(n):
            strip = np.concatenate(list(clips[i]), axis=1)
            img = Image.fromarray(np.uint8(np.round(255 * strip))).resize((block, h * scale), Image.NEAREST)
            canvas.paste(img, (x0, head + i * (h * scale + gap)))
    return np.asarray(canvas)


def write_media(out_dir: Path, rows: Sequence[np.ndarray], names: Sequence[str]) -> tuple[Path, Path]:
    """Write `grid.png` (a row per clip: each format's frames side by side) and `clips.gif`
    (formats as rows, clips as columns, animated over the frames)."""
    from PIL import Image

    frames = _clip_grid(rows, names, scale=3)
    gif = out_dir / "clips.gif"
    imgs = [Image.fromarray(fr) for fr in frames]
    imgs[0].save(gif, save_all=True, append_images=imgs[1:], duration=150, loop=0)
    png = out_dir / "grid.png"
    Image.fromarray(_filmstrips(rows, names, scale=2)).save(png)
    return png, gif


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The demo's results as a fixed-width text table."""
    head = (f"{'recipe':<16} {'bits/w':>6} {'weights MiB':>11} {'PSNR dB':>8} {'SSIM':>6} {'flicker':>8} "
            f"{'class acc':>9} {'sample s':>9} {'compile s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['recipe']:<16} {r['bits_per_weight']:>6.2f} {r['weight_bytes'] / 2**20:>11.3f} {r['psnr']:>8.2f} "
            f"{r['ssim']:>6.3f} {r['flicker']:>8.4f} {r['accuracy']:>9.2f} {r['sample_s']:>9.2f} {r['compile_s']:>9.2f}"
        )
    return "\n".join(lines)


def plot_step_errors(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """``step_error.png``: RMS latent difference to the fp32 trajectory after each step, per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["recipe"] != "fp32":
            ax.plot(np.arange(1, len(r["step_rmse"]) + 1), r["step_rmse"], marker="o", ms=3, label=r["recipe"])
    ax.set_yscale("log")
    ax.set_xlabel("denoising step (1 = noisiest)")
    ax.set_ylabel("RMS latent error vs fp32")
    ax.set_title("error along the denoising trajectory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finite_or_none(x: Any) -> Any:
    """JSON-safe copy: non-finite floats (the reference's PSNR is inf) become None."""
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_or_none(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def resolve_recipes(names: str | Sequence[str]) -> list[str]:
    """``"all"``, a comma-separated string or a sequence of registered recipe names."""
    from jquant import recipe as rc

    if isinstance(names, str):
        names = rc.names() if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
    for n in names:
        rc.get(n)  # a clear error for unknown or unavailable names
    return list(names)


def run_demo(
    out_dir: str = "jquant-demo",
    num_clips: int = 8,
    steps: int = 16,
    seed: int = 0,
    *,
    recipes: str | Sequence[str] = DEFAULT_RECIPES,
    model_dir: str | None = None,
    guidance_scale: float | None = None,
    calib_samples: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample `num_clips` clips (digits 0, 1, ... cycling) in fp32 and under every recipe on the
    same noise; write grid.png, clips.gif, step_error.png and results.json under `out_dir`.

    `model_dir` defaults to the bundled model; `guidance_scale` to the one stored with it.
    Calibration uses `calib_samples` samples of its own noise seed (not the evaluation's).
    """
    from tqdm.auto import tqdm

    from jquant import recipe as rc
    from jquant.pipeline.calibrate import CalibrationConfig, Calibrator, quantize
    from jquant.pipeline.denoiser import tiny_wan_bundle
    from jquant.pipeline.evaluate import evaluate, reference, weight_summary
    from jquant.models import tiny_wan as tw

    if num_clips < 1 or steps < 1:
        raise ValueError(f"run_demo: num_clips and steps must be >= 1, got num_clips={num_clips}, steps={steps}")
    names = resolve_recipes(recipes)
    if not names:
        raise ValueError("run_demo: recipes is empty")
    t_start = time.perf_counter()
    bundle = tiny_wan_bundle(model_dir, num_steps=steps)
    if guidance_scale is not None:
        bundle = dataclasses.replace(bundle, denoiser=dataclasses.replace(bundle.denoiser, guidance_scale=float(guidance_scale)))
    tiny = bundle.extra["tiny"]
    work = bundle.workload(num_clips, seed)
    labels = jnp.asarray(work.labels)

    def accuracy(videos: np.ndarray) -> float:
        return tw.sample_accuracy(tiny.classifier, tiny.classifier_params, jnp.asarray(videos[..., 0]), labels)

    ref = reference(bundle, work)
    ref_clips = np.asarray(ref.videos)
    rows: list[dict[str, Any]] = [{
        "recipe": "fp32", "activations": "-", **weight_summary({"params": bundle.params}), "psnr": float("inf"),
        "ssim": 1.0, "flicker": 0.0, "accuracy": accuracy(ref_clips), "sample_s": ref.sample_s, "compile_s": ref.compile_s,
        "step_rmse": [0.0] * steps,
    }]
    clips_by_recipe = [ref_clips[..., 0]]
    cal = Calibrator(bundle, CalibrationConfig(num_samples=calib_samples, batch=min(4, calib_samples)))
    for name in tqdm(names, desc="recipes", disable=not progress):
        t0 = time.perf_counter()
        qm = quantize(bundle, rc.get(name), cal)
        quantize_s = time.perf_counter() - t0
        r = evaluate(bundle, qm, ref)
        videos = r.pop("videos")
        clips_by_recipe.append(videos[..., 0])
        rows.append({"recipe": name, "activations": rc.get(name).label, "accuracy": accuracy(videos),
                     "quantize_s": quantize_s, **{k: v for k, v in r.items() if k not in ("name",)}})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, gif = write_media(out, clips_by_recipe, [r["recipe"] for r in rows])
    plot = plot_step_errors(out / "step_error.png", rows)
    summary = {
        "rows": rows,
        "num_clips": num_clips,
        "labels": list(work.labels),
        "steps": steps,
        "guidance_scale": bundle.denoiser.guidance_scale,
        "seed": seed,
        "calib_samples": calib_samples,
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        "png": str(png),
        "gif": str(gif),
        "plot": str(plot),
        "total_s": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(_finite_or_none(summary), indent=2, default=float) + "\n")
    summary["table"] = format_table(rows)
    return summary


def main(argv: list[str] | None = None) -> int:
    """`jquant demo [--out DIR] [--clips N] [--steps N] [--seed N] [--recipes a,b|all]`."""
    p = argparse.ArgumentParser(prog="jquant demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="jquant-demo", help="output folder (default: ./jquant-demo)")
    p.add_argument("--clips", type=int, default=8, help="clips per recipe, one per digit class 0, 1, ...")
    p.add_argument("--steps", type=int, default=16, help="flow-match Euler steps")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                   help="comma-separated recipe names, or 'all' (see `jquant quantize x --list`)")
    a = p.parse_args(argv)
    res = run_demo(a.out, num_clips=a.clips, steps=a.steps, seed=a.seed, recipes=a.recipes)
    print()
    print(res["table"])
    print(
        f"\nPSNR/SSIM per frame and flicker against fp32 on the same noise; bits/w over the quantized kernels "
        f"(scales and aux included); class acc = share of clips the bundled classifier names as the digit they were "
        f"conditioned on ({res['num_clips']} clips, digits {res['labels']})."
    )
    print(f"wrote {res['png']}, {res['gif']} and {res['plot']} ({res['total_s']:.0f} s in all)")
    return 0
