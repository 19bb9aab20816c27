"""Layer precision policies by role: data that turns into rule lists for any ported model.

Every linear kernel of a ported model carries role labels (``models.layer_roles``:
``temporal``, ``cross_attn``, ``double_stream``, ``modulation``, ``embedder``, ``final``,
``ffn.up``...). A :class:`Policy` is an ordered list of ``(roles, precision)`` entries plus
a default: a layer gets the precision of the first entry sharing a role with it. A
precision is a spec string (``"int8"``, ``"int4/g64"``, ``"nf4"``...), :data:`BF16` (cast
to bfloat16, not quantized) or None (left as it is). Policies print as tables, and
:meth:`Policy.rules` gives the ``(regex, spec)`` rules every quantizer of
:mod:`jquant.algorithms` (and :func:`jquant.rules.quantize_params`) takes.

    >>> print(VIDEO_MIXED)
    >>> params, _ = quantize_params(params, VIDEO_MIXED.rules(models.layer_roles(cfg, params)))
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from jquant.formats import parse_spec
from jquant.models.roles import ROLES
from jquant.rules import (
    Rule,
    flatten_with_paths,
    leaf_nbytes,
    map_with_paths,
    quantize_params,
)

BF16 = "bf16"
Roles = Mapping[str, Sequence[str]]
KEEP_ROLES: tuple[str, ...] = ("embedder", "modulation", "final")


def _check_precision(p: str | None, where: str) -> None:
    if p is None or p == BF16:
        return
    try:
        parse_spec(p)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Policy:
    """Precision by role; the first entry sharing a role with a layer decides, else ``default``.

    Attributes:
      name: short name (reports, the CLI).
      entries: ``((roles...), precision)`` pairs, in priority order.
      default: precision of layers no entry matches.
      doc: one line on why.
    """

    name: str
    entries: tuple[tuple[tuple[str, ...], str | None], ...]
    default: str | None
    doc: str = ""

    def __post_init__(self) -> None:
        for roles, prec in self.entries:
            bad = sorted(set(roles) - ROLES)
            if bad:
                raise ValueError(f"policy {self.name!r}: unknown roles {bad}; vocabulary: {sorted(ROLES)}")
            _check_precision(prec, f"policy {self.name!r} entry {roles}")
        _check_precision(self.default, f"policy {self.name!r} default")

    def precision(self, roles: Sequence[str]) -> str | None:
        """The precision of a layer with these roles."""
        have = set(roles)
        for want, prec in self.entries:
            if have & set(want):
                return prec
        return self.default

    def plan(self, roles: Roles) -> dict[str, str | None]:
        """``{kernel path: precision}`` for every labelled kernel."""
        return {path: self.precision(r) for path, r in sorted(roles.items())}

    def rules(self, roles: Roles) -> list[Rule]:
        """Quantization rules: one exact-path rule per labelled kernel (:data:`BF16` and
        None layers are not quantized), and nothing else."""
        out = [
            Rule(f"^{re.escape(path)}$", None if prec in (None, BF16) else parse_spec(prec))
            for path, prec in self.plan(roles).items()
        ]
        return [*out, Rule(".*", None)]

    def quantize(self, params: Any, roles: Roles) -> Any:
        """Round-to-nearest per the policy: each labelled kernel to its spec, :data:`BF16` layers cast."""
        return self.cast(quantize_params(params, self.rules(roles))[0], roles)

    def cast(self, params: Any, roles: Roles) -> Any:
        """Cast the :data:`BF16` layers' float kernels (and biases) to bfloat16."""
        mods = {p[: -len("/kernel")] for p, prec in self.plan(roles).items() if prec == BF16}
        if not mods:
            return params

        def one(path: str, leaf: Any) -> Any:
            mod, _, name = path.rpartition("/")
            if (
                mod in mods
                and name in ("kernel", "bias")
                and hasattr(leaf, "astype")
                and jnp.issubdtype(leaf.dtype, jnp.floating)
            ):
                return leaf.astype(jnp.bfloat16)
            return leaf

        return map_with_paths(one, params)

    def __str__(self) -> str:
        lines = [f"policy {self.name}" + (f": {self.doc}" if self.doc else "")]
        for roles, prec in self.entries:
            lines.append(f"  {', '.join(roles):<40} -> {_show(prec)}")
        lines.append(f"  {'(everything else)':<40} -> {_show(self.default)}")
        return "\n".join(lines)

    def table(self, roles: Roles, params: Any | None = None) -> str:
        """Per-layer plan (with each kernel's float bytes when ``params`` is given)."""
        flat = dict(flatten_with_paths(params)) if params is not None else {}
        plan = self.plan(roles)
        w = max(len(p) for p in plan) if plan else 4
        lines = [f"{'kernel':<{w}}  {'roles':<36} {'precision':<12} {'float bytes':>11}"]
        for path, prec in plan.items():
            nb = f"{leaf_nbytes(flat[path]):,}" if path in flat else "-"
            lines.append(f"{path:<{w}}  {','.join(roles[path]):<36} {_show(prec):<12} {nb:>11}")
        return "\n".join(lines)


def _show(prec: str | None) -> str:
    return "float (kept)" if prec is None else prec


def uniform(spec: str, keep: Sequence[str] = KEEP_ROLES, name: str | None = None) -> Policy:
    """``spec`` for every layer except those with a role in ``keep`` (left in float)."""
    entries = ((tuple(keep), None),) if keep else ()
    return Policy(name or f"uniform-{spec}", entries, spec, f"{spec} everywhere except {', '.join(keep) or 'nothing'}")


VIDEO_MIXED = Policy(
    "video-mixed",
    ((KEEP_ROLES, None), (("temporal", "cross_attn", "double_stream"), "int8")),
    "int4/g64",
    "temporal/cross-attention and double-stream layers at 8 bits, the rest at 4; embedders, modulation and the head in float",
)
TEMPORAL_INT8 = Policy(
    "temporal-int8",
    ((KEEP_ROLES, None), (("temporal", "double_stream"), "int8")),
    "int4/g32",
    "the layers that mix tokens across frames at 8 bits, the rest at 4 bits in groups of 32",
)
BF16_KEEP = Policy(
    "w4-bf16-keep",
    ((KEEP_ROLES, BF16),),
    "int4/g64",
    "4-bit everywhere, embedders/modulation/head cast to bfloat16",
)

POLICIES: dict[str, Policy] = {p.name: p for p in (VIDEO_MIXED, TEMPORAL_INT8, BF16_KEEP)}


def get(name: str) -> Policy:
    """A named policy (:data:`POLICIES`), or ``uniform-<spec>`` for any spec."""
    if name in POLICIES:
        return POLICIES[name]
    if name.startswith("uniform-"):
        return uniform(name[len("uniform-") :])
    raise KeyError(f"unknown policy {name!r}; known: {sorted(POLICIES)} or uniform-<spec>")
