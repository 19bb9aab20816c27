"""The samplers' per-step loop: flow-match Euler fused into one compiled step, or diffusers' UniPC
(flow sigmas) as a host-side update over the compiled guided-velocity step."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from tqdm.auto import tqdm

from jquant.pipeline.t2v.memory import compiled_peak
from jquant.sampling import FlowSchedule, cfg_combine

Array = jax.Array


# --- UniPC (diffusers' UniPCMultistepScheduler with flow sigmas) -----------------------------------
def unipc_schedule(config: dict[str, Any], steps: int) -> FlowSchedule:
    """``UniPCMultistepScheduler.set_timesteps`` with ``use_flow_sigmas``: sigmas
    ``linspace(1, 1/T, n + 1)[:-1]`` shifted by ``flow_shift`` (the first nudged below 1), a
    terminal 0, and the timesteps the model sees truncated to integers, as diffusers does."""
    n_train = int(config.get("num_train_timesteps", 1000))
    shift = float(config.get("flow_shift", 1.0))
    s = np.linspace(1, 1 / n_train, steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    if np.fabs(s[0] - 1) < 1e-6:
        s[0] -= 1e-6
    timesteps = (s * n_train).astype(np.int64).astype(np.float32)
    return FlowSchedule(timesteps, np.append(s, 0.0).astype(np.float32))


class UniPC:
    """The host side of diffusers' UniPC (predict-x0, bh1/bh2, any ``solver_order``, corrector):
    per step, the model's velocity -> the next sample. Coefficients are float32 scalars computed
    as diffusers computes them; the array updates are elementwise jnp in float32."""

    def __init__(self, config: dict[str, Any], sigmas: np.ndarray) -> None:
        self.order = int(config.get("solver_order", 2))
        self.bh2 = config.get("solver_type", "bh2") == "bh2"
        self.lower_order_final = bool(config.get("lower_order_final", True))
        self.disable_corrector = set(config.get("disable_corrector") or [])
        self.sigmas = np.asarray(sigmas, np.float32)
        self.n = len(self.sigmas) - 1
        self.outputs: list[Array] = []
        self.last_sample: Array | None = None
        self.this_order = 0
        self.lower_order_nums = 0

    def _lam(self, i: int) -> np.float32:
        sig = self.sigmas[i]
        with np.errstate(divide="ignore"):
            return np.log(np.float32(1) - sig) - np.log(sig)

    def _coeffs(self, t: int, s0: int, hist: list[int], order: int) -> tuple[Any, ...]:
        """(sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * B_h, rks, R, b) for target t from s0."""
        sig_t, sig_s0 = self.sigmas[t], self.sigmas[s0]
        alpha_t = np.float32(1) - sig_t
        lam_s0 = self._lam(s0)
        h = self._lam(t) - lam_s0
        rks = [(self._lam(si) - lam_s0) / h for si in hist[: order - 1]] + [np.float32(1)]
        hh = -h
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = np.expm1(hh) if self.bh2 else hh
        fact, big_r, b = 1, [], []
        for i in range(1, order + 1):
            big_r.append(np.power(np.asarray(rks, np.float32), i - 1))
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = sig_t / sig_s0
        return ratio, alpha_t * h_phi_1, alpha_t * b_h, rks, np.asarray(big_r, np.float32), np.asarray(b, np.float32)

    def step(self, i: int, v: Array, x: Array) -> Array:
        """Sample at step i + 1 from the velocity ``v`` predicted at sample ``x``, step i."""
        m = x.astype(jnp.float32) - self.sigmas[i] * v.astype(jnp.float32)  # flow_prediction -> x0
        if i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None:
            order = self.this_order
            ratio, a_phi, a_bh, rks, big_r, b = self._coeffs(i, i - 1, [i - 1 - k for k in range(1, order)], order)
            m0 = self.outputs[-1]
            d1s = [(self.outputs[-(k + 1)] - m0) / rks[k - 1] for k in range(1, order)]
            rhos = np.asarray([0.5], np.float32) if order == 1 else np.linalg.solve(big_r, b).astype(np.float32)
            corr = sum((rhos[k] * d for k, d in enumerate(d1s)), jnp.zeros_like(m0))
            x = ratio * self.last_sample - a_phi * m0 - a_bh * (corr + rhos[-1] * (m - m0))
        self.outputs = (self.outputs + [m])[-self.order :]
        order = min(self.order, self.n - i) if self.lower_order_final else self.order
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = x
        order = self.this_order
        ratio, a_phi, a_bh, rks, big_r, b = self._coeffs(i + 1, i, [i - k for k in range(1, order)], order)
        m0 = self.outputs[-1]
        x_t = ratio * x.astype(jnp.float32) - a_phi * m0
        if order > 1:
            d1s = [(self.outputs[-(k + 1)] - m0) / rks[k - 1] for k in range(1, order)]
            rhos = (
                np.asarray([0.5], np.float32)
                if order == 2
                else np.linalg.solve(big_r[:-1, :-1], b[:-1]).astype(np.float32)
            )
            x_t = x_t - a_bh * sum((rhos[k] * d for k, d in enumerate(d1s)), jnp.zeros_like(m0))
        self.lower_order_nums = min(self.lower_order_nums + 1, self.order)
        return x_t.astype(x.dtype)


# --- the per-step sampler -------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg",))
def _velocity(model_fn: Partial, x: Array, t: Array, cond: Any, uncond: Any, g: Array, sd: Any, *, cfg: bool) -> Array:
    """The guided model output at one step (both CFG branches in one batched call), float32."""
    if cfg:
        x2 = jnp.concatenate([x, x], axis=0)
        c2 = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
        pred_u, pred_c = jnp.split(model_fn(x2, t, c2, sd).astype(jnp.float32), 2, axis=0)
        return cfg_combine(pred_u, pred_c, g)
    return model_fn(x, t, cond, sd).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _euler_step(
    model_fn: Partial,
    x: Array,
    t: Array,
    sigma: Array,
    sigma_next: Array,
    cond: Any,
    uncond: Any,
    g: Array,
    sd: Any,
    *,
    cfg: bool,
) -> Array:
    """One flow-match Euler step, both CFG branches in one batched call (diffusers' order)."""
    if cfg:
        x2 = jnp.concatenate([x, x], axis=0)
        c2 = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
        pred_u, pred_c = jnp.split(model_fn(x2, t, c2, sd).astype(jnp.float32), 2, axis=0)
        v = cfg_combine(pred_u, pred_c, g)
    else:
        v = model_fn(x, t, cond, sd).astype(jnp.float32)
    return (x.astype(jnp.float32) + (sigma_next - sigma) * v).astype(x.dtype)


def run_sampler(
    model_fn: Partial,
    x_T: Array,
    schedule: FlowSchedule,
    cond: Any,
    uncond: Any = None,
    guidance: float = 1.0,
    step_data: Any = None,
    *,
    progress: bool = True,
    desc: str = "sampling",
    solver: UniPC | None = None,
) -> tuple[Array, int | None]:
    """Flow-match Euler over ``schedule`` (or ``solver``'s UniPC updates): a Python loop over one
    AOT-compiled step (a progress bar per step); returns ``(x_0, peak bytes of the step)``."""
    n = int(schedule.timesteps.shape[0])
    ts = jnp.asarray(schedule.timesteps, jnp.float32)
    sig = jnp.asarray(schedule.sigmas, jnp.float32)
    g = jnp.asarray(guidance, jnp.float32)
    cfg = uncond is not None
    row = (lambda i: jax.tree_util.tree_map(lambda a: a[i], step_data)) if step_data is not None else (lambda i: None)
    x = x_T
    if solver is not None:
        compiled = _velocity.lower(model_fn, x_T, ts[0], cond, uncond, g, row(0), cfg=cfg).compile()
        for i in tqdm(range(n), desc=desc, disable=not progress, leave=False):
            x = solver.step(i, compiled(model_fn, x, ts[i], cond, uncond, g, row(i)), x)
        return jax.block_until_ready(x), compiled_peak(compiled)
    compiled = _euler_step.lower(model_fn, x_T, ts[0], sig[0], sig[1], cond, uncond, g, row(0), cfg=cfg).compile()
    for i in tqdm(range(n), desc=desc, disable=not progress, leave=False):
        x = compiled(model_fn, x, ts[i], sig[i], sig[i + 1], cond, uncond, g, row(i))
    return jax.block_until_ready(x), compiled_peak(compiled)
