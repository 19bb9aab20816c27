"""`jquant demo`: the bundled tiny video model through a set of quantization recipes.

Loads `jquant/models/assets/tiny_wan` (a small Wan2.1-architecture model trained on moving digits by
`scripts/train_tiny.py`), samples one clip per digit class with the jitted flow-match Euler
sampler and classifier-free guidance in full precision, then quantizes it with each recipe of
`jquant.pipeline.recipes` (calibrating on the denoising trajectory: several seeds and classes, every
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

Progress goes to stderr: on a terminal, a bar over the models (the fp32 reference, then each
recipe) whose status names the phase (calibrating, quantizing, sampling) with the
calibrator's bars nested under it; elsewhere (CI logs, notebooks) one timestamped line per
phase. ``--quick`` (2 clips, 6 steps, two recipes) finishes in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from tqdm import tqdm

from jquant.cli.common import ArgumentParser
from jquant.models import tiny_wan as tw
from jquant.pipeline import recipes as rc
from jquant.pipeline.calibrate import CalibrationConfig, Calibrator, quantize
from jquant.pipeline.denoiser import tiny_wan_bundle
from jquant.pipeline.evaluate import evaluate, reference, weight_summary

DEFAULT_RECIPES: tuple[str, ...] = ("int8-wa-smooth", "w4a16-gptq", "q4_k_m")
# `--quick`: a W8A8 static-table recipe and the GGUF mix (the fastest two defaults) on 2 clips x 6 steps.
QUICK = {"clips": 2, "steps": 6, "recipes": "int8-wa-smooth,q4_k_m", "calib_samples": 2}


def _isatty(stream: Any) -> bool:
    """A terminal tqdm can draw on (a pseudo-terminal of width 0, as under `script`, is not)."""
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError):  # no file descriptor: trust isatty
        return True


class Status:
    """What the demo is doing, so it never sits silent: on a terminal a tqdm bar over the
    models (fp32 reference, then each recipe) whose postfix names the current phase; elsewhere
    (CI logs, notebooks: no carriage-return redraws) one ``[elapsed] i/N name: phase`` line
    per phase. ``enabled=False`` prints nothing."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.total, self.i, self.name = enabled, total, 0, ""
        self.last: tuple[str, str] = ("", "")
        self.tty = enabled and _isatty(self.stream)
        self.t0 = time.perf_counter()
        self.bar = None
        if self.tty:
            self.bar = tqdm(
                total=total,
                desc="jquant demo",
                file=self.stream,
                position=0,
                leave=True,
                dynamic_ncols=True,
                bar_format="{desc}: {n_fmt}/{total_fmt} models |{bar:12}| {elapsed}{postfix}",
            )

    def start(self, name: str) -> None:
        """The next model (``fp32`` or a recipe name) begins."""
        self.i, self.name = self.i + 1, name

    def phase(self, what: str) -> None:
        """The current model enters phase ``what`` (e.g. ``"sampling 8 clips"``)."""
        if not self.enabled or (self.name, what) == self.last:
            return
        self.last = (self.name, what)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.name}: {what}", refresh=True)
        else:
            self.line(f"{self.i}/{self.total} {self.name}: {what}")

    def done(self, summary: str) -> None:
        """The current model is finished; ``summary`` is printed once, above the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"{self.name}: {summary}", file=self.stream)
            self.bar.update(1)
        else:
            self.line(f"{self.i}/{self.total} {self.name}: done, {summary}")

    def line(self, text: str) -> None:
        """One timestamped line (above the bar on a terminal)."""
        if not self.enabled:
            return
        msg = f"[{time.perf_counter() - self.t0:6.1f} s] {text}"
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str("", refresh=False)
            self.bar.close()
            self.bar = None


def _status_calibrator(bundle: Any, config: Any, status: Status) -> Any:
    """A :class:`~jquant.pipeline.calibrate.Calibrator` that names its calibration phases on
    ``status`` (and shows its own nested bars on a terminal)."""

    class StatusCalibrator(Calibrator):
        def _phase(self, what: str, fn: Any, *args: Any) -> Any:
            if self.seconds["record"] == 0.0:  # the first call records the float trajectories
                what = f"recording the fp32 calibration trajectories, then {what}"
            status.phase(f"calibrating ({what})")
            try:
                return fn(*args)
            finally:
                status.phase("quantizing")

        def stats_by_key(self, variables: Any) -> Any:
            return self._phase("layer statistics", super().stats_by_key, variables)

        def ranges(self, variables: Any) -> Any:
            return self._phase("per-step activation ranges", super().ranges, variables)

        def samples(self, variables: Any, max_tokens: int = 2048) -> Any:
            return self._phase("activation samples", super().samples, variables, max_tokens)

    return StatusCalibrator(bundle, config, progress=status.tty)


def _clip_grid(rows: Sequence[np.ndarray], names: Sequence[str], scale: int) -> list[np.ndarray]:
    """Per frame t, one uint8 image: a row per format, a column per clip (clips [N, F, H, W])."""
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
                img = Image.fromarray(np.uint8(np.round(255 * clips[i, t]))).resize(
                    (w * scale, h * scale), Image.NEAREST
                )
                canvas.paste(img, (label_w + i * (w * scale + gap), y))
        frames.append(np.asarray(canvas))
    return frames


def _filmstrips(rows: Sequence[np.ndarray], names: Sequence[str], scale: int) -> np.ndarray:
    """One uint8 image: a row per clip; per format, the clip's frames left to right, formats side
    by side under a header naming them."""
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
    frames = _clip_grid(rows, names, scale=3)
    gif = out_dir / "clips.gif"
    imgs = [Image.fromarray(fr) for fr in frames]
    imgs[0].save(gif, save_all=True, append_images=imgs[1:], duration=150, loop=0)
    png = out_dir / "grid.png"
    Image.fromarray(_filmstrips(rows, names, scale=2)).save(png)
    return png, gif


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The demo's results as a fixed-width text table."""
    head = (
        f"{'recipe':<16} {'bits/w':>6} {'weights MiB':>11} {'PSNR dB':>8} {'SSIM':>6} {'flicker':>8} "
        f"{'class acc':>9} {'sample s':>9} {'compile s':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['recipe']:<16} {r['bits_per_weight']:>6.2f} {r['weight_bytes'] / 2**20:>11.3f} {r['psnr']:>8.2f} "
            f"{r['ssim']:>6.3f} {r['flicker']:>8.4f} {r['accuracy']:>9.2f} {r['sample_s']:>9.2f} {r['compile_s']:>9.2f}"
        )
    return "\n".join(lines)


def plot_step_errors(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """``step_error.png``: RMS latent difference to the fp32 trajectory after each step, per recipe."""
    fig = Figure(figsize=(7, 4))  # no pyplot: no global backend or figure registry touched
    ax = fig.subplots()
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
    """``"all"``, a comma-separated string or a sequence of registered recipe names; an
    unknown name raises a KeyError with a "did you mean" suggestion."""
    if isinstance(names, str):
        names = rc.names() if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
    for n in names:
        if n not in rc.RECIPES:
            raise rc.UnknownRecipeError(rc.unknown_recipe_message(n, rc.names()))
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
    `progress` reports each model's phase on stderr (see :class:`Status`).
    """
    if num_clips < 1 or steps < 1:
        raise ValueError(f"run_demo: num_clips and steps must be >= 1, got num_clips={num_clips}, steps={steps}")
    names = resolve_recipes(recipes)
    if not names:
        raise ValueError("run_demo: recipes is empty")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; --out must be a folder")
    out.mkdir(parents=True, exist_ok=True)  # fail before the minutes of work, not after
    t_start = time.perf_counter()
    status = Status(1 + len(names), enabled=progress)
    try:
        status.start("fp32")
        status.phase("loading the bundled model")
        bundle = tiny_wan_bundle(model_dir, num_steps=steps)
        if guidance_scale is not None:
            bundle = dataclasses.replace(
                bundle, denoiser=dataclasses.replace(bundle.denoiser, guidance_scale=float(guidance_scale))
            )
        tiny = bundle.extra["tiny"]
        work = bundle.workload(num_clips, seed)
        labels = jnp.asarray(work.labels)

        def accuracy(videos: np.ndarray) -> float:
            return tw.sample_accuracy(tiny.classifier, tiny.classifier_params, jnp.asarray(videos[..., 0]), labels)

        clips = f"{num_clips} clip{'s' * (num_clips > 1)} x {steps} steps"
        status.phase(f"sampling {clips} (the first call compiles)")
        ref = reference(bundle, work)
        ref_clips = np.asarray(ref.videos)
        rows: list[dict[str, Any]] = [
            {
                "recipe": "fp32",
                "activations": "-",
                **weight_summary({"params": bundle.params}),
                "psnr": float("inf"),
                "ssim": 1.0,
                "flicker": 0.0,
                "accuracy": accuracy(ref_clips),
                "sample_s": ref.sample_s,
                "compile_s": ref.compile_s,
                "step_rmse": [0.0] * steps,
            }
        ]
        status.done(f"reference sampled in {ref.sample_s + ref.compile_s:.1f} s")
        clips_by_recipe = [ref_clips[..., 0]]
        cal = _status_calibrator(
            bundle, CalibrationConfig(num_samples=calib_samples, batch=min(4, calib_samples)), status
        )
        for name in names:
            status.start(name)
            status.phase("quantizing")
            t0 = time.perf_counter()
            qm = quantize(bundle, rc.get(name), cal)
            quantize_s = time.perf_counter() - t0
            status.phase(f"sampling {clips} (compiles first) and scoring")
            r = evaluate(bundle, qm, ref)
            videos = r.pop("videos")
            clips_by_recipe.append(videos[..., 0])
            rows.append(
                {
                    "recipe": name,
                    "activations": rc.get(name).label,
                    "accuracy": accuracy(videos),
                    "quantize_s": quantize_s,
                    **{k: v for k, v in r.items() if k not in ("name",)},
                }
            )
            status.done(
                f"PSNR {r['psnr']:.2f} dB, {r['bits_per_weight']:.2f} bits/w (quantized in {quantize_s:.1f} s, "
                f"sampled in {r['sample_s'] + r['compile_s']:.1f} s)"
            )
        status.line(f"writing {out}/grid.png, clips.gif, step_error.png, results.json")
    finally:
        status.close()

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


def parser() -> argparse.ArgumentParser:
    """The options of ``jquant demo``."""
    p = ArgumentParser(
        prog="jquant demo",
        description="Quantize the bundled tiny video model with several recipes, sample it on the same noise as "
        "the fp32 model, and compare (a table, clips side by side, error per step).",
        epilog="The default run (8 clips, 16 steps, 3 recipes) takes 1-3 minutes on a 2-core CPU; --quick about a "
        "minute. docs/tiny_model.md describes the model and the table.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a fast run: {QUICK['clips']} clips, {QUICK['steps']} steps, recipes {QUICK['recipes']}, "
        f"{QUICK['calib_samples']} calibration samples (options given explicitly still win)",
    )
    p.add_argument("--out", default="jquant-demo", help="output folder (default: ./jquant-demo)")
    p.add_argument(
        "--clips", type=int, default=None, help="clips per recipe, one per digit class 0, 1, ... (default 8)"
    )
    p.add_argument("--steps", type=int, default=None, help="flow-match Euler steps (default 16)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument(
        "--recipes",
        default=None,
        help=f"comma-separated recipe names, or 'all' (default {','.join(DEFAULT_RECIPES)}; "
        "`jquant quantize --list` describes them)",
    )
    p.add_argument("--calib-samples", type=int, default=None, help="calibration samples per recipe (default 4)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`jquant demo [--quick] [--out DIR] [--clips N] [--steps N] [--seed N] [--recipes a,b|all]
    [--calib-samples N]`."""
    p = parser()
    a = p.parse_args(argv)
    base = QUICK if a.quick else {"clips": 8, "steps": 16, "recipes": ",".join(DEFAULT_RECIPES), "calib_samples": 4}
    opts = {k: base[k] if getattr(a, k) is None else getattr(a, k) for k in base}
    for k in ("clips", "steps", "calib_samples"):
        if opts[k] < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1, got {opts[k]}")
    resolve_recipes(opts["recipes"])  # a typo fails now, not after the fp32 reference
    print(
        f"jquant demo: {opts['clips']} clip{'s' * (opts['clips'] != 1)} x {opts['steps']} steps, recipes "
        f"{opts['recipes']}, on "
        f"{jax.devices()[0].device_kind}; loading the bundled model, then compiling and sampling "
        "(progress on stderr)",
        file=sys.stderr,
        flush=True,
    )
    res = run_demo(
        a.out,
        num_clips=opts["clips"],
        steps=opts["steps"],
        seed=a.seed,
        recipes=opts["recipes"],
        calib_samples=opts["calib_samples"],
    )
    print()
    print(res["table"])
    print(
        f"\nPSNR/SSIM per frame and flicker against fp32 on the same noise; bits/w over the quantized kernels "
        f"(scales and aux included); class acc = share of clips the bundled classifier names as the digit they were "
        f"conditioned on ({res['num_clips']} clips, digits {res['labels']})."
    )
    print(f"wrote {res['png']}, {res['gif']} and {res['plot']} ({res['total_s']:.0f} s in all)")
    return 0
