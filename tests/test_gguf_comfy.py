"""The community (ComfyUI-GGUF) GGUF layout: original names, fused tensors, type rules, round trips.

No community file can be downloaded here, so files are built the way the community tools
build them: a tiny random port model is converted to the original tensor names with
jquant's reversible map, and the ``gguf`` package's own ``GGUFWriter`` writes them with mixed
ggml types (ggml-exact blocks from ``jquant.codecs``, or the ``gguf`` package's quantizer).
The map itself is checked against diffusers' own original->diffusers conversion functions.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import traverse_util
from gguf import GGMLQuantizationType as T
from hypothesis import given
from hypothesis import strategies as st

from jquant import nn as jnn
from jquant.codecs import CODECS, GGML_CODECS
from jquant.io.gguf import (
    GGUFError,
    codec_qarray,
    export_gguf,
    load_gguf,
    load_gguf_params,
    params_to_tensors,
    save_gguf_params,
)
from jquant.io.gguf_layouts import (
    FAMILIES,
    concat_rows,
    detect_family,
    family_for_config,
    infer_config,
    original_entries,
    plan_comfy_types,
    quantizable,
    split_rows,
)
from jquant.models import FluxConfig, HunyuanVideoConfig, LTXVideoConfig, WanConfig
from jquant.models.loading import CheckpointMismatchError, port_for_config, save_pretrained
from jquant.models.vae_blocks import random_params
from jquant.qarray import QArray, dequantize

# Tiny configs whose widths are multiples of 256, so every block type fits their rows.
CONFIGS = {
    "wan": WanConfig(
        num_attention_heads=2,
        attention_head_dim=128,
        in_channels=4,
        out_channels=4,
        text_dim=256,
        freq_dim=256,
        ffn_dim=512,
        num_layers=2,
    ),
    "flux": FluxConfig(
        num_layers=1,
        num_single_layers=1,
        num_attention_heads=2,
        attention_head_dim=128,
        joint_attention_dim=256,
        pooled_projection_dim=256,
        in_channels=64,
        guidance_embeds=True,
    ),
    "hyvid": HunyuanVideoConfig(
        num_attention_heads=2,
        attention_head_dim=128,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        text_embed_dim=256,
        pooled_projection_dim=256,
        in_channels=4,
        out_channels=4,
    ),
    "ltxv": LTXVideoConfig(
        num_attention_heads=4,
        attention_head_dim=64,
        cross_attention_dim=256,
        caption_channels=256,
        in_channels=32,
        out_channels=32,
        num_layers=2,
    ),
}
ALL_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q5_0, T.Q5_1, T.Q4_0, T.Q4_1, T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K]
BLOCK_TYPES = [t for t in ALL_TYPES if t.name.lower() in GGML_CODECS]
QARRAY_TYPES = [t for t in BLOCK_TYPES if t.name.lower() in CODECS]  # block types that load as QArrays


# ----------------------------------------------------------------------------- the name maps


def _torch_rows(cfg) -> dict[str, int]:
    port = port_for_config(cfg)
    shapes = traverse_util.flatten_dict(port.param_shapes(cfg), sep="/")
    out = {}
    for e in port.key_map(cfg):
        s = shapes[e.flax_path].shape
        out[e.torch_key] = e.torch_shape[0] if e.kind == "patch" else (s[-1] if e.kind == "linear" else s[0])
    return out


# Flux's and HunyuanVideo's converters hard-code a 3072 width for the fused single-block split, so
# their configs here keep the published width (the tensors are (rows, 1): no weights are built).
MAP_CASES = [
    ("wan", CONFIGS["wan"]),
    (
        "wan",
        WanConfig(
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            ffn_dim=64,
            text_dim=32,
            freq_dim=32,
            in_channels=4,
            out_channels=4,
            image_dim=24,
            added_kv_proj_dim=32,
        ),
    ),  # fmt: skip
    (
        "flux",
        FluxConfig(
            num_layers=2,
            num_single_layers=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            in_channels=8,
            guidance_embeds=True,
        ),
    ),  # fmt: skip
    (
        "flux",
        FluxConfig(num_layers=1, num_single_layers=1, joint_attention_dim=32, pooled_projection_dim=16, in_channels=8),
    ),
    (
        "hyvid",
        HunyuanVideoConfig(
            num_layers=2, num_single_layers=2, num_refiner_layers=2, text_embed_dim=32, pooled_projection_dim=16
        ),
    ),  # fmt: skip
    ("ltxv", CONFIGS["ltxv"]),
]
CONVERTERS = {
    "wan": "convert_wan_transformer_to_diffusers",
    "flux": "convert_flux_transformer_checkpoint_to_diffusers",
    "hyvid": "convert_hunyuan_video_transformer_to_diffusers",
    "ltxv": "convert_ltx_transformer_checkpoint_to_diffusers",
}


@pytest.mark.parametrize("arch, cfg", MAP_CASES)
def test_name_map_inverts_diffusers_conversion(arch, cfg) -> None:
    """Each original tensor holds distinct row ids; diffusers' own conversion must put every
    row into the diffusers key (and position) the map says, and produce no other key."""
    from diffusers.loaders import single_file_utils as sfu

    assert family_for_config(cfg).arch == arch
    rows = _torch_rows(cfg)
    entries = original_entries(cfg)
    ckpt, expect, next_id = {}, {}, 0
    for e in entries:
        n = sum(rows[p] for p in e.parts)
        ids = np.arange(next_id, next_id + n, dtype=np.float64)
        next_id += n
        ckpt[e.name] = torch.from_numpy(ids.copy()).reshape(n, 1)
        ids = np.concatenate([ids[n // 2 :], ids[: n // 2]]) if e.swap_halves else ids
        start = 0
        for p in e.parts:
            expect[p] = ids[start : start + rows[p]]
            start += rows[p]
    assert detect_family(ckpt).arch == arch
    converted = getattr(sfu, CONVERTERS[arch])(dict(ckpt))
    assert set(converted) == set(expect)
    for k, v in converted.items():
        np.testing.assert_array_equal(v.reshape(-1).numpy(), expect[k], err_msg=k)
    # Fused tensors: Flux and HunyuanVideo fuse qkv and the single blocks' linear1.
    fused = {e.name for e in entries if e.fused}
    if arch in ("flux", "hyvid"):
        assert any(n.endswith("linear1.weight") for n in fused) and any("qkv" in n for n in fused)
    else:
        assert not fused


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_infer_config_from_original_shapes(arch: str) -> None:
    cfg = CONFIGS[arch]
    port = port_for_config(cfg)
    zeros = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, np.float32), port.param_shapes(cfg))
    shapes = {k: tuple(v.shape) for k, v in params_to_tensors(zeros, cfg, layout="comfy").items()}
    assert port.config_cls.from_diffusers(infer_config(shapes, arch)) == cfg
    assert port.config_cls.from_diffusers(infer_config(shapes)) == cfg  # detected from the names
    with pytest.raises(ValueError, match="not a community-layout checkpoint"):
        infer_config({"x.weight": (2, 2)})
    width = {"wan": "patch_embedding", "flux": "img_in", "hyvid": "img_in.proj", "ltxv": "patchify_proj"}[
        arch
    ] + ".weight"
    with pytest.raises(ValueError, match=f"tensor '{width}' is missing"):
        infer_config({k: v for k, v in shapes.items() if k != width}, arch)


@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    swap=st.booleans(),
    codec=st.sampled_from(sorted(CODECS)),
    seed=st.integers(0, 2**16),
)
def test_split_and_fuse_are_inverse_and_keep_bytes(sizes, swap, codec, seed) -> None:
    """Splitting a fused tensor by rows and fusing the pieces back is the identity on the bytes,
    for QArrays (blocks) and float arrays alike; each piece holds exactly its rows' bytes."""
    rng = np.random.default_rng(seed)
    if swap:  # the (shift, scale) swap applies to single-part entries
        sizes = [2 * sizes[0]]
    c = CODECS[codec]
    blocks = rng.integers(0, 256, (sum(sizes), 2, c.block_bytes), dtype=np.uint8)
    for value in (codec_qarray(blocks, codec, device=False), rng.standard_normal((sum(sizes), 8)).astype(np.float32)):
        raw = np.asarray(value.qvalue if isinstance(value, QArray) else value)
        pieces = split_rows(value, sizes, swap)
        ordered = np.concatenate([raw[len(raw) // 2 :], raw[: len(raw) // 2]]) if swap else raw
        start = 0
        for piece, n in zip(pieces, sizes):
            got = np.asarray(piece.qvalue if isinstance(piece, QArray) else piece)
            np.testing.assert_array_equal(got, ordered[start : start + n])
            start += n
        back = concat_rows(pieces, swap)
        np.testing.assert_array_equal(np.asarray(back.qvalue if isinstance(back, QArray) else back), raw)
    with pytest.raises(ValueError, match="do not split"):
        split_rows(blocks, [sum(sizes) + 1])


# ----------------------------------------------------------------------------- type rules


def test_comfy_type_rules() -> None:
    wan, flux, ltx = FAMILIES["wan"], FAMILIES["flux"], FAMILIES["ltxv"]
    bf = ml_dtypes.bfloat16
    shapes = {
        "blocks.0.self_attn.v.weight": ((512, 512), bf),
        "blocks.0.self_attn.q.weight": ((512, 512), bf),
        "blocks.0.ffn.2.weight": ((512, 1024), bf),
        "blocks.0.ffn.0.weight": ((1024, 300), bf),  # rows not whole 256-blocks: F16
        "blocks.0.self_attn.q.bias": ((512,), bf),  # 1-D: F32
        "blocks.0.modulation": ((1, 6, 512), bf),  # keys_hiprec: F32
        "patch_embedding.weight": ((512, 16, 1, 2, 2), bf),  # 5-D: F32 (fix_5d_tensors.py)
        "text_embedding.0.weight": ((512, 4096), bf),  # lcpp.patch exclusion: stays BF16
        "head.head.weight": ((64, 512), np.float32),  # excluded, F32 source: F16
        "blocks.0.tiny.weight": ((32, 32), np.float32),  # <= 1024 values from F32: F32, then quantized
    }
    plan = plan_comfy_types(wan, shapes, "Q4_K_M")
    assert plan == {
        "blocks.0.self_attn.v.weight": T.Q6_K,
        "blocks.0.self_attn.q.weight": T.Q4_K,
        "blocks.0.ffn.2.weight": T.Q6_K,
        "blocks.0.ffn.0.weight": T.F16,
        "blocks.0.self_attn.q.bias": T.F32,
        "blocks.0.modulation": T.F32,
        "patch_embedding.weight": T.F32,
        "text_embedding.0.weight": T.BF16,
        "head.head.weight": T.F16,
        "blocks.0.tiny.weight": T.F16,  # a k-quant row of 32 is not a whole block
    }
    assert plan_comfy_types(wan, shapes, "Q8_0")["blocks.0.tiny.weight"] == T.Q8_0
    q4_0 = plan_comfy_types(wan, shapes, "Q4_0")
    assert q4_0["blocks.0.ffn.2.weight"] == T.Q4_1 and q4_0["blocks.0.self_attn.v.weight"] == T.Q4_0
    # Q3_K_M: the first two V tensors (file order) get Q5_K, later ones Q4_K.
    vs = {f"blocks.{i}.self_attn.v.weight": ((256, 256), bf) for i in range(3)}
    assert list(plan_comfy_types(wan, vs, "Q3_K_M").values()) == [T.Q5_K, T.Q5_K, T.Q4_K]
    fl = plan_comfy_types(
        flux,
        {
            "double_blocks.0.img_attn.qkv.weight": ((768, 256), bf),
            "single_blocks.0.linear1.weight": ((1792, 256), bf),
            "img_in.weight": ((256, 64), bf),
            "final_layer.linear.weight": ((64, 256), bf),
        },
        "Q5_K_M",
    )
    assert list(fl.values()) == [T.Q6_K, T.Q5_K, T.BF16, T.BF16]
    lt = plan_comfy_types(
        ltx, {"scale_shift_table": ((2, 2048), bf), "transformer_blocks.0.ff.net.2.weight": ((256, 512), bf)}, "Q4_K_S"
    )
    assert lt == {"scale_shift_table": T.F32, "transformer_blocks.0.ff.net.2.weight": T.Q5_K}
    with pytest.raises(ValueError, match="unknown file type"):
        plan_comfy_types(wan, shapes, "IQ2_XS")


# ----------------------------------------------------------------------------- community files


def _types_for(family, names_shapes: dict[str, tuple[int, ...]], block_types: list[T]) -> dict[str, T]:
    """Mixed types, deterministic: the tensors the community tools quantize (lcpp.patch's test)
    take every one of ``block_types`` their rows fit once, then cycle through them and the float
    types; all other tensors cycle through F32/F16/BF16."""
    floats = [T.F32, T.F16, T.BF16]
    out, n_block, n_float = {}, 0, 0
    for name, shape in names_shapes.items():
        fits = [t for t in block_types if shape[-1] % gguf.GGML_QUANT_SIZES[t][0] == 0]
        if fits and quantizable(family, name, tuple(shape)):
            pool = fits if n_block < len(fits) else fits + floats
            out[name] = pool[n_block % len(pool)]
            n_block += 1
        else:
            out[name] = floats[n_float % 3]
            n_float += 1
    return out


def _encode(a: np.ndarray, t: T, quantizer: str) -> np.ndarray:
    if t == T.F32:
        return a.astype(np.float32)
    if t == T.F16:
        return a.astype(np.float16)
    if t == T.BF16:
        return a.astype(ml_dtypes.bfloat16).view(np.uint16)
    if quantizer == "gguf" and t in (T.Q8_0, T.Q5_0, T.Q5_1, T.Q4_0, T.Q4_1):  # what gguf-py can quantize
        return gguf.quants.quantize(a.astype(np.float32), t)
    blocks = GGML_CODECS[t.name.lower()].encode(a.astype(np.float32))
    return blocks.reshape(a.shape[:-1] + (-1,))


def _init(cfg, seed: int) -> dict:
    """Random float32 params of ``cfg``'s port drawn with NumPy (kernels N(0, 1/fan_in), biases
    zero, the rest one): the port's jitted init compiles every initializer (~4 s a config)."""
    return random_params(port_for_config(cfg).param_shapes(cfg), seed, jnp.float32)


def write_community_file(path: Path, cfg, block_types: list[T], seed: int = 0, quantizer: str = "jquant") -> dict:
    """A random tiny model of ``cfg`` in the community layout, written by the gguf package's own
    GGUFWriter with mixed types. Returns {original name: (ggml type, raw bytes)}."""
    params = _init(cfg, seed)
    noise = np.random.default_rng(seed + 1)  # numpy: jax.random would compile one kernel per leaf shape
    params = jax.tree_util.tree_map(
        lambda x: np.asarray(x) + np.float32(0.02) * noise.standard_normal(x.shape, np.float32), params
    )
    originals = params_to_tensors(params, cfg, layout="comfy")
    family = family_for_config(cfg)
    types = _types_for(family, {n: a.shape for n, a in originals.items()}, block_types)
    writer = gguf.GGUFWriter(path, family.arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    written = {}
    for name, a in originals.items():
        t = types[name]
        data = _encode(np.asarray(a, np.float32), t, quantizer)
        writer.add_tensor(name, data, raw_dtype=None if t in (T.F32, T.F16) else t)
        written[name] = (t, np.ascontiguousarray(data).view(np.uint8).reshape(-1).tobytes())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def _file_tensors(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type, tuple(int(d) for d in t.shape), np.array(t.data).tobytes()) for t in reader.tensors}


def _inputs(cfg) -> tuple[dict, dict]:
    """(array inputs, static inputs) of a tiny forward: random floats in the port's dummy shapes."""
    inputs = port_for_config(cfg).dummy_inputs(cfg)
    key = jax.random.key(7)
    arrays, static = {}, {}
    for i, (k, v) in enumerate(inputs.items()):
        if isinstance(v, jax.Array):
            arrays[k] = (
                jax.random.normal(jax.random.fold_in(key, i), v.shape) if jnp.issubdtype(v.dtype, jnp.floating) else v
            )
        else:
            static[k] = v
    return arrays, static


def _run(model, params, inputs, quantized: bool) -> np.ndarray:
    arrays, static = inputs
    if quantized:
        fn = jax.jit(lambda p, i: jnn.apply(model, {"params": p}, **i, **static))
    else:
        fn = jax.jit(lambda p, i: model.apply({"params": p}, **i, **static))
    return np.asarray(fn(params, arrays))


def _dequantized(params):
    return jax.tree_util.tree_map(
        lambda x: dequantize(x) if isinstance(x, QArray) else jnp.asarray(x, jnp.float32),
        params,
        is_leaf=lambda x: isinstance(x, QArray),
    )


@pytest.mark.parametrize("arch", ["wan", *(pytest.param(a, marks=pytest.mark.slow) for a in ("flux", "hyvid", "ltxv"))])
def test_import_keeps_codes_runs_and_exports_back(arch: str, tmp_path: Path) -> None:
    """Community file -> Flax params (QArray leaves, fused tensors split by rows without
    re-encoding) -> output equal to the dequantized float model -> comfy export tensor for tensor
    identical to the file (names, types, shapes, bytes)."""
    cfg = CONFIGS[arch]
    src = tmp_path / f"{arch}.gguf"
    written = write_community_file(src, cfg, QARRAY_TYPES, seed=len(arch))
    used = {t for t, _ in written.values()}
    assert set(QARRAY_TYPES) <= used and {T.F32, T.F16, T.BF16} & used

    model, params = load_gguf_params(src)  # no config in the file: read off the tensor shapes
    assert model.config == cfg
    leaves = traverse_util.flatten_dict(params, sep="/")
    n_q = sum(isinstance(v, QArray) for v in leaves.values())
    n_block = sum(t in QARRAY_TYPES for t, _ in written.values())
    fused_q = [e for e in original_entries(cfg) if e.fused and written[e.name][0] in QARRAY_TYPES]
    assert n_q == n_block + sum(len(e.parts) - 1 for e in fused_q)  # one QArray per (split) tensor
    pieces = params_to_tensors(params, cfg, layout="jquant")
    for e in fused_q:  # the pieces' blocks are the fused tensor's rows, byte for byte
        joined = b"".join(np.asarray(pieces[p].qvalue).tobytes() for p in e.parts)
        assert joined == written[e.name][1]

    inputs = _inputs(cfg)
    out_q = _run(model, params, inputs, quantized=True)
    out_f = _run(model, _dequantized(params), inputs, quantized=False)
    assert np.all(np.isfinite(out_f)) and np.std(out_f) > 0
    np.testing.assert_allclose(out_q, out_f, rtol=2e-5, atol=2e-5)

    # Back out in the community layout: stored float dtypes kept (dtype=None), codes untouched.
    _, stored = load_gguf_params(src, cfg, dtype=None)
    back = save_gguf_params(tmp_path / f"{arch}-back.gguf", stored, cfg, layout="comfy")
    a, b = _file_tensors(src), _file_tensors(back)
    assert list(a) == list(b)
    for name in a:
        assert a[name] == b[name], name
    assert load_gguf(back)[1]["general.architecture"] == family_for_config(cfg).arch


def test_every_ggml_type_from_the_gguf_quantizer(tmp_path: Path) -> None:
    """A file with all thirteen types, blocks from the gguf package's own quantizer: QArray
    formats load as QArrays with the file's bytes; the other block types (not QArray formats
    yet) are refused by default and decode bit-exactly with dequantize_other=True."""
    cfg = CONFIGS["wan"]
    src = tmp_path / "all.gguf"
    written = write_community_file(src, cfg, BLOCK_TYPES, seed=3, quantizer="gguf")
    assert {t for t, _ in written.values()} == set(ALL_TYPES)
    others = sorted({t.name for t, _ in written.values() if t in BLOCK_TYPES and t not in QARRAY_TYPES})
    if others:
        with pytest.raises(GGUFError, match="unsupported tensor type"):
            load_gguf_params(src, cfg)
    tensors, meta = load_gguf(src, dequantize_other=True)
    assert meta["general.architecture"] == "wan"
    for name, (t, raw) in written.items():
        v = tensors[name]
        if t in QARRAY_TYPES:
            assert isinstance(v, QArray) and np.asarray(v.qvalue).tobytes() == raw
        elif t in BLOCK_TYPES:
            codec = GGML_CODECS[t.name.lower()]
            blocks = np.frombuffer(raw, np.uint8).reshape(v.shape[:-1] + (-1, codec.block_bytes))
            np.testing.assert_array_equal(v, np.asarray(codec.decode(jnp.asarray(blocks))))
    model, params = load_gguf_params(src, cfg, dequantize_other=True)
    out = _run(model, params, _inputs(cfg), quantized=True)
    assert np.all(np.isfinite(out))


def test_export_comfy_from_diffusers_dir(tmp_path: Path) -> None:
    """export_gguf(layout='comfy') from a diffusers folder: original names, the rule types, a
    file ComfyUI-GGUF's reader accepts; importing it and exporting again gives identical codes."""
    cfg = CONFIGS["flux"]
    port = port_for_config(cfg)
    params = _init(cfg, 0)
    params = jax.tree_util.tree_map(lambda x: (x + 0.02).astype(jnp.bfloat16), params)
    d = tmp_path / "flux"
    save_pretrained(d, cfg, params)
    report = export_gguf(d, tmp_path / "flux-Q4_K_M.gguf", "Q4_K_M", layout="comfy")
    t = report.types
    assert t["double_blocks.0.img_attn.qkv.weight"] == "Q5_K"  # lcpp.patch fused-qkv rule
    assert t["single_blocks.0.linear1.weight"] == "Q4_K"
    assert t["double_blocks.0.img_mlp.2.weight"] == "Q4_K"  # Flux's FFN down matches no ffn_down pattern
    assert t["img_in.weight"] == "BF16" and t["final_layer.linear.weight"] == "BF16"  # excluded
    assert t["double_blocks.0.img_attn.norm.query_norm.scale"] == "F32"
    # What ComfyUI-GGUF's gguf_sd_loader checks: an image architecture and torch shapes.
    reader = gguf.GGUFReader(report.path)
    arch = reader.get_field("general.architecture")
    assert str(bytes(arch.parts[arch.data[-1]]), "utf-8") == "flux"
    ft = reader.get_field("general.file_type")
    assert int(ft.parts[ft.data[-1]][0]) == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    by_name = {x.name: x for x in reader.tensors}
    assert tuple(int(v) for v in reversed(by_name["single_blocks.0.linear1.weight"].shape)) == (3 * 256 + 1024, 256)
    # Fused from the float parts, then encoded: the qkv tensor is Q5_K of concat(to_q, to_k, to_v).
    w = np.concatenate(
        [
            np.asarray(params["transformer_blocks_0"]["attn"][p]["kernel"], np.float32).T
            for p in ("to_q", "to_k", "to_v")
        ]
    )
    assert by_name["double_blocks.0.img_attn.qkv.weight"].data.tobytes() == GGML_CODECS["q5_k"].encode(w).tobytes()
    # Import (config from the file's jquant.config) and export back: identical tensors.
    model, qparams = load_gguf_params(report.path, dtype=None)
    back = save_gguf_params(
        tmp_path / "back.gguf",
        qparams,
        port.config_cls.from_diffusers(json.loads(load_gguf(report.path)[1]["jquant.config"])),
        layout="comfy",
    )
    a, b = _file_tensors(report.path), _file_tensors(back)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_fusing_mixed_types_and_bad_files_are_named(tmp_path: Path) -> None:
    cfg = CONFIGS["flux"]
    src = tmp_path / "flux.gguf"
    write_community_file(src, cfg, QARRAY_TYPES, seed=1)
    _, params = load_gguf_params(src, cfg)
    # Pieces of a fused tensor with different codecs cannot be fused without re-encoding.
    attn = params["transformer_blocks_0"]["attn"]
    q = attn["to_q"]["kernel"]
    attn["to_k"]["kernel"] = np.asarray(dequantize(q)) if isinstance(q, QArray) else q
    attn["to_q"]["kernel"] = jnn_quantize(np.asarray(dequantize(q)) if isinstance(q, QArray) else q)
    with pytest.raises(ValueError, match=r"double_blocks\.0\.img_attn\.qkv\.weight.*without re-encoding"):
        save_gguf_params(tmp_path / "x.gguf", params, cfg, layout="comfy")
    # A truncated file names the file and the first cut tensor.
    raw = src.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(raw[: len(raw) - 5000])
    with pytest.raises(GGUFError, match=r"cut\.gguf: truncated.*tensor '"):
        load_gguf_params(cut, cfg)
    # A config that does not fit: the error names the original tensors.
    small = dataclasses.replace(CONFIGS["flux"], num_single_layers=2)
    with pytest.raises(CheckpointMismatchError, match=r"single_blocks\.1\.linear1\.weight"):
        load_gguf_params(src, small)
    wide = dataclasses.replace(CONFIGS["flux"], pooled_projection_dim=512)
    with pytest.raises(CheckpointMismatchError, match=r"vector_in\.in_layer\.weight \(time_text_embed"):
        load_gguf_params(src, wide)


def jnn_quantize(w: np.ndarray) -> QArray:
    from jquant.qarray import quantize

    return quantize(jnp.asarray(w), "q8_0/axis=0")


def test_cli_export_gguf_layout(tmp_path: Path, capsys) -> None:
    from jquant.cli import main

    cfg = CONFIGS["wan"]
    d = tmp_path / "wan"
    save_pretrained(d, cfg, _init(cfg, 0))
    out = tmp_path / "wan-Q8_0.gguf"
    assert main(["export-gguf", str(d), str(out), "--layout", "comfy", "--type", "Q8_0"]) == 0
    assert "comfy layout" in capsys.readouterr().out
    tensors, meta = load_gguf(out)
    assert meta["general.architecture"] == "wan" and "blocks.0.self_attn.q.weight" in tensors
    assert tensors["blocks.0.self_attn.q.weight"].spec.fmt == "q8_0"
    assert tensors["blocks.0.modulation"].dtype == np.float32  # keys_hiprec
    model, params = load_gguf_params(out)  # config from jquant.config, names from the layout
    assert isinstance(params["blocks_0"]["attn1"]["to_q"]["kernel"], QArray)
    # The jquant layout refuses file types only the comfy layout has.
    assert main(["export-gguf", str(d), str(tmp_path / "x.gguf"), "--type", "Q3_K_M"]) == 2
    assert "not a jquant-layout type" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch, ftype", [("hyvid", "Q5_K_M"), ("ltxv", "Q4_K_S")])
def test_export_comfy_other_families(arch: str, ftype: str, tmp_path: Path) -> None:
    """The comfy export of HunyuanVideo (5-D patch conv in F32, fused refiner/double/single
    tensors) and LTX-Video from diffusers folders: types per the rules, import runs, re-export
    identical."""
    cfg = CONFIGS[arch]
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), _init(cfg, 2))
    save_pretrained(tmp_path / arch, cfg, params)
    report = export_gguf(tmp_path / arch, tmp_path / f"{arch}.gguf", ftype, layout="comfy")
    family = FAMILIES[arch]
    shapes = {k: (tuple(v.shape), ml_dtypes.bfloat16) for k, v in load_gguf(report.path)[0].items()}
    assert report.types == {k: t.name for k, t in plan_comfy_types(family, shapes, ftype).items()}
    if arch == "hyvid":
        assert (
            report.types["img_in.proj.weight"] == "F32"
            and report.types["double_blocks.0.img_attn_qkv.weight"] == "Q6_K"
        )
    else:
        assert report.types["transformer_blocks.0.ff.net.2.weight"] == "Q5_K"  # Q4_K_S FFN-down rule
        assert report.types["scale_shift_table"] == "F32"
    model, qparams = load_gguf_params(report.path, dtype=None)
    out_q = _run(model, qparams, _inputs(cfg), quantized=True)
    assert np.all(np.isfinite(out_q))
    back = save_gguf_params(tmp_path / "back.gguf", qparams, cfg, layout="comfy")
    a, b = _file_tensors(report.path), _file_tensors(back)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
