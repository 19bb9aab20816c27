"""Flax linen ports of diffusion transformers (Wan2.1, Flux, DiT, HunyuanVideo, CogVideoX, Mochi-1,
LTX-Video, LTX-2) that load diffusers checkpoints.

    model, params = models.load_pretrained("path/to/transformer", dtype=jnp.bfloat16)
    out = model.apply({"params": params}, *inputs)
"""

from jquant.models.attention import apply_rope, attention
from jquant.models.cogvideox import CogVideoXConfig, CogVideoXTransformer3D
from jquant.models.dit import DiTConfig, DiTTransformer2D
from jquant.models.flux import FluxConfig, FluxTransformer2D
from jquant.models.hunyuan_video import HunyuanVideoConfig, HunyuanVideoTransformer3D
from jquant.models.loading import (
    PORTS,
    CheckpointError,
    CheckpointMismatchError,
    init_params,
    layer_roles,
    load_pretrained,
    param_shapes,
    port_for_class,
    port_for_config,
    read_config,
    save_pretrained,
)
from jquant.models.ltx2 import LTX2Config, LTX2VideoTransformer3D
from jquant.models.ltx_video import LTXVideoConfig, LTXVideoTransformer3D
from jquant.models.mochi import MochiConfig, MochiTransformer3D
from jquant.models.port import param_count
from jquant.models.roles import ROLES
from jquant.models.wan import WanConfig, WanTransformer3D

__all__ = [
    "PORTS",
    "ROLES",
    "CheckpointError",
    "CheckpointMismatchError",
    "CogVideoXConfig",
    "CogVideoXTransformer3D",
    "DiTConfig",
    "DiTTransformer2D",
    "FluxConfig",
    "FluxTransformer2D",
    "HunyuanVideoConfig",
    "HunyuanVideoTransformer3D",
    "LTX2Config",
    "LTX2VideoTransformer3D",
    "LTXVideoConfig",
    "LTXVideoTransformer3D",
    "MochiConfig",
    "MochiTransformer3D",
    "WanConfig",
    "WanTransformer3D",
    "apply_rope",
    "attention",
    "init_params",
    "layer_roles",
    "load_pretrained",
    "param_count",
    "param_shapes",
    "port_for_class",
    "port_for_config",
    "read_config",
    "save_pretrained",
]
