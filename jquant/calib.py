"""Calibration: streaming per-layer input statistics of a running Flax model.

While an unmodified linen or NNX model runs inside :func:`jquant.nn.observe`, every
intercepted linear layer's input ``x [..., K]`` is reduced *inside the jitted function*
to a :class:`LayerStats` (per-input-channel sums, absmax and log-histogram, the Hessian
``X^T X`` and the token count). Only these reductions leave the trace, as outputs; the
activations themselves are never held past one batch, so memory is O(K^2) per layer.
Statistics are keyed by the layer's kernel param path (module path + ``'/kernel'``), the
key every algorithm (GPTQ, AWQ, SmoothQuant, SpQR) looks layers up by.

Usage (linen; for NNX pass ``graphdef=`` and ``apply_fn(model, batch)``)::

    apply_fn = lambda params, batch: model.apply({"params": params}, batch)
    stats = calib.calibrate(apply_fn, params, batches)            # {path: LayerStats}
    # or by hand, as a jitted step:
    stats = calib.init(apply_fn, params, batches[0])
    step = calib.make_step(apply_fn)
    for b in batches:
        stats = step(stats, params, b)

Groups (timestep groups, CFG branches): ``calibrate(..., key_fn=lambda batch: ...)``
keeps one ``Stats`` per key (``{key: {path: LayerStats}}``); :func:`merge` pools them.

Percentiles are estimated from a fixed log2-spaced histogram of ``|x|`` per channel
(``bins_per_octave`` bins per power of two over ``2**log2_range``): unlike per-batch
percentiles aggregated by max or mean, the histogram is exact up to the bin width, does
not depend on how the data is split into batches, and merges across batches and groups
by addition. Values outside the range land in the first/last bin (the top one is bounded
by the exact absmax).

Layers that run under a nested JAX transform (``nn.scan`` / ``nn.remat`` / ``nn.vmap``
over blocks) cannot be observed this way (their inputs are tracers of the inner
transform); calibrating such a model raises a clear error — unroll the blocks for
calibration.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from typing import Any, Callable, Hashable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jquant import nn as jnn
from jquant.rules import flatten_with_paths

Array = jax.Array
log = logging.getLogger(__name__)
_HIGHEST = jax.lax.Precision.HIGHEST


# --- statistics ------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerStats:
    """Accumulated statistics of one linear layer's input (K input channels).

    Attributes:
      count: number of tokens (rows of the flattened input), fp32 scalar.
      sum: per-channel sum of x [K].
      abssum: per-channel sum of |x| [K] (AWQ's activation magnitude).
      absmax: per-channel max |x| [K].
      hessian: sum over tokens of x x^T [K, K], fp32 (GPTQ's H up to a factor 2).
      hist: per-channel counts of |x| in log2 bins [K, B] (B = 0 when disabled).
      log2_lo: lower end of the histogram range (static).
      bins_per_octave: histogram resolution (static).
    """

    count: Array
    sum: Array
    abssum: Array
    absmax: Array
    hessian: Array
    hist: Array
    log2_lo: int = dataclasses.field(default=-20, metadata=dict(static=True))
    bins_per_octave: int = dataclasses.field(default=4, metadata=dict(static=True))

    @property
    def channels(self) -> int:
        return int(self.sum.shape[-1])

    @property
    def mean(self) -> Array:
        """Per-channel mean of x."""
        return self.sum / jnp.maximum(self.count, 1.0)

    @property
    def absmean(self) -> Array:
        """Per-channel mean of |x|."""
        return self.abssum / jnp.maximum(self.count, 1.0)

    @property
    def hessian_mean(self) -> Array:
        """E[x x^T] = X^T X / n."""
        return self.hessian / jnp.maximum(self.count, 1.0)

    def covariance(self) -> Array:
        """Unbiased input covariance (X^T X - n mu mu^T) / (n - 1), from the running sums."""
        n = jnp.maximum(self.count, 2.0)
        mu = self.sum / n
        return (self.hessian - n * jnp.outer(mu, mu)) / (n - 1.0)

    def percentile(self, q: float | Sequence[float]) -> Array:
        """Per-channel percentile(s) of |x| (q in [0, 100]) from the log2 histogram.

        Interpolates geometrically inside the bin holding the rank; the result is exact
        up to one bin width (a factor ``2**(1/bins_per_octave)``) and never above absmax.
        Returns [K] for a scalar q, else [len(q), K].
        """
        if self.hist.shape[-1] == 0:
            raise ValueError("percentiles need the histogram; calibrate with CalibConfig(histogram=True)")
        qs = np.atleast_1d(np.asarray(q, np.float64))
        if np.any((qs < 0) | (qs > 100)):
            raise ValueError(f"percentiles must lie in [0, 100], got {q}")
        h = self.hist.astype(jnp.float32)
        cum = jnp.cumsum(h, axis=-1)  # [K, B]
        total = cum[:, -1:]
        nb = h.shape[-1]
        edges = 2.0 ** (self.log2_lo + jnp.arange(nb - 1, dtype=jnp.float32) / self.bins_per_octave)  # [B-1]
        lo_edge = jnp.concatenate([jnp.zeros(1), edges])  # bin b covers [lo_edge[b], hi_edge[b])
        hi_edge = jnp.concatenate([edges, jnp.full(1, jnp.inf)])
        out = []
        for qq in qs:
            rank = qq / 100.0 * total  # [K, 1]
            b = jnp.sum(cum < rank, axis=-1)  # first bin with cum >= rank
            b = jnp.minimum(b, nb - 1)
            cb = jnp.take_along_axis(cum, b[:, None], -1)[:, 0]
            hb = jnp.take_along_axis(h, b[:, None], -1)[:, 0]
            frac = jnp.clip(1.0 - (cb - rank[:, 0]) / jnp.maximum(hb, 1.0), 0.0, 1.0)
            lo, hi = lo_edge[b], jnp.minimum(hi_edge[b], self.absmax)
            lo = jnp.minimum(lo, hi)
            geo = jnp.where(lo > 0, lo * (hi / jnp.where(lo > 0, lo, 1.0)) ** frac, hi * frac)
            out.append(jnp.minimum(geo, self.absmax))
        res = jnp.stack(out)
        return res[0] if np.ndim(q) == 0 else res


Stats = dict[str, LayerStats]


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    """What to collect.

    Attributes:
      hessian: accumulate X^T X (needed by GPTQ/AWQ/SmoothQuant's search/SpQR).
      histogram: accumulate the per-channel log2 histogram of |x| (percentiles).
      bins_per_octave: histogram bins per power of two.
      log2_range: (lo, hi) exponents of the histogram range [2**lo, 2**hi).
      layers: only observe these kernel paths: a regex string, or a collection of exact
        paths; None observes every intercepted linear layer.
    """

    hessian: bool = True
    histogram: bool = True
    bins_per_octave: int = 4
    log2_range: tuple[int, int] = (-20, 20)
    layers: str | frozenset[str] | None = None

    def __post_init__(self) -> None:
        lo, hi = self.log2_range
        if not hi > lo:
            raise ValueError(f"log2_range must be (lo, hi) with hi > lo, got {self.log2_range}")
        if self.bins_per_octave < 1:
            raise ValueError(f"bins_per_octave must be >= 1, got {self.bins_per_octave}")
        if self.layers is not None and not isinstance(self.layers, str):
            object.__setattr__(self, "layers", frozenset(self.layers))
        if isinstance(self.layers, str):
            re.compile(self.layers)

    @property
    def n_bins(self) -> int:
        lo, hi = self.log2_range
        return (hi - lo) * self.bins_per_octave + 2 if self.histogram else 0

    def wants(self, path: str) -> bool:
        if self.layers is None:
            return True
        if isinstance(self.layers, str):
            return re.search(self.layers, path) is not None
        return path in self.layers


@functools.partial(jax.jit, static_argnames=("config",))
def batch_stats(x2: Array, config: CalibConfig) -> LayerStats:
    """Statistics of one batch of inputs ``x2 [T, K]`` (jitted; ``config`` static)."""
    x2 = x2.astype(jnp.float32)
    t, k = x2.shape
    ax = jnp.abs(x2)
    if config.hessian:
        h = jnp.einsum("tk,tl->kl", x2, x2, precision=_HIGHEST)
    else:
        h = jnp.zeros((k, 0), jnp.float32)
    nb = config.n_bins
    if nb:
        lo = config.log2_range[0]
        m = nb - 2
        safe = jnp.where(ax > 0, ax, 1.0)
        b = jnp.floor((jnp.log2(safe) - lo) * config.bins_per_octave).astype(jnp.int32) + 1
        b = jnp.where(ax > 0, jnp.clip(b, 0, m + 1), 0)
        flat = (b + jnp.arange(k, dtype=jnp.int32)[None, :] * nb).reshape(-1)
        hist = jnp.bincount(flat, length=k * nb).reshape(k, nb).astype(jnp.int32)
    else:
        hist = jnp.zeros((k, 0), jnp.int32)
    return LayerStats(
        count=jnp.asarray(t, jnp.float32),
        sum=jnp.sum(x2, axis=0),
        abssum=jnp.sum(ax, axis=0),
        absmax=jnp.max(ax, axis=0, initial=0.0),
        hessian=h,
        hist=hist,
        log2_lo=config.log2_range[0],
        bins_per_octave=config.bins_per_octave,
    )


def combine(a: LayerStats, b: LayerStats) -> LayerStats:
    """Statistics of the union of the inputs behind ``a`` and ``b``."""
    if a.sum.shape != b.sum.shape or a.hist.shape != b.hist.shape or a.hessian.shape != b.hessian.shape:
        raise ValueError(f"cannot combine statistics of different shapes: {a.sum.shape} vs {b.sum.shape}")
    return LayerStats(
        count=a.count + b.count,
        sum=a.sum + b.sum,
        abssum=a.abssum + b.abssum,
        absmax=jnp.maximum(a.absmax, b.absmax),
        hessian=a.hessian + b.hessian,
        hist=a.hist + b.hist,
        log2_lo=a.log2_lo,
        bins_per_octave=a.bins_per_octave,
    )


def accumulate(stats: Stats, part: Stats) -> Stats:
    """Add a batch's partial statistics into running statistics (layer-wise)."""
    out = dict(stats)
    for k, v in part.items():
        out[k] = combine(out[k], v) if k in out else v
    return out


def merge(*stats: Stats) -> Stats:
    """Pool several groups' statistics (e.g. all timestep groups and CFG branches)."""
    if not stats:
        raise ValueError("merge needs at least one Stats")
    out: Stats = {}
    for s in stats:
        out = accumulate(out, s)
    return out


def validate(stats: Stats, paths: Iterable[str] | None = None) -> None:
    """Raise a clear error if a layer is missing or saw zero tokens."""
    if not stats:
        raise ValueError("empty statistics: no linear layer was observed during calibration")
    if paths is not None:
        missing = [p for p in paths if p not in stats]
        if missing:
            raise KeyError(
                f"no calibration statistics for {missing}; calibrated layers: {sorted(stats)[:8]}"
                + (" ..." if len(stats) > 8 else "")
            )
    for p in stats if paths is None else paths:
        if float(stats[p].count) <= 0:
            raise ValueError(f"layer {p!r} saw zero tokens during calibration; give it non-empty inputs")


# --- running the model under observation ------------------------------------------------------
def _kernel_shapes(params: Any) -> dict[str, tuple[int, ...]]:
    """kernel path -> shape, with a leading 'params/' stripped (linen variables)."""
    out = {}
    for p, leaf in flatten_with_paths(params):
        if p.endswith("kernel"):
            shape = tuple(leaf.shape)
            out[p] = shape
            if p.startswith("params/"):
                out[p[len("params/") :]] = shape
    return out


def _contract_dims(x_shape: tuple[int, ...], k_shape: tuple[int, ...] | None) -> int:
    """How many trailing axes of x the kernel contracts (largest match, 1 by default)."""
    if not k_shape:
        return 1
    for c in range(min(len(k_shape) - 1, len(x_shape)), 0, -1):
        if tuple(x_shape[-c:]) == tuple(k_shape[:c]):
            return c
    return 1


def _observed_stats(apply_fn: Callable, config: CalibConfig, graphdef: Any, params: Any, batch: Any) -> Stats:
    """Run the model once under observation; return per-layer batch statistics (traceable)."""
    shapes = _kernel_shapes(params)
    parts: Stats = {}
    reduce_cfg = dataclasses.replace(config, layers=None)  # one compiled reduction for any layer filter

    def obs(module_path: str, x: Array) -> None:
        path = f"{module_path}/kernel"
        if not config.wants(path):
            return
        c = _contract_dims(tuple(x.shape), shapes.get(path))
        x2 = x.reshape(-1, math.prod(x.shape[x.ndim - c :]))
        s = batch_stats(x2, reduce_cfg)
        parts[path] = combine(parts[path], s) if path in parts else s

    if graphdef is not None:
        model = nnx.merge(graphdef, params)
        with jnn.observe(obs, nnx_model=model):
            apply_fn(model, batch)
    else:
        with jnn.observe(obs):
            apply_fn(params, batch)
    return parts


def _traced(fn: Callable, *args):
    try:
        return fn(*args)
    except jax.errors.UnexpectedTracerError as e:
        raise RuntimeError(
            "calibration observed a layer inside a nested JAX transform (nn.scan/nn.remat/nn.vmap); "
            "its input cannot leave that transform. Unroll the blocks for calibration."
        ) from e


def init(
    apply_fn: Callable, params: Any, example_batch: Any, config: CalibConfig | None = None, *, graphdef: Any = None
) -> Stats:
    """Zero statistics for every layer the model runs (traced once with ``eval_shape``)."""
    config = config or CalibConfig()
    shapes = _traced(
        jax.eval_shape, lambda p, b: _observed_stats(apply_fn, config, graphdef, p, b), params, example_batch
    )
    if not shapes:
        raise ValueError(
            "no linear layer was observed: does the model use flax Dense/Linear layers (or match config.layers)?"
        )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


StepFn = Callable[[Stats, Any, Any], Stats]


def make_step(apply_fn: Callable, config: CalibConfig | None = None, *, graphdef: Any = None) -> StepFn:
    """A jitted ``step(stats, params, batch) -> stats`` that observes one batch and accumulates.

    ``apply_fn(params, batch)`` runs a linen model (e.g. ``lambda p, b: model.apply({"params": p}, b)``);
    with ``graphdef`` (NNX), ``apply_fn(model, batch)`` receives ``nnx.merge(graphdef, params)``.
    The model is traced once per distinct batch shape / params structure.
    """
    config = config or CalibConfig()
    donate = () if jax.default_backend() == "cpu" else (0,)

    def fn(stats: Stats, params: Any, batch: Any) -> Stats:
        part = _observed_stats(apply_fn, config, graphdef, params, batch)
        extra = sorted(set(part) - set(stats))
        if extra:
            raise KeyError(
                f"layers {extra} were not in the initial statistics; build them with calib.init on the same model"
            )
        return accumulate(stats, part)

    jitted = jax.jit(fn, donate_argnums=donate)
    return lambda stats, params, batch: _traced(jitted, stats, params, batch)


def _progress(it: Iterable, total: int | None, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return it

    return tqdm(it, total=total, desc=desc, unit="batch", leave=False)


def calibrate(
    apply_fn: Callable,
    params: Any,
    batches: Iterable[Any],
    config: CalibConfig | None = None,
    *,
    graphdef: Any = None,
    key_fn: Callable[[Any], Hashable] | None = None,
    progress: bool = True,
    desc: str = "calibration",
) -> Stats | dict[Hashable, Stats]:
    """Stream ``batches`` through the model and return the accumulated statistics.

    Args:
      apply_fn: ``apply_fn(params, batch)`` (linen) or ``apply_fn(model, batch)`` with ``graphdef`` (NNX).
      params: the params tree given to ``apply_fn`` (for NNX: the state merged with ``graphdef``).
      batches: an iterable of batches: pytrees of arrays (or numbers) that ``apply_fn``
        accepts; they are passed through ``jax.jit``, so no strings.
      config: what to collect (default :class:`CalibConfig`).
      key_fn: if given, statistics are kept per ``key_fn(batch)`` (a hashable computed on
        the host, e.g. timestep group or CFG branch) and a ``{key: Stats}`` dict is
        returned; pool with :func:`merge`. (By hand: keep a dict of Stats and call the
        :func:`make_step` step on the entry of each batch's group.)
      progress: show a tqdm bar over batches.

    Raises:
      ValueError: empty calibration data, no layer observed, or a layer with zero tokens.
    """
    config = config or CalibConfig()
    step = make_step(apply_fn, config, graphdef=graphdef)
    total = len(batches) if hasattr(batches, "__len__") else None
    groups: dict[Hashable, Stats] = {}
    template: Stats | None = None
    n = 0
    for batch in _progress(batches, total, desc, progress):
        key = key_fn(batch) if key_fn is not None else None
        if key not in groups:
            if template is None:
                template = init(apply_fn, params, batch, config, graphdef=graphdef)
            groups[key] = jax.tree.map(jnp.zeros_like, template)
        groups[key] = step(groups[key], params, batch)
        n += 1
    if n == 0:
        raise ValueError("empty calibration data: `batches` yielded nothing")
    for s in groups.values():
        validate(s)
    return groups[None] if key_fn is None else groups


# --- sequential (block-by-block) mode ------------------------------------------------------------
Block = str | Sequence[str]
QuantizeFn = Callable[[Any, Stats, list[str]], Any]


def _block_paths(params: Any, block: Block, i: int) -> list[str]:
    kernels = [p for p, leaf in flatten_with_paths(params) if p.endswith("kernel")]
    if isinstance(block, str):
        paths = [p for p in kernels if re.search(block, p)]
        if not paths:
            raise ValueError(f"block {i}: regex {block!r} matches no kernel path")
        return paths
    paths = list(block)
    if not paths:
        raise ValueError(f"block {i} is empty")
    known = set(kernels)
    missing = [p for p in paths if p not in known]
    if missing:
        raise ValueError(f"block {i}: {missing} are not kernel paths of the params tree")
    return paths


def sequential(
    apply_fn: Callable,
    params: Any,
    batches: Sequence[Any] | Callable[[], Iterable[Any]],
    blocks: Sequence[Block],
    quantize_fn: QuantizeFn,
    config: CalibConfig | None = None,
    *,
    graphdef: Any = None,
    progress: bool = True,
) -> Any:
    """Quantize block by block, each block calibrated on the already-quantized model.

    For each block (an ordered list of layer groups: a regex over kernel paths or a list
    of exact kernel paths), statistics of *that block's* layers are collected while the
    model runs with the current params (earlier blocks already quantized, so their
    error reaches the later blocks' inputs, as GPTQ's error propagation wants), then
    ``quantize_fn(params, stats, block_paths) -> params`` quantizes the block, e.g.
    ``lambda p, s, ls: gptq.gptq(p, s, "int4/g128", layers=ls)``.

    The model is run over all batches once per block, so ``batches`` must be re-iterable
    (a sequence, or a zero-argument callable returning a fresh iterable).
    """
    if not blocks:
        raise ValueError("sequential needs at least one block")
    if not callable(batches) and iter(batches) is batches:
        raise TypeError(
            "sequential iterates the calibration data once per block: pass a sequence or a callable returning a fresh iterable"
        )
    config = config or CalibConfig()
    for i, block in enumerate(blocks):
        paths = _block_paths(params, block, i)
        cfg = dataclasses.replace(config, layers=frozenset(paths))
        data = batches() if callable(batches) else batches
        stats = calibrate(
            apply_fn, params, data, cfg, graphdef=graphdef, progress=progress, desc=f"block {i + 1}/{len(blocks)}"
        )
        unseen = [p for p in paths if p not in stats]
        if unseen:
            raise ValueError(f"block {i}: layers {unseen} did not run during calibration")
        params = quantize_fn(params, stats, paths)
        log.info("sequential: quantized block %d/%d (%d layers)", i + 1, len(blocks), len(paths))
    return params
