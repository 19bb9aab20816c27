"""The second bundled model's folder: a Wan transformer, a small UMT5 text encoder and a WordLevel
tokenizer over the caption template of `jquant.models.shapes_data`; written by
`scripts/train_outlier_model.py`, read by :func:`load_shapes_model`.

Layout (the pipeline-directory components, so the generic loaders read each one)::

    shapes_model.json           data settings, text length, training command/seed/commit, summary
    transformer/                config.json + diffusion_pytorch_model.safetensors (bf16; `load_pretrained`)
    text_encoder/               config.json + model.safetensors (transformers UMT5 layout, bf16; `load_text_encoder`)
    tokenizer/                  tokenizer.json + tokenizer_config.json (`load_tokenizer`)
    training_log.jsonl          one JSON line per report: step, loss, outlier statistics

Text conditioning follows `WanPipeline`: captions tokenized to `text_len` tokens with a mask, the
encoder's states past each caption's length set to zero; the unconditional (CFG) branch is the
empty caption.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import traverse_util
from safetensors.numpy import save_file
from tokenizers import normalizers, pre_tokenizers, processors

from jquant.files import atomic_file
from jquant.models import shapes_data as sd
from jquant.models import t5
from jquant.models.loading import load_pretrained
from jquant.models.prompt import WEIGHTS_NAME, TextEncoder, check_tokenizer, load_text_encoder
from jquant.models.tokenize import CONFIG_FILE, TOKENIZER_FILE, Tokenizer, load_tokenizer
from jquant.models.wan import WanConfig

META_NAME = "shapes_model.json"
LOG_NAME = "training_log.jsonl"
TRANSFORMER_DIR, TEXT_ENCODER_DIR, TOKENIZER_DIR = "transformer", "text_encoder", "tokenizer"


def build_tokenizer() -> tokenizers.Tokenizer:
    """WordLevel over :func:`shapes_data.vocabulary` (lower-cased, split on whitespace, unknown
    words -> <unk>), eos appended to every caption as UMT5's tokenizer does."""
    vocab = sd.vocabulary()
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=sd.UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"$A {sd.EOS}", special_tokens=[(sd.EOS, vocab[sd.EOS])])
    tok.add_special_tokens(list(sd.SPECIAL_TOKENS))
    return tok


def save_tokenizer(path: str | os.PathLike, text_len: int) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` (pad/eos/unk, `model_max_length` = text_len)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_file(path / TOKENIZER_FILE) as tmp:
        tmp.write_text(build_tokenizer().to_str(pretty=True))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": sd.PAD,
        "eos_token": sd.EOS,
        "unk_token": sd.UNK,
        "model_max_length": text_len,
        "padding_side": "right",
        "truncation_side": "right",
    }
    with atomic_file(path / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")


def save_text_encoder(path: str | os.PathLike, config: t5.T5EncoderConfig, params: Any) -> None:
    """Write a transformers-layout encoder folder (config.json + model.safetensors; tensors keep
    their dtypes) that `jquant.models.prompt.load_text_encoder` reads back."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(params, sep="/")
    entries = t5.key_map(config)
    missing = sorted({e.flax_path for e in entries} - set(flat))
    if missing:
        raise ValueError(f"save_text_encoder({path}): params lack {missing} for {config}")
    tensors = {e.torch_key: np.ascontiguousarray(e.to_torch(np.asarray(flat[e.flax_path]))) for e in entries}
    with atomic_file(path / WEIGHTS_NAME) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with atomic_file(path / "config.json") as tmp:
        tmp.write_text(json.dumps(config.to_transformers(), indent=2) + "\n")


def encode_text(encoder: nn.Module, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """The encoder's states [B, L, D] of token ids/mask [B, L], zero past each caption's length
    (`WanPipeline`'s prompt embeddings)."""
    states = encoder.apply({"params": params}, ids, mask)
    return jnp.where(mask[..., None] > 0, states, jnp.zeros((), states.dtype))


@dataclasses.dataclass(frozen=True)
class ShapesModel:
    """What :func:`load_shapes_model` returns."""

    model: nn.Module
    params: dict[str, Any]
    config: WanConfig
    text_encoder: TextEncoder
    tokenizer: Tokenizer
    data: sd.DataConfig
    text_len: int
    meta: dict[str, Any]

    def text(self, captions: str | Sequence[str]) -> jax.Array:
        """Conditioning [B, text_len, d_model] of captions (any text; unknown words are <unk>)."""
        batch = self.tokenizer.encode(captions, max_length=self.text_len)
        ids, mask = jnp.asarray(batch.ids), jnp.asarray(batch.mask)
        te = self.text_encoder
        return encode_text(te.module, te.params, ids, mask)

    def null_text(self, batch: int) -> jax.Array:
        """The unconditional (CFG) conditioning: the empty caption, repeated."""
        return self.text([""] * batch)

    def latent_shape(self, batch: int) -> tuple[int, int, int, int, int]:
        return (batch, self.config.in_channels, self.data.frames, self.data.size, self.data.size)


def load_shapes_model(path: str | os.PathLike, dtype: Any = jnp.float32) -> ShapesModel:
    """Load a folder written by `scripts/train_outlier_model.py` (transformer and text encoder
    with params in `dtype`)."""
    path = Path(path)
    meta_file = path / META_NAME
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{meta_file} not found: {path} is not a shapes model folder (run scripts/train_outlier_model.py)"
        )
    meta = json.loads(meta_file.read_text())
    for key in ("data", "text_len"):
        if key not in meta:
            raise ValueError(f"{meta_file}: lacks {key!r}")
    model, params = load_pretrained(path / TRANSFORMER_DIR, dtype=dtype)
    encoder = load_text_encoder(path / TEXT_ENCODER_DIR, dtype=dtype)
    tokenizer = load_tokenizer(path / TOKENIZER_DIR)
    check_tokenizer(tokenizer, encoder)
    return ShapesModel(
        model=model,
        params=params,
        config=model.config,
        text_encoder=encoder,
        tokenizer=tokenizer,
        data=sd.DataConfig(**meta["data"]),
        text_len=int(meta["text_len"]),
        meta=meta,
    )
