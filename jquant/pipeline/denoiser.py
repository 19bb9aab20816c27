"""A ported model wired to its sampler and its default conditioning.

The pipeline (trajectory calibration, scale tables, recipes, CLI) never touches a model
directly: it goes through a :class:`Denoiser` (how to call the model inside the jitted
sampler: ``apply(variables, x, t, cond) -> prediction``, which sampler, how many steps,
the CFG scale, where the video frames are in the token sequence) and a :class:`Workload`
(the noise and conditioning of one batch of samples). :class:`ModelBundle` adds the float
params, the layer roles and how to turn latents into videos for the metrics.

Bundles exist for the Wan2.1 port (the bundled tiny model with its class conditioning, or
any Wan directory with seeded stand-in text embeddings) and for DiT (class labels, DDIM,
learned sigma). :func:`load_bundle` picks one from a model directory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jquant import models
from jquant.models import tiny_wan as tw
from jquant.sampling import (
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
      shift: flow-match timestep shift.
      guidance_scale: CFG scale (1.0: no unconditional branch is run).
      learned_sigma: DDIM models whose output holds 2C channels (DiT).
      channel_axis: channel axis of the prediction (DiT latents are NCHW: 1).
      frames_fn: ``latent_shape -> (frames, video_tokens)`` when the model's token sequence
        is frame-major video tokens (per-frame scales); None for images.
      name: for reports.
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

    def __post_init__(self) -> None:
        if self.sampler not in ("flow", "ddim"):
            raise ValueError(f"Denoiser.sampler must be 'flow' or 'ddim', got {self.sampler!r}")
        if self.num_steps < 1:
            raise ValueError(f"Denoiser.num_steps must be >= 1, got {self.num_steps}")

    @property
    def cfg(self) -> bool:
        """Whether sampling runs the unconditional branch (classifier-free guidance)."""
        return self.guidance_scale != 1.0

    def apply(self, variables: Variables, x: Array, t: Array, cond: PyTree) -> Array:
        return self.apply_fn(self.module, variables, x, t, cond)

    def timesteps(self) -> np.ndarray:
        """The timesteps the sampler passes, step 0 (noisiest) first."""
        if self.sampler == "flow":
            return np.asarray(flow_match_schedule(self.num_steps, shift=self.shift).timesteps, np.float32)
        return np.asarray(ddim_schedule(self.num_steps).timesteps, np.int32)

    def with_steps(self, num_steps: int) -> "Denoiser":
        return dataclasses.replace(self, num_steps=num_steps)

    def sample(
        self, model_fn: Callable, work: "Workload", *, step_data: PyTree = None, return_trajectory: bool = False
    ):
        """Run the jitted sampler; ``model_fn(x, t, cond, step_slice)`` (a ``Partial``)."""
        uncond = work.uncond if self.cfg else None
        if self.sampler == "flow":
            return sample_flow_euler(
                model_fn,
                work.x_T,
                work.cond,
                num_steps=self.num_steps,
                shift=self.shift,
                guidance_scale=self.guidance_scale,
                uncond=uncond,
                step_data=step_data,
                return_trajectory=return_trajectory,
            )
        return sample_ddim(
            model_fn,
            work.x_T,
            work.cond,
            num_steps=self.num_steps,
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
      extra: model-specific objects (the tiny model's classifier).
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


def _latents_as_video(latents: Array) -> tuple[Array, float | None]:
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


@functools.lru_cache(maxsize=4)
def _tiny_wan_bundle(path: str, num_steps: int | None) -> ModelBundle:
    b = tw.load_tiny(path)
    s = b.meta["sampling"]
    den = Denoiser(
        b.model,
        _wan_apply,
        "flow",
        int(num_steps or s.get("num_steps", s.get("steps", 12))),
        shift=float(s["shift"]),
        guidance_scale=float(s["guidance_scale"]),
        frames_fn=wan_frames(tuple(b.config.patch_size)),
        name="tiny_wan",
    )

    def workload(n: int, seed: int, start: int = 0) -> Workload:
        labels = (start + jnp.arange(n)) % tw.NUM_CLASSES
        x_T = jax.random.normal(jax.random.key(seed), b.latent_shape(n), jnp.float32)
        return Workload(x_T, b.text(labels), b.null_text(n), tuple(int(v) for v in np.asarray(labels)))

    def to_video(latents: Array) -> tuple[Array, float | None]:
        return tw.latents_to_clips(latents)[..., None], 1.0

    return ModelBundle(
        den,
        b.params,
        models.layer_roles(b.config, b.params),
        workload,
        to_video,
        b.config,
        {"classifier": b.classifier, "classifier_params": b.classifier_params, "tiny": b},
    )


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
    text_tokens: int = 16,
) -> ModelBundle:
    """Any Wan2.1 port: seeded stand-in text embeddings (no text encoder here), zeros as the
    CFG branch, latents ``[B, C, frames, size, size]``."""
    pt, ph, pw = config.patch_size
    if frames % pt or size % ph or size % pw:
        raise ValueError(f"wan_bundle: frames={frames}, size={size} must be multiples of the patch {config.patch_size}")
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
        x_T = jax.random.normal(k1, (n, config.in_channels, frames, size, size), jnp.float32)
        text = jax.random.normal(k2, (n, text_tokens, config.text_dim), jnp.float32)
        return Workload(x_T, text, jnp.zeros_like(text), tuple(range(start, start + n)))

    return ModelBundle(den, params, models.layer_roles(config, params), workload, _latents_as_video, config)


# --- DiT -----------------------------------------------------------------------------------------
def _dit_apply(module: nn.Module, variables: Variables, x: Array, t: Array, cond: Array) -> Array:
    tb = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
    return module.apply(variables, x, tb, cond)


def dit_bundle(
    model: nn.Module, params: PyTree, config: Any, *, num_steps: int = 12, guidance_scale: float = 4.0
) -> ModelBundle:
    """DiT: class labels (the null class ``num_embeds_ada_norm`` for CFG), DDIM, learned sigma."""
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
        x_T = jax.random.normal(jax.random.key(seed), (n, config.in_channels, config.sample_size, config.sample_size))
        return Workload(x_T, labels, jnp.full_like(labels, classes), tuple(int(v) for v in np.asarray(labels)))

    return ModelBundle(den, params, models.layer_roles(config, params), workload, _latents_as_video, config)


def load_bundle(model_dir: str | Path, *, num_steps: int | None = None, **kwargs: Any) -> ModelBundle:
    """A :class:`ModelBundle` for a diffusers model directory of a ported model.

    A directory with ``tiny_wan.json`` is the tiny Wan with its own conditioning; other Wan
    and DiT directories get the stand-in conditioning of :func:`wan_bundle` / :func:`dit_bundle`
    (``kwargs`` go there). Other ports have no sampler wiring here and raise.
    """
    path = Path(model_dir)
    if (path / "tiny_wan.json").is_file():
        return tiny_wan_bundle(path, num_steps=num_steps)
    raw = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    model, params = models.load_pretrained(path)
    config = model.config
    steps = {} if num_steps is None else {"num_steps": num_steps}
    if isinstance(config, models.WanConfig):
        return wan_bundle(model, params, config, **steps, **kwargs)
    if isinstance(config, models.DiTConfig):
        return dit_bundle(model, params, config, **steps, **kwargs)
    raise ValueError(
        f"{path}: the pipeline has sampler wiring for Wan and DiT models, not {raw.get('_class_name', type(config).__name__)}"
    )
