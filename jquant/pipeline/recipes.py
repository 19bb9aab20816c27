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
:func:`quip`. Which layers a
step quantizes, and to what, is a :class:`~jquant.pipeline.policy.Policy` (by role), so
a recipe applies to any ported model. Compose your own::

    mine = Recipe("w4a8-quarot-gptq", "QuaRot, GPTQ int4/g64, int8 per-token activations",
                  chain(quarot(), gptq(policy.uniform("int4/g64"))), act="int8")

:data:`RECIPES` holds the named recipes whose methods exist in this tree
(:func:`get`, :func:`names`); :data:`MISSING` names any left out (a method not in the
tree) and why.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

from jquant.pipeline import policy as pol
from jquant.pipeline.tables import TableConfig

Variables = dict[str, Any]
AUX = "jquant"


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


# --- aux helpers -----------------------------------------------------------------------------------
def _flat_aux(v: Variables) -> dict[str, dict[str, Any]]:
    from jquant.algorithms.fold import aux_from_collection

    return aux_from_collection(v.get(AUX, {}))


def _with(v: Variables, params: Any, aux: Mapping[str, Mapping[str, Any]] | None = None) -> Variables:
    from jquant.algorithms.fold import aux_collection

    out = {**v, "params": params}
    if aux is not None:
        out[AUX] = aux_collection(aux)
    return out


# --- building blocks -----------------------------------------------------------------------------------
def rtn(policy: pol.Policy) -> Transform:
    """Round-to-nearest per the policy (bf16 layers cast)."""
    def fn(v: Variables, ctx: Context) -> Variables:
        return _with(v, policy.quantize(v["params"], ctx.roles))

    return Transform(f"rtn[{policy.name}]", fn)


def gptq(policy: pol.Policy, config: Any = None) -> Transform:
    """GPTQ (Hessian error feedback) per the policy, on trajectory statistics."""
    from jquant.algorithms import gptq as G

    def fn(v: Variables, ctx: Context) -> Variables:
        params = G.gptq(v["params"], ctx.stats(v), policy.rules(ctx.roles), config)
        return _with(v, policy.cast(params, ctx.roles))

    return Transform(f"gptq[{policy.name}]", fn, True)


def awq(policy: pol.Policy, config: Any = None) -> Transform:
    """AWQ (activation-aware scaling + clipping search); ``x / s`` kept as ``input_mul``."""
    from jquant.algorithms import awq as A

    def fn(v: Variables, ctx: Context) -> Variables:
        params, aux = A.awq(v["params"], ctx.stats(v), policy.rules(ctx.roles), config, aux=_flat_aux(v))
        return _with(v, policy.cast(params, ctx.roles), aux)

    return Transform(f"awq[{policy.name}]", fn, True)


def smoothquant(policy: pol.Policy, alpha: float = 0.5, search: bool = True, act: str = "int8/t") -> Transform:
    """SmoothQuant: activation outliers migrated into the weights (alpha searched per layer
    on a grid when ``search``), then RTN per the policy. Its single static ``input_scale``
    is dropped: the recipe's table (or dynamic scales) decides at run time."""
    from jquant.algorithms import smoothquant as S

    def fn(v: Variables, ctx: Context) -> Variables:
        cfg = S.SmoothQuantConfig(alpha=alpha, search=search, act=act)
        params, aux = S.smoothquant(v["params"], ctx.stats(v), policy.rules(ctx.roles), cfg, aux=_flat_aux(v))
        aux = {m: {k: x for k, x in e.items() if k != "input_scale"} for m, e in aux.items()}  # the table decides
        return _with(v, policy.cast(params, ctx.roles), {m: e for m, e in aux.items() if e})

    return Transform(f"smoothquant[{policy.name}]", fn, True)


def quarot(seed: int = 0, heads: bool = True) -> Transform:
    """QuaRot (:func:`jquant.algorithms.quarot.dit_plan`): head-wise V/O rotations (offline,
    exact) and online randomized Hadamards on every attention/FFN input; never on the
    modulation, embedders or the head. Data-free; exact in float."""
    from jquant.algorithms import quarot as Q

    def fn(v: Variables, ctx: Context) -> Variables:
        return Q.quarot(v, None, Q.dit_plan(v["params"], ctx.roles, ctx.head_dim, seed=seed, heads_offline=heads))

    return Transform("quarot", fn)


def spinquant(act: str = "int4/token", steps: int = 100, lr: float = 1e-3, seed: int = 0, max_tokens: int = 1024,
              w_spec: str | None = "int4") -> Transform:
    """SpinQuant: the head-wise V/O rotations *learned* (Cayley/optax) to minimize the output
    error with ``w_spec`` weights (RTN, fake-quantized) and ``act`` activations on trajectory
    activation samples, fused (exact), plus QuaRot's online Hadamards. Weights are quantized by
    the next step (e.g. GPTQ). ``w_spec=None`` is the paper's activation-only loss; with the
    weights in the loss, GPTQ afterwards reached a lower held-out error than QuaRot + GPTQ in 5
    of 6 cases of docs/methods.md, against 2 of 6 with the activation-only loss."""
    from jquant.algorithms import quarot as Q
    from jquant.algorithms import spinquant as S

    def fn(v: Variables, ctx: Context) -> Variables:
        if ctx.samples is None:
            raise ValueError("spinquant needs activation samples: run it through jquant.pipeline.calibrate.quantize")
        plan = Q.dit_plan(v["params"], ctx.roles, ctx.head_dim, seed=seed)
        cfg = S.SpinQuantConfig(w_spec=w_spec, act=act, steps=steps, lr=lr, vo_groups=plan.vo_groups,
                                head_dim=ctx.head_dim, online=plan.online, seed=seed, max_tokens=max_tokens)
        return S.spinquant(v, ctx.samples(v, max_tokens), cfg)

    return Transform("spinquant", fn, True)


def quip(policy: pol.Policy, ldlq: bool = True) -> Transform:
    """QuIP# (two-sided RHT + E8P lattice codebook, 2 bits/weight, LDLQ on trajectory
    Hessians) on the layers the policy quantizes (the policy's specs are not used)."""
    from jquant.algorithms import quip as Qp

    def fn(v: Variables, ctx: Context) -> Variables:
        mods = [p[: -len("/kernel")] for p, prec in policy.plan(ctx.roles).items() if prec not in (None, pol.BF16)]
        pattern = "^(?:" + "|".join(re.escape(m) for m in mods) + ")$"
        return Qp.quip(v, ctx.stats(v) if ldlq else None, Qp.QuIPConfig(pattern=pattern, ldlq=ldlq))

    return Transform(f"quip[{policy.name}]", fn, ldlq)


def _rank(rank: int | None, ctx: Context) -> int:
    return int(rank) if rank is not None else max(1, min(32, ctx.width // 8))


def svdquant(policy: pol.Policy, rank: int | None = None, alpha: float = 0.5) -> Transform:
    """SVDQuant: smoothing, a rank-r bf16 branch (default ``min(32, width / 8)``), the
    residual quantized per the policy."""
    from jquant.algorithms import svd

    def fn(v: Variables, ctx: Context) -> Variables:
        cfg = svd.SVDQuantConfig(rules=policy.rules(ctx.roles), rank=_rank(rank, ctx), alpha=alpha)
        out = svd.svdquant(v, ctx.stats(v), cfg)
        return {**out, "params": policy.cast(out["params"], ctx.roles)}

    return Transform(f"svdquant[{policy.name}]", fn, True)


def correct(inner: Transform, rank: int | None = None) -> Transform:
    """``inner`` then a rank-r low-rank correction of each quantized layer's error
    (whitened by the layer's trajectory Hessian)."""
    from jquant.algorithms import svd

    def fn(v: Variables, ctx: Context) -> Variables:
        cfg = svd.CorrectionConfig(rank=_rank(rank, ctx))
        return svd.quantize_and_correct(v, ctx.stats(v), cfg, lambda vv, _st: inner(vv, ctx))

    return Transform(f"{inner.name} + lowrank", fn, True)


def kquant(mix: str) -> Transform:
    """GGUF k-quant mix (``"Q4_K_M"``, ``"Q5_K_M"``, ``"Q6_K"``, ``"Q8_0"``) by role, as
    llama.cpp/city96 lay it out (:func:`jquant.algorithms.kquants.kquant_mix`)."""
    from jquant.algorithms.kquants import plan_kquant_mix
    from jquant.rules import flatten_with_paths, quantize_params

    def fn(v: Variables, ctx: Context) -> Variables:
        shapes = {p: tuple(leaf.shape) for p, leaf in flatten_with_paths(v["params"]) if p in ctx.roles}
        plan = plan_kquant_mix(mix, shapes, ctx.roles, axis=0)
        rules = [(f"^{re.escape(p)}$", c) for p, c in plan.items()] + [(".*", None)]
        return _with(v, quantize_params(v["params"], rules)[0])

    return Transform(f"kquant[{mix}]", fn)


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
            from jquant.formats import parse_spec

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
    import importlib

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
        Recipe("fp8-wa", "fp8 e4m3 weights and activations; static activation scales from a variance-aware "
               "per-timestep table.", rtn(u("fp8_e4m3")), "fp8_e4m3", VARIANCE_TABLE),
        Recipe("int8-w", "int8 weights (per output channel), 16-bit activations.", rtn(u("int8"))),
        Recipe("int8-wa-smooth", "SmoothQuant (alpha searched per layer) then int8 weights; int8 activations with "
               "static scales from a variance-aware per-timestep table.", smoothquant(u("int8")), "int8", VARIANCE_TABLE),
        Recipe("w4a16-gptq", "GPTQ int4 weights in groups of 64 on trajectory Hessians; 16-bit activations.",
               gptq(u(W4))),
        Recipe("w4a16-awq", "AWQ (activation-aware scaling + clipping search) int4/g64 weights; 16-bit activations.",
               awq(u(W4))),
        Recipe("nf4", "NormalFloat-4 weights in groups of 64 (QLoRA's codebook); 16-bit activations.", rtn(u("nf4/g64"))),
        Recipe("q4_k_m", "GGUF Q4_K_M mix (Q4_K base; V/FFN-down Q6_K on llama.cpp's layer pick; Q8_0 where a "
               "row is not a multiple of 256); 16-bit activations.", kquant("Q4_K_M")),
        Recipe("q5_k_m", "GGUF Q5_K_M mix (Q5_K base, Q6_K on the protected layers); 16-bit activations.",
               kquant("Q5_K_M")),
        Recipe("w4-svd", "SVDQuant: smoothing, a rank-r 16-bit low-rank branch, int4/g64 residual; int4 per-token "
               "activations (W4A4).", svdquant(u(W4)), "int4"),
    ]
    missing: dict[str, str] = {}
    if have_quarot:
        out += [
            Recipe("int8-wa-quarot", "QuaRot rotations, int8 weights (GPTQ), int8 per-token activations.",
                   chain(quarot(), gptq(u("int8"))), "int8"),
            Recipe("fp8-quarot", "QuaRot rotations, fp8 e4m3 weights and per-token fp8 activations.",
                   chain(quarot(), rtn(u("fp8_e4m3"))), "fp8_e4m3"),
            Recipe("w4a4-quarot", "QuaRot rotations, GPTQ int4/g64 weights, int4 per-token activations.",
                   chain(quarot(), gptq(u(W4))), "int4"),
            Recipe("w4-quarot-svd", "QuaRot rotations, GPTQ int4/g64 weights plus a rank-r low-rank correction of "
                   "the weight error; int4 per-token activations.", chain(quarot(), correct(gptq(u(W4)))), "int4"),
        ]
    else:
        for n in ("int8-wa-quarot", "fp8-quarot", "w4a4-quarot", "w4-quarot-svd"):
            missing[n] = "jquant.algorithms.quarot is not in this tree"
    if have_quarot and _available("jquant.algorithms.spinquant", "spinquant", "SpinQuantConfig"):
        out.append(Recipe("w4a4-spinquant", "SpinQuant: V/O rotations learned on trajectory activations for int4 "
                          "activations, online Hadamards, GPTQ int4/g64 weights; int4 per-token activations.",
                          chain(spinquant(), gptq(u(W4))), "int4"))
    else:
        missing["w4a4-spinquant"] = "jquant.algorithms.spinquant is not in this tree"
    if _available("jquant.algorithms.quip", "quip", "QuIPConfig"):
        out.append(Recipe("quip2", "QuIP#: two-sided randomized Hadamards and the E8P lattice codebook (2 bits per "
                          "weight) with LDLQ on trajectory Hessians; 16-bit activations.", quip(u(W4)),
                          checkpointable=False))
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
        lines += ["", "In memory only (jquant demo --recipes NAME, or Python; jquant quantize cannot save their "
                  "codebook leaves yet):", *map(row, memory)]
    if MISSING:
        lines += ["", "Unavailable in this install:", *(f"  {n:<{w}}  {why}" for n, why in MISSING.items())]
    return "\n".join(lines)
