"""``jquant quantize`` and ``jquant eval``: recipes on a model directory, from the shell.

    jquant quantize MODEL_DIR --recipe int8-wa-smooth --out DIR
    jquant eval DIR --model MODEL_DIR

``quantize`` calibrates on the model's own sampler over the whole trajectory (every step, both
CFG branches) and on the conditioning :func:`jquant.pipeline.bundles.load_bundle` gives: real
prompts through the text encoders of a Wan or Flux *pipeline* directory (``--prompts FILE``,
negative prompt ``""`` for the CFG branch; ``--frames/--height/--width`` in pixels), seeded
stand-in embeddings for a transformer directory of any of the eight ported families (grid in
latent units), the digit classes of the bundled tiny model, class labels for DiT. The effective
settings, defaults included, are printed before calibrating. It applies the recipe and writes
into ``DIR``: ``checkpoint/`` (orbax,
via :mod:`jquant.io.checkpoint`: the quantized variables and the scale table),
``quant.json`` (what is needed to run it again), ``report.md`` and ``report.json``
(per-layer formats and bytes, timings). ``eval`` samples the float and the quantized
model on the same noise and conditioning and reports the fidelity metrics.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import jax

from jquant.cli import outliers as outlier_report
from jquant.cli.common import ArgumentParser, UsageError, check_model_dir
from jquant.pipeline import recipes as rc
from jquant.pipeline.artifacts import (
    CKPT_NAME,
    META_NAME,
    json_default,
    load_quantized,
    save_quantized,
    write_reports,
)
from jquant.pipeline.bundles import PROMPT_PIPELINES, load_bundle, pipeline_class, read_prompts
from jquant.pipeline.calibrate import CalibrationConfig, Calibrator, quantize
from jquant.pipeline.denoiser import ModelBundle, SettingError
from jquant.pipeline.evaluate import evaluate, reference, weight_summary
from jquant.pipeline.runtime import tree_bytes
from jquant.pipeline.tables import TableConfig


def _device() -> str:
    d = jax.devices()[0]
    return f"{d.device_kind} ({jax.default_backend()}), jax {jax.__version__}, python {platform.python_version()}"


# --- commands -------------------------------------------------------------------------------------
def _table_from_args(a: argparse.Namespace, recipe: Any) -> Any:
    if a.table == "recipe":
        return recipe
    if a.table == "dynamic":
        return recipe.with_activations(table=None)
    cfg = TableConfig(a.table, groups=a.groups, per_branch=a.per_branch, per_frame=a.per_frame, margin=a.margin)
    return recipe.with_activations(table=cfg)


def quantize_parser() -> argparse.ArgumentParser:
    """The options of ``jquant quantize``."""
    p = ArgumentParser(
        prog="jquant quantize",
        description="Calibrate on the denoising trajectory, quantize with a "
        "recipe, save the checkpoint and a per-layer report.",
        epilog="`jquant quantize --list` describes the recipes (no model folder needed).",
    )
    p.add_argument(
        "model_dir",
        nargs="?",
        help="a diffusers folder of a ported model: a transformer folder (config.json) of Wan2.1, Flux, DiT, "
        "HunyuanVideo, CogVideoX, Mochi-1, LTX-Video or LTX-2 (stand-in conditioning), e.g. "
        "jquant/models/assets/tiny_wan; or a pipeline folder (model_index.json): Wan and Flux pipelines calibrate "
        "on prompts through their text encoders, other pipelines on their transformer/ with stand-ins",
    )
    p.add_argument("--recipe", help=f"one of: {', '.join(savable_recipes())}")
    p.add_argument("--out", help="output folder (created; gets checkpoint/, quant.json, report.md, report.json)")
    p.add_argument("--list", action="store_true", help="describe the recipes and exit")
    p.add_argument(
        "--prompts",
        metavar="FILE",
        default=None,
        help="calibration prompts, one per line (Wan/Flux pipeline folders; default: a built-in list, printed); "
        'the CFG branch gets the negative prompt ""',
    )
    p.add_argument(
        "--frames",
        type=int,
        default=None,
        help="frames to calibrate at: pixels for a pipeline folder (Wan: 1 + 4k), latent frames for a transformer "
        "folder (default: the model's, printed)",
    )
    p.add_argument(
        "--height", type=int, default=None, help="height, pixels or latent rows as --frames (default: printed)"
    )
    p.add_argument(
        "--width", type=int, default=None, help="width, pixels or latent columns as --frames (default: printed)"
    )
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, printed)")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration samples (classes/prompts cycle)")
    p.add_argument("--calib-batch", type=int, default=4, help="samples per calibration sampler call")
    p.add_argument("--calib-seed", type=int, default=1234, help="calibration noise seed")
    p.add_argument("--steps-per-sample", type=int, default=None, help="steps per sample for weight statistics")
    p.add_argument(
        "--table",
        default="recipe",
        choices=("recipe", "dynamic", "single", "uniform", "variance"),
        help="activation scales: the recipe's, dynamic per token, or a static table with this grouping",
    )
    p.add_argument("--groups", type=int, default=4, help="timestep groups of a static table")
    p.add_argument("--per-branch", action="store_true", help="separate scales per CFG branch")
    p.add_argument("--per-frame", action="store_true", help="separate scales per video frame")
    p.add_argument("--margin", type=float, default=1.0, help="headroom factor on calibrated ranges")
    p.add_argument("--outliers", action="store_true", help=outlier_report.HELP)
    return p


def savable_recipes() -> list[str]:
    """Recipes whose result :mod:`jquant.io.checkpoint` can store (``jquant quantize`` runs them)."""
    return [n for n, r in rc.RECIPES.items() if r.checkpointable]


FLAGS = {"frames": "--frames", "height": "--height", "width": "--width", "num_steps": "--steps", "prompts": "--prompts"}


def _check_positive(a: argparse.Namespace) -> None:
    """Refuse non-positive counts, naming the flag."""
    for name in ("steps", "frames", "height", "width", "calib_samples", "calib_batch", "steps_per_sample"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def resolve_model_dir(path: str) -> tuple[Path, str | None]:
    """``(folder, pipeline class or None)``: a diffusers pipeline folder (``model_index.json``) is
    taken whole; anything else must be a model folder (``check_model_dir``)."""
    p = Path(path)
    if p.is_dir() and (p / "model_index.json").is_file():
        return p, pipeline_class(p)
    return check_model_dir(p), None


def load_calibration_bundle(model_dir: Path, cls: str | None, a: argparse.Namespace) -> tuple[ModelBundle, dict]:
    """The bundle ``jquant quantize`` calibrates, and the ``load_bundle`` kwargs that rebuild it
    (recorded in quant.json for ``jquant eval``); setting errors name their flag."""
    prompts = None
    if a.prompts is not None:
        if cls not in PROMPT_PIPELINES:
            what = f"a {cls} folder" if cls else "a transformer folder"
            raise UsageError(
                f"--prompts: prompts go through the text encoders of a {' or '.join(PROMPT_PIPELINES)} folder "
                f"(model_index.json); {model_dir} is {what}, which calibrates on stand-in embeddings"
            )
        try:
            prompts = read_prompts(a.prompts)
        except (OSError, ValueError) as e:
            raise UsageError(f"--prompts: {e}") from None
    kwargs = {k: getattr(a, k) for k in ("frames", "height", "width") if getattr(a, k) is not None}
    try:
        bundle = load_bundle(model_dir, num_steps=a.steps, prompts=prompts, **kwargs)
    except SettingError as e:
        flags = "/".join(FLAGS.get(n, n) for n in e.names)
        raise UsageError(f"{flags}: {e}") from None
    if cls in PROMPT_PIPELINES:
        kwargs["prompts"] = bundle.extra["calibration"]["prompts"]
    return bundle, kwargs


def format_settings(bundle: ModelBundle, ccfg: CalibrationConfig, model_dir: Path, cls: str | None) -> str:
    """The effective calibration settings (defaults included) as one printed block."""
    c = bundle.extra.get("calibration", {})
    den = bundle.denoiser
    name = getattr(bundle.config, "CLASS_NAME", type(bundle.config).__name__)
    kind = f"{cls} pipeline folder" if cls else f"{name} transformer folder"
    cfg = f"CFG {den.guidance_scale:g} (both branches calibrated)" if den.cfg else "no CFG branch (guidance scale 1)"
    if c.get("embedded_guidance") is not None:
        cfg += f", embedded guidance {c['embedded_guidance']:g}"
    lines = [
        "calibration settings (flags in brackets; defaults where none was given):",
        f"  model         {model_dir} ({kind})",
        f"  conditioning  {c.get('conditioning', 'the model default')}",
    ]
    for i, p in enumerate(c.get("prompts", [])):
        lines.append(f"    prompt {i}: {p}")
    grid = f"{c.get('frames', '?')} x {c.get('height', '?')} x {c.get('width', '?')} ({c.get('units', '?')})"
    if "latent_shape" in c:
        grid += f", latents {'x'.join(map(str, c['latent_shape']))}"
    if "audio_frames" in c:
        grid += f", {c['audio_frames']} audio latents"
    lines += [
        f"  grid          frames x height x width = {grid}  [--frames --height --width]",
        f"  trajectory    {den.num_steps} {c.get('sampler', den.sampler)} steps, every step replayed  [--steps]; {cfg}",
        f"  samples       {ccfg.num_samples} in batches of {ccfg.batch}, noise seed {ccfg.seed}"
        f"{'' if ccfg.steps_per_sample is None else f', {ccfg.steps_per_sample} steps per sample for statistics'}"
        "  [--calib-samples --calib-batch --calib-seed --steps-per-sample]",
    ]
    if c.get("note"):
        lines.append(f"  note          {c['note']}")
    return "\n".join(lines)


def main_quantize(argv: list[str] | None = None) -> int:
    """`jquant quantize MODEL_DIR --recipe NAME --out DIR [options]`; `jquant quantize --list`."""
    p = quantize_parser()
    a = p.parse_args(argv)
    if a.list:
        print(rc.describe())
        return 0
    missing = [n for n, v in (("MODEL_DIR", a.model_dir), ("--recipe", a.recipe), ("--out", a.out)) if not v]
    if missing:
        p.error(f"missing {', '.join(missing)}; `jquant quantize --list` lists the recipes without them")
    if a.recipe not in rc.RECIPES:
        raise UsageError(rc.unknown_recipe_message(a.recipe, savable_recipes()))
    recipe = _table_from_args(a, rc.get(a.recipe))
    if not recipe.checkpointable:
        raise UsageError(
            f"recipe {recipe.name} produces leaves jquant.io.checkpoint cannot store yet, so `jquant quantize` cannot "
            f"save it; run it in memory with `jquant demo --recipes {recipe.name}` or from Python "
            "(jquant.pipeline.calibrate.quantize)"
        )
    _check_positive(a)
    model_dir, cls = resolve_model_dir(a.model_dir)
    t0 = time.perf_counter()
    bundle, bundle_kwargs = load_calibration_bundle(model_dir, cls, a)
    ccfg = CalibrationConfig(a.calib_samples, a.calib_batch, a.calib_seed, steps_per_sample=a.steps_per_sample)
    print(format_settings(bundle, ccfg, model_dir, cls), flush=True)
    cal = Calibrator(bundle, ccfg, progress=True)
    print(f"quantizing {model_dir} with {recipe.name}: {recipe.transform.name}; {recipe.label}")
    qm = quantize(bundle, recipe, cal)
    if a.outliers:
        outlier_report.report(cal, a.out)

    meta = {
        "model_dir": str(Path(a.model_dir).resolve()),
        "num_steps": bundle.denoiser.num_steps,
        "bundle_kwargs": bundle_kwargs,
        "calibration": {k: v for k, v in vars(ccfg).items()},
        "calibration_settings": bundle.extra.get("calibration", {}),
        "info": qm.info,
        "float_bytes": tree_bytes({"params": bundle.params}),
        "device": _device(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    t1 = time.perf_counter()
    save_quantized(a.out, qm, meta)
    qm.info["seconds"]["save"] = time.perf_counter() - t1
    meta["info"] = qm.info
    (Path(a.out) / META_NAME).write_text(
        json.dumps(
            {**json.loads((Path(a.out) / META_NAME).read_text()), "info": qm.info}, indent=2, default=json_default
        )
        + "\n"
    )
    write_reports(Path(a.out), bundle, qm, meta)
    print(f"wrote {a.out}/{CKPT_NAME}, report.md, report.json ({time.perf_counter() - t0:.1f} s)")
    return 0


def format_metrics(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of evaluation rows."""
    head = (
        f"{'model':<22} {'MiB':>7} {'bpw':>6} {'PSNR dB':>8} {'SSIM':>6} {'flicker':>8} {'warp d':>8} {'sample s':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['name']:<22} {r['weight_bytes'] / 2**20:>7.3f} {r['bits_per_weight']:>6.2f} {r['psnr']:>8.2f} "
            f"{r['ssim']:>6.3f} {r.get('flicker', float('nan')):>8.4f} {r.get('warp_error_delta', float('nan')):>8.5f} "
            f"{r['sample_s']:>8.2f}"
        )
    return "\n".join(lines)


def eval_parser() -> argparse.ArgumentParser:
    """The options of ``jquant eval``."""
    p = ArgumentParser(
        prog="jquant eval",
        description="Sample the float and the quantized model on the same noise "
        "and conditioning and report fidelity metrics (PSNR, SSIM, flicker, error per step).",
    )
    p.add_argument("ckpt_dir", help="a `jquant quantize` output folder")
    p.add_argument("--model", default=None, help="the float model folder (default: the one recorded at quantization)")
    p.add_argument("--clips", type=int, default=4, help="samples (classes/prompts cycle from 0)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (same noise for both models)")
    p.add_argument("--out", default=None, help="where to write eval.json (default: CKPT_DIR)")
    p.add_argument("--outliers", action="store_true", help=outlier_report.HELP)
    return p


def main_eval(argv: list[str] | None = None) -> int:
    """`jquant eval CKPT_DIR [--model MODEL_DIR] [--clips N] [--seed S] [--out DIR]`."""
    p = eval_parser()
    a = p.parse_args(argv)
    if a.clips < 1:
        p.error(f"--clips must be >= 1, got {a.clips}")
    qm, meta = load_quantized(a.ckpt_dir)
    model_dir = a.model or meta["model_dir"]
    try:
        resolve_model_dir(model_dir)
    except OSError as e:
        raise FileNotFoundError(
            f"{e}" + ("" if a.model else " (the model folder recorded at quantization; pass --model)")
        ) from e
    bundle = load_bundle(model_dir, num_steps=int(meta["num_steps"]), **meta.get("bundle_kwargs", {}))
    if qm.table is not None and qm.table.num_steps != bundle.denoiser.num_steps:
        raise ValueError(
            f"the scale table has {qm.table.num_steps} steps; the sampler runs {bundle.denoiser.num_steps}"
        )
    if a.outliers:
        outlier_report.report_recorded(bundle, meta, a.out or a.ckpt_dir)
    work = bundle.workload(a.clips, a.seed)
    ref = reference(bundle, work)
    row = evaluate(bundle, qm, ref)
    row.pop("videos")

    fl = {
        "name": "fp32",
        **weight_summary({"params": bundle.params}),
        "psnr": float("inf"),
        "ssim": 1.0,
        "flicker": 0.0,
        "warp_error_delta": 0.0,
        "sample_s": ref.sample_s,
    }
    print(format_metrics([fl, row]))
    print("error after each denoising step (RMS latent difference): " + " ".join(f"{e:.4f}" for e in row["step_rmse"]))
    out = Path(a.out or a.ckpt_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = {
        "model_dir": model_dir,
        "clips": a.clips,
        "seed": a.seed,
        "labels": list(work.labels),
        "device": _device(),
        **row,
    }
    (out / "eval.json").write_text(json.dumps(res, indent=2, default=json_default) + "\n")
    print(f"wrote {out / 'eval.json'}")
    return 0
