"""``jquant generate``: a prompt to a clip (Wan) or an image (Flux) from a diffusers pipeline folder.

    jquant generate Wan2.1-T2V-1.3B-Diffusers --prompt "a red fox in the snow" --recipe int8-w \\
        --frames 81 --height 480 --width 832 --steps 50 --guidance 5 --seed 0 --out fox.mp4

A thin wrapper over :func:`jquant.pipeline.t2v.load_pipeline` and
:func:`jquant.pipeline.t2v.save_frames`: a progress bar per sampling step, then the memory report
(resident and peak bytes per component) and the seconds per phase. ``--out``: ``.mp4`` (needs the
``video`` extra, imageio-ffmpeg), ``.gif``, ``.png`` (one image) or a folder of PNG frames.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax.numpy as jnp

from jquant.cli.common import ArgumentParser, UsageError
from jquant.models.wan_vae import Tiling
from jquant.pipeline import recipes as rc
from jquant.pipeline.t2v import TEXT_ENCODER_PRECISIONS, load_pipeline, mp4_available, save_frames

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def generate_parser() -> argparse.ArgumentParser:
    """The options of ``jquant generate``."""
    p = ArgumentParser(
        prog="jquant generate",
        description="Generate a clip (WanPipeline) or an image (FluxPipeline) from a diffusers pipeline folder: "
        "prompt encoding, the sampler with the transformer by recipe, VAE decoding; prints the memory per "
        "component. Text encoders run at int8 weight-only and the VAE in bfloat16 by default (the handbook's policy).",
    )
    p.add_argument("pipeline_dir", help="diffusers pipeline folder (model_index.json + component folders)")
    p.add_argument("--prompt", required=True, help="the prompt")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (Wan: CFG branch; Flux: with --true-cfg)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--recipe", help=f"quantize the transformer with this recipe first: {', '.join(rc.names())}")
    q.add_argument("--quantized", metavar="DIR", help="a `jquant quantize` output folder for the transformer")
    p.add_argument("--frames", type=int, default=None, help="frames, 1 + 4k for Wan (default 81; Flux: 1)")
    p.add_argument("--height", type=int, default=None, help="pixels (default Wan 480, Flux 1024)")
    p.add_argument("--width", type=int, default=None, help="pixels (default Wan 832, Flux 1024)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (Wan, default 5) or guidance (Flux, 3.5)")
    p.add_argument("--true-cfg", type=float, default=1.0, help="Flux: real CFG with --negative-prompt when > 1")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="transformer dtype (default bfloat16)")
    p.add_argument(
        "--text-encoder",
        default="int8",
        choices=TEXT_ENCODER_PRECISIONS,
        help="text encoders: int8 weight-only (default; the floor) or float (--dtype)",
    )
    p.add_argument("--vae-dtype", default="bfloat16", choices=sorted(DTYPES), help="VAE dtype (default bfloat16)")
    p.add_argument("--scheduler", choices=("euler",), default=None, help="sample a UniPC folder with flow-match Euler")
    p.add_argument(
        "--offload",
        nargs="+",
        default=(),
        metavar="COMPONENT",
        help="keep these components' weights in host memory, copied to the device for their call only "
        "(text_encoder, text_encoder_2, vae, transformer)",
    )
    p.add_argument(
        "--tiling",
        action="store_true",
        help="Wan: decode in overlapping 256-pixel spatial tiles (diffusers' enable_tiling defaults; for 720p)",
    )
    p.add_argument("--fps", type=int, default=16, help="frames per second of an .mp4/.gif (default 16)")
    p.add_argument("--out", required=True, help="clip.mp4 | clip.gif | image.png | a folder for PNG frames")
    return p


def main_generate(argv: list[str] | None = None) -> int:
    """``jquant generate PIPELINE_DIR --prompt ... --out FILE``."""
    a = generate_parser().parse_args(argv)
    out = Path(a.out)
    if out.suffix.lower() == ".mp4":
        if not mp4_available():
            raise UsageError(
                f"--out {out}: mp4 needs imageio-ffmpeg (pip install 'jquant[video]'); or write a .gif or a folder"
            )
    elif out.suffix and out.suffix.lower() not in (".gif", ".png"):
        raise UsageError(f"--out {out}: unknown output type {out.suffix!r}; use .mp4, .gif, .png or a folder")
    if a.recipe is not None and a.recipe not in rc.RECIPES:
        raise UsageError(rc.unknown_recipe_message(a.recipe, rc.names()))
    pipe = load_pipeline(
        a.pipeline_dir,
        recipe=a.recipe,
        quantized_dir=a.quantized,
        dtype=DTYPES[a.dtype],
        text_encoder=a.text_encoder,
        vae_dtype=DTYPES[a.vae_dtype],
        scheduler=a.scheduler,
        offload=a.offload,
    )
    result = pipe(
        a.prompt,
        negative_prompt=a.negative_prompt,
        frames=a.frames,
        height=a.height,
        width=a.width,
        steps=a.steps,
        guidance=a.guidance,
        true_cfg=a.true_cfg,
        seed=a.seed,
        tiling=Tiling() if a.tiling else None,
    )
    paths = save_frames(result.uint8()[0], out, fps=a.fps)
    f, h, w = result.frames.shape[1:4]
    print(f"wrote {out} ({f} frame{'s' * (f != 1)}, {h}x{w})" + (f", {len(paths)} files" if len(paths) > 1 else ""))
    print(result.memory)
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    return 0
