"""jquant.models.tokenize vs transformers' fast tokenizer on tiny tokenizers built here.

Each tokenizer is trained with the `tokenizers` library on a few sentences, saved with
transformers' `PreTrainedTokenizerFast.save_pretrained`, and read back both ways: ids and masks
must be equal for the settings the diffusers pipelines use (padding to max_length, truncation).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from jquant.models.tokenize import CLIP_SPLIT, PromptTruncatedWarning, load_tokenizer

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "a red fox runs through the snow at dawn",
    "a cat sleeps on a warm windowsill in the afternoon sun",
    "waves crash against the rocks under a grey sky",
    "a small boat drifts across a calm lake at night",
    "the city lights flicker in the rain",
]
WORDS = sorted({w for s in SENTENCES for w in s.split()}) + ["zebra", "quantum"]  # two unknown words


def build_tokenizer(path: Path, kind: str = "t5", padding_side: str = "right", model_max_length: int = 16) -> Path:
    """Train a tiny tokenizer on SENTENCES and save it with transformers to `path`.

    kind "t5": WordLevel, `</s>` appended, `<pad>` id 0 (T5/UMT5's layout); "unigram": a
    Unigram model (sentencepiece's algorithm) with Metaspace, as T5's real tokenizer; "clip":
    WordLevel with `<|startoftext|>`/`<|endoftext|>` around each prompt, the end token padding
    (as CLIP's), the end-of-text token the highest id.
    """
    if kind == "clip":
        specials = ["<|unk|>", "<|startoftext|>"]
        tok = Tokenizer(models.WordLevel(unk_token="<|unk|>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
        tok.add_special_tokens(["<|endoftext|>"])
        bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>",
            special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)],
        )
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        special["unk_token"] = "<|unk|>"
    else:
        specials = ["<pad>", "</s>", "<unk>"]
        if kind == "unigram":
            tok = Tokenizer(models.Unigram())
            tok.pre_tokenizer = pre_tokenizers.Metaspace()
            trainer = trainers.UnigramTrainer(vocab_size=60, special_tokens=specials, unk_token="<unk>")
        else:
            tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
            tok.pre_tokenizer = pre_tokenizers.Whitespace()
            trainer = trainers.WordLevelTrainer(special_tokens=specials)
        tok.train_from_iterator(SENTENCES, trainer)
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, padding_side=padding_side, **special
    )
    fast.save_pretrained(path)
    return path


def build_clip_bpe(path: Path, model_max_length: int = 20) -> Path:
    """A tiny CLIP tokenizer as FLUX.1's `tokenizer/` ships it: vocab.json + merges.txt +
    tokenizer_config.json (class CLIPTokenizer), no tokenizer.json; BPE trained on SENTENCES."""
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    split = pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    tok.train_from_iterator(SENTENCES + ["it's 42 degrees, isn't it?"], trainer)
    path.mkdir(parents=True)
    tok.model.save(str(path))
    vocab = {**json.loads((path / "vocab.json").read_text())}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})  # the end token is the highest id
    (path / "vocab.json").write_text(json.dumps(vocab))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "pad_token": "<|endoftext|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def reference(path: Path, prompts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """What the diffusers pipelines get from transformers' tokenizer for these settings."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    out = tok(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return out["input_ids"], out["attention_mask"]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    cases = {"t5": ("t5", "right"), "unigram": ("unigram", "right"), "clip": ("clip", "right"), "left": ("t5", "left")}
    return {name: build_tokenizer(root / name, kind, side) for name, (kind, side) in cases.items()}


@pytest.mark.parametrize("name", ["t5", "unigram", "clip", "left"])
def test_ids_and_mask_match_transformers(tokenizer_dirs: dict[str, Path], name: str) -> None:
    path = tokenizer_dirs[name]
    prompts = [SENTENCES[0], "", "a zebra on the quantum lake", SENTENCES[1] + " " + SENTENCES[2]]
    tok = load_tokenizer(path)
    assert tok.model_max_length == 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        for max_length in (6, 16, 40):
            batch = tok.encode(prompts, max_length)
            ids, mask = reference(path, prompts, max_length)
            assert batch.ids.shape == batch.mask.shape == (len(prompts), max_length)
            np.testing.assert_array_equal(batch.ids, ids)
            np.testing.assert_array_equal(batch.mask, mask)
    if name == "left":
        assert tok.encode("", 4).mask.tolist() == [[0, 0, 0, 1]]


@settings(max_examples=25)
@given(
    words=st.lists(st.lists(st.sampled_from(WORDS), max_size=14), min_size=1, max_size=3), max_length=st.integers(2, 12)
)
def test_property_matches_transformers(
    tokenizer_dirs: dict[str, Path], words: list[list[str]], max_length: int
) -> None:
    prompts = [" ".join(w) for w in words]
    for name in ("t5", "clip"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncatedWarning)
            batch = load_tokenizer(tokenizer_dirs[name]).encode(prompts, max_length)
        ids, mask = reference(tokenizer_dirs[name], prompts, max_length)
        np.testing.assert_array_equal(batch.ids, ids)
        np.testing.assert_array_equal(batch.mask, mask)


def test_truncation_warns_with_dropped_text(tokenizer_dirs: dict[str, Path]) -> None:
    tok = load_tokenizer(tokenizer_dirs["t5"])
    with pytest.warns(
        PromptTruncatedWarning,
        match=r"prompt 1 has 10 tokens, more than max_length=6; truncated, dropping: 'the snow at dawn'",
    ) as rec:
        batch = tok.encode(["a cat", SENTENCES[0]], 6)  # 9 words + </s>; 5 words + </s> are kept
    assert len(rec) == 1
    assert tok.decode(batch.ids[1]) == "a red fox runs through"
    assert batch.ids[1, -1] == tok.backend.token_to_id("</s>")  # the end token survives truncation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tok.encode(SENTENCES[0], 10).lengths.tolist() == [10]  # exactly fits: no warning


def test_clip_vocab_and_merges_match_transformers(tmp_path: Path) -> None:
    path = build_clip_bpe(tmp_path / "tokenizer")
    assert not (path / "tokenizer.json").exists()
    prompts = ["A  Red FOX,\trunning!", "it's 42 degrees", "café ünïcode 😀 <|endoftext|>", "", SENTENCES[1] * 3]
    tok = load_tokenizer(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        for max_length in (5, 20):
            batch = tok.encode(prompts, max_length)
            ids, mask = reference(path, prompts, max_length)
            np.testing.assert_array_equal(batch.ids, ids)
            np.testing.assert_array_equal(batch.mask, mask)
    assert tok.decode(tok.encode("A red fox", 20).ids[0]) == "a red fox"
    # the same tokenizer saved by transformers (with tokenizer.json) reads the same
    transformers.AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path / "fast")
    assert (tmp_path / "fast" / "tokenizer.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        np.testing.assert_array_equal(load_tokenizer(tmp_path / "fast").encode(prompts, 20).ids, batch.ids)


def test_model_max_length_is_the_default(tokenizer_dirs: dict[str, Path]) -> None:
    tok = load_tokenizer(tokenizer_dirs["clip"])
    assert tok.encode("a cat").ids.shape == (1, 16)
    assert tok.pad_token == "<|endoftext|>"


def test_sentencepiece_only_is_refused(tmp_path: Path) -> None:
    (tmp_path / "spiece.model").write_bytes(b"\x00")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(
        FileNotFoundError, match=r"no tokenizer.json \(found \['spiece.model', 'tokenizer_config.json'\]\)"
    ):
        load_tokenizer(tmp_path)


def test_bad_inputs_are_named(tokenizer_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such tokenizer directory"):
        load_tokenizer(tmp_path / "missing")
    tok = load_tokenizer(tokenizer_dirs["t5"])
    with pytest.raises(TypeError, match="prompt 1 is int"):
        tok.encode(["a", 3], 8)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        tok.encode("a", 0)
    with pytest.raises(ValueError, match="max_length=1 is too short for prompt 0: the tokenizer adds 2 special tokens"):
        load_tokenizer(tokenizer_dirs["clip"]).encode("a red fox", 1)  # <|startoftext|> ... <|endoftext|>
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizers file"):
        load_tokenizer(bad)
    nopad = tmp_path / "nopad"
    nopad.mkdir()
    (nopad / "tokenizer.json").write_text((tokenizer_dirs["t5"] / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match="no pad_token"):
        load_tokenizer(nopad)
