"""Train the bundled tiny Wan video model (moving digits, rectified flow) and its digit classifier.

    python scripts/train_tiny.py --out jquant/models/assets/tiny_wan --steps 6000
    python scripts/train_tiny.py --out /tmp/tiny --quick        # CPU smoke test

Everything is derived from `--seed`: the class embeddings, the initial weights, every training
batch (drawn on the device by `models.tiny_wan.render_clips`), label dropout, the classifier and
the evaluation noise. `--max-seconds` caps the wall time: after two timed chunks inside the
learning-rate warmup the script fixes the total number of steps that fits, and records it;
rerunning with `--steps <that number> --max-seconds 0` follows the same schedule.

Training (rectified flow, the convention of `jquant.sampling.sample_flow_euler`):
x_sigma = (1 - sigma) x_0 + sigma * noise with sigma ~ logit-normal(0, 1), target
v = noise - x_0, timestep sigma * 1000, MSE loss; label dropout (null embedding = zeros) for
classifier-free guidance; AdamW with linear warmup then cosine decay, global-norm clipping, and an
EMA of the weights (the EMA weights are what is saved).

Recognisability: the classifier (trained here on real clips) names the digit of clips sampled
from the EMA model (full precision, CFG, flow-match Euler); the sample accuracy is the fraction
whose predicted digit equals the class they were conditioned on, over `--eval-per-class` clips
of each of the 10 classes.

Run from the repository root: ``python scripts/train_tiny.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/train_tiny.py`` where jquant is not installed (e.g. the GPU machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from jquant import models
from jquant.models import tiny_wan as tw
from jquant.models.wan import WanConfig, WanTransformer3D
from jquant.sampling import sample_flow_euler
from jquant.training.budget import steps_that_fit

TEXT_TOKENS = 4
CHUNK = 50  # optimizer steps per jitted call
WARMUP = 200  # must exceed the two timing chunks so --max-seconds does not change early steps


def model_config(quick: bool) -> WanConfig:
    """The shipped architecture (quick: a 1-layer toy for CPU smoke tests)."""
    if quick:
        return WanConfig(
            patch_size=(1, 4, 4),
            num_attention_heads=1,
            attention_head_dim=32,
            in_channels=1,
            out_channels=1,
            text_dim=16,
            freq_dim=32,
            ffn_dim=64,
            num_layers=1,
        )
    return WanConfig(
        patch_size=(1, 4, 4),
        num_attention_heads=2,
        attention_head_dim=64,
        in_channels=1,
        out_channels=1,
        text_dim=64,
        freq_dim=256,
        ffn_dim=512,
        num_layers=6,
    )


def lr_at(step: jax.Array, total: jax.Array, peak: float) -> jax.Array:
    """Linear warmup over WARMUP steps, then cosine decay to 10% of `peak` at `total`."""
    step = step.astype(jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1) / WARMUP)
    frac = jnp.clip((step - WARMUP) / jnp.maximum(total - WARMUP, 1), 0.0, 1.0)
    return jnp.where(step < WARMUP, warm, peak * (0.1 + 0.9 * 0.5 * (1 + jnp.cos(jnp.pi * frac))))


def flow_loss(
    model: WanTransformer3D,
    params: Any,
    key: jax.Array,
    labels: jax.Array,
    class_emb: jax.Array,
    data: tw.DataConfig,
    drop_prob: float,
) -> jax.Array:
    """Rectified-flow MSE on a fresh batch of clips of `labels`."""
    k_clip, k_sigma, k_noise, k_drop = jax.random.split(key, 4)
    x0 = tw.clips_to_latents(tw.render_clips(k_clip, labels, data))
    drop = jax.random.bernoulli(k_drop, drop_prob, (x0.shape[0],))
    text = jnp.where(drop[:, None, None], 0.0, class_emb[labels])
    return flow_mse(lambda xt, t: model.apply({"params": params}, xt, t, text), x0, k_sigma, k_noise)


def normal(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """``jax.random.normal(key, shape)``, bit for bit, drawn flat and reshaped (threefry's counter
    is each element's flat index): XLA:CPU compiles a 5-D threefry draw about 20x slower than a
    flat one (6.6 s against 0.3 s for a batch of clips). For draws made on their own; inside a
    larger jitted program the reshape can change XLA's fusion, and with it the rounding of what
    the noise feeds (fused multiply-adds), so the training steps keep their 5-D draws."""
    return jax.random.normal(key, (math.prod(shape),)).reshape(tuple(shape))


def flow_mse(velocity: Any, x0: jax.Array, k_sigma: jax.Array, k_noise: jax.Array) -> jax.Array:
    """Rectified-flow MSE of `velocity(x_sigma, sigma * 1000)` against v = noise - x0, with
    sigma ~ logit-normal(0, 1) per sample (shared with scripts/train_outlier_model.py)."""
    b = x0.shape[0]
    sigma = jax.nn.sigmoid(jax.random.normal(k_sigma, (b,)))
    noise = jax.random.normal(k_noise, x0.shape)
    s = sigma.reshape((b,) + (1,) * (x0.ndim - 1))
    xt = (1 - s) * x0 + s * noise
    v = velocity(xt, sigma * 1000.0).astype(jnp.float32)
    return jnp.mean((v - (noise - x0)) ** 2)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    model: WanTransformer3D
    data: tw.DataConfig
    batch: int
    peak_lr: float
    drop_prob: float
    ema_decay: float


def _adamw(learning_rate: float) -> optax.GradientTransformation:
    """AdamW after global-norm clipping; the learning rate is injected (set every step)."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, b1=0.9, b2=0.99, weight_decay=0.01))


def make_train_chunk(setup: TrainSetup, tx: optax.GradientTransformation):
    """Jitted CHUNK optimizer steps (lax.scan); returns the new state and the chunk's losses."""

    def step_fn(carry, step):
        params, ema, opt_state, key, class_emb, total = carry
        k = jax.random.fold_in(key, step)
        k_lab, k_loss = jax.random.split(k)
        labels = jax.random.randint(k_lab, (setup.batch,), 0, tw.NUM_CLASSES)
        loss, grads = jax.value_and_grad(
            lambda p: flow_loss(setup.model, p, k_loss, labels, class_emb, setup.data, setup.drop_prob)
        )(params)
        opt_state.hyperparams["learning_rate"] = lr_at(step, total, setup.peak_lr)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        d = jnp.minimum(setup.ema_decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, ema, params)
        return (params, ema, opt_state, key, class_emb, total), loss

    @jax.jit
    def chunk(params, ema, opt_state, key, class_emb, total, start):
        steps = start + jnp.arange(CHUNK, dtype=jnp.int32)
        (params, ema, opt_state, *_), losses = jax.lax.scan(
            step_fn, (params, ema, opt_state, key, class_emb, total), steps
        )
        return params, ema, opt_state, losses

    return chunk


def train_flow(
    args: argparse.Namespace, cfg: WanConfig, data: tw.DataConfig, class_emb: jax.Array, key: jax.Array, dtype: Any
) -> dict[str, Any]:
    """Train the transformer; returns EMA params, losses and the schedule actually run."""
    k_init, k_data = jax.random.split(key)
    params = models.init_params(cfg, k_init)
    setup = TrainSetup(WanTransformer3D(cfg, dtype=dtype), data, args.batch, args.lr, args.label_dropout, 0.999)
    tx = optax.inject_hyperparams(_adamw)(learning_rate=args.lr)
    opt_state = jax.jit(tx.init)(params)  # one program, not one per op and parameter shape
    ema = params
    chunk = make_train_chunk(setup, tx)
    total = max(CHUNK, args.steps // CHUNK * CHUNK)
    losses: list[float] = []
    t0 = time.perf_counter()
    done = 0
    chunk_times: list[float] = []
    while done < total:
        tc = time.perf_counter()
        params, ema, opt_state, chunk_losses = chunk(
            params, ema, opt_state, k_data, class_emb, jnp.float32(total), jnp.int32(done)
        )
        chunk_losses = np.asarray(chunk_losses)
        chunk_times.append(time.perf_counter() - tc)
        losses.extend(chunk_losses.tolist())
        done += CHUNK
        if not np.all(np.isfinite(chunk_losses)):
            raise FloatingPointError(f"training loss became non-finite at step {done} (lr={args.lr})")
        if args.max_seconds > 0 and done == 2 * CHUNK:
            per_step = chunk_times[-1] / CHUNK  # second chunk: compiled
            total = steps_that_fit(done, total, per_step, args.max_seconds - (time.perf_counter() - t0), CHUNK)
            print(f"  {per_step * 1e3:.2f} ms/step -> {total} steps fit in --max-seconds {args.max_seconds:g}")
        if done % (CHUNK * 10) == 0 or done == total:
            print(f"  step {done:>6}/{total}  loss {np.mean(chunk_losses):.4f}  ({time.perf_counter() - t0:.0f} s)")
    wall = time.perf_counter() - t0
    tail = max(1, len(losses) // 10)
    return {
        "ema": ema,
        "steps": total,
        "wall_s": wall,
        "ms_per_step": 1e3 * float(np.median(chunk_times[1:] if len(chunk_times) > 1 else chunk_times)) / CHUNK,
        "final_loss": float(np.mean(losses[-tail:])),
        "final_loss_window": tail,
        "first_loss": float(np.mean(losses[:CHUNK])),
        "loss_curve": [round(float(np.mean(losses[i : i + CHUNK * 10])), 5) for i in range(0, len(losses), CHUNK * 10)],
    }


def eval_loss(
    cfg: WanConfig, params: Any, class_emb: jax.Array, data: tw.DataConfig, key: jax.Array, n: int, repeats: int
) -> float:
    """Flow-matching loss (fp32, no label dropout) of `params`: mean over `repeats` batches of n
    fresh clips (fixed key)."""
    model = WanTransformer3D(cfg)
    labels = jnp.arange(n) % tw.NUM_CLASSES
    fn = jax.jit(lambda p, k: flow_loss(model, p, k, labels, class_emb, data, 0.0))
    return float(np.mean([float(fn(params, jax.random.fold_in(key, i))) for i in range(repeats)]))


def train_classifier(args: argparse.Namespace, data: tw.DataConfig, key: jax.Array) -> tuple[Any, Any, float]:
    """A small CNN on real clips (augmented with Gaussian pixel noise of random strength);
    returns (config, params, accuracy on 1000 held-out real clips, 20 with --quick)."""
    ccfg = tw.ClassifierConfig()
    clf = tw.DigitClassifier(ccfg)
    k_init, k_train, k_val = jax.random.split(key, 3)
    params = tw.init_classifier(ccfg, k_init, data)
    steps = args.classifier_steps
    tx = optax.adamw(optax.cosine_decay_schedule(2e-3, max(steps, 1), 0.05), weight_decay=1e-4)
    opt_state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, opt_state, i):
        k = jax.random.fold_in(k_train, i)
        k_lab, k_clip, k_amp, k_noise = jax.random.split(k, 4)
        labels = jax.random.randint(k_lab, (args.classifier_batch,), 0, tw.NUM_CLASSES)
        clips = tw.render_clips(k_clip, labels, data)
        amp = jax.random.uniform(k_amp, (args.classifier_batch, 1, 1, 1), maxval=0.15)
        clips = jnp.clip(clips + amp * jax.random.normal(k_noise, clips.shape), 0.0, 1.0)

        def loss_fn(p):
            logits = clf.apply({"params": p}, clips)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    loss = jnp.nan
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, i)
    val_labels = jnp.arange(20 if args.quick else 1000) % tw.NUM_CLASSES
    val = tw.render_clips(k_val, val_labels, data)
    acc = tw.sample_accuracy(clf, params, val, val_labels)
    print(f"  classifier: {steps} steps, last loss {float(loss):.4f}, held-out real-clip accuracy {acc:.4f}")
    return ccfg, params, acc


def _velocity(
    model: WanTransformer3D, params: Any, x: jax.Array, t: jax.Array, cond: jax.Array, _step: Any
) -> jax.Array:
    return tw.velocity(model, params, x, t, cond)


def evaluate_samples(
    cfg: WanConfig,
    params: Any,
    class_emb: jax.Array,
    clf: Any,
    clf_params: Any,
    data: tw.DataConfig,
    key: jax.Array,
    per_class: int,
    num_steps: int,
    shift: float,
    guidances: Sequence[float],
) -> dict[str, Any]:
    """Sample accuracy (and per-class accuracy) of the fp32 model at each guidance scale."""
    model = WanTransformer3D(cfg)
    labels = jnp.repeat(jnp.arange(tw.NUM_CLASSES), per_class)
    x_T = normal(key, (labels.shape[0], 1, data.frames, data.size, data.size))
    text = class_emb[labels]
    fn = Partial(functools.partial(_velocity, model), params)
    out: dict[str, Any] = {}
    for g in guidances:
        lat = sample_flow_euler(
            fn, x_T, text, num_steps=num_steps, shift=shift, guidance_scale=g, uncond=jnp.zeros_like(text)
        )
        clips = tw.latents_to_clips(lat)
        pred = np.asarray(tw.classify(clf, clf_params, clips))
        per = [float(np.mean(pred[np.asarray(labels) == c] == c)) for c in range(tw.NUM_CLASSES)]
        out[f"{g:g}"] = {"accuracy": float(np.mean(pred == np.asarray(labels))), "per_class": per}
        print(f"  guidance {g:g}: sample accuracy {out[f'{g:g}']['accuracy']:.4f}")
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(tw.ASSET_DIR), help="output directory (diffusers layout + extras)")
    p.add_argument("--report", default=None, help="also write the training report JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps (multiple of 50)")
    p.add_argument("--max-seconds", type=float, default=0.0, help="cap training wall time (0: no cap)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="compute dtype of training (params and saved weights stay float32); auto: bf16 on GPU",
    )
    p.add_argument("--classifier-steps", type=int, default=1500)
    p.add_argument("--classifier-batch", type=int, default=128)
    p.add_argument("--eval-per-class", type=int, default=20)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--shift", type=float, default=1.0, help="flow-match schedule shift for sampling")
    p.add_argument(
        "--guidance",
        type=float,
        nargs="+",
        default=[3.0, 1.0, 5.0],
        help="CFG scales to evaluate; the most accurate (first on ties) becomes the default",
    )
    p.add_argument("--quick", action="store_true", help="tiny config and a few steps (CPU smoke test)")
    p.add_argument("--eval-loss-clips", type=int, default=1024, help="clips for the EMA eval loss (4 batches)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--quick" in argv:  # quick changes the defaults; explicit flags still win
        p.set_defaults(
            steps=CHUNK,
            batch=4,
            classifier_steps=3,
            classifier_batch=8,
            eval_per_class=1,
            eval_steps=2,
            guidance=[3.0],
            eval_loss_clips=16,
        )
    a = p.parse_args(argv)
    if a.steps < CHUNK:
        p.error(f"--steps must be >= {CHUNK}")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = model_config(args.quick)
    data = tw.DataConfig()
    backend = jax.default_backend()
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(
        args.dtype, jnp.bfloat16 if backend == "gpu" else jnp.float32
    )
    root = jax.random.key(args.seed)
    k_flow, k_clf, k_eval, k_loss = jax.random.split(root, 4)
    class_emb = jnp.asarray(tw.class_embeddings(tw.NUM_CLASSES, TEXT_TOKENS, cfg.text_dim, args.seed))
    t_start = time.perf_counter()
    n_params = models.param_count(models.param_shapes(cfg))
    print(f"tiny_wan: {n_params:,} params, {jax.devices()[0].device_kind} ({backend}), compute {jnp.dtype(dtype).name}")

    print("training the flow model")
    run = train_flow(args, cfg, data, class_emb, k_flow, dtype)
    ema = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), run["ema"])
    ev_loss = eval_loss(cfg, ema, class_emb, data, k_loss, max(1, args.eval_loss_clips // 4), 4)
    print(
        f"  final training loss {run['final_loss']:.4f} (mean of last {run['final_loss_window']} steps), "
        f"EMA eval loss {ev_loss:.4f}"
    )

    print("training the classifier")
    ccfg, clf_params, clf_acc = train_classifier(args, data, k_clf)
    clf = tw.DigitClassifier(ccfg)

    print(f"sampling {args.eval_per_class} clips per class ({args.eval_steps} Euler steps, shift {args.shift:g})")
    evals = evaluate_samples(
        cfg,
        ema,
        class_emb,
        clf,
        clf_params,
        data,
        k_eval,
        args.eval_per_class,
        args.eval_steps,
        args.shift,
        args.guidance,
    )
    best = max(args.guidance, key=lambda g: (evals[f"{g:g}"]["accuracy"], -args.guidance.index(g)))

    out = Path(args.out)
    models.save_pretrained(out, cfg, jax.tree_util.tree_map(np.asarray, ema), overwrite=True)
    tw.save_conditioning(out, np.asarray(class_emb))
    tw.save_classifier(out, ccfg, jax.tree_util.tree_map(np.asarray, clf_params))
    command = (
        "PYTHONPATH=. python3 scripts/train_tiny.py "
        + ("--quick " if args.quick else "")
        + f"--seed {args.seed} --steps {run['steps']} --batch {args.batch} --lr {args.lr:g} "
        f"--dtype {jnp.dtype(dtype).name} --classifier-steps {args.classifier_steps} "
        f"--classifier-batch {args.classifier_batch} "
        f"--eval-per-class {args.eval_per_class} --eval-steps {args.eval_steps} --shift {args.shift:g} "
        f"--guidance {' '.join(f'{g:g}' for g in args.guidance)}"
    )
    report = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{jax.devices()[0].device_kind} ({backend})",
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
        },
        "seed": args.seed,
        "quick": args.quick,
        "model_config": cfg.to_diffusers(),
        "params": n_params,
        "text_tokens": TEXT_TOKENS,
        "training": {
            "steps": run["steps"],
            "batch": args.batch,
            "peak_lr": args.lr,
            "warmup": WARMUP,
            "schedule": "linear warmup then cosine to 10%",
            "optimizer": "AdamW(b1=0.9, b2=0.99, wd=0.01), clip 1.0",
            "ema_decay": 0.999,
            "label_dropout": args.label_dropout,
            "compute_dtype": jnp.dtype(dtype).name,
            "sigma_sampling": "logit-normal(0, 1)",
            "wall_s": round(run["wall_s"], 1),
            "ms_per_step": round(run["ms_per_step"], 3),
            "first_loss": run["first_loss"],
            "final_loss": run["final_loss"],
            "final_loss_window_steps": run["final_loss_window"],
            "eval_loss_ema_fp32": ev_loss,
            "loss_curve_every_500_steps": run["loss_curve"],
        },
        "classifier": {
            "config": dataclasses.asdict(ccfg),
            "steps": args.classifier_steps,
            "real_clip_accuracy": clf_acc,
        },
        "sample_accuracy": {
            "definition": "fraction of sampled clips (fp32 EMA model, CFG, flow-match Euler) whose "
            "classifier prediction equals the class they were conditioned on",
            "per_class": args.eval_per_class,
            "num_steps": args.eval_steps,
            "shift": args.shift,
            "by_guidance": evals,
            "default_guidance": best,
            "accuracy": evals[f"{best:g}"]["accuracy"],
        },
        "total_wall_s": round(time.perf_counter() - t_start, 1),
    }
    meta = {
        "data": dataclasses.asdict(data),
        "num_classes": tw.NUM_CLASSES,
        "text_tokens": TEXT_TOKENS,
        "sampling": {"num_steps": args.eval_steps, "shift": args.shift, "guidance_scale": best},
        "training": {k: report[k] for k in ("command", "date", "device", "seed", "params")}
        | {
            "final_loss": run["final_loss"],
            "eval_loss": ev_loss,
            "sample_accuracy": evals[f"{best:g}"]["accuracy"],
            "classifier_real_accuracy": clf_acc,
        },
    }
    (out / tw.META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(
        f"wrote {out} ({size / 1e6:.2f} MB); sample accuracy {report['sample_accuracy']['accuracy']:.4f} "
        f"at guidance {best:g}; total {report['total_wall_s']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
