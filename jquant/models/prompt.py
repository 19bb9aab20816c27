"""Text encoders from a pipeline directory, and prompt encoding as the diffusers pipelines do it.

:func:`load_text_encoder` reads a transformers component folder (`text_encoder/`,
`text_encoder_2/`: config.json + `model.safetensors` or shards with
`model.safetensors.index.json`) into a :class:`TextEncoder` (the T5/UMT5 port of
`jquant.models.t5` or the CLIP text port of `jquant.models.clip_text`). Every tensor goes
through the port's explicit key map; missing, unexpected or misshapen tensors fail with one
error naming the folder and the keys.

The encoding functions reproduce diffusers exactly:

* :func:`encode_wan_prompt`: `WanPipeline.encode_prompt` (UMT5, `max_sequence_length` 512 in
  `WanPipeline.__call__`): prompts cleaned (`prompt_clean`), tokens padded with a mask, the
  encoder run with the mask, each prompt's states kept to its length and zero-padded back.
* :func:`encode_flux_prompt`: `FluxPipeline.encode_prompt`: CLIP's pooled output (77 tokens, no
  mask) and T5's sequence (512 tokens, no mask), plus the all-zero `text_ids`.

    te = load_text_encoder("Wan2.1-T2V-1.3B-Diffusers/text_encoder", dtype=jnp.bfloat16)
    tok = load_tokenizer("Wan2.1-T2V-1.3B-Diffusers/tokenizer")
    cond, uncond = encode_wan_prompt(te, tok, "a red fox in the snow", negative_prompt="blurry")
"""

from __future__ import annotations

import dataclasses
import functools
import html
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jquant.models import clip_text, t5
from jquant.models.loading import CheckpointError, check_keys, read_config_json, read_tensors
from jquant.models.port import KeyEntry
from jquant.models.roles import assign_roles
from jquant.models.safetensors import SafetensorsError, weight_files
from jquant.models.tokenize import Tokenizer

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
#: transformers `architectures` name -> the port's module family.
ARCHITECTURES: dict[str, str] = {
    "UMT5EncoderModel": "t5",
    "T5EncoderModel": "t5",
    "CLIPTextModel": "clip",
}
WAN_MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default
FLUX_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default for T5
CLIP_MAX_LENGTH = 77  # FluxPipeline's fallback when the CLIP tokenizer gives no model_max_length

EncoderConfig = t5.T5EncoderConfig | clip_text.CLIPTextConfig


#: How a TextEncoder runs its module: `runner(module, variables, input_ids, attention_mask)`.
Runner = Callable[..., Any]


def _linen_apply(module: nn.Module, variables: Any, *args: Any) -> Any:
    return module.apply(variables, *args)


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """A loaded text encoder: Flax module, params and config; `path` is the folder it came from.

    Calling it runs the jitted module: T5/UMT5 return last_hidden_state [B, T, D]; CLIP returns
    (last_hidden_state, pooler_output). `runner` runs the module (default: `module.apply`); for
    quantized params pass `jquant.nn.apply`, e.g. `dataclasses.replace(te, params=q8, runner=jquant.nn.apply)`.
    """

    module: nn.Module
    params: dict[str, Any]
    config: EncoderConfig
    path: Path | None = None
    runner: Runner = _linen_apply

    @functools.cached_property
    def _apply(self) -> Callable[..., Any]:
        return jax.jit(lambda params, ids, mask: self.runner(self.module, {"params": params}, ids, mask))

    def __call__(self, input_ids: Any, attention_mask: Any = None) -> Any:
        return self._apply(self.params, jnp.asarray(input_ids, jnp.int32), attention_mask)

    def call_bytes(self, batch: int, length: int, mask: bool = True) -> dict[str, int]:
        """XLA's memory analysis of one call on `batch` x `length` token ids (with an attention
        mask or without, as the caller passes it): bytes of arguments (weights + ids), outputs and
        temporaries. Compiles, runs nothing."""
        ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
        mem = self._apply.lower(self.params, ids, ids if mask else None).compile().memory_analysis()
        return {
            "arguments": int(mem.argument_size_in_bytes),
            "outputs": int(mem.output_size_in_bytes),
            "temporaries": int(mem.temp_size_in_bytes),
        }

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def layer_roles(self) -> dict[str, tuple[str, ...]]:
        """Role labels of every Dense kernel (for policies: text encoders at int8 weight-only at most)."""
        rules = t5.ROLE_RULES if isinstance(self.config, t5.T5EncoderConfig) else clip_text.ROLE_RULES
        return assign_roles(self.params, rules)


def encoder_config(raw: dict[str, Any], where: str = "config.json") -> EncoderConfig:
    """The port config of a transformers config.json dict, picked by its `architectures`
    (else `model_type`); an encoder the ports do not cover is named in the error."""
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    kind = ARCHITECTURES.get(arch) if arch else None
    if kind is None and not archs:
        kind = {"t5": "t5", "umt5": "t5", "clip_text_model": "clip", "clip": "clip"}.get(raw.get("model_type"))
    if kind is None:
        raise ValueError(
            f"{where}: architectures {archs} / model_type {raw.get('model_type')!r} is not a text encoder "
            f"jquant ports; known: {sorted(ARCHITECTURES)}"
        )
    if kind == "t5":
        if arch == "UMT5EncoderModel" and "model_type" not in raw:
            raw = {**raw, "model_type": "umt5"}
        return t5.T5EncoderConfig.from_transformers(raw, where)
    return clip_text.CLIPTextConfig.from_transformers(raw, where)


def encoder_module(config: EncoderConfig, dtype: Any = jnp.float32) -> nn.Module:
    if isinstance(config, t5.T5EncoderConfig):
        return t5.T5Encoder(config, dtype)
    return clip_text.CLIPTextEncoder(config, dtype)


def _key_map(config: EncoderConfig, keys: set[str]) -> tuple[list[KeyEntry], tuple[str, ...]]:
    """The entries a checkpoint with `keys` is read through, and the keys it may hold beyond
    them (tied aliases). Legacy CLIP checkpoints prefix `text_model.`; T5 checkpoints may hold
    the embedding as `encoder.embed_tokens.weight` instead of (or beside) `shared.weight`."""
    if isinstance(config, clip_text.CLIPTextConfig):
        legacy = any(k.startswith(clip_text.LEGACY_PREFIX) for k in keys)
        return clip_text.key_map(config, clip_text.LEGACY_PREFIX if legacy else ""), ()
    entries = t5.key_map(config)
    for alias, key in t5.TIED_KEYS.items():
        if key not in keys and alias in keys:
            entries = [dataclasses.replace(e, torch_key=alias) if e.torch_key == key else e for e in entries]
    return entries, tuple(re.escape(k) for k in t5.TIED_KEYS)


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor -> file: transformers' index if present, else `model.safetensors`, else every
    safetensors file in the folder; errors name the folder (a `.bin`-only folder is refused)."""
    for name in (INDEX_NAME, WEIGHTS_NAME):
        if (path / name).is_file():
            target = path / name
            break
    else:
        if not any(path.glob("*.safetensors")):
            found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
            raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME} (found {found}); safetensors needed")
        target = path
    try:
        return weight_files(target)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from e


def load_text_encoder(path: str | Path, dtype: Any = jnp.float32) -> TextEncoder:
    """Load a transformers text-encoder folder (UMT5/T5 encoder or CLIP text model) with params
    in `dtype` (the module computes in `dtype`, norms and softmax in float32)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such text encoder folder")
    config = encoder_config(read_config_json(path / "config.json"), str(path / "config.json"))
    module = encoder_module(config, dtype)
    files = _weight_files(path)
    entries, aliases = _key_map(config, set(files))
    check_keys({e.torch_key for e in entries}, set(files), aliases, f"checkpoint {path}")
    dummy = t5.dummy_inputs(config) if isinstance(config, t5.T5EncoderConfig) else clip_text.dummy_inputs(config)
    shapes = jax.eval_shape(lambda r: module.init(r, **dummy)["params"], jax.random.key(0))
    shapes = traverse_util.flatten_dict(shapes, sep="/")
    if {e.flax_path for e in entries} != set(shapes):
        raise AssertionError(
            f"{type(module).__name__} key map out of sync: {sorted({e.flax_path for e in entries} ^ set(shapes))}"
        )

    flat = read_tensors(path, files, entries, {k: v.shape for k, v in shapes.items()}, dtype)
    return TextEncoder(module, traverse_util.unflatten_dict(flat, sep="/"), config, path)


def check_tokenizer(tokenizer: Tokenizer, encoder: TextEncoder) -> None:
    """Refuse a tokenizer whose ids can exceed the encoder's embedding rows (JAX would clip
    them silently): the tokenizer folder and the encoder folder are mismatched."""
    if tokenizer.vocab_size > encoder.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but text encoder {encoder.path} embeds "
            f"only {encoder.vocab_size} (vocab_size): the tokenizer does not belong to this encoder"
        )


def prompt_clean(text: str) -> str:
    """diffusers' Wan `prompt_clean`: ftfy's fix_text where ftfy is installed, HTML entities
    unescaped twice, whitespace runs collapsed and the ends stripped."""
    try:
        import ftfy  # optional, as in diffusers
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _as_list(prompt: str | Sequence[str]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


def wan_prompt_embeds(
    encoder: TextEncoder,
    tokenizer: Tokenizer,
    prompt: str | Sequence[str],
    max_sequence_length: int = WAN_MAX_SEQUENCE_LENGTH,
    num_per_prompt: int = 1,
) -> jax.Array:
    """`WanPipeline._get_t5_prompt_embeds`: [B * num_per_prompt, max_sequence_length, d_model],
    each prompt's states past its token count set to zero."""
    check_tokenizer(tokenizer, encoder)
    batch = tokenizer.encode([prompt_clean(p) for p in _as_list(prompt)], max_sequence_length)
    states = encoder(batch.ids, jnp.asarray(batch.mask))
    keep = jnp.arange(max_sequence_length)[None, :] < jnp.asarray(batch.lengths)[:, None]
    states = jnp.where(keep[..., None], states, jnp.zeros((), states.dtype))
    return jnp.repeat(states, num_per_prompt, axis=0)


def encode_wan_prompt(
    encoder: TextEncoder,
    tokenizer: Tokenizer,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = None,
    guidance: bool = True,
    max_sequence_length: int = WAN_MAX_SEQUENCE_LENGTH,
    num_per_prompt: int = 1,
) -> tuple[jax.Array, jax.Array | None]:
    """`WanPipeline.encode_prompt`: (prompt_embeds, negative_prompt_embeds); the negative is
    `""` per prompt when not given, and None without classifier-free `guidance`."""
    prompts = _as_list(prompt)
    cond = wan_prompt_embeds(encoder, tokenizer, prompts, max_sequence_length, num_per_prompt)
    if not guidance:
        return cond, None
    negative = (
        len(prompts) * [negative_prompt or ""]
        if isinstance(negative_prompt, (str, type(None)))
        else list(negative_prompt)
    )
    if len(negative) != len(prompts):
        raise ValueError(f"negative_prompt has {len(negative)} entries, prompt has {len(prompts)}")
    return cond, wan_prompt_embeds(encoder, tokenizer, negative, max_sequence_length, num_per_prompt)


def encode_flux_prompt(
    clip: TextEncoder,
    clip_tokenizer: Tokenizer,
    t5_encoder: TextEncoder,
    t5_tokenizer: Tokenizer,
    prompt: str | Sequence[str],
    prompt_2: str | Sequence[str] | None = None,
    max_sequence_length: int = FLUX_MAX_SEQUENCE_LENGTH,
    num_per_prompt: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`FluxPipeline.encode_prompt`: (prompt_embeds [B, max_sequence_length, d_model] from T5 on
    `prompt_2` (default `prompt`), pooled_prompt_embeds [B, hidden] from CLIP on `prompt`,
    text_ids [max_sequence_length, 3] zeros). Neither encoder is given the attention mask."""
    prompts = _as_list(prompt)
    prompts_2 = _as_list(prompt_2) if prompt_2 else prompts
    check_tokenizer(clip_tokenizer, clip)
    check_tokenizer(t5_tokenizer, t5_encoder)
    clip_ids = clip_tokenizer.encode(prompts, clip_tokenizer.model_max_length or CLIP_MAX_LENGTH).ids
    _, pooled = clip(clip_ids)
    states = t5_encoder(t5_tokenizer.encode(prompts_2, max_sequence_length).ids)
    text_ids = jnp.zeros((states.shape[1], 3), clip.module.dtype)
    return jnp.repeat(states, num_per_prompt, axis=0), jnp.repeat(pooled, num_per_prompt, axis=0), text_ids
