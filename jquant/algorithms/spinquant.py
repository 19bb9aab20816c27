"""SpinQuant (Liu et al. 2024): rotations learned with optax on the Stiefel manifold.

A rotation is parameterized by the Cayley transform of a skew-symmetric matrix,
``R = R0 (I - A)^{-1} (I + A)`` with ``A = P - P^T`` (``(I + A)`` and ``(I - A)^{-1}`` commute,
so this is also ``(I + A)(I - A)^{-1}``): orthogonal for every ``P``, so plain Adam/SGD on
``P`` (jitted, a ``lax.scan`` over steps) never leaves the manifold. ``R0`` is the starting
rotation (a randomized Hadamard, SpinQuant's initialization) and ``P = 0`` starts there.

The loss is the quantized output error of the layers the rotation touches, on calibration
activations, with straight-through fake quantization of weights and activations:
``||Q_a(x R) Q_w(R^T W) - x W||^2 / ||x W||^2`` for a layer whose input is rotated, and
``||Q_a(x) Q_w(W R) - x W R||^2`` for a producer whose output is rotated.

Where a DiT can execute a learned rotation (see :mod:`jquant.algorithms.quarot`): a dense
learned rotation costs a K x K matmul per token online, so it must be *fused offline*, and
a DiT's adaLN modulation leaves one such site per attention: the head-wise V/O pair
(SpinQuant's R2, ``head_dim`` x ``head_dim``, shared by all heads). :func:`spinquant`
learns that rotation per attention (with the online Hadamards QuaRot puts on the other
inputs included in the loss), fuses it, and adds the same online Hadamards. With
``steps=0`` it *is* QuaRot with the same seed, so any gain is the learning's.
:func:`learn_rotation` learns a full input rotation of one layer (executable where it can
be folded into the op producing that layer's input).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from jquant.algorithms import quarot as qr
from jquant.algorithms.linear_tree import Variables, get_kernel
from jquant.formats import QSpec, parse_spec
from jquant.hadamard import apply_hadamard, random_hadamard, rht_signs
from jquant.transform import Context, Transform

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST


def _mm(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, precision=_HI)


# --- parameterization ------------------------------------------------------------------------------
def cayley(p: Array) -> Array:
    """Orthogonal ``(I - A)^{-1} (I + A)`` of the skew-symmetric ``A = p - p^T``."""
    a = p - p.T
    eye = jnp.eye(p.shape[0], dtype=p.dtype)
    return jnp.linalg.solve(eye - a, eye + a)


def orthogonality_error(r: Array) -> float:
    """``max |R R^T - I|``."""
    r = jnp.asarray(r, jnp.float32)
    return float(jnp.max(jnp.abs(_mm(r, r.T) - jnp.eye(r.shape[0]))))


def ste_quant(x: Array, spec: QSpec | str) -> Array:
    """Fake-quantize ``x`` (symmetric int ``spec``) with a straight-through *rounding*.

    Scales ``max|x| / qmax`` per block stay differentiable: ``s * (y + sg(round(y) - y))``
    with ``y = x / s`` passes the rounding residual's dependence on ``s`` to the gradient
    (a rotation mostly changes the quantization error through the block maxima).
    """
    spec = parse_spec(spec)
    f = spec.format
    if f.kind != "int" or not spec.symmetric:
        raise ValueError(f"ste_quant: the rotation loss supports symmetric int specs, got {spec}")
    block = spec.block_shape(x.shape)
    split = [d for n, b in zip(x.shape, block) for d in (n // b, b)]
    xb = x.reshape(split)
    amax = jnp.max(jnp.abs(xb), axis=tuple(range(1, xb.ndim, 2)), keepdims=True)
    scale = jnp.maximum(amax, 1e-12) / f.qmax
    y = xb / scale
    q = jnp.clip(jnp.round(y), f.qmin, f.qmax)
    return ((y + jax.lax.stop_gradient(q - y)) * scale).reshape(x.shape)


# --- the loss ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Term:
    """One layer's contribution to a rotation's loss.

    ``side="input"``: the rotation acts on the layer's input (``x R``, ``R^T W``), then the
    layer's online RHT if ``online`` (signs ``d``). ``side="output"``: on its output columns.
    """

    x: Array
    w: Array
    side: str
    online: bool = False
    d: Array | None = None


jax.tree_util.register_dataclass(_Term, data_fields=["x", "w", "d"], meta_fields=["side", "online"])


def _blockdiag_cols(m: Array, r: Array) -> Array:
    hd = r.shape[0]
    return _mm(m.reshape(*m.shape[:-1], -1, hd), r).reshape(m.shape)


def _term_error(term: _Term, r: Array, w_spec: QSpec | None, act: QSpec | None) -> tuple[Array, Array]:
    """(squared error, reference energy) of one term under rotation ``r`` (block-diagonal)."""
    if term.side == "input":
        y_ref = _mm(term.x, term.w)
        x = _blockdiag_cols(term.x, r)
        w = _blockdiag_cols(term.w.T, r).T  # diag(r)^T W
        if term.online:
            x = apply_hadamard(x * term.d, axis=-1)
            w = apply_hadamard(term.d[:, None] * w, axis=0)
    else:
        x = term.x
        w = _blockdiag_cols(term.w, r)
        y_ref = _mm(x, w)
    xq = x if act is None else ste_quant(x, act)
    y = _mm(xq, w if w_spec is None else ste_quant(w, w_spec))
    return jnp.sum(jnp.square(y - y_ref)), jnp.sum(jnp.square(y_ref))


def rotation_loss(r: Array, terms: Sequence[_Term], w_spec: QSpec | str | None, act: QSpec | str | None) -> Array:
    """Mean over terms of the relative quantized output error under rotation ``r``
    (``w_spec=None``: weights unquantized, as when GPTQ quantizes them afterwards)."""
    w_spec = None if w_spec is None else parse_spec(w_spec)
    act = None if act is None else parse_spec(act)
    total = 0.0
    for t in terms:
        e, ref = _term_error(t, r, w_spec, act)
        total = total + e / jnp.maximum(ref, 1e-30)
    return total / len(terms)


def _optimizer(name: str, lr: float) -> optax.GradientTransformation:
    if name == "adam":
        return optax.adam(lr)
    if name == "sgd":
        return optax.sgd(lr, momentum=0.9)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def optimize_rotation(
    r0: Array,
    terms: Sequence[_Term],
    w_spec: QSpec | str | None,
    act: QSpec | str | None,
    *,
    steps: int,
    lr: float,
    optimizer: str = "adam",
) -> tuple[Array, Array]:
    """Minimize :func:`rotation_loss` over ``R = r0 cayley(P)`` from ``P = 0``.

    Returns ``(R, losses)``, ``losses[i]`` the loss before step i and ``losses[-1]`` the final one.
    """
    w_spec = None if w_spec is None else parse_spec(w_spec)
    act = None if act is None else parse_spec(act)
    if w_spec is None and act is None:
        raise ValueError("optimize_rotation: nothing is quantized (w_spec and act are both None)")
    opt = _optimizer(optimizer, lr)
    r0 = jnp.asarray(r0, jnp.float32)

    def loss(p, ts):
        return rotation_loss(_mm(r0, cayley(p)), ts, w_spec, act)

    @jax.jit
    def run(ts):
        p0 = jnp.zeros_like(r0)

        def step(carry, _):
            p, st = carry
            val, g = jax.value_and_grad(loss)(p, ts)
            upd, st = opt.update(g, st, p)
            return (optax.apply_updates(p, upd), st), val

        (p, _), losses = jax.lax.scan(step, (p0, opt.init(p0)), None, length=steps)
        return p, jnp.concatenate([losses, loss(p, ts)[None]])

    p, losses = run(list(terms))
    return _mm(r0, cayley(p)), losses


# --- per-layer API -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SpinQuantConfig:
    """SpinQuant options.

    Attributes:
      w_spec / act: the weight and activation specs of the loss. ``act=None``: weight-only;
        ``w_spec=None``: activations only (the paper's setting when GPTQ quantizes the
        weights afterwards; keeping RTN weights in the loss did better before GPTQ in
        jquant's tables, docs/methods.md).
      steps / lr / optimizer: the optax run ("adam" or "sgd" with momentum).
      vo_groups / head_dim: the attentions whose V/O rotation is learned (as in QuaRot).
      online / skip: layers that get QuaRot's online RHT (regexes over module paths).
      seed: seed of the RHT initialization and of the online signs.
      max_tokens: calibration rows used per layer (the first ones).
    """

    w_spec: str | None = "int4"
    act: str | None = "int4/token"
    steps: int = 200
    lr: float = 1e-3
    optimizer: str = "adam"
    vo_groups: tuple = ()
    head_dim: int = 64
    online: str = ".*"
    skip: str | None = None
    seed: int = 0
    max_tokens: int = 2048


def learn_rotation(
    x: Array, w: Array, config: SpinQuantConfig = SpinQuantConfig(), r0: Array | None = None
) -> tuple[Array, Array]:
    """Learn a full input rotation of one layer ``y = x W``: ``(R [K, K], losses)``.

    Starts from ``r0`` (default: the RHT of ``config.seed``). Use ``x R`` and ``R^T W``
    (``R`` folded into the op producing ``x``).
    """
    x = jnp.asarray(x, jnp.float32).reshape(-1, w.shape[0])[: config.max_tokens]
    r0 = random_hadamard(w.shape[0], config.seed) if r0 is None else r0
    term = _Term(x, jnp.asarray(w, jnp.float32), "input")
    return optimize_rotation(
        r0, [term], config.w_spec, config.act, steps=config.steps, lr=config.lr, optimizer=config.optimizer
    )


# --- the tree method -----------------------------------------------------------------------------------
def _samples(samples: Mapping[str, Array], path: str, max_tokens: int) -> Array:
    x = samples.get(path) if isinstance(samples, Mapping) else None
    if x is None:
        raise KeyError(
            f"spinquant: no activation samples for layer {path!r}; pass "
            "linear_tree.capture_inputs(model, variables, *batch) as the statistics"
        )
    return jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])[:max_tokens]


def _vo_terms(
    variables: Variables, samples, v_paths, o_paths, online: set[str], config: SpinQuantConfig
) -> list[_Term]:
    terms = []
    for path in v_paths:
        x = _samples(samples, path, config.max_tokens)
        w = jnp.asarray(get_kernel(variables, path), jnp.float32)
        if path in online:  # V's own input rotation is fixed: precompute it
            d = rht_signs(w.shape[0], config.seed)
            x = apply_hadamard(x * d, axis=-1)
            w = apply_hadamard(d[:, None] * w, axis=0)
        terms.append(_Term(x, w, "output"))
    for spec in o_paths:
        path, rows = qr._parse_consumer(spec)
        if rows != slice(None):
            raise ValueError(f"spinquant: {path}: row-sliced output projections are not supported in the loss")
        w = jnp.asarray(get_kernel(variables, path), jnp.float32)
        on = path in online
        terms.append(
            _Term(
                _samples(samples, path, config.max_tokens),
                w,
                "input",
                on,
                rht_signs(w.shape[0], config.seed) if on else None,
            )
        )
    return terms


def spinquant(variables: Variables, samples: Mapping[str, Array], config: SpinQuantConfig) -> dict:
    """Learn each ``vo_groups`` rotation, fuse it (exact), then add QuaRot's online RHTs.

    ``samples`` maps module paths to input activations of the *unrotated* float model
    (:func:`jquant.algorithms.linear_tree.capture_inputs`). Returns the float model
    rewritten exactly; quantize it next (RTN/GPTQ on recalibrated statistics).
    """
    return spinquant_with_losses(variables, samples, config)[0]


def spinquant_with_losses(
    variables: Variables, samples: Mapping[str, Array], config: SpinQuantConfig
) -> tuple[dict, list[Array]]:
    """:func:`spinquant` that also returns each group's loss curve."""
    if not config.vo_groups:
        raise ValueError(
            "spinquant: config.vo_groups is empty; nothing to learn (use quarot for online rotations only)"
        )
    qcfg = qr.QuaRotConfig(online=config.online, skip=config.skip, head_dim=config.head_dim, seed=config.seed)
    online = set(qr.online_paths(variables, qcfg))
    r0 = qr.head_rotation(config.head_dim, config.seed)
    out, curves = dict(variables), []
    for v_paths, o_paths in config.vo_groups:
        terms = _vo_terms(variables, samples, v_paths, o_paths, online, config)
        r, losses = optimize_rotation(
            r0, terms, config.w_spec, config.act, steps=config.steps, lr=config.lr, optimizer=config.optimizer
        )
        out = qr.rotate_heads(out, v_paths, o_paths, r)
        curves.append(losses)
    for path in qr.online_paths(out, qcfg):
        out = qr.rotate_input(out, path, config.seed)
    return out, curves


def transform(
    act: str = "int4/token",
    steps: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    max_tokens: int = 1024,
    w_spec: str | None = "int4",
) -> Transform:
    """SpinQuant: the head-wise V/O rotations *learned* (Cayley/optax) to minimize the output
    error with ``w_spec`` weights (RTN, fake-quantized) and ``act`` activations on trajectory
    activation samples, fused (exact), plus QuaRot's online Hadamards. Weights are quantized by
    the next step (e.g. GPTQ). ``w_spec=None`` is the paper's activation-only loss; with the
    weights in the loss, GPTQ afterwards reached a lower held-out error than QuaRot + GPTQ in 5
    of 6 cases of docs/methods.md, against 2 of 6 with the activation-only loss."""

    def fn(v: Variables, ctx: Context) -> Variables:
        if ctx.samples is None:
            raise ValueError("spinquant needs activation samples: run it through jquant.pipeline.calibrate.quantize")
        plan = qr.dit_plan(v["params"], ctx.roles, ctx.head_dim, seed=seed)
        cfg = SpinQuantConfig(
            w_spec=w_spec,
            act=act,
            steps=steps,
            lr=lr,
            vo_groups=plan.vo_groups,
            head_dim=ctx.head_dim,
            online=plan.online,
            seed=seed,
            max_tokens=max_tokens,
        )
        return spinquant(v, ctx.samples(v, max_tokens), cfg)

    return Transform("spinquant", fn, True)
