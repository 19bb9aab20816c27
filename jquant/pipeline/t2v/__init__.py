"""Text-to-video / text-to-image pipelines read from a diffusers pipeline directory.

:func:`load_pipeline` reads ``model_index.json`` and its component folders and builds the
equivalent of diffusers' ``WanPipeline`` (UMT5 + Wan transformer + AutoencoderKLWan) or
``FluxPipeline`` (CLIP + T5 + Flux transformer + AutoencoderKL), both on the flow-matching Euler
scheduler their ``scheduler/scheduler_config.json`` describes (static shift for Wan, dynamic
shift ``mu`` for Flux, as diffusers computes it)::

    pipe = load_pipeline("Wan2.1-T2V-1.3B-Diffusers", recipe="int8-w")
    out = pipe("a red fox in the snow", negative_prompt="blurry", frames=81, height=480, width=832,
               steps=50, guidance=5.0, seed=0)
    out.frames        # [B, F, H, W, 3] float32 in [0, 1] (Flux: F = 1)
    print(out.memory)  # resident and peak bytes per component

The handbook's advice is the default policy, each part overridable: text encoders at int8
weight-only (``text_encoder="float"`` keeps them in ``dtype``; nothing below int8 is
accepted), the VAE in bfloat16 (``vae_dtype``), the transformer by recipe (``recipe=``, a
name of :mod:`jquant.pipeline.recipes`, or ``quantized_dir=`` a ``jquant quantize`` output).

The sampler is a Python loop over ONE jitted, ahead-of-time compiled step function (so a
progress bar can advance per step); the transformer's weights are an argument of it, not
constants. The prompt embeddings are all that survives the text encoders: their activations
are freed before sampling starts.
"""

from jquant.pipeline.t2v.directory import (
    COMPONENTS,
    TEXT_ENCODER_PRECISIONS,
    PipelineError,
    flow_schedule,
    read_model_index,
    read_scheduler,
)
from jquant.pipeline.t2v.frames import mp4_available, save_frames
from jquant.pipeline.t2v.memory import ComponentMemory, MemoryReport
from jquant.pipeline.t2v.pipeline import (
    Generation,
    T2VPipeline,
    check_quantized,
    image_ids,
    load_pipeline,
    pack_latents,
    unpack_latents,
)
from jquant.pipeline.t2v.solvers import UniPC, run_sampler, unipc_schedule

__all__ = [
    "COMPONENTS",
    "TEXT_ENCODER_PRECISIONS",
    "check_quantized",
    "ComponentMemory",
    "Generation",
    "MemoryReport",
    "PipelineError",
    "T2VPipeline",
    "UniPC",
    "flow_schedule",
    "image_ids",
    "load_pipeline",
    "mp4_available",
    "pack_latents",
    "read_model_index",
    "read_scheduler",
    "run_sampler",
    "save_frames",
    "unipc_schedule",
    "unpack_latents",
]
