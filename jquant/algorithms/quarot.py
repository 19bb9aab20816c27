"""QuaRot for diffusion transformers: exact rotations before quantization.

A rotation ``Q`` (orthogonal, ``Q Q^T = I``) on a linear layer's input leaves the float
output unchanged, ``(x Q)(Q^T W) = x W``, while it spreads activation outliers over all
channels so 4-bit activations and weights lose less. In an LLM, QuaRot rotates the whole
residual stream once, offline, folding ``Q`` through RMSNorm. A DiT cannot: its adaLN
modulation ``norm(x) * (1 + scale(t)) + shift(t)`` multiplies the stream by a
*time-dependent diagonal*, and ``Q^T diag(a) Q`` is diagonal only for constant ``a``; the
gates ``x + gate(t) * f(x)`` do the same on the write side. So (derivation in
docs/quarot.md):

* **online** (:func:`rotate_input`): every quantized linear fed by the modulated stream
  (q/k/v, FFN up), and the FFN down projection (behind a GELU), get an online Hadamard on
  their input (aux ``hadamard``; optional random signs in ``input_mul`` make it an RHT),
  with the kernel pre-rotated offline, ``W' = H^T D W``. The attention output projection
  gets the same (or only the offline head-wise rotation below). ``online_block=b`` makes
  ``H`` block-diagonal (order-``b`` Hadamards on consecutive channel groups, still
  orthogonal and exact): the rotation one producer tile of ``b`` channels can apply in its
  epilogue, instead of a full-width pass (docs/quarot.md, "Block-diagonal online rotations").
* **offline, head-wise V/O** (:func:`rotate_heads`): attention is linear in V per head, so
  ``W_v' = W_v diag(R, ..., R)`` and ``W_o' = diag(R, ..., R)^T W_o`` is exact for any
  orthogonal ``R`` [head_dim, head_dim] (shared by all heads, so grouped K/V heads work).
* **offline Q/K** (:func:`rotate_qk`): ``(q R)(k R)^T = q k^T`` (handbook eq. 29) leaves
  attention scores unchanged, foldable into ``W_q``, ``W_k`` only when nothing but
  R-commuting maps sit between the projection and the dot product: no RoPE (a rotation
  commutes with RoPE only if it acts inside each RoPE plane), no affine q/k norm (Wan's
  RMSNorm across heads has a learned scale). Otherwise apply it online *after* RoPE with
  :func:`rotate_qk_online` (useful for quantized attention, not for the linears).

All functions are pure ``variables -> variables`` rewrites (linen variables with the
``"jquant"`` aux collection) and exact in float; quantize afterwards (RTN, GPTQ, ...).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jquant.algorithms.linear_tree import (
    Variables,
    float_kernel,
    get_aux,
    get_bias,
    get_kernel,
    linear_paths,
    update_layer,
)
from jquant.hadamard import apply_block_hadamard, hadamard_matrix, random_hadamard, rht_signs
from jquant.nn import hadamard_entry
from jquant.transform import Context, Transform

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST


# --- online input rotation -------------------------------------------------------------------
def rotate_input(variables: Variables, path: str, seed: int | None = 0, block: int | None = None) -> dict:
    """Online (randomized) Hadamard on one layer's input; the kernel absorbs ``(D H)^T``.

    The layer then computes ``((x * m * d) H) (H^T D W)``: aux ``hadamard`` is set, the
    signs ``d`` (``seed``; ``None`` for a plain Hadamard) are multiplied into
    ``input_mul`` ``m``, and an existing low-rank branch ``A`` becomes ``H^T D A``.
    ``block``: ``H = blockdiag(H_b, ..., H_b)`` (``b`` must divide the input width); None,
    or ``b >=`` the width, is the full-width ``H`` (aux entry in the older scalar format).
    """
    w = float_kernel(variables, path, "rotate_input")
    aux = get_aux(variables, path)
    if "hadamard" in aux:
        raise ValueError(f"{path}: already has an online Hadamard")
    k = w.shape[0]
    block = None if block is None or block >= k else _check_block(block, f"{path}: online_block")
    if block is not None and k % block:
        raise ValueError(f"{path}: input width {k} is not a multiple of online_block {block}")
    d = jnp.ones((k,), jnp.float32) if seed is None else rht_signs(k, seed)

    def rot(m: Array) -> Array:
        return apply_block_hadamard(d[:, None] * m.astype(jnp.float32), block, axis=0).astype(m.dtype)

    new_aux: dict[str, Any] = {"hadamard": hadamard_entry(block)}
    if seed is not None:
        new_aux["input_mul"] = d if "input_mul" not in aux else jnp.asarray(aux["input_mul"], jnp.float32) * d
    if "lowrank_a" in aux:
        new_aux["lowrank_a"] = rot(aux["lowrank_a"])
    return update_layer(variables, path, kernel=rot(w), aux=new_aux)


def _check_block(block: Any, name: str) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 2:
        raise ValueError(f"{name} must be an integer >= 2 or None (full width), got {block!r}")
    return block


# --- offline head-wise rotations ---------------------------------------------------------------
def _rotate_out_cols(m: Array, r: Array, where: str) -> Array:
    """``m [..., H*hd] @ diag(r, ..., r)``."""
    hd = r.shape[0]
    if m.shape[-1] % hd:
        raise ValueError(f"{where}: output width {m.shape[-1]} is not a multiple of head_dim {hd}")
    mh = m.astype(jnp.float32).reshape(*m.shape[:-1], -1, hd)
    return jnp.matmul(mh, r, precision=_HI).reshape(m.shape).astype(m.dtype)


def _rotate_in_rows(w: Array, r: Array, rows: slice, where: str) -> Array:
    """``diag(r, ..., r)^T @ w[rows]`` (other rows untouched)."""
    hd = r.shape[0]
    part = w[rows].astype(jnp.float32)
    if part.shape[0] % hd:
        raise ValueError(f"{where}: input rows {part.shape[0]} are not a multiple of head_dim {hd}")
    new = jnp.einsum("ji,hjn->hin", r, part.reshape(-1, hd, w.shape[1]), precision=_HI).reshape(part.shape)
    return w.at[rows].set(new.astype(w.dtype))


def _check_rotation(r: Array, name: str) -> Array:
    r = jnp.asarray(r, jnp.float32)
    if r.ndim != 2 or r.shape[0] != r.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {r.shape}")
    r64 = np.asarray(r, np.float64)  # on the host in float64: a GPU's default f32 matmul (TF32) is too coarse
    if not np.allclose(r64 @ r64.T, np.eye(r.shape[0]), atol=1e-4):
        raise ValueError(f"{name} is not orthogonal (R R^T != I)")
    return r


def _producer(variables: dict, path: str, r: Array, what: str) -> dict:
    """Rotate a producer's output columns (kernel, bias, low-rank B) by diag(r)."""
    w = float_kernel(variables, path, what)
    aux = get_aux(variables, path)
    bias = get_bias(variables, path)
    new_aux = {"lowrank_b": _rotate_out_cols(aux["lowrank_b"], r, path)} if "lowrank_b" in aux else None
    return update_layer(
        variables,
        path,
        kernel=_rotate_out_cols(w, r, path),
        bias=None if bias is None else _rotate_out_cols(bias, r, path),
        aux=new_aux,
    )


def _parse_consumer(spec: str | tuple[str, int, int]) -> tuple[str, slice]:
    if isinstance(spec, str):
        return spec, slice(None)
    path, start, stop = spec
    return path, slice(start, stop)


def rotate_heads(
    variables: Variables, v_paths: Sequence[str], o_paths: Sequence[str | tuple[str, int, int]], r: Array
) -> dict:
    """Exact offline V/O rotation: ``W_v' = W_v diag(r,...)``, ``W_o' = diag(r,...)^T W_o``.

    ``v_paths``: every value projection whose heads the attention mixes into the output
    (self-attention ``to_v``; a joint/added branch's ``add_v_proj`` too). ``o_paths``: the
    output projections reading the attention output; ``(path, start, stop)`` restricts it to
    rows ``start:stop`` (e.g. Flux single blocks, whose ``proj_out`` reads
    ``concat(attn, mlp)``). An output projection must not carry aux yet (rotate heads
    first, then add online rotations).
    """
    r = _check_rotation(r, "head rotation r")
    out = dict(variables)
    for path in v_paths:
        out = _producer(out, path, r, "rotate_heads")
    for spec in o_paths:
        path, rows = _parse_consumer(spec)
        w = float_kernel(out, path, "rotate_heads")
        if get_aux(out, path):
            raise ValueError(
                f"{path}: rotate_heads must run before aux ({sorted(get_aux(out, path))}) is added to the output projection"
            )
        out = update_layer(out, path, kernel=_rotate_in_rows(w, r, rows, path))
    return out


def rotate_qk(variables: Variables, q_paths: Sequence[str], k_paths: Sequence[str], r: Array) -> dict:
    """Offline Q/K rotation ``W_q' = W_q diag(r,...)``, ``W_k' = W_k diag(r,...)``.

    Exact (scores ``(q R)(k R)^T = q k^T``) only without RoPE and without an affine q/k
    norm between projection and scores; with them use :func:`rotate_qk_online` after RoPE.
    """
    r = _check_rotation(r, "q/k rotation r")
    out = dict(variables)
    for path in (*q_paths, *k_paths):
        out = _producer(out, path, r, "rotate_qk")
    return out


def rotate_qk_online(q: Array, k: Array, r: Array) -> tuple[Array, Array]:
    """``(q R, k R)`` over the head dim of [B, T, H, hd] tensors: scores unchanged; apply it
    after RoPE (and q/k norms) in a quantized attention."""
    return jnp.matmul(q, r.astype(q.dtype), precision=_HI), jnp.matmul(k, r.astype(k.dtype), precision=_HI)


def head_rotation(head_dim: int, seed: int | None = 0) -> Array:
    """The default head rotation: randomized Hadamard ``diag(s) H`` (plain ``H`` for ``seed=None``)."""
    return hadamard_matrix(head_dim) if seed is None else random_hadamard(head_dim, seed)


# --- the method ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QuaRotConfig:
    """Which rotations QuaRot applies.

    Attributes:
      online: regex over module paths of layers that get an online (R)Hadamard input.
      skip: regex of layers never rotated online (e.g. the adaLN modulation, embedders).
      vo_groups: ``((v paths...), (o paths or (path, start, stop)...))`` per attention.
      qk_groups: ``((q paths...), (k paths...))`` per attention (only where exact, see
        :func:`rotate_qk`).
      head_dim: head size for the head-wise rotations.
      seed: seed of the random signs; ``randomized=False`` uses plain Hadamards.
      online_block: block order of a block-diagonal online rotation (128, 256: one producer
        tile); None rotates over the full input width. Layers narrower than the block get
        the full width.
    """

    online: str = ".*"
    skip: str | None = None
    vo_groups: tuple = ()
    qk_groups: tuple = ()
    head_dim: int = 64
    seed: int = 0
    randomized: bool = True
    online_block: int | None = None

    def __post_init__(self) -> None:
        if self.online_block is not None:
            _check_block(self.online_block, "QuaRotConfig.online_block")


def online_paths(variables: Variables, config: QuaRotConfig) -> list[str]:
    rx, skip = re.compile(config.online), re.compile(config.skip) if config.skip else None
    return [p for p in linear_paths(variables) if rx.search(p) and not (skip and skip.search(p))]


def quarot(variables: Variables, stats: Any = None, config: QuaRotConfig = QuaRotConfig()) -> dict:
    """Apply QuaRot's rotations (head-wise V/O and Q/K first, then online inputs).

    Data-free: ``stats`` is accepted for a uniform method signature and ignored. The
    result is the float model rewritten exactly; quantize it next.
    """
    del stats
    out = dict(variables)
    seed = config.seed if config.randomized else None
    r = head_rotation(config.head_dim, seed)
    for v_paths, o_paths in config.vo_groups:
        out = rotate_heads(out, v_paths, o_paths, r)
    for i, (q_paths, k_paths) in enumerate(config.qk_groups):
        rq = head_rotation(config.head_dim, None if seed is None else seed + 1 + i)
        out = rotate_qk(out, q_paths, k_paths, rq)
    paths = online_paths(out, config)
    if not paths and not config.vo_groups and not config.qk_groups:
        raise ValueError(
            f"quarot: no layer matches online={config.online!r} (skip={config.skip!r}); layers: {linear_paths(out)}"
        )
    for path in paths:
        out = rotate_input(out, path, seed, config.online_block)
    return out


# --- plans for the ported DiTs ---------------------------------------------------------------------
ONLINE_ROLES = frozenset({"attn.qkv", "attn.out", "ffn.up", "ffn.down"})
NEVER_ROTATED = frozenset({"modulation", "embedder", "final"})
_V_NAMES, _O_NAMES = ("to_v", "add_v_proj"), ("to_out_0", "to_add_out", "to_out")


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _child(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _attentions(mods: Mapping[str, Any], name: str) -> list[str]:
    """Module paths (``""`` for the root) of the attentions holding a layer ``name``."""
    return sorted({_parent(p) for p in mods if p.rsplit("/", 1)[-1] == name})


def dit_plan(
    params: Any,
    roles: Mapping[str, Sequence[str]],
    head_dim: int,
    *,
    seed: int = 0,
    heads_offline: bool = True,
    fold_qk: bool = False,
    online_block: int | None = None,
    skip_roles: Collection[str] = (),
) -> QuaRotConfig:
    """QuaRot for a ported DiT (diffusers layer names), from its layer roles.

    Online RHT on every linear with an attention/FFN role (q/k/v, output projections, FFN
    up/down, cross-attention K/V); never on modulation, embedders or the output head.
    Head-wise V/O pairs per attention module: ``to_v`` (+ ``add_v_proj``: Wan I2V's image
    branch, Flux's text stream) with ``to_out_0`` (+ ``to_add_out``; ``to_out`` where the
    output projection is one linear, as in :mod:`jquant.algorithms.toy`'s block); an attention
    without its own output projection (Flux/HunyuanVideo single-stream blocks) pairs with the
    block's ``proj_out`` rows ``0:inner`` (the attention half of ``concat(attn, mlp)``).
    ``fold_qk`` adds a Q/K rotation per attention (``to_q``/``to_k``, + ``add_q_proj``/
    ``add_k_proj``): exact only for models without RoPE and without affine q/k norms (the
    original DiT), see :func:`rotate_qk`.
    ``online_block``: :attr:`QuaRotConfig.online_block`. ``skip_roles``: roles whose layers
    get no online rotation (``{"ffn.down"}`` for a mixed recipe that smooths that input
    instead).
    ``roles``: ``models.layer_roles(config, params)`` (kernel path -> roles).
    """
    mods = {k[: -len("/kernel")]: set(r) for k, r in roles.items()}
    never = NEVER_ROTATED | set(skip_roles)
    online = sorted(p for p, r in mods.items() if r & ONLINE_ROLES and not r & never)
    groups = []
    for attn in _attentions(mods, "to_v"):
        v = tuple(_child(attn, n) for n in _V_NAMES if _child(attn, n) in mods)
        o: tuple = tuple(_child(attn, n) for n in _O_NAMES if _child(attn, n) in mods)
        if not o:
            proj_out = _child(_parent(attn), "proj_out")
            if proj_out not in mods:
                raise ValueError(f"dit_plan: attention {attn!r} has no output projection (to_out_0 / block proj_out)")
            inner = get_kernel({"params": params}, v[0]).shape[1]
            o = ((proj_out, 0, inner),)
        groups.append((v, o))
    qk = []
    if fold_qk:
        for attn in _attentions(mods, "to_q"):
            if any(k.startswith(_child(attn, "norm_")) for k in _flat_keys(params)):
                raise ValueError(
                    f"dit_plan: {attn} has q/k norm parameters; folding the Q/K rotation would not be exact"
                )
            q = tuple(_child(attn, n) for n in ("to_q", "add_q_proj") if _child(attn, n) in mods)
            k = tuple(_child(attn, n) for n in ("to_k", "add_k_proj") if _child(attn, n) in mods)
            qk.append((q, k))
    pattern = "^(?:" + "|".join(re.escape(p) for p in online) + ")$" if online else "(?!)"
    return QuaRotConfig(
        online=pattern,
        vo_groups=tuple(groups) if heads_offline else (),
        qk_groups=tuple(qk),
        head_dim=head_dim,
        seed=seed,
        online_block=online_block,
    )


def _flat_keys(params: Any) -> list[str]:
    return list(traverse_util.flatten_dict(dict(params), sep="/"))


#: ``online_block="auto"`` on a GPU: blocks of 128, the rotation the fused producers apply (the
#: norm producer for Q/K/V and FFN-up, the FFN-up epilogue for FFN-down) and the block quantizer
#: otherwise. Quality: within the issue-26 targets of the full width (docs/quarot.md, "Block-diagonal
#: online rotations"); speed: the Wan2.1-1.3B W8A8 step 600.5 -> 524.4 ms on an H200 with the O
#: projection's rotation offline (benchmarks/e2e-quarot-nvidia-h200.json).
GPU_ONLINE_BLOCK = 128


def resolve_online_block(online_block: int | str | None) -> int | None:
    """``"auto"``: :data:`GPU_ONLINE_BLOCK` where JAX's default backend is a GPU, full width
    (None) elsewhere; an int or None as given."""
    if online_block == "auto":
        return GPU_ONLINE_BLOCK if jax.default_backend() == "gpu" else None
    return online_block


def transform(
    seed: int = 0, heads: bool = True, online_block: int | str | None = None, skip_roles: Collection[str] = ()
) -> Transform:
    """QuaRot (:func:`jquant.algorithms.quarot.dit_plan`): head-wise V/O rotations (offline,
    exact) and online randomized Hadamards on every attention/FFN input; never on the
    modulation, embedders or the head. ``online_block``: block-diagonal online rotations of
    that order (None: full width; ``"auto"``: :func:`resolve_online_block` when the transform
    runs, block 128 on a GPU); ``skip_roles``: roles left unrotated. Data-free; exact in float."""
    if online_block is not None and online_block != "auto":
        _check_block(online_block, "quarot.transform: online_block")
    skip = tuple(sorted(skip_roles))

    def fn(v: Variables, ctx: Context) -> Variables:
        plan = dit_plan(
            v["params"],
            ctx.roles,
            ctx.head_dim,
            seed=seed,
            heads_offline=heads,
            online_block=resolve_online_block(online_block),
            skip_roles=skip,
        )
        return quarot(v, None, plan)

    name = "quarot" + (f"[block {online_block}]" if online_block else "") + (f"[no {','.join(skip)}]" if skip else "")
    return Transform(name, fn)
