#!/usr/bin/env python3
"""One Wan2.1 denoising step on whatever devices exist, per parallel mode of ``jquant.sharding``.

The published Wan2.1 config with synthetic weights (``scripts/bench_e2e.py``'s variants: bf16,
W8A8, quantized attention, GGUF mixes), one jitted forward at the given resolution. Modes:

* ``unsharded``: the plain jitted step, params on the first device (the reference);
* ``fsdp`` / ``tp`` / ``fsdp_tp``: params placed by ``jquant.sharding.shard_params`` on a mesh
  ``{"data": n}`` / ``{"model": n}`` / ``{"data": n/2, "model": 2}``, the batch over ``data``;
  ``tp`` and ``fsdp_tp`` run the split linears per shard (``jquant.sharding.tensor_parallel``);
* ``ulysses`` / ``ring``: sequence-parallel attention (``jquant.sharding.sequence_parallel``)
  on ``{"seq": n}``, params replicated.

With one device every mesh has one device: the sharded code path (placed params, the attention
hook and its ``shard_map``) against the unsharded step, the overhead the issue bounds at 3%.

Each mode's output is checked against the unsharded step first (relative L2 <= ``--rel-tol``,
finite); a mode that fails is a FAIL row and is not timed. Then: median and minimum wall time
over ``--runs`` (>= 10) runs after ``--warmup``; per-device parameter bytes (read from the
arrays' ``addressable_shards``) and XLA's per-device memory analysis of the compiled step; the
communication share of device time from a ``jax.profiler`` trace of ``--profile-runs`` runs
(collective ops over all XLA ops on the device planes; ``null`` with the reason when the trace
has no device op events); scaling efficiency ``t_unsharded / (n_devices * t_mode)`` and the
overhead ``t_mode / t_unsharded - 1``. Writes ``benchmarks/sharded-<model>-<n>x<device>.json``
(device, date, commit, command) after every mode.

    PYTHONPATH=. python3 scripts/bench_sharded.py                     # Wan2.1-1.3B, 480x832x81
    PYTHONPATH=. python3 scripts/bench_sharded.py --tiny              # CPU smoke test
    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. python3 scripts/bench_sharded.py --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

import jquant.nn
from jquant import models
from jquant.attention import quantized_attention
from jquant.models import wan
from jquant.sharding import device_bytes, make_mesh, sequence_parallel, shard_params, tensor_parallel
from pallas_kernels import timing

_E2E = Path(__file__).resolve().parent / "bench_e2e.py"
_spec = importlib.util.spec_from_file_location("bench_e2e", _E2E)
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)

MODES = ("unsharded", "fsdp", "tp", "fsdp_tp", "ulysses", "ring")
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter", "nccl", "collective")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy config and a small video (CPU smoke test)")
    p.add_argument("--model", choices=sorted(e2e.MODELS), default="1.3b")
    p.add_argument("--variant", default="w8a8", help=f"weights/attention variant, one of {list(e2e.VARIANTS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)} (unsharded always runs)")
    p.add_argument("--frames", type=int, default=None, help="video frames (default 81; tiny: 5)")
    p.add_argument("--height", type=int, default=None, help="pixels (default 480; tiny: 32)")
    p.add_argument("--width", type=int, default=None, help="pixels (default 832; tiny: 64)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=None, help="batch (default: the device count, so data splits)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=timing.MIN_RUNS, help="timed runs (at least 10)")
    p.add_argument("--profile-runs", type=int, default=3, help="runs traced for the communication share (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rel-tol", type=float, default=2e-2, help="relative L2 error allowed against the unsharded step")
    p.add_argument("--deadline-s", type=float, default=600.0, help="skip modes started after this")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks")
    args = p.parse_args(argv)
    args.runs = max(args.runs, timing.MIN_RUNS)
    frames, height, width = (5, 32, 64) if args.tiny else (81, 480, 832)
    args.frames, args.height, args.width = args.frames or frames, args.height or height, args.width or width
    if args.variant not in e2e.VARIANTS:
        p.error(f"--variant: unknown variant {args.variant!r}; choose from {list(e2e.VARIANTS)}")
    args.modes = ["unsharded"] + [m for m in args.modes.split(",") if m != "unsharded"]
    for m in args.modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}; choose from {list(MODES)}")
    return args


def mesh_for(mode: str, n: int):
    """The mesh a mode runs on with ``n`` devices."""
    if mode in ("fsdp",):
        return make_mesh({"data": n})
    if mode == "tp":
        return make_mesh({"model": n})
    if mode == "fsdp_tp":
        return make_mesh({"data": max(n // 2, 1), "model": 2 if n >= 2 else 1})
    return make_mesh({"seq": n})


def step_fn(model: Any, variant: dict, sp: tuple | None, tp: tuple | None = None):
    """The jitted step under the variant's contexts; ``sp`` = (mesh, axis, mode) adds
    sequence-parallel attention (entered innermost, so quantized attention runs per shard),
    ``tp`` = (mesh, plan) tensor-parallel linears per shard (entered outside jquant.nn)."""
    weight_only = variant["weights"] is not None and variant["act"] is None

    def step(params, x, t, text):
        with contextlib.ExitStack() as stack:
            if tp is not None:
                mesh, plan = tp
                batch_axis = "data" if "data" in mesh.shape else None
                stack.enter_context(tensor_parallel(mesh, plan, "model", batch_axis=batch_axis))
            if variant["attention"] is not None:
                stack.enter_context(quantized_attention(**variant["attention"]))
            if sp is not None:
                mesh, axis, mode = sp
                stack.enter_context(sequence_parallel(mesh, axis, mode=mode))
            if variant["act"] is not None or weight_only:
                stack.enter_context(jquant.nn.quantized(act=variant["act"]))
            return model.apply({"params": params}, x, t, text)

    return jax.jit(step)


def communication_share(compiled: Any, args_: tuple, runs: int) -> dict[str, Any]:
    """Collective ops' share of the device op time in a ``jax.profiler`` trace of ``runs`` runs."""
    if runs <= 0:
        return {"communication_share": None, "communication_note": "profiling off (--profile-runs 0)"}
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(runs):
                jax.block_until_ready(compiled(*args_))
        files = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        if not files:
            return {"communication_share": None, "communication_note": "the profiler wrote no trace"}
        data = jax.profiler.ProfileData.from_file(files[0])
        total = comm = 0
        for plane in data.planes:
            if not plane.name.startswith("/device:"):
                continue
            for line in plane.lines:
                if line.name != "XLA Ops":
                    continue
                for ev in line.events:
                    total += ev.duration_ns
                    if any(c in ev.name.lower() for c in COLLECTIVES):
                        comm += ev.duration_ns
    if total == 0:
        return {
            "communication_share": None,
            "communication_note": "no device 'XLA Ops' events in the trace (the CPU backend records none)",
        }
    return {"communication_share": comm / total, "communication_ns": comm, "device_op_ns": total}


def run_mode(mode: str, model: Any, variant: dict, params: Any, inputs: tuple, ref: Any, args) -> dict[str, Any]:
    n = len(jax.devices())
    row: dict[str, Any] = {"mode": mode, "devices": 1 if mode == "unsharded" else n}
    if mode == "unsharded":
        fn, placed, placed_inputs = step_fn(model, variant, None), params, inputs
    else:
        mesh = mesh_for(mode, n)
        row["mesh"] = dict(mesh.shape)
        if mode in ("ulysses", "ring"):
            placed, _ = shard_params(params, mesh, "replicated")
            fn = step_fn(model, variant, (mesh, "seq", mode))
            data = None
        else:
            placed, plan = shard_params(params, mesh, mode)
            fn = step_fn(model, variant, None, (mesh, plan) if "model" in mesh.shape else None)
            data = "data" if "data" in mesh.shape and inputs[0].shape[0] % mesh.shape["data"] == 0 else None
        placed_inputs = tuple(jax.device_put(a, NamedSharding(mesh, PartitionSpec(data))) for a in inputs)
    held = device_bytes(placed)
    row["param_bytes_per_device"] = max(held.values())
    t0 = time.perf_counter()
    compiled = fn.lower(placed, *placed_inputs).compile()
    row["compile_s"] = time.perf_counter() - t0
    row["memory_per_device"] = e2e._memory(compiled)
    out = jax.block_until_ready(compiled(placed, *placed_inputs))
    if ref is not None:
        row["check"] = e2e.check_step(jnp.asarray(jax.device_get(out)), ref, args.rel_tol)
        if not row["check"]["ok"]:
            row["status"] = "FAIL"
            return row
    row["output"] = jnp.asarray(jax.device_get(out))
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(placed, *placed_inputs))
    times_ms = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(placed, *placed_inputs))
        times_ms.append((time.perf_counter() - t0) * 1e3)
    row.update(status="PASS", time_ms=statistics.median(times_ms), time_ms_min=min(times_ms), times_ms=times_ms)
    row.update(communication_share(compiled, (placed, *placed_inputs), args.profile_runs))
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if stats and "peak_bytes_in_use" in stats:
        row["peak_bytes_in_use_device0"] = int(stats["peak_bytes_in_use"])
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    model_name, config = ("tiny", e2e.TINY_CONFIG) if args.tiny else e2e.MODELS[args.model]
    n = len(jax.devices())
    attn_impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    start = time.perf_counter()
    model = wan.PORT.module(config, dtype=jnp.bfloat16).clone(attention_impl=attn_impl)
    params_bf16 = jax.tree_util.tree_map(jnp.asarray, e2e.wan_forward.synthetic_params(config, args.seed))
    roles = models.layer_roles(config, params_bf16)
    variant = e2e.VARIANTS[args.variant]
    if variant["weights"] is None:
        params = params_bf16
    elif variant["weights"] in e2e.kquants.MIX_BASE:
        params = e2e.synthetic_kquant(params_bf16, roles, variant["weights"], args.seed)
    else:
        params = e2e.pol.uniform(variant["weights"]).quantize(params_bf16, roles)
    batch = args.batch or n
    shape = (batch, *e2e.wan_forward.latent_shape(config, args.frames, args.height, args.width)[1:])
    k1, k2 = jax.random.split(jax.random.key(args.seed))
    inputs = (
        jax.random.normal(k1, shape, jnp.bfloat16),
        jnp.full((batch,), 999.0, jnp.float32),
        jax.random.normal(k2, (batch, args.text_len, config.text_dim), jnp.bfloat16),
    )
    pt, ph, pw = config.patch_size
    result = {
        "benchmark": "sharded_step",
        **timing.run_metadata("scripts/bench_sharded.py", args.argv),
        "devices": n,
        "timing": "time_ms: median, time_ms_min: minimum wall time over >= 10 runs; output checked first",
        "scaling_efficiency": "unsharded time_ms / (devices * mode time_ms); overhead: mode / unsharded - 1",
        "rel_tol": args.rel_tol,
        "model": model_name if args.tiny else f"{model_name} (synthetic weights)",
        "variant": args.variant,
        "video": {"frames": args.frames, "height": args.height, "width": args.width, "batch": batch},
        "tokens_per_sample": (shape[2] // pt) * (shape[3] // ph) * (shape[4] // pw),
        "text_len": args.text_len,
        "rows": [],
    }
    slug = timing.device_slug()
    name = f"sharded-{'tiny' if args.tiny else args.model}-{args.variant}-{n}x{slug}.json"
    base, ref = None, None
    for mode in args.modes:
        row: dict[str, Any] = {"mode": mode}
        if time.perf_counter() - start > args.deadline_s:
            row.update(status="SKIP", skipped="deadline")
        else:
            try:
                row = run_mode(mode, model, variant, params, inputs, ref, args)
                out = row.pop("output", None)
                if mode == "unsharded" and row["status"] == "PASS":
                    base, ref = row, out.astype(jnp.float32)
                if base is not None and "time_ms" in row:
                    row["overhead_vs_unsharded"] = row["time_ms"] / base["time_ms"] - 1.0
                    row["overhead_vs_unsharded_min"] = row["time_ms_min"] / base["time_ms_min"] - 1.0
                    row["scaling_efficiency"] = base["time_ms"] / (row["devices"] * row["time_ms"])
            except Exception as e:  # pylint: disable=broad-except
                row.update(timing.error_row(e))
        result["rows"].append(row)
        timing.write_json(name, result, folder=str(args.out_dir))
        if "time_ms" in row:
            share = row.get("communication_share")
            print(
                f"{mode:10s} PASS {row['time_ms']:9.2f} ms (min {row['time_ms_min']:9.2f})  params/device "
                f"{row['param_bytes_per_device'] / 2**20:8.1f} MiB  overhead {row.get('overhead_vs_unsharded', 0):+.1%}"
                f"  efficiency {row.get('scaling_efficiency', 1):.2f}  comm "
                f"{'n/a' if share is None else f'{share:.1%}'}",
                flush=True,
            )
        else:
            why = row.get("skipped") or (row.get("check") or {}).get("detail") or row.get("error", "")
            print(f"{mode:10s} {row['status']:5s} {why[:300]}", flush=True)
        if mode == "unsharded" and ref is None:
            break
    result["failures"] = sum(r.get("status") in ("FAIL", "ERROR") for r in result["rows"])
    timing.write_json(name, result, folder=str(args.out_dir))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; the result (``result["failures"]``: rows that FAILed or ERRORed)."""
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
