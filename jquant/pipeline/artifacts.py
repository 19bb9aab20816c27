"""What ``jquant quantize`` writes and ``jquant eval`` reads: a quantized model folder.

``DIR/checkpoint/`` (orbax, via :mod:`jquant.io.checkpoint`: the quantized variables and the
scale table), ``DIR/quant.json`` (what is needed to run it again), ``report.md`` and
``report.json`` (per-layer formats and bytes, timings).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from jquant.algorithms.fold import flat_aux
from jquant.coded import CodedArray
from jquant.io import checkpoint
from jquant.pipeline.denoiser import ModelBundle
from jquant.pipeline.evaluate import weight_summary
from jquant.pipeline.runtime import QuantizedModel
from jquant.pipeline.tables import ScaleTable
from jquant.qarray import QArray
from jquant.rules import flatten_with_paths, leaf_nbytes

META_NAME = "quant.json"
CKPT_NAME = "checkpoint"


# --- saving and loading ----------------------------------------------------------------------------
def save_quantized(out: str | Path, qm: QuantizedModel, meta: dict[str, Any]) -> Path:
    """Write ``checkpoint/`` (variables and table arrays) and ``quant.json`` into ``out``."""
    coded = [p for p, leaf in flatten_with_paths(qm.variables) if isinstance(leaf, CodedArray)]
    if coded:
        raise ValueError(
            f"{coded[0]}: {type(dict(flatten_with_paths(qm.variables))[coded[0]]).__name__} leaves cannot be saved by "
            f"jquant.io.checkpoint (it stores QArrays); {len(coded)} such layers"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tree: dict[str, Any] = {"variables": qm.variables}
    full = {**meta, "name": qm.name, "act": qm.act, "table": None}
    if qm.act_rules:
        full["act_rules"] = [list(rule) for rule in qm.act_rules]
    if qm.table is not None:
        t = qm.table.to_tree()
        tree["table"] = {"groups": t["groups"], "scales": t["scales"]}
        full["table"] = t["meta"]
    checkpoint.save(out / CKPT_NAME, tree)
    (out / META_NAME).write_text(json.dumps(full, indent=2, default=json_default) + "\n")
    return out


def load_quantized(path: str | Path) -> tuple[QuantizedModel, dict[str, Any]]:
    """Inverse of :func:`save_quantized`: ``(QuantizedModel, meta)``."""
    path = Path(path)
    if not (path / META_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a `jquant quantize` output (no {META_NAME})")
    meta = json.loads((path / META_NAME).read_text())
    tree = checkpoint.restore(path / CKPT_NAME)
    table = ScaleTable.from_tree(tree["table"], meta["table"]) if meta.get("table") else None
    rules = tuple(tuple(rule) for rule in meta.get("act_rules", ()))
    return QuantizedModel(
        tree["variables"], meta["act"], table, meta.get("name", ""), meta.get("info", {}), rules
    ), meta


def json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# --- reports -----------------------------------------------------------------------------------------
def layer_report(bundle: ModelBundle, qm: QuantizedModel) -> list[dict[str, Any]]:
    """One row per linear kernel: roles, format, shape, bytes before/after (with aux), aux kinds."""

    before = dict(flatten_with_paths(bundle.params))
    aux = flat_aux(qm.variables)
    rows = []
    for path, leaf in flatten_with_paths(qm.params):
        if not path.endswith("/kernel"):
            continue
        mod = path[: -len("/kernel")]
        entries = aux.get(mod, {})
        extra = sum(leaf_nbytes(v) for v in entries.values())
        if isinstance(leaf, QArray):
            fmt = str(leaf.spec)
        elif isinstance(leaf, CodedArray):
            fmt = f"{type(leaf).__name__} ({leaf.bits_per_weight:.2f} bits)"
        else:
            fmt = f"float ({np.dtype(leaf.dtype).name})"
        kinds = sorted(entries)
        if "lowrank_a" in entries:
            kinds = [k for k in kinds if k != "lowrank_b"]
            kinds[kinds.index("lowrank_a")] = f"lowrank r={entries['lowrank_a'].shape[-1]}"
        table = qm.table is not None and mod in qm.table.scales
        rows.append(
            {
                "layer": mod,
                "roles": list(bundle.roles.get(path, ())),
                "format": fmt,
                "shape": list(leaf.shape),
                "bytes_float": leaf_nbytes(before[path]),
                "bytes": leaf_nbytes(leaf) + extra,
                "aux": kinds,
                "activations": (
                    qm.act if (table or (qm.act and isinstance(leaf, QArray) and qm.table is None)) else "-"
                ),
            }
        )
    return rows


def write_reports(out: Path, bundle: ModelBundle, qm: QuantizedModel, meta: dict[str, Any]) -> None:
    """``report.json`` and ``report.md`` (per-layer formats, bytes, timings)."""
    rows = layer_report(bundle, qm)
    summary = weight_summary(qm.variables)
    rep = {"meta": meta, "summary": summary, "layers": rows}
    (out / "report.json").write_text(json.dumps(rep, indent=2, default=json_default) + "\n")
    lines = [
        f"# jquant quantize: {qm.name}",
        "",
        f"- model: `{meta['model_dir']}` ({bundle.denoiser.name}, {bundle.denoiser.num_steps} {bundle.denoiser.sampler} steps, "
        f"guidance {bundle.denoiser.guidance_scale:g})",
        f"- recipe steps: {meta['info']['steps']}",
        f"- activations: {meta['info']['activations']}",
        f"- weight memory: {summary['weight_bytes'] / 2**20:.3f} MiB (float: {meta['float_bytes'] / 2**20:.3f} MiB); "
        f"{summary['bits_per_weight']:.2f} bits per quantized weight; {100 * summary['quantized_fraction']:.1f}% of kernel "
        "weights quantized",
        f"- calibration: {meta['calibration']}",
        f"- device: {meta['device']}",
        "",
        "| seconds | " + " | ".join(meta["info"]["seconds"]) + " |",
        "|---|" + "---:|" * len(meta["info"]["seconds"]),
        "| | " + " | ".join(f"{v:.1f}" for v in meta["info"]["seconds"].values()) + " |",
        "",
        "| layer | roles | format | shape | float bytes | bytes | aux | activations |",
        "|---|---|---|---|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {', '.join(r['roles'])} | {r['format']} | {'x'.join(map(str, r['shape']))} | "
            f"{r['bytes_float']:,} | {r['bytes']:,} | {', '.join(r['aux']) or '-'} | {r['activations']} |"
        )
    if qm.table is not None:
        lines += [
            "",
            f"Scale table: {qm.table.config.describe()}; step groups {qm.table.groups.tolist()}; "
            f"{qm.table.nbytes:,} bytes.",
        ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
