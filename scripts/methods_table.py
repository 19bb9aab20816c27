"""Compare RTN, GPTQ, AWQ, SmoothQuant and SpQR on the same calibration data; write docs/methods.md.

    python scripts/methods_table.py                 # synthetic layer + the bundled tiny model
    python scripts/methods_table.py --no-model      # synthetic layer only

Run after ``pip install -e .`` (or, where jquant is not installed, ``PYTHONPATH=. python
scripts/methods_table.py`` from the repository root). Problems, rows and markdown are
``jquant.algorithms.comparison``'s, shared with scripts/rotation_table.py.

Every method sees the same calibration data. Weight-only methods are scored by the
relative Hessian-weighted output error ``tr(dW^T H dW) / tr(W^T H W)`` (= ||X dW||^2 /
||X W||^2) on the calibration tokens and on held-out tokens of the same distribution;
W8A8 rows by the real output error of the int8 x int8 matmul (``jquant.dispatch.linear``).
On the bundled tiny Wan model (``jquant/models/assets/tiny_wan``, when present) the same methods
quantize every block linear and the table adds the end-to-end relative error of the
model's output.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import jquant.nn as jnn
from jquant import calib, dispatch
from jquant.algorithms import awq, fold, gptq, rtn, smoothquant, spqr
from jquant.algorithms import layerwise as lw
from jquant.algorithms.comparison import BLOCK_LINEARS, Row, keep, layer_data, table, tiny_wan_data
from jquant.formats import parse_spec
from jquant.models.tiny_wan import load_tiny
from jquant.qarray import dequantize
from jquant.rules import flatten_with_paths

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python scripts/methods_table.py"

DOC = """# Calibration and the classical methods

Post-training quantization methods that look at data: RTN (with a clipping search),
GPTQ, AWQ, SmoothQuant and SpQR, all fed by one calibration pass (`jquant.calib`).
Every method is a pure function over a Flax param tree (linen `variables["params"]` or
an `nnx.State`), selecting layers with the same rules as `jquant.rules.quantize_params`
(an ordered list of `(regex, spec_or_None)`, or one spec for every eligible kernel), and
looking statistics up by the kernel's param path (`module/path/kernel`).

```python
from jquant import calib
from jquant.algorithms import awq, fold, gptq, rtn, smoothquant, spqr

apply = lambda p, batch: model.apply({"params": p}, *batch)
stats = calib.calibrate(apply, params, batches)                     # {kernel path: LayerStats}
q = gptq.gptq(params, stats, [("attn|ffn", "int4/g128")])           # QArray leaves
q, aux = awq.awq(params, stats, "int4/g128", fold_map=FOLD_MAP)     # + input_mul where not folded
q, aux = smoothquant.smoothquant(params, stats, "int8")             # W8A8, static input_scale in aux
q = spqr.spqr(params, stats, "attn|ffn", spqr.SpQRConfig(bits=3))   # SpQRArray leaves
with jquant.nn.quantized(act="int8/t", static=True):                # run it, model unchanged
    y = model.apply({"params": q, "jquant": fold.aux_collection(aux)}, *batch)
```

## Calibration (`jquant.calib`)

While the unmodified model runs under `jquant.nn.observe`, each linear layer's input
`x [..., K]` is reduced *inside the jitted step* to a `LayerStats`: token count, per-channel
sum, sum of |x|, absmax, a per-channel log2 histogram of |x|, and the Hessian `X^T X`
(fp32, accumulated). Only these reductions leave the trace, so activations are never held
past one batch and memory is O(K^2) per layer. Derived: `mean`, `absmean`,
`hessian_mean` (= X^T X / n), `covariance()` (from the running sum and X^T X) and
`percentile(q)`.

* **API.** `calibrate(apply_fn, params, batches, config, graphdef=None, key_fn=None, progress=True)`;
  by hand: `stats = init(apply_fn, params, batch)`, `step = make_step(apply_fn)`,
  `stats = step(stats, params, batch)` (one jitted call per batch: run, reduce, accumulate).
  NNX: pass `graphdef=` and an `apply_fn(model, batch)`; keys are the NNX graph paths.
* **Percentiles** come from a fixed log2 histogram per channel (`bins_per_octave` = 4
  over 2^-20..2^20): exact up to one bin (a factor 2^(1/4)), independent of batching, and
  mergeable by addition, unlike per-batch percentiles aggregated by max (biased upward,
  batch-size dependent) or by mean. The top bin is bounded by the exact absmax.
* **Groups.** `key_fn(batch)` keeps one `Stats` per key (timestep group, CFG branch):
  `{key: {path: LayerStats}}`; `merge(*groups)` pools them. The tiny-model run below keeps
  the conditional and unconditional branches apart and pools them for the methods.
* **Sequential mode.** `sequential(apply_fn, params, batches, blocks, quantize_fn)`: for each
  block (a regex over kernel paths, or a list of paths) it collects statistics of that
  block's layers while the model runs with the earlier blocks *already quantized*, then
  calls `quantize_fn(params, stats, block_paths)`, e.g.
  `lambda p, s, ls: gptq.gptq(p, s, "int4/g128", layers=ls)`. The model runs once per block
  over all batches, so `batches` must be re-iterable.
* **Errors.** Empty data, a layer that saw zero tokens, a layer without statistics, or
  layers observed inside `nn.scan`/`nn.remat` (their inputs cannot leave the inner
  transform; unroll for calibration) raise clear errors. A Hessian from fewer tokens than
  channels is rank-deficient; GPTQ/SpQR's damping handles it (see below).

## RTN (`algorithms/rtn.py`)

`rtn(params, stats, rules, RTNConfig(clip_search=False, grid=20, min_ratio=0.5))`. Without
clipping it is `quantize_params` (every format, GGUF codecs included; `stats` may be
None). `clip_search` shrinks each scale block's range by the ratio in
`linspace(1, min_ratio, grid)` minimizing the block's Hessian-weighted error (exact for
per-channel/per-tensor scales; for groups it uses the diagonal blocks of H).

## GPTQ (`algorithms/gptq.py`)

`gptq(params, stats, rules, GPTQConfig(block_size=128, damp=0.01, damp_limit=10.0, act_order=False, static_groups=None))`,
one layer: `gptq_layer(w, hessian, spec, config)`. Columns are quantized in order with their
error spread through the upper Cholesky factor of H^-1; lazy batched updates in blocks of
128 (a jitted `lax.fori_loop` over blocks and columns).

* `damp`: fraction of the mean Hessian diagonal added to the diagonal. A failed Cholesky
  (non-finite factor) multiplies it by 10, warns with the layer path, and retries up to
  `damp_limit`; then a `ValueError` names the layer. Dead channels (H_jj = 0) get H_jj = 1
  and are rounded to nearest.
* `act_order`: columns in decreasing H_jj. QArray keeps groups contiguous in the original
  order, so act-order uses static groups (scales from the original weights, up front);
  `static_groups=None` picks that automatically, `False` with groups is an error.
* Every scalar format of `jquant.formats` works (int8/4/3/2, uint with zero points, fp8,
  nf4, fp4, MX/NV block scales) at per-tensor, per-channel, group and 2-D block
  granularity; the output QArray has exactly `quantize`'s layout.

## AWQ (`algorithms/awq.py`)

`awq(params, stats, rules, AWQConfig(grid=20, clip_search=True, clip_grid=20, clip_min_ratio=0.5, quantize=True), fold_map=None, aux=None)
-> (params, aux)`. Per input channel `s = mean|x|^alpha` (normalized), alpha on a grid in
[0, 1], chosen to minimize `tr(dW^T H dW)` with `dW = diag(1/s) Q(diag(s) W) - W`, summed over
the layers that share a fold target (they get one s). alpha = 0 is plain RTN, so the search
never does worse on its objective. Then the clipping search on the scaled weights.
`awq_search(...)` returns just the scales; `quantize=False` returns the smoothed float
weights (for GPTQ after AWQ, transform the statistics with `fold.smooth_stats`).

## SmoothQuant (`algorithms/smoothquant.py`)

`smoothquant(params, stats, rules="int8", SmoothQuantConfig(alpha=0.5, search=False, grid=11, act="int8/t", percentile=None), fold_map=None, aux=None)
-> (params, aux)`. `s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`; `search=True` picks alpha per fold
group minimizing the estimated W8A8 error from the statistics (weight rounding under the
smoothed Hessian plus uniform activation rounding noise, capped by each channel's
energy). With a static `act` (`"int8/t"`) each layer's aux gets `input_scale =
max_j(max|x_j| / s_j) / 127` (or a `percentile` from the histogram instead of the max);
with `"int8/token"` scales are dynamic. Run with `jquant.nn.quantized(act="int8/t", static=True)`.

## Folding the smoothing (`algorithms/fold.py`, shared by AWQ and SmoothQuant)

`y = x @ W = (x / s) @ (diag(s) W)`: the kernel's rows take s and `x / s` is folded into the op
that produced x where that is exact, else kept as `input_mul = 1/s` in the aux data. The
**fold map** `{kernel_path: target}` names that op:

* `None` / absent: explicit `input_mul` (always exact; costs one multiply at run time);
* `"path/to/kernel"` (2-D): a preceding linear, its output columns and bias divided by s
  (e.g. attention `to_v` feeding `to_out`; never across a nonlinearity);
* `"path/to/scale"` (1-D): a norm's affine scale and bias divided by s (q, k, v after one norm);
* `Fold(path, kind="modulation", offset=, shift_offset=)`: an adaLN modulation
  `norm(x) * (1 + m_scale) + m_shift` with `m = c @ K + b`; the scale chunk becomes
  `(1 + m_scale) / s - 1` (kernel columns / s, bias `(1 + b) / s - 1`), the shift chunk `/ s`;
  `offset` also selects a column chunk for fused outputs.

Every consumer of a folded op must be listed with the same target (they share one s), and
nothing else may read that output. Folding into an already-quantized op falls back to
`input_mul` with a warning. `fold.smooth(params, scales, fold_map, aux)` applies any scales;
`fold.aux_collection(aux)` nests the flat `{module_path: {...}}` aux for linen's `"jquant"`
collection (NNX: pass `aux=` to `jquant.nn.quantized`). A test checks that smoothing and
folding leave the float model's output unchanged (fp32, 2e-5).

## SpQR (`algorithms/spqr.py`)

`spqr(params, stats, layer_regex, SpQRConfig(bits=3, group_size=16, stat_bits=3, stat_group=16, stat_dtype="float16", outlier_rate=0.01, block_size=128, damp=0.01))`.
Groups of 16 input channels get a min-max `bits`-bit grid whose scales and zeros are
quantized again to 3 bits in groups of 16 output columns (float16 step and minimum); when
the GPTQ sweep reaches a group, the weights whose exclusion reduces the group's
Hessian-weighted error most (leave-one-out) are kept in bf16 (COO rows, columns, values;
a fixed `outlier_rate` instead of the paper's threshold, so the bit budget is predictable);
the rest follows GPTQ's error propagation. Leaves are `SpQRArray`s (a `CodedArray`):
`dequantize()` decodes and scatters the outliers back, and the dispatch reads them via
`astype`, so models run unchanged. `nominal_bits_per_weight` counts bits as the paper
does (3-bit codes as 3 bits, outliers as 16-bit value + 32-bit index); `bits_per_weight`
counts real storage (3-bit codes in 4-bit containers); `spqr.bits_per_weight(tree)` averages
both over a tree.

## Results

Relative output error = `tr(dW^T H dW) / tr(W^T H W)` = `||X dW||^2 / ||X W||^2` (weight-only;
"held-out" uses the Hessian of other tokens from the same distribution); W8A8 rows: the
real int8 x int8 output error `||y_q - y||^2 / ||y||^2`. Bits per weight: codes at their
logical width + scales at their stored dtype + zero points (+ SpQR's statistics and
outliers). Tests (`tests/test_gptq.py`, `tests/test_awq_smoothquant.py`, `tests/test_spqr.py`)
assert the orderings on synthetic layers of the same kind: GPTQ < RTN at 4 and 3 bits, AWQ <
RTN at 4 bits, SmoothQuant W8A8 < plain W8A8 with outliers (static and dynamic activation
scales), SpQR at 3.86 bits < GPTQ at 4.0 (int3/g16) and 4.125 (int4/g128) bits.

Reading the tables: GPTQ (act-order best) has the lowest weight-only error at a given
format on both the synthetic layer and the tiny Wan, and the ranking carries over to
the model's output. AWQ is far below RTN; on the tiny Wan it is about level with RTN plus
the clipping search alone (its weights and activations have milder outliers than the
synthetic layer). SpQR's 3-bit codes with 16-element groups and 0.5% exact outliers beat
GPTQ at 4.0 bits everywhere; on the tiny Wan, 4-bit GPTQ with 0.4 more bits per weight is
still better. SmoothQuant cuts the static per-tensor W8A8 error by 20-50x on the outlier
layer and about halves the tiny Wan's output error. Per-layer W8A8 errors need the
activations, so the tiny-Wan W8A8 rows report the model output only.

<!-- RESULTS -->
"""


# --- method runners: (params, stats) -> (params, aux) ------------------------------------------------
Runner = Callable[[Any, dict, Any], tuple[Any, dict]]


def weight_methods(spec: str) -> list[tuple[str, Runner]]:
    g = gptq.GPTQConfig()
    return [
        ("RTN", lambda p, s, r: (rtn.rtn(p, s, r), {})),
        ("RTN + clip search", lambda p, s, r: (rtn.rtn(p, s, r, rtn.RTNConfig(clip_search=True)), {})),
        ("AWQ (scale + clip search)", lambda p, s, r: awq.awq(p, s, r)),
        ("GPTQ", lambda p, s, r: (gptq.gptq(p, s, r, g), {})),
        (
            "GPTQ act-order (static groups)",
            lambda p, s, r: (gptq.gptq(p, s, r, dataclasses.replace(g, act_order=True)), {}),
        ),
    ]


def effective_kernel(leaf: Any, aux_entry: dict | None) -> jax.Array:
    """The dense kernel a layer applies to its *original* input (input_mul folded back)."""
    w = leaf.dequantize(jnp.float32) if hasattr(leaf, "dequantize") else dequantize(leaf, jnp.float32)
    mul = (aux_entry or {}).get("input_mul")
    return w if mul is None else w * jnp.asarray(mul, jnp.float32)[:, None]


def bits_of(leaf: Any) -> float:
    return lw.nominal_bits_per_weight(leaf)


# --- synthetic layer ---------------------------------------------------------------------------------
def synthetic_rows(seed: int, k: int, n: int, tokens: int) -> list[Row]:
    x, x_ho, w = layer_data(seed, k, n, tokens)
    cfg = calib.CalibConfig()
    st = calib.batch_stats(jnp.asarray(x), cfg)
    h, h_ho = st.hessian_mean, calib.batch_stats(jnp.asarray(x_ho), cfg).hessian_mean
    tree, stats = {"layer": {"kernel": jnp.asarray(w)}}, {"layer/kernel": st}
    rows: list[Row] = []

    def score(group: str, name: str, spec: str, out: Any, aux: dict) -> None:
        leaf = out["layer"]["kernel"]
        we = effective_kernel(leaf, aux.get("layer"))
        rows.append(
            Row(
                group,
                name,
                spec,
                bits_of(leaf),
                float(lw.relative_error(w, we, h)),
                float(lw.relative_error(w, we, h_ho)),
            )
        )

    for bits_label, spec in (("4-bit", "int4/g128"), ("3-bit", "int3/g128")):
        for name, fn in weight_methods(spec):
            out, aux = fn(tree, stats, spec)
            score(f"weight-only {bits_label}", name, spec, out, aux)
    group = "equal bits: SpQR vs GPTQ"
    for spec in ("int3/g16/s=bfloat16", "int4/g128/s=bfloat16"):
        score(group, "GPTQ", spec, gptq.gptq(tree, stats, spec), {})
    for rate in (0.0, 0.005, 0.01):
        c = spqr.SpQRConfig(bits=3, outlier_rate=rate)
        score(
            group, f"SpQR ({rate:.1%} outliers)", "3-bit, beta 16/16, 3-bit stats", spqr.spqr(tree, stats, ".*", c), {}
        )
    rows += w8a8_rows(tree, stats, x, x_ho, w)
    return rows


def w8a8_rows(tree: dict, stats: dict, x: np.ndarray, x_ho: np.ndarray, w: np.ndarray) -> list[Row]:
    rows = []
    y, y_ho = x @ w, x_ho @ w
    st = stats["layer/kernel"]

    def rel(xx, yy, kernel, act, mul, scale):
        xq = jnp.asarray(xx) * (1.0 if mul is None else mul)
        out = dispatch.linear(xq, kernel, act=act, act_scale=scale)
        return float(jnp.sum((out - yy) ** 2) / jnp.sum(jnp.asarray(yy) ** 2))

    for act in ("int8/t", "int8/token"):
        a = parse_spec(act)
        mode = "static per-tensor" if not a.dynamic else "dynamic per-token"
        group = f"W8A8 ({mode} activations)"
        plain = lw.quantize_fast(w, "int8")
        scale = None if a.dynamic else smoothquant.static_input_scale(st, None, a)
        rows.append(
            Row(
                group,
                "plain W8A8",
                f"int8 x {act}",
                8.0 + 32 / w.shape[0],
                rel(x, y, plain, a, None, scale),
                rel(x_ho, y_ho, plain, a, None, scale),
            )
        )
        for name, c in (
            ("SmoothQuant alpha=0.5", smoothquant.SmoothQuantConfig(act=act)),
            ("SmoothQuant searched alpha", smoothquant.SmoothQuantConfig(act=act, search=True)),
        ):
            out, aux = smoothquant.smoothquant(tree, stats, "int8", c)
            e = aux["layer"]
            _, alphas = smoothquant.smoothquant_search(tree, stats, "int8", c)
            rows.append(
                Row(
                    group,
                    name,
                    f"int8 x {act}",
                    bits_of(out["layer"]["kernel"]),
                    rel(x, y, out["layer"]["kernel"], a, e["input_mul"], e.get("input_scale")),
                    rel(x_ho, y_ho, out["layer"]["kernel"], a, e["input_mul"], e.get("input_scale")),
                    f"alpha={alphas['layer/kernel']:.2f}",
                )
            )
    return rows


# --- the bundled tiny model ------------------------------------------------------------------------
def tiny_model_rows(seed: int, n_batches: int, batch: int) -> tuple[list[Row], str]:
    try:
        tw = load_tiny()
    except (FileNotFoundError, OSError) as e:
        return [], f"skipped: bundled tiny model not found ({e})"
    model, params = tw.model, tw.params

    batches, held = tiny_wan_data(tw, seed, n_batches, batch)  # (branch, x_t, t, text); branch 1: unconditional
    apply = lambda p, b: model.apply({"params": p}, b[1], b[2], b[3])  # noqa: E731
    t0 = time.time()
    groups = calib.calibrate(
        apply,
        params,
        batches,
        calib.CalibConfig(layers=BLOCK_LINEARS),
        key_fn=lambda b: ("cond", "uncond")[b[0]],
        progress=False,
    )
    stats = calib.merge(*groups.values())  # per-CFG-branch statistics, pooled for the methods
    held_stats = calib.calibrate(
        apply, params, [held], calib.CalibConfig(layers=BLOCK_LINEARS, histogram=False), progress=False
    )
    note = (
        f"{len(stats)} block linears of the bundled tiny Wan ({sum(np.prod(v.shape) for _, v in flatten_with_paths(params)):,} params); "
        f"calibration: {n_batches} batches x {batch} clips (cond/uncond branches kept as separate groups, then pooled), "
        f"held-out: {batch} clips; calibrated in {time.time() - t0:.0f} s"
    )
    y_ref = apply(params, held)

    def e2e(out, aux, **kw):
        variables = {"params": out, **({"jquant": fold.aux_collection(aux)} if aux else {})}
        with jnn.quantized(**kw):
            y = model.apply(variables, held[1], held[2], held[3])
        return float(jnp.sum((y - y_ref) ** 2) / jnp.sum(y_ref**2))

    def layer_errors(out, aux):
        errs, errs_ho, bits = [], [], []
        for p, st in stats.items():
            leaf = _leaf(out, p)
            we = effective_kernel(leaf, aux.get(p[: -len("/kernel")]))
            w = _leaf(params, p)
            errs.append(float(lw.relative_error(w, we, st.hessian_mean)))
            errs_ho.append(float(lw.relative_error(w, we, held_stats[p].hessian_mean)))
            bits.append(bits_of(leaf) * np.prod(w.shape))
        size = sum(np.prod(_leaf(params, p).shape) for p in stats)
        return float(np.mean(errs)), float(np.mean(errs_ho)), float(np.sum(bits) / size)

    rows: list[Row] = []
    for bits_label, spec in (("4-bit", "int4/g64"), ("3-bit", "int3/g64")):
        for name, fn in weight_methods(spec):
            out, aux = fn(params, stats, [(BLOCK_LINEARS, spec)])
            e, e_ho, b = layer_errors(out, aux)
            rows.append(
                Row(f"tiny Wan, weight-only {bits_label}", name, spec, b, e, e_ho, f"model output {e2e(out, aux):.2e}")
            )
    group = "tiny Wan, equal bits: SpQR vs GPTQ"
    for spec in ("int3/g16/s=bfloat16", "int4/g64/s=bfloat16"):
        out = gptq.gptq(params, stats, [(BLOCK_LINEARS, spec)])
        e, e_ho, b = layer_errors(out, {})
        rows.append(Row(group, "GPTQ", spec, b, e, e_ho, f"model output {e2e(out, {}):.2e}"))
    for rate in (0.005, 0.01):
        out = spqr.spqr(params, stats, BLOCK_LINEARS, spqr.SpQRConfig(bits=3, outlier_rate=rate))
        e, e_ho, b = layer_errors(out, {})
        rows.append(
            Row(
                group,
                f"SpQR ({rate:.1%} outliers)",
                "3-bit, beta 16/16, 3-bit stats",
                b,
                e,
                e_ho,
                f"model output {e2e(out, {}):.2e}",
            )
        )
    for act in ("int8/t", "int8/token"):
        a = parse_spec(act)
        group = f"tiny Wan, W8A8 ({'static per-tensor' if not a.dynamic else 'dynamic per-token'} activations)"
        plain = rtn.rtn(params, None, [(BLOCK_LINEARS, "int8")])
        aux_pl = (
            {}
            if a.dynamic
            else {
                p[: -len("/kernel")]: {"input_scale": smoothquant.static_input_scale(s, None, a)}
                for p, s in stats.items()
            }
        )
        rows.append(
            Row(
                group,
                "plain W8A8",
                f"int8 x {act}",
                8.0 + 32 / 128,
                float("nan"),
                float("nan"),
                f"model output {e2e(plain, aux_pl, act=act, static=not a.dynamic):.2e}",
            )
        )
        for name, c in (
            ("SmoothQuant alpha=0.5", smoothquant.SmoothQuantConfig(act=act)),
            ("SmoothQuant searched alpha", smoothquant.SmoothQuantConfig(act=act, search=True)),
        ):
            out, aux = smoothquant.smoothquant(params, stats, [(BLOCK_LINEARS, "int8")], c)
            rows.append(
                Row(
                    group,
                    name,
                    f"int8 x {act}",
                    8.0 + 32 / 128,
                    float("nan"),
                    float("nan"),
                    f"model output {e2e(out, aux, act=act, static=not a.dynamic):.2e}",
                )
            )
    return rows, note


def _leaf(tree: Any, path: str) -> Any:
    node = tree
    for part in path.split("/"):
        node = node[part]
    return node


# --- markdown ------------------------------------------------------------------------------------------
def render(synth: list[Row], synth_note: str, model_rows: list[Row], model_note: str, wall: float) -> str:
    doc = DOC
    versions = f"jax {jax.__version__}, {jax.devices()[0].platform}, Python {platform.python_version()}"
    results = [
        f"Generated by `{COMMAND}` ({versions}; {wall:.0f} s).",
        "",
        "### Synthetic layer with DiT-like outliers",
        "",
        synth_note,
        table(synth),
        "",
        "### Bundled tiny Wan model",
        "",
        model_note,
        table(model_rows) if model_rows else "",
    ]
    return doc.replace("<!-- RESULTS -->", "\n".join(results))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "methods.md"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--no-model", action="store_true", help="skip the bundled tiny model")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args(argv)
    t0 = time.time()
    synth = synthetic_rows(args.seed, args.k, args.n, args.tokens)
    synth_note = (
        f"One {args.k} x {args.n} kernel (`jquant.algorithms.synthetic.layer_problem(seed={args.seed})`): "
        f"correlated activations with 4 channels 20-100x larger, heavy-tailed weights with 0.5% large entries; "
        f"{args.tokens} calibration tokens, {args.tokens} held-out tokens."
    )
    if args.no_model:
        model_rows, model_note = [], "skipped (--no-model)"
    else:
        model_rows, model_note = tiny_model_rows(args.seed, args.batches, args.batch)
    print(model_note)
    text = render(synth, synth_note, model_rows, model_note, time.time() - t0)
    out = Path(args.out)
    if out.exists():  # keep the sections other scripts own (scripts/rotation_table.py: rotations)
        text = keep(out.read_text(), text)
    out.write_text(text)
    print(table(synth))
    print(table(model_rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
