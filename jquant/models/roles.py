"""Layer roles: labels on every linear kernel, so quantization recipes can target layer kinds.

Each port lists (regex over the module path, roles) rules; `assign_roles` unions the roles of
every matching rule and refuses a kernel that no rule covers, so a new layer cannot silently
go unlabelled.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from flax import traverse_util

ROLES: frozenset[str] = frozenset(
    {
        "attn.qkv",  # query/key/value projections
        "attn.out",  # attention output projection
        "cross_attn",  # any projection of a cross-attention layer
        "cross_attn.kv",  # key/value projections of the conditioning (text/image) side
        "ffn.up",
        "ffn.down",
        "modulation",  # produces adaLN shift/scale/gate vectors
        "embedder",  # patch, timestep, text, class, pooled-text embedders
        "final",  # output head
        "double_stream",  # MM-DiT blocks with separate text and image/video weights (Flux, HunyuanVideo)
        "single_stream",  # single-stream blocks with shared weights over text+image/video
        "self_attn",
        "temporal",  # mixes tokens across frames (Wan's space-time self-attention)
        "text_fusion",  # where text and image/video tokens meet
    }
)

RoleRules = Sequence[tuple[str, tuple[str, ...]]]


def kernel_paths(params: Any) -> list[str]:
    """'/'-joined paths of every Dense kernel (leaves named 'kernel') in a param tree."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return [path for path in flat if path.rsplit("/", 1)[-1] == "kernel"]


def assign_roles(params: Any, rules: RoleRules) -> dict[str, tuple[str, ...]]:
    """Map each kernel path to the union of roles of the rules whose regex fully matches its
    module path (the kernel path without '/kernel'). Raises if a kernel matches no rule."""
    compiled = []
    for pattern, roles in rules:
        bad = set(roles) - ROLES
        if bad:
            raise ValueError(f"rule {pattern!r}: unknown roles {sorted(bad)}; vocabulary: {sorted(ROLES)}")
        compiled.append((re.compile(pattern), roles))
    out: dict[str, tuple[str, ...]] = {}
    unlabelled = []
    for path in kernel_paths(params):
        module_path = path[: -len("/kernel")]
        roles: list[str] = []
        for regex, rule_roles in compiled:
            if regex.fullmatch(module_path):
                roles.extend(r for r in rule_roles if r not in roles)
        if not roles:
            unlabelled.append(path)
        out[path] = tuple(roles)
    if unlabelled:
        raise ValueError(f"no layer role for kernels: {unlabelled}")
    return out


def attn_rules(attn: str, *roles: str) -> RoleRules:
    """Roles of an attention at path `attn`: to_q/k/v `attn.qkv`, to_out_0 `attn.out`, both plus `roles`."""
    return ((rf"{attn}/to_[qkv]", ("attn.qkv", *roles)), (rf"{attn}/to_out_0", ("attn.out", *roles)))


def ffn_rules(ff: str) -> RoleRules:
    """Roles of a FeedForward at path (regex) `ff`: net_0/proj `ffn.up`, net_2 `ffn.down`."""
    return ((rf"{ff}/net_0/proj", ("ffn.up",)), (rf"{ff}/net_2", ("ffn.down",)))


def cross_attn_block_rules(block: str, prefix: str = "", ff: str = "ff") -> RoleRules:
    """Roles inside a block of space-time self-attention `attn1` (`temporal`), cross-attention `attn2`
    to the text (and Wan I2V's image `add_{k,v}_proj`) and a FeedForward `ff`: Wan's and LTX's blocks,
    each stream of LTX-2's (`prefix="(audio_)?"`)."""
    b = f"{block}/{prefix}"
    return (
        *attn_rules(f"{b}attn1", "self_attn", "temporal"),
        (rf"{b}attn2/.*", ("cross_attn", "text_fusion")),
        (rf"{b}attn2/(to_[qkv]|add_[kv]_proj)", ("attn.qkv",)),
        (rf"{b}attn2/(to_[kv]|add_[kv]_proj)", ("cross_attn.kv",)),
        (rf"{b}attn2/to_out_0", ("attn.out",)),
        *ffn_rules(f"{b}{ff}"),
    )


def joint_block_rules(block: str, attn: str) -> RoleRules:
    """Roles inside an MM-DiT block with separate text weights (Flux's and HunyuanVideo's double
    stream, Mochi): every projection of the joint attention `attn` is `self_attn` + `text_fusion`,
    the text side being `add_{q,k,v}_proj` and `to_add_out`; FFNs `ff` and `ff_context`."""
    return (
        (rf"{block}/{attn}/.*", ("self_attn", "text_fusion")),
        (rf"{block}/{attn}/(to_[qkv]|add_[qkv]_proj)", ("attn.qkv",)),
        (rf"{block}/{attn}/(to_out_0|to_add_out)", ("attn.out",)),
        *ffn_rules(rf"{block}/ff(_context)?"),
    )


# The adaLN-continuous output head: `norm_out/linear` (its modulation) and `proj_out`.
ADA_OUTPUT_RULES: RoleRules = ((r"norm_out/linear", ("modulation", "final")), (r"proj_out", ("final",)))

_DOUBLE = r"transformer_blocks_\d+"
_SINGLE = r"single_transformer_blocks_\d+"
# Roles inside DoubleStreamBlock / SingleStreamBlock (Flux, HunyuanVideo), at their diffusers names.
STREAM_BLOCK_RULES: RoleRules = (
    (rf"{_DOUBLE}/.*", ("double_stream",)),
    (rf"{_DOUBLE}/norm1(_context)?/linear", ("modulation",)),
    *joint_block_rules(_DOUBLE, "attn"),
    (rf"{_SINGLE}/.*", ("single_stream",)),
    (rf"{_SINGLE}/norm/linear", ("modulation",)),
    (rf"{_SINGLE}/attn/to_[qkv]", ("attn.qkv", "self_attn", "text_fusion")),
    (rf"{_SINGLE}/proj_mlp", ("ffn.up",)),
    (rf"{_SINGLE}/proj_out", ("attn.out", "ffn.down", "text_fusion")),
)
