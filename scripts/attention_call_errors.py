#!/usr/bin/env python3
"""How far each attention call of one Wan step lands from exact attention, per implementation.

Runs the bf16 Wan2.1 step of ``bench_e2e.py`` (synthetic weights, same inputs) once, eagerly, with
an attention hook that sees every call's real Q, K and V. For each call it computes exact fp32
attention (``bench_e2e.chunked_attention``) and the relative L2 error against it of: the float
path (cuDNN bf16 on a GPU, XLA elsewhere), cuDNN's per-tensor FP8 forward (GPU only), that FP8
recipe emulated in plain JAX (``attention_ref.per_tensor_fp8_attention``) and jquant's quantized
attention with the default policy (the kernel on Hopper, its reference elsewhere); plus cuDNN FP8
against its emulation, and the amax of Q, K and V. The hook returns nothing, so the step itself
runs on the float path and every call sees the activations of the unquantized model.

Why: a step with cuDNN's FP8 attention lands 0.172 from the exact-attention step where the
emulation of the same recipe lands 0.014 (``benchmarks/e2e-session20-nvidia-h200.json``); the
per-call rows say which calls (self- or cross-attention, which layers) carry the difference.

    python scripts/attention_call_errors.py            # GPU, Wan2.1-1.3B at 480p x 81 frames
    python scripts/attention_call_errors.py --tiny     # CPU smoke test (no cuDNN columns)
    python scripts/attention_call_errors.py --coherence 0,0.3,1,3   # synthetic V = a c + noise

``--coherence``: instead of the model, random Q and K and values sharing a direction ``c`` with
weight ``a`` (deep layers' tokens share one); besides the implementations above it runs jquant's
kernel with e4m3 P V and :func:`attention_ref.truncating_accumulation`'s model of an fp8 MMA that
accumulates the whole key axis in its own truncating accumulator (on the first 64 queries of one
head), to see which of them lose accuracy as ``a`` grows.

Writes ``benchmarks/attention_call_errors-<device>.json`` (``--out-dir``); prints one line per call.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jquant.attention import AttentionPolicy, current_module_path  # noqa: E402
from jquant.attention import _quantized as quantized_call  # noqa: E402
from jquant.models.attention import attention_hook  # noqa: E402
from pallas_kernels import attention_ref, cudnn_fp8, timing  # noqa: E402
from pallas_kernels.attention_ref import relative_l2  # noqa: E402

_E2E = Path(__file__).resolve().parent / "bench_e2e.py"
_spec = importlib.util.spec_from_file_location("bench_e2e", _E2E)
bench_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_e2e)

#: jquant's quantized attention as ``quantized_attention()`` runs it by default.
DEFAULT_POLICY = AttentionPolicy()


def implementations(on_gpu: bool) -> dict[str, Any]:
    """The implementations compared with exact attention: name -> jitted ``(q, k, v) -> [B, Tq,
    H, D]``; cuDNN FP8 only where it can run."""
    impls: dict[str, Any] = {
        "float": jax.jit(
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn" if on_gpu else "xla")
        ),
        "fp8_emulated": jax.jit(bench_e2e.per_tensor_fp8_reference),
        "jquant_default": jax.jit(lambda q, k, v: quantized_call(DEFAULT_POLICY, q, k, v)),
    }
    if on_gpu and cudnn_fp8.unavailable_reason() is None:
        impls["cudnn_fp8"] = jax.jit(cudnn_fp8.attention)
    return impls


def call_row(index: int, q, k, v, mask, impls: dict[str, Any], exact: jax.Array | None = None) -> dict[str, Any]:
    """One call's shapes, amaxes and every implementation's relative L2 error against exact
    attention (``exact``, or computed here)."""
    b, tq, h, d = q.shape
    row: dict[str, Any] = {
        "call": index,
        "module": current_module_path(),
        "tq": tq,
        "tk": k.shape[1],
        "heads": h,
        "head_dim": d,
        "masked": mask is not None,
        "amax": {n: float(jnp.max(jnp.abs(x.astype(jnp.float32)))) for n, x in zip("qkv", (q, k, v))},
    }
    if mask is not None:  # every implementation here is unmasked; the step's masked calls stay float
        return row
    if exact is None:
        exact = exact_attention(q, k, v)
    outs = {name: fn(q, k, v) for name, fn in impls.items()}
    row["rel_vs_exact"] = {name: relative_l2(out, exact) for name, out in outs.items()}
    if "cudnn_fp8" in outs:
        row["cudnn_fp8_vs_emulated"] = relative_l2(outs["cudnn_fp8"], outs["fp8_emulated"])
    return row


@jax.jit
def exact_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Exact float32 attention over query chunks (``bench_e2e.chunked_attention``), float32 out."""
    return bench_e2e.chunked_attention(q.astype(jnp.float32), k, v)


MODEL_ROWS = 64  # query rows the truncating-accumulator model runs on (one head)


def truncating_model_error(q: jax.Array, k: jax.Array, v: jax.Array, exact: jax.Array) -> float:
    """Relative L2 error against ``exact`` of per-tensor FP8 attention whose P V sum runs in
    :func:`attention_ref.truncating_accumulation` (P against the row's final max, times 448, e4m3;
    V e4m3 with one scale), on the first :data:`MODEL_ROWS` queries of head 0."""
    sc = attention_ref.per_tensor_fp8_scales(q, k, v)
    qf, kf, vf = (x[0, :, 0].astype(jnp.float32) for x in (q, k, v))
    qf = attention_ref.encode(qf[:MODEL_ROWS], sc["descale_q"], "fp8_e4m3").astype(jnp.float32) * sc["descale_q"]
    kf = attention_ref.encode(kf, sc["descale_k"], "fp8_e4m3").astype(jnp.float32) * sc["descale_k"]
    s = (qf @ kf.T) / jnp.sqrt(jnp.float32(q.shape[-1]))
    p = jnp.exp(s - s.max(-1, keepdims=True))
    pad = -p.shape[-1] % attention_ref.MMA_KEYS
    p_codes = attention_ref.encode(jnp.pad(p, ((0, 0), (0, pad))), jnp.float32(1 / attention_ref.P_SCALE), "fp8_e4m3")
    v_codes = attention_ref.encode(jnp.pad(vf, ((0, pad), (0, 0))), sc["descale_v"], "fp8_e4m3")
    acc = attention_ref.truncating_accumulation(p_codes.astype(jnp.float32), v_codes.astype(jnp.float32))
    out = acc * sc["descale_v"] / attention_ref.P_SCALE / p.sum(-1, keepdims=True)
    return relative_l2(out, exact[0, :MODEL_ROWS, 0])


def coherence_rows(args: argparse.Namespace, impls: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per weight ``a`` of the shared direction in V (``--coherence``)."""
    tokens, heads = (1024, 2) if args.tiny else (32760, 12)
    impls = dict(impls)
    fp8_pv = AttentionPolicy(pv_format="fp8_e4m3")
    impls["jquant_fp8_pv"] = jax.jit(lambda q, k, v: quantized_call(fp8_pv, q, k, v))
    rows = []
    for i, a in enumerate(args.coherence):
        kq, kk, kv, kc = jax.random.split(jax.random.key(args.seed + i), 4)
        q, k = (jax.random.normal(kx, (1, tokens, heads, 128), jnp.float32).astype(jnp.bfloat16) for kx in (kq, kk))
        c = jax.random.normal(kc, (1, 1, heads, 128), jnp.float32)
        v = (a * c + jax.random.normal(kv, (1, tokens, heads, 128), jnp.float32)).astype(jnp.bfloat16)
        exact = exact_attention(q, k, v)
        row = call_row(i, q, k, v, None, impls, exact)
        row.update(coherence=a, module=None)
        row["rel_vs_exact"]["truncating_model"] = truncating_model_error(q, k, v, exact)
        print(f"a={a:<5g} " + " ".join(f"{n} {e:.2e}" for n, e in row["rel_vs_exact"].items()), flush=True)
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The step with the probing hook; the JSON-ready result."""
    model_name, config = ("tiny", bench_e2e.TINY_CONFIG) if args.tiny else bench_e2e.MODELS[args.model]
    on_gpu = jax.default_backend() == "gpu"
    wan_forward = bench_e2e.wan_forward
    model = bench_e2e.wan.PORT.module(config, dtype=jnp.bfloat16).clone(attention_impl="cudnn" if on_gpu else "xla")
    params = jax.tree_util.tree_map(jnp.asarray, wan_forward.synthetic_params(config, args.seed))
    frames, height, width = (5, 32, 48) if args.tiny else (81, 480, 832)
    shape = wan_forward.latent_shape(config, frames, height, width)
    k1, k2 = jax.random.split(jax.random.key(args.seed))
    inputs = (
        jax.random.normal(k1, shape, jnp.bfloat16),
        jnp.array([999.0], jnp.float32),
        jax.random.normal(k2, (1, args.text_len, config.text_dim), jnp.bfloat16),
    )
    impls = implementations(on_gpu)
    rows: list[dict[str, Any]] = []
    if args.coherence:
        return save(args, model_name, (frames, height, width), impls, [], coherence_rows(args, impls))

    def probe(q, k, v, mask, implementation):
        del implementation
        row = call_row(len(rows), q, k, v, mask, impls)
        rows.append(row)
        errs = row.get("rel_vs_exact", {})
        print(
            f"{row['call']:3d} {str(row['module'])[-28:]:28s} {row['tq']:6d}x{row['tk']:<6d} "
            + " ".join(f"{n} {e:.2e}" for n, e in errs.items())
            + (f" fp8-vs-emulated {row['cudnn_fp8_vs_emulated']:.2e}" if "cudnn_fp8_vs_emulated" in row else ""),
            flush=True,
        )
        return None  # the step goes on with the float path

    with attention_hook(probe):
        jax.block_until_ready(model.apply({"params": params}, *inputs))
    return save(args, model_name, (frames, height, width), impls, rows, [])


def save(args, model_name: str, video: tuple, impls: dict, rows: list, coherence: list) -> dict[str, Any]:
    """The result with its metadata, written to ``--out-dir``."""
    frames, height, width = video
    result = {
        "benchmark": "attention_call_errors",
        **timing.run_metadata("scripts/attention_call_errors.py", args.argv),
        "jax_version": jax.__version__,
        "model": model_name if args.tiny else f"{model_name} (synthetic weights)",
        "video": {"frames": frames, "height": height, "width": width},
        "text_len": args.text_len,
        "implementations": sorted(impls),
        "rows": rows,
        "summary": summarize(rows),
    }
    if coherence:
        result["coherence_rows"] = coherence
    kind = ("tiny-" if args.tiny else "") + ("coherence-" if coherence else "")
    name = f"attention_call_errors-{kind}{bench_e2e.wan_forward.device_slug(jax.devices()[0])}.json"
    timing.write_json(name, result, folder=str(args.out_dir))
    return result


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kind of call (self: tq == tk, cross: the rest): calls, and the median and max error of
    each implementation against exact."""
    out: dict[str, Any] = {}
    for kind in ("self", "cross"):
        sel = [r for r in rows if "rel_vs_exact" in r and (r["tq"] == r["tk"]) == (kind == "self")]
        if not sel:
            continue
        names = sorted(sel[0]["rel_vs_exact"])
        stats = {}
        for n in names + (["cudnn_fp8_vs_emulated"] if "cudnn_fp8_vs_emulated" in sel[0] else []):
            vals = sorted(r["rel_vs_exact"][n] if n in r["rel_vs_exact"] else r[n] for r in sel)
            stats[n] = {"median": vals[len(vals) // 2], "max": vals[-1]}
        out[kind] = {"calls": len(sel), "rel_l2": stats}
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="2-layer toy config and a small video (CPU smoke test)")
    p.add_argument("--model", choices=sorted(bench_e2e.MODELS), default="1.3b")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--coherence",
        type=lambda t: [float(a) for a in t.split(",")],
        default=None,
        help="comma list of weights a: synthetic calls with V = a c + noise instead of the model",
    )
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    result = run(parse_args(argv))
    for kind, s in result["summary"].items():
        print(
            f"{kind}: {s['calls']} calls; "
            + "; ".join(f"{n} median {v['median']:.2e} max {v['max']:.2e}" for n, v in s["rel_l2"].items())
        )
    return result


if __name__ == "__main__":
    main()
