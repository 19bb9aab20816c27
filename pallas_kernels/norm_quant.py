"""The QKV / FFN-up producer as a Pallas kernel (issue 19): LayerNorm or RMSNorm (optional
affine), adaLN modulation ``(1 + scale) * norm(x) + shift`` and per-(token, 128) quantization in
one pass over ``x``.

:func:`norm_modulate_quantize_pallas` is the kernel of the plain-JAX reference
:func:`pallas_kernels.fused_producers.norm_modulate_quantize`, with the same arithmetic in the
same order: the mean and variance (or mean square) of the float32 row, ``rsqrt(. + eps)``, the
affine ``* weight + bias``, ``* (1 + scale) + shift``, then for each 128-wide slice of the row the
per-token rule of :mod:`pallas_kernels._quant` (``scale = max(amax / qmax, 1e-12)``, codes
``y / scale`` clipped, int8 rounded half to even).

Not bit for bit, even under ``interpret=True``: XLA contracts ``a * b + c`` into one fused
multiply-add (one rounding instead of two) where it fuses a program, so the reference itself
differs between its eager and jitted runs (scales a few float32 ulp apart on the CPU), and on a
GPU the row sums also run in Triton's reduction order, not XLA's. A value a few ulp off moves a
scale by about 1e-7 relative and a code that sits on a rounding boundary by one step of the
format. tests/test_norm_quant.py bounds it on the CPU: every code within one step, fewer than
1e-3 of them differing (measured at most 2e-4), scales within 1e-6 relative (measured 3e-7); the
GPU check's ``norm_quant_*`` cases (:mod:`pallas_kernels.testing`) accept the same fraction and
scale error.

One program holds ``rows`` whole rows in registers (K padded to a power of two, masked, as the
single-pass activation quantizer of :mod:`pallas_kernels.act_quant` does): the norm needs the
whole row before the first code. K must be a multiple of 128 (whole scale blocks) and at most
:data:`pallas_kernels._quant.SINGLE_PASS_MAX` wide once padded.

``hadamard=b`` also applies QuaRot's block-diagonal online rotation (order ``b``, e.g. 128)
before quantizing, so a rotated consumer needs no separate rotation pass. It rotates the rows
rounded to bf16 (as the unfused path rounds the modulated activation to the model dtype before
its rotation), which one bf16 MMA against the +-1 matrix rotates exactly in float32
(:func:`pallas_kernels._quant.rotate_rounded`); rotating the float32 rows exactly took three
such MMAs: the rotating producer took 232 us at 32,760 x 1536 on an H200 then, 141.8 us now
(about 86 us unrotated; ``benchmarks/linear_path-producers-NVIDIA_H200.json`` and
``linear_path-producers-rounded-NVIDIA_H200.json``).

``jquant.producers`` runs it for a quantized model's adaLN inputs. Its GPU check passed without
the rotation (:data:`GPU_VERIFIED`); :data:`HADAMARD_GPU_VERIFIED` covers the rotation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import _common, _quant
from pallas_kernels.act_quant import block_matrix
from pallas_kernels.fused_producers import BLOCK, FORMATS, NormKind

Array = jax.Array

#: ``scripts/check_kernels_gpu.py --kernels norm_quant_layer_int8,norm_quant_layer_fp8,norm_quant_rms_fp8``
#: passed on an H200 at cc83f7c (every shape the kernel takes; kernel unchanged since 5a593ad;
#: ``benchmarks/check_kernels-norm_quant_block128-NVIDIA_H200.txt``), so ``supports`` says yes on Hopper.
GPU_VERIFIED = True
#: The fused block rotation (``hadamard=b``, QuaRot's online rotation in the producer). Its
#: float32 three-part version passed ``check_kernels_gpu.py --kernels
#: norm_quant_layer_int8_had128,norm_quant_layer_fp8_had128`` on an H200 at 93e0741
#: (``benchmarks/check_kernels-norm_quant_had128-NVIDIA_H200.txt``). The one-part rotation of the
#: bf16-rounded rows that replaced it passed the same cases plus ``norm_quant_layer_int8_had128_token``
#: on an H200 at 2ab3f74, 0 failures (``benchmarks/check_kernels-norm_quant_rounded_had128-NVIDIA_H200.txt``;
#: the first run at f013add failed only on the float32 scale bound: ``...-first-NVIDIA_H200.txt``).
HADAMARD_GPU_VERIFIED = True
#: Per-token scales (``block=K``: one scale per row, for the per-token W8A8 GEMM; the norm sees
#: the whole row, so it needs no finer scales): ``check_kernels_gpu.py --kernels
#: norm_quant_layer_int8_token,norm_quant_rms_fp8_token,norm_quant_layer_int8_had128_token`` PASS
#: on an H200 at 22e09fd, 0 failures (``benchmarks/check_kernels-norm_quant_token-NVIDIA_H200.txt``).
TOKEN_GPU_VERIFIED = True

_NAME = "norm_modulate_quantize_pallas"


def _check_vector(name: str, v: Array | None, m: int, k: int, per_row_ok: bool) -> None:
    """``v`` is None (only the norm's affine may be), ``[K]``, or ``[M, K]`` where ``per_row_ok``."""
    if v is None:
        if per_row_ok:
            raise ValueError(f"{_NAME}: {name} is required (the adaLN modulation)")
        return
    shapes = [(k,), (m, k)] if per_row_ok else [(k,)]
    if tuple(v.shape) not in shapes:
        raise ValueError(f"{_NAME}: {name} of shape {tuple(v.shape)} must be one of {shapes} for x of shape {(m, k)}")


def _x_problem(x: Array) -> str | None:
    """Why the kernel does not take ``x`` (None where it does): not a 2-D float array, K not whole
    128-channel scale blocks, or a padded row wider than one program holds."""
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        return f"x must be a 2-D float array [M, K], got shape {x.shape} of {x.dtype}"
    k = x.shape[1]
    if k % BLOCK or k == 0:
        return f"x of shape {x.shape}: K={k} is not a multiple of {BLOCK} (one scale per token per {BLOCK} channels)"
    if _quant.padded_width(k) > _quant.SINGLE_PASS_MAX:
        return (
            f"x of shape {x.shape}: K={k} is too wide for whole rows in one program "
            f"(padded K at most {_quant.SINGLE_PASS_MAX})"
        )
    return None


def _check_inputs(x: Array, kind: str, fmt: str) -> None:
    """A clear ValueError for what the kernel does not take (:func:`_x_problem`), or an unknown norm
    or format."""
    problem = _x_problem(x)
    if problem:
        raise ValueError(f"{_NAME}: {problem}")
    if kind not in ("layer", "rms"):
        raise ValueError(f"{_NAME}: kind must be 'layer' or 'rms', got {kind!r}")
    if fmt not in FORMATS:
        raise ValueError(f"{_NAME}: format {fmt!r} not in {FORMATS}")


def _kernel(
    x_ref,
    *refs,
    m: int,
    k: int,
    rows: int,
    kind: str,
    eps: float,
    fmt: str,
    has_weight: bool,
    has_bias: bool,
    shift_rows: bool,
    scale_rows: bool,
    interpret: bool,
    hadamard: int = 0,
    per_token: bool = False,
):
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.triton as pltriton  # pylint: disable=g-import-not-at-top

    refs = list(refs)
    w_ref = refs.pop(0) if has_weight else None
    b_ref = refs.pop(0) if has_bias else None
    h_ref = refs.pop(-3) if hadamard else None  # the +-1 rotation matrix, after the vectors
    shift_ref, scale_ref, q_ref, s_ref = refs
    i = pl.program_id(0)
    width = _quant.padded_width(k)
    row_ok = i * rows + jnp.arange(rows) < m
    col_ok = jnp.arange(width) < k
    mask = row_ok[:, None] & col_ok[None, :]
    tile = (pl.ds(i * rows, rows), pl.ds(0, width))

    def load_vector(ref, per_row: bool) -> Array:
        """A ``[K]`` vector as ``[1, width]`` or a ``[M, K]`` one's ``[rows, width]`` tile, float32."""
        if per_row:
            return pltriton.load(ref.at[tile], mask=mask, other=0.0).astype(jnp.float32)
        return pltriton.load(ref.at[pl.ds(0, width)], mask=col_ok, other=0.0).astype(jnp.float32)[None, :]

    xf = pltriton.load(x_ref.at[tile], mask=mask, other=0.0).astype(jnp.float32)
    n = np.float32(k)
    # fused_producers.normalize, step for step: padded columns are zeros in the sums.
    if kind == "layer":
        mean = jnp.sum(xf, axis=1, keepdims=True) / n
        d = jnp.where(col_ok[None, :], xf - mean, 0.0)
        y = d * lax.rsqrt(jnp.sum(d * d, axis=1, keepdims=True) / n + eps)
    else:
        y = xf * lax.rsqrt(jnp.sum(xf * xf, axis=1, keepdims=True) / n + eps)
    if has_weight:
        y = y * load_vector(w_ref, False)
    if has_bias:
        y = y + load_vector(b_ref, False)
    y = y * (1 + load_vector(scale_ref, scale_rows)) + load_vector(shift_ref, shift_rows)
    if hadamard:
        # QuaRot's block-diagonal online rotation of the bf16-rounded rows: every hadamard-wide
        # chunk stacked under one exact +-1 dot; the zero padding past K rotates to zeros.
        y = _quant.rotate_rounded(y.reshape(-1, hadamard), h_ref, hadamard).reshape(rows, width)

    if per_token:  # one scale per row: the padded columns are zeros, so the row's amax is K's
        row_scale = _quant.scale_of(jnp.max(jnp.abs(y), axis=1), fmt)
        pltriton.store(q_ref.at[tile], _quant.to_q(y / row_scale[:, None], fmt, interpret), mask=mask)
        pltriton.store(s_ref.at[pl.ds(i * rows, rows), pl.ds(0, 1)], row_scale[:, None], mask=row_ok[:, None])
        return
    # One scale per row per 128-wide slice; padded slices (K is whole blocks) are masked out.
    blocks = width // BLOCK
    y3 = y.reshape(rows, blocks, BLOCK)
    scale = _quant.scale_of(jnp.max(jnp.abs(y3), axis=2), fmt)
    codes = _quant.to_q(y3 / scale[:, :, None], fmt, interpret).reshape(rows, width)
    pltriton.store(q_ref.at[tile], codes, mask=mask)
    s_mask = row_ok[:, None] & (jnp.arange(blocks) < k // BLOCK)[None, :]
    pltriton.store(s_ref.at[pl.ds(i * rows, rows), pl.ds(0, blocks)], scale, mask=s_mask)


def norm_modulate_quantize_pallas(
    x: Array,
    norm_scale: Array | None,
    norm_bias: Array | None,
    shift: Array,
    scale: Array,
    eps: float = 1e-6,
    kind: NormKind = "layer",
    fmt: str = "int8",
    *,
    interpret: bool = False,
    config: _quant.QuantizerConfig | None = None,
    hadamard: int = 0,
    block: int = BLOCK,
) -> tuple[Array, Array]:
    """``(codes [M, K], scales f32 [M, K / block])`` of ``(1 + scale) * norm(x) + shift``.

    ``x``: ``[M, K]`` tokens (bf16 or f32), K a multiple of 128; ``norm_scale`` / ``norm_bias``:
    the norm's affine ``[K]`` or None; ``shift`` / ``scale``: the adaLN modulation, ``[K]`` or one
    per row ``[M, K]`` (broadcasting a model's per-sample ``[B, K]`` over its tokens is the
    caller's job). ``config``: rows and warps per program (single pass only; default
    :func:`pallas_kernels._quant.pick_config`). ``interpret=True`` runs Pallas's interpreter (CPU).
    ``hadamard=b``: rotate each row by QuaRot's block-diagonal rotation of order ``b`` before
    quantizing (``b`` a Sylvester order of 16..256 dividing K, :func:`act_quant.block_matrix`).
    ``block``: channels per scale, 128 or K (per token: :data:`TOKEN_GPU_VERIFIED`).
    """
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.triton as pltriton  # pylint: disable=g-import-not-at-top

    _check_inputs(x, kind, fmt)
    m, k = x.shape
    _check_vector("norm_scale", norm_scale, m, k, per_row_ok=False)
    _check_vector("norm_bias", norm_bias, m, k, per_row_ok=False)
    _check_vector("shift", shift, m, k, per_row_ok=True)
    _check_vector("scale", scale, m, k, per_row_ok=True)
    if block not in (BLOCK, k):
        raise ValueError(f"{_NAME}: block must be {BLOCK} or K={k} (one scale per token), got {block}")
    cfg = config or _quant.pick_config(k)
    if not cfg.single_pass or cfg.approx:
        raise ValueError(f"{_NAME}: the norm needs whole rows in one program (a single-pass config, exact), got {cfg}")
    extra = ()
    if hadamard:
        mat = block_matrix(k, hadamard) if hadamard < k else None
        if mat is None:
            raise ValueError(f"{_NAME}: no fused block-{hadamard} rotation for K={k} (see act_quant.block_matrix)")
        if cfg.rows * _quant.padded_width(k) // hadamard < 16:
            raise ValueError(f"{_NAME}: the block rotation's dot needs >= 16 chunks per program, got {cfg}")
        extra = (jnp.asarray(mat, jnp.bfloat16),)
    out_shape = (
        jax.ShapeDtypeStruct((m, k), _quant.QDTYPE[fmt]),
        jax.ShapeDtypeStruct((m, k // block), jnp.float32),
    )
    if m == 0:
        return tuple(jnp.zeros(s.shape, s.dtype) for s in out_shape)
    vectors = [v for v in (norm_scale, norm_bias) if v is not None] + [shift, scale]
    call = pl.pallas_call(
        functools.partial(
            _kernel,
            m=m,
            k=k,
            rows=cfg.rows,
            kind=kind,
            eps=float(eps),
            fmt=fmt,
            has_weight=norm_scale is not None,
            has_bias=norm_bias is not None,
            shift_rows=shift.ndim == 2,
            scale_rows=scale.ndim == 2,
            interpret=interpret,
            hadamard=hadamard,
            per_token=block != BLOCK,
        ),
        out_shape=out_shape,
        grid=(_common.cdiv(m, cfg.rows),),
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=cfg.warps, num_stages=cfg.stages),
    )
    return call(x, *vectors, *extra)


def supports(x: Array, hadamard: int = 0, per_token: bool = False) -> bool:
    """True where a caller may run the compiled kernel on ``x``: a GPU, the kernel verified there
    (:data:`GPU_VERIFIED`, and :data:`HADAMARD_GPU_VERIFIED` with a rotation,
    :data:`TOKEN_GPU_VERIFIED` with per-token scales; or ``JQUANT_BACKEND=pallas``), and a
    non-empty ``x`` it takes (2-D float ``[M, K]``, K whole 128-channel blocks, a padded row that
    fits one program, a rotation :func:`block_matrix` has)."""
    if hadamard and (hadamard >= x.shape[-1] or block_matrix(x.shape[-1], hadamard) is None):
        return False
    verified = GPU_VERIFIED and (HADAMARD_GPU_VERIFIED or not hadamard) and (TOKEN_GPU_VERIFIED or not per_token)
    return _common.on_gpu() and _common.kernel_enabled(verified) and x.size > 0 and _x_problem(x) is None
