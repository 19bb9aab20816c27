"""CogVideoX's DDIM and DPM schedulers in JAX vs diffusers' CogVideoX{DDIM,DPM}Scheduler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.sampling import (
    COGVIDEOX_2B_SCHEDULER,
    COGVIDEOX_5B_SCHEDULER,
    cogvideox_alphas_cumprod,
    cogvideox_ddim_schedule,
    cogvideox_dpm_schedule,
    ddim_schedule,
    sample_cogvideox_dpm,
    sample_ddim,
)

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers")

SHAPE = (2, 3, 4, 5)
SETTINGS = [
    COGVIDEOX_2B_SCHEDULER,
    COGVIDEOX_5B_SCHEDULER,
    dict(beta_schedule="linear", snr_shift_scale=2.0, timestep_spacing="leading", steps_offset=1),
    dict(beta_schedule="squaredcos_cap_v2", snr_shift_scale=1.5, set_alpha_to_one=False, timestep_spacing="linspace"),
]
IDS = ["2b", "5b", "linear_leading", "cos_linspace"]


def _toy(x, t, cond, xp):
    """Shared analytic 'model' (a v-prediction stand-in)."""
    return 0.3 * x - 0.5 * cond + xp.sin(t * 0.003) * 0.2


def _jax_model(x, t, cond, step_slice):
    return _toy(x, t.astype(jnp.float32), cond, jnp)


def _rng_arrays(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x_T, cond = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    return x_T, cond, rng.standard_normal((n, *SHAPE)).astype(np.float32)


@pytest.mark.parametrize("cfg", SETTINGS, ids=IDS)
def test_alphas_cumprod_match_diffusers(cfg):
    ref = schedulers.CogVideoXDDIMScheduler(**cfg).alphas_cumprod.numpy()
    keys = ("beta_schedule", "snr_shift_scale", "rescale_betas_zero_snr")
    ours = cogvideox_alphas_cumprod(**{k: v for k, v in cfg.items() if k in keys})
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-12)
    # the SNR shift is what sets CogVideoX apart from DDIMScheduler
    if cfg.get("snr_shift_scale", 3.0) != 1.0:
        assert not np.allclose(
            ours[:-1], ddim_schedule(1000, beta_schedule=cfg["beta_schedule"]).alpha_prod_t[::-1][:-1]
        )


@pytest.mark.parametrize("cfg", SETTINGS, ids=IDS)
def test_ddim_loop_matches_diffusers(cfg):
    n = 7
    x_T, cond, _ = _rng_arrays(n)
    sched = schedulers.CogVideoXDDIMScheduler(prediction_type="v_prediction", **cfg)
    sched.set_timesteps(n)
    x = torch.from_numpy(x_T)
    for t in sched.timesteps:
        v = _toy(x, t.float(), torch.from_numpy(cond), torch)
        x = sched.step(v, t, x).prev_sample
    ours_sched = cogvideox_ddim_schedule(n, **cfg)
    np.testing.assert_array_equal(ours_sched.timesteps, sched.timesteps.numpy())
    ours = sample_ddim(_jax_model, x_T, cond, schedule=ours_sched, prediction_type="v_prediction")
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("cfg", SETTINGS, ids=IDS)
def test_dpm_loop_matches_diffusers(cfg, monkeypatch):
    """The pipeline's loop over CogVideoXDPMScheduler.step, with the scheduler's noise draws
    replaced by a fixed per-step noise that the JAX sampler receives too."""
    n = 6
    x_T, cond, noise = _rng_arrays(n)
    module = __import__("diffusers.schedulers.scheduling_dpm_cogvideox", fromlist=["randn_tensor"])
    step = {"i": 0}
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(noise[step["i"]]))
    sched = schedulers.CogVideoXDPMScheduler(prediction_type="v_prediction", **cfg)
    sched.set_timesteps(n)
    x, old = torch.from_numpy(x_T), None
    for i, t in enumerate(sched.timesteps):
        step["i"] = i
        v = _toy(x, t.float(), torch.from_numpy(cond), torch)
        back = sched.timesteps[i - 1] if i > 0 else None
        x, old = sched.step(v, old, t, back, x, return_dict=False)
    ours = sample_cogvideox_dpm(_jax_model, x_T, cond, schedule=cogvideox_dpm_schedule(n, **cfg), noise=noise)
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=2e-5, atol=2e-5)


def test_dpm_sampler_key_cfg_and_errors():
    n = 4
    x_T, cond, _ = _rng_arrays(n)
    sched = cogvideox_dpm_schedule(n, **COGVIDEOX_2B_SCHEDULER)
    assert sched.second_order.tolist() == [0, 1, 1, 0]  # first order at the start and at the last step
    a = sample_cogvideox_dpm(_jax_model, x_T, cond, schedule=sched, key=jax.random.key(0))
    b = sample_cogvideox_dpm(_jax_model, x_T, cond, schedule=sched, key=jax.random.key(1))
    assert np.all(np.isfinite(np.asarray(a))) and not np.allclose(a, b)  # stochastic in the key
    # CFG with guidance 1 equals the conditional branch alone
    g1 = sample_cogvideox_dpm(_jax_model, x_T, cond, schedule=sched, key=jax.random.key(0), uncond=0 * cond)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(a), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one of key"):
        sample_cogvideox_dpm(_jax_model, x_T, cond, schedule=sched)
    with pytest.raises(ValueError, match="noise has shape"):
        sample_cogvideox_dpm(_jax_model, x_T, cond, schedule=sched, noise=np.zeros((n + 1, *SHAPE), np.float32))
    with pytest.raises(ValueError, match="rescale_betas_zero_snr needs"):  # zero-SNR rescaling of one step is 0/0
        cogvideox_dpm_schedule(1, num_train_timesteps=1, rescale_betas_zero_snr=True)
