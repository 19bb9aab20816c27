"""Parity of jquant.sampling with diffusers' schedulers, plus scan/step_data/CFG behaviour."""

from __future__ import annotations

import _draws as draws
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.sampling import (
    cfg_combine,
    ddim_alphas_cumprod,
    ddim_schedule,
    flow_match_schedule,
    flux_mu,
    learned_sigma_eps,
    sample_ddim,
    sample_flow_euler,
)

try:  # the parity extra: pip install -e .[parity]
    import torch
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
except ImportError:  # pragma: no cover - CI installs them
    torch = None
parity = pytest.mark.skipif(torch is None, reason="needs torch and diffusers (the parity extra)")

SHAPE = (2, 3, 4, 5)  # batch, ..., channels last


def _noise(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _cond(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


# Toy analytic model shared by the JAX sampler and the torch reference loop.
def _toy(x, t, cond, xp):
    return 0.3 * x - 0.5 * cond + xp.sin(t * 0.003) * 0.2


def _jax_model(x, t, cond, step_slice):
    out = _toy(x, t.astype(jnp.float32), cond, jnp)
    return out if step_slice is None else out + step_slice


def _torch_model(x, t, cond):
    return _toy(x, torch.as_tensor(t, dtype=torch.float32), torch.from_numpy(cond), torch)


# ---------------------------------------------------------------- flow-matching schedules

FLOW_SETTINGS = [
    dict(num_steps=10),
    dict(num_steps=30, shift=5.0),
    dict(num_steps=7, shift=3.0, num_train_timesteps=500),
    dict(num_steps=12, shift=2.0, shift_terminal=0.1),
    dict(num_steps=9, invert_sigmas=True),
    dict(num_steps=20, use_dynamic_shifting=True, mu=flux_mu(4096)),
    dict(num_steps=6, use_dynamic_shifting=True, mu=0.7, time_shift_type="linear"),
    dict(sigmas=list(np.linspace(1.0, 1 / 28, 28)), use_dynamic_shifting=True, mu=flux_mu(1024)),
]

_CONFIG_KEYS = (
    "shift",
    "num_train_timesteps",
    "use_dynamic_shifting",
    "time_shift_type",
    "shift_terminal",
    "invert_sigmas",
)


def _diffusers_flow(cfg: dict) -> FlowMatchEulerDiscreteScheduler:
    sched = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in cfg.items() if k in _CONFIG_KEYS})
    sched.set_timesteps(cfg.get("num_steps"), mu=cfg.get("mu"), sigmas=cfg.get("sigmas"))
    return sched


@parity
@pytest.mark.parametrize("cfg", FLOW_SETTINGS, ids=lambda c: ",".join(f"{k}" for k in c))
def test_flow_schedule_matches_diffusers(cfg):
    ref = _diffusers_flow(cfg)
    ours = flow_match_schedule(**cfg)
    # bit-exact on the dev machine; a few ulp of slack for other CPUs' float kernels
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-4)
    assert ours.sigmas[-1] == (1.0 if cfg.get("invert_sigmas") else 0.0)


def test_flux_mu_is_linear_in_tokens():
    # diffusers' calculate_shift: base_shift at 256 tokens, max_shift at 4096, linear between
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(2176) == pytest.approx((0.5 + 1.15) / 2)
    assert flux_mu(1024, max_shift=2.0) == pytest.approx(0.5 + 1.5 * 768 / 3840)


def test_flow_schedule_rejects_bad_args():
    with pytest.raises(ValueError, match="mu must be given"):
        flow_match_schedule(4, use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="mu is only used"):
        flow_match_schedule(4, mu=0.5)
    with pytest.raises(ValueError, match="num_steps"):
        flow_match_schedule(0)


# ---------------------------------------------------------------- DDIM schedules

DDIM_SETTINGS = [
    dict(),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", set_alpha_to_one=False),
    dict(beta_schedule="linear", timestep_spacing="linspace", set_alpha_to_one=False),
    dict(beta_schedule="scaled_linear", timestep_spacing="trailing", rescale_betas_zero_snr=True),
    dict(num_train_timesteps=300, timestep_spacing="leading", steps_offset=2),
]


@parity
@pytest.mark.parametrize("cfg", DDIM_SETTINGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("num_steps", [1, 13, 50])
def test_ddim_schedule_matches_diffusers(cfg, num_steps):
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(num_steps)
    ours = ddim_schedule(num_steps, **cfg)
    ac_kw = {k: v for k, v in cfg.items() if k not in ("timestep_spacing", "steps_offset", "set_alpha_to_one")}
    # torch's float32 sqrt (used by rescale_betas_zero_snr) is not correctly rounded on
    # every CPU, so that setting gets 1e-5; the others are bit-exact here, 2e-6 leaves room
    # for other CPUs' linspace kernels.
    rtol = 1e-5 if cfg.get("rescale_betas_zero_snr") else 2e-6
    np.testing.assert_allclose(ddim_alphas_cumprod(**ac_kw), ref.alphas_cumprod.numpy(), rtol=rtol, atol=1e-9)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    n_train = ref.config.num_train_timesteps
    expect_t, expect_prev = [], []
    for t in ours.timesteps:
        prev = int(t) - n_train // num_steps
        expect_t.append(ref.alphas_cumprod[int(t)].item())
        expect_prev.append(float(ref.alphas_cumprod[prev] if prev >= 0 else ref.final_alpha_cumprod))
    np.testing.assert_allclose(ours.alpha_prod_t, expect_t, rtol=rtol, atol=1e-9)
    np.testing.assert_allclose(ours.alpha_prod_t_prev, expect_prev, rtol=rtol, atol=1e-9)


def test_ddim_schedule_rejects_bad_args():
    with pytest.raises(ValueError, match="beta_schedule"):
        ddim_schedule(10, beta_schedule="cosine")
    with pytest.raises(ValueError, match="timestep_spacing"):
        ddim_schedule(10, timestep_spacing="middle")
    with pytest.raises(ValueError, match="num_steps"):
        ddim_schedule(2000)


# ---------------------------------------------------------------- full sampling runs


def _diffusers_flow_loop(cfg, x_T, cond, uncond=None, g=1.0, rows=None):
    sched = _diffusers_flow(cfg)
    x = torch.from_numpy(x_T)
    traj = [x.numpy().copy()]
    for i, t in enumerate(sched.timesteps):
        if uncond is None:
            pred = _torch_model(x, t, cond)
        else:
            pu, pc = _torch_model(x, t, uncond), _torch_model(x, t, cond)
            pred = pu + g * (pc - pu)
        if rows is not None:
            pred = pred + torch.from_numpy(rows[i])
        x = sched.step(pred, t, x).prev_sample
        traj.append(x.numpy().copy())
    return np.stack(traj)


@parity
@pytest.mark.parametrize("cfg", [FLOW_SETTINGS[1], FLOW_SETTINGS[7], FLOW_SETTINGS[4]], ids=["wan", "flux", "mochi"])
def test_flow_sampler_matches_diffusers_loop(cfg):
    x_T, cond = _noise(), _cond()
    ref = _diffusers_flow_loop(cfg, x_T, cond)
    x0, traj = sample_flow_euler(_jax_model, x_T, cond, schedule=flow_match_schedule(**cfg), return_trajectory=True)
    chex.assert_shape(traj, (ref.shape[0], *SHAPE))
    np.testing.assert_allclose(traj, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(x0, traj[-1])
    np.testing.assert_array_equal(traj[0], x_T)


@parity
def test_flow_sampler_builds_schedule_from_shift_and_mu():
    x_T, cond = _noise(), _cond()
    ref = _diffusers_flow_loop(dict(num_steps=8, shift=3.0), x_T, cond)
    np.testing.assert_allclose(sample_flow_euler(_jax_model, x_T, cond, num_steps=8, shift=3.0), ref[-1], atol=1e-5)
    flux = dict(num_steps=8, use_dynamic_shifting=True, mu=0.9)
    ref = _diffusers_flow_loop(flux, x_T, cond)
    np.testing.assert_allclose(sample_flow_euler(_jax_model, x_T, cond, num_steps=8, mu=0.9), ref[-1], atol=1e-5)


@parity
def test_flow_sampler_cfg_matches_diffusers_loop():
    x_T, cond, uncond = _noise(), _cond(1), _cond(2)
    cfg = dict(num_steps=10, shift=5.0)
    ref = _diffusers_flow_loop(cfg, x_T, cond, uncond=uncond, g=5.0)
    out = sample_flow_euler(_jax_model, x_T, cond, num_steps=10, shift=5.0, uncond=uncond, guidance_scale=5.0)
    np.testing.assert_allclose(out, ref[-1], atol=1e-5, rtol=1e-5)


def _diffusers_ddim_loop(
    cfg,
    num_steps,
    x_T,
    cond,
    *,
    prediction_type,
    learned_sigma=False,
    clip=False,
    eta=0.0,
    noises=None,
    uncond=None,
    g=1.0,
):
    sched = DDIMScheduler(prediction_type=prediction_type, clip_sample=clip, **cfg)
    sched.set_timesteps(num_steps)
    x = torch.from_numpy(x_T)
    for i, t in enumerate(sched.timesteps):

        def branch(c):
            p = _torch_model(x, t, c)
            return torch.cat([p, 7.0 + 0 * p], dim=-1) if learned_sigma else p

        pred = branch(cond) if uncond is None else branch(uncond) + g * (branch(cond) - branch(uncond))
        if learned_sigma:
            pred = pred[..., : SHAPE[-1]]
        kw = {} if noises is None else dict(variance_noise=torch.from_numpy(noises[i]))
        x = sched.step(pred, t, x, eta=eta, **kw).prev_sample
    return x.numpy()


@parity
@pytest.mark.parametrize(
    "cfg,prediction_type",
    [
        (dict(), "epsilon"),
        (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1), "epsilon"),
        (dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"), "v_prediction"),
        (dict(timestep_spacing="linspace", set_alpha_to_one=False), "sample"),
    ],
)
def test_ddim_sampler_matches_diffusers_loop(cfg, prediction_type):
    x_T, cond = _noise(), _cond()
    ref = _diffusers_ddim_loop(cfg, 12, x_T, cond, prediction_type=prediction_type)
    out = sample_ddim(_jax_model, x_T, cond, schedule=ddim_schedule(12, **cfg), prediction_type=prediction_type)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@parity
def test_ddim_learned_sigma_cfg_clip_and_eta_match_diffusers():
    x_T, cond, uncond = _noise(), _cond(1), _cond(2)
    n, key = 9, jax.random.key(3)
    keys = jax.random.split(key, n)
    noises = np.stack([np.asarray(draws.normal(k, SHAPE, jnp.float32)) for k in keys])
    ref = _diffusers_ddim_loop(
        dict(),
        n,
        x_T,
        cond,
        prediction_type="epsilon",
        learned_sigma=True,
        clip=True,
        eta=0.7,
        noises=noises,
        uncond=uncond,
        g=4.0,
    )

    def dit_like(x, t, c, s):
        p = _jax_model(x, t, c, s)
        return jnp.concatenate([p, 7.0 + 0 * p], axis=-1)

    out = sample_ddim(
        dit_like,
        x_T,
        cond,
        num_steps=n,
        learned_sigma=True,
        clip_sample=True,
        eta=0.7,
        key=key,
        uncond=uncond,
        guidance_scale=4.0,
    )
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- step_data, compile count, CFG


@parity
def test_step_data_rows_reach_the_model_in_order():
    n = 6
    x_T, cond = _noise(), _cond()
    rows = np.random.default_rng(5).standard_normal((n, *SHAPE)).astype(np.float32)
    ref = _diffusers_flow_loop(dict(num_steps=n, shift=2.0), x_T, cond, rows=rows)
    out = sample_flow_euler(_jax_model, x_T, cond, num_steps=n, shift=2.0, step_data=rows)
    np.testing.assert_allclose(out, ref[-1], atol=1e-5, rtol=1e-5)
    # reversing the rows must change the result (the rows are not interchangeable)
    rev = sample_flow_euler(_jax_model, x_T, cond, num_steps=n, shift=2.0, step_data=rows[::-1].copy())
    assert np.abs(np.asarray(rev) - ref[-1]).max() > 1e-3


def test_step_index_and_pytree_step_data():
    n = 5
    seen = []

    def model(x, t, cond, step_slice, step_index):
        jax.debug.callback(lambda i, r: seen.append((int(i), float(r))), step_index, step_slice["row"])
        return 0 * x + step_slice["scale"]

    step_data = {"row": jnp.arange(n, dtype=jnp.float32) * 10, "scale": jnp.ones((n,), jnp.float32)}
    out = sample_ddim(
        model, _noise(), None, num_steps=n, step_data=step_data, with_step_index=True, prediction_type="sample"
    )
    jax.block_until_ready(out)
    assert seen == [(i, 10.0 * i) for i in range(n)]
    np.testing.assert_allclose(out, 1.0, atol=1e-5)  # "sample" prediction of 1 ends at x0 = 1


def test_scan_compiles_once_across_step_values():
    traces = {"n": 0}

    def model(x, t, cond, step_slice):
        traces["n"] += 1
        return 0.1 * x + cond * step_slice["s"][0]

    x_T, cond, uncond = _noise(), _cond(1), _cond(2)
    outs = []
    for k, shift in enumerate([1.0, 3.0, 7.0]):
        sd = {"s": jnp.full((8, 1), 0.5 + k, jnp.float32)}
        outs.append(
            sample_flow_euler(
                model, x_T, cond, num_steps=8, shift=shift, step_data=sd, uncond=uncond, guidance_scale=2.0 + k
            )
        )
    assert traces["n"] == 1
    assert np.abs(np.asarray(outs[0]) - np.asarray(outs[2])).max() > 1e-3


def test_partial_params_are_traced_not_baked():
    traces = {"n": 0}

    def apply(params, x, t, cond, step_slice):
        traces["n"] += 1
        return params["w"] * x + cond

    x_T, cond = _noise(), _cond()
    a = sample_flow_euler(jax.tree_util.Partial(apply, {"w": jnp.float32(0.2)}), x_T, cond, num_steps=4)
    b = sample_flow_euler(jax.tree_util.Partial(apply, {"w": jnp.float32(-0.4)}), x_T, cond, num_steps=4)
    assert traces["n"] == 1
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def test_cfg_is_one_batched_call():
    shapes = []

    def model(x, t, cond, step_slice):
        shapes.append((x.shape, cond.shape))
        # uncond half gets cond=0, cond half cond=1 -> predictions 0 and 1
        return jnp.broadcast_to(cond, x.shape)

    x_T = _noise()
    ones, zeros = np.ones(SHAPE, np.float32), np.zeros(SHAPE, np.float32)
    out = sample_flow_euler(model, x_T, ones, uncond=zeros, guidance_scale=3.0, num_steps=4, return_trajectory=True)
    assert shapes == [((4, *SHAPE[1:]), (4, *SHAPE[1:]))]
    # velocity = 0 + 3 * (1 - 0) = 3 at every step; sigma goes 1 -> 0 so x0 = x_T - 3
    np.testing.assert_allclose(out[0], x_T - 3.0, atol=1e-5)


def test_cfg_combine_and_learned_sigma():
    u, c = jnp.array([1.0, 2.0]), jnp.array([3.0, -2.0])
    np.testing.assert_allclose(cfg_combine(u, c, 1.0), c)
    np.testing.assert_allclose(cfg_combine(u, c, 0.0), u)
    np.testing.assert_allclose(cfg_combine(u, c, 2.5), [6.0, -8.0])
    p = jnp.arange(2 * 4 * 6.0).reshape(2, 4, 6)
    np.testing.assert_array_equal(learned_sigma_eps(p), p[..., :3])
    np.testing.assert_array_equal(learned_sigma_eps(p, channel_axis=1), p[:, :2])
    with pytest.raises(ValueError, match="not even"):
        learned_sigma_eps(p[:, :3], channel_axis=1)


def test_sampler_rejects_bad_inputs():
    x_T, cond = _noise(), _cond()
    with pytest.raises(ValueError, match=r"\['s'\].*num_steps=4"):
        sample_flow_euler(_jax_model, x_T, cond, num_steps=4, step_data={"s": jnp.zeros((3,))})
    with pytest.raises(ValueError, match="same pytree structure"):
        sample_flow_euler(_jax_model, x_T, cond, num_steps=4, uncond={"a": cond})
    with pytest.raises(ValueError, match="needs a PRNG key"):
        sample_ddim(_jax_model, x_T, cond, num_steps=4, eta=0.5)
    with pytest.raises(ValueError, match="prediction_type"):
        sample_ddim(_jax_model, x_T, cond, num_steps=4, prediction_type="flow")


def test_bf16_latents_keep_dtype():
    x_T = jnp.asarray(_noise(), jnp.bfloat16)
    out = sample_flow_euler(_jax_model, x_T, jnp.asarray(_cond(), jnp.bfloat16), num_steps=3)
    assert out.dtype == jnp.bfloat16 and out.shape == SHAPE
