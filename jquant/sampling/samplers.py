"""Jitted diffusion samplers: each is ONE ``jax.lax.scan`` over the denoising steps.

Model contract::

    model_fn(x, t, cond, step_slice) -> prediction             # default
    model_fn(x, t, cond, step_slice, step_index) -> prediction # with_step_index=True

* ``x``: the current latent batch (doubled along axis 0 under classifier-free guidance).
* ``t``: scalar timestep as the matching diffusers scheduler would pass it (float32
  ``sigma * num_train_timesteps`` for flow matching, int32 for DDIM). Broadcast or rescale it
  inside ``model_fn`` (Flux's transformer wants ``t / 1000``).
* ``cond``: the conditioning pytree (every leaf batched along axis 0), or ``[uncond; cond]``
  concatenated along axis 0 under CFG.
* ``step_slice``: row i (along axis 0) of every leaf of ``step_data`` (e.g. a per-timestep
  activation-scale table, a per-step precision choice), or ``None`` without ``step_data``.
* ``step_index``: int32 scalar i.

``step_data``, the schedule arrays and the guidance scale are traced inputs carried through
the scan's ``xs``, so changing them never recompiles. The jit cache is keyed on ``model_fn``
itself: pass the same function object every call (not a fresh lambda). To keep large weights
out of the compiled program's constants, pass ``jax.tree_util.Partial(apply_fn, params)``:
its bound arguments (arrays or pytrees of arrays) are traced inputs of the jitted sampler.

Classifier-free guidance (``uncond`` given) evaluates both branches in one model call on the
batch ``[x; x]`` with conditioning ``[uncond; cond]`` (diffusers' order) and combines them
with :func:`cfg_combine`. Scheduler arithmetic runs in float32; the carried ``x`` keeps the
dtype of ``x_T``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jquant.sampling.schedules import (
    DDIMSchedule,
    FlowSchedule,
    TimeShiftType,
    ddim_schedule,
    flow_match_schedule,
)

Array = jax.Array
PyTree = Any
ModelFn = Callable[..., Array]
PredictionType = Literal["epsilon", "v_prediction", "sample"]


def cfg_combine(pred_uncond: Array, pred_cond: Array, guidance_scale: float | Array) -> Array:
    """Classifier-free guidance: ``uncond + g * (cond - uncond)`` (g = 1 gives ``cond``)."""
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


def learned_sigma_eps(pred: Array, channel_axis: int = -1) -> Array:
    """DiT's learned-sigma output: keep the first half of the channels (the epsilon)."""
    c = pred.shape[channel_axis]
    if c % 2:
        raise ValueError(f"learned_sigma: model output has {c} channels on axis {channel_axis}, not even")
    return jax.lax.slice_in_dim(pred, 0, c // 2, axis=channel_axis)


def _as_partial(model_fn: ModelFn) -> Partial:
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable, got {type(model_fn).__name__}")
    return model_fn if isinstance(model_fn, Partial) else Partial(model_fn)


def _check_step_data(step_data: PyTree, num_steps: int) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(step_data):
        shape = np.shape(leaf)
        if not shape or shape[0] != num_steps:
            raise ValueError(
                f"step_data leaf {jax.tree_util.keystr(path) or '<root>'} has shape {shape}; "
                f"its leading dimension must equal num_steps={num_steps}"
            )


def _check_cfg(cond: PyTree, uncond: PyTree, batch: int) -> None:
    if uncond is None:
        return
    if jax.tree_util.tree_structure(cond) != jax.tree_util.tree_structure(uncond):
        raise ValueError("uncond must have the same pytree structure as cond for batched CFG")
    for (path, c), u in zip(jax.tree_util.tree_leaves_with_path(cond), jax.tree_util.tree_leaves(uncond)):
        if np.ndim(c) == 0 or np.shape(c)[0] != batch or np.shape(c) != np.shape(u):
            raise ValueError(
                f"cond leaf {jax.tree_util.keystr(path)}: cond {np.shape(c)} / uncond {np.shape(u)} must "
                f"share one shape with leading batch dimension {batch} (CFG concatenates along axis 0)"
            )


class _Guided(NamedTuple):
    """The model and its conditioning as every sampler's scan evaluates them (a pytree: the
    arrays are traced inputs of the jitted scan, the function is static)."""

    model_fn: Partial
    cond: PyTree
    uncond: PyTree
    guidance_scale: Array

    def predict(self, x: Array, t: Array, step_slice: PyTree, index: Array, with_step_index: bool) -> Array:
        """One model evaluation (both CFG branches in one batched call), returned as float32."""
        extra = (index,) if with_step_index else ()
        if self.uncond is None:
            return self.model_fn(x, t, self.cond, step_slice, *extra).astype(jnp.float32)
        x2 = jnp.concatenate([x, x], axis=0)
        cond2 = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), self.uncond, self.cond)
        pred = self.model_fn(x2, t, cond2, step_slice, *extra).astype(jnp.float32)
        pred_u, pred_c = jnp.split(pred, 2, axis=0)
        return cfg_combine(pred_u, pred_c, self.guidance_scale)


def _guided(
    model_fn: ModelFn,
    x_T: Array,
    cond: PyTree,
    uncond: PyTree,
    guidance_scale: float | Array,
    step_data: PyTree,
    num_steps: int,
) -> _Guided:
    """A sampler's model inputs, checked (``step_data`` rows, CFG shapes) and bundled for its scan."""
    _check_step_data(step_data, num_steps)
    _check_cfg(cond, uncond, np.shape(x_T)[0])
    return _Guided(_as_partial(model_fn), cond, uncond, jnp.asarray(guidance_scale, jnp.float32))


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")


def _with_trajectory(x: Array, x_T: Array, traj: Array, return_trajectory: bool):
    """``x``, or ``(x, [x_T; traj])`` when the trajectory is asked for."""
    if not return_trajectory:
        return x
    return x, jnp.concatenate([x_T[None], traj], axis=0)


def _scan_steps(update: Callable[[Array, Any], Array], x_T: Array, xs: Any, return_trajectory: bool):
    """``lax.scan`` of ``x <- update(x, step)`` over ``xs``; x keeps x_T's dtype."""

    def body(x, step):
        x_new = update(x, step).astype(x.dtype)
        return x_new, (x_new if return_trajectory else None)

    x, traj = jax.lax.scan(body, x_T, xs)
    return _with_trajectory(x, x_T, traj, return_trajectory)


@functools.partial(jax.jit, static_argnames=("return_trajectory", "with_step_index"))
def _flow_scan(
    guided: _Guided,
    x_T: Array,
    timesteps: Array,
    sigmas: Array,
    step_data: PyTree,
    *,
    return_trajectory: bool,
    with_step_index: bool,
):
    n = timesteps.shape[0]
    xs = (jnp.arange(n, dtype=jnp.int32), timesteps, sigmas[:-1], sigmas[1:], step_data)

    def update(x, step):
        i, t, sigma, sigma_next, sd = step
        v = guided.predict(x, t, sd, i, with_step_index)
        return x.astype(jnp.float32) + (sigma_next - sigma) * v

    return _scan_steps(update, x_T, xs, return_trajectory)


def sample_flow_euler(
    model_fn: ModelFn,
    x_T: Array,
    cond: PyTree,
    *,
    num_steps: int | None = None,
    shift: float = 1.0,
    mu: float | None = None,
    guidance_scale: float | Array = 1.0,
    uncond: PyTree = None,
    step_data: PyTree = None,
    schedule: FlowSchedule | None = None,
    num_train_timesteps: int = 1000,
    time_shift_type: TimeShiftType = "exponential",
    sigmas: Sequence[float] | None = None,
    return_trajectory: bool = False,
    with_step_index: bool = False,
) -> Array | tuple[Array, Array]:
    """Flow-matching Euler sampling (Wan, Flux, SD3, HunyuanVideo, LTX), one jitted scan.

    The model predicts a velocity ``v``; step i updates ``x += (sigma[i+1] - sigma[i]) * v``
    exactly as ``FlowMatchEulerDiscreteScheduler.step``. The schedule is
    ``flow_match_schedule(num_steps, shift=shift)``, or with ``mu`` the dynamic (Flux)
    shift ``flow_match_schedule(num_steps, use_dynamic_shifting=True, mu=mu, sigmas=sigmas)``;
    pass ``schedule`` to use any other precomputed :class:`FlowSchedule`.

    Args:
      model_fn: see the module docstring for the contract.
      x_T: initial noise (any shape with batch on axis 0).
      cond: conditioning pytree handed to ``model_fn``.
      num_steps: denoising steps (ignored when ``schedule`` is given).
      shift: static timestep shift (Wan: 3.0 at 480p, 5.0 at 720p).
      mu: Flux dynamic shift (see ``flux_mu``); selects ``use_dynamic_shifting``.
      guidance_scale: CFG scale, used only when ``uncond`` is given.
      uncond: unconditional pytree (same structure/shapes as ``cond``) enabling CFG.
      step_data: pytree whose leaves have leading dimension ``num_steps``; row i goes to
        ``model_fn`` at step i.
      schedule: precomputed schedule (overrides ``num_steps``/``shift``/``mu``/``sigmas``).
      num_train_timesteps, time_shift_type, sigmas: as in ``flow_match_schedule``.
      return_trajectory: also return ``[num_steps + 1, *x_T.shape]``, x_T first.
      with_step_index: call ``model_fn`` with a fifth argument, the int32 step index.

    Returns:
      ``x_0`` with ``x_T``'s shape and dtype, or ``(x_0, trajectory)``.
    """
    if schedule is None:
        if num_steps is None and sigmas is None:
            raise ValueError("sample_flow_euler: give num_steps (or sigmas, or a schedule)")
        schedule = flow_match_schedule(
            num_steps,
            shift=shift,
            num_train_timesteps=num_train_timesteps,
            use_dynamic_shifting=mu is not None,
            mu=mu,
            time_shift_type=time_shift_type,
            sigmas=sigmas,
        )
    n = int(np.shape(schedule.timesteps)[0])
    if np.shape(schedule.sigmas) != (n + 1,):
        raise ValueError(f"schedule.sigmas has shape {np.shape(schedule.sigmas)}; expected ({n + 1},)")
    return _flow_scan(
        _guided(model_fn, x_T, cond, uncond, guidance_scale, step_data, n),
        jnp.asarray(x_T),
        jnp.asarray(schedule.timesteps, jnp.float32),
        jnp.asarray(schedule.sigmas, jnp.float32),
        step_data,
        return_trajectory=return_trajectory,
        with_step_index=with_step_index,
    )


def predicted_x0_eps(
    x: Array, pred: Array, alpha_prod_t: Array, prediction_type: PredictionType
) -> tuple[Array, Array]:
    """The clean sample and the noise implied by a model output (float32), as diffusers' DDIM-family
    schedulers convert ``epsilon`` / ``sample`` / ``v_prediction`` outputs."""
    x = x.astype(jnp.float32)
    pred = pred.astype(jnp.float32)
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (x - beta_prod_t**0.5 * pred) / alpha_prod_t**0.5, pred
    if prediction_type == "sample":
        return pred, (x - alpha_prod_t**0.5 * pred) / beta_prod_t**0.5
    if prediction_type == "v_prediction":
        return alpha_prod_t**0.5 * x - beta_prod_t**0.5 * pred, alpha_prod_t**0.5 * pred + beta_prod_t**0.5 * x
    raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")


def ddim_step(
    x: Array,
    pred: Array,
    alpha_prod_t: Array,
    alpha_prod_t_prev: Array,
    *,
    prediction_type: PredictionType = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    eta: float | Array = 0.0,
    noise: Array | None = None,
) -> tuple[Array, Array]:
    """One ``DDIMScheduler.step`` in float32; returns ``(x_prev, pred_original_sample)``.

    ``noise`` (standard normal, x's shape) is scaled by ``eta * sqrt(variance)`` and added
    when given; without it the step is deterministic whatever ``eta`` is.
    """
    x = x.astype(jnp.float32)
    beta_prod_t = 1 - alpha_prod_t
    x0, eps = predicted_x0_eps(x, pred, alpha_prod_t, prediction_type)
    if clip_sample:
        x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
    variance = ((1 - alpha_prod_t_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std = eta * variance**0.5
    x_prev = alpha_prod_t_prev**0.5 * x0 + (1 - alpha_prod_t_prev - std**2) ** 0.5 * eps
    if noise is not None:
        x_prev = x_prev + std * noise.astype(jnp.float32)
    return x_prev, x0


@functools.partial(
    jax.jit,
    static_argnames=(
        "prediction_type",
        "learned_sigma",
        "channel_axis",
        "clip_sample",
        "clip_sample_range",
        "return_trajectory",
        "with_step_index",
    ),
)
def _ddim_scan(
    guided: _Guided,
    x_T: Array,
    timesteps: Array,
    alpha_prod_t: Array,
    alpha_prod_t_prev: Array,
    step_data: PyTree,
    eta: Array,
    keys: Array | None,
    *,
    prediction_type: PredictionType,
    learned_sigma: bool,
    channel_axis: int,
    clip_sample: bool,
    clip_sample_range: float,
    return_trajectory: bool,
    with_step_index: bool,
):
    n = timesteps.shape[0]
    xs = (jnp.arange(n, dtype=jnp.int32), timesteps, alpha_prod_t, alpha_prod_t_prev, step_data, keys)

    def update(x, step):
        i, t, a_t, a_prev, sd, key = step
        pred = guided.predict(x, t, sd, i, with_step_index)
        if learned_sigma:
            pred = learned_sigma_eps(pred, channel_axis)
        noise = None if key is None else jax.random.normal(key, x.shape, jnp.float32)
        x_new, _ = ddim_step(
            x,
            pred,
            a_t,
            a_prev,
            prediction_type=prediction_type,
            clip_sample=clip_sample,
            clip_sample_range=clip_sample_range,
            eta=eta,
            noise=noise,
        )
        return x_new

    return _scan_steps(update, x_T, xs, return_trajectory)


def sample_ddim(
    model_fn: ModelFn,
    x_T: Array,
    cond: PyTree,
    *,
    num_steps: int | None = None,
    schedule: DDIMSchedule | None = None,
    prediction_type: PredictionType = "epsilon",
    guidance_scale: float | Array = 1.0,
    uncond: PyTree = None,
    step_data: PyTree = None,
    learned_sigma: bool = False,
    channel_axis: int = -1,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    eta: float = 0.0,
    key: Array | None = None,
    return_trajectory: bool = False,
    with_step_index: bool = False,
) -> Array | tuple[Array, Array]:
    """DDIM sampling (DiT, CogVideoX-style v-prediction), one jitted scan.

    Matches a loop over ``DDIMScheduler.step`` with the same settings. The schedule is
    ``ddim_schedule(num_steps)`` (diffusers' defaults: linear betas 1e-4..0.02, leading
    spacing, ``set_alpha_to_one``) unless ``schedule`` gives another one.

    Args:
      model_fn: see the module docstring; ``t`` is the int32 DDIM timestep.
      x_T: initial noise, batch on axis 0.
      cond: conditioning pytree.
      num_steps: steps for the default schedule (ignored when ``schedule`` is given).
      schedule: precomputed :class:`DDIMSchedule` (``ddim_schedule(...)``).
      prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
      guidance_scale: CFG scale, used only when ``uncond`` is given.
      uncond: unconditional pytree enabling batched CFG.
      step_data: pytree with leading dimension ``num_steps`` (row i -> step i).
      learned_sigma: the model outputs ``2C`` channels (DiT); keep the first ``C`` on
        ``channel_axis`` as the prediction before guidance and the update.
      channel_axis: channel axis of the model output (``-1`` for NHWC / NTHWC latents).
      clip_sample: clamp the predicted ``x_0`` to ``[-clip_sample_range, clip_sample_range]``
        (off by default here, unlike ``DDIMScheduler``).
      eta: DDIM stochasticity; ``eta > 0`` needs ``key``. Step i draws
        ``jax.random.normal(jax.random.split(key, n)[i], x_T.shape, float32)``.
      key: PRNG key for ``eta > 0``.
      return_trajectory: also return ``[num_steps + 1, *x_T.shape]``, x_T first.
      with_step_index: call ``model_fn`` with a fifth argument, the int32 step index.

    Returns:
      ``x_0`` with ``x_T``'s shape and dtype, or ``(x_0, trajectory)``.
    """
    if schedule is None:
        if num_steps is None:
            raise ValueError("sample_ddim: give num_steps or a schedule")
        schedule = ddim_schedule(num_steps)
    _check_prediction_type(prediction_type)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and key is None:
        raise ValueError("sample_ddim: eta > 0 needs a PRNG key (key=jax.random.key(...))")
    n = int(np.shape(schedule.timesteps)[0])
    guided = _guided(model_fn, x_T, cond, uncond, guidance_scale, step_data, n)
    keys = jax.random.split(key, n) if eta > 0 else None
    return _ddim_scan(
        guided,
        jnp.asarray(x_T),
        jnp.asarray(schedule.timesteps, jnp.int32),
        jnp.asarray(schedule.alpha_prod_t, jnp.float32),
        jnp.asarray(schedule.alpha_prod_t_prev, jnp.float32),
        step_data,
        jnp.asarray(eta, jnp.float32),
        keys,
        prediction_type=prediction_type,
        learned_sigma=learned_sigma,
        channel_axis=channel_axis,
        clip_sample=clip_sample,
        clip_sample_range=float(clip_sample_range),
        return_trajectory=return_trajectory,
        with_step_index=with_step_index,
    )
