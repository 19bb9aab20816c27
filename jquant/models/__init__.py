"""Flax linen ports of diffusion transformers (Wan2.1, Flux, DiT, HunyuanVideo, CogVideoX, Mochi-1,
LTX-Video, LTX-2) that load diffusers checkpoints, and the text encoders of their pipelines
(UMT5/T5, CLIP text) with tokenizers, and their VAEs (AutoencoderKLWan, AutoencoderKL).

    model, params = models.load_pretrained("path/to/transformer", dtype=jnp.bfloat16)
    out = model.apply({"params": params}, *inputs)
"""

from jquant.models.attention import apply_rope, attention
from jquant.models.autoencoder_kl import KLVAE, AutoencoderKLConfig, load_autoencoder_kl
from jquant.models.clip_text import CLIPTextConfig, CLIPTextEncoder
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
from jquant.models.prompt import TextEncoder, encode_flux_prompt, encode_wan_prompt, load_text_encoder
from jquant.models.roles import ROLES
from jquant.models.t5 import T5Encoder, T5EncoderConfig
from jquant.models.tokenize import PromptTruncatedWarning, Tokenizer, load_tokenizer
from jquant.models.wan import WanConfig, WanTransformer3D
from jquant.models.wan_vae import WanVAE, WanVAEConfig, load_wan_vae

__all__ = [
    "KLVAE",
    "AutoencoderKLConfig",
    "WanVAE",
    "WanVAEConfig",
    "load_autoencoder_kl",
    "load_wan_vae",
    "CLIPTextConfig",
    "CLIPTextEncoder",
    "PromptTruncatedWarning",
    "T5Encoder",
    "T5EncoderConfig",
    "TextEncoder",
    "Tokenizer",
    "encode_flux_prompt",
    "encode_wan_prompt",
    "load_text_encoder",
    "load_tokenizer",
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
