"""Rule-based quantization of a param tree: jquant's one rule vocabulary.

A rule list is an ordered list of :class:`Rule` (or ``(regex, spec_or_None)`` pairs, or one
spec for every eligible leaf); :func:`normalize_rules` is the one place any of these becomes
a tuple of typed, frozen Rules. The first rule whose regex ``re.search``-matches a leaf's
'/'-joined path decides it (a None spec keeps it in float). A rule carries the *weight*
side only: how activations are quantized (format, static table or dynamic per token) is a
property of the run (``jquant.nn.quantized``, a recipe's ``act`` and table), not of a layer
rule, because one model call quantizes every layer's activations the same way.
Before the user's rules, defaults skip what is not a matmul weight: norms, biases,
embedding tables and anything that is not a floating array of rank >= 2.
Works on any pytree: linen variables, plain dicts, ``nnx.State``.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp

from jquant.formats import QSpec, parse_rule, parse_spec
from jquant.qarray import is_quantized_leaf, quantize


@dataclasses.dataclass(frozen=True)
class Rule:
    """Leaves whose '/'-joined path ``re.search``-matches ``pattern`` get ``spec`` (None: float).

    Unpacks like the ``(pattern, spec)`` pair it replaces (``for pattern, spec in rules``)."""

    pattern: str
    spec: QSpec | None = None

    def __iter__(self):
        return iter((self.pattern, self.spec))


#: What a rule list may be written as: Rules, ``(regex, spec or None)`` pairs, or one spec.
RuleLike = "Rule | tuple[str | re.Pattern, QSpec | str | None]"

# Leaves never quantized unless a rule names them explicitly with `force=True` semantics
# (see `default_skip`): norms, biases, embedding tables, scalars/vectors.
DEFAULT_SKIP = (r"(^|/)(bias|scale|embedding)$", r"norm", r"(^|/)(scale_shift_table|pos_embed)")


def path_str(path: Sequence[Any]) -> str:
    """'/'-joined string of a jax key path (dict keys, attributes, indices, nnx paths)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name in ("value", "raw_value"):  # nnx Variable payload
                continue
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(getattr(k, "key", k)))
    return "/".join(parts)


def flatten_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """(path string, leaf) pairs; QArrays and CodedArrays count as leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized_leaf)
    return [(path_str(p), leaf) for p, leaf in flat]


def map_with_paths(fn, tree: Any) -> Any:
    """Like ``jax.tree.map`` but ``fn(path_string, leaf)``; QArrays and CodedArrays are leaves."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree, is_leaf=is_quantized_leaf)


def is_matmul_weight(path: str, leaf: Any) -> bool:
    """Default eligibility: floating, rank >= 2, not a norm/bias/embedding table."""
    if is_quantized_leaf(leaf) or not hasattr(leaf, "ndim") or leaf.ndim < 2:
        return False
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        return False
    return not any(re.search(p, path) for p in DEFAULT_SKIP)


def resolve(path: str, leaf: Any, rules: Iterable[Rule]) -> QSpec | None:
    """The spec the first matching rule gives an eligible leaf, else None (``rules`` as
    :func:`normalize_rules` returns them, or pairs)."""
    if not is_matmul_weight(path, leaf):
        return None
    for pattern, spec in rules:
        if re.search(pattern, path):
            return None if spec is None else parse_spec(spec)
    return None


@dataclasses.dataclass(frozen=True)
class LeafReport:
    path: str
    shape: tuple[int, ...]
    spec: str  # "-" when kept in float
    bytes_before: int
    bytes_after: int


@dataclasses.dataclass(frozen=True)
class Report:
    """Per-leaf record of what quantize_params did; prints as a table."""

    rows: tuple[LeafReport, ...]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "leaves": [dataclasses.asdict(r) for r in self.rows],
        }

    def table(self, only_quantized: bool = False) -> str:
        rows = [r for r in self.rows if r.spec != "-" or not only_quantized]
        w = max([len(r.path) for r in rows] + [4])
        lines = [f"{'path':<{w}}  {'shape':<16} {'spec':<14} {'before':>12} {'after':>12}"]
        for r in rows:
            lines.append(f"{r.path:<{w}}  {str(r.shape):<16} {r.spec:<14} {r.bytes_before:>12,} {r.bytes_after:>12,}")
        ratio = self.bytes_after / max(self.bytes_before, 1)
        lines.append(
            f"{'total':<{w}}  {'':<16} {'':<14} {self.bytes_before:>12,} {self.bytes_after:>12,}  ({ratio:.3f}x)"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def leaf_nbytes(x: Any) -> int:
    if is_quantized_leaf(x):
        return x.nbytes
    return int(x.size) * jnp.dtype(x.dtype).itemsize if hasattr(x, "dtype") else 0


class UnmatchedRuleWarning(UserWarning):
    """A quantization rule whose pattern matches no leaf path of the tree: usually a typo."""


def normalize_rules(
    rules: Sequence[RuleLike] | QSpec | str, tree: Any = None, *, strict: bool = False
) -> tuple[Rule, ...]:
    """The one normaliser: any way of writing a rule list -> a tuple of :class:`Rule` with
    parsed specs (a single spec becomes ``(Rule(".*", spec),)``).

    Every error names the rule: a pattern that is not a compilable regex, a spec that does not
    parse. With ``tree``, a rule whose pattern ``re.search``-matches no leaf path (leaves of
    any kind: a rule keeping a norm in float matches even though norms are skipped anyway) is
    reported with an :class:`UnmatchedRuleWarning`, or a ValueError under ``strict``. Rules that
    match paths but decide nothing (a catch-all after rules that cover every layer) are fine.
    """
    single = isinstance(rules, (str, QSpec))
    if single:
        rules = [(".*", rules)]
    out: list[Rule] = []
    compiled: list[re.Pattern] = []
    for i, rule in enumerate(rules):
        if isinstance(rule, Rule):
            rule = (rule.pattern, rule.spec)
        pattern, regex, spec = parse_rule(f"rule {i}", rule)
        compiled.append(regex)
        out.append(Rule(pattern, spec))
    if tree is not None and not single:
        paths = [p for p, _ in flatten_with_paths(tree)]
        missed = [c.pattern for c in compiled if not any(c.search(path) for path in paths)]
        if missed:
            ex = f" (e.g. {paths[0]!r})" if paths else ""
            msg = (
                f"rule{'s' if len(missed) > 1 else ''} {', '.join(map(repr, missed))} "
                f"match{'' if len(missed) > 1 else 'es'} no leaf path of the tree's {len(paths)} leaves{ex}; a typo?"
            )
            if strict:
                raise ValueError(msg)
            warnings.warn(msg, UnmatchedRuleWarning, stacklevel=3)
    return tuple(out)


def quantize_params(
    params: Any, rules: Sequence[RuleLike] | QSpec | str, *, strict: bool = False
) -> tuple[Any, Report]:
    """Quantize every leaf a rule assigns a spec to; returns (new tree, report).

    ``rules`` may be a single spec (applied to every eligible leaf) or an ordered rule
    list. Errors (NaN/Inf, indivisible groups, bad dtype) name the leaf's path; a bad rule
    is named by :func:`normalize_rules`, which also warns (:class:`UnmatchedRuleWarning`) about
    a rule that matches no leaf path, or raises a ValueError for it under ``strict``.
    """
    rules = normalize_rules(rules, params, strict=strict)
    rows: list[LeafReport] = []

    def one(path: str, leaf: Any) -> Any:
        spec = resolve(path, leaf, rules)
        before = leaf_nbytes(leaf)
        if spec is None:
            rows.append(LeafReport(path, tuple(getattr(leaf, "shape", ())), "-", before, before))
            return leaf
        q = quantize(leaf, spec, path=path)
        rows.append(LeafReport(path, tuple(leaf.shape), str(spec), before, q.nbytes))
        return q

    out = map_with_paths(one, params)
    return out, Report(tuple(rows))


def count_quantized(tree: Any) -> int:
    return sum(is_quantized_leaf(x) for _, x in flatten_with_paths(tree))
