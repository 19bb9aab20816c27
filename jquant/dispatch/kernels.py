"""Kernel selection for :mod:`jquant.dispatch`: which Pallas kernel (if any) runs a matmul.

``maybe_run(x, w, act=..., act_scale=...)`` returns the kernel's output, or None when no
kernel applies; :func:`jquant.dispatch.linear` then takes the XLA path. Kernels apply on
a Hopper GPU to 2-D QArray weights (Flax layout (K, N)) with:

* ``int8`` per-channel weights + ``int8`` activations -> ``w8a8.int8_matmul``
* ``fp8_e4m3`` per-channel weights + ``fp8_e4m3`` activations -> ``w8a8.fp8_matmul``
* ``int4`` per-channel weights + ``int8`` activations, M >= 1024 -> ``w4a8.w4a8_matmul`` (int4
  tiles widened to int8 in registers); with an SVDQuant branch (rank 16..64) the branch's
  up-projection runs in that GEMM's epilogue (its down-projection is one XLA GEMM; the fused
  ``lowrank_quant`` quantizer measured slower and runs only when forced)
* weight-only ``int4/g128`` (symmetric) or ``int8`` / ``fp8`` per-channel, M <= 16 ->
  ``weight_only.w4a16_matmul`` / ``w8a16_matmul`` (where ``weight_only.supports`` says so;
  checked on the GPU, see docs/kernels.md); ``int4`` with groups of 16/32/64 the same; int4/g128
  and int8 per-channel at M >= 1024 with K x N >= 3072 x 3072 -> the same wrappers, which run
  ``w4a16_gemm`` (dequantized in registers)
* weight-only ``nf4``, ``fp4``, ``mxfp4``, ``nvfp4`` (blocks of 16..128), M <= 16 ->
  ``w4_table.w4_table_matmul`` (decode in registers); ``uint4`` groups with zero points ->
  ``w4_table.uint4_matmul``

The kernels take K-major weights ([N, K]); QArrays store (K, N), so the codes are
transposed in the jitted graph (one pass over the weight bytes per call; 4-bit packing is
along K in both layouts, so packed bytes transpose unchanged). Fine-grained activation scales
(``<fmt>/token128``: one per token per 128 channels) go to a kernel only as ``fp8_e4m3/token128``
with ``fp8_e4m3/b128x128`` weights or ``int8/token128`` with ``int8/b128x128`` weights
(``w8a8.fp8_block_matmul``, ``w8a8.int8_block_matmul``, :func:`block_kernel`; the int8 one once
GPU-checked); the rest run :func:`jquant.dispatch.block_scaled_dot` in XLA. Dynamic per-token int8 / e4m3
activations go through the activation quantizer kernel (:func:`quantize_tokens`), whose rule
is :func:`jquant.quantize`'s to the bit; other activation specs use
:func:`jquant.dispatch.quantize_activation`. Either way both paths see identical codes and scales.

**Which path, per shape** (:func:`choose_path`; ``backend="auto"`` only: ``JQUANT_BACKEND=pallas``
forces the kernels, ``=xla`` the XLA paths). For int8 / e4m3 W8A8 layers with dynamic per-token
activations and for int8 / int4-g128 weight-only layers, the path is the one measured fastest
for that (K, N) and M on the GPU (:data:`PATH_TABLE`, from ``scripts/bench_kernels.py --dispatch``,
see the comment there); shapes the table lacks follow :data:`DEFAULT_RULE`. A W8A8 layer at small M
can run as its weight-only product (activations left in bf16: the quantizer pass and the W8A8
kernel's fixed cost outweigh the GEMM there), so at those M its output is the weight-only one,
not bit-identical to the XLA W8A8 path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp

from jquant.dispatch.xla import add_lowrank, quantize_activation, token_block
from jquant.formats import QSpec, parse_spec
from jquant.hadamard import apply_block_hadamard, online_block
from jquant.qarray import QArray, decode_scale, dequantize
from pallas_kernels import (
    act_quant,
    fused_producers,
    gemm_act_quant,
    kquant_gemv,
    kquant_triton,
    lowrank_quant,
    testing,
    w4_table,
    w4a8,
    w4a16_gemm,
    w8a8,
    weight_only,
)

# --------------------------------------------------------------------------
# Which path runs a layer: measured per shape.
# --------------------------------------------------------------------------

#: Paths a layer can take. "w8a8": the activation quantizer + the W8A8 kernel; "xla_w8a8": XLA's
#: int8 / fp8 dot on the quantized activations (jquant.dispatch's XLA path); "w16": the weight-only
#: kernel on bf16 activations where it applies (weight_only.supports / w4a16_gemm.supports), else
#: "xla_w16"; "xla_w16": the weights dequantized to bf16 + XLA's bf16 dot.
PATHS = ("w8a8", "xla_w8a8", "w16", "xla_w16")
#: Paths open to each layer kind (W8A8 layers may drop to their weight-only product).
KIND_PATHS = {"int8/w8a8": PATHS, "fp8/w8a8": PATHS, "int8/w16": ("w16", "xla_w16"), "int4g128/w16": ("w16", "xla_w16")}
#: The M at which scripts/bench_kernels.py --dispatch measures every path.
MEASURED_M = (1, 16, 256, 4096, 32760)

#: The fastest measured path per (layer kind, K, N): ``((m_max, path), ...)``, the first entry
#: with ``M <= m_max`` applies (None: no bound); past the last entry the kind's ``(kind, 0, 0)``
#: entry, then :data:`DEFAULT_RULE`, decide. Derived by :func:`derive_table` from the rows of
#: ``benchmarks/dispatch-NVIDIA_H200.json`` (``scripts/bench_kernels.py --dispatch``: every path
#: checked against the reference, then timed, median of >= 10 CUPTI runs; H200, 2026-12-01): each
#: measured M's fastest path holds up to the geometric midpoint to the next measured M. That run
#: measured M = 1 and 16 for the Wan2.1-1.3B shapes and M = 256 for 1536 x 1536 before its time
#: budget ended, so the table speaks for M <= 64 (<= 1024 at 1536 x 1536) and DEFAULT_RULE
#: decides above. tests/test_kernel_dispatch.py checks that this table is what derive_table makes
#: of that JSON.
PATH_TABLE: dict[tuple[str, int, int], tuple[tuple[int | None, str], ...]] = {
    ("fp8/w8a8", 0, 0): ((4, "xla_w16"), (1024, "w16")),
    ("fp8/w8a8", 256, 1536): ((64, "xla_w16"),),
    ("fp8/w8a8", 1536, 1536): ((1024, "w16"),),
    ("fp8/w8a8", 1536, 8960): ((64, "w16"),),
    ("fp8/w8a8", 1536, 9216): ((64, "w16"),),
    ("fp8/w8a8", 8960, 1536): ((4, "xla_w8a8"), (64, "w16")),
    ("int4g128/w16", 0, 0): ((64, "w16"), (1024, "xla_w16")),
    ("int4g128/w16", 256, 1536): ((64, "xla_w16"),),
    ("int4g128/w16", 1536, 1536): ((64, "w16"), (1024, "xla_w16")),
    ("int4g128/w16", 1536, 8960): ((64, "w16"),),
    ("int4g128/w16", 1536, 9216): ((64, "w16"),),
    ("int4g128/w16", 8960, 1536): ((64, "w16"),),
    ("int8/w16", 0, 0): ((4, "xla_w16"), (64, "w16"), (1024, "xla_w16")),
    ("int8/w16", 256, 1536): ((64, "xla_w16"),),
    ("int8/w16", 1536, 1536): ((64, "w16"), (1024, "xla_w16")),
    ("int8/w16", 1536, 8960): ((64, "w16"),),
    ("int8/w16", 1536, 9216): ((64, "w16"),),
    ("int8/w16", 8960, 1536): ((64, "w16"),),
    ("int8/w8a8", 0, 0): ((4, "xla_w8a8"), (64, "w16"), (1024, "xla_w16")),
    ("int8/w8a8", 256, 1536): ((64, "xla_w16"),),
    ("int8/w8a8", 1536, 1536): ((64, "w16"), (1024, "xla_w16")),
    ("int8/w8a8", 1536, 8960): ((4, "xla_w8a8"), (64, "w16")),
    ("int8/w8a8", 1536, 9216): ((4, "xla_w8a8"), (64, "w16")),
    ("int8/w8a8", 8960, 1536): ((64, "xla_w8a8"),),
}

#: For shapes PATH_TABLE lacks, per layer kind. derive_table's "default" entries replace these
#: with the path of least worst-case slowdown over the measured shapes at each M. Until then
#: (H200 numbers from before this rule): the W8A8 int8 kernel at M=1 took 21.8 us where XLA's
#: bf16 dot took 6.0 us (0.27x; reported in the issue, no JSON row), the weight-only kernels at M=1 ran
#: 0.47-1.84x bf16 and at M=16 0.94-1.63x (kernels-weight_only-NVIDIA_H200.json), and the W8A8
#: kernel 1.41-2.16x bf16 from M=4096 (kernels-w4a8-, kernels-m32760-NVIDIA_H200.json): W8A8
#: runs its kernel from M > 1024 (the geometric midpoint of 256 and 4096) and its weight-only
#: product below; weight-only layers keep their kernel where it applies.
DEFAULT_RULE: dict[str, tuple[tuple[int | None, str], ...]] = {
    "int8/w8a8": ((1024, "w16"), (None, "w8a8")),
    "fp8/w8a8": ((1024, "w16"), (None, "w8a8")),
    "int8/w16": ((None, "w16"),),
    "int4g128/w16": ((None, "w16"),),
}


def layer_kind(w: QArray, act: QSpec | None, act_scale=None) -> str | None:
    """The :data:`KIND_PATHS` key of a 2-D layer, or None for formats the table does not cover."""
    spec = w.spec
    if w.ndim != 2 or w.zero_point is not None or spec.scaling:
        return None
    if act is None:
        if spec.fmt == "int8" and spec.granularity == "channel":
            return "int8/w16"
        if spec.fmt == "int4" and spec.granularity == "group" and spec.group_size == 128:
            return "int4g128/w16"
        return None
    if (
        act_scale is None
        and act.fmt == spec.fmt
        and spec.granularity == "channel"
        and act.symmetric
        and not act.scaling
        and act.granularity in ("token", "channel")
        and token_block(act) is None
    ):
        return {"int8": "int8/w8a8", "fp8_e4m3": "fp8/w8a8"}.get(spec.fmt)
    return None


def _lookup(entries: Iterable[tuple[int | None, str]], m: int) -> str | None:
    """The path of the first entry with ``M <= m_max`` (None: no bound), or None past the last."""
    for m_max, path in entries:
        if m_max is None or m <= m_max:
            return path
    return None


def choose_path(kind: str, m: int, k: int, n: int, table=None, default=None) -> str:
    """The path for a ``kind`` layer ``[M, K] @ [K, N]``: PATH_TABLE's measured entry for (K, N),
    else the kind's measured default entry, else DEFAULT_RULE's; a measured entry covers only the
    M range its measurement reached (no extrapolation past the largest measured M)."""
    table = PATH_TABLE if table is None else table
    default = DEFAULT_RULE if default is None else default
    for entries in (table.get((kind, k, n)), table.get((kind, 0, 0))):
        path = _lookup(entries, m) if entries else None
        if path is not None:
            return path
    path = _lookup(default[kind], m)
    if path is None:
        raise ValueError(f"DEFAULT_RULE[{kind!r}] has no entry for M={m} (its last must be (None, path))")
    return path


def _bounds(ms: list[int]) -> list[int | None]:
    """Upper M of each measured M's range: the geometric midpoint to the next measured M; the
    last one's reaches the midpoint to the next M of MEASURED_M the run did not reach (None when
    it reached the largest), so a partial run says nothing about larger M."""
    beyond = [m for m in MEASURED_M if m > ms[-1]]
    last = int(math.sqrt(ms[-1] * beyond[0])) if beyond else None
    return [int(math.sqrt(a * b)) for a, b in zip(ms, ms[1:])] + [last]


def _collapse(entries: list[tuple[int | None, str]]) -> tuple[tuple[int | None, str], ...]:
    out: list[tuple[int | None, str]] = []
    for m_max, path in entries:
        if out and out[-1][1] == path:
            out[-1] = (m_max, path)
        else:
            out.append((m_max, path))
    return tuple(out)


def derive_table(rows: list[dict]) -> dict[tuple[str, int, int], tuple[tuple[int | None, str], ...]]:
    """PATH_TABLE from ``scripts/bench_kernels.py --dispatch`` rows (``kind, m, k, n, path,
    status, us``): per (kind, K, N) and measured M the path of least median time among those that
    passed their check; plus a ``(kind, 0, 0)`` default per kind: at each M the path whose worst
    ratio to the fastest over the measured shapes is least (shapes where it did not pass count as
    infinitely slow)."""
    best: dict[tuple[str, int, int], dict[int, dict[str, float]]] = {}
    for r in rows:
        if r.get("status") != "PASS" or r.get("path") not in KIND_PATHS.get(r.get("kind"), ()):
            continue
        best.setdefault((r["kind"], r["k"], r["n"]), {}).setdefault(r["m"], {})[r["path"]] = r["us"]
    table = {}
    for key, by_m in sorted(best.items()):
        ms = sorted(by_m)
        table[key] = _collapse([(b, min(by_m[m], key=by_m[m].get)) for m, b in zip(ms, _bounds(ms))])
    for kind in sorted({key[0] for key in best}):
        shapes = [by_m for key, by_m in best.items() if key[0] == kind]
        ms = sorted({m for by_m in shapes for m in by_m})
        entries = []
        for m, b in zip(ms, _bounds(ms)):

            def regret(path, m=m):
                ratios = [by_m[m].get(path, math.inf) / min(by_m[m].values()) for by_m in shapes if m in by_m]
                return max(ratios)

            entries.append((b, min(KIND_PATHS[kind], key=regret)))
        table[(kind, 0, 0)] = _collapse(entries)
    return table


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _channel_scale(w: QArray):
    """[N] weight scale if w is 2-D, symmetric, with one scale per output channel (None for GGUF
    block codes, whose scales live inside their blocks)."""
    if w.scale is None or w.ndim != 2 or w.zero_point is not None or w.spec.scaling or w.scale.shape[0] != 1:
        return None
    return decode_scale(w)[0]


def _fused_lowrank(x2: jax.Array, lowrank):
    """``(h = x @ A, B^T)`` for the int8 kernel's epilogue, or None where the rank does not fit."""
    if lowrank is None or not w4a8.fused_rank(lowrank[0].shape[-1]):
        return None
    return w4a8.lowrank_operands(x2, *lowrank)


def _fused_tokens(x2: jax.Array, act: QSpec, act_scale, hadamard: bool | int = False) -> bool:
    """Whether the activation quantizer kernel takes these activations (with the rotation)."""
    return (
        act_scale is None
        and act.fmt in ("int8", "fp8_e4m3")
        and act.symmetric
        and not act.scaling
        and act.scale_dtype == "float32"
        and token_block(act) is None
        and act_quant.supports(x2, hadamard)
    )


def quantize_tokens(x2: jax.Array, act: QSpec, act_scale, hadamard: bool | int = False) -> tuple[jax.Array, jax.Array]:
    """``(codes [M, K], scale f32 [M, 1])`` of 2-D activations, as :func:`jquant.dispatch.quantize_activation`.

    Dynamic symmetric int8 / e4m3 with fp32 scales runs the activation quantizer kernel where it
    applies (``act_quant.supports``): one pass over ``x``, the same codes and scales as jquant's
    rule (``act_quant``'s reference is that rule to the bit); everything else quantizes in XLA.
    ``hadamard=True`` quantizes ``apply_hadamard(x2)`` (rounded to x2's dtype, as jquant.nn does),
    rotated inside the kernel where it takes the width; ``hadamard=b`` the block-diagonal one.
    """
    if _fused_tokens(x2, act, act_scale, hadamard):
        quant = act_quant.quantize_int8 if act.fmt == "int8" else act_quant.quantize_fp8
        return quant(x2, hadamard=hadamard) if hadamard else quant(x2)
    if hadamard:
        x2 = apply_block_hadamard(x2, online_block(hadamard), axis=-1).astype(x2.dtype)
        return quantize_tokens(x2, act, act_scale)
    xq = quantize_activation(x2, act, act_scale)
    return xq.qvalue, jnp.broadcast_to(decode_scale(xq), (x2.shape[0], 1)).astype(jnp.float32)


def _tokens_and_lowrank(x2: jax.Array, act: QSpec, act_scale, hadamard: bool | int, lowrank):
    """``(codes, scales, epilogue operands or None)`` for the int8 GEMMs: with an SVDQuant branch
    the quantizer kernel also computes ``h = x @ A`` in its pass over ``x`` where it can
    (``lowrank_quant``), else ``h`` is its own XLA GEMM."""
    if (
        lowrank is not None
        and not hadamard
        and w4a8.fused_rank(lowrank[0].shape[-1])
        and _fused_tokens(x2, act, act_scale)
        and lowrank_quant.supports(x2, lowrank[0])
    ):
        x_q, xs, h = lowrank_quant.quantize_lowrank(x2, lowrank[0], "int8" if act.fmt == "int8" else "fp8")
        return x_q, xs, (h, lowrank[1].T.astype(jnp.bfloat16))
    x_q, xs = quantize_tokens(x2, act, act_scale, hadamard)
    return x_q, xs, _fused_lowrank(x2, lowrank)


def _token_kernel_format(w: QArray, act_fmt: str) -> str | None:
    """Which per-token GEMM takes per-channel weights ``w`` with per-token ``act_fmt`` codes:
    ``"w4a8"``, ``"int8"`` or ``"fp8_e4m3"``; None where no kernel takes the pair."""
    if _channel_scale(w) is None:
        return None
    if w.spec.fmt == "int4" and act_fmt == "int8":
        return "w4a8"
    return w.spec.fmt if w.spec.fmt in ("int8", "fp8_e4m3") and act_fmt == w.spec.fmt else None


def token_codes_matmul(x_q: jax.Array, xs: jax.Array, w: QArray, act_fmt: str, out_dtype, fused=None):
    """The W8A8 / W4A8 GEMM on per-token codes ``x_q [M, K]`` with scales ``xs [M, 1]`` (the
    quantizer's, or a fused producer's), plus the low-rank branch ``fused`` in its epilogue
    (int8 and W4A8); None where no kernel applies (formats, shape, GPU)."""
    kind = _token_kernel_format(w, act_fmt)
    if kind is None:
        return None
    ws = _channel_scale(w)
    if kind == "w4a8":
        ok = w4a8.supports(x_q, out_dtype)
        return w4a8.w4a8_matmul(x_q, xs, w.qvalue.T, ws, None, out_dtype, lowrank=fused) if ok else None
    w_q = w.qvalue.T
    if not w8a8.supports(x_q, w_q, out_dtype):
        return None
    if kind == "fp8_e4m3":
        return w8a8.fp8_matmul(x_q, xs, w_q, ws, None, out_dtype)
    return w8a8.int8_matmul(x_q, xs, w_q, ws, None, out_dtype, lowrank=fused)


def _w8a8(x2: jax.Array, w: QArray, act: QSpec, act_scale, out_dtype, lowrank=None, hadamard: bool | int = False):
    """The W8A8 / W4A8 kernels; returns ``(y, fused)`` (fused: the low-rank branch is in y) or None."""
    kind = _token_kernel_format(w, act.fmt)
    if kind is None:
        return None
    x_q, xs, fused = _tokens_and_lowrank(x2, act, act_scale, hadamard, None if kind == "fp8_e4m3" else lowrank)
    y = token_codes_matmul(x_q, xs, w, act.fmt, out_dtype, fused)
    return None if y is None else (y, fused is not None)


def block_kernel(w: QArray, act: QSpec | None) -> bool:
    """Whether a kernel takes ``<fmt>/tokenN`` activations with weight ``w``: only
    ``fp8_e4m3/token128`` with ``fp8_e4m3/b128x128`` weights or ``int8/token128`` with
    ``int8/b128x128`` weights (``w8a8.fp8_block_matmul`` / ``int8_block_matmul``, DeepGEMM's
    layout). Every other fine-grained activation spec runs :func:`jquant.dispatch.block_scaled_dot`
    in XLA."""
    spec = w.spec
    return (
        token_block(act) == w8a8.BLOCK
        and act.fmt in BLOCK_FORMATS
        and act.symmetric
        and act.scale_dtype == "float32"
        and spec.fmt == act.fmt
        and spec.granularity == "block"
        and spec.block == (w8a8.BLOCK, w8a8.BLOCK)
        and w.ndim == 2
        and w.zero_point is None
    )


#: Activation/weight formats with a block-scaled kernel (:func:`block_kernel`).
BLOCK_FORMATS = ("fp8_e4m3", "int8")


def _block(x2: jax.Array, w: QArray, act: QSpec, out_dtype):
    """``<fmt>/token128`` activations times ``<fmt>/b128x128`` weights on the block-scaled
    kernel, or None where it does not apply (shape, GPU, an int8 kernel not yet GPU-checked)."""
    return block_quantized(quantize_activation(x2, act, None), w, out_dtype)


def block_quantized(xq: QArray, w: QArray, out_dtype):
    """:func:`_block` for activations already quantized (``[M, K]`` codes with ``[M, K/128]``
    scales, e.g. a fused producer's), or None where the kernel does not apply."""
    w_q = w.qvalue.T  # [N, K]
    if not w8a8.supports_block(xq.qvalue, w_q, out_dtype):
        return None
    run = w8a8.int8_block_matmul if xq.qvalue.dtype == jnp.int8 else w8a8.fp8_block_matmul
    return run(xq.qvalue, decode_scale(xq), w_q, decode_scale(w).T, None, out_dtype)


def block_act_quantized(
    xq: QArray, w: QArray, bias, activation: str, out_fmt: str, hadamard: int = 0, mul: jax.Array | None = None
):
    """The FFN-up producer: ``activation(xq @ w + bias)`` (times ``mul`` ``[N]`` per channel, then
    rotated by QuaRot's order-128 block-diagonal Hadamard when ``hadamard=128``, for an FFN-down
    with pre-rotated weights and those random signs as its ``input_mul``)
    quantized per token per 128 channels to
    ``out_fmt`` (``"int8"`` / ``"fp8"``) by the block-scaled GEMM's epilogue, as ``(codes [..., N],
    scales [..., N/128])`` (``pallas_kernels.gemm_act_quant``: the kernel on Hopper, its float32
    reference elsewhere); None where ``xq``/``w`` are not a block-scaled pair (:func:`block_kernel`),
    N is not whole 128-channel blocks, the activation has no producer formula, or on a GPU where
    the kernel does not run (unverified, or not Hopper): there the unfused path is faster than a
    float32 XLA reference."""
    if not isinstance(w, QArray) or not block_kernel(w, xq.spec):
        return None
    k, n = w.shape
    if n % w8a8.BLOCK or activation not in fused_producers.ACTIVATIONS or xq.shape[-1] != k:
        return None
    if hadamard not in (0, gemm_act_quant.ROTATION):
        return None
    w_q = w.qvalue.T  # [N, K]
    lead = xq.shape[:-1]
    x_q = xq.qvalue.reshape(-1, k)  # the kernel's (and supports') 2-D operand: a [B, T, K] input is one M
    if on_gpu() and not gemm_act_quant.supports(x_q, w_q, activation, hadamard, mul is not None):
        return None
    x_scale = decode_scale(xq).reshape(-1, k // w8a8.BLOCK)
    b = None if bias is None else dequantize(bias).reshape(-1).astype(jnp.float32)
    codes, scales = gemm_act_quant.gemm_act_quant(
        x_q, x_scale, w_q, decode_scale(w).T, b, mul, act=activation, fmt=out_fmt, hadamard=hadamard
    )
    return codes.reshape(*lead, n), scales.reshape(*lead, n // w8a8.BLOCK)


def token_act_quantized(y: jax.Array, bias, activation: str, out_fmt: str):
    """The per-token FFN producer: ``activation(y + bias)`` of the FFN-up GEMM's output ``y``
    ``[..., F]``, quantized per token to ``out_fmt`` ("int8" / "fp8") by the activation
    quantizer as it loads ``y`` (``pallas_kernels.act_quant.quantize_act``: the kernel on a GPU,
    its float32 reference elsewhere), as ``(codes [..., F], scales [..., 1])``; None for an
    activation without a producer formula, or on a GPU where the kernel does not run (there
    XLA's GELU pass and the plain quantizer are faster than a float32 reference)."""
    if activation not in fused_producers.ACTIVATIONS:
        return None
    lead, n = y.shape[:-1], y.shape[-1]
    y2 = y.reshape(-1, n)
    if on_gpu() and not act_quant.supports_act(y2, activation):
        return None
    b = None if bias is None else dequantize(bias).reshape(-1).astype(jnp.float32)
    codes, scales = act_quant.quantize_act(y2, b, activation, out_fmt)
    return codes.reshape(*lead, n), scales.reshape(*lead, 1)


def _weight_only(x2: jax.Array, w: QArray, out_dtype):
    spec = w.spec
    if w.ndim != 2:
        return None
    x2 = x2.astype(jnp.bfloat16)
    if spec.fmt in kquant_triton.FORMATS:  # GGUF blocks, u8[N, K/block, bytes]: read in place
        if kquant_gemv.supports(x2, spec.fmt, w.shape[0] * w.shape[1]):  # M <= 2, conversion-free decode
            return kquant_gemv.dispatch_matmul(x2, w.qvalue, spec.fmt, out_dtype)
        return (
            kquant_triton.kquant_matmul(x2, w.qvalue, spec.fmt, out_dtype)
            if kquant_triton.supports(x2, spec.fmt)
            else None
        )
    group = spec.group_size if spec.granularity == "group" else None
    if w.zero_point is not None:
        if spec.fmt != "uint4" or group is None or not weight_only.supports(x2, group):
            return None
        return w4_table.uint4_matmul(
            x2, w.qvalue.T, decode_scale(w).T, w.zero_point.T, None, out_dtype, group_size=group
        )
    if spec.fmt in w4_table.TABLES and group is not None:
        if not w4_table.supports(x2, group, spec.fmt):
            return None
        # NVFP4: the e4m3 block scales go to the kernel (exact in bf16), the fp32 tensor scale
        # multiplies the output.
        nv = spec.scaling == "nv"
        scale = w.scale.astype(jnp.float32) if nv else decode_scale(w)
        return w4_table.w4_table_matmul(
            x2, w.qvalue.T, scale.T, w.scale2 if nv else None, None, out_dtype, fmt=spec.fmt, block=group
        )
    if spec.scaling:
        return None
    n = w.shape[-1]  # QArrays are (K, N)
    if spec.fmt == "int4" and group is not None:
        if not (weight_only.supports(x2, group) or w4a16_gemm.supports(x2, group, n=n)):
            return None
        return weight_only.w4a16_matmul(x2, w.qvalue.T, decode_scale(w).T, None, out_dtype, group_size=group)
    ws = _channel_scale(w)
    if (
        spec.fmt in ("int8", "fp8_e4m3", "fp8_e5m2")
        and ws is not None
        and (weight_only.supports(x2) or (spec.fmt == "int8" and w4a16_gemm.supports(x2, n=n, bits=8)))
    ):
        return weight_only.w8a16_matmul(x2, w.qvalue.T, ws, None, out_dtype)
    return None


def maybe_run(
    x: jax.Array,
    w: QArray,
    *,
    act: QSpec | None,
    act_scale,
    force: bool = False,
    lowrank=None,
    hadamard: bool | int = False,
    path: str | None = None,
):
    """Run ``x @ w`` (plus ``(x @ A) @ B`` for ``lowrank=(A, B)``) with a Pallas kernel if one
    applies, else return None.

    ``force`` (``JQUANT_BACKEND=pallas``) turns "not on a GPU" into an error and bypasses
    :func:`choose_path` (the kernels run wherever they apply); shapes and formats no kernel
    covers still fall back to XLA. Otherwise the layers :func:`layer_kind` names take the path
    :func:`choose_path` measured fastest: their weight-only product (kernel or XLA), the XLA
    W8A8 path (returns None) or the kernels as before. The low-rank branch is fused into the int8
    GEMM's epilogue (W8A8 and W4A8, rank 16..64); other kernels add it with XLA.
    ``hadamard=True`` runs ``apply_hadamard(x) @ w`` only where the rotation fuses into the
    activation quantizer (dynamic per-token int8/e4m3 into W8A8/W4A8, no low-rank branch), else
    returns None for the caller to rotate. ``path`` (one of :data:`PATHS`; the benchmark's) takes
    that path instead of :func:`choose_path`'s.
    """
    if not on_gpu():
        if force:
            raise RuntimeError("JQUANT_BACKEND=pallas but the default JAX backend is not a GPU")
        return None
    out_dtype = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    x2 = x.reshape(-1, x.shape[-1])
    if act is not None and act_scale is not None and jnp.size(act_scale) != 1:
        return None  # per-token static tables: XLA path
    if token_block(act) is not None:  # fine-grained activation scales: only a block-scaled GEMM
        y = _block(x2, w, act, out_dtype) if block_kernel(w, act) and not hadamard else None
        if y is None:
            return None
        if lowrank is not None:
            y = add_lowrank(y, x2, lowrank)
        return y.reshape(*x.shape[:-1], y.shape[-1]).astype(x.dtype)
    kind = None if force else layer_kind(w, act, act_scale)
    if path is None and kind is not None:
        path = choose_path(kind, x2.shape[0], *w.shape)
    elif path is not None and path not in (KIND_PATHS.get(kind) or ()):
        raise ValueError(f"maybe_run: path {path!r} is not one of {KIND_PATHS.get(kind)} for this layer ({kind})")
    if hadamard and not (
        act is not None and lowrank is None and path in (None, "w8a8") and _fused_tokens(x2, act, act_scale, hadamard)
    ):
        return None
    if path == "xla_w8a8" or (path == "xla_w16" and act is None):
        return None  # jquant.dispatch.linear's XLA path
    if path in ("w16", "xla_w16") and act is not None:
        # The layer's weight-only product: bf16 activations, no quantizer pass.
        y = _weight_only(x2, w, out_dtype) if path == "w16" else None
        if y is None:
            y = (x2.astype(out_dtype) @ dequantize(w, out_dtype)).astype(out_dtype)
        if lowrank is not None:
            y = add_lowrank(y, x2, lowrank)
        return y.reshape(*x.shape[:-1], y.shape[-1]).astype(x.dtype)
    if act is not None:
        run = _w8a8(x2, w, act, act_scale, out_dtype, lowrank, hadamard)
        y, fused = (None, False) if run is None else run
    else:
        y, fused = _weight_only(x2, w, out_dtype), False
    if y is None:
        return None
    if lowrank is not None and not fused:
        y = add_lowrank(y, x2, lowrank)
    return y.reshape(*x.shape[:-1], y.shape[-1]).astype(x.dtype)


def maybe_run_token_quantized(xq: QArray, w: QArray, *, force: bool = False):
    """``xq @ w`` for activations already quantized per token (a norm producer's codes,
    ``<fmt>/token``) on the per-token W8A8 / W4A8 GEMM, or None where no kernel applies."""
    if not on_gpu():
        if force:
            raise RuntimeError("JQUANT_BACKEND=pallas but the default JAX backend is not a GPU")
        return None
    out_dtype = xq.dtype if xq.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    k = xq.shape[-1]
    x_q, xs = xq.qvalue.reshape(-1, k), decode_scale(xq).reshape(-1, 1)
    y = token_codes_matmul(x_q, xs, w, xq.spec.fmt, out_dtype)
    return None if y is None else y.reshape(*xq.shape[:-1], y.shape[-1]).astype(xq.dtype)


def maybe_run_quantized(xq: QArray, w: QArray, *, force: bool = False):
    """``xq @ w`` for activations already quantized per token per 128 channels (a fused
    producer's codes) on a block-scaled kernel (fp8, or int8 once GPU-checked), or None where no
    kernel applies (the caller's XLA path then runs)."""
    if not on_gpu():
        if force:
            raise RuntimeError("JQUANT_BACKEND=pallas but the default JAX backend is not a GPU")
        return None
    if not block_kernel(w, xq.spec):
        return None
    out_dtype = xq.dtype if xq.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    k = xq.shape[-1]
    x2 = QArray(xq.qvalue.reshape(-1, k), xq.scale.reshape(-1, k // w8a8.BLOCK), spec=xq.spec, dtype=xq.dtype, axis=-1)
    y = block_quantized(x2, w, out_dtype)
    return None if y is None else y.reshape(*xq.shape[:-1], y.shape[-1]).astype(xq.dtype)


# --------------------------------------------------------------------------
# The GPU check of this module's quantizer choice (scripts/check_kernels_gpu.py runs it
# beside pallas_kernels.testing.CASES): the W8A8 kernel path must see the XLA path's codes.
# --------------------------------------------------------------------------


def _dispatch_tokens(x):
    return quantize_tokens(x, parse_spec("int8/token"), None)


def _jquant_tokens(x):
    xq = quantize_activation(x, parse_spec("int8/token"), None)
    return xq.qvalue, decode_scale(xq).reshape(-1, 1)


CHECK_CASES: dict[str, testing.KernelCase] = {
    "act_quant_jquant": testing.KernelCase(
        "act_quant_jquant",
        _dispatch_tokens,
        _jquant_tokens,
        testing.act_quant_inputs,
        lambda m, k, n: 3.0 * m * k,
        lambda m, k, n: 2 * m * k + m * k + 4 * m,
    ),
}
