#!/usr/bin/env python3
"""Where a step of the attention kernel goes, per warpgroup: the Mosaic GPU profiler's timeline.

Runs one ``scripts/bench_attention.py`` kernel variant (``kernel-...``) with
``AttentionConfig.profile_dir`` set, so each compute warpgroup records its named phases
(``qk_issue``, ``turn_wait``, ``qk_wait``, ``softmax``, ``pv``, ``pv_issue``, ``k_wait``; the
overlapped loop: ``turn_wait``, ``qk_wait``, ``softmax``, ``pv_wait``, ``rescale``) with the SM
clock. The output is checked against the reference first (as bench_attention checks it). Then:

* cycles per key step of each warpgroup, and the mean cycles of each phase per step (steady
  state: the first and last ``--skip`` steps of every CTA left out);
* how much of a warpgroup's softmax runs while the other warpgroup is also in its softmax
  (the ping-pong schedule makes the two exclusive; their sum against the step says whether
  the softmax sets the pace);
* a Gantt plot of both warpgroups over a few steps of one CTA (``--plot``).

Timestamps are ``%clock`` reads by one thread of each warpgroup, a few cycles each; the kernel
runs slightly slower while profiled (compare the step with bench_attention's time).

    python3 scripts/attention_timeline.py --variant kernel-int8-bf16-kblock --shape 12x8190 --plot
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

EXIT_BIT = 1 << 31  # the profiler's tag bit for the end of a range
HEADER = 3  # entries before a trace's events: start time, SM id, entries used
COMPUTE_WGS = 2  # the default; AttentionConfig.warpgroups sets it per variant
#: One color per phase in every plot (matplotlib names).
PHASE_COLORS = {
    "softmax": "tab:pink",
    "turn_wait": "tab:gray",
    "qk_issue": "tab:purple",
    "qk_wait": "tab:brown",
    "pv": "tab:green",
    "pv_issue": "tab:red",
    "pv_wait": "tab:olive",
    "k_wait": "tab:orange",
    "rescale": "tab:cyan",
}


@dataclasses.dataclass(frozen=True)
class Span:
    """One named range of one warpgroup, in SM clock cycles."""

    name: str
    start: int
    end: int


def parse_traces(
    buffer: np.ndarray, blocks: int, traces_per_block: int, names: dict[int, str]
) -> list[list[list[Span]]]:
    """The profiler's raw uint32 buffer -> ``[block][trace]`` lists of spans (cycles, unwrapped
    from 32 bits, relative to the block's earliest event, so the traces of one CTA line up: they
    read the same SM clock). Raises ValueError on a buffer whose size or events do not add up."""
    buffer = np.asarray(buffer, np.uint32)
    if buffer.size % (blocks * traces_per_block):
        raise ValueError(f"profile buffer of {buffer.size} entries is not {blocks} blocks x {traces_per_block} traces")
    entries = buffer.reshape(blocks, traces_per_block, -1)
    out: list[list[list[Span]]] = []
    for b in range(blocks):
        raw: list[list[tuple[str, bool, int]]] = []
        first = None
        for t in range(traces_per_block):
            used = int(entries[b, t, 2])
            if used % 2 or used + HEADER > entries.shape[2]:
                raise ValueError(f"block {b} trace {t}: {used} entries used of {entries.shape[2] - HEADER}")
            ev = entries[b, t, HEADER : HEADER + used].reshape(-1, 2)
            items = []
            for tag, clock in ev:
                tag = int(tag)
                items.append((names[tag & ~EXIT_BIT], not tag & EXIT_BIT, int(clock)))
            if items and (first is None or _before(items[0][2], first)):
                first = items[0][2]
            raw.append(items)
        out.append([_spans(items, first or 0, b, t) for t, items in enumerate(raw)])
    return out


def _before(a: int, b: int) -> bool:
    return ((a - b) & 0xFFFFFFFF) >= 1 << 31  # a precedes b on the wrapping 32-bit clock


def _spans(items: list[tuple[str, bool, int]], origin: int, block: int, trace: int) -> list[Span]:
    open_at: dict[str, list[int]] = {}
    spans = []
    for name, begin, clock in items:
        t = (clock - origin) & 0xFFFFFFFF
        if begin:
            open_at.setdefault(name, []).append(t)
        elif not open_at.get(name):
            raise ValueError(f"block {block} trace {trace}: {name!r} ends without a start")
        else:
            spans.append(Span(name, open_at[name].pop(), t))
    return sorted(spans, key=lambda s: s.start)


def _overlap(a: list[Span], b: list[Span]) -> int:
    """Cycles during which a span of ``a`` and a span of ``b`` are both open (each list disjoint)."""
    total, j = 0, 0
    for s in a:
        while j < len(b) and b[j].end <= s.start:
            j += 1
        k = j
        while k < len(b) and b[k].start < s.end:
            total += max(0, min(s.end, b[k].end) - max(s.start, b[k].start))
            k += 1
    return total


def _union(spans: list[Span]) -> list[Span]:
    """Disjoint, sorted spans covering the same cycles as ``spans``."""
    merged: list[Span] = []
    for s in sorted(spans, key=lambda s: s.start):
        if merged and s.start <= merged[-1].end:
            merged[-1] = Span(merged[-1].name, merged[-1].start, max(merged[-1].end, s.end))
        else:
            merged.append(s)
    return merged


def summarize(
    blocks: list[list[list[Span]]], skip: int = 2, step_phase: str = "softmax", wgs: int = COMPUTE_WGS
) -> dict[str, Any]:
    """Steady-state means over every CTA's ``wgs`` compute warpgroups: cycles per step (between
    consecutive ``step_phase`` starts of a warpgroup), each phase's cycles per step, and the share
    of warpgroup 0's softmax time during which another compute warpgroup is in its softmax."""
    step_gaps: list[float] = []
    phase_sum: dict[str, float] = {}
    steps_counted = 0
    soft_total = soft_both = 0
    for traces in blocks:
        windows = []
        for wg in traces[:wgs]:
            starts = [s.start for s in wg if s.name == step_phase]
            if len(starts) <= 2 * skip + 1:
                windows.append(None)
                continue
            lo, hi = starts[skip], starts[-skip - 1]
            windows.append((lo, hi))
            step_gaps.extend(np.diff(starts[skip : len(starts) - skip]).tolist())
            steps_counted += len(starts) - 2 * skip - 1
            for s in wg:
                if lo <= s.start < hi:
                    phase_sum[s.name] = phase_sum.get(s.name, 0.0) + (s.end - s.start)
        if len(traces) >= wgs and all(windows[:wgs]):
            lo = max(w[0] for w in windows[:wgs])
            hi = min(w[1] for w in windows[:wgs])
            soft = [[s for s in wg if s.name == "softmax" and lo <= s.start < hi] for wg in traces[:wgs]]
            soft_total += sum(s.end - s.start for s in soft[0])
            soft_both += _overlap(soft[0], _union([s for other in soft[1:] for s in other]))
    if not steps_counted:
        raise ValueError(f"no CTA has more than {2 * skip + 1} steps: use a longer sequence or a smaller --skip")
    return {
        "steps_counted": steps_counted,
        "cycles_per_step_median": float(np.median(step_gaps)),
        "cycles_per_step_mean": float(np.mean(step_gaps)),
        "phase_cycles_per_step": {k: v / steps_counted for k, v in sorted(phase_sum.items())},
        "softmax_both_wgs_share": soft_both / soft_total if soft_total else None,
    }


def plot(
    blocks: list[list[list[Span]]],
    path: Path,
    title: str,
    block: int | None = None,
    steps: int = 6,
    wgs: int = COMPUTE_WGS,
) -> None:
    """A Gantt chart of the ``wgs`` compute warpgroups of one CTA (the middle one) over ``steps`` steps."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    traces = blocks[len(blocks) // 2 if block is None else block]
    soft = [s for s in traces[0] if s.name == "softmax"]
    mid = len(soft) // 2
    lo, hi = soft[mid].start, soft[min(mid + steps, len(soft) - 1)].start
    names = sorted({s.name for wg in traces[:wgs] for s in wg} - set(PHASE_COLORS))
    colors = {**PHASE_COLORS, **{n: plt.cm.Set3(i % 12) for i, n in enumerate(names)}}
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.8 * wgs))
    for row, wg in enumerate(traces[:wgs]):
        for s in wg:
            if s.end > lo and s.start < hi:
                nested = s.name in ("pv_issue", "k_wait")
                ax.broken_barh(
                    [(s.start - lo, s.end - s.start)],
                    (row + (0.05 if nested else 0.3), 0.2 if nested else 0.6),
                    color=colors[s.name],
                    label=s.name,
                )
    handles = {h.get_label(): h for h in ax.collections}
    ax.legend(
        handles.values(), handles.keys(), ncol=len(handles), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25)
    )
    ax.set_yticks([row + 0.6 for row in range(wgs)], [f"warpgroup {row}" for row in range(wgs)])
    ax.set_xlabel("SM clock cycles")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _capture_raw_buffers(into: list) -> None:
    """Keeps each profiled launch's raw buffer (the profiler itself writes only a Chrome trace
    whose per-warpgroup times are not on one clock)."""
    from jax.experimental.mosaic.gpu import profiler  # pylint: disable=import-outside-toplevel

    original = profiler.ProfilerSpec.dump

    def dump(self, buffer, f, grid, block):
        into.append((np.asarray(buffer).copy(), tuple(grid), tuple(block), dict(self.interned_names)))
        return original(self, buffer, f, grid=grid, block=block)

    profiler.ProfilerSpec.dump = dump


def main(argv: list[str] | None = None) -> int:
    import bench_attention as bench  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel

    from pallas_kernels import attention as pa  # pylint: disable=import-outside-toplevel
    from pallas_kernels import attention_ref as ar  # pylint: disable=import-outside-toplevel
    from pallas_kernels import timing  # pylint: disable=import-outside-toplevel

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", help="a bench_attention kernel variant (repeatable)")
    p.add_argument("--shape", default="12x8190", help="HEADSxTOKENS (batch 1, head_dim 128)")
    p.add_argument("--skip", type=int, default=2, help="steps left out at each end of a CTA")
    p.add_argument("--plot", action="store_true", help="a Gantt PNG per variant beside the JSON")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks")
    args = p.parse_args(argv)
    variants = args.variant or ["kernel-int8-bf16-kblock"]
    heads, tokens = (int(v) for v in args.shape.split("x"))
    result = {
        "benchmark": "attention_timeline",
        **timing.run_metadata("scripts/attention_timeline.py", argv),
        "rows": [],
    }
    raw: list = []
    _capture_raw_buffers(raw)
    bad = 0
    for variant in variants:
        kind, qk, pv, config, _ = bench.parse_variant(variant, 128)
        if kind != "kernel":
            p.error(f"--variant {variant!r}: only kernel-... variants run the profiled kernel")
        tmp = tempfile.mkdtemp(prefix="attn_profile_")
        config = dataclasses.replace(config, profile_dir=tmp)
        q, k, v = ar.sample_inputs(jax.random.key(0), 1, tokens, tokens, heads, bench.HEAD_DIM)
        operands, v_mean = jax.jit(bench.prepare_fn(qk, pv, config))(q, k, v)
        raw.clear()
        out = jax.block_until_ready(pa.attention_pallas(*operands, causal=False, config=config))
        jax.effects_barrier()
        reference = lambda q, k, v, qk=qk, pv=pv, c=config: ar.quant_attention_reference(  # noqa: E731
            q, k, v, qk_format=qk, pv_format=pv, block_k=c.block_k, k_scales=c.k_scales
        )
        check = bench.check_fn((q, k, v), (tokens, v_mean), bench.variant_fn(variant, 128)[2], reference, pv, 256)(out)
        row: dict[str, Any] = {"variant": variant, "shape": args.shape, "check": check}
        if not check.get("ok", False):
            bad += 1
            row["error"] = "output differs from the reference"
        elif not raw:
            bad += 1
            row["error"] = f"no profile was captured (files in {tmp}: {os.listdir(tmp)})"
        else:
            buffer, grid, block, interned = raw[-1]
            names = {i: n for n, i in interned.items()}
            traces_per_block = int(np.prod(block)) // 128
            spans = parse_traces(buffer, int(np.prod(grid)), traces_per_block, names)
            row.update(summarize(spans, args.skip, wgs=config.warpgroups))
            if args.plot:
                png = args.out_dir / f"attention_timeline-{variant}.png"
                args.out_dir.mkdir(parents=True, exist_ok=True)
                title = f"{variant}, {args.shape}: the {config.warpgroups} compute warpgroups of one CTA"
                plot(spans, png, title, wgs=config.warpgroups)
                row["plot"] = (
                    str(png.relative_to(args.out_dir.parent)) if png.is_relative_to(args.out_dir.parent) else str(png)
                )
        for f in glob.glob(os.path.join(tmp, "*-trace.json")):
            os.remove(f)
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "check"}), flush=True)
    path = timing.write_json(
        f"attention_timeline-{bench.device_slug(jax.devices()[0])}.json", result, str(args.out_dir)
    )
    print(f"\n{'variant':<34} {'cycles/step':>11} {'softmax':>8} {'softmax overlapped':>18}")
    for row in result["rows"]:
        if "error" in row:
            print(f"{row['variant']:<34} ERROR {row['error']}")
            continue
        ph = row["phase_cycles_per_step"]
        share = row["softmax_both_wgs_share"]
        print(
            f"{row['variant']:<34} {row['cycles_per_step_median']:>11.0f} {ph.get('softmax', 0):>8.0f} {share if share is None else f'{share:.1%}':>18}"
        )
    print(f"wrote {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
