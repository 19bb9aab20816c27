"""Model bundles for every ported family, and :func:`load_bundle`, which picks one from a directory.

:mod:`jquant.pipeline.denoiser` holds the Wan and DiT bundles; this module adds Flux,
HunyuanVideo, CogVideoX, Mochi-1, LTX-Video and LTX-2, each wired to its pipeline's sampler:

=============  ======================================================  ============================
family         sampler (``Denoiser``)                                  guidance (defaults)
=============  ======================================================  ============================
Flux           flow Euler, sigmas ``linspace(1, 1/n, n)``, dynamic     embedded 3.5 (guidance-
               shift ``mu`` of the packed token count (dev); none      distilled configs), no CFG
               (schnell)
HunyuanVideo   flow Euler, shift 7 on ``linspace(1, 0, n + 1)[:-1]``   embedded 6.0, no CFG
CogVideoX      DDIM, **v-prediction**, CogVideoX's SNR-shifted alphas  CFG 6.0
               (``cogvideox_ddim_schedule``; the 2B scheduler for the
               2B width 1920, the 5B one otherwise)
Mochi-1        flow Euler, inverted linear-quadratic sigmas            CFG 4.5
LTX-Video      flow Euler, dynamic shift of the token count,           CFG 3.0
               ``shift_terminal`` 0.1
LTX-2          flow Euler as LTX (no terminal shift); video and audio  CFG 3.0 (one scale for both:
               latents stepped together (``ltx2.pack_av``)             diffusers' audio scale is 7)
=============  ======================================================  ============================

A transformer directory (``config.json``) calibrates on seeded stand-in conditioning: text
embeddings of the model's text width (``text_tokens`` tokens), pooled projections and embedded
guidance where the port takes them, zeros as the CFG branch; the latent grid ``frames x height
x width`` is in **latent units** (after the VAE, before patching) and must be a multiple of the
patch. A diffusers *pipeline* directory (``model_index.json``) of Wan or Flux calibrates on real
prompts through its own text encoders (:func:`pipeline_bundle`; the grid in **pixels**, as
``jquant generate`` takes it); other families' pipeline directories calibrate their
``transformer/`` subfolder on stand-in conditioning.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jquant import models
from jquant.models import hunyuan_video, ltx2, ltx_video, mochi
from jquant.pipeline.denoiser import (
    Denoiser,
    ModelBundle,
    PyTree,
    SettingError,
    Variables,
    Workload,
    calibration_info,
    check_grid,
    dit_bundle,
    latents_as_video,
    tiny_wan_bundle,
    wan_bundle,
    wan_frames,
)
from jquant.pipeline.t2v import load_pipeline
from jquant.pipeline.t2v.pipeline import flux_apply
from jquant.sampling import (
    COGVIDEOX_2B_SCHEDULER,
    COGVIDEOX_5B_SCHEDULER,
    cogvideox_ddim_schedule,
    flow_match_schedule,
    flux_mu,
)

Array = jax.Array

#: Prompts ``jquant quantize`` calibrates a pipeline directory on without ``--prompts``.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a red fox trotting through fresh snow in a pine forest, morning light",
    "a busy city street at night in the rain, neon reflections on the asphalt",
    "close-up of a hummingbird hovering beside a purple flower",
    "waves crashing against black volcanic rocks at sunset",
    "an astronaut riding a horse across a desert, cinematic wide shot",
    "a bowl of ramen with steam rising, shot from above",
    "a golden retriever puppy playing with a ball on green grass",
    "timelapse of clouds drifting over snow-capped mountains",
)
#: Pipeline classes whose text encoders jquant runs (the rest calibrate ``transformer/`` on stand-ins).
PROMPT_PIPELINES = ("WanPipeline", "FluxPipeline")
#: ``jquant generate``'s defaults per pipeline class: frames, height, width (pixels), steps, guidance.
PIPELINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "WanPipeline": {"frames": 81, "height": 480, "width": 832, "num_steps": 50, "guidance": 5.0},
    "FluxPipeline": {"frames": 1, "height": 1024, "width": 1024, "num_steps": 28, "guidance": 3.5},
}


def _keys(seed: int, start: int, n: int) -> Array:
    """``n`` keys of one workload (its seed and first sample index)."""
    return jax.random.split(jax.random.fold_in(jax.random.key(seed), start), n)


def _draws(seed: int, start: int, *shapes: tuple[int, ...]) -> tuple[Array, ...]:
    """A workload's standard-normal float32 draws, the ``i``-th of ``shapes`` from the ``i``-th of
    its :func:`_keys`, made by one compiled program (drawn one by one, each shape and each
    key's indexing compiles a program of its own)."""
    return _normals(_keys(seed, start, len(shapes)), shapes)


@functools.partial(jax.jit, static_argnums=1)
def _normals(keys: Array, shapes: tuple[tuple[int, ...], ...]) -> tuple[Array, ...]:
    return tuple(jax.random.normal(keys[i], shape, jnp.float32) for i, shape in enumerate(shapes))


def _bt(t: Array, batch: int, dtype: Any = jnp.float32) -> Array:
    """The sampler's scalar timestep as a ``[batch]`` vector."""
    return jnp.broadcast_to(jnp.asarray(t).astype(dtype), (batch,))


def _bundle(den: Denoiser, params: PyTree, config: Any, workload: Callable[..., Workload], info: dict, to_video=None):
    return ModelBundle(
        den,
        params,
        models.layer_roles(config, params),
        workload,
        to_video or latents_as_video,
        config,
        {"calibration": info},
    )


def _stand_in(text_tokens: int) -> str:
    return f"stand-in: seeded random text embeddings ({text_tokens} tokens), zeros for the CFG branch"


# --- Flux ------------------------------------------------------------------------------------------
def flux_schedule(num_steps: int, height: int, width: int, dynamic: bool):
    """FluxPipeline's schedule on ``linspace(1, 1/n, n)``: with ``dynamic`` (FLUX.1-dev) the shift
    ``mu`` of the packed token count (diffusers' defaults 0.5..1.15 over 256..4096 tokens)."""
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
    if not dynamic:
        return flow_match_schedule(sigmas=sigmas)
    return flow_match_schedule(sigmas=sigmas, use_dynamic_shifting=True, mu=flux_mu((height // 2) * (width // 2)))


def flux_bundle(
    model: nn.Module,
    params: PyTree,
    config: models.FluxConfig,
    *,
    num_steps: int = 12,
    guidance: float = 3.5,
    guidance_scale: float = 1.0,
    frames: int = 1,
    height: int = 64,
    width: int = 64,
    text_tokens: int = 16,
    source: str = "flux",
) -> ModelBundle:
    """Flux: stand-in T5 embeddings and pooled CLIP projections, embedded ``guidance`` on
    guidance-distilled configs, no CFG branch by default (``guidance_scale`` > 1: real CFG on
    zeros); unpacked latents ``[B, in_channels / 4, height, width]`` (latent units, even)."""
    if frames != 1:
        raise SettingError(f"{source}: Flux generates images: frames must be 1, got {frames}", ("frames",))
    check_grid(source, 1, height, width, (1, 2, 2))
    dynamic = bool(config.guidance_embeds)
    den = Denoiser(
        model,
        flux_apply,
        "flow",
        num_steps,
        guidance_scale=guidance_scale,
        name="flux",
        schedule_fn=lambda n: flux_schedule(n, height, width, dynamic),
    )
    channels = config.in_channels // 4

    def workload(n: int, seed: int, start: int = 0) -> Workload:
        x_T, embeds, pooled = _draws(
            seed,
            start,
            (n, channels, height, width),
            (n, text_tokens, config.joint_attention_dim),
            (n, config.pooled_projection_dim),
        )
        cond = {"embeds": embeds, "pooled": pooled}
        uncond = jax.tree.map(jnp.zeros_like, cond)
        if config.guidance_embeds:
            cond["guidance"] = uncond["guidance"] = jnp.full((n,), guidance, jnp.float32)
        return Workload(x_T, cond, uncond, tuple(range(start, start + n)))

    info = calibration_info(
        frames=1,
        height=height,
        width=width,
        units="latent",
        den=den,
        text=_stand_in(text_tokens),
        embedded_guidance=guidance if config.guidance_embeds else None,
    )
    return _bundle(den, params, config, workload, info)


# --- HunyuanVideo ----------------------------------------------------------------------------------
def hunyuan_apply(module: nn.Module, variables: Variables, x: Array, t: Array, cond: dict[str, Array]) -> Array:
    """HunyuanVideo on ``[B, C, F, H, W]``; ``cond``: ``embeds``, ``pooled``, ``guidance`` (scale * 1000)."""
    return module.apply(variables, x, _bt(t, x.shape[0]), cond["embeds"], None, cond["pooled"], cond.get("guidance"))


def hunyuan_bundle(
    model: nn.Module,
    params: PyTree,
    config: models.HunyuanVideoConfig,
    *,
    num_steps: int = 12,
    guidance: float = 6.0,
    guidance_scale: float = 1.0,
    frames: int = 4,
    height: int = 32,
    width: int = 32,
    text_tokens: int = 16,
    source: str = "hunyuan_video",
) -> ModelBundle:
    """HunyuanVideo: stand-in LLaMA embeddings and pooled CLIP projections, embedded ``guidance``
    (6.0, as the pipeline), no CFG branch by default; latents ``[B, C, frames, height, width]``."""
    check_grid(source, frames, height, width, config.patch)
    den = Denoiser(
        model,
        hunyuan_apply,
        "flow",
        num_steps,
        shift=7.0,
        guidance_scale=guidance_scale,
        frames_fn=wan_frames(config.patch),
        name="hunyuan_video",
        schedule_fn=lambda n: flow_match_schedule(sigmas=hunyuan_video.flow_shift_sigmas(n), shift=7.0),
    )

    def workload(n: int, seed: int, start: int = 0) -> Workload:
        x_T, embeds, pooled = _draws(
            seed,
            start,
            (n, config.in_channels, frames, height, width),
            (n, text_tokens, config.text_embed_dim),
            (n, config.pooled_projection_dim),
        )
        cond = {"embeds": embeds, "pooled": pooled}
        uncond = jax.tree.map(jnp.zeros_like, cond)
        if config.guidance_embeds:
            cond["guidance"] = uncond["guidance"] = jnp.full((n,), guidance * 1000.0, jnp.float32)
        return Workload(x_T, cond, uncond, tuple(range(start, start + n)))

    info = calibration_info(
        frames=frames,
        height=height,
        width=width,
        units="latent",
        den=den,
        text=_stand_in(text_tokens),
        embedded_guidance=guidance if config.guidance_embeds else None,
    )
    return _bundle(den, params, config, workload, info)


# --- CogVideoX -------------------------------------------------------------------------------------
def cogvideox_apply(module: nn.Module, variables: Variables, x: Array, t: Array, cond: Array) -> Array:
    """CogVideoX on ``[B, F, C, H, W]`` with the int DDIM timestep; ``ofs`` 2.0 on configs with an
    ofs embedding (as CogVideoXPipeline)."""
    ofs = jnp.full((x.shape[0],), 2.0, jnp.float32) if module.config.ofs_embed_dim is not None else None
    return module.apply(variables, x, cond, _bt(t, x.shape[0], jnp.int32), ofs)


def cogvideox_frames(patch: tuple[int, int, int]) -> Callable[[tuple[int, ...]], tuple[int, int]]:
    """``[B, F, C, H, W] -> (F / pt, video tokens)`` (CogVideoX's frame-major patchify)."""
    pt, ph, pw = patch

    def fn(shape: tuple[int, ...]) -> tuple[int, int]:
        f = shape[1] // pt
        return f, f * (shape[3] // ph) * (shape[4] // pw)

    return fn


def cogvideox_bundle(
    model: nn.Module,
    params: PyTree,
    config: models.CogVideoXConfig,
    *,
    num_steps: int = 12,
    guidance_scale: float = 6.0,
    frames: int = 4,
    height: int | None = None,
    width: int | None = None,
    text_tokens: int | None = None,
    source: str = "cogvideox",
) -> ModelBundle:
    """CogVideoX: **v-prediction DDIM** (``Denoiser(sampler="ddim", prediction_type="v_prediction")``
    on ``cogvideox_ddim_schedule``, CogVideoXDDIMScheduler exactly), CFG 6 on zeros, stand-in T5
    embeddings of ``max_text_seq_length`` tokens (the pipeline's 226); latents
    ``[B, frames, C, height, width]``. Height and width default to the config's sample size with
    learned position embeddings (which need it), else 32."""
    learned = config.use_learned_positional_embeddings
    height = height or (config.sample_height if learned else 32)
    width = width or (config.sample_width if learned else 32)
    text_tokens = text_tokens or config.max_text_seq_length
    check_grid(source, frames, height, width, config.patch)
    if learned and (height, width) != (config.sample_height, config.sample_width):
        raise SettingError(
            f"{source}: learned position embeddings need the sample size {config.sample_height}x{config.sample_width}, "
            f"got height x width {height}x{width}",
            ("height", "width"),
        )
    sched = COGVIDEOX_2B_SCHEDULER if config.inner_dim == 1920 else COGVIDEOX_5B_SCHEDULER
    den = Denoiser(
        model,
        cogvideox_apply,
        "ddim",
        num_steps,
        guidance_scale=guidance_scale,
        frames_fn=cogvideox_frames(config.patch),
        name="cogvideox",
        prediction_type="v_prediction",
        schedule_fn=lambda n: cogvideox_ddim_schedule(n, **sched),
    )

    def workload(n: int, seed: int, start: int = 0) -> Workload:
        x_T, text = _draws(
            seed, start, (n, frames, config.in_channels, height, width), (n, text_tokens, config.text_embed_dim)
        )
        return Workload(x_T, text, jnp.zeros_like(text), tuple(range(start, start + n)))

    def to_video(latents: Array) -> tuple[Array, float | None]:
        return jnp.moveaxis(jnp.asarray(latents, jnp.float32), 2, -1), None

    info = calibration_info(
        frames=frames,
        height=height,
        width=width,
        units="latent",
        den=den,
        text=_stand_in(text_tokens),
        snr_shift_scale=sched["snr_shift_scale"],
    )
    return _bundle(den, params, config, workload, info, to_video)


# --- Mochi -----------------------------------------------------------------------------------------
def mochi_apply(module: nn.Module, variables: Variables, x: Array, t: Array, cond: Array) -> Array:
    """Mochi on ``[B, C, F, H, W]``, all text tokens real (no mask)."""
    return module.apply(variables, x, cond, _bt(t, x.shape[0]), None)


def mochi_schedule(num_steps: int):
    """MochiPipeline's linear-quadratic sigmas through the inverted-sigma flow-match scheduler."""
    return flow_match_schedule(sigmas=list(mochi.linear_quadratic_sigmas(num_steps)), invert_sigmas=True)


def mochi_bundle(
    model: nn.Module,
    params: PyTree,
    config: models.MochiConfig,
    *,
    num_steps: int = 12,
    guidance_scale: float = 4.5,
    frames: int = 4,
    height: int = 32,
    width: int = 32,
    text_tokens: int = 16,
    source: str = "mochi",
) -> ModelBundle:
    """Mochi-1: stand-in T5 embeddings, CFG 4.5 on zeros, at least 2 steps (the linear-quadratic
    schedule's two halves); latents ``[B, C, frames, height, width]``."""
    if num_steps < 2:
        raise SettingError(
            f"{source}: Mochi's linear-quadratic schedule needs at least 2 steps, got {num_steps}", ("num_steps",)
        )
    patch = config.patch
    check_grid(source, frames, height, width, patch)
    den = Denoiser(
        model,
        mochi_apply,
        "flow",
        num_steps,
        guidance_scale=guidance_scale,
        frames_fn=wan_frames(patch),
        name="mochi",
        schedule_fn=mochi_schedule,
    )

    def workload(n: int, seed: int, start: int = 0) -> Workload:
        x_T, text = _draws(
            seed, start, (n, config.in_channels, frames, height, width), (n, text_tokens, config.text_embed_dim)
        )
        return Workload(x_T, text, jnp.zeros_like(text), tuple(range(start, start + n)))

    info = calibration_info(
        frames=frames, height=height, width=width, units="latent", den=den, text=_stand_in(text_tokens)
    )
    return _bundle(den, params, config, workload, info)


# --- LTX-Video and LTX-2 ---------------------------------------------------------------------------
def pack_video(x: Array, pt: int, p: int) -> Array:
    """LTXPipeline._pack_latents: ``[B, C, F, H, W] -> [B, F/pt * H/p * W/p, C * pt * p * p]``."""
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f // pt, pt, h // p, p, w // p, p).transpose(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (f // pt) * (h // p) * (w // p), c * pt * p * p)


def unpack_video(z: Array, shape: Sequence[int], pt: int, p: int) -> Array:
    """Inverse of :func:`pack_video` for latents of ``shape`` ``[B, C, F, H, W]``."""
    b, c, f, h, w = shape
    z = z.reshape(b, f // pt, h // p, w // p, c, pt, p, p).transpose(0, 4, 1, 5, 2, 6, 3, 7)
    return z.reshape(b, c, f, h, w)


def _ltx_grid(config: Any, source: str, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """``(latent channels, token frames, rows, columns)`` of an LTX grid, checked."""
    pt, p = config.patch_size_t, config.patch_size
    check_grid(source, frames, height, width, (pt, p, p))
    if config.in_channels % (pt * p * p):
        raise ValueError(f"{source}: in_channels {config.in_channels} is not a multiple of the patch volume")
    return config.in_channels // (pt * p * p), frames // pt, height // p, width // p


def ltx_video_bundle(
    model: nn.Module,
    params: PyTree,
    config: models.LTXVideoConfig,
    *,
    num_steps: int = 12,
    guidance_scale: float = 3.0,
    frames: int = 4,
    height: int = 16,
    width: int = 16,
    text_tokens: int = 16,
    frame_rate: float = 25.0,
    source: str = "ltx_video",
) -> ModelBundle:
    """LTX-Video: stand-in T5 embeddings, CFG 3 on zeros, the dynamic-shift schedule of the token
    count with ``shift_terminal`` 0.1, RoPE interpolation ``(8 / frame_rate, 32, 32)``; latents
    ``[B, C, frames, height, width]`` (packed inside the step)."""
    c, f, h, w = _ltx_grid(config, source, frames, height, width)
    pt, p = config.patch_size_t, config.patch_size
    static = dict(num_frames=f, height=h, width=w, rope_interpolation_scale=(8 / frame_rate, 32.0, 32.0))

    def apply(module: nn.Module, variables: Variables, x: Array, t: Array, cond: Array) -> Array:
        out = module.apply(variables, pack_video(x, pt, p), cond, _bt(t, x.shape[0]), None, **static)
        return unpack_video(out, x.shape, pt, p)

    den = Denoiser(
        model,
        apply,
        "flow",
        num_steps,
        guidance_scale=guidance_scale,
        frames_fn=wan_frames((pt, p, p)),
        name="ltx_video",
        schedule_fn=lambda n: flow_match_schedule(**ltx_video.flow_schedule_kwargs(n, f * h * w)),
    )

    def workload(n: int, seed: int, start: int = 0) -> Workload:
        x_T, text = _draws(seed, start, (n, c, frames, height, width), (n, text_tokens, config.caption_channels))
        return Workload(x_T, text, jnp.zeros_like(text), tuple(range(start, start + n)))

    info = calibration_info(
        frames=frames, height=height, width=width, units="latent", den=den, text=_stand_in(text_tokens)
    )
    return _bundle(den, params, config, workload, info)


def ltx2_audio_frames(config: models.LTX2Config, frames: int, fps: float = 24.0) -> int:
    """LTX2Pipeline's audio latent count for ``frames`` latent frames: the clip's duration
    (``(frames - 1) * temporal ratio + 1`` pixel frames at ``fps``) times 16 kHz / hop / audio ratio."""
    pixel_frames = (frames - 1) * config.vae_scale_factors[0] + 1
    per_second = config.audio_sampling_rate / config.audio_hop_length / config.audio_scale_factor
    return max(1, round(pixel_frames / fps * per_second))


def ltx2_bundle(
    model: nn.Module,
    params: PyTree,
    config: models.LTX2Config,
    *,
    num_steps: int = 12,
    guidance_scale: float = 3.0,
    frames: int = 4,
    height: int = 16,
    width: int = 16,
    audio_frames: int | None = None,
    text_tokens: int = 16,
    fps: float = 24.0,
    source: str = "ltx2",
) -> ModelBundle:
    """LTX-2 (audio + video): video latents ``[B, C, frames, height, width]`` and audio latents
    ``[B, audio_frames, audio_in_channels]`` (default: the clip's duration, as the pipeline)
    stepped together as one flat array (``ltx2.pack_av``), stand-in caption embeddings for both
    streams, one CFG scale 3 for both, the LTX dynamic-shift schedule without terminal shift."""
    c, f, h, w = _ltx_grid(config, source, frames, height, width)
    pt, p = config.patch_size_t, config.patch_size
    a_frames = audio_frames or ltx2_audio_frames(config, frames, fps)
    v_shape, a_shape = (c, frames, height, width), (a_frames, config.audio_in_channels)
    static = dict(num_frames=f, height=h, width=w, fps=fps, audio_num_frames=a_frames)

    def apply(module: nn.Module, variables: Variables, x: Array, t: Array, cond: dict[str, Array]) -> Array:
        video, audio = ltx2.unpack_av(x, v_shape, a_shape)
        tb = _bt(t, x.shape[0])
        v, a = module.apply(
            variables, pack_video(video, pt, p), audio, cond["embeds"], cond["audio_embeds"], tb, sigma=tb, **static
        )
        return ltx2.pack_av(unpack_video(v, video.shape, pt, p), a)

    den = Denoiser(
        model,
        apply,
        "flow",
        num_steps,
        guidance_scale=guidance_scale,
        frames_fn=lambda shape: (f, f * h * w),
        name="ltx2",
        schedule_fn=lambda n: flow_match_schedule(**ltx_video.flow_schedule_kwargs(n, f * h * w, shift_terminal=None)),
    )
    width_v = config.caption_channels if config.use_prompt_embeddings else config.cross_attention_dim
    width_a = config.caption_channels if config.use_prompt_embeddings else config.audio_cross_attention_dim

    def workload(n: int, seed: int, start: int = 0) -> Workload:
        video, audio, embeds, audio_embeds = _draws(
            seed, start, (n, *v_shape), (n, *a_shape), (n, text_tokens, width_v), (n, text_tokens, width_a)
        )
        cond = {"embeds": embeds, "audio_embeds": audio_embeds}
        return Workload(
            ltx2.pack_av(video, audio), cond, jax.tree.map(jnp.zeros_like, cond), tuple(range(start, start + n))
        )

    def to_video(latents: Array) -> tuple[Array, float | None]:
        video, _ = ltx2.unpack_av(jnp.asarray(latents, jnp.float32), v_shape, a_shape)
        return latents_as_video(video)

    info = calibration_info(
        frames=frames,
        height=height,
        width=width,
        units="latent",
        den=den,
        text=_stand_in(text_tokens),
        audio_frames=a_frames,
    )
    return _bundle(den, params, config, workload, info, to_video)


#: Config class -> bundle builder for transformer directories.
BUILDERS: dict[type, Callable[..., ModelBundle]] = {
    models.WanConfig: wan_bundle,
    models.DiTConfig: dit_bundle,
    models.FluxConfig: flux_bundle,
    models.HunyuanVideoConfig: hunyuan_bundle,
    models.CogVideoXConfig: cogvideox_bundle,
    models.MochiConfig: mochi_bundle,
    models.LTXVideoConfig: ltx_video_bundle,
    models.LTX2Config: ltx2_bundle,
}


# --- pipeline directories: real prompts --------------------------------------------------------------
def read_prompts(path: str | Path) -> tuple[str, ...]:
    """Prompts of a prompt file: one per line, blank lines and ``#`` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file (one prompt per line)")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    prompts = tuple(s.strip() for s in lines if s.strip() and not s.strip().startswith("#"))
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line; blank lines and # comments are skipped)")
    return prompts


def pipeline_class(path: str | Path) -> str | None:
    """``_class_name`` of a diffusers pipeline directory's ``model_index.json`` (None: not one)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    try:
        return str(json.loads(index.read_text()).get("_class_name"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{index}: corrupt: not valid JSON ({e})") from None


def pipeline_bundle(
    path: str | Path,
    *,
    prompts: Sequence[str] | None = None,
    num_steps: int | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    guidance: float | None = None,
    text_encoder: str = "int8",
) -> ModelBundle:
    """A Wan or Flux pipeline directory, calibrated on real prompts: each prompt through the
    pipeline's text encoder(s) (int8 weight-only by default, as ``jquant generate``) and the
    negative prompt ``""`` for the CFG branch; ``frames x height x width`` in pixels (defaults:
    ``jquant generate``'s, :data:`PIPELINE_DEFAULTS`). Samples cycle through the prompts.

    Wan: flow Euler at the scheduler's shift (``flow_shift`` of a UniPC directory: calibration
    records flow-match Euler's trajectory, as ``load_pipeline``'s recipes do), CFG ``guidance``.
    Flux: the pipeline's dynamic-shift schedule, embedded ``guidance``, no CFG branch.
    """
    path = Path(path)
    pipe = load_pipeline(path, dtype=jnp.float32, text_encoder=text_encoder)
    d = PIPELINE_DEFAULTS[pipe.kind]
    frames, height, width = frames or d["frames"], height or d["height"], width or d["width"]
    steps, guidance = num_steps or d["num_steps"], float(guidance if guidance is not None else d["guidance"])
    prompts = tuple(prompts or DEFAULT_PROMPTS)
    try:
        shape = pipe.latent_shape(1, frames, height, width)
    except ValueError as e:
        raise SettingError(f"{path}: {e}", ("frames", "height", "width")) from None
    wan = pipe.kind == "WanPipeline"
    cond, uncond = pipe.encode(list(prompts), [""] * len(prompts), True, guidance)
    cond, uncond = jax.block_until_ready((cond, uncond))
    sched = dataclasses.replace(pipe, encoders={}, params=None, vae=None, quantized=None)  # the schedule only
    den = pipe.denoiser(steps, wan)
    den = dataclasses.replace(
        den,
        guidance_scale=guidance if wan else 1.0,
        schedule_fn=None if wan else (lambda n: sched.schedule(n, shape)),
    )

    def workload(n: int, seed: int, start: int = 0) -> Workload:
        idx = (start + np.arange(n)) % len(prompts)
        (x_T,) = _draws(seed, start, (n, *shape[1:]))
        take = lambda a: jnp.asarray(a)[idx]  # noqa: E731
        return Workload(x_T, jax.tree.map(take, cond), jax.tree.map(take, uncond), tuple(int(i) for i in idx))

    encoders = " + ".join(f"{k} ({pipe.precisions.get(k, 'float')})" for k in pipe.encoders)
    info = calibration_info(
        frames=frames,
        height=height,
        width=width,
        units="pixels",
        den=den,
        text=f'{len(prompts)} prompts through {encoders}; negative prompt "" for the CFG branch',
        prompts=prompts,
        latent_shape=list(shape[1:]),
        embedded_guidance=None if wan else (guidance if pipe.config.guidance_embeds else None),
    )
    return _bundle(den, pipe.params, pipe.config, workload, info)


# --- the entry point ---------------------------------------------------------------------------------
def load_bundle(
    model_dir: str | Path,
    *,
    num_steps: int | None = None,
    prompts: Sequence[str] | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    **kwargs: Any,
) -> ModelBundle:
    """A :class:`ModelBundle` for a directory of any ported model.

    * ``tiny_wan.json``: the bundled tiny Wan with its digit classes (its own grid);
    * ``model_index.json`` of a Wan or Flux pipeline: :func:`pipeline_bundle` (real ``prompts``,
      default :data:`DEFAULT_PROMPTS`; grid in pixels);
    * ``model_index.json`` of another pipeline: its ``transformer/`` subfolder, as below
      (``extra["calibration"]["note"]`` says so);
    * ``config.json`` of a transformer: the family's builder in :data:`BUILDERS` with stand-in
      conditioning (grid in latent units).

    ``frames``, ``height``, ``width`` and ``kwargs`` (e.g. ``text_tokens``, ``guidance_scale``) go
    to the builder; None keeps its default.
    """
    path = Path(model_dir)
    grid = {k: v for k, v in (("frames", frames), ("height", height), ("width", width)) if v is not None}
    steps = {} if num_steps is None else {"num_steps": num_steps}
    if (path / "tiny_wan.json").is_file():
        if grid or prompts:
            raise SettingError(
                f"{path}: the bundled tiny Wan calibrates on its digit classes at its own grid",
                tuple(grid) + (("prompts",) if prompts else ()),
            )
        return tiny_wan_bundle(path, num_steps=num_steps)
    cls = pipeline_class(path)
    note = None
    if cls in PROMPT_PIPELINES:
        return pipeline_bundle(path, prompts=prompts, **steps, **grid, **kwargs)
    if prompts:
        raise SettingError(
            f"{path}: prompts are encoded for {' and '.join(PROMPT_PIPELINES)} directories (model_index.json with "
            "their text encoders); this is " + (f"a {cls} directory" if cls else "a transformer folder"),
            ("prompts",),
        )
    if cls is not None:
        if not (path / "transformer" / "config.json").is_file():
            raise FileNotFoundError(f"{path}: a {cls} directory without transformer/config.json")
        note = f"{cls}: jquant encodes prompts for {', '.join(PROMPT_PIPELINES)} only; transformer/ on stand-ins"
        path = path / "transformer"
    raw = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    model, params = models.load_pretrained(path)
    builder = BUILDERS.get(type(model.config))
    if builder is None:
        raise ValueError(
            f"{path}: no sampler wiring for {raw.get('_class_name', type(model.config).__name__)} "
            f"(wired: {', '.join(c.CLASS_NAME for c in BUILDERS)})"
        )
    bundle = builder(model, params, model.config, **steps, **grid, **kwargs, source=str(path))
    if note:
        bundle.extra["calibration"]["note"] = note
    return bundle


__all__ = [
    "BUILDERS",
    "DEFAULT_PROMPTS",
    "PIPELINE_DEFAULTS",
    "PROMPT_PIPELINES",
    "cogvideox_bundle",
    "flux_bundle",
    "hunyuan_bundle",
    "load_bundle",
    "ltx2_audio_frames",
    "ltx2_bundle",
    "ltx_video_bundle",
    "mochi_bundle",
    "pack_video",
    "pipeline_bundle",
    "pipeline_class",
    "read_prompts",
    "unpack_video",
]
