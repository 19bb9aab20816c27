"""Running a quantized model inside the jitted sampler: one model, or one per step.

A :class:`QuantizedModel` is what quantization produces: linen variables (params with
QArray leaves, plus the ``"jquant"`` aux collection: smoothing multipliers, online
Hadamards, low-rank branches), the activation spec, and optionally a static
:class:`~jquant.pipeline.tables.ScaleTable`. :meth:`QuantizedModel.model_fn` gives the
sampler's ``(model_fn, step_data)``: with a table, step i's row becomes each layer's
``input_scale`` (static activation quantization); without one, activations are quantized
dynamically per token (or not at all for weight-only models).

:func:`per_step_model_fn` runs several quantized models in ONE scan, choosing per step
with ``lax.switch`` on an int in ``step_data`` (e.g. W4A8 for the early steps and W8A8 for
the late ones): every variant's weights are inputs of the compiled sampler, so all stay
resident (:func:`resident_bytes` says how much).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jquant import nn as jnn
from jquant.pipeline.denoiser import Denoiser, ModelBundle, Workload
from jquant.pipeline.tables import ScaleTable, expand
from jquant.pipeline.timesteps import aux_tree
from jquant.qarray import QArray
from jquant.rules import flatten_with_paths, leaf_nbytes

Array = jax.Array
Variables = dict[str, Any]
#: ``(regex, dynamic activation spec or None)`` pairs (``jquant.nn.quantized``'s ``act_rules``).
ActRules = tuple[tuple[str, str | None], ...]


def merge_trees(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict union; ``b`` wins on conflicting leaves."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_trees(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


class _QuantStep:
    """``(variables, x, t, cond, step_slice) -> prediction`` under jquant.nn; hashable by
    its static structure so equal structures share one compiled sampler."""

    def __init__(
        self, den: Denoiser, act: str | None, layout: tuple | None, cfg: bool, act_rules: ActRules = ()
    ) -> None:
        self.den, self.act, self.layout, self.cfg, self.act_rules = den, act, layout, cfg, act_rules

    def _key(self) -> tuple:
        return (id(self.den), self.act, self.layout, self.cfg, self.act_rules)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _QuantStep) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __call__(self, variables: Variables, x: Array, t: Array, cond: Any, step_slice: Any) -> Array:
        aux = variables.get(jnn.AUX_COLLECTION, {})
        static = self.layout is not None
        if static:
            frames, tokens = self.den.frames_fn(x.shape) if self.den.frames_fn is not None else (1, -1)
            entries = {}
            for path, rank, video, *_ in self.layout[:-1]:
                entries[path] = expand(step_slice[path], rank, video, x.shape[0], self.cfg, frames, tokens)
            aux = merge_trees(aux, aux_tree(entries))
        v = {"params": variables["params"]}
        if aux:
            v[jnn.AUX_COLLECTION] = aux
        with jnn.quantized(self.act, static=static, act_rules=self.act_rules):
            return self.den.apply(v, x, t, cond)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedModel:
    """A quantized model ready to sample.

    Attributes:
      variables: ``{"params": ..., "jquant": ...}`` (aux optional).
      act: activation spec: a dynamic one (``"int8/token"``), a static one used with
        ``table`` (``"int8/t"``), or None (weight-only).
      table: static per-timestep scale table (None: dynamic activations).
      name: recipe name, for reports.
      info: free-form metadata (recipe, timings, calibration settings) for reports.
      act_rules: ``(regex, dynamic spec or None)`` pairs giving the layers whose path matches
        another activation spec than ``act`` (``jquant.nn.quantized``'s ``act_rules``), e.g.
        int4 activations with int8 on the FFN; dynamic activations only (no ``table``).
    """

    variables: Variables
    act: str | None = None
    table: ScaleTable | None = None
    name: str = ""
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    act_rules: ActRules = ()

    def __post_init__(self) -> None:
        if "params" not in self.variables:
            raise ValueError("QuantizedModel.variables must be linen variables {'params': ..., 'jquant': ...}")
        if self.table is not None and self.act is None:
            raise ValueError("QuantizedModel: a scale table needs an activation spec")
        if self.act_rules and self.table is not None:
            raise ValueError("QuantizedModel: act_rules need dynamic activations (this model has a scale table)")
        object.__setattr__(self, "act_rules", tuple((str(p), None if s is None else str(s)) for p, s in self.act_rules))
        jnn.compile_act_rules(self.act_rules)  # a bad pattern or spec fails here, not at sampling

    @property
    def params(self) -> Any:
        return self.variables["params"]

    @property
    def weight_bytes(self) -> int:
        """Bytes of every param leaf (QArrays packed, with their scales) plus aux arrays."""
        return tree_bytes(self.variables)

    def model_fn(self, den: Denoiser) -> tuple[Partial, Any]:
        """``(model_fn, step_data)`` for ``den.sample`` (step_data None without a table)."""
        layout = None if self.table is None else self.table.layout()
        act = self.act if self.table is None else self.table.act
        fn = _QuantStep(den, act, layout, den.cfg, self.act_rules)
        return Partial(fn, self.variables), (None if self.table is None else self.table.step_data())

    def sample(self, den: Denoiser, work: Workload, *, return_trajectory: bool = False):
        fn, data = self.model_fn(den)
        return den.sample(fn, work, step_data=data, return_trajectory=return_trajectory)


def float_model(bundle: ModelBundle, name: str = "fp32") -> QuantizedModel:
    """The unquantized reference as a :class:`QuantizedModel`."""
    return QuantizedModel({"params": bundle.params}, None, None, name)


def tree_bytes(tree: Any) -> int:
    return sum(leaf_nbytes(leaf) for _, leaf in flatten_with_paths(tree))


def _leaf_ids(tree: Any) -> dict[int, int]:
    out = {}
    for _, leaf in flatten_with_paths(tree):
        arrays = [leaf.qvalue, leaf.scale, leaf.zero_point, leaf.scale2] if isinstance(leaf, QArray) else [leaf]
        for a in arrays:
            if a is not None and hasattr(a, "dtype"):
                out[id(a)] = int(np.prod(np.shape(a))) * jnp.dtype(a.dtype).itemsize
    return out


def resident_bytes(models: Sequence[QuantizedModel]) -> int:
    """Bytes held by the compiled per-step sampler: every variant's arrays, shared leaves
    (the same float embedder array in two variants) once, plus the tables."""
    ids: dict[int, int] = {}
    for m in models:
        ids.update(_leaf_ids(m.variables))
    return sum(ids.values()) + sum(m.table.nbytes for m in models if m.table is not None)


class _SwitchStep:
    """Per-step choice among several :class:`_QuantStep` s with ``lax.switch``."""

    def __init__(self, steps: tuple[_QuantStep, ...]) -> None:
        self.steps = steps

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SwitchStep) and self.steps == other.steps

    def __hash__(self) -> int:
        return hash(self.steps)

    def __call__(self, variables: tuple, x: Array, t: Array, cond: Any, step_slice: Any) -> Array:
        tables = step_slice["tables"]

        def branch(i: int):
            return lambda ops: self.steps[i](variables[i], ops[0], ops[1], ops[2], tables[i])

        return jax.lax.switch(step_slice["variant"], [branch(i) for i in range(len(self.steps))], (x, t, cond))


def per_step_model_fn(den: Denoiser, models: Sequence[QuantizedModel], choice: Sequence[int]) -> tuple[Partial, Any]:
    """One sampler model function that runs ``models[choice[i]]`` at step i.

    ``choice``: int per step (``len == den.num_steps``). All variants' weights and tables
    are resident for the whole loop (:func:`resident_bytes`).
    """
    choice = np.asarray(choice, np.int32)
    if choice.shape != (den.num_steps,):
        raise ValueError(f"choice must have one entry per step ({den.num_steps}), got shape {choice.shape}")
    if len(models) < 1 or choice.min() < 0 or choice.max() >= len(models):
        raise ValueError(f"choice entries must index the {len(models)} models, got {sorted(set(choice.tolist()))}")
    steps, tables = [], []
    for m in models:
        layout = None if m.table is None else m.table.layout()
        steps.append(_QuantStep(den, m.act if m.table is None else m.table.act, layout, den.cfg, m.act_rules))
        tables.append({} if m.table is None else m.table.step_data())
    data = {"variant": jnp.asarray(choice), "tables": tuple(tables)}
    return Partial(_SwitchStep(tuple(steps)), tuple(m.variables for m in models)), data


@dataclasses.dataclass(frozen=True, eq=False)
class PerStepModel:
    """Several :class:`QuantizedModel` s in one sampler, ``models[choice[i]]`` at step i."""

    models: tuple[QuantizedModel, ...]
    choice: tuple[int, ...]
    name: str = ""

    @property
    def act(self) -> str:
        return "/".join(str(m.act) for m in self.models)

    @property
    def variables(self) -> Variables:
        """All variants' variables under ``variant_<i>`` keys (for byte counts)."""
        return {
            "params": {f"variant_{i}": m.params for i, m in enumerate(self.models)},
            jnn.AUX_COLLECTION: {
                f"variant_{i}": m.variables.get(jnn.AUX_COLLECTION, {}) for i, m in enumerate(self.models)
            },
        }

    @property
    def resident_bytes(self) -> int:
        return resident_bytes(self.models)

    def model_fn(self, den: Denoiser) -> tuple[Partial, Any]:
        return per_step_model_fn(den, self.models, self.choice)

    def sample(self, den: Denoiser, work: Workload, *, return_trajectory: bool = False):
        fn, data = self.model_fn(den)
        return den.sample(fn, work, step_data=data, return_trajectory=return_trajectory)


def switch_schedule(num_steps: int, early_steps: int) -> np.ndarray:
    """``[0] * early_steps + [1] * rest``: variant 0 for the first (noisiest) steps."""
    if not 0 <= early_steps <= num_steps:
        raise ValueError(f"early_steps must lie in [0, {num_steps}], got {early_steps}")
    return (np.arange(num_steps) >= early_steps).astype(np.int32)


# --- timing --------------------------------------------------------------------------------------
class CompileClock:
    """Seconds JAX spends tracing/lowering/compiling (``jax.monitoring`` duration events),
    so sampling time can be reported without the one-off compilation."""

    seconds = 0.0
    _installed = False

    @classmethod
    def install(cls) -> None:
        if not cls._installed:
            jax.monitoring.register_event_duration_secs_listener(cls._listen)
            cls._installed = True

    @classmethod
    def _listen(cls, event: str, duration: float, **_: Any) -> None:
        if event.startswith("/jax/core/compile/"):
            cls.seconds += duration


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """``(result, run seconds without compilation, compile seconds)`` of ``fn(...)``."""
    CompileClock.install()
    c0, t0 = CompileClock.seconds, time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    wall = time.perf_counter() - t0
    comp = min(wall, CompileClock.seconds - c0)
    return out, wall - comp, comp
