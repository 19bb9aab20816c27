#!/usr/bin/env python3
"""One denoising step of a Wan2.1-1.3B-sized model: bf16 + cuDNN attention against W8A8 + quantized attention.

The published Wan2.1-T2V-1.3B config with synthetic weights (``scripts/bench_wan_forward.py``'s
generator), one jitted forward (= one flow-matching step without CFG) at 480x832, 81 frames
(32,760 tokens, 512 text tokens, batch 1). Variants:

* ``bf16``: bf16 weights and activations, attention ``cudnn`` (``xla`` off GPU);
* ``w8a8``: int8 weights (per output channel; embedders, modulation and the output head stay
  bf16, as in ``jquant demo``) and dynamic int8 per-token activations through
  ``jquant.nn.quantized(act="int8/token")``, attention as ``bf16``;
* ``w8a8-qattn-bf16`` / ``w8a8-qattn-fp8``: W8A8 plus quantized attention on every layer
  (``jquant.attention.quantized_attention``: int8 Q K^T with smoothed, Hadamard-rotated K and
  per-token K scales; P V in bf16 or fp8); ``w8a8-qattn-default``: the policy's defaults (one K
  scale per 128-key tile, bf16 P V);
* ``bf16-qattn-fp8``: quantized attention alone.
* ``fp8-block-unfused`` / ``fp8-block-fused``: fp8 weights in 128 x 128 blocks and fp8 activations
  with one scale per token per 128 channels (the block-scaled fp8 GEMM, DeepGEMM's layout);
  ``fused`` lets each block's adaLN inputs reach Q/K/V and FFN-up as the codes of one fused norm +
  modulation + quantization kernel (``jquant.producers``, issue 19), ``unfused`` quantizes each
  linear's bf16 input separately; ``fp8-block-fused-qattn-bf16`` adds quantized attention.
* ``w8a8-token-fused``: ``w8a8`` with the adaLN inputs quantized per token by the norm producer
  (``jquant.nn.quantized(token_producers=True)``), the per-token GEMM taking its codes.
* ``bf16-cudnn-fp8`` / ``w8a8-token-fused-cudnn-fp8``: every unmasked attention call through
  cuDNN's FP8 forward with per-tensor amax scales (``pallas_kernels.cudnn_fp8``, the fastest
  public FP8 attention; ``rel_l2_vs_bf16`` says what its numerics cost). Such a row passes when
  its step is no further from the exact-attention step than the step with those numerics
  emulated in plain JAX is, within :data:`LOSSY_MARGIN` (:func:`check_lossy_step`). On an H200
  (cuDNN 9.19) cuDNN's step fails it: its fp8 P V accumulator loses 0.14-0.43 per
  self-attention call (``scripts/attention_call_errors.py``, docs/kernels.md).

Before a variant is timed its output is checked against the same variant traced with every
Pallas kernel off (``JQUANT_BACKEND=xla``: XLA's integer / dequantize paths, the quantizer's
and quantized attention's plain-JAX references) and, where it would run cuDNN or XLA attention,
exact attention in float32 over query chunks: the relative L2 error of the step's output must
stay under ``--rel-tol`` (default 5e-2; measured W8A8 vs bf16 is 2.2e-2, so a kernel that
computes something else fails) and every value must be finite. A variant that fails is a FAIL
row (not timed), one that raises an ERROR row with the exception; the script then exits 1.

For each: median and minimum wall time of the compiled step over ``--runs`` (>= 10) runs after
``--warmup``, compile time, weight bytes (QArrays counted packed) and XLA's memory analysis of
the compiled step (argument, output and temporary bytes). Writes ``benchmarks/e2e-<device>.json``
(device, date, commit, JAX version, command) after every variant (and a copy under ``$OUT``
when set).

    PYTHONPATH=. python3 scripts/bench_e2e.py                # GPU
    PYTHONPATH=. python3 scripts/bench_e2e.py --tiny         # CPU dry run (toy config)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import flax
import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jquant.nn  # noqa: E402
from jquant import models  # noqa: E402
from jquant import policy as pol  # noqa: E402
from jquant.algorithms import kquants, quarot  # noqa: E402
from jquant.attention import quantized_attention  # noqa: E402
from jquant.formats import parse_spec  # noqa: E402
from jquant.models import wan  # noqa: E402
from jquant.models.attention import attention_hook  # noqa: E402
from jquant.pipeline.runtime import tree_bytes as weight_bytes  # noqa: E402
from jquant.qarray import QArray  # noqa: E402
from pallas_kernels import _common, cudnn_fp8, kquant_triton, timing, trace_table  # noqa: E402
from pallas_kernels.attention_ref import relative_l2  # noqa: E402

_WAN_FORWARD = Path(__file__).resolve().parent / "bench_wan_forward.py"
_spec = importlib.util.spec_from_file_location("bench_wan_forward", _WAN_FORWARD)
wan_forward = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wan_forward)

# Widths of whole 128-channel blocks (inner 128, FFN 256), so the block-scaled variants run too.
TINY_CONFIG = dataclasses.replace(wan_forward.TINY_CONFIG, attention_head_dim=64, ffn_dim=256)
#: issue 26's candidate: block-128 online rotations, the O projection's rotation offline only
QUAROT_B128 = dict(online_block=128, skip_roles=("attn.out",))
#: int8 per output channel, the FFN in 128 x 128 blocks (the block GEMM and its FFN-up producer)
FFN_BLOCK_INT8 = pol.Policy(
    "int8-ffn-b128x128",
    ((pol.KEEP_ROLES, None), (("ffn.up", "ffn.down"), "int8/b128x128")),
    "int8",
    "int8; FFN in blocks",
)
VARIANTS: dict[str, dict[str, Any]] = {
    "bf16": dict(weights=None, act=None, attention=None),
    "w8a8": dict(weights="int8", act="int8/token", attention=None),
    "w8a8-qattn-bf16": dict(weights="int8", act="int8/token", attention=dict(pv_format="bf16", k_scales="token")),
    # the policy's default since 2026-12-03: K per tile, with the Hadamard rotation
    "w8a8-qattn-default": dict(weights="int8", act="int8/token", attention=dict()),
    "w8a8-qattn-fp8": dict(weights="int8", act="int8/token", attention=dict(pv_format="fp8_e4m3", k_scales="token")),
    "bf16-qattn-fp8": dict(weights=None, act=None, attention=dict(pv_format="fp8_e4m3", k_scales="token")),
    "w8a8-qattn-bf16-kblock": dict(
        weights="int8", act="int8/token", attention=dict(pv_format="bf16", k_scales="block", hadamard=False)
    ),
    "w8a8-qattn-fp8-kblock": dict(
        weights="int8", act="int8/token", attention=dict(pv_format="fp8_e4m3", k_scales="block", hadamard=False)
    ),
    "bf16-qattn-fp8-kblock": dict(
        weights=None, act=None, attention=dict(pv_format="fp8_e4m3", k_scales="block", hadamard=False)
    ),
    "bf16-qattn-fp8-nohad": dict(
        weights=None, act=None, attention=dict(pv_format="fp8_e4m3", k_scales="token", hadamard=False)
    ),
    # issue 19: block-scaled fp8 GEMMs, with and without the fused norm + modulation + quantization producer
    "fp8-block-unfused": dict(weights="fp8_e4m3/b128x128", act="fp8_e4m3/token128", attention=None, producers=False),
    "fp8-block-fused": dict(weights="fp8_e4m3/b128x128", act="fp8_e4m3/token128", attention=None),
    "fp8-block-fused-qattn-bf16": dict(
        weights="fp8_e4m3/b128x128", act="fp8_e4m3/token128", attention=dict(pv_format="bf16", k_scales="token")
    ),
    # the int8 block-scaled kernel (w8a8.int8_block_matmul, GPU-checked at 31c4fea)
    "int8-block-unfused": dict(weights="int8/b128x128", act="int8/token128", attention=None, producers=False),
    "int8-block-fused": dict(weights="int8/b128x128", act="int8/token128", attention=None),
    # Per-token W8A8 with the QKV / FFN-up inputs quantized by the norm producer (one scale per
    # token: the norm sees whole rows), so those linears run the per-token GEMM on its codes.
    "w8a8-token-fused": dict(weights="int8", act="int8/token", attention=None, producers="token"),
    "w8a8-token-fused-qattn-default": dict(weights="int8", act="int8/token", attention=dict(), producers="token"),
    "w8a8-token-fused-qattn-fp8-kblock": dict(
        weights="int8", act="int8/token", attention=dict(pv_format="fp8_e4m3", k_scales="block"), producers="token"
    ),
    # The FFN in 128 x 128 int8 weight blocks: FFN-down takes the FFN-up GEMM's epilogue codes (GELU
    # and per-(token, 128) quantization in its epilogue), so no activation pass is left there.
    "w8a8-ffnblock": dict(
        weights=FFN_BLOCK_INT8,
        act="int8/token",
        act_rules=(("/ffn/", "int8/token128"),),
        attention=None,
        producers="token",
    ),
    "w8a8-ffnblock-qattn-default": dict(
        weights=FFN_BLOCK_INT8,
        act="int8/token",
        act_rules=(("/ffn/", "int8/token128"),),
        attention=dict(),
        producers="token",
    ),
    # W4A8: int4 weights per output channel, int8 per-token activations (the W4A8 GEMM), fused as above
    "w4a8-token-fused-qattn-default": dict(weights="int4", act="int8/token", attention=dict(), producers="token"),
    # Issue 26: QuaRot W8A8 as the recipe runs it (full-width online Hadamards) against block-128
    # rotations with the O projection's rotation offline only (the quality-checked candidate):
    # Q/K/V and FFN-up take the norm producer's rotated per-token codes, FFN-down a rotated
    # quantizer pass (``-b128``) or, with the FFN in 128 x 128 weight blocks and per-(token, 128)
    # activations, the FFN-up GEMM's epilogue codes (``-b128-ffnblock``).
    "w8a8-quarot-full": dict(weights="int8", act="int8/token", attention=None, producers="token", quarot={}),
    "w8a8-quarot-b128": dict(weights="int8", act="int8/token", attention=None, producers="token", quarot=QUAROT_B128),
    "w8a8-quarot-b128-ffnblock": dict(
        weights=FFN_BLOCK_INT8,
        act="int8/token",
        act_rules=(("/ffn/", "int8/token128"),),
        attention=None,
        producers="token",
        quarot=QUAROT_B128,
    ),
    "w8a8-quarot-b128-ffnblock-qattn-default": dict(
        weights=FFN_BLOCK_INT8,
        act="int8/token",
        act_rules=(("/ffn/", "int8/token128"),),
        attention=dict(),
        producers="token",
        quarot=QUAROT_B128,
    ),
    # cuDNN's FP8 attention (per-tensor scales) in the step: the peer baseline for the attention kernel
    "bf16-cudnn-fp8": dict(weights=None, act=None, attention=None, float_attention="cudnn-fp8"),
    "w8a8-token-fused-cudnn-fp8": dict(
        weights="int8", act="int8/token", attention=None, producers="token", float_attention="cudnn-fp8"
    ),
    # GGUF k-quant mixes (synthetic ggml blocks, jquant.algorithms.kquants' per-tensor types), weight-only
    "q4_k_m": dict(weights="Q4_K_M", act=None, attention=None),
    "q8_0": dict(weights="Q8_0", act=None, attention=None),
}
MODELS = {"1.3b": ("Wan2.1-T2V-1.3B", wan.WAN21_T2V_1_3B), "14b": ("Wan2.1-T2V-14B", wan.WAN21_T2V_14B)}
DEFAULT_VARIANTS = ("bf16", "w8a8", "w8a8-qattn-bf16", "w8a8-qattn-fp8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="2-layer toy config and a small video (CPU smoke test)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument(
        "--model", choices=sorted(MODELS), default="1.3b", help="published Wan2.1 config (synthetic weights)"
    )
    p.add_argument("--frames", type=int, default=None, help="video frames (default 81; tiny: 5)")
    p.add_argument("--height", type=int, default=None, help="pixels (default 480; tiny: 32)")
    p.add_argument("--width", type=int, default=None, help="pixels (default 832; tiny: 48)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=timing.MIN_RUNS, help="timed runs (at least 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rel-tol", type=float, default=5e-2, help="relative L2 error allowed against the reference step")
    p.add_argument("--deadline-s", type=float, default=150.0, help="skip variants started after this")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks")
    p.add_argument(
        "--profile",
        action="store_true",
        help="after timing, trace 2 steps and record the device time per kernel and phase (pallas_kernels.trace_table)",
    )
    args = p.parse_args(argv)
    args.runs = max(args.runs, timing.MIN_RUNS)
    frames, height, width = (5, 32, 48) if args.tiny else (81, 480, 832)
    args.frames = args.frames or frames
    args.height = args.height or height
    args.width = args.width or width
    args.variants = args.variants.split(",")
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r}; choose from {list(VARIANTS)}")
    return args


def step_fn(
    model: Any,
    act: str | None,
    attention: dict | None,
    weight_only: bool = False,
    producers: bool | str = True,
    act_rules: tuple = (),
    float_attention: str | None = None,
):
    """The jitted step ``step(variables, x, t, text)``: model.apply under the variant's linear
    and attention contexts (``weight_only``: QArray weights, float activations; ``producers``:
    fused producers, and ``"token"``: per-token consumers take the norm producer's codes too;
    ``act_rules``: other activation specs for some layers, ``jquant.nn.quantized``'s;
    ``float_attention="cudnn-fp8"``: :func:`cudnn_fp8_hook` on every attention call)."""
    if float_attention not in (None, "cudnn-fp8"):
        raise ValueError(f"step_fn: float_attention={float_attention!r}, expected None or 'cudnn-fp8'")

    def step(variables, x, t, text):
        with contextlib.ExitStack() as stack:
            if float_attention == "cudnn-fp8":
                stack.enter_context(attention_hook(cudnn_fp8_hook))
            if attention is not None:
                stack.enter_context(quantized_attention(**attention))
            if act is not None or weight_only:
                stack.enter_context(
                    jquant.nn.quantized(
                        act=act, producers=bool(producers), token_producers=producers == "token", act_rules=act_rules
                    )
                )
            return model.apply(variables, x, t, text)

    return jax.jit(step)


def cudnn_fp8_hook(q, k, v, mask, implementation):
    """An attention hook sending unmasked calls to cuDNN's FP8 forward (None, the float path, for
    masked ones). While the kernels are forced off (the reference step) it computes cuDNN's
    numerics emulated in plain JAX instead (:func:`per_tensor_fp8_reference`), so the check asks
    whether cuDNN computed what per-tensor FP8 attention computes; what that costs against exact
    attention is the row's ``rel_l2_vs_bf16``."""
    del implementation
    if mask is not None:
        return None
    if os.environ.get(_common.FORCE_ENV) == "xla":
        return per_tensor_fp8_reference(q, k, v)
    return cudnn_fp8.attention(q, k, v)


def per_tensor_fp8_reference(q, k, v, *, chunk: int = 1024) -> jax.Array:
    """``attention_ref.per_tensor_fp8_attention`` (cuDNN's FP8 numerics) over query chunks, with
    the scales of the whole tensors (the scores of a 32,760-token call at once would take tens of GB)."""
    from pallas_kernels import attention_ref  # pylint: disable=import-outside-toplevel

    scales = attention_ref.per_tensor_fp8_scales(q, k, v)
    b, tq, h, d = q.shape
    n = -(-tq // chunk)
    qp = jnp.pad(q, ((0, 0), (0, n * chunk - tq), (0, 0), (0, 0))).reshape(b, n, chunk, h, d).swapaxes(0, 1)
    out = jax.lax.map(lambda qc: attention_ref.per_tensor_fp8_attention(qc, k, v, scales=scales), qp)
    return out.swapaxes(0, 1).reshape(b, n * chunk, h, d)[:, :tq].astype(q.dtype)


def rotated(params: Any, roles: dict, head_dim: int, plan: dict) -> dict[str, Any]:
    """The float model rewritten by QuaRot (``quarot.dit_plan(**plan)``: head-wise V/O offline,
    online Hadamards as aux entries), rotated in float32 and cast back: ``{"params", "jquant"}``."""
    dtypes = jax.tree_util.tree_map(lambda a: a.dtype, params)
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    out = quarot.quarot({"params": p32}, None, quarot.dit_plan(p32, roles, head_dim, **plan))
    out["params"] = jax.tree_util.tree_map(lambda a, d: a.astype(d), out["params"], dtypes)
    return out


def _memory(compiled: Any) -> dict[str, int | None]:
    try:
        m = compiled.memory_analysis()
    except Exception:  # pylint: disable=broad-except  (not every backend reports it)
        return {}
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {k: int(getattr(m, k)) for k in keys if getattr(m, k, None) is not None}


def chunked_attention(q, k, v, mask=None, *, implementation=None, chunk: int = 1024, **_):
    """Exact softmax attention in float32 over query chunks (the reference step's float attention:
    the scores of a 32,760-token call at once would take tens of GB); bf16 out like cuDNN's."""
    del implementation
    b, tq, h, d = q.shape
    n = -(-tq // chunk)
    qp = jnp.pad(q, ((0, 0), (0, n * chunk - tq), (0, 0), (0, 0))).reshape(b, n, chunk, h, d).swapaxes(0, 1)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, h, tq, k.shape[1]))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, n * chunk - tq), (0, 0)), constant_values=True)
        mask = mask.reshape(b, h, n, chunk, k.shape[1]).transpose(2, 0, 1, 3, 4)

    def one(args):
        qc, mc = args
        s = jnp.einsum("bqhd,bkhd->bhqk", qc.astype(jnp.float32), kf, precision=jax.lax.Precision.HIGHEST) / math.sqrt(
            d
        )
        if mc is not None:
            s = jnp.where(mc, s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", p, vf, precision=jax.lax.Precision.HIGHEST)

    out = jax.lax.map(one, (qp, mask))
    return out.swapaxes(0, 1).reshape(b, n * chunk, h, d)[:, :tq].astype(q.dtype)


@contextlib.contextmanager
def reference_mode():
    """Traces with every Pallas kernel off (``JQUANT_BACKEND=xla``: jquant's XLA paths, the kernels'
    plain-JAX references) and float attention exact (chunked_attention)."""
    old = os.environ.get(_common.FORCE_ENV)
    os.environ[_common.FORCE_ENV] = "xla"
    try:
        with mock.patch.object(jax.nn, "dot_product_attention", chunked_attention):
            yield
    finally:
        if old is None:
            os.environ.pop(_common.FORCE_ENV, None)
        else:
            os.environ[_common.FORCE_ENV] = old


#: A lossy-attention baseline's step may be this much further (relative) from the exact step than
#: its emulation is, plus LOSSY_SLACK: the same numerics rounded in another order land about as far
#: from exact; a wrong attention (another scale, a dropped term) lands much further.
LOSSY_MARGIN = 1.25
LOSSY_SLACK = 0.01


def check_lossy_step(out: jax.Array, emulated: jax.Array, exact: jax.Array) -> dict:
    """The check of a step whose attention is a lossy baseline (cuDNN's per-tensor FP8): finite,
    and ``rel(out, exact) <= LOSSY_MARGIN * rel(emulated, exact) + LOSSY_SLACK``, where
    ``emulated`` is the step with those numerics in plain JAX and ``exact`` the step with exact
    float attention (both with the kernels off)."""
    finite = bool(jnp.isfinite(out.astype(jnp.float32)).all())
    rel, emu, apart = relative_l2(out, exact), relative_l2(emulated, exact), relative_l2(out, emulated)
    bound = LOSSY_MARGIN * emu + LOSSY_SLACK
    return {
        "ok": finite and rel <= bound,
        "rel": rel,
        "rel_emulated": emu,
        "rel_vs_emulated": apart,
        "detail": f"rel_l2 vs exact-attention step {rel:.2e} (<= {LOSSY_MARGIN:g} x emulation's {emu:.2e} + "
        f"{LOSSY_SLACK:g}); vs emulated step {apart:.2e}" + ("" if finite else " NON-FINITE"),
    }


def check_step(out: jax.Array, ref: jax.Array, rel_tol: float) -> dict:
    """Finite, and within ``rel_tol`` of the kernels-off step in relative L2."""
    finite = bool(jnp.isfinite(out.astype(jnp.float32)).all())
    rel = relative_l2(out, ref)
    ok = finite and rel <= rel_tol
    return {
        "ok": ok,
        "rel": rel,
        "detail": f"rel_l2 vs reference step {rel:.2e} (<= {rel_tol:g})" + ("" if finite else " NON-FINITE"),
    }


def synthetic_kquant(params: Any, roles: dict, mix: str, seed: int) -> Any:
    """``params`` with every tensor the GGUF ``mix`` quantizes replaced by a codec QArray of random
    ggml blocks (weights within about 0.05, like the synthetic float weights); the rest as they are."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    plan = kquants.plan_kquant_mix(mix, {p: v.shape for p, v in flat.items()}, roles, axis=0)
    out = {}
    for i, (path, value) in enumerate(flat.items()):
        fmt = plan.get(path)
        if fmt is None or value.ndim != 2:
            out[path] = value
            continue
        k, n = value.shape
        blocks = jnp.asarray(kquant_triton.random_blocks(fmt, n, k, seed + i))
        out[path] = QArray(blocks, None, spec=parse_spec(fmt), dtype=value.dtype, axis=-2)
    return flax.traverse_util.unflatten_dict(out, sep="/")


def time_variant(name: str, model: Any, params_bf16: Any, roles: dict, inputs: tuple, args) -> dict[str, Any]:
    spec = VARIANTS[name]
    phases: dict[str, float] = {}
    t_phase = time.perf_counter()

    def phase(label: str) -> None:
        """Records and prints how long the phase that ends now took (a variant killed by a time
        limit shows where it was)."""
        nonlocal t_phase
        now = time.perf_counter()
        phases[label] = now - t_phase
        t_phase = now
        print(f"  {name}: {label} {phases[label]:.1f} s", flush=True)

    variables: dict[str, Any] = {}
    if "quarot" in spec:
        variables = rotated(params_bf16, roles, model.config.attention_head_dim, spec["quarot"])
        params_bf16 = variables["params"]
    weights = spec["weights"]
    if weights is None:
        params = params_bf16
    elif isinstance(weights, pol.Policy):
        params = weights.quantize(params_bf16, roles)
    elif weights in kquants.MIX_BASE:
        params = synthetic_kquant(params_bf16, roles, weights, args.seed)
    else:
        params = pol.uniform(weights).quantize(params_bf16, roles)
    variables["params"] = params
    row: dict[str, Any] = {
        "variant": name,
        "weights": weights.name if isinstance(weights, pol.Policy) else weights,
        "act": spec["act"],
        "act_rules": [list(r) for r in spec.get("act_rules", ())],
        "quarot": spec.get("quarot"),
        "attention": spec["attention"],
        "weight_bytes": weight_bytes(variables),
        "phases_s": phases,
    }
    phase("quantized weights")
    weight_only = weights is not None and spec["act"] is None
    producers = spec.get("producers", True)
    act_rules = spec.get("act_rules", ())
    float_attention = spec.get("float_attention")
    if float_attention == "cudnn-fp8" and cudnn_fp8.unavailable_reason() is not None:
        raise RuntimeError(f"{name}: cuDNN FP8 attention unavailable: {cudnn_fp8.unavailable_reason()}")
    row["float_attention"] = float_attention
    fn = step_fn(model, spec["act"], spec["attention"], weight_only, producers, act_rules, float_attention)
    params = variables  # the step's first argument from here on
    t0 = time.perf_counter()
    compiled = fn.lower(params, *inputs).compile()
    row["compile_s"] = time.perf_counter() - t0
    row["memory"] = _memory(compiled)
    phase("compiled")
    out = jax.block_until_ready(compiled(params, *inputs))
    phase("first run")
    # Check before timing: the same variant with the kernels off (and exact float attention).
    with reference_mode():
        reference = (
            step_fn(model, spec["act"], spec["attention"], weight_only, producers, act_rules, float_attention)
            .lower(params, *inputs)
            .compile()
        )
    phase("kernels-off reference compiled")
    ref = jax.block_until_ready(reference(params, *inputs))
    del reference
    phase("kernels-off reference ran")
    if float_attention is None:
        row["check"] = check_step(out, ref, args.rel_tol)
    else:  # a lossy baseline: also the step with exact attention
        with reference_mode():
            exact = step_fn(model, spec["act"], spec["attention"], weight_only, producers, act_rules)(params, *inputs)
        row["check"] = check_lossy_step(out, ref, jax.block_until_ready(exact))
        phase("exact-attention reference ran")
    row["output"] = out
    if not row["check"]["ok"]:
        row["status"] = "FAIL"
        return row
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(params, *inputs))
    times_ms = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, *inputs))
        times_ms.append((time.perf_counter() - t0) * 1e3)
    row.update(status="PASS", time_ms=statistics.median(times_ms), time_ms_min=min(times_ms), times_ms=times_ms)
    phase("timed")
    if args.profile:
        row["profile"] = trace_table.profile(compiled, params, *inputs, steps=2)
        print(trace_table.format_table(row["profile"]), flush=True)
        phase("profiled")
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    model_name, config = ("tiny", TINY_CONFIG) if args.tiny else MODELS[args.model]
    device = jax.devices()[0]
    attn_impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    start = time.perf_counter()
    model = wan.PORT.module(config, dtype=jnp.bfloat16).clone(attention_impl=attn_impl)
    params = jax.tree_util.tree_map(jnp.asarray, wan_forward.synthetic_params(config, args.seed))
    roles = models.layer_roles(config, params)
    shape = wan_forward.latent_shape(config, args.frames, args.height, args.width)
    pt, ph, pw = config.patch_size
    tokens = (shape[2] // pt) * (shape[3] // ph) * (shape[4] // pw)
    k1, k2 = jax.random.split(jax.random.key(args.seed))
    inputs = (
        jax.random.normal(k1, shape, jnp.bfloat16),
        jnp.array([999.0], jnp.float32),
        jax.random.normal(k2, (1, args.text_len, config.text_dim), jnp.bfloat16),
    )
    result = {
        "benchmark": "e2e_step",
        **timing.run_metadata("scripts/bench_e2e.py", args.argv),
        "jax_version": jax.__version__,
        "timing": "time_ms: median, time_ms_min: minimum wall time over >= 10 runs; output checked first",
        "rel_tol": args.rel_tol,
        "model": model_name if args.tiny else f"{model_name} (synthetic weights)",
        "param_count": models.param_count(params),
        "float_attention": attn_impl,
        "video": {"frames": args.frames, "height": args.height, "width": args.width},
        "latent_shape": list(shape),
        "tokens": tokens,
        "text_len": args.text_len,
        "rows": [],
    }
    size = "tiny-" if args.tiny else ("" if args.model == "1.3b" else f"{args.model}-")
    name = f"e2e-{size}{wan_forward.device_slug(device)}.json"

    def save() -> None:
        timing.write_json(name, result, folder=str(args.out_dir))

    baseline, baseline_out = None, None
    for variant in args.variants:
        row: dict[str, Any] = {"variant": variant}
        if time.perf_counter() - start > args.deadline_s:
            row.update(status="SKIP", skipped="deadline")
        else:
            try:
                row = time_variant(variant, model, params, roles, inputs, args)
                out = row.pop("output").astype(jnp.float32)
                if baseline_out is None and variant == "bf16" and row["status"] == "PASS":
                    baseline, baseline_out = row, out
                if baseline_out is not None:
                    row["rel_l2_vs_bf16"] = relative_l2(out, baseline_out)
                if baseline is not None and "time_ms" in row:
                    row.update(
                        bf16_time_ms=baseline["time_ms"],
                        bf16_time_ms_min=baseline["time_ms_min"],
                        speedup_vs_bf16=baseline["time_ms"] / row["time_ms"],
                    )
            except Exception as e:  # pylint: disable=broad-except
                row.update(timing.error_row(e))
        result["rows"].append(row)
        save()
        if "time_ms" in row:
            extra = f"  x{row['speedup_vs_bf16']:.2f} vs bf16" if "speedup_vs_bf16" in row else ""
            temp = row["memory"].get("temp_size_in_bytes")
            print(
                f"{variant:24s} PASS {row['time_ms']:9.1f} ms (min {row['time_ms_min']:9.1f})  weights "
                f"{row['weight_bytes'] / 2**20:8.1f} MiB  temp {'n/a' if temp is None else f'{temp / 2**20:.1f} MiB'}"
                f"  compile {row['compile_s']:.0f} s  {row['check']['detail']}{extra}",
                flush=True,
            )
        else:
            why = row.get("skipped") or (row.get("check") or {}).get("detail") or row.get("error", "")
            print(f"{variant:24s} {row['status']:5s} {why[:300]}", flush=True)
    result["failures"] = sum(r.get("status") in ("FAIL", "ERROR") for r in result["rows"])
    save()
    profiled = [(r["variant"], r["profile"]) for r in result["rows"] if "profile" in r]
    if profiled:
        print("device ms per step by phase (profiler trace):\n" + trace_table.compare(profiled), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; the result (``result["failures"]``: rows that FAILed or ERRORed)."""
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
