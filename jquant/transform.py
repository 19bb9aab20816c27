"""The transform contract every quantization method follows, in the style of optax's
``GradientTransformation``: a :class:`Transform` is a named pure step
``(variables, ctx) -> variables`` over linen variables ``{"params": ..., "jquant": aux}``;
:func:`chain` composes steps in order. Each method's factory lives next to its math in
:mod:`jquant.algorithms` (``gptq.transform(policy)``, ``quarot.transform()``, ...), and
recipes (:mod:`jquant.pipeline.recipes`) are data built from them.

Steps that need statistics ask ``ctx.stats(variables)``, which replays the recorded denoising
trajectory on *the variables as they are at that point* (so GPTQ after QuaRot sees the
rotated inputs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Context:
    """What a recipe step may use besides the variables.

    Attributes:
      roles: ``{kernel path: roles}`` of the model.
      head_dim: attention head size (head-wise rotations).
      width: model width (for default low-rank ranks).
      stats: ``stats(variables) -> {kernel path: LayerStats}``: trajectory statistics of
        the given variables (pooled over timestep groups and CFG branches).
      samples: ``samples(variables, max_tokens) -> {module path: [N, K]}``: input rows of
        every layer drawn over the trajectory (for methods that optimize on activations).
    """

    roles: Mapping[str, tuple[str, ...]]
    head_dim: int
    width: int
    stats: Callable[[Variables], Any]
    samples: Callable[..., Any] | None = None


StepFn = Callable[[Variables, Context], Variables]


@dataclasses.dataclass(frozen=True)
class Transform:
    """One named step of a recipe: ``fn(variables, ctx) -> variables``."""

    name: str
    fn: StepFn
    needs_stats: bool = False

    def __call__(self, variables: Variables, ctx: Context) -> Variables:
        return self.fn(variables, ctx)


def chain(*steps: Transform) -> Transform:
    """Run ``steps`` in order (the name lists them joined by ' -> ')."""
    if not steps:
        raise ValueError("chain needs at least one transform")
    for s in steps:
        if not isinstance(s, Transform):
            raise TypeError(f"chain: {s!r} is not a Transform")

    def fn(variables: Variables, ctx: Context) -> Variables:
        for s in steps:
            variables = s(variables, ctx)
        return variables

    return Transform(" -> ".join(s.name for s in steps), fn, any(s.needs_stats for s in steps))
