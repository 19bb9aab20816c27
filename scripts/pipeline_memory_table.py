#!/usr/bin/env python3
"""The handbook's memory table (its Table 10) for whole text-to-video pipelines, measured.

Each pipeline is Wan2.1's text encoder (UMT5-XXL, int8 weight-only: the handbook's advice),
a transformer at a published size with synthetic weights, and Wan2.1's VAE in bf16, for a
480x832, 81-frame clip (21 x 60 x 104 latents, 32,760 video tokens, 512 text tokens):

* ``wan14b``: Wan2.1-T2V-14B; one sampler step runs the transformer on the ``[uncond; cond]``
  batch of 2 (classifier-free guidance, as jquant's sampler and WanPipeline do) plus the CFG
  combination and the Euler update; the negative prompt is encoded too.
* ``hunyuan``: HunyuanVideo-T2V (13B) fed by Wan's encoder (UMT5's 4096-wide output is
  HunyuanVideo's ``text_embed_dim``) and VAE (same 16-channel, 4x/8x latents); guidance is
  embedded (HunyuanVideoPipeline's default, no negative branch): a batch of 1 per step; its
  768-wide pooled projection is a stand-in (Wan has no CLIP).

Transformer recipes (the names of ``jquant quantize --list``; weights synthetic, no calibration:
memory and speed do not depend on the values): ``bf16``; ``fp8-w`` (fp8 e4m3 weights per output
channel); ``fp8-wa`` run with dynamic per-token fp8 activations (``--table dynamic``); ``int8-w``;
``q5_k_m`` and ``q4_k_m`` (random ggml blocks under llama.cpp's mixes); ``w4-svd`` (SVDQuant's
layout: int4/g64 weights, a rank-``--rank`` bf16 low-rank branch and a smoothing vector per
layer, int4 per-token activations). Embedders, modulation and the output head stay bf16 in the
uniform recipes, as ``jquant.policy.uniform`` does.

Per component: resident weight bytes (``jquant.rules.leaf_nbytes``: QArrays packed) and the peak of
its largest call (XLA's memory analysis of the compiled call: arguments + outputs +
temporaries); the pipeline's peak is ``jquant.pipeline.t2v.memory.MemoryReport``'s (all weights
resident, plus the largest call's working set beyond them). Recipes in ``--time`` are also timed:
median and min of ``--runs`` (>= 10) calls of the compiled step, after its output is checked: a
weight-only step against the bf16 step run on the recipe's decoded weights (``--weight-tol``), a
step with quantized activations against the same bf16 step (``--act-tol``: their quantization
error is inside it; ``--act-ref xla`` checks against the step with every Pallas kernel off
instead, XLA's paths, which at 14B took over 400 s on an H200), bf16 and the VAE for finiteness (their numerics are the CPU
parity tests' and ``scripts/bench_e2e.py``'s). The check runs the compiled step at guidance 0
and 1 (each branch's prediction alone: CFG's ``u + g (c - u)`` at the timed ``g`` = 5 magnifies
the branches' differences up to 9x) and the timing at guidance 5. Against the bf16 step the
tolerance is at least ``FLOOR_FACTOR`` times the step's rounding floor: how far the same bf16 step
moves when every weight moves by about one bf16 rounding step (``bf16_nudged``; a random-weight
model can amplify any change of rounding order, so a kernel's accumulation order alone can
exceed a fixed tolerance); the row records both. The int8 encoder is checked as a weight-only step. Seconds per clip = encoder calls + ``--steps`` x step + VAE decode, from the medians.

Writes ``benchmarks/pipeline_memory-<device>.json``; rows of earlier runs with other keys are
kept (so ``--models wan14b`` and ``--models hunyuan`` can run as two calls).

    PYTHONPATH=. python3 scripts/pipeline_memory_table.py --models wan14b              # GPU
    PYTHONPATH=. python3 scripts/pipeline_memory_table.py --models hunyuan --components ""
    PYTHONPATH=. python3 scripts/pipeline_memory_table.py --tiny                       # CPU dry run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jquant.nn as jnn  # noqa: E402
from jquant import models  # noqa: E402
from jquant import policy as pol  # noqa: E402
from jquant.algorithms import kquants  # noqa: E402
from jquant.models import hunyuan_video, t5, wan, wan_vae  # noqa: E402
from jquant.pipeline.runtime import tree_bytes  # noqa: E402
from jquant.pipeline.t2v.memory import ComponentMemory, MemoryReport, compiled_peak  # noqa: E402
from jquant.qarray import QArray, dequantize  # noqa: E402
from jquant.rules import quantize_params  # noqa: E402
from pallas_kernels import _common, timing  # noqa: E402

_E2E = Path(__file__).resolve().parent / "bench_e2e.py"
_spec = importlib.util.spec_from_file_location("bench_e2e", _E2E)
bench_e2e = importlib.util.module_from_spec(_spec)  # its synthetic_kquant: random ggml blocks under a mix
_spec.loader.exec_module(bench_e2e)

BF16 = jnp.bfloat16
W4 = "int4/g64"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a recipe's transformer weights are laid out and run (see the module docstring)."""

    weights: str | None  # uniform spec, a GGUF mix name, or None (bf16)
    act: str | None = None  # dynamic activation spec of the run
    lowrank: bool = False  # SVDQuant's branch + smoothing vector per quantized layer


RECIPES: dict[str, Recipe] = {
    "bf16": Recipe(None),
    "fp8-w": Recipe("fp8_e4m3"),
    "fp8-wa": Recipe("fp8_e4m3", act="fp8_e4m3/token"),
    "int8-w": Recipe("int8"),
    "q5_k_m": Recipe("Q5_K_M"),
    "q4_k_m": Recipe("Q4_K_M"),
    "w4-svd": Recipe(W4, act="int4/token", lowrank=True),
}

# UMT5-XXL as in Wan2.1's text_encoder/config.json (umt5-xxl encoder).
UMT5_XXL = t5.T5EncoderConfig(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, model_type="umt5"
)
TINY_UMT5 = t5.T5EncoderConfig(vocab_size=64, d_model=64, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
TINY_VAE = wan_vae.WanVAEConfig(
    base_dim=8,
    z_dim=4,
    dim_mult=(1, 2),
    num_res_blocks=1,
    temperal_downsample=(True,),
    latents_mean=(0.0,) * 4,
    latents_std=(1.0,) * 4,
    scale_factor_temporal=None,
    scale_factor_spatial=None,
)


@dataclasses.dataclass(frozen=True)
class Model:
    """A transformer family of the table: its config, the batch of one sampler step, and the
    apply call from (latents, timestep, text) to the velocity."""

    label: str
    config: Any
    cfg: bool  # a negative branch: batch 2 per step and two encoder calls

    def inputs(self, latent: tuple[int, ...], text: jax.Array) -> dict[str, Any]:
        """The extra conditioning arrays of one step (beyond latents, timestep, text)."""
        if isinstance(self.config, hunyuan_video.HunyuanVideoConfig):
            b = latent[0]
            return {
                "pooled": jnp.zeros((b, self.config.pooled_projection_dim), BF16),
                "guidance": jnp.full((b,), 6000.0, jnp.float32),
            }
        return {}


def _apply(model: Model, module: Any, variables: Any, x, t, text, extra) -> jax.Array:
    if isinstance(model.config, hunyuan_video.HunyuanVideoConfig):
        return module.apply(
            variables,
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=text,
            pooled_projections=extra["pooled"],
            guidance=extra["guidance"],
            encoder_attention_mask=None,
        )
    return module.apply(variables, x, t, text)


def tiny_models() -> dict[str, Model]:
    """Two-layer stand-ins of the two families (CPU dry run), at the tiny VAE's 4 latent channels."""
    tiny_wan = wan.WanConfig(
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        text_dim=64,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
    )
    tiny_hunyuan = hunyuan_video.HunyuanVideoConfig(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=32,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        text_embed_dim=64,
        pooled_projection_dim=8,
        rope_axes_dim=(8, 12, 12),
    )
    return {
        "wan14b": Model("Wan2.1-T2V-14B (tiny)", tiny_wan, True),
        "hunyuan": Model("HunyuanVideo-T2V 13B (tiny)", tiny_hunyuan, False),
    }


MODELS = {
    "wan14b": Model("Wan2.1-T2V-14B", wan.WAN21_T2V_14B, True),
    "hunyuan": Model("HunyuanVideo-T2V 13B", hunyuan_video.HUNYUAN_VIDEO_T2V, False),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy configs and a small clip (CPU dry run)")
    p.add_argument("--models", default="wan14b,hunyuan", help=f"comma list of {list(MODELS)}")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of {list(RECIPES)}")
    p.add_argument("--time", default="bf16,fp8-wa,q4_k_m", help="recipes whose step is also timed")
    p.add_argument(
        "--check",
        default="",
        help="recipes whose step is checked but not timed (status CHECKED; e.g. with JQUANT_BACKEND=xla "
        "to tell a kernel's error from the recipe's)",
    )
    p.add_argument(
        "--components",
        default="encoder,vae",
        help="which of encoder,vae to measure ('' for none; rows kept from the JSON)",
    )
    p.add_argument("--frames", type=int, default=None, help="video frames (default 81; tiny: 5)")
    p.add_argument("--height", type=int, default=None, help="pixels (default 480; tiny: 32)")
    p.add_argument("--width", type=int, default=None, help="pixels (default 832; tiny: 32)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (default 512; tiny: 8)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps per clip (for the seconds per clip)")
    p.add_argument("--rank", type=int, default=32, help="w4-svd's low-rank branch rank")
    p.add_argument("--runs", type=int, default=timing.MIN_RUNS, help="timed runs (at least 10)")
    p.add_argument("--weight-tol", type=float, default=2e-2, help="rel. L2 vs the dequantized bf16 step, weight-only")
    p.add_argument(
        "--act-tol", type=float, default=1e-1, help="quantized activations: rel. L2 vs the reference (--act-ref)"
    )
    p.add_argument(
        "--act-ref",
        choices=("dequantized", "xla"),
        default="dequantized",
        help="quantized activations' reference: the bf16 step on the decoded weights, or the kernels-off step",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=540.0, help="skip rows started after this")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks")
    a = p.parse_args(argv)
    a.runs = max(a.runs, timing.MIN_RUNS)
    frames, height, width, text = (5, 32, 32, 8) if a.tiny else (81, 480, 832, 512)
    a.frames, a.height, a.width = a.frames or frames, a.height or height, a.width or width
    a.text_len = a.text_len or text
    a.models, a.recipes = a.models.split(","), a.recipes.split(",")
    a.time = {r for r in a.time.split(",") if r}  # '' times nothing
    a.check = {r for r in a.check.split(",") if r} - a.time
    a.components = [c for c in a.components.split(",") if c]
    if set(a.components) - {"encoder", "vae"}:
        p.error(f"--components: {a.components} not within ['encoder', 'vae']")
    for name in a.models:
        if name not in MODELS:
            p.error(f"--models: unknown {name!r}; choose from {list(MODELS)}")
    for name in [*a.recipes, *a.time, *a.check]:
        if name not in RECIPES:
            p.error(f"--recipes/--time/--check: unknown {name!r}; choose from {list(RECIPES)}")
    return a


# --- weights ---------------------------------------------------------------------------------------
def _bucket(n: int) -> int:
    """The power of two at or above ``n``: the length a leaf's random numbers are drawn at."""
    return 1 << max(n - 1, 0).bit_length()


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random_flat(key: jax.Array, size: int, kind: str, dtype: Any, scale: jax.Array) -> jax.Array:
    if kind == "uniform":  # in [-1, 1)
        return (jax.random.uniform(key, (size,), jnp.float32, -1.0, 1.0) * scale).astype(dtype)
    return (jax.random.normal(key, (size,), jnp.float32) * scale).astype(dtype)


@functools.partial(jax.jit, static_argnums=1)
def _first(flat: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return flat[: math.prod(shape)].reshape(shape)


def _random_drawn(key: jax.Array, n: int, kind: str, dtype: Any, scale: float) -> jax.Array:
    """``jax.random.<kind>(key, (n,), float32) * scale`` in ``dtype`` (uniform: in [-1, 1)), bit
    for bit, as the first ``n`` numbers of a draw of the next power-of-two length: threefry's
    counter is each element's flat index, so the numbers of any shape are the first ones of a
    longer flat draw. One compiled random program per length, not one per leaf shape (the tiny
    dry run's 39 leaf shapes took 33 s of CPU compiles); a draw is at most twice its leaf's length."""
    return _random_flat(key, _bucket(n), kind, jnp.dtype(dtype), jnp.float32(scale))


def _random_shaped(key: jax.Array, shape: tuple[int, ...], kind: str, dtype: Any, scale: float) -> jax.Array:
    """``jax.random.<kind>(key, shape, float32) * scale`` in ``dtype``, bit for bit (see ``_random_drawn``)."""
    return _first(_random_drawn(key, math.prod(shape), kind, dtype, scale), tuple(shape))


def _normal_flat(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """``jax.random.normal(key, shape, dtype)``, bit for bit, drawn flat and reshaped (XLA:CPU
    compiles a 4-D or 5-D threefry draw several times slower than a flat one)."""
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def _random_leaf(key: jax.Array, shape: tuple[int, ...], kind: str, dtype: Any) -> jax.Array:
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    fan = shape[0] if kind == "kernel" else shape[-1]
    return _random_shaped(key, shape, "normal", dtype, fan**-0.5)


def random_tree(shapes: Any, seed: int, dtype: Any = BF16) -> Any:
    """Random weights for a tree of ShapeDtypeStructs, made on the device one leaf at a time:
    kernels ~ N(0, 1/fan_in), norm scales 1, biases 0, other tables ~ N(0, 1/width)."""
    key = jax.random.key(seed)

    def make(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = str(getattr(path[-1], "key", path[-1]))
        kind = {"scale": "ones", "bias": "zeros", "kernel": "kernel"}.get(name, "table")
        digest = zlib.crc32(jax.tree_util.keystr(path).encode())
        return _random_leaf(jax.random.fold_in(key, digest), tuple(leaf.shape), kind, jnp.dtype(dtype))

    return jax.tree_util.tree_map_with_path(make, shapes)


def _lowrank_aux(params: Any, rank: int, seed: int) -> dict[str, Any]:
    """SVDQuant's per-layer aux entries (``jquant.nn.AUX_KEYS``) for every QArray kernel:
    a rank-``rank`` bf16 branch and a smoothing vector (ones)."""
    aux: dict[str, Any] = {}
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    for i, (path, leaf) in enumerate(flat.items()):
        if not isinstance(leaf, QArray) or not path.endswith("/kernel"):
            continue
        k, n = leaf.shape[-2], leaf.shape[-1]
        ka, kb = jax.random.split(jax.random.fold_in(jax.random.key(seed), i))
        layer = path[: -len("/kernel")]
        aux[f"{layer}/lowrank_a"] = (jax.random.normal(ka, (k, rank), jnp.float32) * k**-0.5).astype(BF16)
        aux[f"{layer}/lowrank_b"] = (jax.random.normal(kb, (rank, n), jnp.float32) * 0.01).astype(BF16)
        aux[f"{layer}/input_mul"] = jnp.ones((k,), BF16)
    return flax.traverse_util.unflatten_dict(aux, sep="/")


def recipe_variables(name: str, params: Any, roles: dict, rank: int, seed: int) -> dict[str, Any]:
    """The transformer's variables under a recipe: ``{"params": ...}`` (+ ``"jquant"`` aux)."""
    r = RECIPES[name]
    if r.weights is None:
        return {"params": params}
    if r.weights in kquants.MIX_BASE:
        return {"params": bench_e2e.synthetic_kquant(params, roles, r.weights, seed)}
    # One jitted program for the whole tree: eager per-leaf quantization took 90-108 s for the 14B
    # transformer's fp8 weights on an H200 (the same codes; tests/test_pipeline_memory_table.py).
    q = jax.jit(lambda p: pol.uniform(r.weights).quantize(p, roles))(params)
    out = {"params": q}
    if r.lowrank:
        out[jnn.AUX_COLLECTION] = _lowrank_aux(q, rank, seed)
    return out


def dequantized(variables: dict[str, Any]) -> dict[str, Any]:
    """The bf16 reference weights of a recipe: every QArray decoded, a low-rank branch folded into
    its kernel (``W + A B``; the synthetic smoothing vector is ones)."""
    aux = flax.traverse_util.flatten_dict(variables.get(jnn.AUX_COLLECTION, {}), sep="/")
    out = {}
    for path, leaf in flax.traverse_util.flatten_dict(variables["params"], sep="/").items():
        if not isinstance(leaf, QArray):
            out[path] = leaf
            continue
        w = dequantize(leaf).astype(jnp.float32)
        a, b = aux.get(path.replace("/kernel", "/lowrank_a")), aux.get(path.replace("/kernel", "/lowrank_b"))
        if a is not None:
            w = w + a.astype(jnp.float32) @ b.astype(jnp.float32)
        out[path] = w.astype(BF16)
    return {"params": flax.traverse_util.unflatten_dict(out, sep="/")}


# --- timing ----------------------------------------------------------------------------------------
def time_compiled(compiled: Callable, args: tuple, runs: int) -> dict[str, Any]:
    """Median and min wall time (ms) of ``runs`` calls of an already run (warm) compiled function."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return {"time_ms": statistics.median(times), "time_ms_min": min(times), "times_ms": times, "runs": runs}


def rel_l2(a: jax.Array, b: jax.Array) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def finite(x: Any) -> bool:
    return all(bool(jnp.isfinite(jnp.asarray(v, jnp.float32)).all()) for v in jax.tree.leaves(x))


@contextlib.contextmanager
def kernels_off():
    """Every Pallas kernel off (``JQUANT_BACKEND=xla``): jquant's XLA paths."""
    old = os.environ.get(_common.FORCE_ENV)
    os.environ[_common.FORCE_ENV] = "xla"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_common.FORCE_ENV, None)
        else:
            os.environ[_common.FORCE_ENV] = old


# --- components ------------------------------------------------------------------------------------
def encoder_row(args: argparse.Namespace) -> dict[str, Any]:
    """UMT5-XXL at int8 weight-only: resident bytes, the peak of one call, seconds per call
    (checked first against the bf16 encoder on the decoded int8 weights)."""
    cfg = TINY_UMT5 if args.tiny else UMT5_XXL
    module = t5.T5Encoder(cfg, BF16)
    shapes = jax.eval_shape(lambda k: module.init(k, **t5.dummy_inputs(cfg))["params"], jax.random.key(0))
    t0 = time.perf_counter()
    params = random_tree(shapes, args.seed + 1)
    q8 = jax.block_until_ready(quantize_params(params, [(r".*/kernel", "int8")])[0])
    build_s = time.perf_counter() - t0
    del params
    ids = jax.random.randint(jax.random.key(args.seed), (1, args.text_len), 0, cfg.vocab_size, jnp.int32)
    mask = jnp.ones_like(ids)
    float_fn = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m))
    ref = jax.block_until_ready(float_fn(dequantized({"params": q8})["params"], ids, mask))
    fn = jax.jit(lambda p, i, m: jnn.apply(module, {"params": p}, i, m))
    compiled = fn.lower(q8, ids, mask).compile()
    out = jax.block_until_ready(compiled(q8, ids, mask))
    err = rel_l2(out, ref)
    row: dict[str, Any] = {
        "component": "text_encoder",
        "model": "UMT5-XXL (Wan2.1)" + (" (tiny)" if args.tiny else ""),
        "precision": "int8 weight-only",
        "resident_bytes": tree_bytes(q8),
        "peak_bytes": compiled_peak(compiled),
        "tokens": args.text_len,
        "build_s": build_s,
        "check": {
            "rel_l2_vs_dequantized_bf16": err,
            "tol": args.weight_tol,
            "ok": err <= args.weight_tol and finite(out),
        },
    }
    if row["check"]["ok"]:
        row.update(status="PASS", **time_compiled(compiled, (q8, ids, mask), args.runs))
    else:
        row["status"] = "FAIL"
    return row


def vae_row(args: argparse.Namespace, latent: tuple[int, ...]) -> dict[str, Any]:
    """Wan2.1's VAE in bf16: the frame-chunked decode of the clip's latents (resident bytes, the
    peak of the decode call, seconds per decode; output checked finite)."""
    cfg = TINY_VAE if args.tiny else wan_vae.WanVAEConfig()
    shapes = wan_vae.param_shapes(cfg)
    vae = wan_vae.WanVAE(cfg, random_tree(shapes, args.seed + 2), BF16)
    z = _normal_flat(jax.random.key(args.seed), (1, cfg.z_dim, *latent[2:]), BF16)
    out = jax.block_until_ready(vae.decode(z))  # compiles
    mem = vae.decode_bytes(latent[2], latent[3] * cfg.spatial_ratio, latent[4] * cfg.spatial_ratio)
    row: dict[str, Any] = {
        "component": "vae",
        "model": "AutoencoderKLWan (Wan2.1)" + (" (tiny)" if args.tiny else ""),
        "precision": "bf16",
        "resident_bytes": tree_bytes(vae.params),
        "peak_bytes": sum(mem.values()),
        "video": list(out.shape),
        "check": {"finite": finite(out), "ok": finite(out)},
    }
    if not row["check"]["ok"]:
        return {**row, "status": "FAIL"}
    return {**row, "status": "PASS", **time_compiled(vae.decode, (z,), args.runs)}


GUIDANCE = 5.0  # Wan2.1's default CFG scale: the timed steps run at it


def step_fn(model: Model, module: Any, recipe: Recipe | None) -> Callable:
    """One sampler step: the transformer on the step's batch (``[uncond; cond]`` with CFG), the CFG
    combination at ``guidance`` (a traced scalar: one compile checks the branches at 0 and 1 and
    times the step at :data:`GUIDANCE`) and the flow-matching Euler update; ``recipe`` None runs
    float weights."""

    def step(variables, x, t, dt, text, extra, guidance):
        with contextlib.ExitStack() as stack:
            if recipe is not None and recipe.weights is not None:
                stack.enter_context(jnn.quantized(act=recipe.act))
            xin = jnp.concatenate([x, x]) if model.cfg else x
            tin = jnp.broadcast_to(t, (xin.shape[0],))
            v = _apply(model, module, variables, xin.astype(BF16), tin, text, extra).astype(jnp.float32)
        if model.cfg:
            u, c = jnp.split(v, 2)
            v = u + guidance * (c - u)
        return x + dt * v

    return jax.jit(step)


def check_step(
    compiled: Callable,
    variables: dict,
    inputs: tuple,
    recipe: Recipe,
    float_step: Callable | None,
    module: Any,
    model: Model,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """A timed row's check: the compiled step at guidance 0 and 1 (each branch's update alone)
    against its reference (module docstring); the worst rel. L2 of the updates (the latents they
    are added to left out) and whether it is within the recipe's tolerance."""
    gs = (0.0, 1.0)
    outs = [jax.block_until_ready(compiled(variables, *inputs, jnp.float32(g))) for g in gs]
    if recipe.weights is None:
        ok = all(finite(o) for o in outs)
        return {"finite": ok, "ok": ok}
    xla_ref = recipe.act is not None and args.act_ref == "xla"
    if xla_ref:
        what, tol = "rel_l2_vs_xla_paths", args.act_tol
        with kernels_off():
            ref_step = step_fn(model, module, recipe)
            refs = [jax.block_until_ready(ref_step(variables, *inputs, jnp.float32(g))) for g in gs]
    else:
        what, tol = "rel_l2_vs_dequantized_bf16", args.weight_tol if recipe.act is None else args.act_tol
        deq = dequantized(variables)
        refs = [jax.block_until_ready(float_step(deq, *inputs, jnp.float32(g))) for g in gs]
        # The reference's own sensitivity to rounding: the same step on weights moved by about
        # one bf16 step. A random-weight model can amplify any change of rounding order (a
        # kernel's accumulation order included) far more than a trained one.
        nudged = [jax.block_until_ready(float_step(bf16_nudged(deq, args.seed), *inputs, jnp.float32(g))) for g in gs]
        floor = max(rel_l2(n - inputs[0], r - inputs[0]) for n, r in zip(nudged, refs))
    errs = [rel_l2(o - inputs[0], r - inputs[0]) for o, r in zip(outs, refs)]
    err = max(errs)
    out = {what: err, "per_branch": errs, "tol": tol}
    if not xla_ref:
        out.update(rounding_floor=floor, tol=max(tol, FLOOR_FACTOR * floor), base_tol=tol)
    return {**out, "ok": all(finite(o) for o in outs) and err <= out["tol"]}


#: A step passes within this many times its reference's rounding floor, when that exceeds the tolerance.
FLOOR_FACTOR = 2.0


@jax.jit
def _nudge(w: jax.Array, u: jax.Array) -> jax.Array:
    """``w * (1 + u / 128)`` in ``w``'s dtype, ``u`` the first ``w.size`` numbers of ``u``."""
    u = _first(u, w.shape)
    return (w.astype(jnp.float32) * (1.0 + u / 128.0)).astype(w.dtype)


def bf16_nudged(variables: dict[str, Any], seed: int) -> dict[str, Any]:
    """``variables`` with every matrix multiplied by ``1 + u / 128``, ``u`` uniform in [-1, 1]:
    about one bf16 rounding step per weight (bf16 keeps 8 significant bits)."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed + 7), len(leaves))
    out = []
    for k, w in zip(keys, leaves):
        if jnp.ndim(w) >= 2 and jnp.issubdtype(w.dtype, jnp.floating):
            w = _nudge(w, _random_drawn(k, w.size, "uniform", jnp.float32, 1.0))
        out.append(w)
    return jax.tree.unflatten(tree, out)


def transformer_rows(
    model: Model, args: argparse.Namespace, latent: tuple[int, ...], start: float, emit: Callable[[dict], Any]
) -> None:
    """One row per recipe, handed to ``emit`` as soon as it is measured: resident bytes and the
    step's peak; timed rows for ``--time``."""
    module = models.port_for_config(model.config).module(model.config, BF16)
    if jax.default_backend() == "gpu":
        module = module.clone(attention_impl="cudnn")
    shapes = models.param_shapes(model.config)
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, BF16), shapes)
    t0 = time.perf_counter()
    params = jax.block_until_ready(random_tree(shapes, args.seed))
    print(f"{model.label}: synthetic bf16 weights in {time.perf_counter() - t0:.1f} s", flush=True)
    roles = models.layer_roles(model.config, params)
    batch = 2 if model.cfg else 1
    k1, k2 = jax.random.split(jax.random.key(args.seed + 3))
    x = _normal_flat(k1, tuple(latent), jnp.float32)
    text = _normal_flat(k2, (batch, args.text_len, _text_dim(model.config)), BF16)
    inputs = (x, jnp.float32(999.0), jnp.float32(-0.02), text, model.inputs((batch, *latent[1:]), text))
    float_step = None
    for name in args.recipes:
        row: dict[str, Any] = {"component": "transformer", "model": model.label, "recipe": name, "batch": batch}
        if time.perf_counter() - start > args.deadline_s:
            emit({**row, "status": "SKIP", "skipped": "deadline"})
            continue
        try:
            recipe = RECIPES[name]
            t0 = time.perf_counter()
            variables = jax.block_until_ready(recipe_variables(name, params, roles, args.rank, args.seed))
            row["build_s"] = time.perf_counter() - t0
            _phase(model, name, f"weights built in {row['build_s']:.1f} s")
            fn = step_fn(model, module, recipe)
            t0 = time.perf_counter()
            compiled = fn.lower(variables, *inputs, jnp.float32(GUIDANCE)).compile()
            row.update(
                resident_bytes=tree_bytes(variables),
                peak_bytes=compiled_peak(compiled),
                compile_s=time.perf_counter() - t0,
                weights=recipe.weights,
                act=recipe.act,
            )
            _phase(model, name, f"compiled in {row['compile_s']:.1f} s")
            if name not in args.time and name not in args.check:
                row["status"] = "MEMORY"
            else:
                if recipe.weights is not None and float_step is None:
                    float_step = step_fn(model, module, None)
                check = check_step(compiled, variables, inputs, recipe, float_step, module, model, args)
                row["check"] = check
                _phase(model, name, f"checked: {check}")
                if check["ok"] and name not in args.time:
                    row["status"] = "CHECKED"
                elif check["ok"]:
                    timed = (variables, *inputs, jnp.float32(GUIDANCE))
                    row.update(status="PASS", guidance=GUIDANCE, **time_compiled(compiled, timed, args.runs))
                else:
                    row["status"] = "FAIL"
            del variables, compiled
        except Exception as e:  # pylint: disable=broad-except
            row.update(timing.error_row(e))
        _print_row(row)
        emit(row)


def _phase(model: Model, recipe: str, what: str) -> None:
    """A progress line per phase of a row, so a call cut off by its time limit shows where."""
    print(f"  {model.label} {recipe}: {what}", flush=True)


def _text_dim(config: Any) -> int:
    return config.text_embed_dim if isinstance(config, hunyuan_video.HunyuanVideoConfig) else config.text_dim


def _print_row(row: dict[str, Any]) -> None:
    mib = 2.0**20
    what = row.get("recipe") or row.get("precision")
    head = f"{row['component']:12s} {row['model'][:26]:26s} {what:10s} {row['status']:6s}"
    if "resident_bytes" in row:
        head += f" weights {row['resident_bytes'] / mib:10.1f} MiB  peak {(row.get('peak_bytes') or 0) / mib:10.1f} MiB"
    if "time_ms" in row:
        head += f"  {row['time_ms']:9.1f} ms (min {row['time_ms_min']:.1f})"
    if row["status"] in ("FAIL", "ERROR"):
        head += f"  {row.get('check') or row.get('error', '')}"[:400]
    print(head, flush=True)


# --- the table -------------------------------------------------------------------------------------
def summarize(rows: list[dict], steps: int) -> list[dict[str, Any]]:
    """Per (model, recipe): the whole pipeline's resident and peak bytes (MemoryReport) and, where
    every part was timed, seconds per clip = encoder calls + steps x step + decode."""
    enc = next((r for r in rows if r["component"] == "text_encoder" and r["status"] == "PASS"), None)
    vae = next((r for r in rows if r["component"] == "vae" and r["status"] == "PASS"), None)
    out = []
    for r in rows:
        if r["component"] != "transformer" or "resident_bytes" not in r or enc is None or vae is None:
            continue
        report = MemoryReport(
            (
                ComponentMemory("text_encoder", enc["precision"], enc["resident_bytes"], enc["peak_bytes"]),
                ComponentMemory("transformer", r["recipe"], r["resident_bytes"], r["peak_bytes"]),
                ComponentMemory("vae", vae["precision"], vae["resident_bytes"], vae["peak_bytes"]),
            )
        )
        s: dict[str, Any] = {
            "model": r["model"],
            "recipe": r["recipe"],
            "resident_bytes": report.resident_bytes,
            "peak_bytes": report.peak_bytes,
        }
        if all("time_ms" in c for c in (enc, r, vae)):
            calls = r["batch"]  # one encoder call per branch
            s["seconds_per_clip"] = (calls * enc["time_ms"] + steps * r["time_ms"] + vae["time_ms"]) / 1e3
            s["steps"] = steps
        out.append(s)
    return out


def _key(row: dict[str, Any]) -> tuple:
    return (row["component"], row["model"], row.get("recipe") or row.get("precision"))


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``new`` rows replace ``old`` rows of the same key, except that a row skipped for lack of
    time never replaces a measured one (so a call cut short loses nothing), and an untimed row
    (MEMORY, CHECKED: a memory-only or diagnostic run) never replaces a timed one."""
    by_key = {_key(r): r for r in old}
    for r in new:
        prev = by_key.get(_key(r))
        if r.get("status") == "SKIP" and prev is not None and prev.get("status") != "SKIP":
            continue
        if r.get("status") in ("MEMORY", "CHECKED") and prev is not None and "time_ms" in prev:
            continue
        by_key[_key(r)] = r
    return list(by_key.values())


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    device = jax.devices()[0]
    name = f"pipeline_memory-{'tiny-' if args.tiny else ''}{device.device_kind.lower().replace(' ', '-')}.json"
    path = args.out_dir / name
    old = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    meta = timing.run_metadata("scripts/pipeline_memory_table.py", args.argv)
    result: dict[str, Any] = {
        "benchmark": "pipeline_memory",
        **meta,
        "video": {"frames": args.frames, "height": args.height, "width": args.width, "text_len": args.text_len},
        "steps": args.steps,
        "timing": "time_ms: median, time_ms_min: minimum wall time over >= 10 runs; output checked first",
        "rows": [],
    }
    vae_cfg = TINY_VAE if args.tiny else wan_vae.WanVAEConfig()
    t = (args.frames - 1) // vae_cfg.temporal_ratio + 1
    latent = (1, vae_cfg.z_dim, t, args.height // vae_cfg.spatial_ratio, args.width // vae_cfg.spatial_ratio)
    new: list[dict] = []
    # Rows of several runs share the file: each row says which run measured it, and the runs list
    # keeps every run's command (the top-level commit, date and command are the latest run's).
    stamp = {"commit": meta["commit"], "date": meta["date"]}
    result["runs"] = [*old.get("runs", []), {**stamp, "command": meta["command"]}]
    if "commit_note" in old:
        result["commit_note"] = old["commit_note"]

    def add(row: dict[str, Any]) -> None:
        new.append({**row, **stamp})
        save()

    def save() -> None:
        result["rows"] = merge_rows(old["rows"], new)
        result["pipelines"] = summarize(result["rows"], args.steps)
        result["failures"] = sum(r.get("status") in ("FAIL", "ERROR") for r in new)
        timing.write_json(name, result, folder=str(args.out_dir))

    makers = {"encoder": lambda: encoder_row(args), "vae": lambda: vae_row(args, latent)}
    for comp in args.components:
        try:
            row = makers[comp]()
        except Exception as e:  # pylint: disable=broad-except
            row = {"component": comp, "model": "?", "precision": "?", **timing.error_row(e)}
        _print_row(row)
        add(row)
    models_ = tiny_models() if args.tiny else MODELS
    for m in args.models:
        model = models_[m]
        transformer_rows(model, args, latent, start, add)
    save()
    _print_table(result["pipelines"])
    return result


def _print_table(rows: list[dict[str, Any]]) -> None:
    gib = 2.0**30
    print(f"\n{'model':28s} {'recipe':8s} {'resident GiB':>12s} {'peak GiB':>9s} {'s / clip':>9s}")
    for r in rows:
        clip = f"{r['seconds_per_clip']:9.1f}" if "seconds_per_clip" in r else f"{'-':>9s}"
        print(
            f"{r['model'][:28]:28s} {r['recipe']:8s} {r['resident_bytes'] / gib:12.2f} {r['peak_bytes'] / gib:9.2f} {clip}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the table; the result (``result["failures"]``: rows that FAILed or ERRORed)."""
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
