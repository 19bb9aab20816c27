"""Scheduler math as pure functions: flow-matching Euler and DDIM schedules.

These reproduce diffusers 0.42's ``FlowMatchEulerDiscreteScheduler.set_timesteps`` and
``DDIMScheduler`` (``__init__`` + ``set_timesteps`` + the per-step ``alpha_prod`` lookup)
bit for bit where practical, so a JAX sampler driven by these tables follows the same
trajectory as a diffusers pipeline. They run on the host in numpy: the number of steps is
static, and the resulting arrays enter the jitted samplers as traced inputs, so changing a
shift or a beta schedule never recompiles the sampler.

Numerics follow diffusers' dtypes: flow sigmas are computed in float64 (or float32 when
custom ``sigmas`` are given, as diffusers does) and rounded to float32; DDIM betas follow
``torch.linspace`` in float32 and ``alphas_cumprod`` accumulates in float64 like torch's
CPU ``cumprod`` before rounding to float32.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Sequence

import numpy as np

TimeShiftType = Literal["exponential", "linear"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]


class FlowSchedule(NamedTuple):
    """Flow-matching Euler schedule.

    Attributes:
      timesteps: ``[n]`` float32, the value handed to the model at step i (``sigma * 1000``
        for the default ``num_train_timesteps``).
      sigmas: ``[n + 1]`` float32, noise levels; the last entry is the terminal sigma
        (0, or 1 with ``invert_sigmas``). Step i moves x from ``sigmas[i]`` to ``sigmas[i+1]``.
    """

    timesteps: np.ndarray
    sigmas: np.ndarray


class DDIMSchedule(NamedTuple):
    """DDIM schedule, already resolved to per-step alpha products.

    Attributes:
      timesteps: ``[n]`` int32, the discrete timestep handed to the model at step i.
      alpha_prod_t: ``[n]`` float32, ``alphas_cumprod[timesteps[i]]``.
      alpha_prod_t_prev: ``[n]`` float32, ``alphas_cumprod[timesteps[i] - T // n]`` or the
        final alpha product (1, or ``alphas_cumprod[0]``) when that index is negative. This is
        diffusers' rule for every ``timestep_spacing``.
    """

    timesteps: np.ndarray
    alpha_prod_t: np.ndarray
    alpha_prod_t_prev: np.ndarray


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's resolution-dependent shift ``mu`` (diffusers' ``calculate_shift``).

    Linear in the number of image tokens: ``base_shift`` at ``base_seq_len`` tokens and
    ``max_shift`` at ``max_seq_len`` tokens.
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _shift_sigmas(s: np.ndarray, shift: float) -> np.ndarray:
    return shift * s / (1 + (shift - 1) * s)


def _time_shift(s: np.ndarray, mu: float, kind: TimeShiftType) -> np.ndarray:
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
    return mu / (mu + (1 / s - 1) ** 1.0)


def flow_match_schedule(
    num_steps: int | None = None,
    *,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
    use_dynamic_shifting: bool = False,
    mu: float | None = None,
    time_shift_type: TimeShiftType = "exponential",
    shift_terminal: float | None = None,
    invert_sigmas: bool = False,
    sigmas: Sequence[float] | None = None,
) -> FlowSchedule:
    """Timesteps and sigmas of ``FlowMatchEulerDiscreteScheduler.set_timesteps``.

    Without custom ``sigmas``: ``num_steps`` evenly spaced timesteps between the scheduler's
    (already shifted) ``sigma_max`` and ``sigma_min``, then shifted by
    ``shift * s / (1 + (shift - 1) * s)`` (Wan, SD3) or, with ``use_dynamic_shifting``, by
    the time shift ``e^mu / (e^mu + 1/s - 1)`` (Flux; ``"linear"`` uses ``mu`` instead of
    ``e^mu``). Like diffusers, the static shift is applied both to the training sigmas
    (which sets ``sigma_min``) and again to the inference grid. Flux pipelines pass
    ``sigmas=np.linspace(1, 1/n, n)`` together with ``mu=flux_mu(seq_len)``.

    Args:
      num_steps: number of denoising steps (may be omitted when ``sigmas`` is given).
      shift: static shift (ignored with ``use_dynamic_shifting``).
      num_train_timesteps: training timesteps; ``timesteps = sigmas * num_train_timesteps``.
      use_dynamic_shifting: use the ``mu`` time shift instead of ``shift``.
      mu: required iff ``use_dynamic_shifting``.
      time_shift_type: ``"exponential"`` or ``"linear"`` dynamic shift.
      shift_terminal: stretch the shifted sigmas so the last one equals this value.
      invert_sigmas: Mochi's convention, ``sigmas -> 1 - sigmas`` with a terminal 1.
      sigmas: custom pre-shift sigmas (one per step).

    Returns:
      FlowSchedule with ``[n]`` timesteps and ``[n + 1]`` sigmas, float32.
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if use_dynamic_shifting and mu is None:
        raise ValueError("mu must be given when use_dynamic_shifting=True (e.g. mu=flux_mu(seq_len))")
    if not use_dynamic_shifting and mu is not None:
        raise ValueError("mu is only used with use_dynamic_shifting=True; pass shift= for a static shift")
    if time_shift_type not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if sigmas is not None:
        if num_steps is not None and len(sigmas) != num_steps:
            raise ValueError(f"len(sigmas)={len(sigmas)} does not match num_steps={num_steps}")
        num_steps = len(sigmas)
    if num_steps is None or num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")

    n_train = num_train_timesteps
    # Training sigmas (scheduler __init__), float32 like the torch tensor.
    train = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1] / np.float32(n_train)
    if not use_dynamic_shifting:
        train = (np.float32(shift) * train / (1 + np.float32(shift - 1) * train)).astype(np.float32)
    sigma_max, sigma_min = float(train[0]), float(train[-1])

    if sigmas is None:
        s = np.linspace(sigma_max * n_train, sigma_min * n_train, num_steps) / n_train
    else:
        s = np.asarray(sigmas, dtype=np.float64).astype(np.float32)
    if use_dynamic_shifting:
        s = _time_shift(s, float(mu), time_shift_type)
    else:
        s = _shift_sigmas(s, shift)
    if shift_terminal:
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))
    s32 = np.asarray(s).astype(np.float32)
    if invert_sigmas:
        s32 = (np.float32(1.0) - s32).astype(np.float32)
    timesteps = (s32 * np.float32(n_train)).astype(np.float32)
    terminal = np.float32(1.0 if invert_sigmas else 0.0)
    return FlowSchedule(timesteps=timesteps, sigmas=np.append(s32, terminal).astype(np.float32))


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=float32)`` exactly (CPU kernel, fused multiply-add)."""
    s, e = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([s], np.float32)
    step = np.float64((e - s) / np.float32(n - 1))
    idx = np.arange(n, dtype=np.float64)
    lo = np.float64(s) + step * idx
    hi = np.float64(e) - step * (n - 1 - idx)
    return np.where(np.arange(n) < n // 2, lo, hi).astype(np.float32)


def _squaredcos_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def _cumprod_f32(alphas: np.ndarray) -> np.ndarray:
    """torch's CPU float32 cumprod: accumulate in float64, round each output."""
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    sqrt_ac = np.sqrt(_cumprod_f32(alphas))
    a0, a_t = sqrt_ac[0].copy(), sqrt_ac[-1].copy()
    sqrt_ac = (sqrt_ac - a_t) * (a0 / (a0 - a_t))
    ac = sqrt_ac**2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]]).astype(np.float32)
    return (np.float32(1.0) - alphas).astype(np.float32)


def ddim_alphas_cumprod(
    *,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: BetaSchedule = "linear",
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """``DDIMScheduler.alphas_cumprod`` (``[num_train_timesteps]`` float32)."""
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if beta_schedule == "linear":
        betas = _torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "scaled_linear":
        betas = _torch_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _squaredcos_betas(num_train_timesteps)
    else:
        raise ValueError(
            f"beta_schedule must be 'linear', 'scaled_linear' or 'squaredcos_cap_v2', got {beta_schedule!r}"
        )
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return _cumprod_f32((np.float32(1.0) - betas).astype(np.float32))


def ddim_timesteps(
    num_steps: int,
    *,
    num_train_timesteps: int = 1000,
    timestep_spacing: TimestepSpacing = "leading",
    steps_offset: int = 0,
) -> np.ndarray:
    """``DDIMScheduler.set_timesteps`` timesteps (``[num_steps]`` int64, descending)."""
    n_train = num_train_timesteps
    if not 1 <= num_steps <= n_train:
        raise ValueError(f"num_steps must be in [1, num_train_timesteps={n_train}], got {num_steps}")
    if timestep_spacing == "linspace":
        ts = np.linspace(0, n_train - 1, num_steps).round()[::-1].astype(np.int64)
    elif timestep_spacing == "leading":
        ratio = n_train // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    elif timestep_spacing == "trailing":
        ratio = n_train / num_steps
        ts = np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing must be 'leading', 'trailing' or 'linspace', got {timestep_spacing!r}")
    return ts.copy()


def ddim_schedule(
    num_steps: int,
    *,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: BetaSchedule = "linear",
    rescale_betas_zero_snr: bool = False,
    set_alpha_to_one: bool = True,
    steps_offset: int = 0,
    timestep_spacing: TimestepSpacing = "leading",
) -> DDIMSchedule:
    """Per-step timesteps and alpha products of diffusers' ``DDIMScheduler``.

    Defaults are ``DDIMScheduler``'s (DiT uses them unchanged). ``alpha_prod_t_prev`` uses
    ``t - num_train_timesteps // num_steps`` exactly as ``DDIMScheduler.step`` does.
    """
    ac = ddim_alphas_cumprod(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=beta_schedule,
        rescale_betas_zero_snr=rescale_betas_zero_snr,
    )
    ts = ddim_timesteps(
        num_steps,
        num_train_timesteps=num_train_timesteps,
        timestep_spacing=timestep_spacing,
        steps_offset=steps_offset,
    )
    if ts.max() >= num_train_timesteps or ts.min() < 0:
        raise ValueError(
            f"timesteps {ts.tolist()} fall outside [0, {num_train_timesteps}); check steps_offset={steps_offset}"
        )
    final = np.float32(1.0) if set_alpha_to_one else ac[0]
    prev = ts - num_train_timesteps // num_steps
    a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final).astype(np.float32)
    return DDIMSchedule(timesteps=ts.astype(np.int32), alpha_prod_t=ac[ts], alpha_prod_t_prev=a_prev)
