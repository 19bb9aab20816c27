"""Flax port of transformers' `CLIPTextModel` (Flux's `text_encoder`, the pooled prompt vector).

The math follows transformers' `modeling_clip.py`: token + learned position embeddings,
pre-norm blocks (LayerNorm, causal self-attention scaled by 1/sqrt(head_dim), LayerNorm, MLP
fc1 -> act -> fc2; `quick_gelu` for OpenAI's CLIP), a final LayerNorm, and the pooled output:
the final hidden state at the end-of-text token. As transformers, a config with the legacy
`eos_token_id == 2` (OpenAI's CLIP-L, Flux's text_encoder) pools at the largest token id (the
end-of-text token is the highest id of the vocabulary); otherwise at the first `eos_token_id`.
FluxPipeline reads only `pooler_output` (`projection_dim` belongs to the projection head,
which `CLIPTextModel` does not have).

Every linear map is an `nn.Dense`, so jquant's interception quantizes them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jquant.models.attention import attention
from jquant.models.blocks import LayerNorm, split_heads
from jquant.models.port import KeyEntry, linear, norm

#: transformers' ACT2FN names CLIP configs use -> JAX functions.
CLIP_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
}

#: (regex over module paths, roles), as `jquant.models.roles.assign_roles` reads them.
ROLE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"layers_\d+/self_attn/(q|k|v)_proj", ("attn.qkv", "self_attn")),
    (r"layers_\d+/self_attn/out_proj", ("attn.out", "self_attn")),
    (r"layers_\d+/mlp/fc1", ("ffn.up",)),
    (r"layers_\d+/mlp/fc2", ("ffn.down",)),
)

#: The legacy end-of-text id of OpenAI CLIP configs: pool at argmax(input_ids) instead.
LEGACY_EOS_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers `CLIPTextConfig` (config.json) the text model uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        if self.hidden_act not in CLIP_ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig: hidden_act {self.hidden_act!r} not in {sorted(CLIP_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextConfig: hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def from_transformers(cls, raw: Mapping[str, Any], where: str = "config.json") -> "CLIPTextConfig":
        """Build from a `CLIPTextConfig` config.json dict, or a `CLIPConfig` one (its
        `text_config`); other keys (dropout, projection_dim, ...) are unused and ignored."""
        if raw.get("model_type") == "clip" and isinstance(raw.get("text_config"), Mapping):
            raw = raw["text_config"]
        names = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in raw]
        if missing:
            raise ValueError(f"{where}: CLIP text config lacks {missing}")
        return cls(**{k: v for k, v in raw.items() if k in names})

    def to_transformers(self) -> dict[str, Any]:
        """config.json contents transformers' CLIPTextConfig reads back to this config."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **dataclasses.asdict(self)}


class CLIPAttention(nn.Module):
    """Multi-head self-attention (q/k/v/out projections with biases) under a boolean mask."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        d, heads = self.config.hidden_size, self.config.num_attention_heads
        q, k, v = (split_heads(nn.Dense(d, dtype=self.dtype, name=f"{n}_proj")(x), heads) for n in "qkv")
        out = attention(q, k, v, mask)
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(out.reshape(x.shape))


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = CLIP_ACTIVATIONS[self.config.hidden_act](h)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        eps = self.config.layer_norm_eps
        x = x + CLIPAttention(self.config, self.dtype, name="self_attn")(
            LayerNorm(eps, affine=True, name="layer_norm1")(x), mask
        )
        return x + CLIPMLP(self.config, self.dtype, name="mlp")(LayerNorm(eps, affine=True, name="layer_norm2")(x))


class CLIPTextEncoder(nn.Module):
    """`CLIPTextModel`: input_ids [B, T] (+ attention_mask [B, T]) -> (last_hidden_state
    [B, T, hidden], pooler_output [B, hidden]). Attention is causal; `attention_mask`, if given,
    also hides padded keys (FluxPipeline passes none)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"CLIPTextEncoder: input_ids must be [batch, tokens], got shape {input_ids.shape}")
        b, t = input_ids.shape
        if t > cfg.max_position_embeddings:
            raise ValueError(
                f"CLIPTextEncoder: {t} tokens, more than max_position_embeddings={cfg.max_position_embeddings}"
            )
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, name="position_embedding")
        x = tokens + positions(jnp.arange(t))[None]
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (attention_mask > 0)[:, None, None, :]
        for i in range(cfg.num_hidden_layers):
            x = CLIPEncoderLayer(cfg, self.dtype, name=f"layers_{i}")(x, mask)
        x = LayerNorm(cfg.layer_norm_eps, affine=True, name="final_layer_norm")(x)
        ids = input_ids.astype(jnp.int32)
        eos_at = jnp.argmax(ids if cfg.eos_token_id == LEGACY_EOS_ID else (ids == cfg.eos_token_id), axis=-1)
        return x, x[jnp.arange(b), eos_at]


def key_map(config: CLIPTextConfig, prefix: str = "") -> list[KeyEntry]:
    """Flax path <-> transformers state-dict key of every tensor. `prefix` "text_model." gives
    the keys of checkpoints written before transformers 5 (which prefixed the text model)."""
    p = prefix
    out = [
        KeyEntry("token_embedding/embedding", f"{p}embeddings.token_embedding.weight"),
        KeyEntry("position_embedding/embedding", f"{p}embeddings.position_embedding.weight"),
    ]
    for i in range(config.num_hidden_layers):
        f, t = f"layers_{i}", f"{p}encoder.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += linear(f"{f}/self_attn/{n}", f"{t}.self_attn.{n}")
        out += norm(f"{f}/layer_norm1", f"{t}.layer_norm1") + norm(f"{f}/layer_norm2", f"{t}.layer_norm2")
        out += linear(f"{f}/mlp/fc1", f"{t}.mlp.fc1") + linear(f"{f}/mlp/fc2", f"{t}.mlp.fc2")
    return out + norm("final_layer_norm", f"{p}final_layer_norm")


#: The key prefix of pre-transformers-5 CLIPTextModel checkpoints (Flux's published text_encoder).
LEGACY_PREFIX = "text_model."


def dummy_inputs(config: CLIPTextConfig) -> dict[str, jax.Array]:
    """Inputs for `init`/`eval_shape`: one sequence of two tokens."""
    del config
    return {"input_ids": jnp.zeros((1, 2), jnp.int32)}
