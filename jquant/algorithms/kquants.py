"""GGUF k-quant mixes: which block codec each tensor of a DiT gets (``Q4_K_M``, ``Q5_K_M``, ...).

The codecs themselves (ggml's byte layouts, encoders and decoders) are :mod:`jquant.codecs`;
this module picks one per tensor by role and layer position, as llama.cpp and city96's
ComfyUI-GGUF converter lay their mixes out.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

from jquant.algorithms.fold import with_params
from jquant.codecs import CODECS
from jquant.rules import flatten_with_paths, quantize_params
from jquant.transform import Context, Transform, Variables

# ----------------------------------------------------------------------------- mixes

# Uniform type of each mix; the _M mixes raise chosen tensors above it (see kquant_mix).
MIX_BASE: dict[str, str] = {"Q4_K_M": "q4_k", "Q5_K_M": "q5_k", "Q6_K": "q6_k", "Q8_0": "q8_0"}
# One step up for the _M mixes (fused qkv, modulation); Q6_K for the protected layers.
_MIX_STEP_UP = {"Q4_K_M": "q5_k", "Q5_K_M": "q6_k"}
MIN_QUANT_SIZE = 4096  # tensors with fewer values stay in float (the bytes saved are noise)

_V_PROJ = re.compile(r"(^|[./_])(to_v|add_v_proj|v_proj|v)([./_]|$)")
_FUSED_QKV = re.compile(r"(^|[./_])(qkv|to_qkv|qkv_proj|in_proj)([./_]|$)")
_STACK = re.compile(r"^((?:.*?[./])?[A-Za-z_]*(?:blocks|layers))[._](\d+)(?=[./]|$)")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layer pick for the _M mixes: the first and last eighth, and every third
    layer in between, get the higher type."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def block_index(path: str) -> tuple[str, int] | None:
    """(stack, index) of the transformer block a param path belongs to, or None.

    Works on diffusers names (``transformer_blocks.3.attn.to_v.weight``) and Flax paths
    (``single_transformer_blocks_3/attn/to_v/kernel``): the stack is the first path part
    ending in ``blocks`` or ``layers`` followed by an index.
    """
    m = _STACK.match(path)
    return (m.group(1), int(m.group(2))) if m else None


def kquant_mix(
    name: str,
    path: str,
    shape: Sequence[int],
    roles: Sequence[str],
    *,
    layer: tuple[int, int] | None = None,
    axis: int = -1,
) -> str | None:
    """Codec name for one tensor under a GGUF mix, or None to keep it in float.

    Args:
      name: the mix, one of :data:`MIX_BASE` ('Q4_K_M', 'Q5_K_M', 'Q6_K', 'Q8_0').
      path: param path or diffusers tensor name (used to tell V projections and fused qkv).
      shape: tensor shape; ``axis`` is its contraction (ggml row) axis, the last one in
        torch (out, in) layout.
      roles: layer-role labels (models.roles vocabulary); empty for non-kernel params.
      layer: (index, count) of the block within its stack, for llama.cpp's layer pick;
        None for tensors outside the block stacks (these count as protected).

    Rules (docs/gguf.md has the table and reasons): float for rank < 2, fewer than
    ``MIN_QUANT_SIZE`` values, unlabelled params, embedders and the output head, except a
    shared modulation producer (roles embedder + modulation), which gets Q8_0; in the _M
    mixes attention V and FFN down projections get Q6_K on ``use_more_bits`` layers, fused
    qkv and per-block adaLN modulation go one type up; everything else gets the mix's base
    type. A contraction axis that is not a multiple of 256 falls back to Q8_0 (32), else
    float.
    """
    if name not in MIX_BASE:
        raise ValueError(f"unknown GGUF mix {name!r}; known: {sorted(MIX_BASE)}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or math.prod(shape) < MIN_QUANT_SIZE or not roles:
        return None
    roles = set(roles)
    if roles >= {"embedder", "modulation"}:  # shared adaLN producer (Wan time_proj): feeds every block
        codec = "q8_0"
    elif roles & {"embedder", "final"}:
        return None
    else:
        codec = MIX_BASE[name]
    if name in _MIX_STEP_UP and codec != "q8_0":
        protected = layer is None or use_more_bits(*layer)
        is_v = bool(roles & {"attn.qkv", "cross_attn.kv"}) and bool(_V_PROJ.search(path))
        if (is_v or "ffn.down" in roles) and protected:
            codec = "q6_k"
        elif "modulation" in roles or ("attn.qkv" in roles and _FUSED_QKV.search(path)):
            codec = _MIX_STEP_UP[name]
    n = shape[axis]
    if n % CODECS[codec].block_elems:
        codec = "q8_0" if n % CODECS["q8_0"].block_elems == 0 else None
    return codec


def plan_kquant_mix(
    name: str,
    shapes: Mapping[str, Sequence[int]],
    roles: Mapping[str, Sequence[str]],
    *,
    axis: int = -1,
) -> dict[str, str | None]:
    """:func:`kquant_mix` for every tensor of a model, with layer indices from the paths.

    ``shapes`` maps every param path to its shape; ``roles`` maps (some of) them to role
    labels; the block count of each stack is the largest index seen plus one.
    """
    counts: dict[str, int] = {}
    where = {p: block_index(p) for p in shapes}
    for loc in where.values():
        if loc is not None:
            counts[loc[0]] = max(counts.get(loc[0], 0), loc[1] + 1)
    return {
        p: kquant_mix(
            name,
            p,
            s,
            roles.get(p, ()),
            layer=None if where[p] is None else (where[p][1], counts[where[p][0]]),
            axis=axis,
        )
        for p, s in shapes.items()
    }


# Role guesses from common diffusers tensor names, for models without a Flax port.
_NAME_ROLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        r"^(patch_embed\w*|pos_embed|x_embedder|t_embedder|y_embedder|time_embed\w*|condition_embedder|"
        r"context_embedder|time_text_embed|caption_projection|adaln_single|img_in|txt_in|time_in|vector_in|"
        r"guidance_in|proj_in|patch_embedding)\.",
        ("embedder",),
    ),
    (r"^(proj_out|norm_out|final_layer|proj_out_\w+)\.", ("final",)),
    (r"(norm\w*\.linear|adaLN_modulation\.\d+|\w*_mod\.lin|\.modulation\.lin\w*)\.weight$", ("modulation",)),
    (r"(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|q_proj|k_proj|v_proj|qkv|to_qkv)\.weight$", ("attn.qkv",)),
    (r"(to_out\.0|to_add_out|out_proj|o_proj|attn\.proj)\.weight$", ("attn.out",)),
    (r"(ff|ffn|ff_context|mlp)\.(net\.0(\.proj)?|fc1|linear_1|w1|w3)\.weight$|proj_mlp\.weight$", ("ffn.up",)),
    (r"(ff|ffn|ff_context|mlp)\.(net\.2|fc2|linear_2|w2)\.weight$", ("ffn.down",)),
    (r"(attn2|cross_attn)\.", ("cross_attn",)),
)


def roles_from_name(name: str) -> tuple[str, ...]:
    """Best-effort layer roles of a diffusers tensor name (for models without a port).

    Unrecognised 2-D ``.weight`` tensors get no role and are left in float by the mixes,
    so a guess never quantizes something it does not understand.
    """
    out: list[str] = []
    for pattern, rs in _NAME_ROLES:
        if re.search(pattern, name):
            out += [r for r in rs if r not in out]
    if out == ["cross_attn"]:
        return ()
    return tuple(out)


def transform(mix: str) -> Transform:
    """GGUF k-quant mix (``"Q4_K_M"``, ``"Q5_K_M"``, ``"Q6_K"``, ``"Q8_0"``) by role, as
    llama.cpp/city96 lay it out (:func:`jquant.algorithms.kquants.kquant_mix`)."""

    def fn(v: Variables, ctx: Context) -> Variables:
        shapes = {p: tuple(leaf.shape) for p, leaf in flatten_with_paths(v["params"]) if p in ctx.roles}
        plan = plan_kquant_mix(mix, shapes, ctx.roles, axis=0)
        rules = [(f"^{re.escape(p)}$", c) for p, c in plan.items()] + [(".*", None)]
        return with_params(v, quantize_params(v["params"], rules)[0])

    return Transform(f"kquant[{mix}]", fn)
