"""The outlier testbeds side by side: the bundled tiny Wan as trained, the same model with
function-preserving outlier channels planted (``jquant.algorithms.outliers``, the stress mode), and
the captioned moving-shapes model of ``scripts/train_outlier_model.py`` (the trained testbed).

For each testbed: the activation-outlier report over the calibration trajectory (per role:
largest/median channel absmax, kurtosis; how stable the top channels are across timestep groups
and CFG branches), then the W8A8 / W4A8 / W4A4 method comparisons of issue 25 on the same noise
and conditioning, against the testbed's own float model: final-clip PSNR and the mean one-step
(teacher-forced) error. Writes ``benchmarks/outlier_testbed.json`` (and a copy to ``$OUT`` when
set, where the GPU machine returns files) after the report and after every row, so a killed run
keeps what it measured, and prints markdown for docs/results.md.

    PYTHONPATH=. python scripts/outlier_testbed.py [--clips 16] [--recipes a,b] [--testbeds tiny,stress]
    PYTHONPATH=. python scripts/outlier_testbed.py --testbeds trained --trained-dir /tmp/shapes_model

Rows are merged into the existing JSON, keyed by (testbed, method): a run for one testbed keeps
the other testbeds' rows, and a run of some methods keeps the testbed's other methods when they
were measured with the same settings (clips, calibration samples, steps, seed) on the same
device; ``--fresh``
starts the file over. Each testbed records the run that measured it (``run``: command, settings,
device kind, backend, jax, date, commit via ``pallas_kernels.timing.git_commit``, which honours
``$JQUANT_COMMIT``) and, for the trained testbed, the model folder and its training record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from jquant import policy as P
from jquant.algorithms import outliers as inj
from jquant.files import atomic_file
from jquant.metrics import outliers as rep
from jquant.pipeline import calibrate as C
from jquant.pipeline import evaluate as E
from jquant.pipeline import recipes as rc
from jquant.pipeline import trajectory as tj
from jquant.pipeline.testbeds import DEFAULT_TRAINED_DIR, TESTBEDS, build_testbed, check_trained_dir
from pallas_kernels.timing import run_metadata

W4 = rc.W4


def recipes() -> dict[str, rc.Recipe]:
    """The comparisons of issue 25, all with dynamic per-token activations (like for like)."""
    u = P.uniform
    return {
        "W8A8 RTN": rc.Recipe("w8a8-rtn", "RTN int8", rc.rtn(u("int8")), "int8"),
        "W8A8 SmoothQuant": rc.get("int8-wa-smooth").with_activations(table=None),
        "W8A8 QuaRot": rc.get("int8-wa-quarot"),
        "W4A8 RTN": rc.Recipe("w4a8-rtn", "RTN int4/g64", rc.rtn(u(W4)), "int8"),
        "W4A8 GPTQ": rc.Recipe("w4a8-gptq", "GPTQ int4/g64", rc.gptq(u(W4)), "int8"),
        "W4A8 QuaRot+GPTQ": rc.Recipe(
            "w4a8-quarot-gptq", "QuaRot, GPTQ", rc.chain(rc.quarot(), rc.gptq(u(W4))), "int8"
        ),
        "W4A8 SVDQuant": rc.get("w4-svd").with_activations(act="int8"),
        "W4A4 QuaRot+GPTQ": rc.get("w4a4-quarot"),
    }


def report(cal: C.Calibrator, roles: dict) -> dict[str, Any]:
    by_key = cal.stats_by_key(cal.float_variables)
    layers = rep.from_stats(tj.pooled_stats(by_key))
    overlap = {p: rep.top_overlap({k: np.asarray(s[p].absmax) for k, s in by_key.items()}) for p in layers}
    rows = rep.summarize(layers, roles)
    ratios = np.array([r.ratio for r in layers.values()])
    return {
        "median_ratio": float(np.median(ratios)),
        "max_ratio": float(ratios.max()),
        "median_top_overlap": float(np.median(list(overlap.values()))),
        "roles": rows,
        "markdown": rep.markdown(rows),
    }


#: Where the trained model ships once trained (beside the tiny model's folder).
#: The training record of the trained model copied into its testbed entry.
MODEL_KEYS = ("command", "commit", "date", "device", "seed", "params", "training")


def parse_testbeds(text: str) -> list[str]:
    """The ``--testbeds`` list in canonical order, refusing unknown names."""
    names = [t for t in text.split(",") if t]
    unknown = sorted(set(names) - set(TESTBEDS))
    if unknown or not names:
        raise SystemExit(f"--testbeds: unknown {unknown or names!r}; choose from {','.join(TESTBEDS)}")
    return [t for t in TESTBEDS if t in names]


def environment(argv: list[str]) -> dict[str, Any]:
    """Where and when this run measured: device kind, backend, jax and python versions, date,
    commit, command."""
    meta = run_metadata("scripts/outlier_testbed.py", argv)
    return {
        "command": "PYTHONPATH=. " + meta["command"],
        "device_kind": meta["device"],
        "backend": meta["platform"],
        "jax": meta["jax"],
        "python": platform.python_version(),
        "date": meta["date"],
        "commit": meta["commit"],
    }


def load_previous(path: Path, fresh: bool) -> dict[str, Any]:
    """The existing JSON to merge into ({} when absent or ``fresh``); a file that is not one
    exits naming it. Testbeds of older files, which lack their own ``run``, get the file's
    command, device, date and settings as theirs, so a merge does not lose them."""
    if fresh or not path.is_file():
        return {}
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not JSON ({e}); pass --fresh to start it over") from None
    if not isinstance(res.get("testbeds"), dict):
        raise SystemExit(f"{path}: lacks a 'testbeds' object; pass --fresh to start it over")
    legacy = {k: res[k] for k in ("command", "device", "date", "settings") if k in res}
    for entry in res["testbeds"].values():
        entry.setdefault("run", legacy)
    return res


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """``old`` rows with those of ``new`` replacing the same method, in ``order`` (methods not in
    it last, as stored)."""
    by = {r["method"]: r for r in old} | {r["method"]: r for r in new}
    rank = {m: i for i, m in enumerate(order)}
    return sorted(by.values(), key=lambda r: rank.get(r["method"], len(rank)))


def save(path: Path, res: dict[str, Any]) -> None:
    """Write ``res`` atomically (a kill leaves the previous file), and a copy to ``$OUT`` when set."""
    text = json.dumps(res, indent=1, default=float) + "\n"
    targets = [path] + ([Path(os.environ["OUT"]) / path.name] if os.environ.get("OUT") else [])
    for target in targets:
        with atomic_file(target) as tmp:
            tmp.write_text(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--calib-samples", type=int, default=10)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--testbeds", default="tiny,stress", help=f"comma list of {','.join(TESTBEDS)}")
    p.add_argument(
        "--trained-dir",
        type=Path,
        default=DEFAULT_TRAINED_DIR,
        help="the trained testbed's model folder (scripts/train_outlier_model.py --out); default: %(default)s",
    )
    p.add_argument("--recipes", default=None, help="comma list of the comparison names (default: all)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/outlier_testbed.json"))
    p.add_argument("--fresh", action="store_true", help="start the JSON over instead of merging into it")
    a = p.parse_args(argv)
    beds = parse_testbeds(a.testbeds)
    if "trained" in beds:
        check_trained_dir(a.trained_dir)
    all_recipes = recipes()
    chosen = all_recipes
    if a.recipes:
        unknown = set(a.recipes.split(",")) - set(all_recipes)
        if unknown:
            raise SystemExit(f"--recipes: unknown {sorted(unknown)}; choose from {list(all_recipes)}")
        chosen = {k: v for k, v in all_recipes.items() if k in a.recipes.split(",")}
    t0 = time.perf_counter()
    stress_cfg = inj.OutlierConfig()
    env = environment(argv)
    settings = {"clips": a.clips, "calib_samples": a.calib_samples, "steps": a.steps, "seed": a.seed}
    res = load_previous(a.json, a.fresh)
    res.update(
        command=env["command"],
        device=f"{env['device_kind']} ({env['backend']}, jax {env['jax']}, python {env['python']})",
        date=env["date"][:10],
        commit=env["commit"],
        stress_config=dataclasses.asdict(stress_cfg),
        settings=settings,
    )
    stored = res.setdefault("testbeds", {})
    for name in beds:
        bundle = build_testbed(name, a.steps, a.trained_dir, stress_cfg)
        old_rows: list[dict[str, Any]] = []
        if name in stored:
            was = {k: stored[name]["run"].get(k) for k in ("settings", "device")}
            if was == {"settings": settings, "device": res["device"]}:
                old_rows = stored[name]["rows"]
            else:
                print(f"== {name}: the stored rows were measured with {was}, not this run's: replacing them")
        cal = C.Calibrator(bundle, C.CalibrationConfig(num_samples=a.calib_samples, batch=5))
        run = {**env, "device": res["device"], "settings": settings}
        if name == "stress":
            run["stress_config"] = dataclasses.asdict(stress_cfg)
        if name == "trained":
            meta = bundle.extra["shapes"].meta
            run["model"] = {"dir": str(a.trained_dir), **{k: meta[k] for k in MODEL_KEYS if k in meta}}
        out: dict[str, Any] = {"report": report(cal, bundle.roles), "rows": old_rows, "run": run}
        stored[name] = out
        save(a.json, res)
        print(f"== {name}: median ratio {out['report']['median_ratio']:.1f}, max {out['report']['max_ratio']:.1f}")
        print(out["report"]["markdown"], flush=True)
        ref = E.reference(bundle, bundle.workload(a.clips, a.seed))
        for label, recipe in chosen.items():
            t1 = time.perf_counter()
            qm = C.quantize(bundle, recipe, cal)
            r = E.evaluate(bundle, qm, ref)
            r.pop("videos")
            one = E.one_step_errors(bundle, qm, ref)
            row = {
                "method": label,
                "psnr": float(r["psnr"]),
                "ssim": float(r["ssim"]),
                "flicker": float(r["flicker"]),
                "one_step": float(np.mean(one)),
                "seconds": time.perf_counter() - t1,
            }
            out["rows"] = merge_rows(out["rows"], [row], list(all_recipes))
            print(f"  {name:7} {label:20} PSNR {row['psnr']:6.2f}  1-step {row['one_step']:.4f}", flush=True)
            res["wall_s"] = time.perf_counter() - t0
            save(a.json, res)
    print(markdown(res))
    return 0


def markdown(res: dict[str, Any]) -> str:
    """The method table, one column pair per stored testbed (tiny, stress, trained order); a
    method a testbed lacks shows empty cells."""
    beds = [b for b in TESTBEDS if b in res["testbeds"]] + [b for b in res["testbeds"] if b not in TESTBEDS]
    head = "| method | " + " | ".join(f"{b} PSNR | {b} 1-step" for b in beds) + " |\n"
    head += "|---|" + "---:|---:|" * len(beds) + "\n"
    methods = merge_rows([], [r for b in beds for r in res["testbeds"][b]["rows"]], list(recipes()))
    lines = []
    for m in (r["method"] for r in methods):
        cells = []
        for b in beds:
            row = next((r for r in res["testbeds"][b]["rows"] if r["method"] == m), None)
            cells += ["" if row is None else f"{row['psnr']:.2f}", "" if row is None else f"{row['one_step']:.4f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |\n")
    return head + "".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
