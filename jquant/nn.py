"""Running unmodified Flax models with quantized weights (and activations).

Interception, not editing: inside :func:`quantized` (or :func:`observe`), calls of
``flax.linen.Dense / DenseGeneral / Einsum`` are intercepted with
``flax.linen.intercept_methods``, and the ``flax.nnx.Linear / LinearGeneral / Einsum``
layers *of the NNX model named by* ``nnx_model`` are routed by giving those instances an
intercepting subclass for the duration of the context (no class is patched). The
replacement reads the layer's own kernel (a QArray or a float array) and bias and routes
the matmul through :func:`jquant.dispatch.linear`, the one place that decides how a
quantized matmul runs (XLA path or a Pallas kernel).

Modes:
  * weight-only (W*A16): ``act=None``.
  * dynamic activations: ``act="int8/token"`` (or ``"fp8_e4m3/token"``); ``"int8/token128"``
    keeps one scale per token per 128 channels (block-scaled GEMM, :func:`jquant.dispatch.block_scaled_dot`).
  * static activations: ``act="int8/t", static=True``; per-layer scales come from the
    ``"jquant"`` variable collection (linen) or the ``aux`` mapping (NNX), entry
    ``input_scale`` under the layer's module path.

Per-layer auxiliary data (collection ``"jquant"`` / ``aux``), all optional:
  ``input_scale`` static activation scale; ``input_mul`` per-input-channel multiplier
  applied to x first (SmoothQuant/AWQ scales that could not be folded);
  ``lowrank_a``/``lowrank_b`` a float low-rank branch ``(x @ A) @ B`` added to the output
  (SVDQuant); ``hadamard`` online Hadamard on x (weights pre-rotated by H^T): a scalar
  entry rotates over the whole input width, a 1-d entry of length ``b`` by a block-diagonal
  Hadamard of order-``b`` blocks (:func:`hadamard_entry`, :func:`hadamard_block`).
Observers (calibration) see every intercepted layer's input, keyed by module path.

Fused producers (``producers=True``, the default): a port's ``NormModulate`` (adaLN input) call
returns a :class:`jquant.producers.Produced`, and its consumers with ``int8/token128`` or
``fp8_e4m3/token128`` activations take the codes of one fused norm + modulation + quantization
pass instead of quantizing the float input each; a ``LinearAct`` (FFN-up) with block-scaled
weights does the same for FFN-down, from its GEMM's epilogue, and with per-token codes from the
quantizer that applies its bias and activation (:mod:`jquant.producers`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jquant import dispatch, producers
from jquant.formats import QSpec, parse_rule, parse_spec
from jquant.hadamard import apply_block_hadamard
from jquant.models.blocks import Attention, FeedForward, LinearAct, NormModulate
from jquant.producers import ActProduced, NormProduced, Produced
from jquant.qarray import QArray, dequantize

#: Modules that may receive a :class:`Produced`: the linear layers, and the port blocks whose
#: input reaches only linear layers (and ``.shape``); every other module gets the float value.
_TAKE_PRODUCED = (nn.Dense, nn.DenseGeneral, Attention, FeedForward, LinearAct)
AUX_COLLECTION = "jquant"
#: The per-layer aux entries a layer may carry in that collection (the one list every module reads).
AUX_KEYS = ("input_scale", "input_mul", "hadamard", "lowrank_a", "lowrank_b")
Observer = Callable[[str, jax.Array], None]


def hadamard_entry(block: int | None = None) -> jax.Array:
    """The aux ``hadamard`` entry: a scalar for a full-width rotation (the format of every
    older checkpoint), a length-``block`` vector for a block-diagonal one (shape, not value,
    carries the block: it stays static under jit)."""
    return jnp.ones((), jnp.int8) if block is None else jnp.ones((block,), jnp.int8)


def hadamard_block(entry: Any) -> int | None:
    """The block order an aux ``hadamard`` entry asks for; None for the full width."""
    return None if jnp.ndim(entry) == 0 else int(jnp.shape(entry)[-1])


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    act: QSpec | None = None
    static: bool = False
    backend: str = "auto"
    aux: Mapping[str, Mapping[str, Any]] | None = None
    #: ``(compiled regex, spec or None)`` pairs: the first whose pattern ``re.search``-es a layer's
    #: path sets that layer's activation spec (None: 16-bit activations); other layers take ``act``.
    act_rules: tuple[tuple[re.Pattern, QSpec | None], ...] = ()
    #: ``NormModulate`` calls return :class:`Produced` for consumers to take fused codes from.
    producers: bool = True
    #: Per-token consumers (``<fmt>/token``) take a norm producer's per-token codes too.
    token_producers: bool = False

    @property
    def takes_codes(self) -> bool:
        """Whether any layer's activation spec is one a fused producer makes (else producers idle)."""
        specs = (self.act, *(spec for _, spec in self.act_rules))
        return any(producers.takes(spec, self.token_producers) for spec in specs)

    def act_for(self, path: str) -> QSpec | None:
        """The activation spec of the layer at ``path`` (``act_rules`` first, then ``act``)."""
        for pattern, spec in self.act_rules:
            if pattern.search(path):
                return spec
        return self.act


class _State(threading.local):
    def __init__(self) -> None:
        self.config: QuantConfig | None = None
        self.observers: list[Observer] = []
        self.nnx_paths: dict[int, str] = {}


_state = _State()


# --- the replacement forward --------------------------------------------------------------
def _aux_get(aux: Mapping[str, Any] | None, name: str):
    return None if aux is None else aux.get(name)


def _run_linear(path: str, x: jax.Array, kernel, bias, aux, *, dtype=None, contract=None, einsum_str=None):
    """Shared forward of every intercepted layer."""
    cfg = _state.config or QuantConfig()
    if isinstance(x, Produced):
        xq = _produced_codes(path, x, kernel, aux, cfg, dtype, contract, einsum_str)
        if xq is not None:
            return _add_bias(dispatch.linear_quantized(xq, kernel, backend=cfg.backend), bias)
        x = x.value
    mul = _aux_get(aux, "input_mul")
    if mul is not None:
        x = x * mul.astype(x.dtype)
    a, b = _aux_get(aux, "lowrank_a"), _aux_get(aux, "lowrank_b")
    lowrank = None if a is None else (a, b)
    # The online rotation (full width, or block-diagonal: QuaRotConfig.online_block) goes to the
    # dispatch, which fuses it into the activation quantizer where it can, unless something here
    # needs the rotated x itself.
    flag = _aux_get(aux, "hadamard")
    rotate, block = flag is not None, None if flag is None else hadamard_block(flag)
    defer = (
        rotate
        and not _state.observers
        and einsum_str is None
        and lowrank is None
        and (dtype is None or jnp.dtype(dtype) == x.dtype)
    )
    if rotate and not defer:
        x = apply_block_hadamard(x, block, axis=-1).astype(x.dtype)
    for obs in _state.observers:
        obs(path, x)
    if dtype is not None:
        x = x.astype(dtype)
    act = cfg.act_for(path)
    act_scale = _aux_get(aux, "input_scale") if cfg.static else None
    if cfg.static and act is not None and act_scale is None and isinstance(kernel, QArray):
        raise KeyError(f"{path}: static activation mode but no 'input_scale' in the {AUX_COLLECTION!r} collection/aux")
    if dispatch.token_block(act) and isinstance(kernel, QArray):  # <fmt>/tokenN: the width must split
        k = x.shape[-1] if einsum_str is not None else math.prod(x.shape[x.ndim - (contract or 1) :])
        act.block_shape((k,), path)
    if einsum_str is not None:
        y = dispatch.einsum(einsum_str, x, kernel, act=act, act_scale=act_scale)
        if lowrank is not None:
            y = dispatch.add_lowrank(y, x, lowrank, contract or 1)
    else:
        y = dispatch.linear(
            x,
            kernel,
            contract=contract,
            act=act,
            act_scale=act_scale,
            backend=cfg.backend,
            lowrank=lowrank,
            hadamard=(block or True) if defer else False,
        )
    return _add_bias(y, bias)


def _add_bias(y: jax.Array, bias) -> jax.Array:
    if bias is None:
        return y
    bias = dequantize(bias).astype(y.dtype)
    return y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)


def _produced_codes(
    path: str, x: Produced, kernel, aux, cfg: QuantConfig, dtype, contract, einsum_str
) -> QArray | None:
    """The fused producer's codes for the layer at ``path``, or None where the layer needs the
    float input (a float kernel, aux data that acts on x other than a block-diagonal online
    rotation and a per-channel ``input_mul``, which the producer applies itself; observers,
    static scales, another activation spec or layout)."""
    flag = _aux_get(aux, "hadamard")
    block = None if flag is None else hadamard_block(flag)
    mul = _aux_get(aux, "input_mul")
    plain = (
        isinstance(kernel, QArray)
        and kernel.ndim == 2
        and (not aux or (set(aux) <= {"hadamard", "input_mul"} and (flag is None or block is not None)))
        and (mul is None or jnp.ndim(mul) == 1)
        and not _state.observers
        and not cfg.static
        and einsum_str is None
        and (contract or 1) == 1
        and (dtype is None or jnp.dtype(dtype) == x.dtype)
    )
    return x.quantized(cfg.act_for(path), block or 0, cfg.token_producers, mul) if plain else None


def _produce(module: NormModulate, next_fun, args, kwargs) -> Any:
    """A ``NormModulate`` call in a quantized run: its float value plus the producer's inputs (a
    norm without modulation gets zero shift and scale: ``(1 + 0) y + 0`` is ``y`` exactly)."""
    value = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs.get("x")
    shift = args[1] if len(args) > 1 else kwargs.get("shift")
    scale = args[2] if len(args) > 2 else kwargs.get("scale")
    if x is None or value.ndim != 3:
        return value
    if shift is None:  # NormModulate refuses a shift without a scale
        shift = scale = jnp.zeros((x.shape[0], x.shape[-1]), jnp.float32)
    params = {k: module.get_variable("params", k) for k in ("scale", "bias") if module.has_variable("params", k)}
    return NormProduced(value, x, shift, scale, module.eps, params.get("scale"), params.get("bias"))


def _produce_act(module: LinearAct, next_fun, args, kwargs, cfg: QuantConfig) -> Any:
    """A ``LinearAct`` (FFN-up) call in a quantized run: its float value, plus the FFN-up input's
    codes where ``proj`` takes a producer's codes (block-scaled, or per-token with
    ``token_producers``), so FFN-down can take the codes made from its output
    (:class:`jquant.producers.ActProduced`)."""
    value = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs.get("x")
    if module.gated or x is None or value.ndim != 3:
        return value
    variables = module.variables
    proj = variables.get("params", {}).get("proj", {})
    kernel, bias = proj.get("kernel"), proj.get("bias")
    if not isinstance(kernel, QArray) or kernel.ndim != 2:
        return value
    path = "/".join(module.scope.path) + "/proj"
    aux = variables.get(AUX_COLLECTION, {}).get("proj") or None
    if isinstance(x, Produced):
        xq = _produced_codes(path, x, kernel, aux, cfg, module.dtype, None, None)
    else:
        act = cfg.act_for(path)
        plain = aux is None and producers.takes(act) and jnp.dtype(module.dtype) == x.dtype
        xq = dispatch.quantize_activation(x, act, None) if plain else None
    return value if xq is None else ActProduced(value, xq, kernel, bias, module.act)


def _values(args: tuple) -> tuple:
    """``args`` with a :class:`Produced` first argument replaced by its float value."""
    return (args[0].value, *args[1:]) if args and isinstance(args[0], Produced) else args


def _active() -> bool:
    return _state.config is not None or bool(_state.observers)


# --- linen ----------------------------------------------------------------------------------
def _linen_aux(module: nn.Module) -> dict | None:
    aux = {k: module.get_variable(AUX_COLLECTION, k) for k in AUX_KEYS if module.has_variable(AUX_COLLECTION, k)}
    return aux or None


def _linen_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, (NormModulate, LinearAct)) and context.method_name == "__call__":
        cfg = _state.config
        if cfg is None or not cfg.producers or _state.observers or module.is_initializing() or not cfg.takes_codes:
            return next_fun(*args, **kwargs)
        if isinstance(module, LinearAct):
            return _produce_act(module, next_fun, args, kwargs, cfg)
        return _produce(module, next_fun, args, kwargs)
    if not isinstance(module, _TAKE_PRODUCED):
        args = _values(args)  # modules that use x as an array take the float value
    if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Einsum)):
        return next_fun(*args, **kwargs)
    if not _active() or module.is_initializing() or not module.has_variable("params", "kernel"):
        return next_fun(*_values(args), **kwargs)
    kernel = module.get_variable("params", "kernel")
    aux = _linen_aux(module)
    if not isinstance(kernel, QArray) and aux is None and _state.config is None and not _state.observers:
        return next_fun(*_values(args), **kwargs)
    path = "/".join(module.scope.path)
    bias = module.get_variable("params", "bias") if module.has_variable("params", "bias") else None
    x = args[0] if args else kwargs["inputs"]
    if isinstance(module, nn.Einsum):
        eq = (args[1] if len(args) > 1 else kwargs.get("einsum_str")) or module.einsum_str
        return _run_linear(path, x, kernel, bias, aux, dtype=module.dtype, einsum_str=eq.replace(" ", ""))
    contract = 1
    if isinstance(module, nn.DenseGeneral):
        x = x.value if isinstance(x, Produced) else x
        axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        if module.batch_dims:
            raise ValueError(f"{path}: quantized DenseGeneral with batch_dims is not supported")
        nd = x.ndim
        axis = tuple(sorted(a % nd for a in axis))
        if axis != tuple(range(nd - len(axis), nd)):
            x = jnp.moveaxis(x, axis, tuple(range(nd - len(axis), nd)))
        contract = len(axis)
    return _run_linear(path, x, kernel, bias, aux, dtype=module.dtype, contract=contract)


# --- nnx --------------------------------------------------------------------------------------
def _nnx_value(v):
    if v is None:
        return None
    return v.get_value() if hasattr(v, "get_value") else v.value


def _nnx_forward(cls_call):
    def call(self, inputs, *args, **kwargs):
        kernel = _nnx_value(self.kernel)
        path = _state.nnx_paths.get(id(self), "")
        cfg = _state.config
        aux = None if cfg is None or cfg.aux is None else cfg.aux.get(path)
        if not isinstance(kernel, QArray) and aux is None and cfg is None and not _state.observers:
            return cls_call(self, inputs, *args, **kwargs)
        bias = _nnx_value(getattr(self, "bias", None))
        if isinstance(self, nnx.Einsum):
            eq = (args[0] if args else kwargs.get("einsum_str")) or self.einsum_str
            return _run_linear(path, inputs, kernel, bias, aux, dtype=self.dtype, einsum_str=eq.replace(" ", ""))
        contract = 1
        if isinstance(self, nnx.LinearGeneral):
            axis = self.axis if isinstance(self.axis, tuple) else (self.axis,)
            contract = len(axis)
            nd = inputs.ndim
            axis = tuple(sorted(a % nd for a in axis))
            if axis != tuple(range(nd - contract, nd)):
                inputs = jnp.moveaxis(inputs, axis, tuple(range(nd - contract, nd)))
        return _run_linear(path, inputs, kernel, bias, aux, dtype=self.dtype, contract=contract)

    return call


_NNX_CLASSES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
_NNX_INTERCEPTED: dict[type, type] = {}


def _intercepting_class(cls: type) -> type:
    """A subclass of an NNX linear class whose ``__call__`` runs through jquant (made once)."""
    if cls not in _NNX_INTERCEPTED:
        _NNX_INTERCEPTED[cls] = type(f"JQuant{cls.__name__}", (cls,), {"__call__": _nnx_forward(cls.__call__)})
    return _NNX_INTERCEPTED[cls]


@contextlib.contextmanager
def _nnx_patched(model: nnx.Module | None) -> Iterator[None]:
    """Route the linear layers *of ``model``* (and only those: no class is patched) through
    jquant for the duration: each instance's class is swapped for an intercepting subclass and
    swapped back on exit; their graph paths key aux data and observers."""
    if model is None:
        yield
        return
    paths = dict(_state.nnx_paths)
    swapped: list[tuple[Any, type]] = []
    try:
        for p, node in nnx.iter_graph(model):
            if type(node) in _NNX_CLASSES:
                _state.nnx_paths[id(node)] = "/".join(str(k) for k in p)
                swapped.append((node, type(node)))
                object.__setattr__(node, "__class__", _intercepting_class(type(node)))
        yield
    finally:
        for node, cls in swapped:
            object.__setattr__(node, "__class__", cls)
        _state.nnx_paths = paths


# --- public contexts ---------------------------------------------------------------------------
@contextlib.contextmanager
def quantized(
    act: QSpec | str | None = None,
    *,
    static: bool = False,
    backend: str = "auto",
    aux: Mapping[str, Mapping[str, Any]] | None = None,
    nnx_model: nnx.Module | None = None,
    act_rules: Sequence[tuple[str, QSpec | str | None]] = (),
    producers: bool = True,
    token_producers: bool = False,
) -> Iterator[QuantConfig]:
    """Run models inside this context with quantized matmuls (see module docstring).

    ``producers``: let token128 consumers of a port's ``NormModulate`` take fused codes
    (:mod:`jquant.producers`); False quantizes each consumer's float input, as before.
    ``token_producers``: per-token consumers (``int8/token``, ``fp8_e4m3/token``) take the norm
    producer's codes too (one scale per token: the norm sees whole rows); they then run the
    per-token W8A8 GEMM on them. Off by default (its producer kernel passed its GPU check,
    ``pallas_kernels.norm_quant.TOKEN_GPU_VERIFIED``; the whole step is not measured yet).

    ``nnx_model`` names the NNX model whose linear layers run quantized (only that model's
    instances are routed, for the duration of the block) and whose graph paths key ``aux``
    and observers; NNX layers of other models are left alone.

    ``act_rules``: ``(regex, spec)`` pairs giving some layers another activation spec than
    ``act`` (a mixed policy such as int4 activations with int8 on the FFN: ``(("ffn/",
    "int8/token"),)``); the first pattern that ``re.search``-es a layer's path wins, and a
    ``None`` spec leaves that layer's activations in 16 bits. Dynamic specs only.
    """
    if backend not in ("auto", "xla", "pallas"):
        raise ValueError(f"backend must be 'auto', 'xla' or 'pallas', got {backend!r}")
    cfg = QuantConfig(
        None if act is None else parse_spec(act),
        static,
        backend,
        aux,
        compile_act_rules(act_rules),
        producers,
        token_producers,
    )
    if cfg.act is not None and cfg.static and cfg.act.dynamic:
        raise ValueError(f"static activation mode needs a static granularity (e.g. 'int8/t'), got {cfg.act}")
    if cfg.static and cfg.act_rules:
        raise ValueError("act_rules work with dynamic activations only (static scales are calibrated for `act`)")
    prev = _state.config
    _state.config = cfg
    try:
        with nn.intercept_methods(_linen_interceptor), _nnx_patched(nnx_model):
            yield cfg
    finally:
        _state.config = prev


def compile_act_rules(rules: Sequence[tuple[str, QSpec | str | None]]) -> tuple[tuple[re.Pattern, QSpec | None], ...]:
    """``act_rules`` as ``(compiled regex, parsed spec)`` (``jquant.formats.parse_rule``, the
    grammar weight rules use); a bad pattern or a static spec is a ValueError naming the rule."""
    out = []
    for i, rule in enumerate(rules):
        _, regex, spec = parse_rule(f"act_rules[{i}]", rule)
        if spec is not None and not spec.dynamic:
            raise ValueError(f"act_rules[{i}]: {str(spec)!r} is static; rules take dynamic specs (e.g. 'int8/token')")
        out.append((regex, spec))
    return tuple(out)


@contextlib.contextmanager
def observe(fn: Observer, *, nnx_model: nnx.Module | None = None) -> Iterator[None]:
    """Call ``fn(path, x)`` with the input of every Dense/Linear layer that runs inside."""
    _state.observers.append(fn)
    try:
        with nn.intercept_methods(_linen_interceptor), _nnx_patched(nnx_model):
            yield
    finally:
        _state.observers.remove(fn)


def apply(model: nn.Module, variables: Mapping, *args, act=None, static: bool = False, backend: str = "auto", **kwargs):
    """``model.apply(variables, *args, **kwargs)`` with quantized execution (linen)."""
    with quantized(act, static=static, backend=backend):
        return model.apply(variables, *args, **kwargs)


def nnx_apply(graphdef, state, *args, act=None, static: bool = False, backend: str = "auto", aux=None, **kwargs):
    """Merge an NNX (graphdef, state) and call it with quantized execution; jit-friendly."""
    model = nnx.merge(graphdef, state)
    with quantized(act, static=static, backend=backend, aux=aux, nnx_model=model):
        return model(*args, **kwargs)
