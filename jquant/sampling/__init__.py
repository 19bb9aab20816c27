"""Jitted diffusion samplers (one ``lax.scan`` each) and diffusers-exact schedules."""

from jquant.sampling.samplers import (
    cfg_combine,
    ddim_step,
    learned_sigma_eps,
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
    "DDIMSchedule",
    "FlowSchedule",
    "cfg_combine",
    "ddim_alphas_cumprod",
    "ddim_schedule",
    "ddim_step",
    "ddim_timesteps",
    "flow_match_schedule",
    "flux_mu",
    "learned_sigma_eps",
    "sample_ddim",
    "sample_flow_euler",
]
