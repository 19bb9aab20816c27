"""Flax port of transformers' `T5EncoderModel` and `UMT5EncoderModel` (one module, a flag apart).

Flux's `text_encoder_2` is a T5 v1.1 encoder, Wan2.1's `text_encoder` a UMT5 encoder. The math
follows transformers' `modeling_t5.py` / `modeling_umt5.py`:

* T5 LayerNorm: RMS norm (no mean, no bias), variance in float32, learned `scale`.
* Attention: no 1/sqrt(d) scaling; a learned relative position bias (`relative_attention_bias`,
  bidirectional buckets) added to the scores. T5 learns it in the first layer only and shares it
  with every layer; UMT5 (`per_layer_bias`) learns one table per layer.
* Feed-forward: `DenseGatedActDense` (`wi_0`, `wi_1`, `wo`; act(wi_0 x) * wi_1 x) for
  "gated-*" configs (v1.1 and UMT5: gated-gelu = `gelu_new`, the tanh GELU), `DenseActDense`
  (`wi`, `wo`) otherwise. Pre-norm residual blocks, a final norm, no dropout (inference).

Every linear map is a bias-free `nn.Dense`, so jquant's interception quantizes them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jquant.models.blocks import RMSNorm
from jquant.models.port import KeyEntry, linear, norm

#: transformers' ACT2FN names the T5 family uses -> JAX functions.
T5_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.silu,
    "swish": nn.silu,
}

#: (regex over module paths, roles), as `jquant.models.roles.assign_roles` reads them.
ROLE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"block_\d+/attn/(q|k|v)", ("attn.qkv", "self_attn")),
    (r"block_\d+/attn/o", ("attn.out", "self_attn")),
    (r"block_\d+/ff/(wi|wi_0|wi_1)", ("ffn.up",)),
    (r"block_\d+/ff/wo", ("ffn.down",)),
)


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """The fields of a transformers T5/UMT5 config.json the encoder uses.

    `model_type` "umt5" gives per-layer relative position bias; "t5" (also Flux's T5 v1.1) one
    shared table in the first layer.
    """

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    model_type: str = "umt5"

    MODEL_TYPES = ("t5", "umt5")

    def __post_init__(self) -> None:
        if self.model_type not in self.MODEL_TYPES:
            raise ValueError(f"T5EncoderConfig: model_type {self.model_type!r} is not one of {self.MODEL_TYPES}")
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or self.activation not in T5_ACTIVATIONS:
            raise ValueError(
                f"T5EncoderConfig: feed_forward_proj {self.feed_forward_proj!r} is not `ACT` or `gated-ACT` "
                f"with ACT in {sorted(T5_ACTIVATIONS)}"
            )

    @property
    def per_layer_bias(self) -> bool:
        """UMT5: every layer learns its own relative position bias table."""
        return self.model_type == "umt5"

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """transformers' `dense_act_fn`: "gated-gelu" means `gelu_new` (tanh GELU)."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_transformers(cls, raw: Mapping[str, Any], where: str = "config.json") -> "T5EncoderConfig":
        """Build from a transformers config.json dict (other keys: dropout, decoder sizes... are
        unused by the encoder and ignored). A missing size names the key and `where`."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in raw]
        if missing:
            raise ValueError(f"{where}: T5/UMT5 encoder config lacks {missing}")
        if raw.get("is_decoder"):
            raise ValueError(f"{where}: is_decoder=true; the port is the encoder (T5EncoderModel/UMT5EncoderModel)")
        kwargs = {k: v for k, v in raw.items() if k in names}
        kwargs.setdefault("model_type", "t5")
        return cls(**kwargs)

    def to_transformers(self) -> dict[str, Any]:
        """config.json contents transformers' T5Config/UMT5Config read back to this config."""
        arch = "UMT5EncoderModel" if self.per_layer_bias else "T5EncoderModel"
        return {"architectures": [arch], **dataclasses.asdict(self), "is_decoder": False}


def relative_position_buckets(length_q: int, length_k: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional relative position buckets [Tq, Tk] (int32), as transformers'
    `_relative_position_bucket` for an encoder, with its float32 arithmetic (the log bins)."""
    rel = np.arange(length_k, dtype=np.int64)[None, :] - np.arange(length_q, dtype=np.int64)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        ratio = np.log(rel.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
    ratio = ratio * np.float32(half - max_exact)
    large = max_exact + np.where(is_small, 0, ratio).astype(np.int64)  # is_small entries are unused
    large = np.minimum(large, half - 1)
    return (buckets + np.where(is_small, rel, large)).astype(np.int32)


class T5Attention(nn.Module):
    """Self-attention with additive relative position bias and no score scaling.

    With `has_bias` the layer owns `relative_attention_bias` and returns the bias it computed;
    without, it adds the `position_bias` it is given (T5's shared table) or none.
    """

    config: T5EncoderConfig
    has_bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None, position_bias: jax.Array | None
    ) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.config
        b, t, _ = x.shape
        inner = cfg.num_heads * cfg.d_kv
        if self.has_bias:
            table = nn.Embed(
                cfg.relative_attention_num_buckets, cfg.num_heads, dtype=self.dtype, name="relative_attention_bias"
            )
            buckets = relative_position_buckets(
                t, t, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
            )
            position_bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]  # [1, H, T, T]
        q, k, v = (
            nn.Dense(inner, use_bias=False, dtype=self.dtype, name=n)(x).reshape(b, t, cfg.num_heads, cfg.d_kv)
            for n in ("q", "k", "v")
        )
        bias = None if position_bias is None else position_bias.astype(q.dtype)
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=1.0)
        out = nn.Dense(cfg.d_model, use_bias=False, dtype=self.dtype, name="o")(out.reshape(b, t, inner))
        return out, position_bias


class T5FeedForward(nn.Module):
    """`DenseGatedActDense` (wi_0, wi_1, wo) or `DenseActDense` (wi, wo)."""

    config: T5EncoderConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        act = T5_ACTIVATIONS[cfg.activation]

        def dense(features: int, name: str) -> nn.Dense:
            return nn.Dense(features, use_bias=False, dtype=self.dtype, name=name)

        if cfg.gated:
            h = act(dense(cfg.d_ff, "wi_0")(x)) * dense(cfg.d_ff, "wi_1")(x)
        else:
            h = act(dense(cfg.d_ff, "wi")(x))
        return dense(cfg.d_model, "wo")(h)


class T5Block(nn.Module):
    """Pre-norm self-attention then feed-forward, each with a residual."""

    config: T5EncoderConfig
    has_bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None, position_bias: jax.Array | None
    ) -> tuple[jax.Array, jax.Array | None]:
        eps = self.config.layer_norm_epsilon
        h, position_bias = T5Attention(self.config, self.has_bias, self.dtype, name="attn")(
            RMSNorm(eps, name="attn_norm")(x), mask, position_bias
        )
        x = x + h
        x = x + T5FeedForward(self.config, self.dtype, name="ff")(RMSNorm(eps, name="ff_norm")(x))
        return x, position_bias


class T5Encoder(nn.Module):
    """`T5EncoderModel` / `UMT5EncoderModel`: input_ids [B, T] (+ attention_mask [B, T], 1 = token,
    0 = padding) -> last_hidden_state [B, T, d_model] in `dtype`."""

    config: T5EncoderConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"T5Encoder: input_ids must be [batch, tokens], got shape {input_ids.shape}")
        x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, name="shared")(input_ids)
        mask = None if attention_mask is None else (attention_mask > 0)[:, None, None, :]
        position_bias = None
        for i in range(cfg.num_layers):
            has_bias = cfg.per_layer_bias or i == 0
            x, bias = T5Block(cfg, has_bias, self.dtype, name=f"block_{i}")(
                x, mask, None if cfg.per_layer_bias else position_bias
            )
            position_bias = bias if not cfg.per_layer_bias else None
        return RMSNorm(cfg.layer_norm_epsilon, name="final_layer_norm")(x)


def key_map(config: T5EncoderConfig) -> list[KeyEntry]:
    """Flax path <-> transformers state-dict key of every tensor of the encoder."""
    out = [KeyEntry("shared/embedding", "shared.weight")]
    for i in range(config.num_layers):
        f, t = f"block_{i}", f"encoder.block.{i}"
        attn = f"{t}.layer.0.SelfAttention"
        for n in ("q", "k", "v", "o"):
            out += linear(f"{f}/attn/{n}", f"{attn}.{n}", bias=False)
        if config.per_layer_bias or i == 0:
            out.append(
                KeyEntry(f"{f}/attn/relative_attention_bias/embedding", f"{attn}.relative_attention_bias.weight")
            )
        out += norm(f"{f}/attn_norm", f"{t}.layer.0.layer_norm", bias=False)
        names = ("wi_0", "wi_1", "wo") if config.gated else ("wi", "wo")
        for n in names:
            out += linear(f"{f}/ff/{n}", f"{t}.layer.1.DenseReluDense.{n}", bias=False)
        out += norm(f"{f}/ff_norm", f"{t}.layer.1.layer_norm", bias=False)
    return out + norm("final_layer_norm", "encoder.final_layer_norm", bias=False)


#: Checkpoint keys that are aliases of mapped ones (transformers ties `encoder.embed_tokens` to `shared`).
TIED_KEYS: dict[str, str] = {"encoder.embed_tokens.weight": "shared.weight"}


def dummy_inputs(config: T5EncoderConfig) -> dict[str, jax.Array]:
    """Inputs for `init`/`eval_shape`: one sequence of two tokens."""
    del config
    return {"input_ids": jnp.zeros((1, 2), jnp.int32)}
