"""Jitted diffusion samplers (one ``lax.scan`` each) and diffusers-exact schedules."""

from jquant.sampling.cogvideox import (
    COGVIDEOX_2B_SCHEDULER,
    COGVIDEOX_5B_SCHEDULER,
    CogVideoXDPMSchedule,
    cogvideox_alphas_cumprod,
    cogvideox_ddim_schedule,
    cogvideox_dpm_schedule,
    sample_cogvideox_dpm,
)
from jquant.sampling.samplers import (
    cfg_combine,
    ddim_step,
    learned_sigma_eps,
    predicted_x0_eps,
    sample_ddim,
    sample_flow_euler,
)
from jquant.sampling.schedules import (
    DDIMSchedule,
    FlowSchedule,
    ddim_alphas_cumprod,
    ddim_schedule,
    ddim_timesteps,
    flow_match_schedule,
    flux_mu,
)

__all__ = [
    "COGVIDEOX_2B_SCHEDULER",
    "COGVIDEOX_5B_SCHEDULER",
    "CogVideoXDPMSchedule",
    "DDIMSchedule",
    "FlowSchedule",
    "cfg_combine",
    "cogvideox_alphas_cumprod",
    "cogvideox_ddim_schedule",
    "cogvideox_dpm_schedule",
    "ddim_alphas_cumprod",
    "ddim_schedule",
    "ddim_step",
    "ddim_timesteps",
    "flow_match_schedule",
    "flux_mu",
    "learned_sigma_eps",
    "predicted_x0_eps",
    "sample_cogvideox_dpm",
    "sample_ddim",
    "sample_flow_euler",
]
