"""A ported model wired to its sampler and its default conditioning.

The pipeline (trajectory calibration, scale tables, recipes, CLI) never touches a model
directly: it goes through a :class:`Denoiser` (how to call the model inside the jitted
sampler: ``apply(variables, x, t, cond) -> prediction``, which sampler, how many steps,
the CFG scale, where the video frames are in the token sequence) and a :class:`Workload`
(the noise and conditioning of one batch of samples). :class:`ModelBundle` adds the float
params, the layer roles and how to turn latents into videos for the metrics.

This module holds the Wan2.1 bundles (the bundled tiny model with its class conditioning, the
captioned moving-shapes model of ``scripts/train_outlier_model.py``, or any Wan directory with
seeded stand-in text embeddings) and DiT's (class labels, DDIM, learned sigma);
:mod:`jquant.pipeline.bundles` adds the other ports (Flux, HunyuanVideo,
CogVideoX, Mochi, LTX-Video, LTX-2), the prompt-encoded pipeline directories and
:func:`~jquant.pipeline.bundles.load_bundle`, which picks one from a model directory.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jquant import models
from jquant.models import shapes_data as sd
from jquant.models import shapes_model as sm
from jquant.models import tiny_wan as tw
from jquant.sampling import (
    DDIMSchedule,
    FlowSchedule,
    ddim_schedule,
    flow_match_schedule,
    sample_ddim,
    sample_flow_euler,
)

Array = jax.Array
PyTree = Any
Variables = dict[str, Any]
ApplyFn = Callable[[nn.Module, Variables, Array, Array, PyTree], Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Denoiser:
    """How the pipeline calls one model inside a jitted sampler.

    Attributes:
      module: the Flax linen module.
      apply_fn: ``apply_fn(module, variables, x, t, cond) -> prediction`` with ``t`` the
        scalar timestep the sampler passes (broadcast inside).
      sampler: ``"flow"`` (flow-match Euler) or ``"ddim"``.
      num_steps: denoising steps.
      shift: flow-match timestep shift (unused with ``schedule_fn``).
      guidance_scale: CFG scale (1.0: no unconditional branch is run).
      learned_sigma: DDIM models whose output holds 2C channels (DiT).
      channel_axis: channel axis of the prediction (DiT latents are NCHW: 1).
      frames_fn: ``latent_shape -> (frames, video_tokens)`` when the model's token sequence
        is frame-major video tokens (per-frame scales); None for images.
      name: for reports.
      prediction_type: what a DDIM model predicts: ``"epsilon"`` (DiT), ``"v_prediction"``
        (CogVideoX) or ``"sample"``; flow models predict a velocity (ignored).
      schedule_fn: ``num_steps -> FlowSchedule`` (flow) or ``DDIMSchedule`` (ddim): the model's own
        schedule (Flux's and LTX's dynamic shift, Mochi's inverted linear-quadratic sigmas,
        CogVideoX's SNR-shifted alphas); None: ``flow_match_schedule(n, shift)`` /
        ``ddim_schedule(n)``.
    """

    module: nn.Module
    apply_fn: ApplyFn
    sampler: Literal["flow", "ddim"] = "flow"
    num_steps: int = 12
    shift: float = 1.0
    guidance_scale: float = 1.0
    learned_sigma: bool = False
    channel_axis: int = -1
    frames_fn: Callable[[tuple[int, ...]], tuple[int, int]] | None = None
    name: str = "model"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    schedule_fn: Callable[[int], FlowSchedule | DDIMSchedule] | None = None

    def __post_init__(self) -> None:
        if self.sampler not in ("flow", "ddim"):
            raise ValueError(f"Denoiser.sampler must be 'flow' or 'ddim', got {self.sampler!r}")
        if self.num_steps < 1:
            raise ValueError(f"Denoiser.num_steps must be >= 1, got {self.num_steps}")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"Denoiser.prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {self.prediction_type!r}"
            )

    @property
    def cfg(self) -> bool:
        """Whether sampling runs the unconditional branch (classifier-free guidance)."""
        return self.guidance_scale != 1.0

    def apply(self, variables: Variables, x: Array, t: Array, cond: PyTree) -> Array:
        return self.apply_fn(self.module, variables, x, t, cond)

    def schedule(self) -> FlowSchedule | DDIMSchedule:
        """The sampler's schedule at ``num_steps``."""
        if self.schedule_fn is not None:
            return self.schedule_fn(self.num_steps)
        if self.sampler == "flow":
            return flow_match_schedule(self.num_steps, shift=self.shift)
        return ddim_schedule(self.num_steps)

    def timesteps(self) -> np.ndarray:
        """The timesteps the sampler passes, step 0 (noisiest) first."""
        return np.asarray(self.schedule().timesteps, np.float32 if self.sampler == "flow" else np.int32)

    def with_steps(self, num_steps: int) -> "Denoiser":
        return dataclasses.replace(self, num_steps=num_steps)

    def sample(
        self, model_fn: Callable, work: "Workload", *, step_data: PyTree = None, return_trajectory: bool = False
    ):
        """Run the jitted sampler; ``model_fn(x, t, cond, step_slice)`` (a ``Partial``)."""
        uncond = work.uncond if self.cfg else None
        schedule = self.schedule()
        if self.sampler == "flow":
            return sample_flow_euler(
                model_fn,
                work.x_T,
                work.cond,
                schedule=schedule,
                guidance_scale=self.guidance_scale,
                uncond=uncond,
                step_data=step_data,
                return_trajectory=return_trajectory,
            )
        return sample_ddim(
            model_fn,
            work.x_T,
            work.cond,
            schedule=schedule,
            prediction_type=self.prediction_type,
            guidance_scale=self.guidance_scale,
            uncond=uncond,
            step_data=step_data,
            learned_sigma=self.learned_sigma,
            channel_axis=self.channel_axis,
            return_trajectory=return_trajectory,
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Workload:
    """One batch of samples: initial noise, conditioning and the CFG branch's conditioning."""

    x_T: Array
    cond: PyTree
    uncond: PyTree
    labels: tuple[int, ...] = ()

    @property
    def batch(self) -> int:
        return int(self.x_T.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class ModelBundle:
    """Everything the pipeline needs about one model.

    Attributes:
      denoiser: see :class:`Denoiser`.
      params: float params.
      roles: ``{kernel path: roles}`` (``models.layer_roles``).
      workload: ``(num_samples, seed, start=0) -> Workload``: seeded noise and the model's
        default conditioning (classes cycle from ``start``).
      to_video: latents -> ``(videos [B, T, H, W, C], data_range)`` for the metrics
        (``data_range`` None: the reference's peak-to-peak).
      config: the port's config dataclass.
      extra: model-specific objects (the tiny model's classifier; bundles without a judge have none).
    """

    denoiser: Denoiser
    params: PyTree
    roles: dict[str, tuple[str, ...]]
    workload: Callable[..., Workload]
    to_video: Callable[[Array], tuple[Array, float | None]]
    config: Any
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return int(self.config.attention_head_dim)


# --- Wan ---------------------------------------------------------------------------------------
def _wan_apply(module: nn.Module, variables: Variables, x: Array, t: Array, cond: Array) -> Array:
    tb = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    return module.apply(variables, x, tb, cond)


def wan_frames(patch: tuple[int, int, int]) -> Callable[[tuple[int, ...]], tuple[int, int]]:
    """``[B, C, F, H, W] -> (F / pt, number of tokens)`` for Wan's frame-major patchify."""
    pt, ph, pw = patch

    def fn(shape: tuple[int, ...]) -> tuple[int, int]:
        f, h, w = shape[2] // pt, shape[3] // ph, shape[4] // pw
        return f, f * h * w

    return fn


def latents_as_video(latents: Array) -> tuple[Array, float | None]:
    """Raw latents as videos ``[B, F, H, W, C]`` (no VAE here); the metrics take the data
    range from the reference (None)."""
    x = jnp.moveaxis(jnp.asarray(latents, jnp.float32), 1, -1)
    return (x if x.ndim == 5 else x[:, None]), None


def tiny_wan_bundle(path: str | Path | None = None, *, num_steps: int | None = None) -> ModelBundle:
    """The bundled tiny Wan (moving digits): class conditioning, its sampling defaults, its judge.

    Cached per (directory, steps): the same bundle (and so the same Denoiser, which keys the
    compiled samplers and calibration steps) comes back for the same arguments.
    """
    return _tiny_wan_bundle(str(Path(path or tw.ASSET_DIR).resolve()), num_steps)


def _bundled_wan_denoiser(b: Any, sampling: dict[str, Any], num_steps: int | None, name: str) -> Denoiser:
    """Flow-match Euler over a bundled Wan ``b`` (``model``, ``config``) with its sampling
    defaults (``num_steps``, or ``steps`` in older files; ``shift``; ``guidance_scale``);
    ``num_steps`` overrides the recorded steps."""
    return Denoiser(
        b.model,
        _wan_apply,
        "flow",
        int(num_steps or sampling.get("num_steps", sampling.get("steps", 12))),
        shift=float(sampling["shift"]),
        guidance_scale=float(sampling["guidance_scale"]),
        frames_fn=wan_frames(tuple(b.config.patch_size)),
        name=name,
    )


def _bundled_wan(
    b: Any,
    den: Denoiser,
    workload: Callable[..., Workload],
    to_video: Callable[[Array], tuple[Array, float | None]],
    *,
    units: str,
    text: str,
    extra: dict[str, Any],
) -> ModelBundle:
    """The bundle of a loaded bundled Wan ``b`` (``params``, ``config``, ``latent_shape``): its
    layer roles and, in ``extra``, what it calibrates on (one sample's latent grid)."""
    shape = tuple(b.latent_shape(1))
    info = calibration_info(frames=shape[2], height=shape[3], width=shape[4], units=units, den=den, text=text)
    roles = models.layer_roles(b.config, b.params)
    return ModelBundle(den, b.params, roles, workload, to_video, b.config, {**extra, "calibration": info})


@functools.lru_cache(maxsize=4)
def _tiny_wan_bundle(path: str, num_steps: int | None) -> ModelBundle:
    b = tw.load_tiny(path)
    den = _bundled_wan_denoiser(b, b.meta["sampling"], num_steps, "tiny_wan")

    def workload(n: int, seed: int, start: int = 0) -> Workload:
        labels = (start + jnp.arange(n)) % tw.NUM_CLASSES
        x_T = jax.random.normal(jax.random.key(seed), b.latent_shape(n), jnp.float32)
        return Workload(x_T, b.text(labels), b.null_text(n), tuple(int(v) for v in np.asarray(labels)))

    def to_video(latents: Array) -> tuple[Array, float | None]:
        return tw.latents_to_clips(latents)[..., None], 1.0

    extra = {"classifier": b.classifier, "classifier_params": b.classifier_params, "tiny": b}
    return _bundled_wan(b, den, workload, to_video, units="latent", text="digit classes", extra=extra)


#: Sampling defaults of a shapes model whose ``shapes_model.json`` records none (the trainer writes
#: none): those the tiny model's trainer picked, as both train by the same rectified-flow recipe
#: (logit-normal sigma, 10% condition dropout for CFG).
SHAPES_SAMPLING: dict[str, float] = {"num_steps": 20, "shift": 1.0, "guidance_scale": 5.0}


def shapes_caption_attributes(indices: np.ndarray) -> np.ndarray:
    """Attribute tuples int32 ``[N, 4]`` of caption indices ``[N]`` (any ints, taken modulo the
    number of attribute combinations, 288).

    Index ``i`` names the combination ``k = i * stride mod 288`` (``k``: mixed radix, object
    fastest), with ``stride = 1 + 4 + 4*6 + 4*6*3``, coprime to 288: consecutive indices step
    every attribute at once (so a few clips already mix objects, colours, motions and
    directions) and 288 consecutive indices visit every combination once.
    """
    sizes = [len(v) for _, v in sd.ATTRIBUTES]
    total = math.prod(sizes)
    stride = sum(math.prod(sizes[:j]) for j in range(len(sizes)))
    assert math.gcd(stride, total) == 1, (stride, total)
    k = (np.asarray(indices, np.int64) * stride) % total
    return np.stack([(k // math.prod(sizes[:j])) % n for j, n in enumerate(sizes)], axis=-1).astype(np.int32)


def shapes_caption_index(attrs: np.ndarray) -> np.ndarray:
    """The mixed-radix combination index ``k`` (object fastest) of attribute tuples ``[N, 4]``:
    the label identifying each caption."""
    sizes = [len(v) for _, v in sd.ATTRIBUTES]
    attrs = np.asarray(attrs, np.int64)
    return sum(attrs[..., j] * math.prod(sizes[:j]) for j in range(len(sizes)))


def shapes_bundle(path: str | Path, *, num_steps: int | None = None) -> ModelBundle:
    """A shapes model folder (``scripts/train_outlier_model.py``, the "trained" outlier testbed):
    caption conditioning through its UMT5 encoder, the empty caption as the CFG branch, RGB clips
    in [0, 1] for the metrics. No judge (no classifier ships with it).

    Sampling defaults come from ``shapes_model.json``'s ``"sampling"`` entry when present, else
    :data:`SHAPES_SAMPLING`. Cached per (resolved folder, steps), as :func:`tiny_wan_bundle`.
    """
    return _shapes_bundle(str(Path(path).resolve()), num_steps)


@functools.lru_cache(maxsize=4)
def _shapes_bundle(path: str, num_steps: int | None) -> ModelBundle:
    b = sm.load_shapes_model(path)
    den = _bundled_wan_denoiser(b, {**SHAPES_SAMPLING, **b.meta.get("sampling", {})}, num_steps, "shapes_wan")

    def workload(n: int, seed: int, start: int = 0) -> Workload:
        attrs = shapes_caption_attributes(np.arange(start, start + n))
        x_T = jax.random.normal(jax.random.key(seed), b.latent_shape(n), jnp.float32)
        labels = tuple(int(v) for v in shapes_caption_index(attrs))
        return Workload(x_T, b.text(sd.captions(attrs)), b.null_text(n), labels)

    def to_video(latents: Array) -> tuple[Array, float | None]:
        return sd.latents_to_clips(latents), 1.0

    return _bundled_wan(b, den, workload, to_video, units="pixels", text="template captions", extra={"shapes": b})


class SettingError(ValueError):
    """A calibration setting a model cannot take; ``names`` are the settings at fault
    (``frames``, ``height``, ``width``, ``num_steps``), for the CLI to name its flags."""

    def __init__(self, message: str, names: tuple[str, ...]) -> None:
        super().__init__(message)
        self.names = names


def check_grid(
    source: str, frames: int, height: int, width: int, patch: tuple[int, int, int], units: str = "latent"
) -> None:
    """Refuse a calibration grid the patching cannot take, naming ``source`` (the model
    directory) and the patch: ``frames``, ``height``, ``width`` (in ``units``) must be positive
    multiples of ``patch = (pt, ph, pw)``."""
    pt, ph, pw = patch
    bad = [
        f"{name}={v} (multiple of {m})"
        for name, v, m in (("frames", frames, pt), ("height", height, ph), ("width", width, pw))
        if v < 1 or v % m
    ]
    if bad:
        raise SettingError(
            f"{source}: calibration grid {frames}x{height}x{width} ({units} frames x height x width) does not fit the "
            f"patch {pt}x{ph}x{pw}: {', '.join(bad)}",
            tuple(b.split("=")[0] for b in bad),
        )


def calibration_info(
    *,
    frames: int,
    height: int,
    width: int,
    units: str,
    text: str,
    den: Denoiser,
    prompts: tuple[str, ...] = (),
    **more: Any,
) -> dict[str, Any]:
    """What a bundle calibrates on, for ``jquant quantize`` to print and record
    (``ModelBundle.extra["calibration"]``)."""
    return {
        "frames": frames,
        "height": height,
        "width": width,
        "units": units,
        "conditioning": text,
        "prompts": list(prompts),
        "sampler": f"{den.sampler} ({den.prediction_type})" if den.sampler == "ddim" else den.sampler,
        "steps": den.num_steps,
        "guidance": den.guidance_scale,
        **more,
    }


def wan_bundle(
    model: nn.Module,
    params: PyTree,
    config: Any,
    *,
    num_steps: int = 12,
    shift: float = 3.0,
    guidance_scale: float = 5.0,
    frames: int = 4,
    size: int = 32,
    height: int | None = None,
    width: int | None = None,
    text_tokens: int = 16,
    source: str = "wan",
) -> ModelBundle:
    """Any Wan2.1 port: seeded stand-in text embeddings (no text encoder here), zeros as the
    CFG branch, latents ``[B, C, frames, height, width]`` (latent units; ``height`` and
    ``width`` default to ``size``)."""
    height, width = height or size, width or size
    check_grid(source, frames, height, width, tuple(config.patch_size))
    den = Denoiser(
        model,
        _wan_apply,
        "flow",
        num_steps,
        shift=shift,
        guidance_scale=guidance_scale,
        frames_fn=wan_frames(tuple(config.patch_size)),
        name="wan",
    )

    def workload(n: int, seed: int, start: int = 0) -> Workload:
        k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(seed), start))
        x_T = jax.random.normal(k1, (n, config.in_channels, frames, height, width), jnp.float32)
        text = jax.random.normal(k2, (n, text_tokens, config.text_dim), jnp.float32)
        return Workload(x_T, text, jnp.zeros_like(text), tuple(range(start, start + n)))

    info = calibration_info(
        frames=frames, height=height, width=width, units="latent", den=den, text=f"stand-in ({text_tokens} tokens)"
    )
    return ModelBundle(
        den,
        params,
        models.layer_roles(config, params),
        workload,
        latents_as_video,
        config,
        {"calibration": info},
    )


# --- DiT -----------------------------------------------------------------------------------------
def _dit_apply(module: nn.Module, variables: Variables, x: Array, t: Array, cond: Array) -> Array:
    tb = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
    return module.apply(variables, x, tb, cond)


def dit_bundle(
    model: nn.Module,
    params: PyTree,
    config: Any,
    *,
    num_steps: int = 12,
    guidance_scale: float = 4.0,
    frames: int = 1,
    height: int | None = None,
    width: int | None = None,
    source: str = "dit",
) -> ModelBundle:
    """DiT: class labels (the null class ``num_embeds_ada_norm`` for CFG), DDIM, learned sigma;
    latents ``[B, C, height, width]`` (latent units, default ``sample_size``; images: ``frames=1``)."""
    if frames != 1:
        raise SettingError(f"{source}: DiT generates images: frames must be 1, got {frames}", ("frames",))
    height, width = height or config.sample_size, width or config.sample_size
    check_grid(source, 1, height, width, (1, config.patch_size, config.patch_size))
    learned = config.out_dim == 2 * config.in_channels
    den = Denoiser(
        model,
        _dit_apply,
        "ddim",
        num_steps,
        guidance_scale=guidance_scale,
        learned_sigma=learned,
        channel_axis=1,
        name="dit",
    )
    classes = int(config.num_embeds_ada_norm)

    def workload(n: int, seed: int, start: int = 0) -> Workload:
        labels = (start + jnp.arange(n, dtype=jnp.int32)) % classes
        x_T = jax.random.normal(jax.random.key(seed), (n, config.in_channels, height, width))
        return Workload(x_T, labels, jnp.full_like(labels, classes), tuple(int(v) for v in np.asarray(labels)))

    info = calibration_info(frames=1, height=height, width=width, units="latent", den=den, text="class labels")
    return ModelBundle(
        den, params, models.layer_roles(config, params), workload, latents_as_video, config, {"calibration": info}
    )
