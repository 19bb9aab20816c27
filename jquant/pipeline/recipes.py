"""Recipes: named compositions of quantization methods, like ``optax.chain``.

A :class:`Transform` is one named step ``(variables, ctx) -> variables`` over linen
variables ``{"params": ..., "jquant": aux}``; :func:`chain` composes them in order. Steps
that need statistics ask ``ctx.stats(variables)``, which replays the recorded denoising
trajectory on *the variables as they are at that point* (so GPTQ after QuaRot sees the
rotated inputs). A :class:`Recipe` is a transform plus the activation side: the activation
format (None: weight-only) and either a static per-timestep scale table
(:class:`~jquant.pipeline.tables.TableConfig`) or dynamic per-token scales.

Building blocks (each a function returning a :class:`Transform`): :func:`rtn`,
:func:`gptq`, :func:`awq`, :func:`smoothquant`, :func:`quarot`, :func:`spinquant`,
:func:`svdquant`, :func:`correct` (low-rank correction of any quantizer), :func:`kquant`,
:func:`quip`, :func:`smoothing` (the float smoothing step alone), :func:`loftq`. Which layers a
step quantizes, and to what, is a :class:`~jquant.policy.Policy` (by role), so
a recipe applies to any ported model. Compose your own::

    mine = Recipe("w4a8-quarot-gptq", "QuaRot, GPTQ int4/g64, int8 per-token activations",
                  chain(quarot(), gptq(policy.uniform("int4/g64"))), act="int8")

:data:`RECIPES` holds the named recipes whose methods exist in this tree
(:func:`get`, :func:`names`); :data:`MISSING` names any left out (a method not in the
tree) and why.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Iterable

from jquant import policy as pol
from jquant.algorithms import awq as _awq
from jquant.algorithms import gptq as _gptq
from jquant.algorithms import kquants as _kquants
from jquant.algorithms import quarot as _quarot
from jquant.algorithms import quip as _quip
from jquant.algorithms import rtn as _rtn
from jquant.algorithms import smoothquant as _smoothquant
from jquant.algorithms import spinquant as _spinquant
from jquant.algorithms import svd as _svd
from jquant.formats import parse_spec
from jquant.pipeline.tables import TableConfig
from jquant.transform import Context, Transform, chain  # noqa: F401 (the composition vocabulary)

# The building blocks, each defined next to its method's math (``jquant.algorithms.<method>``).
rtn = _rtn.transform
gptq = _gptq.transform
awq = _awq.transform
smoothquant = _smoothquant.transform
smoothing = _smoothquant.smoothing
quarot = _quarot.transform
spinquant = _spinquant.transform
quip = _quip.transform
svdquant = _svd.transform
correct = _svd.correct
loftq = _svd.loftq_transform
kquant = _kquants.transform


# --- recipes -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named quantization recipe.

    Attributes:
      name: registry name.
      doc: what it does, in one or two sentences.
      transform: the weight side (a :class:`Transform`, usually a :func:`chain`).
      act: activation format (``"int8"``, ``"fp8_e4m3"``, ``"int4"``) or None (weight-only).
      table: static per-timestep scale table config; None quantizes activations
        dynamically per token.
      checkpointable: False when the result holds leaves :mod:`jquant.io.checkpoint`
        cannot store yet (codebook arrays): usable in memory, not by ``jquant quantize``.
    """

    name: str
    doc: str
    transform: Transform
    act: str | None = None
    table: TableConfig | None = None
    checkpointable: bool = True

    def __post_init__(self) -> None:
        if self.act is not None:
            parse_spec(self.act)
            if "/" in self.act:
                raise ValueError(f"Recipe.act is a bare format ('int8', 'fp8_e4m3'), got {self.act!r}")

    @property
    def act_spec(self) -> str | None:
        """The spec ``jquant.nn.quantized`` runs with: ``<fmt>/t`` with a table, else ``<fmt>/token``."""
        if self.act is None:
            return None
        return f"{self.act}/t" if self.table is not None else f"{self.act}/token"

    @property
    def label(self) -> str:
        """``W..A..`` summary for tables."""
        if self.act is None:
            return "weight-only"
        return f"A {self.act} " + ("static " + self.table.describe() if self.table is not None else "dynamic per token")

    def with_activations(self, act: str | None = "keep", table: TableConfig | None | str = "keep") -> "Recipe":
        """A copy with other activation settings (``"keep"`` leaves one as it is)."""
        return dataclasses.replace(
            self, act=self.act if act == "keep" else act, table=self.table if table == "keep" else table
        )


VARIANCE_TABLE = TableConfig("variance", groups=4)
W4 = "int4/g64"


def _available(module: str, *names: str) -> bool:
    try:
        m = importlib.import_module(module)
    except ImportError:
        return False
    return all(hasattr(m, n) for n in names)


def _build() -> tuple[dict[str, Recipe], dict[str, str]]:
    u = pol.uniform
    have_quarot = _available("jquant.algorithms.quarot", "quarot", "QuaRotConfig")
    out = [
        Recipe("fp8-w", "fp8 e4m3 weights (per output channel), 16-bit activations.", rtn(u("fp8_e4m3"))),
        Recipe(
            "fp8-wa",
            "fp8 e4m3 weights and activations; static activation scales from a variance-aware per-timestep table.",
            rtn(u("fp8_e4m3")),
            "fp8_e4m3",
            VARIANCE_TABLE,
        ),
        Recipe("int8-w", "int8 weights (per output channel), 16-bit activations.", rtn(u("int8"))),
        Recipe(
            "int8-wa-smooth",
            "SmoothQuant (alpha searched per layer) then int8 weights; int8 activations with "
            "static scales from a variance-aware per-timestep table.",
            smoothquant(u("int8")),
            "int8",
            VARIANCE_TABLE,
        ),
        Recipe(
            "w4a16-gptq", "GPTQ int4 weights in groups of 64 on trajectory Hessians; 16-bit activations.", gptq(u(W4))
        ),
        Recipe(
            "w4a16-awq",
            "AWQ (activation-aware scaling + clipping search) int4/g64 weights; 16-bit activations.",
            awq(u(W4)),
        ),
        Recipe(
            "nf4", "NormalFloat-4 weights in groups of 64 (QLoRA's codebook); 16-bit activations.", rtn(u("nf4/g64"))
        ),
        Recipe(
            "q4_k_m",
            "GGUF Q4_K_M mix (Q4_K base; V/FFN-down Q6_K on llama.cpp's layer pick; Q8_0 where a "
            "row is not a multiple of 256); 16-bit activations.",
            kquant("Q4_K_M"),
        ),
        Recipe(
            "q5_k_m", "GGUF Q5_K_M mix (Q5_K base, Q6_K on the protected layers); 16-bit activations.", kquant("Q5_K_M")
        ),
        Recipe(
            "w4-svd",
            "SVDQuant: smoothing, a rank-r 16-bit low-rank branch, int4/g64 residual; int4 per-token "
            "activations (W4A4).",
            svdquant(u(W4)),
            "int4",
        ),
    ]
    missing: dict[str, str] = {}
    if have_quarot:
        out += [
            Recipe(
                "int8-wa-quarot",
                "QuaRot rotations (online ones in blocks of 128 on a GPU, full width elsewhere), "
                "int8 weights (GPTQ), int8 per-token activations.",
                chain(quarot(online_block="auto"), gptq(u("int8"))),
                "int8",
            ),
            Recipe(
                "fp8-quarot",
                "QuaRot rotations (online ones in blocks of 128 on a GPU, full width elsewhere), "
                "fp8 e4m3 weights and per-token fp8 activations.",
                chain(quarot(online_block="auto"), rtn(u("fp8_e4m3"))),
                "fp8_e4m3",
            ),
            Recipe(
                "w4a4-quarot",
                "QuaRot rotations, GPTQ int4/g64 weights, int4 per-token activations.",
                chain(quarot(), gptq(u(W4))),
                "int4",
            ),
            Recipe(
                "w4-quarot-svd",
                "QuaRot rotations, GPTQ int4/g64 weights plus a rank-r low-rank correction of "
                "the weight error; int4 per-token activations.",
                chain(quarot(), correct(gptq(u(W4)))),
                "int4",
            ),
        ]
    else:
        for n in ("int8-wa-quarot", "fp8-quarot", "w4a4-quarot", "w4-quarot-svd"):
            missing[n] = "jquant.algorithms.quarot is not in this tree"
    if have_quarot and _available("jquant.algorithms.spinquant", "spinquant", "SpinQuantConfig"):
        out.append(
            Recipe(
                "w4a4-spinquant",
                "SpinQuant: V/O rotations learned on trajectory activations for int4 "
                "activations, online Hadamards, GPTQ int4/g64 weights; int4 per-token activations.",
                chain(spinquant(), gptq(u(W4))),
                "int4",
            )
        )
    else:
        missing["w4a4-spinquant"] = "jquant.algorithms.spinquant is not in this tree"
    if _available("jquant.algorithms.quip", "quip", "QuIPConfig"):
        out.append(
            Recipe(
                "quip2",
                "QuIP#: two-sided randomized Hadamards and the E8P lattice codebook (2 bits per "
                "weight) with LDLQ on trajectory Hessians; 16-bit activations.",
                quip(u(W4)),
                checkpointable=False,
            )
        )
    else:
        missing["quip2"] = "jquant.algorithms.quip (E8 lattice codebooks) is not in this tree"
    return {r.name: r for r in out}, missing


RECIPES, MISSING = _build()


def names() -> list[str]:
    """Registered recipe names, in table order."""
    return list(RECIPES)


def get(name: str) -> Recipe:
    """A registered recipe; a clear error for unknown or unavailable names."""
    if name in RECIPES:
        return RECIPES[name]
    if name in MISSING:
        raise KeyError(f"recipe {name!r} is not available: {MISSING[name]}")
    raise KeyError(f"unknown recipe {name!r}; known: {names()}")


def describe() -> str:
    """A printable list of the recipes in three sections, so none is offered where it
    cannot run: those ``jquant quantize`` runs and saves; those that run in memory only
    (``jquant demo``, Python) because :mod:`jquant.io.checkpoint` cannot store their leaves;
    and the unavailable ones (method not in this tree), each with the reason."""
    w = max(len(n) for n in [*RECIPES, *MISSING])

    def row(r: Recipe) -> str:
        return f"  {r.name:<{w}}  {r.doc}\n  {'':<{w}}  steps: {r.transform.name}; {r.label}"

    savable = [r for r in RECIPES.values() if r.checkpointable]
    memory = [r for r in RECIPES.values() if not r.checkpointable]
    lines = ["Recipes (jquant quantize --recipe NAME, jquant demo --recipes NAME):", *map(row, savable)]
    if memory:
        lines += [
            "",
            "In memory only (jquant demo --recipes NAME, or Python; jquant quantize cannot save their "
            "codebook leaves yet):",
            *map(row, memory),
        ]
    if MISSING:
        lines += ["", "Unavailable in this install:", *(f"  {n:<{w}}  {why}" for n, why in MISSING.items())]
    return "\n".join(lines)


def unknown_recipe_message(name: str, known: Iterable[str]) -> str:
    """``unknown recipe 'x'; did you mean 'y'?`` (difflib), or why a registered-but-missing
    recipe is not available."""
    if name in MISSING:
        return f"recipe {name!r} is not available: {MISSING[name]}"
    known = list(known)
    close = difflib.get_close_matches(name, known, n=2, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; known: {', '.join(known)}"
    return f"unknown recipe {name!r}{hint} (`jquant quantize --list` describes them)"


class UnknownRecipeError(KeyError):
    """An unknown recipe name (a KeyError, like :func:`get`'s), printed without
    KeyError's quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
