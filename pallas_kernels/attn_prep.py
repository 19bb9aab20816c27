"""Q and K for the quantized attention kernel in one pass each: rotation, smoothing, codes, scales.

What :func:`pallas_kernels.attention_ref.prepare` computes for Q and K, as one Pallas (Triton
lowered) program per (batch, 128-token tile, head): load the bf16 tile, rotate it by the
normalized Hadamard matrix of order ``head_dim`` (one bf16 dot with the +-1 Sylvester matrix:
exact products, float32 sums), subtract K's smoothing mean (its per-(batch, head) channel mean,
already rotated), take the tile's per-token (or, for K, per-tile) absmax and write int8 / e4m3
codes and float32 scales straight into the padded layouts the attention kernel reads.

Why: in a Wan2.1-1.3B step (32,760 tokens, 12 heads) XLA ran this preparation as a skinny
batched dot per rotated tensor (about 350 us each, 31 ms a step), reductions and pads: about
50 ms of a 453 ms step around a 284 ms attention kernel (``bench_e2e.py --profile``, H200,
``benchmarks/e2e-profile-nvidia-h200.json``). One pass reads each bf16 tensor once and writes
its codes once.

Same arithmetic as the reference up to float32 summation order: the reference rotates the
float32 values through one float32 dot and takes the mean of the rotated K; here the bf16 values
go through a bf16 dot (the same exact products) and the mean is rotated instead (linear, so equal
up to rounding). A code on a rounding boundary can move by one step (tests/test_attn_prep.py
bounds it).

Only calls without ``kv_lengths`` take it (every key valid, so smoothing is a plain mean); the
caller (:func:`pallas_kernels.attention.prepare_kernel_operands`) keeps the XLA path for the
others.

The Q/K prologue (``norm`` / ``rope``): a layer that hands attention its raw Q/K projections with
a :class:`jquant.models.attention.QKPrologue` (Wan's self-attention: RMSNorm across heads, then
the interleaved RoPE; ~165 us per tensor of XLA passes, 60 tensors a step) has it applied here,
on the tile already loaded. The tile is taken apart into its channel pairs, two ``[tile, D/2]``
halves in registers (a reshape and an unstack: no data moves), then ``y = bf16(x * r * w)`` with
the per-token inverse RMS ``r`` [B, T] from an XLA reduction over the whole H*D row (a tile
holds one head) and the weight's evens and odds, then the interleaved RoPE with one angle a pair,
``(e, o) -> bf16(e cos - o sin, o cos + e sin)`` (the tables' even columns: :func:`apply_rope`'s
tables repeat each angle over its pair), then the pairs are joined and rotated, smoothed and
quantized as above. The bf16 rounding points are the layer's, so the results differ from the
reference only by float32 summation order and FMA contraction. K's smoothing mean is the mean
of the prologue's K, an XLA reduction over K. Unless :data:`PROLOGUE_DEFAULT` (or
``JQUANT_BACKEND=pallas``), the caller applies the prologue in XLA and runs this kernel without
it (:func:`supports_prologue`).
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import _common, _quant
from pallas_kernels import attention_ref as ref

Array = jax.Array

#: ``JQUANT_BACKEND=pallas scripts/check_attention_gpu.py --prep --quick`` passed on an H200 at
#: 2ef1bdb (PREP_CASES incl. Wan2.1-1.3B's Q and K, at most 9.1e-7 of the codes one step apart,
#: scales within 3.6e-7; every quick attention case through it;
#: ``benchmarks/check_attention-prep-nvidia-h200.json``).
GPU_VERIFIED = True
#: The Q/K prologue in the kernel (``norm`` / ``rope`` of :func:`prep_tokens_pallas`). Its first
#: program (the pair swap as a bf16 dot with the signed swap matrix) passed ``check_attention_gpu.py
#: --prep`` on an H200 at 92dba37 but ran at 344 us a call in the step, against 96 us for the plain
#: pass: compiled for sm_90a it holds 255 registers and spills 292 bytes a thread
#: (``scripts/triton_resources.py``). The program now takes the pairs apart in registers instead
#: (185 registers, no spills): ``check_attention_gpu.py --prep`` passed on an H200 at 0a17808 (the
#: 14 operand-pass cases: at most 1.2e-6 of the codes one step apart, scales within 4.8e-7;
#: ``benchmarks/check_attention-prologue-pairs-nvidia-h200.json``).
PROLOGUE_GPU_VERIFIED = True
#: Whether a step applies the prologue in the kernel by default (:func:`supports_prologue`), once
#: verified. Not yet: with the first program the step was no faster (the two passes cost what the
#: XLA norm and RoPE passes they replace did; ``benchmarks/e2e-prologue-unpadded-nvidia-h200.json``,
#: ``benchmarks/notes.md``). The program without spills (``bench_qk_prep.py``, H200, 0a17808,
#: ``benchmarks/qk_prep-pairs-NVIDIA_H200.json``) takes 173-214 us a call for Q (the whole Q row
#: 215-257 us) and is slower than XLA's norm and RoPE plus the plain pass for K (326-350 against
#: 264-285 us), so it stays off.
PROLOGUE_DEFAULT = False
#: With the RoPE the programs of a token tile's heads run side by side (``heads_inner``): they
#: read the same cos / sin slice, which then comes from L2 after the first (the tables' even
#: columns, float32 [T, D/2] each, are 16.8 MB at Wan2.1-1.3B's 32,760 tokens: reread from DRAM
#: once per head otherwise, twice the traffic of the input itself). Not yet timed on a GPU
#: (``scripts/bench_qk_prep.py`` has both orders).
ROPE_HEADS_INNER = True
HEAD_DIMS = (64, 128)
TILES = (64, 128, 256)
WARPS = (4, 8, 16)
_NAME = "attn_prep"
_QFMT = {"int8": "int8", "fp8_e4m3": "fp8"}  # attention_ref's format names -> _quant's
ROLES = ("q", "k")  # which of the prologue's norm weights a tensor takes


class Prologue(Protocol):
    """What this module reads of a Q/K prologue: :class:`jquant.models.attention.QKPrologue`
    (the kernels do not import the ports, so it is named by its interface here)."""

    @property
    def norm(self) -> tuple[Array, Array] | None: ...

    @property
    def rope(self) -> tuple[Array, Array] | None: ...

    def check(self, q: Array, k: Array) -> None: ...

    def apply(self, q: Array, k: Array) -> tuple[Array, Array]: ...

    def apply_one(self, x: Array, role: str) -> Array: ...

    def inverse_rms(self, x: Array) -> Array: ...


def _kernel(
    x_ref,
    *refs,
    t: int,
    tile: int,
    d: int,
    fmt: str,
    hadamard: bool,
    smooth: bool,
    per_tile: bool,
    interpret: bool,
    norm: bool = False,
    weighted: bool = False,
    rope: bool = False,
    heads_inner: bool = False,
    heads: int = 1,
    tiles: int = 1,
):
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.triton as pltriton  # pylint: disable=g-import-not-at-top

    refs = list(refs)
    h_ref = refs.pop(0) if hadamard else None
    mean_ref = refs.pop(0) if smooth else None
    r_ref = refs.pop(0) if norm else None
    w_ref = refs.pop(0) if weighted else None
    cos_ref, sin_ref = (refs.pop(0), refs.pop(0)) if rope else (None, None)
    q_ref, s_ref = refs
    if heads_inner:  # grid (head, tile, batch): a tile's heads are launched side by side
        h, p, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    else:  # grid (batch, tile, head)
        b, p, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    # With several tiles a program (a loop Triton can software-pipeline), the +-1 matrix is read once.
    hmat = h_ref[...] if hadamard and tiles > 1 else None

    def one_tile(i):
        row_ok = i * tile + jnp.arange(tile) < t
        cols = pl.ds(h * d, d)
        x = pltriton.load(x_ref.at[b, pl.ds(i * tile, tile), cols], mask=row_ok[:, None], other=0.0)
        if rope:  # each channel pair (2i, 2i+1) as two [tile, D/2] halves, in registers
            x_even, x_odd = jnp.unstack(x.reshape(tile, d // 2, 2), axis=-1)
        if norm:  # the RMSNorm across heads: its row factor from XLA, rounded to bf16 as the layer's output
            r = pltriton.load(r_ref.at[b, pl.ds(i * tile, tile)], mask=row_ok, other=0.0)[:, None]
            if rope:
                n_half = heads * (d // 2)  # the evens' count, H*D/2
                w_even = pltriton.load(w_ref.at[pl.ds(h * (d // 2), d // 2)])[None, :] if weighted else 1.0
                w_odd = pltriton.load(w_ref.at[pl.ds(n_half + h * (d // 2), d // 2)])[None, :] if weighted else 1.0
                x_even = (x_even.astype(jnp.float32) * r * w_even).astype(jnp.bfloat16)
                x_odd = (x_odd.astype(jnp.float32) * r * w_odd).astype(jnp.bfloat16)
            else:
                y = x.astype(jnp.float32) * r
                if weighted:
                    y = y * pltriton.load(w_ref.at[cols])[None, :]
                x = y.astype(jnp.bfloat16)
        if rope:  # interleaved RoPE, one angle a pair: (e, o) -> (e cos - o sin, o cos + e sin)
            angles = (pl.ds(i * tile, tile), pl.ds(0, d // 2))
            cos = pltriton.load(cos_ref.at[angles], mask=row_ok[:, None], other=0.0)
            sin = pltriton.load(sin_ref.at[angles], mask=row_ok[:, None], other=0.0)
            e, o = x_even.astype(jnp.float32), x_odd.astype(jnp.float32)
            x_even = (e * cos + -o * sin).astype(jnp.bfloat16)
            x_odd = (o * cos + e * sin).astype(jnp.bfloat16)
            x = jnp.stack([x_even, x_odd], axis=-1).reshape(tile, d)
        if hadamard:  # bf16 x times +-1: exact products, float32 sums (attention_ref.rotate)
            z = jnp.dot(
                x.astype(jnp.bfloat16), (h_ref[...] if hmat is None else hmat), preferred_element_type=jnp.float32
            )
            z = z * np.float32(1.0 / math.sqrt(d))
        else:
            z = x.astype(jnp.float32)
        if smooth:
            z = z - pltriton.load(mean_ref.at[b, h, pl.ds(0, d)])[None, :]
        z = jnp.where(row_ok[:, None], z, 0.0)  # padded tokens: codes 0 (the kernel counts them)
        qmax = np.float32(ref.QMAX[fmt])
        if per_tile:
            scale = jnp.maximum(jnp.max(jnp.abs(z)), np.float32(ref._TINY)) / qmax  # pylint: disable=protected-access
            codes = _quant.to_q(z / scale, _QFMT[fmt], interpret)
            pltriton.store(s_ref.at[b, h, pl.ds(i, 1)], jnp.full((1,), scale, jnp.float32))
        else:
            scale = jnp.maximum(jnp.max(jnp.abs(z), axis=1), np.float32(ref._TINY)) / qmax  # pylint: disable=protected-access
            codes = _quant.to_q(z / scale[:, None], _QFMT[fmt], interpret)
            # padded tokens: scale 1 (codes 0), as the XLA path pads its scales
            pltriton.store(s_ref.at[b, h, pl.ds(i * tile, tile)], jnp.where(row_ok, scale, np.float32(1.0)))
        pltriton.store(q_ref.at[b, pl.ds(i * tile, tile), cols], codes)

    if tiles == 1:
        one_tile(p)
    else:
        lax.fori_loop(0, tiles, lambda j, c: (one_tile(p * tiles + j), c)[1], 0)


def check(x: Array, fmt: str, tokens_padded: int, tile: int) -> None:
    """Raises ValueError naming what is wrong with ``x`` [B, T, H, D] and the layout asked for."""
    if x.ndim != 4:
        raise ValueError(f"{_NAME}: x must be [B, T, H, D], got shape {x.shape}")
    if x.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"{_NAME}: head_dim must be one of {HEAD_DIMS}, got {x.shape[-1]}")
    if fmt not in ref.QMAX:
        raise ValueError(f"{_NAME}: format must be one of {sorted(ref.QMAX)}, got {fmt!r}")
    if tile not in TILES or tokens_padded % tile or tokens_padded < x.shape[1]:
        raise ValueError(
            f"{_NAME}: tokens_padded={tokens_padded} must be >= T={x.shape[1]} and a multiple of the"
            f" tile {tile} (one of {TILES})"
        )


def prep_tokens_pallas(
    x: Array,
    *,
    fmt: str,
    hadamard: bool,
    mean: Array | None = None,
    per_tile: bool = False,
    tokens_padded: int,
    tile: int = 128,
    interpret: bool = False,
    norm: tuple[Array, Array | None] | None = None,
    rope: tuple[Array, Array] | None = None,
    heads_inner: bool | None = None,
    warps: int | None = None,
    tiles_per_program: int = 1,
    stages: int = 1,
) -> tuple[Array, Array]:
    """``(codes [B, tokens_padded, H, D], scales)`` of ``x`` [B, T, H, D] (bf16).

    ``norm`` = (inverse RMS [B, T] float32 over each token's whole H*D row, weight [H*D] or
    None) and ``rope`` = (cos, sin) [T, D], each angle repeated over its pair as
    :func:`jquant.models.attention.apply_rope` takes them (the kernel reads the even columns),
    apply a Q/K prologue first, as the layer does:
    ``y = bf16(x * r * w)``, then ``bf16(y * cos + swap(y) * sin)`` with the interleaved pair
    swap ``(-y[2i+1], y[2i])`` (:class:`jquant.models.attention.QKPrologue`).
    ``hadamard``: rotate each head by the normalized Hadamard matrix first. ``mean`` [B, H, D]
    float32 (in the rotated basis; of the prologue's output when there is one): subtracted
    before quantizing (K smoothing). Scales are per token ``[B, H, tokens_padded]`` or, with
    ``per_tile``, one per ``tile`` tokens ``[B, H, tokens_padded / tile]`` (the kernel's per-tile
    K scales, ``tile = block_k``). Tokens past T get codes 0 and per-token scale 1.
    ``heads_inner``: launch the programs of one token tile's heads next to each other (grid
    ``(H, tiles, B)``; CUDA launches the first grid axis fastest) rather than every tile of one
    head in turn (``(B, tiles, H)``). The results are the same; what changes is what L2 holds:
    with the RoPE, each program reads a ``[tile, D/2]`` float32 slice of cos and sin (the tables'
    even columns), twice its bf16 input tile, the same slice for every head. None (default): heads inner exactly when
    there is a RoPE (:data:`ROPE_HEADS_INNER`).
    ``warps``: the programs' warps (None: 8 for a tile of >= 16,384 elements, else 4; more
    warps, fewer registers per thread for the prologue's float32 tiles).
    ``tiles_per_program`` (dividing ``tokens_padded / tile``): each program loops over that many
    consecutive tiles of its head, reading the +-1 matrix once, and with ``stages`` > 1 Triton
    prefetches the next tile's loads during this one's arithmetic (the one-tile program reads the
    matrix, 32 KB from L2, beside every 32 KB tile and overlaps nothing within a program).
    ``interpret=True`` runs Pallas's interpreter (CPU tests).
    """
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.triton as pltriton  # pylint: disable=g-import-not-at-top

    check(x, fmt, tokens_padded, tile)
    b, t, h, d = x.shape
    n_tiles = tokens_padded // tile
    extra = []
    if hadamard:
        signs = np.round(np.asarray(_hadamard_signs(d)))
        extra.append(jnp.asarray(signs, jnp.bfloat16))
    if mean is not None:
        if mean.shape != (b, h, d):
            raise ValueError(f"{_NAME}: mean must be [B, H, D] = {(b, h, d)}, got {mean.shape}")
        extra.append(mean.astype(jnp.float32))
    if (norm is not None or rope is not None) and x.dtype != jnp.bfloat16:
        raise ValueError(f"{_NAME}: the norm / RoPE prologue takes bf16 x (the layer's dtype), got {x.dtype}")
    weighted = False
    if norm is not None:
        r, w = norm
        if r.shape != (b, t):
            raise ValueError(f"{_NAME}: norm's inverse RMS must be [B, T] = {(b, t)}, got {r.shape}")
        extra.append(r.astype(jnp.float32))
        if w is not None:
            if w.shape != (h * d,):
                raise ValueError(f"{_NAME}: norm weight must be [H*D] = {(h * d,)}, got {w.shape}")
            w = w.astype(jnp.float32)
            # with the RoPE the kernel takes each pair's channels apart: the evens, then the odds
            extra.append(jnp.concatenate([w[0::2], w[1::2]]) if rope is not None else w)
            weighted = True
    if rope is not None:
        cos, sin = rope
        if cos.shape != (t, d) or sin.shape != (t, d):
            raise ValueError(f"{_NAME}: rope tables must be [T, D] = {(t, d)}, got cos {cos.shape} sin {sin.shape}")
        # one angle a pair (apply_rope's tables repeat each over its pair): the even columns
        extra += [cos[:, 0::2].astype(jnp.float32), sin[:, 0::2].astype(jnp.float32)]
    s_shape = (b, h, n_tiles if per_tile else tokens_padded)
    out_shape = (
        jax.ShapeDtypeStruct((b, tokens_padded, h * d), ref.CODE_DTYPES[fmt]),
        jax.ShapeDtypeStruct(s_shape, jnp.float32),
    )
    if warps is None:
        warps = 8 if tile * d >= 16384 else 4
    elif warps not in WARPS:
        raise ValueError(f"{_NAME}: warps must be one of {WARPS}, got {warps}")
    if heads_inner is None:
        heads_inner = ROPE_HEADS_INNER and rope is not None
    if tiles_per_program < 1 or n_tiles % tiles_per_program or stages < 1:
        raise ValueError(
            f"{_NAME}: tiles_per_program={tiles_per_program} must divide the {n_tiles} tiles and stages={stages}"
            " be >= 1"
        )
    n_programs = n_tiles // tiles_per_program
    call = pl.pallas_call(
        functools.partial(
            _kernel,
            t=t,
            tile=tile,
            d=d,
            fmt=fmt,
            hadamard=hadamard,
            smooth=mean is not None,
            per_tile=per_tile,
            interpret=interpret,
            norm=norm is not None,
            weighted=weighted,
            rope=rope is not None,
            heads_inner=heads_inner,
            heads=h,
            tiles=tiles_per_program,
        ),
        out_shape=out_shape,
        grid=(h, n_programs, b) if heads_inner else (b, n_programs, h),
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=warps, num_stages=stages),
    )
    codes, scales = call(x.reshape(b, t, h * d), *extra)
    return codes.reshape(b, tokens_padded, h, d), scales


def _hadamard_signs(d: int) -> np.ndarray:
    from jquant import hadamard as jh  # pylint: disable=g-import-not-at-top

    with jax.ensure_compile_time_eval():  # a constant, also when traced under jit
        return np.asarray(jh.hadamard_matrix(d, jnp.float32)) * math.sqrt(d)


def prologue_operands(
    x: Array, prologue: Prologue, role: str
) -> tuple[tuple[Array, Array] | None, tuple[Array, Array] | None]:
    """``(norm, rope)`` of :func:`prep_tokens_pallas` for ``x`` [B, T, H, D], q (``role="q"``) or
    k (``"k"``): the inverse RMS over each token's row (an XLA reduction of x) and the role's
    weight, and the RoPE tables."""
    if role not in ROLES:
        raise ValueError(f"{_NAME}: role must be one of {ROLES}, got {role!r}")
    norm = None
    if prologue.norm is not None:
        norm = (prologue.inverse_rms(x), prologue.norm[ROLES.index(role)])
    return norm, prologue.rope


def supports_prologue(prologue: Prologue | None) -> bool:
    """Whether the kernel applies ``prologue`` itself: the prologue kernel verified on the GPU
    (:data:`PROLOGUE_GPU_VERIFIED`) and the faster of the two (:data:`PROLOGUE_DEFAULT`), or
    ``JQUANT_BACKEND=pallas``. Otherwise the caller applies it in XLA and runs the kernel without it."""
    return prologue is not None and _common.kernel_enabled(PROLOGUE_GPU_VERIFIED and PROLOGUE_DEFAULT)


def key_mean(k: Array, hadamard: bool) -> Array:
    """K's per-(batch, head) channel mean over all tokens [B, H, D] float32, in the rotated
    basis when ``hadamard`` (the rotation is linear: rotating the mean rotates every token's
    share of it)."""
    mean = jnp.mean(k.astype(jnp.float32), axis=1)
    return ref.rotate(mean) if hadamard else mean


def supports(q: Array, k: Array, kv_lengths) -> bool:
    """True where :func:`pallas_kernels.attention.prepare_kernel_operands` may use the kernel:
    a GPU, the kernel verified (or ``JQUANT_BACKEND=pallas``), bf16 Q and K, a head dim of
    :data:`HEAD_DIMS`, no ``kv_lengths``."""
    return (
        _common.on_gpu()
        and _common.kernel_enabled(GPU_VERIFIED)
        and kv_lengths is None
        and q.dtype == jnp.bfloat16
        and k.dtype == jnp.bfloat16
        and q.shape[-1] in HEAD_DIMS
        and q.shape[1] > 0
        and k.shape[1] > 0
    )


#: Tolerances of :func:`compare`: float32 sums in another order move a code on a rounding
#: boundary by one step and a scale by a few ulp.
MAX_CODES_DIFFERING = 1e-3
MAX_SCALE_REL = 1e-5


def reference_tokens(
    x: Array,
    *,
    fmt: str,
    hadamard: bool,
    smooth: bool,
    per_tile: bool,
    tile: int,
    prologue: Prologue | None = None,
    role: str = "q",
) -> tuple[Array, Array]:
    """What :func:`prep_tokens_pallas` computes, by :mod:`pallas_kernels.attention_ref` (unpadded):
    codes [B, T, H, D] and scales [B, H, T] or [B, H, ceil(T / tile)]. ``prologue``: applied to x
    as q or k (``role``) first, by the ports' own code (``prologue.apply_one``)."""
    b, t = x.shape[:2]
    if prologue is not None:
        x = prologue.apply_one(x, role)
    xf = x.astype(jnp.float32)
    if hadamard:
        xf = ref.rotate(xf)
    if smooth:
        xf = ref.smooth_keys(xf, ref.key_validity(b, t, None))
    if per_tile:
        return ref.quantize_key_blocks(xf, fmt, tile)
    codes, scale = ref.quantize_tokens(xf, fmt)
    return codes, jnp.transpose(scale, (0, 2, 1))


def compare(
    x: Array,
    *,
    fmt: str,
    hadamard: bool,
    smooth: bool,
    per_tile: bool,
    tile: int = 128,
    interpret: bool = False,
    prologue: Prologue | None = None,
    role: str = "q",
    heads_inner: bool | None = None,
) -> dict:
    """The kernel against :func:`reference_tokens` on ``x``: :func:`judge`'s verdict.
    ``prologue``: x is a raw projection, the kernel applies the prologue as q or k (``role``).
    ``heads_inner``: the kernel's launch order (:func:`prep_tokens_pallas`)."""
    t = x.shape[1]
    tp = _common.round_up(t, tile)
    norm, rope = (None, None) if prologue is None else prologue_operands(x, prologue, role)
    prepared = x if prologue is None else prologue.apply_one(x, role)
    mean = key_mean(prepared, hadamard) if smooth else None
    codes, scales = prep_tokens_pallas(
        x,
        fmt=fmt,
        hadamard=hadamard,
        mean=mean,
        per_tile=per_tile,
        tokens_padded=tp,
        tile=tile,
        interpret=interpret,
        norm=norm,
        rope=rope,
        heads_inner=heads_inner,
    )
    rc, rs = reference_tokens(
        x, fmt=fmt, hadamard=hadamard, smooth=smooth, per_tile=per_tile, tile=tile, prologue=prologue, role=role
    )
    return judge(codes, scales, rc, rs, fmt)


def judge(
    codes: Array,
    scales: Array,
    ref_codes: Array,
    ref_scales: Array,
    fmt: str,
    *,
    max_differing: float = MAX_CODES_DIFFERING,
    max_scale_rel: float = MAX_SCALE_REL,
) -> dict:
    """:func:`prep_tokens_pallas`'s padded ``(codes, scales)`` against :func:`reference_tokens`'
    unpadded ones: the fraction of codes that differ, the largest difference in format steps,
    the scales' relative error, whether padded tokens are zero, and ``ok`` (within
    ``max_differing`` / one step / ``max_scale_rel``)."""
    t = ref_codes.shape[1]
    c = np.asarray(codes[:, :t].astype(jnp.float32))
    r = np.asarray(ref_codes.astype(jnp.float32))
    if fmt == "int8":
        steps = np.abs(c - r)
    else:  # one e4m3 step at the larger magnitude: 2^(floor(log2|v|) - 3), subnormals 2^-9
        mag = np.maximum(np.abs(c), np.abs(r))
        ulp = np.exp2(np.floor(np.log2(np.maximum(mag, 2.0**-6))) - 3)
        steps = np.abs(c - r) / ulp
    rs = np.asarray(ref_scales)
    s = np.asarray(scales[..., : rs.shape[-1]])
    out = {
        "codes_differing": float((c != r).mean()),
        "max_code_steps": float(steps.max()) if steps.size else 0.0,
        "scale_rel": float(np.max(np.abs(s / rs - 1.0))) if rs.size else 0.0,
        "pad_codes_zero": bool((np.asarray(codes[:, t:].astype(jnp.float32)) == 0).all()),
        "finite": bool(np.isfinite(s).all()),
    }
    out["ok"] = (
        out["codes_differing"] <= max_differing
        and out["max_code_steps"] <= 1.0 + 1e-6
        and out["scale_rel"] <= max_scale_rel
        and out["pad_codes_zero"]
        and out["finite"]
    )
    return out
