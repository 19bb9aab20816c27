"""Measure the diffusion pipeline on the bundled tiny Wan and write docs/results.md.

    python scripts/pipeline_results.py                      # everything (CPU: ~1 h)
    python scripts/pipeline_results.py --sections tables --clips 4   # a quick look
    python scripts/pipeline_results.py --testbed stress     # or trained: benchmarks/pipeline_results-<testbed>.*

``--testbed`` picks one of the three testbeds of docs/results.md (``jquant.pipeline.testbeds``);
a rerun keeps docs/results.md's hand-maintained part (from "## Three testbeds" on).

Sections (all on the same noise and classes, against the fp32 model):

* ``tables``: static activation scales from one table vs per-timestep tables (uniform and
  variance-aware groups, per CFG branch, per frame) vs dynamic per-token scales, at W8A8
  (RTN int8 weights) and W4A8 (GPTQ int4/g64 weights), plus SmoothQuant W8A8.
* ``policies``: role-based mixed precision vs uniform 4-bit at equal or lower memory
  (weight-only), on temporal flicker.
* ``precision``: W4A8 for the early steps and W8A8 for the late ones in one jitted loop.
* ``recipes``: every registered recipe.

Every row reports PSNR/SSIM (per frame, mean), temporal flicker, and the mean one-step
error (relative RMS error of the guided prediction on the float trajectory, teacher
forced: each step's quantization error without the chaotic accumulation of sampling).

Run from the repository root: ``python scripts/pipeline_results.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/pipeline_results.py`` where jquant is not installed (e.g. the GPU machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jquant import policy as P
from jquant.pipeline import calibrate as C
from jquant.pipeline import evaluate as E
from jquant.pipeline import recipes as rc
from jquant.pipeline import runtime as R
from jquant.pipeline.tables import TableConfig
from jquant.pipeline.testbeds import DEFAULT_TRAINED_DIR, TESTBEDS, build_testbed

TABLES = (
    ("one static table", TableConfig("single")),
    ("uniform, 4 groups", TableConfig("uniform", 4)),
    ("variance-aware, 4 groups", TableConfig("variance", 4)),
    ("variance-aware, 4 groups, per CFG branch", TableConfig("variance", 4, per_branch=True)),
    ("variance-aware, 4 groups, per frame", TableConfig("variance", 4, per_frame=True)),
    ("variance-aware, 4 groups, per branch and frame", TableConfig("variance", 4, per_branch=True, per_frame=True)),
)


def _row(bundle, qm, ref, label: str, **extra: Any) -> dict[str, Any]:
    r = E.evaluate(bundle, qm, ref)
    r.pop("videos")
    r["one_step"] = E.one_step_errors(bundle, qm, ref).tolist()
    r["label"] = label
    r.update(extra)
    print(
        f"  {label:<52} PSNR {r['psnr']:6.2f}  SSIM {r['ssim']:.3f}  flicker {r['flicker']:.4f}  "
        f"1-step {np.mean(r['one_step']):.4f}  {r['weight_bytes'] / 2**20:.3f} MiB  ({r['sample_s']:.1f} s)",
        flush=True,
    )
    return r


def section_tables(bundle, cal, ref) -> list[dict]:
    rows = []
    ctx = cal.context()
    weights = (
        ("W8A8", "int8 RTN", rc.rtn(P.uniform("int8"))),
        ("W4A8", "int4/g64 GPTQ", rc.gptq(P.uniform("int4/g64"))),
        ("W8A8 SmoothQuant", "int8 SmoothQuant", rc.smoothquant(P.uniform("int8"))),
    )
    for setting, wdesc, transform in weights:
        print(f"{setting} ({wdesc})")
        v = transform(cal.float_variables, ctx)
        for label, tc in TABLES if setting != "W8A8 SmoothQuant" else TABLES[:3]:
            table = C.make_table(cal, v, "int8", tc)
            qm = R.QuantizedModel(v, "int8/t", table, label)
            rows.append(_row(bundle, qm, ref, label, setting=setting, groups=table.groups.tolist()))
        rows.append(_row(bundle, R.QuantizedModel(v, "int8/token", None), ref, "dynamic per-token", setting=setting))
        rows.append(_row(bundle, R.QuantizedModel(v, None, None), ref, "weights only (A16)", setting=setting))
    for r in rows:  # paired per-clip PSNR difference against the one-table row of the same setting
        base = next(x for x in rows if x["setting"] == r["setting"] and x["label"] == "one static table")
        d = np.asarray(r["psnr_clips"]) - np.asarray(base["psnr_clips"])
        r["dpsnr"] = f"{d.mean():+.2f} ± {d.std(ddof=1) / np.sqrt(len(d)):.2f}" if len(d) > 1 else f"{d.mean():+.2f}"
    return rows


POLICY_ROWS = (
    ("uniform int4/g16 (RTN)", rc.rtn(P.uniform("int4/g16"))),
    ("uniform int4/g32 (RTN)", rc.rtn(P.uniform("int4/g32"))),
    ("temporal-int8: temporal int8, rest int4/g32 (RTN)", rc.rtn(P.TEMPORAL_INT8)),
    ("video-mixed: temporal+cross int8, rest int4/g64 (RTN)", rc.rtn(P.VIDEO_MIXED)),
    ("uniform int4/g16 (GPTQ)", rc.gptq(P.uniform("int4/g16"))),
    ("temporal-int8 (GPTQ)", rc.gptq(P.TEMPORAL_INT8)),
)


def section_policies(bundle, cal, ref) -> list[dict]:
    rows = []
    print("policies (weight-only)")
    print(P.TEMPORAL_INT8)
    for label, transform in POLICY_ROWS:
        v = transform(cal.float_variables, cal.context())
        rows.append(_row(bundle, R.QuantizedModel(v, None, None), ref, label))
    return rows


def section_precision(bundle, cal, ref) -> list[dict]:
    print("per-step precision (W4A8 early, W8A8 late, one jitted loop)")
    ctx = cal.context()
    tc = TableConfig("variance", 4)
    v4 = rc.gptq(P.uniform("int4/g64"))(cal.float_variables, ctx)
    v8 = rc.rtn(P.uniform("int8"))(cal.float_variables, ctx)
    m4 = R.QuantizedModel(v4, "int8/t", C.make_table(cal, v4, "int8", tc), "W4A8")
    m8 = R.QuantizedModel(v8, "int8/t", C.make_table(cal, v8, "int8", tc), "W8A8")
    rows = [
        _row(bundle, m4, ref, "W4A8 every step", resident_bytes=R.resident_bytes([m4])),
        _row(bundle, m8, ref, "W8A8 every step", resident_bytes=R.resident_bytes([m8])),
    ]
    n = bundle.denoiser.num_steps
    # At least one W4A8 step and one W8A8 step each (a short run has fewer switch points: at 2
    # steps n // 4 = 0 was the W8A8 row again, printed as "steps 0--1").
    for early in sorted({e for e in (n // 4, n // 2) if 0 < e < n}):
        sw = R.PerStepModel((m4, m8), tuple(R.switch_schedule(n, early).tolist()), f"W4A8 x{early} then W8A8")
        rows.append(
            _row(
                bundle,
                sw,
                ref,
                f"W4A8 for steps 0-{early - 1}, W8A8 after",
                resident_bytes=sw.resident_bytes,
                choice=list(sw.choice),
            )
        )
    return rows


def section_recipes(bundle, cal, ref) -> list[dict]:
    print("recipes")
    rows = [_row(bundle, R.float_model(bundle), ref, "fp32", recipe="fp32", seconds=0.0)]
    for name in rc.names():
        t0 = time.perf_counter()
        qm = C.quantize(bundle, rc.get(name), cal)
        rows.append(
            _row(bundle, qm, ref, name, recipe=name, seconds=time.perf_counter() - t0, activations=rc.get(name).label)
        )
    for name in ("w4-svd", "w4-quarot-svd"):  # the W4A4 recipes with 8-bit activations instead
        if name in rc.RECIPES:
            r8 = rc.get(name).with_activations(act="int8")
            t0 = time.perf_counter()
            qm = C.quantize(bundle, r8, cal)
            rows.append(
                _row(
                    bundle,
                    qm,
                    ref,
                    f"{name} (A int8 instead)",
                    recipe=name,
                    seconds=time.perf_counter() - t0,
                    activations=r8.label,
                )
            )
    return rows


# --- markdown -------------------------------------------------------------------------------------
def _md_rows(rows: list[dict], cols: list[tuple[str, str, str]]) -> list[str]:
    out = [
        "| " + " | ".join(c[0] for c in cols) + " |",
        "|" + "|".join("---" if c[2] == "s" else "---:" for c in cols) + "|",
    ]
    for r in rows:
        cells = []
        for _, key, fmt in cols:
            v = r.get(key, "")
            if key == "one_step":
                v = float(np.mean(v))
            if key == "weight_bytes" or key == "resident_bytes":
                v = v / 2**20
            cells.append(str(v) if fmt == "s" else format(v, fmt))
        out.append("| " + " | ".join(cells) + " |")
    return out


METRICS = [
    ("PSNR dB", "psnr", ".2f"),
    ("SSIM", "ssim", ".3f"),
    ("flicker", "flicker", ".4f"),
    ("1-step err", "one_step", ".4f"),
]


def write_markdown(path: Path, res: dict[str, Any]) -> None:
    s = res["settings"]
    bed = s.get("testbed", "tiny")
    model = (
        f"`jquant/models/assets/tiny_wan` (6-layer Wan2.1, width 128, 8 frames of 32x32, {s['steps']} flow-match Euler "
        f"steps, CFG {s['guidance']:g})"
        if bed == "tiny"
        else f"the `{bed}` testbed (`jquant.pipeline.testbeds`; docs/results.md 'Three testbeds'), {s['steps']} "
        f"flow-match Euler steps, CFG {s['guidance']:g}"
    )
    title = "the bundled tiny Wan" if bed == "tiny" else f"the {bed} testbed"
    lines = [
        f"# Measured results: the diffusion pipeline on {title}",
        "",
        f"Produced by `{res['command']}` on {res['device']} ({res['date']}, {res['wall_s'] / 60:.0f} min).",
        "",
        f"Model: {model}. Evaluation: {s['clips']} clips (classes cycling from 0, noise seed {s['seed']}), "
        f"every configuration on the same noise and classes, metrics against the fp32 clips (pixels in [0, 1]; "
        f"PSNR/SSIM per frame, averaged). Calibration: {s['calib_samples']} samples (noise seed {s['calib_seed']}, "
        "classes cycling from 0), every step, both CFG branches, every frame. "
        '"1-step err" is the relative RMS error of the guided prediction at each step of the fp32 trajectory '
        "(teacher-forced), averaged over steps: each step's quantization error without the chaotic accumulation of "
        "sampling, which makes PSNR of the final clips noisy between close configurations.",
        "",
    ]
    if "tables" in res:
        lines += [
            "## Per-timestep activation scale tables",
            "",
            "Static int8 activation scales (one per layer, per tensor) from one table for the whole trajectory, "
            "from per-timestep tables, and dynamic per-token scales for reference. Weights: W8 = int8 per channel "
            "(RTN), W4 = int4 in groups of 64 (GPTQ on trajectory Hessians). Groups are the step groups of the "
            "table (step 0 = noisiest).",
            "",
        ]
        cols = [
            ("setting", "setting", "s"),
            ("activation scales", "label", "s"),
            *METRICS,
            ("ΔPSNR vs one table (paired, ± s.e.)", "dpsnr", "s"),
            ("groups", "groups", "s"),
        ]
        lines += _md_rows(res["tables"], cols) + [""]
    if "policies" in res:
        lines += [
            "## Role-based mixed precision vs uniform 4-bit (weight-only)",
            "",
            "```",
            str(P.TEMPORAL_INT8),
            str(P.VIDEO_MIXED),
            "```",
            "",
            "Memory is every parameter (the float embedders, modulation and head are the same in every row).",
            "",
        ]
        cols = [
            ("policy", "label", "s"),
            ("MiB", "weight_bytes", ".3f"),
            ("bits/weight (quantized)", "bits_per_weight", ".2f"),
            *METRICS,
        ]
        lines += _md_rows(res["policies"], cols) + [""]
    if "precision" in res:
        lines += [
            "## Per-step precision in one jitted loop",
            "",
            "`jquant.pipeline.runtime.per_step_model_fn`: `lax.switch` on a per-step int in `step_data`, both "
            "weight sets (and both scale tables) resident. MiB = resident bytes (the shared float layers once).",
            "",
        ]
        cols = [("schedule", "label", "s"), ("MiB resident", "resident_bytes", ".3f"), *METRICS]
        lines += _md_rows(res["precision"], cols) + [""]
    if "recipes" in res:
        lines += [
            "## Every recipe",
            "",
            "bits/weight counts the quantized kernels with their scales and aux (low-rank branches, multipliers); "
            "MiB is every parameter and aux array. Sampling time is the jitted sampler without compilation, "
            f"{s['clips']} clips on this CPU; quantize s includes calibration.",
            "",
        ]
        cols = [
            ("recipe", "label", "s"),
            ("activations", "activations", "s"),
            ("bits/weight", "bits_per_weight", ".2f"),
            ("MiB", "weight_bytes", ".3f"),
            *METRICS,
            ("sample s", "sample_s", ".1f"),
            ("quantize s", "seconds", ".1f"),
        ]
        lines += _md_rows(res["recipes"], cols) + [""]
        if rc.MISSING:
            lines += [
                "Not in the table (their methods are not in the tree): "
                + "; ".join(f"`{n}` ({why})" for n, why in rc.MISSING.items())
                + ".",
                "",
            ]
    path.write_text("\n".join(lines) + "\n" + kept_tail(path))


#: The first hand-maintained section of docs/results.md (from scripts/outlier_testbed.py's
#: JSON): it and what follows survive a rerun of this script.
KEEP_FROM = "## Three testbeds"


def kept_tail(path: Path) -> str:
    """What of ``path`` this script does not write: from :data:`KEEP_FROM` on (empty if none)."""
    text = path.read_text() if path.is_file() else ""
    i = text.find("\n" + KEEP_FROM)
    return "" if i < 0 else "\n" + text[i + 1 :]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="tables,policies,precision,recipes")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--calib-samples", type=int, default=10)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--testbed",
        default="tiny",
        choices=TESTBEDS,
        help="the model (docs/results.md 'Three testbeds'); not tiny: default --out/--json under benchmarks/",
    )
    p.add_argument("--trained-dir", type=Path, default=DEFAULT_TRAINED_DIR, help="the trained testbed's folder")
    p.add_argument(
        "--out", default=None, help="default: docs/results.md (tiny), else benchmarks/pipeline_results-<testbed>.md"
    )
    p.add_argument("--json", default=None, help="default: benchmarks/pipeline_results[-<testbed>].json")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the other sections of --json (same settings required) and add/redo only --sections",
    )
    a = p.parse_args(argv)
    suffix = "" if a.testbed == "tiny" else f"-{a.testbed}"
    a.out = a.out or ("docs/results.md" if a.testbed == "tiny" else f"benchmarks/pipeline_results{suffix}.md")
    a.json = a.json or f"benchmarks/pipeline_results{suffix}.json"
    t0 = time.perf_counter()
    bundle = build_testbed(a.testbed, a.steps, a.trained_dir)
    ccfg = C.CalibrationConfig(num_samples=a.calib_samples, batch=5)
    cal = C.Calibrator(bundle, ccfg)
    ref = E.reference(bundle, bundle.workload(a.clips, a.seed))
    d = jax.devices()[0]
    res: dict[str, Any] = {
        "command": "PYTHONPATH=. python scripts/pipeline_results.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": f"{d.device_kind} ({jax.default_backend()}, jax {jax.__version__}, python {platform.python_version()})",
        "date": datetime.date.today().isoformat(),
        "settings": {
            "clips": a.clips,
            "calib_samples": a.calib_samples,
            "calib_seed": ccfg.seed,
            "steps": a.steps,
            "seed": a.seed,
            "guidance": bundle.denoiser.guidance_scale,
            **({} if a.testbed == "tiny" else {"testbed": a.testbed}),
        },
    }
    if a.keep and Path(a.json).exists():
        saved = json.loads(Path(a.json).read_text())
        if saved.get("settings") != res["settings"]:
            raise SystemExit(f"--keep: {a.json} was made with settings {saved.get('settings')}, not {res['settings']}")
        kept = {k: v for k, v in saved.items() if k in ("tables", "policies", "precision", "recipes")}
        res = {**kept, **res, "command": f"{saved['command']}; then {res['command']}"}
        t0 -= float(saved.get("wall_s", 0.0))  # wall time of every section, the kept ones too
    fns = {
        "tables": section_tables,
        "policies": section_policies,
        "precision": section_precision,
        "recipes": section_recipes,
    }
    for name in a.sections.split(","):
        res[name] = fns[name](bundle, cal, ref)
        res["wall_s"] = time.perf_counter() - t0
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1, default=float) + "\n")
        write_markdown(Path(a.out), res)
    print(f"wrote {a.out} and {a.json} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
