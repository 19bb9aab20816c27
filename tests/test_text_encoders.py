"""Text encoder ports (jquant.models.t5, clip_text) and prompt encoding (jquant.models.prompt)
vs transformers and diffusers on tiny random models (CPU, fp32): same checkpoint, same tokens."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file
from test_tokenize import SENTENCES, build_tokenizer

from jquant.models import CheckpointError, CheckpointMismatchError
from jquant.models.clip_text import CLIPTextConfig
from jquant.models.prompt import (
    check_tokenizer,
    encode_flux_prompt,
    encode_wan_prompt,
    load_text_encoder,
    prompt_clean,
)
from jquant.models.t5 import T5EncoderConfig, relative_position_buckets
from jquant.models.tokenize import PromptTruncatedWarning, load_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5  # relative L2 error, fp32


def rel_err(out: Any, ref: Any) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def perturbed(model: Any, seed: int = 0) -> Any:
    """`model` with every param (norm scales, biases, position tables too) moved off its init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


T5_CASES = {
    # Wan's text_encoder layout: UMT5, gated-gelu, a bias table per layer; short max_distance so
    # 30 tokens reach the log-spaced buckets.
    "umt5-gated-gelu": ("umt5", dict(feed_forward_proj="gated-gelu", relative_attention_max_distance=12)),
    "umt5-relu": ("umt5", dict(feed_forward_proj="relu", num_layers=2, d_kv=4)),
    # Flux's text_encoder_2 layout: T5 v1.1 (gated-gelu, one shared bias table), saved sharded.
    "t5-gated-gelu": ("t5", dict(feed_forward_proj="gated-gelu", relative_attention_num_buckets=16)),
    "t5-relu": ("t5", dict(feed_forward_proj="relu", num_heads=2, d_kv=16)),
}


def save_t5(path: Path, model_type: str, overrides: dict[str, Any], seed: int = 0) -> Any:
    kw = dict(vocab_size=60, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, relative_attention_num_buckets=8)
    kw.update(overrides)
    if model_type == "umt5":
        model = transformers.UMT5EncoderModel(transformers.UMT5Config(**kw))
    else:
        model = transformers.T5EncoderModel(transformers.T5Config(**kw))
    model = perturbed(model, seed)
    model.save_pretrained(path, max_shard_size="20KB" if model_type == "t5" else "1GB")
    return model


def save_clip(path: Path, eos_token_id: int, act: str, layers: int = 2, prefix: str = "") -> Any:
    config = transformers.CLIPTextConfig(
        vocab_size=60,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=24,
        hidden_act=act,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=eos_token_id,
    )
    model = perturbed(transformers.CLIPTextModel(config))
    model.save_pretrained(path)
    if prefix:  # the layout of checkpoints written before transformers 5 (Flux's text_encoder)
        file = path / "model.safetensors"
        save_file({prefix + k: v for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
    return model


def tokens(vocab: int = 60, batch: int = 3, length: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids and a right-padded mask (row 1 has 17 tokens, row 2 one)."""
    ids = np.random.default_rng(seed).integers(3, vocab, (batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    mask[1, 17:] = 0
    mask[2, 1:] = 0
    return ids, mask


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 12), (16, 20), (6, 7)])
def test_relative_position_buckets_match_transformers(num_buckets: int, max_distance: int) -> None:
    n = 600  # past Wan's 512 tokens: every relative position the encoders meet
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance
    )
    np.testing.assert_array_equal(relative_position_buckets(n, n, num_buckets, max_distance), ref.numpy())


@pytest.mark.parametrize("case", sorted(T5_CASES))
def test_t5_encoders_match_transformers(tmp_path: Path, case: str) -> None:
    model_type, overrides = T5_CASES[case]
    model = save_t5(tmp_path, model_type, overrides)
    if model_type == "t5":
        assert (tmp_path / "model.safetensors.index.json").is_file()  # sharded
    encoder = load_text_encoder(tmp_path)
    assert encoder.config.per_layer_bias == (model_type == "umt5")
    ids, mask = tokens()
    for m in (mask, None):  # Wan passes the mask, Flux does not
        with torch.no_grad():
            ref = model(torch.from_numpy(ids), None if m is None else torch.from_numpy(m)).last_hidden_state.numpy()
        out = encoder(ids, None if m is None else jnp.asarray(m))
        assert rel_err(out, ref) < TOL, case
        np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)


@pytest.mark.parametrize("eos, act, prefix", [(2, "quick_gelu", "text_model."), (7, "gelu", "")])
def test_clip_text_matches_transformers(tmp_path: Path, eos: int, act: str, prefix: str) -> None:
    model = save_clip(tmp_path, eos, act, prefix=prefix)
    encoder = load_text_encoder(tmp_path)
    ids, mask = tokens(length=20)
    ids[:, 12] = 7  # an end-of-text token in every row (first at 12 unless placed earlier)
    ids[0, 5] = 7
    for m in (None, mask):  # Flux passes no mask
        with torch.no_grad():
            ref = model(torch.from_numpy(ids), None if m is None else torch.from_numpy(m))
        hidden, pooled = encoder(ids, None if m is None else jnp.asarray(m))
        assert rel_err(hidden, ref.last_hidden_state.numpy()) < TOL
        assert rel_err(pooled, ref.pooler_output.numpy()) < TOL
    want_at = ids.argmax(-1) if eos == 2 else (ids == eos).argmax(-1)  # the two pooling rules
    chex.assert_trees_all_close(pooled, hidden[np.arange(len(ids)), want_at])


def test_bf16_checkpoint_and_compute(tmp_path: Path) -> None:
    """A bf16 checkpoint (as published) loads; bf16 compute stays near fp32 compute on it."""
    save_t5(tmp_path, "umt5", T5_CASES["umt5-gated-gelu"][1]).to(torch.bfloat16).save_pretrained(tmp_path)
    assert load_file(tmp_path / "model.safetensors")["shared.weight"].dtype.name == "bfloat16"
    ids, mask = tokens()
    ref = load_text_encoder(tmp_path)(ids, jnp.asarray(mask))
    bf16 = load_text_encoder(tmp_path, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(bf16.params))
    out = bf16(ids, jnp.asarray(mask))
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32), ref) < 3e-2


def test_layer_roles_cover_every_kernel(tmp_path: Path) -> None:
    save_t5(tmp_path / "t5", "t5", T5_CASES["t5-gated-gelu"][1])
    save_clip(tmp_path / "clip", 2, "quick_gelu")
    roles = load_text_encoder(tmp_path / "t5").layer_roles()
    assert roles["block_0/ff/wo/kernel"] == ("ffn.down",) and roles["block_2/attn/q/kernel"] == (
        "attn.qkv",
        "self_attn",
    )
    assert len(roles) == 3 * 7
    assert load_text_encoder(tmp_path / "clip").layer_roles()["layers_1/mlp/fc1/kernel"] == ("ffn.up",)


@pytest.fixture(scope="module")
def wan_parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    root = tmp_path_factory.mktemp("wan")
    model = save_t5(root / "text_encoder", "umt5", T5_CASES["umt5-gated-gelu"][1])
    build_tokenizer(root / "tokenizer", "t5", model_max_length=512)
    return root / "text_encoder", root / "tokenizer", model


def test_wan_prompt_matches_diffusers(wan_parts: tuple[Path, Path, Any]) -> None:
    diffusers = pytest.importorskip("diffusers")
    enc_dir, tok_dir, model = wan_parts
    pipe = diffusers.WanPipeline(
        tokenizer=transformers.AutoTokenizer.from_pretrained(tok_dir),
        text_encoder=model,
        transformer=None,
        vae=None,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
    )
    prompts = [SENTENCES[0], "  a cat &amp;amp;\n sleeps  ", SENTENCES[1] + " " + SENTENCES[2]]
    negative = ["blurry", "", "the rain"]
    length = 12  # the third prompt is longer: truncated by both
    with torch.no_grad():
        ref, ref_neg = pipe.encode_prompt(
            prompts, negative, num_videos_per_prompt=2, max_sequence_length=length, device="cpu"
        )
    encoder, tokenizer = load_text_encoder(enc_dir), load_tokenizer(tok_dir)
    with pytest.warns(PromptTruncatedWarning, match="prompt 2"):
        cond, uncond = encode_wan_prompt(
            encoder, tokenizer, prompts, negative, max_sequence_length=length, num_per_prompt=2
        )
    assert rel_err(cond, ref.numpy()) < TOL and rel_err(uncond, ref_neg.numpy()) < TOL
    n = int(tokenizer.encode(prompt_clean(prompts[1]), length).lengths[0])  # "a cat & sleeps" + </s>
    assert n == 5 and np.all(np.asarray(cond)[2:4, n:] == 0) and np.all(np.abs(np.asarray(cond)[2:4, :n]).sum(-1) > 0)
    with torch.no_grad():
        ref_default = pipe.encode_prompt(SENTENCES[3], max_sequence_length=length, device="cpu")[1]
    assert (
        rel_err(encode_wan_prompt(encoder, tokenizer, SENTENCES[3], max_sequence_length=length)[1], ref_default) < TOL
    )
    assert encode_wan_prompt(encoder, tokenizer, "a", guidance=False)[1] is None


def test_prompt_clean_matches_diffusers() -> None:
    reference = pytest.importorskip("diffusers.pipelines.wan.pipeline_wan").prompt_clean

    for text in ["  a\tcat \n\n on a mat ", "fish &amp;amp; chips", "&lt;b&gt; bold", ""]:
        assert prompt_clean(text) == reference(text)


def test_flux_prompt_matches_diffusers(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    clip = save_clip(tmp_path / "text_encoder", 2, "quick_gelu", prefix="text_model.")
    t5 = save_t5(tmp_path / "text_encoder_2", "t5", T5_CASES["t5-gated-gelu"][1])
    build_tokenizer(tmp_path / "tokenizer", "clip", model_max_length=24)
    build_tokenizer(tmp_path / "tokenizer_2", "t5", model_max_length=512)
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=clip,
        tokenizer=transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer"),
        text_encoder_2=t5,
        tokenizer_2=transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer_2"),
        transformer=None,
    )
    prompts, prompts_2 = [SENTENCES[0], "a cat"], [SENTENCES[2], SENTENCES[4]]
    with torch.no_grad():
        ref, ref_pooled, ref_ids = pipe.encode_prompt(
            prompts, prompts_2, device="cpu", num_images_per_prompt=2, max_sequence_length=16
        )
    parts = [load_text_encoder(tmp_path / "text_encoder"), load_tokenizer(tmp_path / "tokenizer")]
    parts += [load_text_encoder(tmp_path / "text_encoder_2"), load_tokenizer(tmp_path / "tokenizer_2")]
    embeds, pooled, text_ids = encode_flux_prompt(*parts, prompts, prompts_2, max_sequence_length=16, num_per_prompt=2)
    assert rel_err(embeds, ref.numpy()) < TOL and rel_err(pooled, ref_pooled.numpy()) < TOL
    np.testing.assert_array_equal(text_ids, ref_ids.numpy())
    assert embeds.shape == (4, 16, 32) and pooled.shape == (4, 32)


def test_missing_and_mismatched_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such text encoder folder"):
        load_text_encoder(tmp_path / "text_encoder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_text_encoder(tmp_path / "empty")
    save_t5(tmp_path / "te", "umt5", {"num_layers": 2})
    weights = tmp_path / "te" / "model.safetensors"
    tensors = load_file(weights)
    key = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    with pytest.raises(CheckpointMismatchError, match=rf"missing keys \(1\): \['{key}'\]"):
        load_text_encoder(tmp_path / "te")
    save_file({**tensors, key: tensors[key][:3]}, weights)
    with pytest.raises(
        CheckpointMismatchError,
        match=rf"{key} \(3, 4\) -> block_1/attn/relative_attention_bias/embedding: config needs \(8, 4\)",
    ):
        load_text_encoder(tmp_path / "te")
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        load_text_encoder(tmp_path / "te")
    weights.unlink()
    (tmp_path / "te" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors .*pytorch_model.bin.*safetensors needed"):
        load_text_encoder(tmp_path / "te")
    (tmp_path / "te" / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(ValueError, match=r"\['BertModel'\] .* not a text encoder jquant ports"):
        load_text_encoder(tmp_path / "te")


def test_configs_refuse_what_the_ports_do_not_cover() -> None:
    base = dict(vocab_size=8, d_model=8, d_kv=2, d_ff=8, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match=r"lacks \['d_ff'\]"):
        T5EncoderConfig.from_transformers({k: v for k, v in base.items() if k != "d_ff"}, "te/config.json")
    with pytest.raises(ValueError, match="is_decoder=true"):
        T5EncoderConfig.from_transformers({**base, "is_decoder": True})
    with pytest.raises(ValueError, match="feed_forward_proj 'gated-mish'"):
        T5EncoderConfig(**base, feed_forward_proj="gated-mish")
    with pytest.raises(ValueError, match="hidden_act 'relu6'"):
        CLIPTextConfig(8, 8, 8, 1, 2, hidden_act="relu6")
    clip = CLIPTextConfig.from_transformers(
        {"model_type": "clip", "text_config": CLIPTextConfig(8, 8, 8, 1, 2).to_transformers()}
    )
    assert clip == CLIPTextConfig(8, 8, 8, 1, 2)
    assert T5EncoderConfig.from_transformers(T5EncoderConfig(**base).to_transformers()) == T5EncoderConfig(**base)


def test_tokenizer_mismatch_is_refused(wan_parts: tuple[Path, Path, Any], tmp_path: Path) -> None:
    enc_dir, tok_dir, _ = wan_parts
    save_t5(tmp_path / "small", "umt5", {"vocab_size": 20, "num_layers": 1})
    small, tokenizer = load_text_encoder(tmp_path / "small"), load_tokenizer(tok_dir)
    with pytest.raises(ValueError, match=r"has \d+ tokens but text encoder .*small embeds only 20"):
        check_tokenizer(tokenizer, small)
    with pytest.raises(ValueError, match="does not belong to this encoder"):
        encode_wan_prompt(small, tokenizer, "a cat")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_tokenizer(tokenizer, load_text_encoder(enc_dir))


def test_docs_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The self-contained example of docs/pipelines.md's text-encoder section runs as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "pipelines.md").read_text()
    section = text.split("## Text encoders", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    exec(compile(blocks[1], "docs/pipelines.md", "exec"), {})
    out = capsys.readouterr().out
    assert "mask=array([[1, 1, 1, 1, 0, 0, 0, 0]]" in out and "(1, 8, 32) 0.0" in out
    assert float(re.search(r"int8 weight-only relative error ([\d.]+)", out).group(1)) < 0.05


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("enc")
    save_t5(root / "umt5", "umt5", T5_CASES["umt5-gated-gelu"][1])
    save_clip(root / "clip", 7, "gelu")
    return {name: load_text_encoder(root / name) for name in ("umt5", "clip")}


@settings(max_examples=10)
@given(valid=st.integers(1, 16), cut=st.integers(1, 15), seed=st.integers(0, 2**16))
def test_masking_and_causality_properties(tiny_encoders: dict[str, Any], valid: int, cut: int, seed: int) -> None:
    """Masked (padding) tokens do not reach UMT5's real positions; CLIP's position i does not
    see tokens after i. Checked by changing exactly those tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 60, (1, 16))
    other = ids.copy()
    other[:, valid:] = rng.integers(3, 60, (1, 16 - valid))
    mask = jnp.asarray((np.arange(16) < valid)[None].astype(np.int32))
    umt5 = tiny_encoders["umt5"]
    chex.assert_trees_all_close(umt5(ids, mask)[:, :valid], umt5(other, mask)[:, :valid], atol=1e-6)
    later = ids.copy()
    later[:, cut:] = rng.integers(8, 60, (1, 16 - cut))  # no end-of-text token (7) among them
    clip = tiny_encoders["clip"]
    chex.assert_trees_all_close(clip(ids)[0][:, :cut], clip(later)[0][:, :cut], atol=1e-6)


def test_call_bytes_counts_the_call(tmp_path: Path) -> None:
    """`call_bytes`: XLA's analysis of one encoder call; its output is the hidden states, its
    arguments the weights, the ids and (when passed) the mask."""
    save_t5(tmp_path, "umt5", T5_CASES["umt5-gated-gelu"][1]).save_pretrained(tmp_path)
    te = load_text_encoder(tmp_path)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(te.params))
    with_mask, without = te.call_bytes(2, 7), te.call_bytes(2, 7, mask=False)
    assert with_mask["outputs"] == without["outputs"] == 2 * 7 * te.config.d_model * 4
    assert with_mask["arguments"] == weights + 2 * (2 * 7 * 4)
    assert without["arguments"] == weights + 2 * 7 * 4
