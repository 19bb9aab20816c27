"""Where W4A4's error comes from on the bundled tiny Wan (issue 22's target: >= 24 dB after
distillation; PTQ is 15 dB).

Two measurements on the ``w4a4-quarot`` recipe (QuaRot rotations, GPTQ int4/g64 weights, int4
per-token activations), calibrated as ``scripts/qat_table.py`` does:

* **activation granularity:** the same quantized weights run with int4 activations per token,
  per (token, 64) and per (token, 32) channels (``int4/tokenN``); PSNR, SSIM and the one-step
  error of the guided prediction, as docs/results.md;
* **one group's activations in float:** every layer of a group (``blocks_*/ffn/net_0/proj``,
  ...) runs its decoded 4-bit weights on float activations, the rest as in the recipe; the
  one-step error for each group, for none and for all (all = W4A16 with the same weights);
* **mixed precision:** int8 activations on some layers (``QuantizedModel.act_rules``), int4 on
  the rest: PSNR, SSIM and one-step error.

    python scripts/w4a4_ablation.py            # CPU, ~15 minutes on 2 cores
    python scripts/w4a4_ablation.py --clips 4 --groups attn1/to_out_0   # a quick look

Writes ``--json`` (default benchmarks/w4a4_ablation.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np

from jquant.files import atomic_file
from jquant.pipeline import calibrate as C
from jquant.pipeline import evaluate as E
from jquant.pipeline import recipes as rc
from jquant.pipeline.denoiser import ModelBundle, tiny_wan_bundle
from jquant.pipeline.runtime import QuantizedModel
from jquant.qarray import QArray, dequantize
from pallas_kernels.timing import git_commit

RECIPE = "w4a4-quarot"
GRANULARITIES = ("int4/token", "int4/token64", "int4/token32")
#: Mixed policies: (label, act_rules) with int8 per-token activations where a rule matches.
MIXED = (
    ("A8 on FFN up", (("ffn/net_0/", "int8/token"),)),
    ("A8 on FFN up and down", (("ffn/", "int8/token"),)),
    ("A8 on FFN and attention output", (("ffn/|attn1/to_out", "int8/token"),)),
)


def group_of(path: str) -> str:
    """A layer's group: its path with the block index wildcarded (``blocks_*/ffn/net_2/kernel``)."""
    return re.sub(r"blocks_\d+", "blocks_*", path)


def with_float_acts(qm: QuantizedModel, groups: set[str]) -> QuantizedModel:
    """``qm`` with the QArray kernels of ``groups`` decoded to float: those layers keep the 4-bit
    weight values but skip activation quantization (``jquant.nn`` quantizes only QArray layers)."""
    flat = flax.traverse_util.flatten_dict(qm.variables["params"], sep="/")
    out = {p: dequantize(v) if isinstance(v, QArray) and group_of(p) in groups else v for p, v in flat.items()}
    params = flax.traverse_util.unflatten_dict(out, sep="/")
    return dataclasses.replace(qm, variables={**qm.variables, "params": params}, name=f"{qm.name}+float:{len(groups)}")


def quantized_groups(qm: QuantizedModel) -> list[str]:
    flat = flax.traverse_util.flatten_dict(qm.variables["params"], sep="/")
    return sorted({group_of(p) for p, v in flat.items() if isinstance(v, QArray)})


def measure(bundle: ModelBundle, qm: QuantizedModel, ref: E.Reference, full: bool) -> dict[str, float]:
    """One-step error (and with ``full``, the clips' PSNR and SSIM)."""
    row = {"one_step": float(np.mean(E.one_step_errors(bundle, qm, ref)))}
    if full:
        r = E.evaluate(bundle, qm, ref)
        row.update(psnr=float(r["psnr"]), ssim=float(r["ssim"]))
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--groups", default="", help="only groups whose path contains one of these (comma list)")
    p.add_argument("--json", default=str(Path(__file__).resolve().parents[1] / "benchmarks" / "w4a4_ablation.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    t0 = time.perf_counter()
    bundle = tiny_wan_bundle()
    cal = C.Calibrator(bundle, C.CalibrationConfig(num_samples=a.calib_samples, batch=5))
    ref = E.reference(bundle, bundle.workload(a.clips, a.seed))
    base = C.quantize(bundle, rc.get(RECIPE), cal)
    d = jax.devices()[0]
    res: dict[str, Any] = {
        "command": "python scripts/w4a4_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": f"{d.device_kind} ({jax.default_backend()}, jax {jax.__version__}, python {platform.python_version()})",
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "recipe": RECIPE,
        "settings": {k: v for k, v in vars(a).items() if k != "json"},
        "granularity": [],
        "float_groups": [],
        "mixed": [],
    }
    for act in GRANULARITIES:
        row = {"act": act, **measure(bundle, dataclasses.replace(base, act=act), ref, full=True)}
        res["granularity"].append(row)
        print(f"  {act:14s} PSNR {row['psnr']:6.2f}  SSIM {row['ssim']:.3f}  1-step {row['one_step']:.4f}", flush=True)
    groups = quantized_groups(base)
    if a.groups:
        groups = [g for g in groups if any(s in g for s in a.groups.split(","))]
    for name, chosen in [("(none)", set()), *((g, {g}) for g in groups), ("(all)", set(quantized_groups(base)))]:
        row = {"float_acts": name, **measure(bundle, with_float_acts(base, chosen), ref, full=False)}
        res["float_groups"].append(row)
        print(f"  float activations: {name:34s} 1-step {row['one_step']:.4f}", flush=True)
    for label, rules in MIXED:
        qm = dataclasses.replace(base, act_rules=rules, name=f"{RECIPE}+{label}")
        row = {"policy": label, "act_rules": [list(r) for r in rules], **measure(bundle, qm, ref, full=True)}
        res["mixed"].append(row)
        print(
            f"  {label:32s} PSNR {row['psnr']:6.2f}  SSIM {row['ssim']:.3f}  1-step {row['one_step']:.4f}", flush=True
        )
    res["total_s"] = time.perf_counter() - t0
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        Path(tmp).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
