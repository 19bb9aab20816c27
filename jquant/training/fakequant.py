"""Fake quantization for training: LSQ learnable scales and the training forward.

:func:`lsq` is quantize-dequantize with a straight-through gradient for the input (zero
outside the clipping range) and the LSQ gradient for the scale (Esser et al. 2020,
"Learned Step Size Quantization"): ``d y / d s = round(x/s) - x/s`` inside the range,
``qmin`` / ``qmax`` outside, scaled by ``g = 1 / sqrt(numel * qmax)`` (``numel``: the
elements that share one scale) so that scale updates keep the size of weight updates.

:class:`FakeQuant` is the trainable stand-in of a QArray kernel: the latent float weight
and its per-block scale (a pytree whose two leaves optax updates; the spec is static).
:func:`from_quantized` turns PTQ output (QArray kernels) into FakeQuant kernels that
reproduce it exactly at step 0; :func:`to_quantized` turns them back into QArrays with
the learned scales (what the jitted sampler and checkpoints take).

:func:`fake_quantized` is the training counterpart of :func:`jquant.nn.quantized`: inside
it, linen ``Dense/DenseGeneral`` layers whose kernel is a FakeQuant run
``fake-quant(x) @ fake-quant(W)`` differentiably, with the layer's aux entries
(``input_mul``, ``hadamard``, ``lowrank_a``/``lowrank_b``) applied as the dispatch does,
activations fake-quantized dynamically per token (STE) or with static scales taken from
a trainable scale table (LSQ).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jquant import nn as jnn
from jquant.formats import QSpec, parse_spec
from jquant.hadamard import apply_block_hadamard
from jquant.qarray import QArray, decode_scale, dequantize, fake_quant, quantize

Array = jax.Array


# --- LSQ -------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def lsq(x: Array, s: Array, qmin: float, qmax: float, grad_scale: float) -> Array:
    """``clip(round(x / s), qmin, qmax) * s`` (``s`` broadcastable to ``x``) with LSQ gradients."""
    return jnp.clip(jnp.round(x / s), qmin, qmax) * s


def _lsq_fwd(x, s, qmin, qmax, grad_scale):
    return lsq(x, s, qmin, qmax, grad_scale), (x, s)


def _lsq_bwd(qmin, qmax, grad_scale, res, g):
    x, s = res
    v = x / s
    inside = (v >= qmin) & (v <= qmax)
    dx = jnp.where(inside, g, 0.0).astype(x.dtype)
    ds_elem = g * jnp.where(v < qmin, qmin, jnp.where(v > qmax, qmax, jnp.round(v) - v)) * grad_scale
    return dx, _sum_to(ds_elem, s.shape).astype(s.dtype)


def _sum_to(a: Array, shape: tuple[int, ...]) -> Array:
    """Sum ``a`` down to the (right-aligned, broadcastable) ``shape``: the transpose of a broadcast."""
    lead = a.ndim - len(shape)
    a = jnp.sum(a, axis=tuple(range(lead))) if lead else a
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
    return jnp.sum(a, axis=axes, keepdims=True) if axes else a


lsq.defvjp(_lsq_fwd, _lsq_bwd)


def _int_range(spec: QSpec, path: str) -> tuple[float, float]:
    f = spec.format
    if f.kind != "int" or not spec.symmetric or spec.scaling:
        raise ValueError(f"{path}: LSQ trains symmetric integer formats with plain scales, got {spec}")
    return float(f.qmin), float(f.qmax)


def expand_blocks(s: Array, shape: tuple[int, ...]) -> Array:
    """Per-block scales ``s`` repeated to the full ``shape`` (block = ``shape // s.shape``)."""
    for ax, (n, m) in enumerate(zip(shape, s.shape)):
        if m != n:
            s = jnp.repeat(s, n // m, axis=ax)
    return s


# --- trainable kernels -----------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class FakeQuant:
    """A trainable quantized kernel: latent float weight ``w`` and per-block scale ``scale``
    (``w.shape // scale.shape`` is the spec's block); ``spec`` is static."""

    w: Array
    scale: Array
    spec: QSpec = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def ndim(self) -> int:
        return self.w.ndim

    @property
    def dtype(self):
        return self.w.dtype

    def value(self, path: str = "") -> Array:
        """The fake-quantized weight (differentiable in ``w`` and ``scale``)."""
        qmin, qmax = _int_range(self.spec, path)
        numel = math.prod(self.w.shape) // math.prod(self.scale.shape)
        s = expand_blocks(jnp.abs(self.scale) + 1e-12, self.w.shape)
        return lsq(self.w, s, qmin, qmax, 1.0 / math.sqrt(numel * qmax))


def is_fake_quant(x: Any) -> bool:
    return isinstance(x, FakeQuant)


def from_quantized(params: Any) -> Any:
    """QArray kernels -> :class:`FakeQuant` (latent weight = the dequantized QArray, scale =
    its decoded scale), so the fake-quant forward starts exactly at the PTQ model."""

    def one(leaf: Any) -> Any:
        if not isinstance(leaf, QArray):
            return leaf
        if leaf.zero_point is not None or leaf.scale2 is not None or leaf.spec.scaling:
            raise ValueError(f"from_quantized: {leaf.spec} is not a symmetric integer format LSQ trains")
        return FakeQuant(dequantize(leaf, jnp.float32), decode_scale(leaf), leaf.spec)

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, QArray))


def init_fake_quant(params: Any, spec: QSpec | str, select: Any) -> Any:
    """Float kernels chosen by ``select(path, leaf) -> bool`` -> FakeQuant at ``spec`` with
    absmax scales (the RTN starting point)."""
    spec = parse_spec(spec)

    def one(kp, leaf):
        path = "/".join(str(getattr(k, "key", k)) for k in kp)
        if not select(path, leaf):
            return leaf
        q = quantize(leaf, spec, path=path)
        return FakeQuant(jnp.asarray(leaf, jnp.float32), decode_scale(q), spec)

    return jax.tree_util.tree_map_with_path(one, params)


def to_quantized(params: Any) -> Any:
    """FakeQuant kernels -> QArrays with the learned scales (exactly the codes the fake-quant
    forward used: ``round(w / scale)`` clipped)."""

    def one(leaf: Any) -> Any:
        if not isinstance(leaf, FakeQuant):
            return leaf
        s = jnp.abs(leaf.scale) + 1e-12
        return quantize(leaf.w, leaf.spec, scale=s)

    return jax.tree.map(one, params, is_leaf=is_fake_quant)


def latent_float(params: Any) -> Any:
    """FakeQuant kernels -> their fake-quantized float value (for merging, inspection)."""
    return jax.tree.map(lambda x: x.value() if is_fake_quant(x) else x, params, is_leaf=is_fake_quant)


# --- the training forward -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainQuantConfig:
    """``act``: activation spec (dynamic ``"int4/token"``, or static ``"int8/t"`` whose scales
    come from ``act_scales``); ``act_scales``: ``{module path: input_scale}`` (already
    expanded to the batch by :func:`jquant.pipeline.tables.expand`), trained by LSQ."""

    act: QSpec | None = None
    act_scales: Mapping[str, Array] | None = None
    #: ``(compiled regex, dynamic spec or None)``: layers whose path matches take that spec
    #: (``jquant.nn.quantized``'s ``act_rules``, so training runs the model it will sample).
    act_rules: tuple = ()


class _State(threading.local):
    def __init__(self) -> None:
        self.config: TrainQuantConfig | None = None


_state = _State()


def _act_fake_quant(x: Array, path: str, cfg: TrainQuantConfig) -> Array:
    for regex, spec in cfg.act_rules:  # the first matching rule wins; its spec is dynamic
        if regex.search(path):
            return x if spec is None else fake_quant(x, spec)
    act = cfg.act
    if act is None:
        return x
    if act.dynamic:
        return fake_quant(x, act)
    if cfg.act_scales is None or path not in cfg.act_scales:
        raise KeyError(f"{path}: static training activations but no scale for this layer in act_scales")
    qmin, qmax = _int_range(act, path)
    s = jnp.abs(jnp.asarray(cfg.act_scales[path], jnp.float32)) + 1e-12
    numel = max(1, math.prod(x.shape) // max(1, s.size))
    return lsq(x.astype(jnp.float32), s, qmin, qmax, 1.0 / math.sqrt(numel * qmax)).astype(x.dtype)


def _interceptor(next_fun, args, kwargs, context):
    module = context.module
    cfg = _state.config
    if (
        cfg is None
        or context.method_name != "__call__"
        or not isinstance(module, (nn.Dense, nn.DenseGeneral))
        or module.is_initializing()
        or not module.has_variable("params", "kernel")
    ):
        return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    aux = {k: module.get_variable(jnn.AUX_COLLECTION, k) for k in jnn.AUX_KEYS}
    aux = {k: v for k, v in aux.items() if v is not None}
    if not isinstance(kernel, FakeQuant) and not aux:
        return next_fun(*args, **kwargs)
    path = "/".join(module.scope.path)
    x = args[0] if args else kwargs["inputs"]
    contract = 1
    if isinstance(module, nn.DenseGeneral):
        axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        axis = tuple(sorted(a % x.ndim for a in axis))
        if module.batch_dims or axis != tuple(range(x.ndim - len(axis), x.ndim)):
            raise ValueError(f"{path}: training fake-quant supports DenseGeneral over the trailing axes only")
        contract = len(axis)
    if module.dtype is not None:
        x = x.astype(module.dtype)
    if "input_mul" in aux:
        x = x * aux["input_mul"].astype(x.dtype)
    if "hadamard" in aux:  # full width or block-diagonal, as the entry says (jquant.nn.hadamard_block)
        x = apply_block_hadamard(x, jnn.hadamard_block(aux["hadamard"]), axis=-1).astype(x.dtype)
    batch = x.shape[: x.ndim - contract]
    x2 = x.reshape(*batch, -1)
    if isinstance(kernel, FakeQuant):
        w = kernel.value(path)
        x2 = _act_fake_quant(x2, path, cfg)
    else:
        w = dequantize(kernel, jnp.float32) if isinstance(kernel, QArray) else kernel
    feat = w.shape[contract:]
    w2 = w.reshape(-1, math.prod(feat)).astype(x.dtype)
    y = x2 @ w2
    if "lowrank_a" in aux:
        a, b = aux["lowrank_a"], aux["lowrank_b"]
        y = y + (x2 @ a.reshape(-1, a.shape[-1]).astype(x.dtype)) @ b.reshape(b.shape[0], -1).astype(x.dtype)
    y = y.reshape(*batch, *feat)
    if module.has_variable("params", "bias"):
        bias = dequantize(module.get_variable("params", "bias")).astype(y.dtype)
        y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
    return y


@contextlib.contextmanager
def fake_quantized(
    act: QSpec | str | None = None,
    act_scales: Mapping[str, Array] | None = None,
    act_rules: Sequence[tuple[str, QSpec | str | None]] = (),
) -> Iterator[None]:
    """Run linen models with FakeQuant kernels differentiably (see module docstring);
    ``act_rules`` as in ``jquant.nn.quantized``."""
    prev = _state.config
    rules = jnn.compile_act_rules(act_rules)
    _state.config = TrainQuantConfig(None if act is None else parse_spec(act), act_scales, rules)
    try:
        with nn.intercept_methods(_interceptor):
            yield
    finally:
        _state.config = prev


def trainable_count(params: Any) -> int:
    """Number of trainable scalars (FakeQuant leaves count their weight and scale)."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))
