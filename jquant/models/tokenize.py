"""Tokenizing prompts with a checkpoint's own tokenizer files, through the `tokenizers` library.

A pipeline directory's `tokenizer/` (and `tokenizer_2/`) holds `tokenizer.json` (the fast
tokenizer transformers' `save_pretrained` writes) and `tokenizer_config.json` (pad token,
`model_max_length`, padding and truncation sides). :func:`load_tokenizer` reads both;
:meth:`Tokenizer.encode` pads every prompt to `max_length` and truncates longer ones, as the
diffusers pipelines call their tokenizers (`padding="max_length", truncation=True`), and warns
(:class:`PromptTruncatedWarning`) naming the prompt and the text that was dropped.

    tok = load_tokenizer("Wan2.1-T2V-1.3B-Diffusers/tokenizer")
    batch = tok.encode(["a red fox in the snow"], max_length=512)  # ids, mask: [1, 512] int32
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CLIP_FILES = ("vocab.json", "merges.txt")  # a CLIP BPE tokenizer saved without tokenizer.json (FLUX.1's tokenizer/)
CLIP_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
#: CLIP's pre-tokenizer split (special tokens, English contractions, letters, digits, other runs).
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_NO_LIMIT = 10**9  # transformers writes ~1e30 for "no model_max_length"


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the encoder takes; the rest was dropped."""


@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """Token ids and attention mask (1 = token, 0 = padding), both [batch, max_length] int32."""

    ids: np.ndarray
    mask: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per prompt, special tokens included (the mask's row sums)."""
        return self.mask.sum(axis=1)


def _token_content(token: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _read_json(file: Path) -> dict[str, Any]:
    try:
        raw = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: corrupt: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: corrupt: a JSON {type(raw).__name__}, not an object")
    return raw


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A checkpoint's fast tokenizer with the settings of its `tokenizer_config.json`."""

    path: Path
    backend: tokenizers.Tokenizer
    pad_token: str
    pad_id: int
    model_max_length: int | None = None
    padding_side: str = "right"
    truncation_side: str = "right"
    _by_length: dict[int, tokenizers.Tokenizer] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce (added tokens included): an encoder needs at least as many rows."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, prompts: str | Sequence[str], max_length: int | None = None) -> TokenBatch:
        """Ids and mask of `prompts`, special tokens added, padded (and truncated) to `max_length`
        (default: the tokenizer's `model_max_length`). A prompt longer than that is truncated
        with a :class:`PromptTruncatedWarning` saying how many tokens it had and what was dropped."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise TypeError(
                f"{self.path}: prompts must be strings; prompt {bad[0]} is {type(prompts[bad[0]]).__name__}"
            )
        if max_length is None:
            if self.model_max_length is None:
                raise ValueError(f"{self.path}: no model_max_length in {CONFIG_FILE}; pass max_length")
            max_length = self.model_max_length
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"{self.path}: max_length must be a positive int, got {max_length!r}")
        try:
            encodings = self._fixed_length(max_length).encode_batch(prompts, add_special_tokens=True)
        except Exception as e:  # tokenizers raises a bare Exception, e.g. max_length < special tokens
            raise ValueError(f"{self.path}: cannot encode to max_length={max_length}: {e}") from e
        for i, (prompt, enc) in enumerate(zip(prompts, encodings)):
            if len(enc.ids) != max_length:  # tokenizers never truncates into the special tokens
                raise ValueError(
                    f"{self.path}: max_length={max_length} is too short for prompt {i}: the tokenizer adds "
                    f"{sum(enc.special_tokens_mask)} special tokens to every prompt"
                )
            if enc.overflowing:
                self._warn_truncated(i, prompt, enc, max_length)
        ids = np.asarray([e.ids for e in encodings], np.int32).reshape(len(prompts), max_length)
        mask = np.asarray([e.attention_mask for e in encodings], np.int32).reshape(len(prompts), max_length)
        return TokenBatch(ids, mask)

    def _fixed_length(self, max_length: int) -> tokenizers.Tokenizer:
        """A copy of the backend that truncates and pads to `max_length` (cached per length:
        a copy of a 256k-token vocabulary is not free, and `backend` stays unconfigured)."""
        if max_length not in self._by_length:
            fixed = tokenizers.Tokenizer.from_str(self.backend.to_str())
            fixed.enable_truncation(max_length, strategy="longest_first", direction=self.truncation_side)
            fixed.enable_padding(
                direction=self.padding_side, pad_id=self.pad_id, pad_token=self.pad_token, length=max_length
            )
            self._by_length[max_length] = fixed
        return self._by_length[max_length]

    def _warn_truncated(self, index: int, prompt: str, kept: tokenizers.Encoding, max_length: int) -> None:
        full = self.backend.encode(prompt, add_special_tokens=True)
        content = [t for t, special in zip(full.ids, full.special_tokens_mask) if not special]
        n_kept = sum(1 for m, s in zip(kept.attention_mask, kept.special_tokens_mask) if m and not s)
        dropped = content[n_kept:] if self.truncation_side == "right" else content[: len(content) - n_kept]
        warnings.warn(
            f"{self.path}: prompt {index} has {len(full.ids)} tokens, more than max_length={max_length}; "
            f"truncated, dropping: {self.decode(dropped) or '(special tokens only)'!r}",
            PromptTruncatedWarning,
            stacklevel=3,
        )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; a BPE's end-of-word suffix (CLIP's `</w>`) becomes a space, as transformers does."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        suffix = getattr(self.backend.model, "end_of_word_suffix", None)
        return text.replace(suffix, " ").strip() if suffix else text


def clip_bpe(path: Path, specials: dict[str, Any]) -> tokenizers.Tokenizer:
    """CLIP's byte-level BPE from `vocab.json` + `merges.txt`, set up as transformers'
    `CLIPTokenizer` sets up its `tokenizers` backend (NFC, whitespace runs to one space,
    lowercase; CLIP's split then byte-level; `</w>` word ends; `<|startoftext|> ... <|endoftext|>`).
    `specials`: the bos/eos/unk/pad tokens of tokenizer_config.json (CLIP's defaults otherwise)."""
    bos = _token_content(specials.get("bos_token")) or "<|startoftext|>"
    eos = _token_content(specials.get("eos_token")) or "<|endoftext|>"
    unk = _token_content(specials.get("unk_token")) or "<|endoftext|>"
    pad = _token_content(specials.get("pad_token")) or "<|endoftext|>"
    try:
        vocab, merges = tokenizers.models.BPE.read_file(*(str(path / f) for f in CLIP_FILES))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"{path}: {CLIP_FILES} are not a readable BPE vocabulary ({e})") from e
    bpe = tokenizers.models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=unk)
    tok = tokenizers.Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(dict.fromkeys([unk, bos, eos, pad])))
    ids = {t: tok.token_to_id(t) for t in (bos, eos)}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"{path}: special tokens {missing} are not in vocab.json")
    tok.post_processor = processors.RobertaProcessing((eos, ids[eos]), (bos, ids[bos]), False, False)
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer in a directory (a pipeline's `tokenizer/`), from its `tokenizer.json` and
    `tokenizer_config.json` (pad token, `model_max_length`, padding/truncation sides).

    A CLIP tokenizer saved as `vocab.json` + `merges.txt` (FLUX.1's `tokenizer/`) is built from
    those (:func:`clip_bpe`). A directory with only a sentencepiece model (`spiece.model`) is
    refused: tokenizer.json is required (transformers writes it when saving a fast tokenizer).
    """
    path = Path(path)
    if path.is_file() and path.name == TOKENIZER_FILE:
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such tokenizer directory")
    file = path / TOKENIZER_FILE
    config = _read_json(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else {}
    specials = _read_json(path / SPECIAL_TOKENS_FILE) if (path / SPECIAL_TOKENS_FILE).is_file() else {}
    if file.is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ValueError(f"{file}: not a readable tokenizers file ({e})") from e
    elif config.get("tokenizer_class") in CLIP_CLASSES and all((path / f).is_file() for f in CLIP_FILES):
        backend = clip_bpe(path, {**specials, **config})
    else:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".model", ".txt", ".json"))
        raise FileNotFoundError(
            f"{path}: no {TOKENIZER_FILE} (found {others}); jquant reads fast tokenizers only (and CLIP's "
            f"vocab.json + merges.txt). Write one with transformers: AutoTokenizer.from_pretrained(dir)"
            f".save_pretrained(other_dir)"
        )
    backend.no_truncation()
    padding = backend.padding
    backend.no_padding()

    pad_token = _token_content(config.get("pad_token")) or _token_content(specials.get("pad_token"))
    if pad_token is None and padding is not None:
        pad_token = padding.get("pad_token")
    if pad_token is None:
        raise ValueError(f"{path}: no pad_token in {CONFIG_FILE}, {SPECIAL_TOKENS_FILE} or {TOKENIZER_FILE}")
    pad_id = backend.token_to_id(pad_token)
    if pad_id is None:
        raise ValueError(f"{path}: pad_token {pad_token!r} is not in the vocabulary of {TOKENIZER_FILE}")
    limit = config.get("model_max_length")
    limit = int(limit) if isinstance(limit, (int, float)) and 0 < limit < _NO_LIMIT else None
    sides = {}
    for key in ("padding_side", "truncation_side"):
        side = config.get(key, "right")
        if side not in ("left", "right"):
            raise ValueError(f"{path / CONFIG_FILE}: {key} must be 'left' or 'right', got {side!r}")
        sides[key] = side
    return Tokenizer(path, backend, pad_token, pad_id, limit, **sides)
