"""PTQ vs QAT vs quantization-aware distillation on the bundled tiny Wan, with the training cost.

    python scripts/qat_table.py                                   # W4A8 and W4A4 (rotated), CPU
    python scripts/qat_table.py --settings w4a8 --distill-steps 40 --qat-steps 20   # a quick look
    python scripts/qat_table.py --qlora                            # plus the QLoRA new-behaviour run

Evaluation as docs/results.md (``scripts/pipeline_results.py``): 16 clips (classes cycling
from 0, noise seed 0), 12 flow-match steps, CFG 5, metrics against the fp32 clips; calibration
on 10 samples from seed 1234. Rows per setting: the PTQ recipe, QAT (the PTQ model trained
on the flow-matching loss on fresh rendered clips) and distillation (the PTQ model trained
on the float model's predictions on its own trajectories: ``--train-samples`` samples from
seed 2000, classes cycling, every step, both CFG branches). Training cost is wall seconds on
this machine (teacher sampling included for distillation).

``--qlora``: an NF4 base with bf16-free fp32 adapters (rank 8 on the cross-attention and FFN
of every block) learns a new prompt: a fresh random text embedding that should draw the
digit ``--qlora-digit``. The bundled classifier measures the fraction of clips sampled from
the new prompt that show that digit (before and after), and the accuracy on the ten
original classes after (forgetting).

Writes ``--json`` (default benchmarks/qat_table.json) and prints the markdown table quoted
in docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant.files import atomic_file
from jquant.models import tiny_wan as tw
from jquant.pipeline import calibrate as C
from jquant.pipeline import evaluate as E
from jquant.pipeline import recipes as rc
from jquant.pipeline.denoiser import Workload, tiny_wan_bundle
from jquant.pipeline.runtime import QuantizedModel
from jquant.rules import quantize_params
from jquant.training import distill as D
from jquant.training import lora as L
from jquant.training import qat as Q
from pallas_kernels.timing import git_commit

#: key -> (label, the PTQ recipe, act_rules: per-layer activation specs of the quantized model)
SETTINGS = {
    "w4a8": ("W4A8", lambda: rc.get("w4a16-gptq").with_activations("int8", None), ()),
    "w4a4": ("W4A4 (QuaRot)", lambda: rc.get("w4a4-quarot"), ()),
    # int8 activations on the FFN and the self-attention output (benchmarks/w4a4_ablation.json)
    "w4a4-mixed": (
        "W4A4 (QuaRot), A8 FFN + attn out",
        lambda: rc.get("w4a4-quarot"),
        (("ffn/|attn1/to_out", "int8/token"),),
    ),
}


def _row(bundle, qm, ref, setting: str, method: str, cost_s: float, extra: dict | None = None) -> dict[str, Any]:
    r = E.evaluate(bundle, qm, ref)
    r.pop("videos")
    one = float(np.mean(E.one_step_errors(bundle, qm, ref)))
    row = {
        "setting": setting,
        "method": method,
        "psnr": float(r["psnr"]),
        "ssim": float(r["ssim"]),
        "flicker": float(r["flicker"]),
        "one_step": one,
        "train_s": cost_s,
        "bits_per_weight": float(r["bits_per_weight"]),
        "psnr_clips": r["psnr_clips"],
        **(extra or {}),
    }
    print(f"  {setting:<14} {method:<14} PSNR {row['psnr']:6.2f}  SSIM {row['ssim']:.3f}  1-step {one:.4f}  "
          f"train {cost_s:7.1f} s", flush=True)  # fmt: skip
    return row


def _new_prompt_accuracy(bundle, qv: dict, adapters, text: jax.Array, digit: int, n: int, seed: int) -> float:
    tiny = bundle.extra["tiny"]
    x_T = jax.random.normal(jax.random.key(seed), tiny.latent_shape(n), jnp.float32)
    work = Workload(x_T, jnp.broadcast_to(text, (n, *text.shape)), tiny.null_text(n), (digit,) * n)
    v = qv if adapters is None else L.apply_lora(qv, adapters)
    lat = QuantizedModel(v, None, None, "qlora").sample(bundle.denoiser, work)
    clips = tw.latents_to_clips(lat)
    return tw.sample_accuracy(tiny.classifier, tiny.classifier_params, clips, jnp.full((n,), digit))


def _class_accuracy(bundle, qv: dict, adapters, n: int, seed: int) -> float:
    tiny = bundle.extra["tiny"]
    work = bundle.workload(n, seed)
    v = qv if adapters is None else L.apply_lora(qv, adapters)
    lat = QuantizedModel(v, None, None, "qlora").sample(bundle.denoiser, work)
    return tw.sample_accuracy(
        tiny.classifier, tiny.classifier_params, tw.latents_to_clips(lat), jnp.asarray(work.labels)
    )


def qlora_section(bundle, a) -> dict[str, Any]:
    """NF4 base + adapters learn a new prompt drawing ``a.qlora_digit`` (classifier-measured)."""
    tiny = bundle.extra["tiny"]
    text = jnp.asarray(np.random.default_rng(99).standard_normal(tiny.class_embeddings.shape[1:]), jnp.float32)
    qv = {"params": quantize_params(bundle.params, [(r"blocks_.*kernel", "nf4/g64")])[0]}
    paths = L.select_paths(qv, r"blocks_\d+/(attn2/to_(k|v)|ffn/net_(0/proj|2))")
    ads = L.init_adapters(qv, paths, 8, jax.random.key(0))
    digit, b = a.qlora_digit, a.qlora_batch

    def batches(key):
        k1, k2, k3 = jax.random.split(key, 3)
        # half new-prompt clips of the digit, half original classes (so the rest is kept)
        labels = jax.random.randint(k1, (b,), 0, tw.NUM_CLASSES)
        new = jnp.arange(b) < b // 2
        labels = jnp.where(new, digit, labels)
        x0 = tw.clips_to_latents(tw.render_clips(k2, labels, tiny.data))
        txt = jnp.where(new[:, None, None], text[None], tiny.text(labels))
        drop = jax.random.bernoulli(k3, 0.1, (b,))
        return x0, jnp.where(drop[:, None, None], tiny.null_text(b), txt)

    before = _new_prompt_accuracy(bundle, qv, None, text, digit, a.clips, 5)
    base_cls = _class_accuracy(bundle, qv, None, a.clips, 6)
    trained, losses, secs = L.qlora_finetune(
        bundle.denoiser.module, qv, ads, batches, L.QLoRAConfig(steps=a.qlora_steps, lr=a.qlora_lr), log_every=25
    )
    after = _new_prompt_accuracy(bundle, qv, trained, text, digit, a.clips, 5)
    cls_after = _class_accuracy(bundle, qv, trained, a.clips, 6)
    out = {
        "digit": digit,
        "steps": a.qlora_steps,
        "batch": b,
        "lr": a.qlora_lr,
        "rank": 8,
        "layers": len(paths),
        "train_s": secs,
        "new_prompt_accuracy_before": before,
        "new_prompt_accuracy_after": after,
        "class_accuracy_nf4_base": base_cls,
        "class_accuracy_after": cls_after,
        "loss_first10": float(np.mean(losses[:10])),
        "loss_last10": float(np.mean(losses[-10:])),
    }
    print(f"  QLoRA: new prompt -> digit {digit}: {before:.2f} -> {after:.2f}; classes {base_cls:.2f} -> "
          f"{cls_after:.2f}; {secs:.0f} s", flush=True)  # fmt: skip
    return out


def write(path: str, res: dict[str, Any], t0: float) -> None:
    res["total_s"] = time.perf_counter() - t0
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        Path(tmp).write_text(json.dumps(res, indent=1))


def markdown(rows: list[dict]) -> str:
    lines = [
        "| setting | method | PSNR dB | SSIM | flicker | 1-step err | training s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['flicker']:.4f} | "
            f"{r['one_step']:.4f} | {r['train_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default="w4a8,w4a4")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--calib-samples", type=int, default=10)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-samples", type=int, default=16)
    p.add_argument("--distill-steps", type=int, default=100)
    p.add_argument("--qat-steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--scale-lr", type=float, default=3e-6)
    p.add_argument("--chunk", type=int, default=1, help="distillation steps per jitted call (lax.scan; 50 on a GPU)")
    p.add_argument("--distill-seconds", type=float, default=0.0, help="cap each distillation's wall time (0: none)")
    p.add_argument("--feature-weight", type=float, default=0.0, help="per-block feature matching weight")
    p.add_argument(
        "--rollout-every", type=int, default=0, help="distillation: student rollouts every N steps (0: teacher only)"
    )
    p.add_argument("--qlora", action="store_true")
    p.add_argument("--qlora-only", action="store_true")
    p.add_argument("--qlora-digit", type=int, default=7)
    p.add_argument("--qlora-steps", type=int, default=150)
    p.add_argument("--qlora-batch", type=int, default=8)
    p.add_argument("--qlora-lr", type=float, default=3e-3)
    p.add_argument("--json", default="benchmarks/qat_table.json")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    bundle = tiny_wan_bundle(num_steps=a.steps)
    d = jax.devices()[0]
    commit = git_commit()  # honours JQUANT_COMMIT (a copied checkout's git metadata can be stale)
    res: dict[str, Any] = {
        "command": "PYTHONPATH=. python scripts/qat_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": f"{d.device_kind} ({jax.default_backend()}, jax {jax.__version__}, python {platform.python_version()})",
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "settings": {k: v for k, v in vars(a).items() if k != "json"},
        "rows": [],
        "complete": False,
    }
    if not a.qlora_only:
        cal = C.Calibrator(bundle, C.CalibrationConfig(num_samples=a.calib_samples, batch=5))
        ref = E.reference(bundle, bundle.workload(a.clips, a.seed))
        works = [bundle.workload(4, 2000 + j, 4 * j) for j in range(max(1, a.train_samples // 4))]
        data = D.teacher_data(bundle, works)
        print(f"teacher data: {data.xs.shape} in {data.seconds:.0f} s", flush=True)
        res["teacher_s"] = data.seconds
        cfg = D.DistillConfig(
            steps=a.distill_steps,
            batch=a.batch,
            lr=a.lr,
            scale_lr=a.scale_lr,
            feature_weight=a.feature_weight,
            chunk=a.chunk,
            max_seconds=a.distill_seconds,
            rollout_every=a.rollout_every,
        )
        for key in a.settings.split(","):
            label, make, act_rules = SETTINGS[key]
            ptq = dataclasses.replace(C.quantize(bundle, make(), cal), act_rules=act_rules)
            res["rows"].append(_row(bundle, ptq, ref, label, "PTQ", 0.0, {"quantize_s": ptq.info["seconds"]["total"]}))
            write(a.json, res, t0)
            if a.qat_steps:
                q = Q.qat(bundle, ptq, dataclasses.replace(cfg, steps=a.qat_steps), log_every=25)
                res["rows"].append(_row(bundle, q.model, ref, label, "QAT", q.seconds, {"steps": a.qat_steps}))
                write(a.json, res, t0)
            if a.distill_steps:
                dz = D.distill(bundle, ptq, data, cfg, log_every=max(25, a.chunk))
                extra = {
                    "steps": dz.model.info["distill"]["steps_run"],
                    "rollouts": dz.model.info["distill"]["rollouts"],
                    "rollout_s": dz.model.info["distill"]["rollout_seconds"],
                    "stopped_by_budget": dz.model.info["distill"]["stopped_by_budget"],
                    "teacher_s": data.seconds,
                    "loss_before": D.mean_loss(bundle, ptq, data),
                    "loss_after": D.mean_loss(bundle, dz.model, data),
                }
                res["rows"].append(_row(bundle, dz.model, ref, label, "distillation", dz.seconds + data.seconds, extra))
                write(a.json, res, t0)
    if a.qlora_only and Path(a.json).exists():  # add the QLoRA run to an existing table
        saved = json.loads(Path(a.json).read_text())
        res = {**saved, "command": f"{saved['command']}; then {res['command']}"}
        t0 -= saved.get("total_s", 0.0)
    if a.qlora or a.qlora_only:
        res["qlora"] = qlora_section(bundle, a)
    res["complete"] = True
    write(a.json, res, t0)
    print(markdown(res["rows"]))
    print(f"wrote {a.json} ({res['total_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
