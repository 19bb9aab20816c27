"""GGUF files: bit-exact roundtrips, other tools' layouts, bad files, atomic writes, export and mixes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import _draws as draws
import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jquant.algorithms.kquants import kquant_mix, plan_kquant_mix, roles_from_name, use_more_bits
from jquant.codecs import CODECS
from jquant.io.gguf import (
    CONFIG_KEY,
    GGUFError,
    codec_qarray,
    export_gguf,
    load_gguf,
    load_gguf_params,
    save_gguf,
)
from jquant.qarray import QArray, dequantize, quantize

RNG = np.random.default_rng(0)


def _tensors() -> dict:
    out = {}
    for i, name in enumerate(sorted(CODECS)):
        shape = (3, 512) if i % 2 else (2, 2, 256)
        out[f"blocks.{i}.w.weight"] = codec_qarray(
            CODECS[name].encode(RNG.standard_normal(shape).astype(np.float32)), name
        )
    out["kernel_flax"] = quantize(jnp.asarray(RNG.standard_normal((512, 64)).astype(np.float32)), "q6_k")
    out["norm.weight"] = RNG.standard_normal(64).astype(np.float32)
    out["emb.weight"] = RNG.standard_normal((5, 7)).astype(np.float16)
    out["bf.weight"] = RNG.standard_normal((3, 8)).astype(ml_dtypes.bfloat16)
    return out


def test_roundtrip_is_bit_exact(tmp_path: Path) -> None:
    tensors = _tensors()
    meta = {
        "general.architecture": "wan",
        CONFIG_KEY: {"_class_name": "X", "n": 2},
        "a.int": 7,
        "a.neg": -3,
        "a.float": 0.5,
        "a.str": "hi",
        "a.list": [1, 2, 3],
        "a.flag": True,
    }
    path = save_gguf(tmp_path / "m.gguf", tensors, meta)
    got, gmeta = load_gguf(path)
    assert set(got) == set(tensors)
    for name, want in tensors.items():
        have = got[name]
        if isinstance(want, QArray):
            assert isinstance(have, QArray) and have.spec.fmt == want.spec.fmt
            np.testing.assert_array_equal(np.asarray(have.qvalue), np.asarray(want.qvalue))
        else:
            assert have.dtype == want.dtype and have.shape == want.shape
            np.testing.assert_array_equal(have.view(np.uint8), np.ascontiguousarray(want).view(np.uint8))
    assert gmeta["general.architecture"] == "wan"
    assert json.loads(gmeta[CONFIG_KEY]) == {"_class_name": "X", "n": 2}
    assert (gmeta["a.int"], gmeta["a.neg"], gmeta["a.float"], gmeta["a.str"], gmeta["a.list"], gmeta["a.flag"]) == (
        7,
        -3,
        0.5,
        "hi",
        [1, 2, 3],
        True,
    )
    # A Flax (in, out) kernel comes back in torch (out, in) layout, same values.
    k = got["kernel_flax"]
    assert k.shape == (64, 512)
    np.testing.assert_array_equal(np.asarray(dequantize(k)), np.asarray(dequantize(tensors["kernel_flax"])).T)


def test_file_decodes_identically_with_the_gguf_package(tmp_path: Path) -> None:
    tensors = _tensors()
    path = save_gguf(tmp_path / "m.gguf", tensors)
    ours, _ = load_gguf(path)
    for t in gguf.GGUFReader(path).tensors:
        if t.tensor_type in (T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K):
            ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            assert ref.shape == ours[t.name].shape  # ggml dims reversed = numpy shape
            np.testing.assert_array_equal(ref, np.asarray(dequantize(ours[t.name])))


def test_truncated_files_raise(tmp_path: Path) -> None:
    path = save_gguf(tmp_path / "m.gguf", _tensors(), {"k": "v"})
    data = path.read_bytes()
    last = gguf.GGUFReader(path).tensors[-1]
    for cut in (0, 3, 20, 100, len(data) // 2, last.data_offset + last.n_bytes - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match=str(bad.name)):
            load_gguf(bad)
    bad.write_bytes(data[: len(data) - 100])
    with pytest.raises(GGUFError, match="truncated"):
        load_gguf(bad)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        load_gguf(tmp_path / "junk.gguf")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 299), st.integers(0, 255)), min_size=1, max_size=3))
def test_corrupt_headers_raise_gguf_error_only(tmp_path: Path, edits: list[tuple[int, int]]) -> None:
    path = tmp_path / "m.gguf"
    if not path.exists():
        save_gguf(
            path,
            {
                "a.weight": codec_qarray(CODECS["q4_k"].encode(np.ones((2, 256), np.float32)), "q4_k"),
                "b": np.ones(3, np.float32),
            },
            {"k": "v", "n": [1, 2]},
        )
    data = bytearray(path.read_bytes())
    for pos, byte in edits:
        data[pos] = byte
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    try:  # any failure must be a GGUFError; harmless edits (inside a string) may still load
        tensors, _ = load_gguf(bad)
    except GGUFError:
        return
    assert all(isinstance(v, (QArray, np.ndarray)) for v in tensors.values())


def _write_q4_0(path: Path) -> np.ndarray:
    w = gguf.GGUFWriter(path, "x")
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    w.add_tensor("ok.weight", x)
    w.add_tensor("odd.weight", gguf.quants.quantize(x, T.Q4_0), raw_dtype=T.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return x


def test_unsupported_and_unknown_types(tmp_path: Path) -> None:
    path = tmp_path / "q4_0.gguf"
    _write_q4_0(path)
    # IQ4_NL has Q4_0's block size (18 bytes per 32 values) but no jquant codec: relabel a tensor.
    r = gguf.GGUFReader(path, "r+")
    r.tensors[1].field.parts[4][0] = int(T.IQ4_NL)
    r.data.flush()
    del r
    with pytest.raises(GGUFError, match=r"'odd.weight' \(IQ4_NL\)"):
        load_gguf(path)
    got, _ = load_gguf(path, dequantize_other=True)
    raw = gguf.GGUFReader(path).tensors[1]
    np.testing.assert_array_equal(
        got["odd.weight"], gguf.quants.dequantize(raw.data, T.IQ4_NL).reshape(got["odd.weight"].shape)
    )
    # Patch the type id to one ggml does not define.
    r = gguf.GGUFReader(path, "r+")
    r.tensors[1].field.parts[4][0] = 250
    r.data.flush()
    del r
    with pytest.raises(GGUFError, match="'odd.weight': unknown ggml type id 250"):
        load_gguf(path)


def test_comfy_orig_shape_is_restored(tmp_path: Path) -> None:
    path = tmp_path / "comfy.gguf"
    conv = RNG.standard_normal((32, 4, 3, 3)).astype(np.float32)  # 1152 values = 36 Q8_0 blocks
    dense = RNG.standard_normal((16, 24)).astype(np.float16)  # 384 values, F16 as (-1, 128) rows
    w = gguf.GGUFWriter(path, "sdxl")
    w.add_tensor("conv.weight", gguf.quants.quantize(conv.reshape(-1, 32), T.Q8_0), raw_dtype=T.Q8_0)
    w.add_array("comfy.gguf.orig_shape.conv.weight", list(conv.shape))
    w.add_tensor("dense.weight", dense.reshape(-1, 128))
    w.add_array("comfy.gguf.orig_shape.dense.weight", list(dense.shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got, meta = load_gguf(path)
    assert not any(k.startswith("comfy.gguf.orig_shape") for k in meta)
    want = gguf.quants.dequantize(gguf.quants.quantize(conv.reshape(-1, 32), T.Q8_0), T.Q8_0).reshape(conv.shape)
    np.testing.assert_array_equal(got["conv.weight"], want)
    np.testing.assert_array_equal(got["dense.weight"], dense)


def test_failed_write_leaves_old_file(tmp_path: Path) -> None:
    path = save_gguf(tmp_path / "m.gguf", {"a": np.ones((2, 2), np.float32)})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="metadata 'bad'"):
        save_gguf(path, {"a": np.zeros((2, 2), np.float32)}, {"bad": object()})
    with pytest.raises(ValueError, match="'b': dtype complex64"):
        save_gguf(path, {"b": np.zeros(2, np.complex64)})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]  # no temp files left behind


# --------------------------------------------------------------------------- mixes


def test_use_more_bits_matches_llama_cpp_pick() -> None:
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]


@pytest.mark.parametrize(
    "path, shape, roles, layer, q4km, q5km",
    [
        ("blocks.0.attn1.to_v.weight", (1536, 1536), ("attn.qkv", "self_attn"), (0, 30), "q6_k", "q6_k"),
        ("blocks.4.attn1.to_v.weight", (1536, 1536), ("attn.qkv", "self_attn"), (4, 30), "q4_k", "q5_k"),
        ("blocks.4.attn1.to_q.weight", (1536, 1536), ("attn.qkv",), (0, 30), "q4_k", "q5_k"),
        (
            "blocks.5.attn2.to_v.weight",
            (1536, 4096),
            ("attn.qkv", "cross_attn", "cross_attn.kv"),
            (5, 30),
            "q6_k",
            "q6_k",
        ),
        ("blocks.5.ffn.net.2.weight", (1536, 8960), ("ffn.down",), (5, 30), "q6_k", "q6_k"),
        ("blocks.6.ffn.net.2.weight", (1536, 8960), ("ffn.down",), (6, 30), "q4_k", "q5_k"),
        ("blocks.6.ffn.net.0.proj.weight", (8960, 1536), ("ffn.up",), (6, 30), "q4_k", "q5_k"),
        ("blocks.6.attn.qkv.weight", (4608, 1536), ("attn.qkv",), (6, 30), "q5_k", "q6_k"),
        ("blocks.6.norm1.linear.weight", (9216, 1536), ("modulation",), (6, 30), "q5_k", "q6_k"),
        ("condition_embedder.time_proj.weight", (9216, 1536), ("embedder", "modulation"), None, "q8_0", "q8_0"),
        ("condition_embedder.text_embedder.linear_1.weight", (1536, 4096), ("embedder",), None, None, None),
        ("proj_out.weight", (64, 1536), ("final",), None, None, None),
        ("blocks.6.attn1.to_out.0.weight", (1536, 1536), ("attn.out",), (6, 30), "q4_k", "q5_k"),
        ("blocks.6.attn1.to_out.0.weight", (1536, 1440), ("attn.out",), (6, 30), "q8_0", "q8_0"),  # 1440 % 256
        ("blocks.6.attn1.to_out.0.weight", (1536, 1000), ("attn.out",), (6, 30), None, None),  # 1000 % 32
        ("blocks.6.norm2.weight", (1536,), (), (6, 30), None, None),
        ("blocks.6.scale_shift_table", (1, 6, 1536), (), (6, 30), None, None),
        ("blocks.6.attn1.to_q.weight", (32, 64), ("attn.qkv",), (6, 30), None, None),  # tiny
    ],
)
def test_kquant_mix_rules(path, shape, roles, layer, q4km, q5km) -> None:
    assert kquant_mix("Q4_K_M", path, shape, roles, layer=layer) == q4km
    assert kquant_mix("Q5_K_M", path, shape, roles, layer=layer) == q5km
    uniform = kquant_mix("Q6_K", path, shape, roles, layer=layer)
    assert uniform in (None, "q6_k", "q8_0") and (uniform is None) == (q4km is None)


def test_plan_counts_layers_per_stack_and_validates_name() -> None:
    shapes = {
        f"{s}.{i}.ff.net.2.weight": (256, 1024)
        for s in ("transformer_blocks", "single_transformer_blocks")
        for i in range(8)
    }
    roles = {k: ("ffn.down",) for k in shapes}
    plan = plan_kquant_mix("Q4_K_M", shapes, roles)
    for s in ("transformer_blocks", "single_transformer_blocks"):
        assert [i for i in range(8) if plan[f"{s}.{i}.ff.net.2.weight"] == "q6_k"] == [0, 3, 6, 7]
    with pytest.raises(ValueError, match="unknown GGUF mix 'Q3_K_M'"):
        kquant_mix("Q3_K_M", "x", (256, 256), ("ffn.up",))


def test_roles_from_name() -> None:
    assert roles_from_name("transformer_blocks.3.attn.to_v.weight") == ("attn.qkv",)
    assert roles_from_name("blocks.3.attn2.to_k.weight") == ("attn.qkv", "cross_attn")
    assert roles_from_name("transformer_blocks.3.ff.net.2.weight") == ("ffn.down",)
    assert roles_from_name("transformer_blocks.3.norm1.linear.weight") == ("modulation",)
    assert roles_from_name("x_embedder.weight") == ("embedder",)
    assert roles_from_name("proj_out.weight") == ("final",)
    assert roles_from_name("blocks.3.mystery.weight") == ()


# --------------------------------------------------------------------------- export / Flax params


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from jquant.models.loading import param_shapes, save_pretrained
    from jquant.models.wan import WanConfig

    cfg = WanConfig(
        num_attention_heads=2,
        attention_head_dim=128,
        in_channels=4,
        out_channels=4,
        text_dim=256,
        freq_dim=256,
        ffn_dim=512,
        num_layers=2,
    )
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(  # random weights without compiling init; BF16 exercises that reader
        lambda s: (rng.standard_normal(s.shape) * 0.05).astype(ml_dtypes.bfloat16), param_shapes(cfg)
    )
    d = tmp_path_factory.mktemp("wan") / "model"
    save_pretrained(d, cfg, params)
    return cfg, params, d


def test_export_and_load_params(tiny_wan, tmp_path: Path) -> None:
    from jquant import nn as jnn
    from jquant.models.loading import CheckpointMismatchError, port_for_config
    from jquant.models.wan import WanConfig

    cfg, params, model_dir = tiny_wan
    report = export_gguf(model_dir, tmp_path / "wan.gguf", "Q4_K_M")
    assert report.types["blocks.1.attn1.to_v.weight"] == "Q6_K"  # use_more_bits(i, 2): layer 1 only
    assert report.types["blocks.0.attn1.to_v.weight"] == "Q4_K"
    assert report.types["blocks.1.ffn.net.2.weight"] == "Q6_K"
    assert report.types["blocks.0.ffn.net.2.weight"] == "Q4_K"
    assert report.types["condition_embedder.time_proj.weight"] == "Q8_0"
    assert report.types["patch_embedding.weight"] == "BF16"
    assert report.types["blocks.0.norm2.weight"] == "F32"
    assert 4.5 < report.bits_per_weight < 8.5
    assert report.n_bytes < os.path.getsize(report.path)

    model, qparams = load_gguf_params(report.path)
    kernel = qparams["blocks_0"]["attn1"]["to_q"]["kernel"]
    assert isinstance(kernel, QArray) and kernel.shape == (256, 256) and kernel.spec.fmt == "q4_k"
    ref = np.asarray(params["blocks_0"]["attn1"]["to_q"]["kernel"], np.float32)
    assert np.sqrt(np.mean((np.asarray(dequantize(kernel)) - ref) ** 2) / np.mean(ref**2)) < 0.1

    # The quantized tree runs through jquant.nn and matches the model on its dequantized weights.
    inputs = port_for_config(cfg).dummy_inputs(cfg)
    inputs["hidden_states"] = draws.normal(jax.random.key(1), (1, 4, 1, 4, 4))
    inputs["encoder_hidden_states"] = jax.random.normal(jax.random.key(2), (1, 3, 256))
    inputs["timestep"] = jnp.array([500.0])
    out_q = jax.jit(lambda p, i: jnn.apply(model, {"params": p}, **i))(qparams, inputs)
    deq = jax.tree_util.tree_map(
        lambda x: dequantize(x) if isinstance(x, QArray) else x, qparams, is_leaf=lambda x: isinstance(x, QArray)
    )
    out_f = jax.jit(lambda p, i: model.apply({"params": p}, **i))(deq, inputs)
    np.testing.assert_allclose(np.asarray(out_q), np.asarray(out_f), rtol=1e-4, atol=1e-4)

    # ComfyUI-style prefixed names load too; a config that does not fit fails with the list.
    tensors, meta = load_gguf(report.path)
    prefixed = save_gguf(tmp_path / "pre.gguf", {f"model.diffusion_model.{k}": v for k, v in tensors.items()}, meta)
    _, p2 = load_gguf_params(prefixed)
    np.testing.assert_array_equal(np.asarray(p2["proj_out"]["bias"]), np.asarray(qparams["proj_out"]["bias"]))
    with pytest.raises(CheckpointMismatchError, match="missing"):
        load_gguf_params(
            report.path,
            WanConfig(
                num_attention_heads=2,
                attention_head_dim=128,
                in_channels=4,
                out_channels=4,
                text_dim=256,
                freq_dim=256,
                ffn_dim=512,
                num_layers=3,
            ),
        )
    with pytest.raises(ValueError, match="unknown GGUF type"):
        export_gguf(model_dir, tmp_path / "x.gguf", "Q2_K")


def test_export_model_without_port_guesses_roles_and_reads_f8(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    w = RNG.standard_normal((256, 512)).astype(ml_dtypes.float8_e4m3fn)
    save_file(
        {
            "transformer_blocks.0.ff.net.2.weight": w,
            "transformer_blocks.0.attn.to_q.weight": RNG.standard_normal((256, 256)).astype(ml_dtypes.bfloat16),
            "transformer_blocks.0.mystery.weight": RNG.standard_normal((256, 256)).astype(np.float32),
            "transformer_blocks.0.norm.bias": RNG.standard_normal(256).astype(np.float32),
        },
        str(tmp_path / "diffusion_pytorch_model.safetensors"),
    )
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "NoPortTransformer"}))
    report = export_gguf(tmp_path, tmp_path / "o.gguf", "Q5_K_M")
    assert report.types == {
        "transformer_blocks.0.ff.net.2.weight": "Q6_K",  # one-block stack: use_more_bits(0, 1)
        "transformer_blocks.0.attn.to_q.weight": "Q5_K",
        "transformer_blocks.0.mystery.weight": "F16",  # unknown role stays float
        "transformer_blocks.0.norm.bias": "F32",
    }
    tensors, meta = load_gguf(report.path)
    assert json.loads(meta[CONFIG_KEY]) == {"_class_name": "NoPortTransformer"} and meta["jquant.mix"] == "Q5_K_M"
    y = np.asarray(dequantize(tensors["transformer_blocks.0.ff.net.2.weight"]))
    ref = w.astype(np.float32)
    assert np.sqrt(np.mean((y - ref) ** 2) / np.mean(ref**2)) < 0.03
