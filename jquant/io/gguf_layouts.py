"""The community GGUF layout (ComfyUI-GGUF): original tensor names, fused tensors, type rules.

People run Wan, Flux, HunyuanVideo and LTX-Video from GGUF files that city96's ComfyUI-GGUF
tools write: ``tools/convert.py`` turns the *original* checkpoint (the official repositories'
tensor names, e.g. Wan's ``blocks.0.self_attn.q.weight``, BFL Flux's fused
``double_blocks.0.img_attn.qkv.weight``) into an F16/BF16 GGUF with ``general.architecture``
``wan`` / ``flux`` / ``hyvid`` / ``ltxv``, and llama.cpp's ``llama-quantize`` with
``tools/lcpp.patch`` quantizes it. This module holds that layout as data:

* :func:`original_entries`: the reversible map between original names and the diffusers names
  of jquant's ports (whose key maps go on to Flax paths). It is the inverse of diffusers'
  ``convert_wan_transformer_to_diffusers``, ``convert_flux_transformer_checkpoint_to_diffusers``,
  ``convert_hunyuan_video_transformer_to_diffusers`` and
  ``convert_ltx_transformer_checkpoint_to_diffusers`` (``tests/test_gguf_comfy.py`` runs those
  functions on the map's output and checks every row lands where the map says). A fused
  original tensor is the concatenation of its diffusers parts along axis 0 (the output axis);
  ``swap_halves`` marks the final adaLN linears whose (shift, scale) halves diffusers swaps.
* :func:`comfy_tensor_type`: which ggml type each tensor gets for a llama.cpp file type
  (Q4_K_M, Q8_0, ...), reproducing convert.py's float rules and lcpp.patch's quantization rules.

Splitting and fusing never re-encode: ggml blocks run along the last (input) axis, so a
block row never straddles two output rows and a fused quantized tensor splits into row
ranges that keep their bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import gguf
import numpy as np
from gguf import GGMLQuantizationType as GT

from jquant.models.loading import port_for_config
from jquant.models.port import DiffusersConfig


@dataclasses.dataclass(frozen=True)
class OrigEntry:
    """One tensor of the original checkpoint: its ``name``, the diffusers keys it holds
    (concatenated along axis 0 in this order) and whether its two halves along axis 0 are
    swapped relative to diffusers' (the (shift, scale) order of the final adaLN linear)."""

    name: str
    parts: tuple[str, ...]
    swap_halves: bool = False

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1


def _lin(orig: str, *diffusers: str, swap: bool = False) -> list[OrigEntry]:
    """Weight and bias entries of one (possibly fused) linear or conv layer."""
    return [OrigEntry(f"{orig}.{s}", tuple(f"{d}.{s}" for d in diffusers), swap) for s in ("weight", "bias")]


def _one(orig: str, diffusers: str) -> list[OrigEntry]:
    return [OrigEntry(orig, (diffusers,))]


# ------------------------------------------------------------------ name maps, one per family
# Candidates: every tensor a family's original checkpoint can hold; `original_entries` keeps
# those whose diffusers keys the port's key map has (optional branches, biases).


def _wan(cfg: Any) -> list[OrigEntry]:
    """Wan2.1 (Wan-AI/Wan2.1 `WanModel`) <- convert_wan_transformer_to_diffusers' rename dict."""
    ce = "condition_embedder"
    e = _lin("patch_embedding", "patch_embedding")
    e += _lin("time_embedding.0", f"{ce}.time_embedder.linear_1") + _lin(
        "time_embedding.2", f"{ce}.time_embedder.linear_2"
    )
    e += _lin("text_embedding.0", f"{ce}.text_embedder.linear_1") + _lin(
        "text_embedding.2", f"{ce}.text_embedder.linear_2"
    )
    e += _lin("time_projection.1", f"{ce}.time_proj")
    img = f"{ce}.image_embedder"
    for o, d in (("0", "norm1"), ("1", "ff.net.0.proj"), ("3", "ff.net.2"), ("4", "norm2")):
        e += _lin(f"img_emb.proj.{o}", f"{img}.{d}")
    for i in range(cfg.num_layers):
        o, d = f"blocks.{i}", f"blocks.{i}"
        e += _one(f"{o}.modulation", f"{d}.scale_shift_table")
        for oa, da in (("self_attn", "attn1"), ("cross_attn", "attn2")):
            for op, dp in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0")):
                e += _lin(f"{o}.{oa}.{op}", f"{d}.{da}.{dp}")
            e += _one(f"{o}.{oa}.norm_q.weight", f"{d}.{da}.norm_q.weight")
            e += _one(f"{o}.{oa}.norm_k.weight", f"{d}.{da}.norm_k.weight")
        e += _lin(f"{o}.cross_attn.k_img", f"{d}.attn2.add_k_proj") + _lin(
            f"{o}.cross_attn.v_img", f"{d}.attn2.add_v_proj"
        )
        e += _one(f"{o}.cross_attn.norm_k_img.weight", f"{d}.attn2.norm_added_k.weight")
        e += _lin(f"{o}.norm3", f"{d}.norm2")  # the cross-attention norm: Wan's norm3 is diffusers' norm2
        e += _lin(f"{o}.ffn.0", f"{d}.ffn.net.0.proj") + _lin(f"{o}.ffn.2", f"{d}.ffn.net.2")
    return e + _lin("head.head", "proj_out") + _one("head.modulation", "scale_shift_table")


def _flux(cfg: Any) -> list[OrigEntry]:
    """BFL Flux (black-forest-labs/flux `Flux`) <- convert_flux_transformer_checkpoint_to_diffusers."""
    tte = "time_text_embed"
    e = _lin("img_in", "x_embedder") + _lin("txt_in", "context_embedder")
    for o, d in (
        ("time_in", "timestep_embedder"),
        ("vector_in", "text_embedder"),
        ("guidance_in", "guidance_embedder"),
    ):
        e += _lin(f"{o}.in_layer", f"{tte}.{d}.linear_1") + _lin(f"{o}.out_layer", f"{tte}.{d}.linear_2")
    for i in range(cfg.num_layers):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        e += _lin(f"{o}.img_mod.lin", f"{d}.norm1.linear") + _lin(f"{o}.txt_mod.lin", f"{d}.norm1_context.linear")
        e += _lin(f"{o}.img_attn.qkv", *(f"{d}.attn.{p}" for p in ("to_q", "to_k", "to_v")))
        e += _lin(f"{o}.txt_attn.qkv", *(f"{d}.attn.{p}" for p in ("add_q_proj", "add_k_proj", "add_v_proj")))
        for s, n in (("img", ""), ("txt", "added_")):
            e += _one(f"{o}.{s}_attn.norm.query_norm.scale", f"{d}.attn.norm_{n}q.weight")
            e += _one(f"{o}.{s}_attn.norm.key_norm.scale", f"{d}.attn.norm_{n}k.weight")
        e += _lin(f"{o}.img_mlp.0", f"{d}.ff.net.0.proj") + _lin(f"{o}.img_mlp.2", f"{d}.ff.net.2")
        e += _lin(f"{o}.txt_mlp.0", f"{d}.ff_context.net.0.proj") + _lin(f"{o}.txt_mlp.2", f"{d}.ff_context.net.2")
        e += _lin(f"{o}.img_attn.proj", f"{d}.attn.to_out.0") + _lin(f"{o}.txt_attn.proj", f"{d}.attn.to_add_out")
    for i in range(cfg.num_single_layers):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        e += _lin(f"{o}.modulation.lin", f"{d}.norm.linear")
        e += _lin(f"{o}.linear1", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp")
        e += _one(f"{o}.norm.query_norm.scale", f"{d}.attn.norm_q.weight")
        e += _one(f"{o}.norm.key_norm.scale", f"{d}.attn.norm_k.weight")
        e += _lin(f"{o}.linear2", f"{d}.proj_out")
    return (
        e
        + _lin("final_layer.linear", "proj_out")
        + _lin("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    )


def _hunyuan(cfg: Any) -> list[OrigEntry]:
    """HunyuanVideo (Tencent `HYVideoDiffusionTransformer`) <- convert_hunyuan_video_transformer_to_diffusers."""
    tte, ce = "time_text_embed", "context_embedder"
    e = _lin("img_in.proj", "x_embedder.proj")
    for o, d in (("time_in", "timestep_embedder"), ("guidance_in", "guidance_embedder")):
        e += _lin(f"{o}.mlp.0", f"{tte}.{d}.linear_1") + _lin(f"{o}.mlp.2", f"{tte}.{d}.linear_2")
    e += _lin("vector_in.in_layer", f"{tte}.text_embedder.linear_1") + _lin(
        "vector_in.out_layer", f"{tte}.text_embedder.linear_2"
    )
    e += _lin("txt_in.t_embedder.mlp.0", f"{ce}.{tte}.timestep_embedder.linear_1")
    e += _lin("txt_in.t_embedder.mlp.2", f"{ce}.{tte}.timestep_embedder.linear_2")
    e += _lin("txt_in.c_embedder.linear_1", f"{ce}.{tte}.text_embedder.linear_1")
    e += _lin("txt_in.c_embedder.linear_2", f"{ce}.{tte}.text_embedder.linear_2")
    e += _lin("txt_in.input_embedder", f"{ce}.proj_in")
    for i in range(cfg.num_refiner_layers):
        o, d = f"txt_in.individual_token_refiner.blocks.{i}", f"{ce}.token_refiner.refiner_blocks.{i}"
        e += _lin(f"{o}.norm1", f"{d}.norm1") + _lin(f"{o}.norm2", f"{d}.norm2")
        e += _lin(f"{o}.self_attn_qkv", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v")
        e += _lin(f"{o}.self_attn_proj", f"{d}.attn.to_out.0")
        e += _lin(f"{o}.mlp.fc1", f"{d}.ff.net.0.proj") + _lin(f"{o}.mlp.fc2", f"{d}.ff.net.2")
        e += _lin(f"{o}.adaLN_modulation.1", f"{d}.norm_out.linear")
    for i in range(cfg.num_layers):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        e += _lin(f"{o}.img_mod.linear", f"{d}.norm1.linear") + _lin(f"{o}.txt_mod.linear", f"{d}.norm1_context.linear")
        e += _lin(f"{o}.img_attn_qkv", *(f"{d}.attn.{p}" for p in ("to_q", "to_k", "to_v")))
        e += _lin(f"{o}.txt_attn_qkv", *(f"{d}.attn.{p}" for p in ("add_q_proj", "add_k_proj", "add_v_proj")))
        for s, n in (("img", ""), ("txt", "added_")):
            e += _one(f"{o}.{s}_attn_q_norm.weight", f"{d}.attn.norm_{n}q.weight")
            e += _one(f"{o}.{s}_attn_k_norm.weight", f"{d}.attn.norm_{n}k.weight")
        e += _lin(f"{o}.img_attn_proj", f"{d}.attn.to_out.0") + _lin(f"{o}.txt_attn_proj", f"{d}.attn.to_add_out")
        e += _lin(f"{o}.img_mlp.fc1", f"{d}.ff.net.0.proj") + _lin(f"{o}.img_mlp.fc2", f"{d}.ff.net.2")
        e += _lin(f"{o}.txt_mlp.fc1", f"{d}.ff_context.net.0.proj") + _lin(f"{o}.txt_mlp.fc2", f"{d}.ff_context.net.2")
    for i in range(cfg.num_single_layers):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        e += _lin(f"{o}.linear1", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp")
        e += _lin(f"{o}.linear2", f"{d}.proj_out") + _lin(f"{o}.modulation.linear", f"{d}.norm.linear")
        e += _one(f"{o}.q_norm.weight", f"{d}.attn.norm_q.weight") + _one(
            f"{o}.k_norm.weight", f"{d}.attn.norm_k.weight"
        )
    return (
        e
        + _lin("final_layer.linear", "proj_out")
        + _lin("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    )


def _ltx(cfg: Any) -> list[OrigEntry]:
    """LTX-Video (Lightricks `Transformer3DModel`) <- convert_ltx_transformer_checkpoint_to_diffusers."""
    ts = "emb.timestep_embedder"
    e = _lin("patchify_proj", "proj_in") + _one("scale_shift_table", "scale_shift_table")
    e += _lin(f"adaln_single.{ts}.linear_1", f"time_embed.{ts}.linear_1")
    e += _lin(f"adaln_single.{ts}.linear_2", f"time_embed.{ts}.linear_2")
    e += _lin("adaln_single.linear", "time_embed.linear")
    e += _lin("caption_projection.linear_1", "caption_projection.linear_1")
    e += _lin("caption_projection.linear_2", "caption_projection.linear_2")
    for i in range(cfg.num_layers):
        b = f"transformer_blocks.{i}"
        e += _one(f"{b}.scale_shift_table", f"{b}.scale_shift_table")
        for a in ("attn1", "attn2"):
            for p in ("to_q", "to_k", "to_v", "to_out.0"):
                e += _lin(f"{b}.{a}.{p}", f"{b}.{a}.{p}")
            e += _one(f"{b}.{a}.q_norm.weight", f"{b}.{a}.norm_q.weight")
            e += _one(f"{b}.{a}.k_norm.weight", f"{b}.{a}.norm_k.weight")
        e += _one(f"{b}.norm1.weight", f"{b}.norm1.weight") + _one(f"{b}.norm2.weight", f"{b}.norm2.weight")
        e += _lin(f"{b}.ff.net.0.proj", f"{b}.ff.net.0.proj") + _lin(f"{b}.ff.net.2", f"{b}.ff.net.2")
    return e + _lin("proj_out", "proj_out")


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family in the community layout.

    arch: ``general.architecture`` (ComfyUI-GGUF's convert.py ``arch``).
    detect: keys that identify an original-layout checkpoint of the family (convert.py's
      ``keys_detect``, with block indices lowered to 0 so tiny models match).
    hiprec: convert.py's ``keys_hiprec``: substrings kept in F32 (from F32/BF16 sources).
    no_quant: lcpp.patch's ``name.find(...)`` exclusions: substrings never quantized.
    """

    arch: str
    class_name: str
    candidates: Callable[[Any], list[OrigEntry]]
    detect: tuple[str, ...]
    hiprec: tuple[str, ...]
    no_quant: tuple[str, ...]


_FLUX_LIKE_NO_QUANT = ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
FAMILIES: dict[str, Family] = {
    f.arch: f
    for f in (
        Family(
            "wan",
            "WanTransformer3DModel",
            _wan,
            ("blocks.0.self_attn.norm_q.weight", "text_embedding.2.weight", "head.modulation"),
            (".modulation",),
            (
                "modulation.",
                "patch_embedding.",
                "text_embedding.",
                "time_projection.",
                "time_embedding.",
                "img_emb.",
                "head.",
            ),
        ),
        Family(
            "flux",
            "FluxTransformer2DModel",
            _flux,
            ("double_blocks.0.img_attn.proj.weight",),
            (),
            _FLUX_LIKE_NO_QUANT,
        ),
        Family(
            "hyvid",
            "HunyuanVideoTransformer3DModel",
            _hunyuan,
            ("double_blocks.0.img_attn_proj.weight", "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight"),
            (),
            _FLUX_LIKE_NO_QUANT,
        ),
        Family(
            "ltxv",
            "LTXVideoTransformer3DModel",
            _ltx,
            (
                "adaln_single.emb.timestep_embedder.linear_2.weight",
                "transformer_blocks.0.scale_shift_table",
                "caption_projection.linear_2.weight",
            ),
            ("scale_shift_table",),
            ("adaln_single.", "caption_projection.", "patchify_proj.", "proj_out.", "scale_shift_table"),
        ),
    )
}
_FAMILY_OF_CLASS = {f.class_name: f for f in FAMILIES.values()}


def family_for_config(config: DiffusersConfig) -> Family:
    """The community-layout family of a port config; a clear error for ports without one."""
    name = port_for_config(config).config_cls.CLASS_NAME
    if name not in _FAMILY_OF_CLASS:
        raise ValueError(
            f"{name}: no community (ComfyUI-GGUF) layout; it exists for "
            f"{sorted(f.class_name for f in FAMILIES.values())}"
        )
    return _FAMILY_OF_CLASS[name]


def detect_family(names: Iterable[str]) -> Family | None:
    """The family whose original-layout keys all appear in ``names`` (None when none does)."""
    present = set(names)
    for f in FAMILIES.values():
        if all(k in present for k in f.detect):
            return f
    return None


def original_entries(config: DiffusersConfig) -> list[OrigEntry]:
    """The reversible original <-> diffusers map of a port config, covering every diffusers key
    of the port's key map exactly once (checked: a port key the map misses raises)."""
    family = family_for_config(config)
    keys = {e.torch_key for e in port_for_config(config).key_map(config)}
    out, covered = [], set()
    for entry in family.candidates(config):
        present = [p in keys for p in entry.parts]
        if not any(present):
            continue
        if not all(present):
            raise AssertionError(f"{entry.name}: parts {entry.parts} only partly in the {family.class_name} key map")
        out.append(entry)
        covered.update(entry.parts)
    if covered != keys:
        raise ValueError(f"{family.class_name}: no original name for {sorted(keys - covered)}")
    return out


# ------------------------------------------------------------------ configs from shapes
# A community file carries no config.json: the config is read off the tensor shapes, as
# ComfyUI's model detection does. Head sizes are not in the shapes; the published models'
# (128 for Wan, Flux and HunyuanVideo, 64 for LTX-Video) are assumed.


def _count(shapes: Mapping[str, tuple[int, ...]], prefix: str, suffix: str) -> int:
    return sum(
        1 for k in shapes if k.startswith(prefix) and k.endswith(suffix) and k[len(prefix) :].split(".")[0].isdigit()
    )


def _need(shapes: Mapping[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise ValueError(f"cannot infer the config: tensor {name!r} is missing")
    return tuple(shapes[name])


def _wan_config(s: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    dim, cin, *patch = _need(s, "patch_embedding.weight")
    cfg = {
        "_class_name": "WanTransformer3DModel",
        "patch_size": patch,
        "num_attention_heads": dim // 128,
        "attention_head_dim": 128,
        "in_channels": cin,
        "out_channels": _need(s, "head.head.weight")[0] // int(np.prod(patch)),
        "text_dim": _need(s, "text_embedding.0.weight")[1],
        "freq_dim": _need(s, "time_embedding.0.weight")[1],
        "ffn_dim": _need(s, "blocks.0.ffn.0.weight")[0],
        "num_layers": _count(s, "blocks.", ".modulation"),
        "cross_attn_norm": "blocks.0.norm3.weight" in s,
        "qk_norm": "rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in s else None,
    }
    if "img_emb.proj.1.weight" in s:
        cfg.update(image_dim=s["img_emb.proj.1.weight"][1], added_kv_proj_dim=dim)
    return cfg


def _flux_config(s: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    inner, cin = _need(s, "img_in.weight")
    out = _need(s, "final_layer.linear.weight")[0]
    return {
        "_class_name": "FluxTransformer2DModel",
        "in_channels": cin,
        "out_channels": None if out == cin else out,  # diffusers' Flux configs leave it unset
        "num_layers": _count(s, "double_blocks.", ".img_attn.proj.weight"),
        "num_single_layers": _count(s, "single_blocks.", ".linear2.weight"),
        "num_attention_heads": inner // 128,
        "attention_head_dim": 128,
        "joint_attention_dim": _need(s, "txt_in.weight")[1],
        "pooled_projection_dim": _need(s, "vector_in.in_layer.weight")[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in s,
    }


def _hunyuan_config(s: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    inner, cin, pt, ph, pw = _need(s, "img_in.proj.weight")
    return {
        "_class_name": "HunyuanVideoTransformer3DModel",
        "in_channels": cin,
        "out_channels": _need(s, "final_layer.linear.weight")[0] // (pt * ph * pw),
        "num_attention_heads": inner // 128,
        "attention_head_dim": 128,
        "num_layers": _count(s, "double_blocks.", ".img_attn_proj.weight"),
        "num_single_layers": _count(s, "single_blocks.", ".linear2.weight"),
        "num_refiner_layers": _count(s, "txt_in.individual_token_refiner.blocks.", ".self_attn_proj.weight"),
        "mlp_ratio": _need(s, "double_blocks.0.img_mlp.fc1.weight")[0] / inner,
        "patch_size": ph,
        "patch_size_t": pt,
        "guidance_embeds": "guidance_in.mlp.0.weight" in s,
        "text_embed_dim": _need(s, "txt_in.input_embedder.weight")[1],
        "pooled_projection_dim": _need(s, "vector_in.in_layer.weight")[1],
    }


def _ltx_config(s: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    inner, cin = _need(s, "patchify_proj.weight")
    return {
        "_class_name": "LTXVideoTransformer3DModel",
        "in_channels": cin,
        "out_channels": _need(s, "proj_out.weight")[0],
        "num_attention_heads": inner // 64,
        "attention_head_dim": 64,
        "cross_attention_dim": _need(s, "transformer_blocks.0.attn2.to_k.weight")[1],
        "num_layers": _count(s, "transformer_blocks.", ".scale_shift_table"),
        "caption_channels": _need(s, "caption_projection.linear_1.weight")[1],
        "norm_elementwise_affine": "transformer_blocks.0.norm1.weight" in s,
        "attention_bias": "transformer_blocks.0.attn1.to_q.bias" in s,
        "attention_out_bias": "transformer_blocks.0.attn1.to_out.0.bias" in s,
    }


_CONFIG_READERS: dict[str, Callable[[Mapping[str, tuple[int, ...]]], dict[str, Any]]] = {
    "wan": _wan_config,
    "flux": _flux_config,
    "hyvid": _hunyuan_config,
    "ltxv": _ltx_config,
}


def infer_config(shapes: Mapping[str, tuple[int, ...]], arch: str | None = None) -> dict[str, Any]:
    """A diffusers config.json dict for an original-layout checkpoint, from its tensor shapes
    (torch layout) and, when given, its ``general.architecture``; raises naming what is missing."""
    family = FAMILIES.get(arch or "") or detect_family(shapes)
    if family is None:
        raise ValueError(
            f"not a community-layout checkpoint of {sorted(FAMILIES)} (general.architecture {arch!r}, "
            f"none of the families' key sets present); pass config="
        )
    return _CONFIG_READERS[family.arch](shapes)


# ------------------------------------------------------------------ per-tensor type rules

# llama.cpp file types (llama-quantize's `ftype`): (default ggml type, general.file_type).
FILE_TYPES: dict[str, tuple[GT, int]] = {
    name: (default, int(gguf.LlamaFileType[f"MOSTLY_{name}"]))
    for name, default in (
        ("Q2_K", GT.Q2_K),
        ("Q3_K_S", GT.Q3_K),
        ("Q3_K_M", GT.Q3_K),
        ("Q3_K_L", GT.Q3_K),
        ("Q4_0", GT.Q4_0),
        ("Q4_1", GT.Q4_1),
        ("Q5_0", GT.Q5_0),
        ("Q5_1", GT.Q5_1),
        ("Q4_K_S", GT.Q4_K),
        ("Q4_K_M", GT.Q4_K),
        ("Q5_K_S", GT.Q5_K),
        ("Q5_K_M", GT.Q5_K),
        ("Q6_K", GT.Q6_K),
        ("Q8_0", GT.Q8_0),
    )
}
# lcpp.patch `img_tensor_get_type`: name patterns of the three promoted tensor kinds.
V_PATTERNS = (
    "attn_v.weight",
    ".to_v.weight",
    ".v.weight",
    ".attn.w1v.weight",
    ".attn.w2v.weight",
    "_attn.v_proj.weight",
)
QKV_PATTERNS = ("attn_qkv.weight", "attn.qkv.weight", "attention.qkv.weight")
FFN_DOWN_PATTERNS = (
    "ffn_down",
    ".ffn.2.weight",
    ".ff.net.2.weight",
    ".mlp.layer2.weight",
    ".adaln_modulation_mlp.2.weight",
    ".feed_forward.w2.weight",
)
# ftype -> promoted type, per kind (absent: keep the default type).
V_RULE = {"Q2_K": GT.Q3_K, "Q3_K_L": GT.Q5_K, "Q4_K_M": GT.Q6_K, "Q5_K_M": GT.Q6_K}
QKV_RULE = {"Q3_K_M": GT.Q4_K, "Q3_K_L": GT.Q4_K, "Q4_K_M": GT.Q5_K, "Q5_K_M": GT.Q6_K}
FFN_DOWN_RULE = {
    "Q3_K_M": GT.Q4_K,
    "Q3_K_L": GT.Q5_K,
    "Q4_K_S": GT.Q5_K,
    "Q4_K_M": GT.Q6_K,
    "Q5_K_M": GT.Q6_K,
    "Q4_0": GT.Q4_1,
    "Q5_0": GT.Q5_1,
}
QUANTIZATION_THRESHOLD = 1024  # convert.py: tensors of <= this many values stay F32
_K_TYPES = (GT.Q2_K, GT.Q3_K, GT.Q4_K, GT.Q5_K, GT.Q6_K)


def _ggml_n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: dimensions up to the last one > 1, counted in ggml order (numpy reversed)."""
    ne = tuple(reversed(shape)) or (1,)
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] != 1:
            return i + 1
    return 1


def float_type(family: Family, name: str, shape: tuple[int, ...], src_dtype: Any) -> GT:
    """convert.py's type for an unquantized tensor: BF16 sources stay BF16, others become F16;
    from F32/BF16 sources, 1-D tensors, tensors of <= 1024 values and ``keys_hiprec`` names
    are F32; tensors of more than 4 dimensions go through fix_5d_tensors.py, which writes F32."""
    dt = np.dtype(src_dtype)
    if len(shape) > 4:
        return GT.F32
    t = GT.BF16 if dt.name == "bfloat16" else GT.F16
    if dt == np.float32 or dt.name == "bfloat16":
        if len(shape) == 1 or int(np.prod(shape)) <= QUANTIZATION_THRESHOLD or any(k in name for k in family.hiprec):
            t = GT.F32
    return t


def quantizable(family: Family, name: str, shape: tuple[int, ...]) -> bool:
    """llama-quantize's (patched) test: a 2-D (ggml dims) tensor whose name ends in 'weight',
    is not a norm ('_norm.weight') and matches none of the family's exclusions."""
    return (
        name.endswith("weight")
        and "_norm.weight" not in name
        and len(shape) <= 4
        and _ggml_n_dims(shape) == 2
        and not any(x in name for x in family.no_quant)
    )


class _Counter:
    """llama-quantize's running count of attention-V tensors (`qs.i_attention_wv`)."""

    def __init__(self) -> None:
        self.i_attention_wv = 0


def quant_type(name: str, shape: tuple[int, ...], ftype: str, counter: _Counter) -> GT:
    """lcpp.patch's `img_tensor_get_type` for a quantizable tensor: the ftype's default type, V /
    fused qkv / FFN-down promotions, and F16 for rows that are not whole blocks."""
    t, _ = FILE_TYPES[ftype]
    if any(p in name for p in V_PATTERNS):
        if ftype == "Q3_K_M":
            t = GT.Q5_K if counter.i_attention_wv < 2 else GT.Q4_K
        elif ftype == "Q4_K_S" and counter.i_attention_wv < 4:
            t = GT.Q5_K
        else:
            t = V_RULE.get(ftype, t)
        counter.i_attention_wv += 1
    elif any(p in name for p in QKV_PATTERNS):
        t = QKV_RULE.get(ftype, t)
    elif any(p in name for p in FFN_DOWN_PATTERNS) or ("experts." in name and ".w2.weight" in name):
        t = FFN_DOWN_RULE.get(ftype, t)
    block, _ = gguf.GGML_QUANT_SIZES[t]
    if shape[-1] % block:
        # lcpp.patch: k-quant rows that are not whole 256-blocks fall back to F16. For the 32-value
        # types ggml would abort; jquant takes the same F16 fallback.
        t = GT.F16
    return t


def plan_comfy_types(family: Family, tensors: Mapping[str, tuple[tuple[int, ...], Any]], ftype: str) -> dict[str, GT]:
    """ggml type of every tensor ``name -> (shape, source dtype)``, in the order given (the file's
    order: llama-quantize's V counter depends on it), for a llama.cpp ``ftype``."""
    if ftype not in FILE_TYPES:
        raise ValueError(f"unknown file type {ftype!r} for the comfy layout; choose one of {sorted(FILE_TYPES)}")
    counter = _Counter()
    out = {}
    for name, (shape, dtype) in tensors.items():
        if quantizable(family, name, tuple(shape)):
            out[name] = quant_type(name, tuple(shape), ftype, counter)
        else:
            out[name] = float_type(family, name, tuple(shape), dtype)
    return out


def split_rows(value: Any, sizes: list[int], swap_halves: bool = False) -> list[Any]:
    """Split a torch-layout tensor (numpy array or torch-layout QArray, blocks along the last axis)
    into row ranges of ``sizes`` along axis 0, undoing ``swap_halves`` first; no re-encoding."""
    rows = int(value.shape[0])
    if sum(sizes) != rows:
        raise ValueError(f"{rows} rows do not split into {sizes}")
    if swap_halves:
        value = _swap(value)
    out, start = [], 0
    for n in sizes:
        out.append(_rows(value, start, start + n))
        start += n
    return out


def _rows(value: Any, a: int, b: int) -> Any:
    if hasattr(value, "qvalue"):
        return dataclasses.replace(value, qvalue=value.qvalue[a:b])
    return value[a:b]


def _swap(value: Any) -> Any:
    n = int(value.shape[0])
    if n % 2:
        raise ValueError(f"cannot swap the halves of {n} rows")
    return concat_rows([_rows(value, n // 2, n), _rows(value, 0, n // 2)])


def concat_rows(values: list[Any], swap_halves: bool = False) -> Any:
    """Concatenate torch-layout tensors along axis 0 (QArrays: their blocks, which must share a
    codec and row length); ``swap_halves`` then swaps the two halves. No re-encoding."""
    first = values[0]
    if hasattr(first, "qvalue"):
        if any(not hasattr(v, "qvalue") or v.spec.fmt != first.spec.fmt for v in values):
            kinds = [v.spec.fmt if hasattr(v, "qvalue") else f"float {np.asarray(v).dtype}" for v in values]
            raise ValueError(f"parts of different types {kinds} cannot be fused without re-encoding")
        if any(v.qvalue.shape[1:] != first.qvalue.shape[1:] for v in values):
            raise ValueError(f"parts with different row lengths {[tuple(v.shape) for v in values]}")
        out = dataclasses.replace(first, qvalue=np.concatenate([np.asarray(v.qvalue) for v in values], axis=0))
    else:
        if any(hasattr(v, "qvalue") for v in values):
            raise ValueError("a float part and a quantized part cannot be fused without re-encoding")
        out = np.concatenate([np.asarray(v) for v in values], axis=0)
    return _swap(out) if swap_halves else out
