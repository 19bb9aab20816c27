"""Low-rank methods: SVDQuant, SVD-LLM, LoftQ, and a low-rank correction for any quantizer.

Flax kernels are ``W`` [K, N] (``y = x W``); every derivation below is in that layout.

* **SVDQuant** (Li et al. 2024): smoothing ``s_j = max|X_j|^a / max|W_j|^(1-a)`` moves
  activation outliers into the weight (``x' = x / s``, ``W' = diag(s) W``), a rank-r branch
  ``L1 L2`` = SVD_r(W') stays in bf16 and runs beside the quantized matmul, and only the
  residual ``W' - L1 L2`` is quantized: ``y = Q_a(x') Q_w(R) + (x' L1) L2``.
* **SVD-LLM** (Wang et al. 2024): with ``X^T X = S S^T`` (Cholesky), the output error of a
  replacement ``W'`` is ``||X (W - W')||_F = ||S^T (W - W')||_F``. So take the SVD
  ``S^T W = U Sigma V^T`` and ``W' = S^{-T} U_r Sigma_r V_r^T``: the truncation error is
  exactly ``sqrt(sum of the dropped sigma_i^2)`` (the torch-layout statement
  ``W_t' = U_r Sigma_r V_r^T S^{-1}`` with SVD of ``W_t S`` is the transpose of this).
* **LoftQ** (Li et al. 2023): ``Q_t = quant(W - L_{t-1} R_{t-1})``,
  ``L_t R_t = SVD_r(W - dequant(Q_t))``, T times.
* **Low-rank correction**: after any quantizer (RTN, GPTQ, QuaRot, SpinQuant...),
  ``L R = SVD_r(W - dequant(Q))`` (whitened as in SVD-LLM when a Hessian is given, so it
  minimizes the *output* error) is added as a branch: ``QuaRot + SVD`` is
  ``lowrank_correction(quarot(...), rtn(quarot(...)))``.

Branches go to the layer's ``lowrank_a`` [K, r] / ``lowrank_b`` [r, N] aux entries and
smoothing to ``input_mul`` (see :mod:`jquant.nn`); they compose with an existing
``input_mul`` (multiplied in) and refuse to smooth a layer that already has an online
``hadamard`` (the multiplier would act before the rotation, in the wrong basis).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jquant.algorithms.linear_tree import (
    Variables,
    float_kernel,
    get_aux,
    get_kernel,
    hessian,
    is_quantized,
    layer_stat,
    linear_paths,
    match_paths,
    select_layers,
    update_layer,
)
from jquant.coded import LowRankArray
from jquant.formats import QSpec, parse_spec
from jquant.policy import Policy
from jquant.qarray import QArray, dequantize, dequantize_any, quantize
from jquant.transform import Context, Transform

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST


def _mm(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, precision=_HI)


# --- building blocks ------------------------------------------------------------------------
def smoothing_scales(absmax_x: Array, w: Array, alpha: float, eps: float = 1e-5) -> Array:
    """SmoothQuant/SVDQuant migration ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` ([K]).

    ``w`` is a Flax kernel [K, N]: ``max|W_j|`` is over row j (input channel j). Channels
    that never fire (``max|X_j| = 0``) get ``s_j = 1``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    ax = jnp.asarray(absmax_x, jnp.float32)
    if ax.shape != (w.shape[0],):
        raise ValueError(f"absmax has shape {ax.shape}, expected ({w.shape[0]},) for a kernel of shape {w.shape}")
    wmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=1)
    s = jnp.maximum(ax, eps) ** alpha / jnp.maximum(wmax, eps) ** (1.0 - alpha)
    return jnp.where(ax > 0, s, 1.0)


def svd_lowrank(m: Array, rank: int) -> tuple[Array, Array]:
    """Best rank-``rank`` factors ``(a [K, r], b [r, N])`` of ``m`` in Frobenius norm."""
    _check_rank(rank, m.shape)
    u, s, vt = jnp.linalg.svd(m.astype(jnp.float32), full_matrices=False)
    r = jnp.sqrt(s[:rank])
    return u[:, :rank] * r, r[:, None] * vt[:rank]


def _check_rank(rank: int, shape: tuple[int, ...]) -> None:
    if not isinstance(rank, int) or rank < 1 or rank > min(shape):
        raise ValueError(f"rank must be an integer in [1, {min(shape)}] for a kernel of shape {shape}, got {rank!r}")


def whitening_factor(h: Array, damp: float = 0.0) -> Array:
    """Lower Cholesky factor ``S`` with ``h + damp*mean(diag)*I = S S^T``; raises if not PD."""
    h = jnp.asarray(h, jnp.float32)
    if damp:
        h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
    s = jnp.linalg.cholesky(h)
    if not bool(jnp.all(jnp.isfinite(s))):
        raise ValueError("activation covariance is not positive definite; raise `damp` (e.g. 1e-2)")
    return s


def whitened_lowrank(w: Array, h: Array, rank: int, damp: float = 0.0) -> tuple[Array, Array, Array]:
    """SVD-LLM's truncation-aware factors of ``w`` [K, N] for inputs with ``X^T X = h``.

    Returns ``(a [K, r], b [r, N], sigma)`` with ``a @ b = S^{-T} U_r Sigma_r V_r^T`` where
    ``S^T w = U Sigma V^T``. Then ``||X (w - a b)||_F^2 = sum(sigma[r:]**2)`` (exact when
    ``damp = 0``): the dropped singular values are the output error.
    """
    _check_rank(rank, w.shape)
    if h.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"hessian shape {h.shape} does not match kernel rows {w.shape[0]}")
    s = whitening_factor(h, damp)
    u, sig, vt = jnp.linalg.svd(_mm(s.T, w.astype(jnp.float32)), full_matrices=False)
    r = jnp.sqrt(sig[:rank])
    a = jax.scipy.linalg.solve_triangular(s.T, u[:, :rank] * r, lower=False)
    return a, r[:, None] * vt[:rank], sig


def _lowrank(m: Array, rank: int, h: Array | None, damp: float) -> tuple[Array, Array]:
    if h is None:
        return svd_lowrank(m, rank)
    a, b, _ = whitened_lowrank(m, h, rank, damp)
    return a, b


def lowrank_bytes(k: int, n: int, rank: int, dtype=jnp.bfloat16) -> int:
    """Memory of a rank-r branch of a [K, N] layer."""
    return (k + n) * rank * jnp.dtype(dtype).itemsize


def _merge_mul(aux: dict, path: str, new_mul: Array, method: str) -> Array:
    if "hadamard" in aux:
        raise ValueError(
            f"{path}: {method} smoothing after an online Hadamard is not expressible "
            "(input_mul acts before the rotation); smooth first, then rotate"
        )
    old = aux.get("input_mul")
    return new_mul if old is None else jnp.asarray(old, jnp.float32) * new_mul


# --- SVDQuant -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SVDQuantConfig:
    """SVDQuant: ``rules`` pick the layers and the residual's spec (e.g. ``"int4/g64"``)."""

    rules: Any = "int4/g64"
    rank: int = 32
    alpha: float = 0.5  # smoothing strength; 0 disables smoothing
    lowrank_dtype: str = "bfloat16"
    whiten: bool = False  # truncation-aware (SVD-LLM) branch instead of plain SVD
    damp: float = 1e-2


def svdquant_split(
    w: Array, absmax_x: Array | None, rank: int, alpha: float, h: Array | None = None, damp: float = 1e-2
) -> tuple[Array, Array, Array, Array]:
    """The exact float split ``(mul [K], a [K, r], b [r, N], residual [K, N])``.

    ``x W == (x * mul) @ (a @ b + residual)`` for every ``x``; ``h`` (the layer's ``X^T X``)
    makes the branch truncation-aware.
    """
    w = w.astype(jnp.float32)
    if alpha > 0:
        if absmax_x is None:
            raise ValueError("smoothing (alpha > 0) needs the layer's activation absmax")
        s = smoothing_scales(absmax_x, w, alpha)
    else:
        s = jnp.ones((w.shape[0],), jnp.float32)
    ws = s[:, None] * w
    hs = None if h is None else h / s[:, None] / s[None, :]
    a, b = _lowrank(ws, rank, hs, damp)
    return 1.0 / s, a, b, ws - _mm(a, b)


def svdquant(variables: Variables, stats: Any, config: SVDQuantConfig = SVDQuantConfig()) -> dict:
    """SVDQuant every layer ``config.rules`` selects: smoothing in ``input_mul``, the rank-r
    branch in ``lowrank_a``/``lowrank_b`` (``lowrank_dtype``), the residual quantized."""
    out = dict(variables)
    ldt = jnp.dtype(config.lowrank_dtype)
    for path, spec in select_layers(variables, config.rules, "svdquant"):
        w = float_kernel(out, path, "svdquant")
        aux = get_aux(out, path)
        if "lowrank_a" in aux:
            raise ValueError(f"{path}: svdquant on a layer that already has a low-rank branch")
        absmax = layer_stat(stats, path, "absmax") if config.alpha > 0 else None
        h = hessian(stats, path) if config.whiten else None
        mul, a, b, res = svdquant_split(w, absmax, config.rank, config.alpha, h, config.damp)
        new_aux = {"lowrank_a": a.astype(ldt), "lowrank_b": b.astype(ldt)}
        if config.alpha > 0:
            new_aux["input_mul"] = _merge_mul(aux, path, mul, "svdquant")
        q = quantize(res.astype(w.dtype), spec, path=f"{path}/kernel")
        out = update_layer(out, path, kernel=q, aux=new_aux)
    return out


# --- SVD-LLM --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SVDLLMConfig:
    """SVD-LLM compression of the layers whose module path matches ``pattern``.

    Give ``rank`` or ``ratio`` (kept fraction of the layer's parameters:
    ``r = ratio * K * N / (K + N)``).
    """

    pattern: str = ".*"
    rank: int | None = None
    ratio: float | None = None
    damp: float = 1e-4
    dtype: str = "float32"  # factor storage dtype


def rank_for_ratio(k: int, n: int, ratio: float) -> int:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return max(1, min(min(k, n), int(ratio * k * n / (k + n))))


def svd_llm(variables: Variables, stats: Any, config: SVDLLMConfig) -> dict:
    """Replace each matching float kernel by a :class:`LowRankArray` (whitened truncation)."""
    if (config.rank is None) == (config.ratio is None):
        raise ValueError("SVDLLMConfig needs exactly one of rank or ratio")
    out = dict(variables)
    paths = match_paths(variables, config.pattern)
    if not paths:
        raise ValueError(
            f"svd_llm: no linear layer matches pattern {config.pattern!r}; layers: {linear_paths(variables)}"
        )
    for path in paths:
        w = float_kernel(out, path, "svd_llm")
        k, n = w.shape
        rank = config.rank if config.rank is not None else rank_for_ratio(k, n, config.ratio)
        a, b, _ = whitened_lowrank(w, hessian(stats, path), rank, config.damp)
        dt = jnp.dtype(config.dtype)
        out = update_layer(out, path, kernel=LowRankArray(a.astype(dt), b.astype(dt), dtype=w.dtype))
    return out


# --- LoftQ ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoftQConfig:
    rules: Any = "int4/g64"
    rank: int = 32
    iters: int = 5
    whiten: bool = False  # use the layer Hessian (output error) instead of Frobenius
    damp: float = 1e-2
    lowrank_dtype: str = "bfloat16"


def loftq_weight(
    w: Array, spec: QSpec | str, rank: int, iters: int, h: Array | None = None, damp: float = 1e-2, path: str = ""
) -> tuple[QArray, Array, Array, list[float]]:
    """LoftQ's alternation; returns ``(Q_T, a, b, errors)`` with ``W ~ dequant(Q_T) + a b``.

    ``errors[t]`` is ``||W - dequant(Q_t) - a_t b_t||_F / ||W||_F`` (weighted by ``h``
    when given) after iteration t.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    spec = parse_spec(spec)
    w32 = w.astype(jnp.float32)
    a = jnp.zeros((w.shape[0], rank), jnp.float32)
    b = jnp.zeros((rank, w.shape[1]), jnp.float32)
    errors = []
    q = None
    for _ in range(iters):
        q = quantize((w32 - _mm(a, b)).astype(w.dtype), spec, path=path)
        e = w32 - dequantize(q, jnp.float32)
        a, b = _lowrank(e, rank, h, damp)
        errors.append(_weighted_rel(e - _mm(a, b), w32, h))
    return q, a, b, errors


def _weighted_rel(e: Array, w: Array, h: Array | None) -> float:
    if h is None:
        return float(jnp.linalg.norm(e) / jnp.linalg.norm(w))
    return float(jnp.sqrt(jnp.sum(e * _mm(h, e)) / jnp.sum(w * _mm(h, w))))


def loftq(variables: Variables, stats: Any, config: LoftQConfig = LoftQConfig()) -> dict:
    """LoftQ on every layer ``config.rules`` selects (branch in ``lowrank_a``/``lowrank_b``)."""
    out = dict(variables)
    ldt = jnp.dtype(config.lowrank_dtype)
    for path, spec in select_layers(variables, config.rules, "loftq"):
        w = float_kernel(out, path, "loftq")
        if "lowrank_a" in get_aux(out, path):
            raise ValueError(f"{path}: loftq on a layer that already has a low-rank branch")
        h = hessian(stats, path) if config.whiten else None
        q, a, b, _ = loftq_weight(w, spec, config.rank, config.iters, h, config.damp, path=f"{path}/kernel")
        out = update_layer(out, path, kernel=q, aux={"lowrank_a": a.astype(ldt), "lowrank_b": b.astype(ldt)})
    return out


# --- low-rank correction of any quantizer ---------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CorrectionConfig:
    """Rank-r correction of the quantization error ``W - dequant(Q)`` of each quantized layer."""

    rank: int = 32
    whiten: bool = True  # minimize the output error with the layer Hessian (needs stats)
    damp: float = 1e-2
    lowrank_dtype: str = "bfloat16"
    pattern: str = ".*"


def _same_basis(ref: dict, q: dict, path: str) -> None:
    for k in ("input_mul", "hadamard"):
        if (k in ref) != (k in q):
            raise ValueError(f"{path}: reference and quantized trees differ in aux {k!r}: not in the same basis")
    if "input_mul" in ref and not bool(jnp.allclose(ref["input_mul"], q["input_mul"])):
        raise ValueError(f"{path}: reference and quantized trees have different input_mul: not in the same basis")


def lowrank_correction(
    reference: Variables, quantized: Variables, stats: Any, config: CorrectionConfig = CorrectionConfig()
) -> dict:
    """Add ``SVD_r(W_ref - dequant(Q) - existing branch)`` to every quantized layer.

    ``reference`` is the float tree in the same basis as ``quantized`` (what was handed to
    the quantizer, after rotations and smoothing). Existing branches are extended
    (ranks add up).
    """
    out = dict(quantized)
    ldt = jnp.dtype(config.lowrank_dtype)
    done = 0
    for path in match_paths(quantized, config.pattern):
        wq = get_kernel(quantized, path)
        if not is_quantized(wq):
            continue
        w = get_kernel(reference, path)
        if is_quantized(w):
            raise ValueError(f"{path}: the reference kernel is quantized; pass the float tree given to the quantizer")
        aq, ar = get_aux(quantized, path), get_aux(reference, path)
        _same_basis(ar, aq, path)
        e = w.astype(jnp.float32) - dequantize_any(wq, jnp.float32)
        if "lowrank_a" in aq:
            e = e - _mm(aq["lowrank_a"].astype(jnp.float32), aq["lowrank_b"].astype(jnp.float32))
        h = hessian(stats, path) if config.whiten else None
        a, b = _lowrank(e, config.rank, h, config.damp)
        if "lowrank_a" in aq:
            a = jnp.concatenate([aq["lowrank_a"].astype(jnp.float32), a], axis=1)
            b = jnp.concatenate([aq["lowrank_b"].astype(jnp.float32), b], axis=0)
        out = update_layer(out, path, aux={"lowrank_a": a.astype(ldt), "lowrank_b": b.astype(ldt)})
        done += 1
    if not done:
        raise ValueError("lowrank_correction: no quantized layer matches; quantize first")
    return out


def quantize_and_correct(
    variables: Variables,
    stats: Any,
    config: CorrectionConfig,
    quantize_fn: Callable[[Variables, Any], Variables],
) -> dict:
    """``quantize_fn(variables, stats)`` followed by :func:`lowrank_correction`: one step
    of a recipe (e.g. ``rotate -> smooth -> quantize_and_correct(gptq)``)."""
    return lowrank_correction(variables, quantize_fn(variables, stats), stats, config)


def _rank(rank: int | None, ctx: Context) -> int:
    return int(rank) if rank is not None else max(1, min(32, ctx.width // 8))


def transform(policy: Policy, rank: int | None = None, alpha: float = 0.5) -> Transform:
    """SVDQuant: smoothing, a rank-r bf16 branch (default ``min(32, width / 8)``), the
    residual quantized per the policy."""

    def fn(v: Variables, ctx: Context) -> Variables:
        cfg = SVDQuantConfig(rules=policy.rules(ctx.roles), rank=_rank(rank, ctx), alpha=alpha)
        out = svdquant(v, ctx.stats(v), cfg)
        return {**out, "params": policy.cast(out["params"], ctx.roles)}

    return Transform(f"svdquant[{policy.name}]", fn, True)


def correct(inner: Transform, rank: int | None = None) -> Transform:
    """``inner`` then a rank-r low-rank correction of each quantized layer's error
    (whitened by the layer's trajectory Hessian)."""

    def fn(v: Variables, ctx: Context) -> Variables:
        cfg = CorrectionConfig(rank=_rank(rank, ctx))
        return quantize_and_correct(v, ctx.stats(v), cfg, lambda vv, _st: inner(vv, ctx))

    return Transform(f"{inner.name} + lowrank", fn, True)


def loftq_transform(policy: Policy, rank: int | None = None, iters: int = 5) -> Transform:
    """LoftQ: ``iters`` alternations of quantizing per the policy and a rank-r bf16 SVD of the
    error (default rank as :func:`transform`); data-free."""

    def fn(v: Variables, ctx: Context) -> Variables:
        out = loftq(v, None, LoftQConfig(rules=policy.rules(ctx.roles), rank=_rank(rank, ctx), iters=iters))
        return {**out, "params": policy.cast(out["params"], ctx.roles)}

    return Transform(f"loftq[{policy.name}]", fn)
