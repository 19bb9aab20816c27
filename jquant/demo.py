"""`jquant demo`: quantize the bundled tiny video model and compare formats on the same noise.

Loads `models/assets/tiny_wan` (a small Wan2.1-architecture model trained on moving digits by
`scripts/train_tiny.py`), samples one clip per digit class with the jitted flow-match Euler
sampler and classifier-free guidance, once per format row:

* ``fp32``: the full-precision reference;
* ``W8A8``: round-to-nearest int8 weights (one scale per output channel) and dynamic per-token
  int8 activations;
* ``W4A16``: round-to-nearest int4 weights in groups of 64 along the input axis, float activations.

Layers whose roles (`models.layer_roles`) are ``embedder``, ``modulation`` or ``final`` stay in
float: they are a small share of the bytes and feed every token (patch/timestep/text embedders,
the adaLN projection, the output head). Each row reports weight bytes (all params), PSNR and SSIM
of its clips against the fp32 clips, the classifier accuracy of its clips (the fraction whose
predicted digit is the conditioned one; see docs/tiny_model.md) and the sampling time. The clips
are written side by side as a PNG grid and an animated GIF.

Rows are `DemoFormat(name, transform, act)` entries, so more recipes are one list item away.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

import jquant.nn
from jquant.metrics import psnr, ssim
from jquant.qarray import QArray
from jquant.rules import Rule, flatten_with_paths, leaf_nbytes, quantize_params
from jquant.sampling import sample_flow_euler

Params = Any
Roles = dict[str, tuple[str, ...]]
ParamsTransform = Callable[[Params, Roles], Params]

FLOAT_ROLES: tuple[str, ...] = ("embedder", "modulation", "final")


@dataclasses.dataclass(frozen=True)
class DemoFormat:
    """One table row: `transform(params, roles) -> params` (None: the float params unchanged) and
    the activation spec used inside `jquant.nn.quantized` (None: float activations)."""

    name: str
    transform: ParamsTransform | None = None
    act: str | None = None


def role_rules(roles: Roles, spec: str, keep_float: Sequence[str] = FLOAT_ROLES) -> list[Rule]:
    """Rules for `quantize_params`: kernels having any role in `keep_float` stay float, every
    other eligible weight gets `spec`."""
    keep = [(f"^{re.escape(path)}$", None) for path, r in sorted(roles.items()) if set(r) & set(keep_float)]
    return [*keep, (".*", spec)]


def rtn(spec: str, keep_float: Sequence[str] = FLOAT_ROLES) -> ParamsTransform:
    """Round-to-nearest weight quantization to `spec`, except layers with roles in `keep_float`."""

    def transform(params: Params, roles: Roles) -> Params:
        return quantize_params(params, role_rules(roles, spec, keep_float))[0]

    return transform


DEFAULT_FORMATS: tuple[DemoFormat, ...] = (
    DemoFormat("fp32"),
    DemoFormat("W8A8 int8/token", rtn("int8"), "int8/token"),
    DemoFormat("W4A16 int4/g64", rtn("int4/g64"), None),
)


def weight_bytes(params: Params) -> int:
    """Bytes of every leaf (QArrays counted packed, with their scales)."""
    return sum(leaf_nbytes(leaf) for _, leaf in flatten_with_paths(params))


def _has_qarray(params: Params) -> bool:
    return any(isinstance(leaf, QArray) for _, leaf in flatten_with_paths(params))


def _velocity(model: Any, act: str | None, quantized: bool, params: Params, x: jax.Array, t: jax.Array,
              cond: jax.Array, _step: Any) -> jax.Array:
    """Sampler model_fn: the Wan velocity, run through jquant.nn when anything is quantized."""
    from models.tiny_wan import velocity

    if not quantized:
        return velocity(model, params, x, t, cond)
    with jquant.nn.quantized(act=act):
        return velocity(model, params, x, t, cond)


class _CompileClock:
    """Seconds JAX spends tracing, lowering and compiling (jax.monitoring duration events)."""

    seconds = 0.0
    _registered = False

    @classmethod
    def install(cls) -> None:
        if not cls._registered:
            jax.monitoring.register_event_duration_secs_listener(cls._listen)
            cls._registered = True

    @classmethod
    def _listen(cls, event: str, duration: float, **_: Any) -> None:
        if event.startswith("/jax/core/compile/"):
            cls.seconds += duration


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
    head = f"{'format':<18} {'weight bytes':>13} {'PSNR dB':>8} {'SSIM':>6} {'class acc':>9} {'sample s':>9} {'compile s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['format']:<18} {r['weight_bytes']:>13,} {r['psnr']:>8.2f} {r['ssim']:>6.3f} "
            f"{r['accuracy']:>9.2f} {r['sample_s']:>9.2f} {r['compile_s']:>9.2f}"
        )
    return "\n".join(lines)


def _finite_or_none(x: Any) -> Any:
    """JSON-safe copy: non-finite floats (the reference's PSNR is inf) become None."""
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_or_none(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def run_demo(
    out_dir: str = "jquant-demo",
    num_clips: int = 8,
    steps: int = 16,
    seed: int = 0,
    *,
    formats: Sequence[DemoFormat] = DEFAULT_FORMATS,
    model_dir: str | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample `num_clips` clips (digits 0, 1, ... cycling) under every format on the same noise;
    write grid.png, clips.gif and results.json under `out_dir`; return the results.

    The first format is the reference the others' PSNR/SSIM are measured against.
    `model_dir` defaults to the bundled model; `guidance_scale` to the one stored with it.
    """
    from tqdm.auto import tqdm

    import models
    from models import tiny_wan as tw

    if num_clips < 1 or steps < 1:
        raise ValueError(f"run_demo: num_clips and steps must be >= 1, got num_clips={num_clips}, steps={steps}")
    if not formats:
        raise ValueError("run_demo: formats is empty")
    t_start = time.perf_counter()
    _CompileClock.install()
    bundle = tw.load_tiny(model_dir or tw.ASSET_DIR)
    roles = models.layer_roles(bundle.config, bundle.params)
    sampling = bundle.meta["sampling"]
    guidance = float(sampling["guidance_scale"] if guidance_scale is None else guidance_scale)
    labels = jnp.arange(num_clips) % tw.NUM_CLASSES
    x_T = jax.random.normal(jax.random.key(seed), bundle.latent_shape(num_clips), jnp.float32)
    text = bundle.text(labels)
    uncond = bundle.null_text(num_clips)

    results: list[dict[str, Any]] = []
    clips_by_format: list[np.ndarray] = []
    for fmt in tqdm(formats, desc="formats", disable=not progress):
        params = bundle.params if fmt.transform is None else fmt.transform(bundle.params, roles)
        quantized = fmt.act is not None or _has_qarray(params)
        fn = Partial(functools.partial(_velocity, bundle.model, fmt.act, quantized), params)
        compile_before = _CompileClock.seconds
        t0 = time.perf_counter()
        latents = sample_flow_euler(
            fn, x_T, text, num_steps=steps, shift=float(sampling["shift"]), guidance_scale=guidance, uncond=uncond
        )
        clips = np.asarray(jax.block_until_ready(tw.latents_to_clips(latents)))
        wall = time.perf_counter() - t0
        compile_s = min(wall, _CompileClock.seconds - compile_before)
        clips_by_format.append(clips)
        ref, test = clips_by_format[0][..., None], clips[..., None]
        results.append(
            {
                "format": fmt.name,
                "act": fmt.act,
                "weight_bytes": weight_bytes(params),
                "psnr": float(np.mean(np.asarray(psnr(ref, test)))),
                "ssim": float(np.mean(np.asarray(ssim(ref, test)))),
                "accuracy": tw.sample_accuracy(bundle.classifier, bundle.classifier_params, jnp.asarray(clips), labels),
                "sample_s": wall - compile_s,
                "compile_s": compile_s,
            }
        )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, gif = write_media(out, clips_by_format, [r["format"] for r in results])
    summary = {
        "rows": results,
        "num_clips": num_clips,
        "labels": np.asarray(labels).tolist(),
        "steps": steps,
        "guidance_scale": guidance,
        "seed": seed,
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        "png": str(png),
        "gif": str(gif),
        "total_s": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(_finite_or_none(summary), indent=2) + "\n")
    summary["table"] = format_table(results)
    return summary


def main(argv: list[str] | None = None) -> int:
    """`jquant demo [--out DIR] [--clips N] [--steps N] [--seed N]`."""
    p = argparse.ArgumentParser(prog="jquant demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="jquant-demo", help="output folder (default: ./jquant-demo)")
    p.add_argument("--clips", type=int, default=8, help="clips per format, one per digit class 0, 1, ...")
    p.add_argument("--steps", type=int, default=16, help="flow-match Euler steps")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    a = p.parse_args(argv)
    res = run_demo(a.out, num_clips=a.clips, steps=a.steps, seed=a.seed)
    print()
    print(res["table"])
    print(
        f"\nPSNR/SSIM against fp32 on the same noise; class acc = share of clips the bundled classifier "
        f"names as the digit they were conditioned on ({res['num_clips']} clips, digits {res['labels']})."
    )
    print(f"wrote {res['png']} and {res['gif']} ({res['total_s']:.0f} s in all)")
    return 0
