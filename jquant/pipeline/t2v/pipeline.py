"""The pipeline object: prompt encoding -> the sampler with the transformer by recipe -> VAE decoding."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jquant import models
from jquant import nn as jnn
from jquant.models.autoencoder_kl import KLVAE, load_autoencoder_kl
from jquant.models.prompt import TextEncoder, check_tokenizer, encode_flux_prompt, encode_wan_prompt, load_text_encoder
from jquant.models.tokenize import Tokenizer, load_tokenizer
from jquant.models.wan_vae import Tiling, WanVAE, load_wan_vae
from jquant.pipeline import recipes as rc
from jquant.pipeline.artifacts import load_quantized
from jquant.pipeline.calibrate import CalibrationConfig, Calibrator, quantize
from jquant.pipeline.denoiser import Denoiser, ModelBundle, Workload, wan_frames
from jquant.pipeline.runtime import QuantizedModel, tree_bytes
from jquant.pipeline.t2v.directory import (
    COMPONENTS,
    TEXT_ENCODER_PRECISIONS,
    PipelineError,
    flow_schedule,
    read_model_index,
    read_scheduler,
)
from jquant.pipeline.t2v.memory import ComponentMemory, MemoryReport
from jquant.pipeline.t2v.solvers import UniPC, run_sampler, unipc_schedule
from jquant.pipeline.trajectory import float_model_fn
from jquant.rules import flatten_with_paths, quantize_params
from jquant.sampling import FlowSchedule, flux_mu

Array = jax.Array


# --- the transformers' step functions -------------------------------------------------------------
def _wan_apply(module: nn.Module, variables: Any, x: Array, t: Array, cond: Array) -> Array:
    return module.apply(variables, x, jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],)), cond)


def pack_latents(z: Array) -> Array:
    """FluxPipeline._pack_latents: [B, C, h, w] -> [B, h/2 * w/2, 4C]."""
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(z: Array, h: int, w: int) -> Array:
    """FluxPipeline._unpack_latents: [B, h/2 * w/2, 4C] -> [B, C, h, w]."""
    b, _, c4 = z.shape
    z = z.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return z.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int) -> Array:
    """FluxPipeline._prepare_latent_image_ids for a packed h/2 x w/2 grid: [(h/2)(w/2), 3]."""
    ii, jj = jnp.meshgrid(jnp.arange(h // 2), jnp.arange(w // 2), indexing="ij")
    return jnp.stack([jnp.zeros_like(ii), ii, jj], -1).reshape(-1, 3).astype(jnp.float32)


def flux_apply(module: nn.Module, variables: Any, x: Array, t: Array, cond: dict[str, Array]) -> Array:
    """Flux on unpacked latents [B, C, h, w]: packs, runs, unpacks (the Euler update is
    elementwise, so the sampler state may stay unpacked); ``t`` is ``sigma * 1000`` as diffusers'
    scheduler gives it, handed over as ``t / 1000``; ``cond``: ``embeds`` [B, L, joint], ``pooled``
    [B, pooled], ``guidance`` [B] (guidance-distilled configs). The pipeline's and the quantize
    CLI's Flux bundles both call the transformer through it."""
    _, _, h, w = x.shape
    tb = jnp.broadcast_to(jnp.asarray(t, jnp.float32) / 1000, (x.shape[0],))
    embeds = cond["embeds"]
    txt_ids = jnp.zeros((embeds.shape[1], 3), jnp.float32)
    guidance = cond.get("guidance")
    out = module.apply(variables, pack_latents(x), embeds, cond["pooled"], tb, image_ids(h, w), txt_ids, guidance)
    return unpack_latents(out, h, w)


@dataclasses.dataclass(frozen=True)
class Generation:
    """What a pipeline call returns: frames [B, F, H, W, 3] float32 in [0, 1] (images: F = 1),
    the final latents, the memory report and the seconds per phase."""

    frames: np.ndarray
    latents: Array
    memory: MemoryReport
    seconds: dict[str, float]

    def uint8(self) -> np.ndarray:
        """Frames as uint8 [B, F, H, W, 3] (diffusers' ``numpy_to_pil`` rounding)."""
        return (self.frames * 255).round().astype(np.uint8)


# --- the pipeline ---------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class T2VPipeline:
    """A loaded text-to-video (Wan) or text-to-image (Flux) pipeline; call it with a prompt.

    Attributes:
      kind: ``"WanPipeline"`` or ``"FluxPipeline"``.
      path: the pipeline directory.
      encoders: ``{folder: (TextEncoder, Tokenizer)}``.
      transformer, params: the Flax transformer and its float params (None with a
        ``quantized_dir``, and once a recipe has been applied).
      vae: the WanVAE or KLVAE.
      scheduler: the scheduler config dict.
      quantized: the transformer's QuantizedModel (recipe or ``jquant quantize`` output), or None.
      recipe: a recipe applied at the first call (calibrated on that call's prompts and shape).
      precisions: the precision label of every component, for the memory report.
      offload: components whose weights stay in host memory (numpy) and are copied to the
        device for their own call only (jit transfers them per call and frees them after).
    """

    kind: str
    path: Path
    encoders: dict[str, tuple[TextEncoder, Tokenizer]]
    transformer: nn.Module
    params: Any
    vae: WanVAE | KLVAE
    scheduler: dict[str, Any]
    quantized: QuantizedModel | None = None
    recipe: rc.Recipe | None = None
    precisions: dict[str, str] = dataclasses.field(default_factory=dict)
    offload: frozenset[str] = frozenset()
    _denoisers: dict[tuple, Denoiser] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def config(self) -> Any:
        return self.transformer.config

    @property
    def unipc(self) -> bool:
        """Whether the scheduler is UniPC (else flow-match Euler)."""
        return self.scheduler.get("_class_name") == "UniPCMultistepScheduler"

    # shapes ---------------------------------------------------------------------------------------
    def latent_shape(self, batch: int, frames: int, height: int, width: int) -> tuple[int, ...]:
        """The initial noise's shape; refuses sizes the VAE and the patching cannot take, naming
        the multiple needed."""
        if self.kind == "WanPipeline":
            r, rt = self.vae.config.spatial_ratio, self.vae.config.temporal_ratio
            _, ph, pw = self.config.patch_size
            mh, mw = math.lcm(16, r * ph), math.lcm(16, r * pw)  # WanPipeline.check_inputs: multiples of 16
            if frames < 1 or (frames - 1) % rt:
                raise ValueError(
                    f"frames={frames}: Wan's VAE needs 1 + {rt}k frames (e.g. {1 + rt * max(1, (frames - 1) // rt)})"
                )
            if height < mh or width < mw or height % mh or width % mw:
                raise ValueError(
                    f"height x width = {height} x {width}: must be positive multiples of {mh} x {mw} "
                    f"(16, as WanPipeline, and the VAE's {r}x times the transformer's patch {ph}x{pw})"
                )
            return (batch, self.config.in_channels, 1 + (frames - 1) // rt, height // r, width // r)
        if frames != 1:
            raise ValueError(f"frames={frames}: {self.kind} generates images (frames=1)")
        m = self.vae.config.spatial_ratio * 2
        if height < m or width < m or height % m or width % m:
            raise ValueError(
                f"height x width = {height} x {width}: Flux needs positive multiples of {m} (VAE x packing 2)"
            )
        return (batch, self.config.in_channels // 4, height // (m // 2), width // (m // 2))

    def denoiser(self, steps: int, cfg: bool) -> Denoiser:
        """The Denoiser the quantized runtime and calibration call the transformer through
        (one per (steps, CFG) so compiled steps are reused)."""
        key = (steps, cfg)
        if key not in self._denoisers:
            if self.kind == "WanPipeline":
                self._denoisers[key] = Denoiser(
                    self.transformer,
                    _wan_apply,
                    "flow",
                    steps,
                    shift=float(self.scheduler.get("flow_shift" if self.unipc else "shift", 1.0)),
                    guidance_scale=5.0 if cfg else 1.0,
                    frames_fn=wan_frames(tuple(self.config.patch_size)),
                    name="wan",
                )
            else:
                self._denoisers[key] = Denoiser(
                    self.transformer, flux_apply, "flow", steps, guidance_scale=3.5 if cfg else 1.0, name="flux"
                )
        return self._denoisers[key]

    # prompt encoding ------------------------------------------------------------------------------
    def encode(
        self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None, cfg: bool, guidance: float
    ) -> tuple[Any, Any]:
        """``(cond, uncond)`` conditioning pytrees in the transformer's dtype (uncond None without CFG)."""
        dtype = self.transformer.dtype
        if self.kind == "WanPipeline":
            te, tok = self.encoders["text_encoder"]
            cond, uncond = encode_wan_prompt(te, tok, prompt, negative_prompt, guidance=cfg)
            return cond.astype(dtype), None if uncond is None else uncond.astype(dtype)
        clip, clip_tok = self.encoders["text_encoder"]
        t5, t5_tok = self.encoders["text_encoder_2"]

        def one(p: Any) -> dict[str, Array]:
            embeds, pooled, _ = encode_flux_prompt(clip, clip_tok, t5, t5_tok, p)
            out = {"embeds": embeds.astype(dtype), "pooled": pooled.astype(dtype)}
            if self.config.guidance_embeds:
                out["guidance"] = jnp.full((embeds.shape[0],), guidance, jnp.float32)
            return out

        cond = one(prompt)
        if not cfg:
            return cond, None
        n = 1 if isinstance(prompt, str) else len(prompt)
        neg = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
        return cond, one(neg)

    # the transformer ------------------------------------------------------------------------------
    def _calibrate(self, steps: int, cond: Any, uncond: Any, x_T: Array, guidance: float) -> None:
        """Apply the pending recipe, calibrated on this call's prompts, shape and trajectory (the
        calibration records flow-match Euler's trajectory at the scheduler's shift, also for UniPC)."""
        recipe, cfg = self.recipe, uncond is not None
        assert recipe is not None
        if self.kind != "WanPipeline" and (recipe.transform.needs_stats or recipe.table is not None):
            raise ValueError(
                f"recipe {recipe.name!r} calibrates on the trajectory, which jquant runs for Wan pipelines only; "
                "for Flux use a weight-only recipe without statistics (int8-w, fp8-w, nf4, q4_k_m, q5_k_m)"
            )
        den = dataclasses.replace(self.denoiser(steps, cfg), guidance_scale=guidance if cfg else 1.0)
        work = Workload(x_T, cond, uncond if cfg else jax.tree_util.tree_map(jnp.zeros_like, cond))
        bundle = ModelBundle(
            den,
            self.params,
            models.layer_roles(self.config, self.params),
            lambda n, seed, start=0: work,
            lambda z: (z, None),
            self.config,
        )
        qm = quantize(
            bundle, recipe, Calibrator(bundle, CalibrationConfig(num_samples=x_T.shape[0], batch=x_T.shape[0]))
        )
        if "transformer" in self.offload:
            qm = dataclasses.replace(qm, variables=jax.device_get(qm.variables))
        self.quantized, self.recipe, self.params = qm, None, None

    def _model_fn(self, steps: int, cfg: bool) -> tuple[Partial, Any]:
        den = self.denoiser(steps, cfg)
        if self.quantized is not None:
            return self.quantized.model_fn(den)
        return float_model_fn(den, self.params), None

    def schedule(self, steps: int, latent_shape: tuple[int, ...]) -> FlowSchedule:
        """The diffusers schedule: Wan's static shift; Flux's ``sigmas = linspace(1, 1/n, n)`` with
        ``mu`` from the packed sequence length (diffusers' ``calculate_shift``)."""
        if self.unipc:
            return unipc_schedule(self.scheduler, steps)
        if self.kind == "WanPipeline":
            return flow_schedule(self.scheduler, steps)
        s = self.scheduler
        seq = (latent_shape[2] // 2) * (latent_shape[3] // 2)
        mu = flux_mu(
            seq,
            s.get("base_image_seq_len", 256),
            s.get("max_image_seq_len", 4096),
            s.get("base_shift", 0.5),
            s.get("max_shift", 1.15),
        )
        return flow_schedule(s, steps, mu=mu, sigmas=np.linspace(1.0, 1 / steps, steps))

    # the call -------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] | None = None,
        frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int = 50,
        guidance: float | None = None,
        true_cfg: float = 1.0,
        seed: int = 0,
        latents: Array | None = None,
        tiling: Tiling | None = None,
        progress: bool = True,
        measure_memory: bool = True,
    ) -> Generation:
        """Generate from a prompt, as diffusers' pipeline does with the same initial ``latents``.

        Wan: ``frames`` (1 + 4k, default 81), ``height`` x ``width`` (multiples of 16, default
        480 x 832), classifier-free guidance ``guidance`` (default 5.0; > 1 runs the negative
        branch, ``negative_prompt`` defaulting to ""). Flux: one image (default 1024 x 1024);
        ``guidance`` (default 3.5) feeds the guidance embedding of guidance-distilled models, and
        ``true_cfg`` > 1 with a ``negative_prompt`` runs real CFG (diffusers' ``true_cfg_scale``).
        ``latents``: the initial noise (Wan [B, 16, T, h, w]; Flux unpacked [B, 16, h, w]); else
        ``jax.random.normal(key(seed))``. ``tiling``: Wan's spatial VAE tiling (720p).
        """
        wan = self.kind == "WanPipeline"
        if tiling is not None and not wan:
            raise ValueError("tiling: spatial tiling is Wan's VAE option (Flux images decode whole)")
        frames = frames if frames is not None else (81 if wan else 1)
        height, width = height or (480 if wan else 1024), width or (832 if wan else 1024)
        guidance = float(guidance if guidance is not None else (5.0 if wan else 3.5))
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        batch = 1 if isinstance(prompt, str) else len(prompt)
        shape = self.latent_shape(batch, frames, height, width)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)}; {frames} frames at {height}x{width} need {shape}"
            )
        cfg = guidance > 1.0 if wan else (true_cfg > 1.0 and negative_prompt is not None)
        seconds: dict[str, float] = {}

        t0 = time.perf_counter()
        cond, uncond = self.encode(prompt, negative_prompt, cfg, guidance)
        cond, uncond = jax.block_until_ready((cond, uncond))  # only the embeddings outlive the encoders
        seconds["encode"] = time.perf_counter() - t0
        x_T = (
            jnp.asarray(latents, jnp.float32) if latents is not None else jax.random.normal(jax.random.key(seed), shape)
        )

        if self.recipe is not None:
            t0 = time.perf_counter()
            self._calibrate(steps, cond, uncond, x_T, guidance if wan else true_cfg)
            seconds["quantize"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn, data = self._model_fn(steps, cfg)
        g = guidance if wan else true_cfg
        sched = self.schedule(steps, shape)
        solver = UniPC(self.scheduler, sched.sigmas) if self.unipc else None
        x0, step_peak = run_sampler(fn, x_T, sched, cond, uncond, g, data, progress=progress, solver=solver)
        seconds["sample"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        z = self.vae.denormalize(x0.astype(self.vae.dtype))
        if wan:
            video = self.vae.decode(z, tiling=tiling)  # [B, 3, F, H, W]
            out = jnp.moveaxis(video, 1, -1)
        else:
            out = jnp.moveaxis(self.vae.decode(z), 1, -1)[:, None]  # [B, 1, H, W, 3]
        frames_np = np.asarray(jnp.clip(out.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0))
        seconds["decode"] = time.perf_counter() - t0
        memory = self.memory(shape, step_peak if measure_memory else None, measure_memory, batch, tiling is not None)
        return Generation(frames_np, x0, memory, seconds)

    # memory ---------------------------------------------------------------------------------------
    def memory(
        self, latent_shape: tuple[int, ...], step_peak: int | None, measure: bool, batch: int, tiled: bool = False
    ) -> MemoryReport:
        """Resident bytes of each component's weights and (``measure``) the peak of its call (the
        VAE's: of the untiled chunked decode; with ``tiled`` it is not measured)."""
        comps = []
        for name, (te, tok) in self.encoders.items():
            peak = None
            if measure:
                length = 512 if te.config.__class__.__name__.startswith("T5") else (tok.model_max_length or 77)
                # one call per branch, as diffusers; Flux's encoders run without a mask
                peak = sum(te.call_bytes(batch, length, mask=self.kind != "FluxPipeline").values())
            comps.append(
                ComponentMemory(
                    name, self.precisions.get(name, "float"), tree_bytes(te.params), peak, name in self.offload
                )
            )
        weights = self.quantized.variables if self.quantized is not None else {"params": self.params}
        comps.append(
            ComponentMemory(
                "transformer",
                self.precisions.get("transformer", "float"),
                tree_bytes(weights),
                step_peak,
                "transformer" in self.offload,
            )
        )
        peak = None
        if measure and tiled:
            pass
        elif measure and isinstance(self.vae, WanVAE):
            d = self.vae.decode_bytes(
                latent_shape[2],
                latent_shape[3] * self.vae.config.spatial_ratio,
                latent_shape[4] * self.vae.config.spatial_ratio,
                batch=latent_shape[0],
            )
            peak = sum(d.values())
        elif measure:
            r = self.vae.config.spatial_ratio
            peak = sum(self.vae.decode_bytes(latent_shape[2] * r, latent_shape[3] * r, batch=latent_shape[0]).values())
        comps.append(
            ComponentMemory(
                "vae", self.precisions.get("vae", "float"), tree_bytes(self.vae.params), peak, "vae" in self.offload
            )
        )
        return MemoryReport(tuple(comps))


# --- loading --------------------------------------------------------------------------------------
def _text_encoder(folder: Path, dtype: Any, precision: str) -> TextEncoder:
    te = load_text_encoder(folder, dtype)
    if precision == "float":
        return te
    q, _ = quantize_params(te.params, [(r".*/kernel", "int8")])
    return dataclasses.replace(te, params=q, runner=jnn.apply)


def check_quantized(qm: QuantizedModel, shapes: Any, where: Path, transformer: Path) -> None:
    """Refuse a ``jquant quantize`` output made for another transformer: its param paths and
    shapes must be the ones the pipeline's transformer config gives."""
    want = {p: tuple(a.shape) for p, a in flatten_with_paths(shapes)}
    have = {p: tuple(a.shape) for p, a in flatten_with_paths(qm.params)}
    diff = sorted(p for p in want.keys() | have.keys() if want.get(p) != have.get(p))
    if diff:
        shown = ", ".join(f"{p}: {have.get(p, 'missing')} vs {want.get(p, 'absent')}" for p in diff[:4])
        raise PipelineError(
            f"{where}: quantized for another transformer than {transformer} ({len(diff)} params differ: {shown})"
        )


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


def load_pipeline(
    path: str | Path,
    *,
    recipe: str | rc.Recipe | None = None,
    quantized_dir: str | Path | None = None,
    dtype: Any = jnp.bfloat16,
    text_encoder: str = "int8",
    vae_dtype: Any = jnp.bfloat16,
    scheduler: str | None = None,
    offload: Sequence[str] = (),
) -> T2VPipeline:
    """Load a diffusers ``WanPipeline`` or ``FluxPipeline`` directory.

    Args:
      path: the pipeline directory (``model_index.json`` + component folders).
      recipe: a recipe for the transformer (name or :class:`~jquant.pipeline.recipes.Recipe`),
        applied at the first call: weight-only recipes quantize directly; recipes that need
        trajectory statistics or a scale table calibrate on that call's prompts (both CFG
        branches), frame count, resolution and whole trajectory (Wan only).
      quantized_dir: a ``jquant quantize`` output for the transformer instead (not with ``recipe``).
      dtype: the transformer's and the float text encoders' dtype.
      text_encoder: ``"int8"`` (int8 weight-only, the default) or ``"float"`` (``dtype``);
        nothing below int8, the handbook's floor for text encoders.
      vae_dtype: the VAE's dtype (bfloat16 by default).
      scheduler: ``"euler"`` to sample a UniPC-configured directory with flow-match Euler.
      offload: components (``"text_encoder"``, ``"text_encoder_2"``, ``"vae"``, ``"transformer"``)
        whose weights stay in host memory and are copied to the device for their call only (the
        transformer's: for every step).
    """
    path = Path(path)
    if recipe is not None and quantized_dir is not None:
        raise ValueError("give recipe or quantized_dir, not both")
    if text_encoder not in TEXT_ENCODER_PRECISIONS:
        raise ValueError(
            f"text_encoder={text_encoder!r}: text encoders run at int8 weight-only at most (the handbook's floor); "
            f"choose one of {TEXT_ENCODER_PRECISIONS}"
        )
    kind, _ = read_model_index(path)
    names = [n for n in COMPONENTS[kind] if not n.startswith(("tokenizer", "scheduler"))]
    bad = sorted(set(offload) - set(names))
    if bad:
        raise ValueError(f"offload={bad}: not a component of {kind}; choose among {names}")
    host = frozenset(offload)
    sched = read_scheduler(path, scheduler)
    if isinstance(recipe, str):
        try:
            recipe = rc.get(recipe)
        except KeyError:
            raise rc.UnknownRecipeError(rc.unknown_recipe_message(recipe, rc.names())) from None
    te_label = "int8 weight-only" if text_encoder == "int8" else _dtype_name(dtype)
    folders = ["text_encoder"] if kind == "WanPipeline" else ["text_encoder", "text_encoder_2"]
    encoders: dict[str, tuple[TextEncoder, Tokenizer]] = {}
    for folder in folders:
        tok_folder = "tokenizer" if folder == "text_encoder" else "tokenizer_2"
        te = _text_encoder(path / folder, dtype, text_encoder)
        if folder in host:
            te = dataclasses.replace(te, params=jax.device_get(te.params))
        tok = load_tokenizer(path / tok_folder)
        check_tokenizer(tok, te)
        encoders[folder] = (te, tok)
    vae = (load_wan_vae if kind == "WanPipeline" else load_autoencoder_kl)(path, vae_dtype)
    if "vae" in host:
        vae = dataclasses.replace(vae, params=jax.device_get(vae.params))
    precisions = {f: te_label for f in folders}
    precisions["vae"] = _dtype_name(vae_dtype)
    quantized, params = None, None
    if quantized_dir is not None:  # the float weights are not read
        port, config = models.read_config(path / "transformer")
        module = port.module(config, dtype)
        quantized, meta = load_quantized(quantized_dir)
        check_quantized(quantized, models.param_shapes(config), Path(quantized_dir), path / "transformer")
        if "transformer" in host:
            quantized = dataclasses.replace(quantized, variables=jax.device_get(quantized.variables))
        precisions["transformer"] = f"{quantized.name or 'quantized'} ({meta.get('act') or 'weight-only'})"
    else:
        module, params = models.load_pretrained(path / "transformer", dtype)
        if "transformer" in host and recipe is None:
            params = jax.device_get(params)
        precisions["transformer"] = recipe.name if recipe is not None else _dtype_name(dtype)
    return T2VPipeline(kind, path, encoders, module, params, vae, sched, quantized, recipe, precisions, host)
