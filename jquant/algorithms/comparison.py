"""Method comparisons on the toy problems: what the tables of docs/methods.md are built from.

``scripts/methods_table.py`` (classical methods) and ``scripts/rotation_table.py``
(rotations, low-rank branches, codebooks) score methods on the same problems with the same
rows; this module holds what they share:

* :class:`Row` and :func:`table`: one scored method, and the markdown both scripts write.
* :func:`layer_data`: :func:`jquant.algorithms.synthetic.layer_problem` split into
  calibration and held-out tokens.
* :data:`BLOCK_LINEARS`, :func:`noisy_batch`, :func:`tiny_wan_data`: the bundled tiny Wan's
  block linears and its calibration / held-out batches.
* :class:`ToyProblem` (:func:`layer_toy`, :func:`block_toy`, :func:`tiny_wan_toy`): a model,
  its float variables, calibration and held-out inputs and layer roles, with the
  :class:`jquant.transform.Context` the library's transforms run with
  (``rtn.transform(policy)(variables, problem.context())``) and the output error of the real
  quantized execution (:mod:`jquant.nn`).
* :func:`bits_per_weight`: storage of a quantized tree's kernels and their aux branches.
* :func:`splice` / :func:`keep`: marked sections of a generated page, so each script
  rewrites its own part of docs/methods.md.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jquant.nn as jnn
from jquant import calib, models
from jquant.algorithms import layerwise as lw
from jquant.algorithms.linear_tree import capture_inputs, get_aux, get_kernel, is_quantized, linear_paths
from jquant.algorithms.synthetic import layer_problem
from jquant.algorithms.toy import layer_roles, one_layer, outlier_block
from jquant.models.tiny_wan import TinyWan, clips_to_latents, render_clips
from jquant.qarray import QArray
from jquant.transform import Context, Variables

Array = jax.Array

# The tiny Wan's block linears (attention q/k/v/out of both attentions, the FFN): what the
# tables quantize in it.
BLOCK_LINEARS = r"blocks_\d+/(attn[12]/to_(q|k|v|out_0)|ffn/net_(0/proj|2))/kernel$"


# --- rows and markdown -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    """One method scored on one problem: output errors on calibration and held-out data (NaN:
    not measured), bits per weight, and free-form notes."""

    group: str
    method: str
    spec: str
    bits: float
    err: float
    err_heldout: float
    extra: str = ""


def table(rows: Sequence[Row]) -> str:
    """Markdown: one table per run of rows of the same group, headed by the group in bold."""
    out = []
    group = None
    head = (
        "| method | spec | bits/weight | output error (calib) | output error (held-out) | notes |\n"
        "|---|---|---|---|---|---|"
    )
    for r in rows:
        if r.group != group:
            group = r.group
            out += ["", f"**{group}**", "", head]
        f = lambda v: "-" if np.isnan(v) else f"{v:.2e}"  # noqa: E731
        out.append(f"| {r.method} | `{r.spec}` | {r.bits:.3f} | {f(r.err)} | {f(r.err_heldout)} | {r.extra} |")
    return "\n".join(out)


# --- data -------------------------------------------------------------------------------------------------
def layer_data(seed: int, k: int, n: int, tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x [tokens, K], x_heldout [tokens, K], w [K, N])``: one ``layer_problem`` draw of
    ``2 * tokens`` rows, the first half for calibration."""
    x_all, w = layer_problem(seed, k, n, 2 * tokens)
    return x_all[:tokens], x_all[tokens:], w


def noisy_batch(tw: TinyWan, key: Array, batch: int, branch: int) -> tuple[Array, Array, Array]:
    """``(x_t, t, text)``: rendered digit clips noised to a random flow-match sigma in [0.05, 0.95]
    (t = 1000 sigma), with the digits' conditioning (branch 0) or the null text (branch 1)."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    labels = jax.random.randint(k1, (batch,), 0, 10)
    x0 = clips_to_latents(render_clips(k2, labels, tw.data))
    sigma = jax.random.uniform(k3, (batch,), minval=0.05, maxval=0.95)
    s = sigma[:, None, None, None, None]
    xt = (1 - s) * x0 + s * jax.random.normal(k4, x0.shape)
    text = tw.text(labels) if branch == 0 else tw.null_text(batch)
    return xt, sigma * 1000.0, text


def tiny_wan_data(tw: TinyWan, seed: int, n_batches: int, batch: int) -> tuple[list[tuple], tuple]:
    """Calibration batches (CFG branches alternating, conditional first) and one held-out
    conditional batch, each ``(branch, x_t, t, text)``."""
    keys = jax.random.split(jax.random.key(seed), n_batches + 1)
    batches = [(i % 2, *noisy_batch(tw, keys[i], batch, i % 2)) for i in range(n_batches)]
    return batches, (0, *noisy_batch(tw, keys[-1], batch, 0))


# --- problems the library's transforms run on -------------------------------------------------------------
@dataclasses.dataclass
class ToyProblem:
    """A linen model with float ``variables``, calibration batches (tuples of positional
    inputs), held-out inputs and layer ``roles``; ``seed`` seeds the rotations' random signs.

    :meth:`context` is the :class:`~jquant.transform.Context` a transform runs with: statistics
    of any variables on the calibration batches (cached per variables object) and their
    layers' input rows. :meth:`error` is the squared relative output error
    ``||y_q - y||^2 / ||y||^2`` of ``jquant.nn.apply`` against the float model.
    """

    name: str
    model: Any
    variables: Variables
    calib: list[tuple]
    heldout: tuple
    roles: dict[str, tuple[str, ...]]
    head_dim: int
    width: int
    seed: int = 0

    def __post_init__(self) -> None:
        self.run = jax.jit(lambda v, *a, act=None: jnn.apply(self.model, v, *a, act=act), static_argnames="act")
        self.y_calib = [self.run(self.variables, *b) for b in self.calib]
        self.y_held = self.run(self.variables, *self.heldout)
        self._stats: dict[int, tuple[Variables, Any]] = {}

    def stats(self, variables: Variables) -> dict:
        """``{kernel path: LayerStats}`` of ``variables`` (aux included) on the calibration batches."""
        hit = self._stats.get(id(variables))
        if hit is None or hit[0] is not variables:
            rest = {k: v for k, v in variables.items() if k != "params"}
            apply = lambda p, b: self.model.apply({**rest, "params": p}, *b)  # noqa: E731
            cfg = calib.CalibConfig(histogram=False)
            stats = calib.calibrate(apply, variables["params"], self.calib, cfg, progress=False)
            hit = self._stats[id(variables)] = (variables, stats)
        return hit[1]

    def samples(self, variables: Variables, max_tokens: int = 2048) -> dict[str, Array]:
        """The first ``max_tokens`` input rows of every layer over the calibration batches."""
        seen = capture_inputs(self.model, variables, *[jnp.concatenate(a, 0) for a in zip(*self.calib)])
        return {p: x[:max_tokens] for p, x in seen.items()}

    def context(self) -> Context:
        return Context(self.roles, self.head_dim, self.width, self.stats, self.samples)

    def error(self, variables: Variables, act: str | None) -> tuple[float, float]:
        """Mean output error over the calibration batches, and on the held-out inputs."""

        def rel(y, ref):
            return float(jnp.sum((y - ref) ** 2) / jnp.sum(ref**2))

        e = np.mean([rel(self.run(variables, *b, act=act), y) for b, y in zip(self.calib, self.y_calib)])
        return float(e), rel(self.run(variables, *self.heldout, act=act), self.y_held)


def layer_toy(seed: int, k: int, n: int, tokens: int) -> ToyProblem:
    """One ``k x n`` :func:`layer_problem` layer (:func:`jquant.algorithms.toy.one_layer`),
    ``tokens`` calibration and ``tokens`` held-out rows."""
    x, x_ho, w = layer_data(seed, k, n, tokens)
    model, v = one_layer(jnp.asarray(w))
    return ToyProblem("layer", model, v, [(jnp.asarray(x),)], (jnp.asarray(x_ho),), layer_roles(v), 64, k)


def block_toy(seed: int, dim: int, mlp: int, batch: int, tokens: int) -> ToyProblem:
    """:func:`jquant.algorithms.toy.outlier_block` (4 heads, q/k norms): half the batch for
    calibration, half held out."""
    blk, v, (x, c) = outlier_block(seed, dim=dim, heads=4, mlp=mlp, tokens=tokens, batch=batch, qk_norm=True)
    h = batch // 2
    return ToyProblem("block", blk, v, [(x[:h], c[:h])], (x[h:], c[h:]), layer_roles(v), dim // 4, dim, seed)


def tiny_wan_toy(tw: TinyWan, seed: int, n_batches: int, batch: int) -> ToyProblem:
    """The bundled tiny Wan on :func:`tiny_wan_data`'s batches (inputs ``(x_t, t, text)``)."""
    batches, held = tiny_wan_data(tw, seed, n_batches, batch)
    cfg = tw.config
    roles = models.layer_roles(cfg, tw.params)
    width = cfg.num_attention_heads * cfg.attention_head_dim
    inputs, head_dim = [b[1:] for b in batches], cfg.attention_head_dim
    return ToyProblem("tiny Wan", tw.model, {"params": tw.params}, inputs, held[1:], roles, head_dim, width, seed)


def bits_per_weight(variables: Variables) -> float:
    """Bits per weight of the quantized kernels as the tables count them (codes at their
    logical width, scales, zero points, codebooks), plus every aux array of those layers
    (low-rank branch, input_mul)."""
    bits = size = 0
    for path in linear_paths(variables):
        k = get_kernel(variables, path)
        if not is_quantized(k):
            continue
        n = int(np.prod(k.shape))
        size += n
        nominal = isinstance(k, QArray) or hasattr(k, "nominal_bits")
        code_bits = lw.nominal_bits_per_weight(k) * n if nominal else 8 * k.nbytes
        bits += code_bits + sum(8 * int(np.asarray(v).nbytes) for v in get_aux(variables, path).values())
    return bits / max(size, 1)


# --- generated pages ------------------------------------------------------------------------------------
_SECTION = re.compile(r"<!-- (?P<name>[\w-]+) -->\n.*?<!-- /(?P=name) -->\n", re.S)


def splice(page: str, name: str, body: str) -> str:
    """``page`` with section ``name`` (between ``<!-- name -->`` and ``<!-- /name -->``) set to
    ``body``; the markers are appended at the end the first time."""
    block = f"<!-- {name} -->\n{body.rstrip()}\n<!-- /{name} -->\n"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->\n.*?<!-- /{re.escape(name)} -->\n", re.S)
    if pattern.search(page):
        return pattern.sub(lambda _: block, page, count=1)
    return page.rstrip("\n") + "\n\n" + block


def keep(old_page: str, new_page: str) -> str:
    """``new_page`` plus every marked section of ``old_page`` (what other scripts wrote there)."""
    for m in _SECTION.finditer(old_page):
        body = m.group(0).split("\n", 1)[1].rsplit(f"<!-- /{m.group('name')} -->", 1)[0]
        new_page = splice(new_page, m.group("name"), body)
    return new_page
