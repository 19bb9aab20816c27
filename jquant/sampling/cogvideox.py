"""CogVideoX's samplers: ``CogVideoXDDIMScheduler`` and ``CogVideoXDPMScheduler`` in JAX.

CogVideoX's schedulers differ from diffusers' ``DDIMScheduler`` in the noise schedule: the
scaled-linear betas are built in float64, the cumulative alphas are shifted towards noise by
``snr_shift_scale`` (``a / (s + (1 - s) a)``) and zero-terminal-SNR rescaling acts on the
cumulative alphas directly (the published configs use v-prediction with
``rescale_betas_zero_snr=True`` and ``timestep_spacing="trailing"``). Their DDIM step
``a_t x + b_t x0`` equals the deterministic DDIM update and ignores ``clip_sample``, so
``sample_ddim(..., schedule=cogvideox_ddim_schedule(n), prediction_type="v_prediction")``
reproduces ``CogVideoXDDIMScheduler``. The DPM variant is a stochastic second-order
DPM-Solver++ (2M SDE) that carries the previous clean-sample prediction:
:func:`sample_cogvideox_dpm`, one jitted ``lax.scan`` with the model contract of
:mod:`jquant.sampling.samplers`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jquant.sampling.samplers import (
    PredictionType,
    _check_prediction_type,
    _Guided,
    _guided,
    _with_trajectory,
    predicted_x0_eps,
)
from jquant.sampling.schedules import (
    BetaSchedule,
    DDIMSchedule,
    TimestepSpacing,
    _cumprod_f32,
    _squaredcos_betas,
    _torch_linspace_f32,
    ddim_timesteps,
)

Array = jax.Array
PyTree = Any

# scheduler_config.json of the published checkpoints (THUDM/CogVideoX-{2b,5b}/scheduler).
COGVIDEOX_2B_SCHEDULER: dict[str, Any] = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    rescale_betas_zero_snr=True,
    set_alpha_to_one=True,
    snr_shift_scale=3.0,
    steps_offset=0,
    timestep_spacing="trailing",
)
COGVIDEOX_5B_SCHEDULER: dict[str, Any] = dict(COGVIDEOX_2B_SCHEDULER, snr_shift_scale=1.0)


def cogvideox_alphas_cumprod(
    *,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: BetaSchedule = "scaled_linear",
    snr_shift_scale: float = 3.0,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """``CogVideoX{DDIM,DPM}Scheduler.alphas_cumprod`` (``[num_train_timesteps]``, float64 for the
    scaled-linear schedule as in diffusers, float32 otherwise)."""
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
        ac = np.cumprod(1.0 - betas)
    elif beta_schedule == "linear":
        ac = _cumprod_f32(
            (np.float32(1) - _torch_linspace_f32(beta_start, beta_end, num_train_timesteps)).astype(np.float32)
        )
    elif beta_schedule == "squaredcos_cap_v2":
        ac = _cumprod_f32((np.float32(1) - _squaredcos_betas(num_train_timesteps)).astype(np.float32))
    else:
        raise ValueError(
            f"beta_schedule must be 'linear', 'scaled_linear' or 'squaredcos_cap_v2', got {beta_schedule!r}"
        )
    ac = (ac / (snr_shift_scale + (1 - snr_shift_scale) * ac)).astype(ac.dtype)
    if rescale_betas_zero_snr:
        root = np.sqrt(ac)
        first, last = root[0].copy(), root[-1].copy()
        if first == last:
            raise ValueError(
                "rescale_betas_zero_snr needs alphas_cumprod[0] != alphas_cumprod[-1] (num_train_timesteps > 1)"
            )
        ac = (((root - last) * (first / (first - last))) ** 2).astype(ac.dtype)
    return ac


def _per_step_alphas(
    num_steps: int,
    *,
    set_alpha_to_one: bool = True,
    steps_offset: int = 0,
    timestep_spacing: TimestepSpacing = "leading",
    **alphas: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(timesteps, alphas_cumprod, a_t, a_prev) of ``set_timesteps`` + ``step``'s lookups, for the
    scheduler settings (keyword names and defaults of the CogVideoX scheduler classes; ``alphas``
    are :func:`cogvideox_alphas_cumprod`'s)."""
    ac = cogvideox_alphas_cumprod(**alphas)
    num_train_timesteps = ac.shape[0]
    ts = ddim_timesteps(
        num_steps, num_train_timesteps=num_train_timesteps, timestep_spacing=timestep_spacing, steps_offset=steps_offset
    )
    if ts.max() >= num_train_timesteps or ts.min() < 0:
        raise ValueError(
            f"timesteps {ts.tolist()} fall outside [0, {num_train_timesteps}); check steps_offset={steps_offset}"
        )
    prev = ts - num_train_timesteps // num_steps
    final = 1.0 if set_alpha_to_one else ac[0]
    a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final)
    return ts, ac, ac[ts].astype(np.float64), a_prev.astype(np.float64)


def cogvideox_ddim_schedule(num_steps: int, **scheduler_config: Any) -> DDIMSchedule:
    """``CogVideoXDDIMScheduler``'s per-step timesteps and alpha products as a :class:`DDIMSchedule`
    for :func:`sample_ddim` (use ``prediction_type="v_prediction"``, no clipping).

    ``scheduler_config``: the scheduler's settings by their diffusers names (``num_train_timesteps``,
    ``beta_start``, ``beta_end``, ``beta_schedule``, ``snr_shift_scale``, ``rescale_betas_zero_snr``,
    ``set_alpha_to_one``, ``steps_offset``, ``timestep_spacing``), defaulting to the class's; the
    checkpoints' settings are ``COGVIDEOX_{2B,5B}_SCHEDULER``.
    """
    ts, _, a_t, a_prev = _per_step_alphas(num_steps, **scheduler_config)
    return DDIMSchedule(
        timesteps=ts.astype(np.int32), alpha_prod_t=a_t.astype(np.float32), alpha_prod_t_prev=a_prev.astype(np.float32)
    )


class CogVideoXDPMSchedule(NamedTuple):
    """Per-step tables of ``CogVideoXDPMScheduler.step`` (float32, ``[n]`` each).

    With ``d = x0`` (first order) or ``d = mult3 * x0 - mult4 * x0_prev`` (second order, where
    ``second_order`` is 1), a step is ``x <- mult1 * x - mult2 * d + mult_noise * noise``.
    """

    timesteps: np.ndarray
    alpha_prod_t: np.ndarray
    mult1: np.ndarray
    mult2: np.ndarray
    mult3: np.ndarray
    mult4: np.ndarray
    mult_noise: np.ndarray
    second_order: np.ndarray


def cogvideox_dpm_schedule(num_steps: int, **scheduler_config: Any) -> CogVideoXDPMSchedule:
    """``CogVideoXDPMScheduler``'s multipliers for every step (settings as in
    :func:`cogvideox_ddim_schedule`), computed in float64 as diffusers does (log-SNR
    ``lambda = log sqrt(a / (1 - a))``, ``h = lambda_prev - lambda``; a zero-SNR first step gives
    ``h = inf``, which the multipliers take to their limits). The step's look-back alpha is the
    previous step's timestep, as the pipeline passes it."""
    ts, ac, a_t, a_prev = _per_step_alphas(num_steps, **scheduler_config)
    num_train_timesteps = ac.shape[0]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lam = np.log(np.sqrt(a_t / (1 - a_t)))
        lam_next = np.log(np.sqrt(a_prev / (1 - a_prev)))
        h = lam_next - lam
        mult1 = np.sqrt((1 - a_prev) / (1 - a_t)) * np.exp(-h)
        mult2 = np.expm1(-2 * h) * np.sqrt(a_prev)
        mult_noise = np.sqrt(1 - a_prev) * np.sqrt(1 - np.exp(-2 * h))
        a_back = np.concatenate([[np.nan], ac[ts[:-1]].astype(np.float64)])
        r = (lam - np.log(np.sqrt(a_back / (1 - a_back)))) / h
        mult3, mult4 = 1 + 1 / (2 * r), 1 / (2 * r)
    prev = ts - num_train_timesteps // num_steps
    second = (np.arange(num_steps) > 0) & (prev >= 0)
    mult3, mult4 = np.where(second, mult3, 1.0), np.where(second, mult4, 0.0)
    tables = dict(mult1=mult1, mult2=mult2, mult3=mult3, mult4=mult4, mult_noise=mult_noise)
    for name, table in tables.items():
        if not np.all(np.isfinite(table)):
            raise ValueError(
                f"cogvideox_dpm_schedule: {name} is not finite ({table.tolist()}); check the noise schedule"
            )
    f32 = {k: v.astype(np.float32) for k, v in tables.items()}
    return CogVideoXDPMSchedule(
        timesteps=ts.astype(np.int32),
        alpha_prod_t=a_t.astype(np.float32),
        second_order=second.astype(np.float32),
        **f32,
    )


@functools.partial(jax.jit, static_argnames=("prediction_type", "return_trajectory", "with_step_index"))
def _dpm_scan(
    guided: _Guided,
    x_T: Array,
    tables: tuple[Array, ...],
    step_data: PyTree,
    noise: Array | None,
    keys: Array | None,
    *,
    prediction_type: PredictionType,
    return_trajectory: bool,
    with_step_index: bool,
):
    n = tables[0].shape[0]
    xs = (jnp.arange(n, dtype=jnp.int32), tables, step_data, noise, keys)

    def body(carry, step):
        x, x0_prev = carry
        i, (t, a_t, m1, m2, m3, m4, mn, second), sd, eps, key = step
        pred = guided.predict(x, t, sd, i, with_step_index)
        x0, _ = predicted_x0_eps(x, pred, a_t, prediction_type)
        d = jnp.where(second > 0, m3 * x0 - m4 * x0_prev, x0)
        if eps is None:
            eps = jax.random.normal(key, x.shape, jnp.float32)
        x_new = (m1 * x.astype(jnp.float32) - m2 * d + mn * eps.astype(jnp.float32)).astype(x.dtype)
        return (x_new, x0), (x_new if return_trajectory else None)

    (x, _), traj = jax.lax.scan(body, (x_T, jnp.zeros(x_T.shape, jnp.float32)), xs)
    return _with_trajectory(x, x_T, traj, return_trajectory)


def sample_cogvideox_dpm(
    model_fn: Any,
    x_T: Array,
    cond: PyTree,
    *,
    num_steps: int | None = None,
    schedule: CogVideoXDPMSchedule | None = None,
    prediction_type: PredictionType = "v_prediction",
    key: Array | None = None,
    noise: Array | None = None,
    guidance_scale: float | Array = 1.0,
    uncond: PyTree = None,
    step_data: PyTree = None,
    return_trajectory: bool = False,
    with_step_index: bool = False,
) -> Array | tuple[Array, Array]:
    """CogVideoX's DPM-Solver++ (2M SDE) sampling, one jitted scan (matches a pipeline loop over
    ``CogVideoXDPMScheduler.step``).

    The scheduler is stochastic: step i adds ``mult_noise[i] * noise_i`` with
    ``noise_i = jax.random.normal(jax.random.split(key, n)[i], x_T.shape)``, or ``noise[i]`` when
    ``noise`` (``[n, *x_T.shape]``) is given. ``schedule`` defaults to
    ``cogvideox_dpm_schedule(num_steps, **COGVIDEOX_5B_SCHEDULER)``. Other arguments as in
    :func:`sample_ddim` (``t`` handed to ``model_fn`` is the int32 timestep).
    """
    if schedule is None:
        if num_steps is None:
            raise ValueError("sample_cogvideox_dpm: give num_steps or a schedule")
        schedule = cogvideox_dpm_schedule(num_steps, **COGVIDEOX_5B_SCHEDULER)
    _check_prediction_type(prediction_type)
    n = int(np.shape(schedule.timesteps)[0])
    if (key is None) == (noise is None):
        raise ValueError("sample_cogvideox_dpm: give exactly one of key (PRNG key) or noise ([num_steps, *x_T.shape])")
    if noise is not None and tuple(np.shape(noise)) != (n, *np.shape(x_T)):
        raise ValueError(f"noise has shape {np.shape(noise)}; expected {(n, *np.shape(x_T))}")
    guided = _guided(model_fn, x_T, cond, uncond, guidance_scale, step_data, n)
    tables = (jnp.asarray(schedule.timesteps, jnp.int32),) + tuple(
        jnp.asarray(getattr(schedule, f), jnp.float32) for f in CogVideoXDPMSchedule._fields[1:]
    )
    return _dpm_scan(
        guided,
        jnp.asarray(x_T),
        tables,
        step_data,
        None if noise is None else jnp.asarray(noise),
        None if key is None else jax.random.split(key, n),
        prediction_type=prediction_type,
        return_trajectory=return_trajectory,
        with_step_index=with_step_index,
    )
