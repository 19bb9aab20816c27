"""Quantized attention in plain JAX: operand preparation and the reference.

``quant_attention_reference(q, k, v, ...)`` has the signature of the Mosaic GPU
kernel (:mod:`pallas_kernels.attention`) and computes what it computes, with an
exact softmax instead of the kernel's online one:

1. optional Hadamard rotation of Q and K along ``head_dim`` (``(q H)(k H)^T =
   q k^T`` for an orthogonal ``H``; it spreads outlier channels before rounding);
2. K smoothing: the mean of K over the valid tokens of each (batch, head) is
   subtracted. ``q . (k_j - mean) = q . k_j - q . mean`` shifts every score of a
   query by the same amount, which softmax ignores: exact in float;
3. Q quantized per token (one scale per query row and head), K per token too
   (``k_scales="token"``) or per block of ``block_k`` tokens per head (``"block"``), to
   int8 or fp8 e4m3 (symmetric absmax). Smoothing leaves keys near the mean with small
   residuals, which one scale per block rounds coarsely: on the bundled video model
   per-token K scales gained 2.4 dB of sampling PSNR over per-block ones;
4. scores = the exact integer (int8) or exact-product fp32 (fp8) dot product of the
   codes times both scales; masked keys (causal, or past ``kv_lengths``) get -inf;
5. softmax in fp32;
6. P V with P and V in fp8 e4m3 (P in [0, 1] scaled by 448, V one scale per
   channel per head) or in bf16, accumulated in fp32; output bf16. With fp8, V is
   smoothed first (``smooth_v``): its per-channel mean over the valid tokens is
   subtracted before rounding and added to the output after (exact, since each row of
   the normalized P sums to 1), so the rounding errors of P and V scale with V's
   variation around its mean instead of its magnitude.

Models that no kernel runs, for comparisons: :func:`per_tensor_fp8_attention` (cuDNN's FP8
numerics), :func:`truncating_accumulation` (an fp8 MMA's accumulator) and
:func:`integer_pv_attention` (P V on 8-bit integers, ``STUDY_PV_FORMATS``).

Layout everywhere: ``[batch, tokens, heads, head_dim]``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

QK_FORMATS: tuple[str, ...] = ("int8", "fp8_e4m3")
K_SCALES: tuple[str, ...] = ("token", "block")
PV_FORMATS: tuple[str, ...] = ("fp8_e4m3", "bf16")
HEAD_DIMS: tuple[int, ...] = (64, 128)
#: ``sample_inputs`` kinds: standard normal, DiT-like outliers, outliers with sharp softmax rows.
INPUT_KINDS: tuple[str, ...] = ("random", "realistic", "sharp")
CODE_DTYPES = {"int8": jnp.int8, "fp8_e4m3": jnp.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}
#: P lies in [0, 1]; it is multiplied by this before the e4m3 cast (e4m3's largest
#: finite value), and the product P V is divided by it again.
P_SCALE = 448.0
#: Not a kernel format: :func:`integer_pv_attention`'s P V (P and V as 8-bit integers), an
#: emulation that :func:`prepare` and :func:`attend_prepared` accept for studies only.
STUDY_PV_FORMATS: tuple[str, ...] = ("int8",)
#: :func:`integer_pv_attention`'s P in [0, 1] is multiplied by one of these and rounded: 255 for an
#: unsigned byte (or a signed one offset by -128, corrected with V's column sums), 127 for a
#: signed byte as it is (Mosaic GPU's wgmma takes s8 only).
P_LEVELS: tuple[int, ...] = (255, 127)
LOG2E = math.log2(math.e)
_TINY = 1e-30


def check_inputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    kv_lengths,
    qk_format: str,
    pv_format: str,
    block_q: int,
    block_k: int,
    k_scales: str = "token",
) -> None:
    """Raises ValueError naming the argument when the inputs do not fit the signature."""
    name = "quant_attention"
    for arg, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name}: {arg} must be [batch, tokens, heads, head_dim], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: {arg} must be floating point, got {x.dtype}")
    b, tq, h, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{name}: k {k.shape} and v {v.shape} must have one shape")
    if k.shape[0] != b or k.shape[2:] != (h, d):
        raise ValueError(f"{name}: k {k.shape} must share batch, heads and head_dim with q {q.shape}")
    if d not in HEAD_DIMS:
        raise ValueError(f"{name}: head_dim must be one of {HEAD_DIMS}, got {d}")
    if qk_format not in QK_FORMATS:
        raise ValueError(f"{name}: qk_format={qk_format!r}, expected one of {QK_FORMATS}")
    if pv_format not in PV_FORMATS:
        raise ValueError(f"{name}: pv_format={pv_format!r}, expected one of {PV_FORMATS}")
    if causal and tq != k.shape[1]:
        raise ValueError(f"{name}: causal=True needs as many queries as keys, got q {tq} and k {k.shape[1]} tokens")
    if block_q <= 0 or block_q % 64:
        raise ValueError(f"{name}: block_q must be a positive multiple of 64, got {block_q}")
    if block_k <= 0 or block_k % 64:
        raise ValueError(f"{name}: block_k must be a positive multiple of 64, got {block_k}")
    if k_scales not in K_SCALES:
        raise ValueError(f"{name}: k_scales={k_scales!r}, expected one of {K_SCALES}")
    if kv_lengths is not None:
        if jnp.ndim(kv_lengths) != 1 or jnp.shape(kv_lengths)[0] != b:
            raise ValueError(f"{name}: kv_lengths must be [batch]={b} key counts, got shape {jnp.shape(kv_lengths)}")
        try:
            lengths = np.asarray(kv_lengths)
        except jax.errors.TracerArrayConversionError:
            lengths = None  # traced: checked by the caller's data
        if lengths is not None and ((lengths < 1).any() or (lengths > k.shape[1]).any()):
            raise ValueError(f"{name}: kv_lengths must lie in [1, {k.shape[1]}], got {lengths.tolist()}")


def key_validity(batch: int, tokens: int, kv_lengths) -> jax.Array:
    """Boolean [batch, tokens]: True where a key exists (all True without ``kv_lengths``)."""
    pos = jnp.arange(tokens, dtype=jnp.int32)[None, :]
    if kv_lengths is None:
        return jnp.ones((batch, tokens), bool)
    return pos < jnp.asarray(kv_lengths, jnp.int32)[:, None]


def rotate(x: jax.Array) -> jax.Array:
    """Normalized Hadamard rotation along head_dim (orthogonal: scores are unchanged); fp32 out.

    Power-of-two head dims (64, 128) go through one dense matmul with the +-1 Sylvester matrix
    (exact in bf16) and fp32 accumulation, scaled by 1/sqrt(D) after: one pass over ``x`` on the
    GPU, where XLA ran the O(D log D) butterfly as log2(D) passes (1.5 ms of 10.4 ms at 12 heads x
    32,760 tokens on an H200, benchmarks/attention-nvidia-h200.json). Other widths use
    :func:`jquant.hadamard.apply_hadamard`.
    """
    from jquant import hadamard  # pylint: disable=g-import-not-at-top

    d = x.shape[-1]
    if d & (d - 1):
        return hadamard.apply_hadamard(x.astype(jnp.float32), axis=-1)
    signs = jnp.round(hadamard.hadamard_matrix(d, jnp.float32) * math.sqrt(d))
    low = x.dtype in (jnp.bfloat16, jnp.float16)
    # +-1 times a bf16/f16 value is exact and the accumulation is fp32, so the default precision is
    # exact there (HIGHEST would send XLA to an fp32 GEMM); fp32 inputs need HIGHEST.
    y = lax.dot_general(
        x if low else x.astype(jnp.float32),
        signs.astype(x.dtype if low else jnp.float32),
        (((x.ndim - 1,), (0,)), ((), ())),
        precision=lax.Precision.DEFAULT if low else lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    return y * (1.0 / math.sqrt(d))


def smooth_keys(k: jax.Array, valid: jax.Array) -> jax.Array:
    """K minus its mean over the valid tokens of each (batch, head); invalid tokens -> 0."""
    k = k.astype(jnp.float32)
    w = valid[:, :, None, None].astype(jnp.float32)
    mean = jnp.sum(k * w, axis=1, keepdims=True) / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
    return (k - mean) * w


def encode(x: jax.Array, scale: jax.Array, fmt: str) -> jax.Array:
    """Codes of ``x / scale`` in ``fmt`` (int8: round to nearest, clip to ±127)."""
    y = x / scale
    if fmt == "int8":
        return jnp.clip(jnp.round(y), -127, 127).astype(jnp.int8)
    return jnp.clip(y, -448.0, 448.0).astype(jnp.float8_e4m3fn)


def quantize_tokens(x: jax.Array, fmt: str) -> tuple[jax.Array, jax.Array]:
    """Per-token symmetric quantization of x [B, T, H, D]: codes and scales [B, T, H]."""
    x = x.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(x), axis=-1), _TINY) / QMAX[fmt]
    return encode(x, scale[..., None], fmt), scale


def quantize_key_blocks(k: jax.Array, fmt: str, block_k: int) -> tuple[jax.Array, jax.Array]:
    """Per-block quantization of k [B, T, H, D]: one scale per ``block_k`` tokens per head.

    Blocks start at token 0. Returns codes [B, T, H, D] and scales [B, H, ceil(T / block_k)].
    """
    b, t, h, d = k.shape
    nkb = -(-t // block_k)
    kp = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, nkb * block_k - t), (0, 0), (0, 0)))
    blocks = kp.reshape(b, nkb, block_k, h, d)
    scale = jnp.maximum(jnp.max(jnp.abs(blocks), axis=(2, 4)), _TINY) / QMAX[fmt]  # [B, nkb, H]
    codes = encode(blocks, scale[:, :, None, :, None], fmt).reshape(b, nkb * block_k, h, d)[:, :t]
    return codes, jnp.transpose(scale, (0, 2, 1))


def smooth_values(v: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """V minus its per-channel mean over the valid tokens (invalid tokens -> 0), and the mean [B, H, D]."""
    v = v.astype(jnp.float32)
    w = valid[:, :, None, None].astype(jnp.float32)
    mean = jnp.sum(v * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return (v - mean[:, None]) * w, mean


def quantize_values(v: jax.Array, valid: jax.Array, fmt: str = "fp8_e4m3") -> tuple[jax.Array, jax.Array]:
    """V [B, T, H, D] in ``fmt`` (fp8 e4m3, or int8 for the study emulation) with one scale per
    channel per head ([B, H, D]); invalid tokens -> 0."""
    v = v.astype(jnp.float32) * valid[:, :, None, None]
    scale = jnp.maximum(jnp.max(jnp.abs(v), axis=1), _TINY) / QMAX[fmt]  # [B, H, D]
    return encode(v, scale[:, None], fmt), scale


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Quantized operands shared by the reference and the kernel wrapper.

    ``q_codes`` [B, Tq, H, D], ``q_scale`` [B, Tq, H]; ``k_codes`` [B, Tk, H, D] (zero past
    each length), ``k_scale`` [B, H, nkb]; ``v`` [B, Tk, H, D] (fp8 codes or bf16, zero past
    each length), ``v_scale`` [B, H, D] (ones for bf16); ``valid`` [B, Tk]; ``v_mean``
    [B, H, D]: the mean taken out of V by ``smooth_v``, to add to the output (None without).
    """

    q_codes: jax.Array
    q_scale: jax.Array
    k_codes: jax.Array
    k_scale: jax.Array
    v: jax.Array
    v_scale: jax.Array
    valid: jax.Array
    v_mean: jax.Array | None = None


def prepare(
    q, k, v, *, kv_lengths, qk_format, pv_format, block_k, smooth_k, hadamard, smooth_v=True, k_scales="token"
) -> Prepared:
    """Rotation, smoothing and quantization of Q, K and V (plain JAX, one fused XLA pass)."""
    b, tk = k.shape[:2]
    valid = key_validity(b, tk, kv_lengths)
    qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
    if hadamard:
        qf, kf = rotate(qf), rotate(kf)
    kf = smooth_keys(kf, valid) if smooth_k else kf * valid[:, :, None, None]
    q_codes, q_scale = quantize_tokens(qf, qk_format)
    if k_scales == "token":
        k_codes, k_scale = quantize_tokens(kf, qk_format)
        k_scale = jnp.transpose(k_scale, (0, 2, 1))  # [B, H, Tk]
    else:
        k_codes, k_scale = quantize_key_blocks(kf, qk_format, block_k)
    v_mean = None
    if pv_format in ("fp8_e4m3", *STUDY_PV_FORMATS):
        if smooth_v:
            v, v_mean = smooth_values(v, valid)
        v_codes, v_scale = quantize_values(v, valid, pv_format)
    else:
        v_codes = (v.astype(jnp.float32) * valid[:, :, None, None]).astype(jnp.bfloat16)
        v_scale = jnp.ones((b, k.shape[2], k.shape[3]), jnp.float32)
    return Prepared(q_codes, q_scale, k_codes, k_scale, v_codes, v_scale, valid, v_mean)


def _code_dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:
    """Exact dot of codes: int8 -> int32; fp8 codes widen exactly to bf16, fp32 accumulation."""
    if a.dtype == jnp.int8:
        return lax.dot_general(a, b, dims, preferred_element_type=jnp.int32).astype(jnp.float32)
    return lax.dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), dims, preferred_element_type=jnp.float32)


def _chunk_size(tq: int, tk: int, heads: int, batch: int, block_q: int) -> int:
    """Query rows per step so that one step's scores stay near 2^27 floats."""
    rows = max(block_q, (1 << 27) // max(tk * heads * batch, 1))
    rows = max(block_q, (rows // block_q) * block_q)
    return min(rows, -(-tq // block_q) * block_q)


def attend_prepared(
    prep: Prepared, *, causal: bool, pv_format: str, sm_scale: float, block_q: int, block_k: int, p_levels: int = 255
) -> jax.Array:
    """Exact-softmax attention over prepared operands, in query chunks; fp32 [B, Tq, H, D].

    ``block_k`` is the number of keys sharing one K scale (1 for per-token scales);
    ``p_levels``: P's integer scale for the study format ``pv_format="int8"`` (:data:`P_LEVELS`).
    """
    if pv_format == "int8" and p_levels not in P_LEVELS:
        raise ValueError(f"attend_prepared: p_levels={p_levels}, expected one of {P_LEVELS}")
    b, tq, h, d = prep.q_codes.shape
    tk = prep.k_codes.shape[1]
    # block_k: keys per K scale (1: per-token scales).
    k_tok_scale = prep.k_scale if block_k == 1 else jnp.repeat(prep.k_scale, block_k, axis=-1)[..., :tk]  # [B, H, Tk]
    chunk = _chunk_size(tq, tk, h, b, block_q)
    n_chunks = -(-tq // chunk)
    pad = n_chunks * chunk - tq
    qc = jnp.pad(prep.q_codes, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qs = jnp.pad(prep.q_scale, ((0, 0), (0, pad), (0, 0)), constant_values=1.0)
    qc = qc.reshape(b, n_chunks, chunk, h, d).swapaxes(0, 1)
    qs = qs.reshape(b, n_chunks, chunk, h).swapaxes(0, 1)
    key_pos = jnp.arange(tk, dtype=jnp.int32)

    def one(args):
        i, q_codes, q_scale = args
        s = _code_dot(q_codes, prep.k_codes, (((3,), (3,)), ((0, 2), (0, 2))))  # [B, H, c, Tk]
        s = s * jnp.swapaxes(q_scale, 1, 2)[..., None] * k_tok_scale[:, :, None, :] * sm_scale
        keep = prep.valid[:, None, None, :]
        if causal:
            q_pos = i * chunk + jnp.arange(chunk, dtype=jnp.int32)
            keep = keep & (key_pos[None, :] <= q_pos[:, None])[None, None]
        s = jnp.where(keep, s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=-1)  # [B, H, c]
        if pv_format == "fp8_e4m3":
            p_op = (p * P_SCALE).astype(jnp.float8_e4m3fn)
            o = _code_dot(p_op, prep.v, (((3,), (1,)), ((0, 1), (0, 2))))  # [B, H, c, D]
            o = o * prep.v_scale[:, :, None, :] / P_SCALE
        elif pv_format == "int8":  # the study emulation: bytes times int8, exact in int32
            p_op = jnp.round(p * p_levels).astype(jnp.int32)
            o = lax.dot_general(
                p_op, prep.v.astype(jnp.int32), (((3,), (1,)), ((0, 1), (0, 2))), preferred_element_type=jnp.int32
            ).astype(jnp.float32)
            o = o * prep.v_scale[:, :, None, :] / p_levels
        else:
            o = lax.dot_general(
                p.astype(jnp.bfloat16),
                prep.v.astype(jnp.bfloat16),
                (((3,), (1,)), ((0, 1), (0, 2))),
                preferred_element_type=jnp.float32,
            )
        o = o / l[..., None]
        if prep.v_mean is not None:
            o = o + prep.v_mean[:, :, None, :]
        return jnp.transpose(o, (0, 2, 1, 3))  # [B, c, H, D]

    out = lax.map(one, (jnp.arange(n_chunks, dtype=jnp.int32), qc, qs))  # [n, B, c, H, D]
    return out.swapaxes(0, 1).reshape(b, n_chunks * chunk, h, d)[:, :tq]


def quant_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    kv_lengths: jax.Array | None = None,
    qk_format: str = "int8",
    pv_format: str = "bf16",
    block_q: int = 64,
    block_k: int = 128,
    smooth_k: bool = True,
    hadamard: bool = False,
    sm_scale: float | None = None,
    smooth_v: bool = True,
    k_scales: str = "token",
) -> jax.Array:
    """Quantized attention, plain JAX (see the module docstring); bf16 [B, Tq, H, D].

    q [B, Tq, H, D]; k, v [B, Tk, H, D]; ``kv_lengths`` [B] int: keys at positions
    ``>= kv_lengths[b]`` are padding (masked); ``block_q`` is the kernel's query tile (no
    numerical effect here), ``block_k`` its key tile and the K-scale block;
    ``sm_scale`` defaults to ``1/sqrt(head_dim)``; ``smooth_v`` applies to fp8 P V only;
    ``k_scales`` is ``"token"`` or ``"block"`` (one K scale per ``block_k`` tokens).
    """
    check_inputs(
        q,
        k,
        v,
        causal=causal,
        kv_lengths=kv_lengths,
        qk_format=qk_format,
        pv_format=pv_format,
        block_q=block_q,
        block_k=block_k,
        k_scales=k_scales,
    )
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    prep = prepare(
        q,
        k,
        v,
        kv_lengths=kv_lengths,
        qk_format=qk_format,
        pv_format=pv_format,
        block_k=block_k,
        smooth_k=smooth_k,
        hadamard=hadamard,
        smooth_v=smooth_v,
        k_scales=k_scales,
    )
    out = attend_prepared(
        prep,
        causal=causal,
        pv_format=pv_format,
        sm_scale=scale,
        block_q=block_q,
        block_k=block_k if k_scales == "block" else 1,
    )
    return out.astype(jnp.bfloat16)


PER_TENSOR_SCALES: tuple[str, ...] = ("amax", "unit")


def per_tensor_fp8_scales(q: jax.Array, k: jax.Array, v: jax.Array, scales: str = "amax") -> dict[str, jax.Array]:
    """The per-tensor FP8 attention recipe's scales (cuDNN / FA3-FP8 style), float32 scalars.

    ``descale_x`` maps e4m3 codes back to values (``x ~ code * descale_x``): ``amax(|x|) / 448``
    over the whole tensor (``"amax"``, a calibrated user) or 1 (``"unit"``, no calibration).
    P in [0, 1] is scaled by ``scale_s`` = 448 before its cast; the output, a convex combination
    of V's rows, is stored in e4m3 with ``descale_o = descale_v`` (``|O| <= amax(|V|)``: no overflow).
    """
    if scales not in PER_TENSOR_SCALES:
        raise ValueError(f"per_tensor_fp8_scales: scales={scales!r}, expected one of {PER_TENSOR_SCALES}")
    qmax = QMAX["fp8_e4m3"]

    def descale(x):
        if scales == "unit":
            return jnp.float32(1.0)
        return jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32))), _TINY) / qmax

    d_q, d_k, d_v = descale(q), descale(k), descale(v)
    return {"descale_q": d_q, "descale_k": d_k, "descale_v": d_v, "scale_s": jnp.float32(P_SCALE), "descale_o": d_v}


def per_tensor_fp8_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scales: str | dict = "amax", sm_scale: float | None = None
) -> jax.Array:
    """Attention with cuDNN's FP8 numerics emulated: one scale per tensor, no smoothing; fp32 [B, Tq, H, D].

    Q, K and V are rounded to e4m3 with one scale each (:func:`per_tensor_fp8_scales`), the
    scores are exact products of the codes in fp32, the softmax is exact, P times 448 is rounded
    to e4m3 for P V, and the output is rounded to e4m3 with one scale as cuDNN's FP8 forward
    stores it. The baseline that fine-grained scales and smoothing are compared against.
    ``scales``: a :func:`per_tensor_fp8_scales` mode, or its dict (scales taken on other tensors,
    e.g. the whole Q when only some of its rows are attended here).
    """
    b, tq, h, d = q.shape
    tk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    s = scales if isinstance(scales, dict) else per_tensor_fp8_scales(q, k, v, scales)
    fmt = "fp8_e4m3"
    prep = Prepared(
        q_codes=encode(q.astype(jnp.float32), s["descale_q"], fmt),
        q_scale=jnp.broadcast_to(s["descale_q"], (b, tq, h)),
        k_codes=encode(k.astype(jnp.float32), s["descale_k"], fmt),
        k_scale=jnp.broadcast_to(s["descale_k"], (b, h, tk)),
        v=encode(v.astype(jnp.float32), s["descale_v"], fmt),
        v_scale=jnp.broadcast_to(s["descale_v"], (b, h, d)),
        valid=jnp.ones((b, tk), bool),
    )
    out = attend_prepared(prep, causal=False, pv_format=fmt, sm_scale=scale, block_q=64, block_k=1)
    return encode(out, s["descale_o"], fmt).astype(jnp.float32) * s["descale_o"]


def integer_pv_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_k: int = 128,
    hadamard: bool = True,
    k_scales: str = "block",
    sm_scale: float | None = None,
    p_levels: int = 255,
) -> jax.Array:
    """A study, not a kernel: the policy default's int8 Q K^T, then P V on 8-bit integers; bf16 out.

    P in [0, 1] (exact softmax, as :func:`quant_attention_reference`) times ``p_levels`` (255 or
    127, :data:`P_LEVELS`) rounded to an integer, V smoothed by its channel mean and rounded to
    int8 with one scale per channel per head, their product exact in int32: what wgmma's 8-bit
    integer path would compute, at fp8's tensor rate. Why: fp8 P V's loss is V's e4m3 rounding
    (about 3% of each value, carried unaveraged into the output where a row attends to few keys);
    int8 rounds V to 1/254 of its channel's range instead. ``scripts/attention_quality.py`` measures it against the kernel's
    formats. No kernel computes it, so the policy does not offer it.
    """
    check_inputs(  # the shapes and tiles as the policy default checks them (P V's format is the study's)
        q,
        k,
        v,
        causal=False,
        kv_lengths=None,
        qk_format="int8",
        pv_format="bf16",
        block_q=64,
        block_k=block_k,
        k_scales=k_scales,
    )
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    prep = prepare(
        q,
        k,
        v,
        kv_lengths=None,
        qk_format="int8",
        pv_format="int8",
        block_k=block_k,
        smooth_k=True,
        hadamard=hadamard,
        k_scales=k_scales,
    )
    out = attend_prepared(
        prep,
        causal=False,
        pv_format="int8",
        sm_scale=scale,
        block_q=64,
        block_k=block_k if k_scales == "block" else 1,
        p_levels=p_levels,
    )
    return out.astype(jnp.bfloat16)


#: Keys one fp8 wgmma instruction reduces (k = 32 for 8-bit operands).
MMA_KEYS = 32
#: Mantissa bits the modelled fp8 tensor-core accumulator keeps below the largest addend's exponent
#: (DeepSeek-V3's report: "around 14 bits" of accumulation precision on Hopper's fp8 MMA).
MMA_ACC_BITS = 13


def truncating_accumulation(p: jax.Array, v: jax.Array, *, bits: int = MMA_ACC_BITS, keys: int = MMA_KEYS) -> jax.Array:
    """``p @ v`` (``[..., Q, K] @ [K, D]``, float32 values of fp8 codes) as a model of Hopper's fp8
    MMA accumulating one long sum in its own accumulator: every ``keys`` keys, the running sum and
    the new products are aligned to the largest exponent among them and truncated toward zero to
    ``bits`` bits below it, then added. A sum with a large common part (the rows of V share a
    direction) stops taking small products, so the result shrinks; a zero-mean one barely moves.
    A model to compare measurements with, not a bit-exact emulation. ``K`` a multiple of ``keys``."""
    *lead, q, k = p.shape
    if k % keys or v.shape[0] != k:
        raise ValueError(
            f"truncating_accumulation: K={k} (p {p.shape}, v {v.shape}) must match and be a multiple of {keys}"
        )
    pc = jnp.moveaxis(p.astype(jnp.float32).reshape(*lead, q, k // keys, keys), -2, 0)
    vc = v.astype(jnp.float32).reshape(k // keys, keys, v.shape[-1])

    def step(acc, chunk):
        pk, vk = chunk
        prod = pk[..., :, None] * vk  # [..., Q, keys, D]
        mag = jnp.maximum(jnp.abs(acc), jnp.max(jnp.abs(prod), axis=-2))
        _, exponent = jnp.frexp(jnp.maximum(mag, 1e-30))  # mag in [2^(e-1), 2^e): exact, unlike log2
        grid = jnp.ldexp(jnp.ones_like(mag), exponent - 1 - bits)
        acc = jnp.trunc(acc / grid) * grid + jnp.sum(jnp.trunc(prod / grid[..., None, :]) * grid[..., None, :], -2)
        return acc, None

    acc, _ = jax.lax.scan(step, jnp.zeros((*lead, q, v.shape[-1]), jnp.float32), (pc, vc))
    return acc


def attention_probabilities(
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool = False,
    kv_lengths: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """Exact fp32 softmax probabilities [B, H, Tq, Tk] (HIGHEST precision), masked keys 0."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    hi = lax.Precision.HIGHEST
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32), precision=hi) * scale
    keep = key_validity(k.shape[0], k.shape[1], kv_lengths)[:, None, None, :]
    if causal:
        keep = keep & jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
    return jax.nn.softmax(jnp.where(keep, s, -jnp.inf), axis=-1)


def exact_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    kv_lengths: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """fp32 softmax attention with the same masks (HIGHEST precision); fp32 [B, Tq, H, D]."""
    p = attention_probabilities(q, k, causal=causal, kv_lengths=kv_lengths, sm_scale=sm_scale)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32), precision=lax.Precision.HIGHEST)


def relative_l2(out: jax.Array, ref: jax.Array) -> float:
    """||out - ref|| / ||ref|| over all elements, in float64 on the host."""
    a = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def sample_inputs(
    key: jax.Array,
    batch: int,
    q_tokens: int,
    kv_tokens: int,
    heads: int,
    head_dim: int,
    *,
    kind: str = "random",
    dtype=jnp.bfloat16,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Test and benchmark inputs q, k, v.

    ``random``: standard normal. ``realistic``: what trained DiTs show: four K channels per
    head 10x, 20x, 35x and 50x larger than the rest and offset by half that (a channel bias),
    two Q channels 4x larger, and V with a per-channel mean (std 2). ``sharp``: ``realistic``
    with queries 3x larger, so each softmax row concentrates on few keys.
    """
    if kind not in INPUT_KINDS:
        raise ValueError(f"sample_inputs: kind={kind!r}, expected one of {INPUT_KINDS}")
    kq, kk, kv, kc, km = jax.random.split(key, 5)
    q = jax.random.normal(kq, (batch, q_tokens, heads, head_dim), jnp.float32)
    k = jax.random.normal(kk, (batch, kv_tokens, heads, head_dim), jnp.float32)
    v = jax.random.normal(kv, (batch, kv_tokens, heads, head_dim), jnp.float32)
    if kind in ("realistic", "sharp"):
        idx = jax.random.permutation(kc, head_dim)[:6]
        factors = jnp.array([10.0, 20.0, 35.0, 50.0], jnp.float32)
        k = k.at[..., idx[:4]].multiply(factors).at[..., idx[:4]].add(0.5 * factors)
        q = q.at[..., idx[4:]].multiply(4.0)
        v = v + 2.0 * jax.random.normal(km, (1, 1, heads, head_dim), jnp.float32)
    if kind == "sharp":
        q = 3.0 * q
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)
