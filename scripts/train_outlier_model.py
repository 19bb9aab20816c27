"""Train the second bundled model (issue 25): a Wan transformer conditioned through a small UMT5
encoder on template captions of moving shapes, reporting activation outliers while it trains.

    PYTHONPATH=. python scripts/train_outlier_model.py --out /tmp/shapes_model --steps 20000 --max-seconds 1500
    python scripts/train_outlier_model.py --out /tmp/shapes_quick --quick        # CPU smoke test

Data: `jquant.models.shapes_data` renders RGB clips (9 frames of 32x32) of a shape, colour,
motion and direction drawn from the key, captioned "a red circle moves left"; the model works on
raw pixels (no VAE, patch 1x4x4). The UMT5 encoder (learned from scratch, jointly) reads the
caption's tokens; as in `WanPipeline`, its states past the caption's length are zero, and the
unconditional branch is the empty caption (caption dropout `--caption-dropout` for CFG).

Training: the rectified-flow loss of scripts/train_tiny.py (`flow_mse`), its AdamW with warmup
and cosine decay (`lr_at`, `_adamw`), an EMA of the weights (the EMA weights are saved, in bf16),
chunks of jitted steps (`lax.scan`), `--max-seconds` as train_tiny (after two timed chunks the
total number of steps that fits is fixed and recorded). Everything derives from `--seed`.

Every `--report-every` steps (and at step 0) the EMA model runs on a fixed calibration batch (the
same clips, noise and captions every time; `--calib-clips` clips at sigma 0.2, 0.5, 0.8, each
with its caption and with the empty caption) and one JSON line is appended to
`<out>/training_log.jsonl`: step, mean training loss since the last report, learning rate, and
for the transformer and the text encoder: per layer role the median and largest channel-absmax
ratio and the median kurtosis of the linear layers' inputs (`jquant.metrics.outliers`), the
top-channel overlap across the six calibration groups, and the residual stream's massive
activations (each block output's largest |value| over its median |value|).

Run from the repository root: ``python scripts/train_outlier_model.py`` after ``pip install -e .``,
or ``PYTHONPATH=. python scripts/train_outlier_model.py`` where jquant is not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jquant import calib, models
from jquant.metrics import outliers as orep
from jquant.models import shapes_data as sd
from jquant.models import shapes_model as sm
from jquant.models import t5
from jquant.models.roles import assign_roles
from jquant.models.wan import WanBlock, WanConfig, WanTransformer3D
from jquant.training.budget import steps_that_fit
from pallas_kernels.timing import git_commit

_spec = importlib.util.spec_from_file_location("train_tiny", Path(__file__).resolve().parent / "train_tiny.py")
train_tiny = sys.modules.setdefault("train_tiny", importlib.util.module_from_spec(_spec))  # its dataclasses look it up
if not hasattr(train_tiny, "flow_mse"):  # flow_mse, normal, lr_at, _adamw, WARMUP, CHUNK
    _spec.loader.exec_module(train_tiny)

TEXT_LEN = 8  # 5 words + eos, padded
SIGMAS = (0.2, 0.5, 0.8)  # calibration timesteps (sigma; the model's timestep is sigma * 1000)
EMA_DECAY = 0.999
WEIGHT_DTYPE = jnp.bfloat16  # of the saved weights


def text_config(quick: bool) -> t5.T5EncoderConfig:
    """The UMT5 encoder (quick: a 1-layer toy)."""
    vocab = len(sd.vocabulary())
    if quick:
        return t5.T5EncoderConfig(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    return t5.T5EncoderConfig(vocab_size=vocab, d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4)


def transformer_config(quick: bool, text_dim: int) -> WanConfig:
    """The Wan transformer on raw RGB pixels, patch 1x4x4 (quick: a 1-layer toy)."""
    common = dict(patch_size=(1, 4, 4), in_channels=3, out_channels=3, text_dim=text_dim)
    if quick:
        return WanConfig(**common, num_attention_heads=1, attention_head_dim=32, freq_dim=32, ffn_dim=64, num_layers=1)
    return WanConfig(**common, num_attention_heads=4, attention_head_dim=64, freq_dim=256, ffn_dim=1024, num_layers=8)


def data_config(quick: bool) -> sd.DataConfig:
    """9 frames of 32x32 (quick: 5 frames of 16x16)."""
    return sd.DataConfig(frames=5, size=16) if quick else sd.DataConfig()


@dataclasses.dataclass(frozen=True)
class Setup:
    """The modules and the per-step settings of a run (hashable: closed over by the jitted step)."""

    encoder: t5.T5Encoder
    transformer: WanTransformer3D
    data: sd.DataConfig
    batch: int
    peak_lr: float
    caption_dropout: float


def flow_loss(setup: Setup, params: Any, key: jax.Array) -> jax.Array:
    """Rectified-flow MSE on a fresh batch of captioned clips (captions dropped to the empty one
    with probability `caption_dropout`)."""
    k_attr, k_clip, k_sigma, k_noise, k_drop = jax.random.split(key, 5)
    attrs = sd.sample_attributes(k_attr, setup.batch)
    x0 = sd.clips_to_latents(sd.render_clips(k_clip, attrs, setup.data))
    ids, mask = sd.caption_tokens(attrs, TEXT_LEN)
    null_ids, null_mask = sd.null_tokens(setup.batch, TEXT_LEN)
    drop = jax.random.bernoulli(k_drop, setup.caption_dropout, (setup.batch, 1))
    ids, mask = jnp.where(drop, null_ids, ids), jnp.where(drop, null_mask, mask)
    text = sm.encode_text(setup.encoder, params["text_encoder"], ids, mask)
    tr = params["transformer"]
    return train_tiny.flow_mse(lambda xt, t: setup.transformer.apply({"params": tr}, xt, t, text), x0, k_sigma, k_noise)


@functools.lru_cache(maxsize=None)
def make_train_chunk(setup: Setup, chunk: int) -> tuple[optax.GradientTransformation, Callable]:
    """The optimizer and jitted `chunk` optimizer steps (lax.scan): (params, ema, opt_state, key,
    total, start) -> (params, ema, opt_state, losses [chunk]); step i's randomness is
    fold_in(key, i). Cached per setup, so a second run in one process reuses the compiled steps."""
    tx = optax.inject_hyperparams(train_tiny._adamw)(learning_rate=setup.peak_lr)

    def step_fn(carry, step):
        params, ema, opt_state, key, total = carry
        loss, grads = jax.value_and_grad(lambda p: flow_loss(setup, p, jax.random.fold_in(key, step)))(params)
        opt_state.hyperparams["learning_rate"] = train_tiny.lr_at(step, total, setup.peak_lr)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        d = jnp.minimum(EMA_DECAY, (1.0 + step) / (10.0 + step))
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, ema, params)
        return (params, ema, opt_state, key, total), loss

    @jax.jit
    def run(params, ema, opt_state, key, total, start):
        steps = start + jnp.arange(chunk, dtype=jnp.int32)
        (params, ema, opt_state, *_), losses = jax.lax.scan(step_fn, (params, ema, opt_state, key, total), steps)
        return params, ema, opt_state, losses

    return tx, run


# --- the outlier report ------------------------------------------------------------------------
def _is_block(module: flax.linen.Module, method: str) -> bool:
    return method == "__call__" and isinstance(module, (WanBlock, t5.T5Block))


def residual_stats(apply_fn: Callable, params: Any, inputs: Sequence[Any]) -> dict[str, dict[str, jax.Array]]:
    """Massive activations: per block, the largest |value| of its output over all tokens and
    channels, the median |value|, and the channel holding the largest."""
    _, state = apply_fn(params, *inputs, capture_intermediates=_is_block, mutable=["intermediates"])
    out = {}
    for name, entry in state["intermediates"].items():
        x = entry["__call__"][0]
        x = x[0] if isinstance(x, tuple) else x  # T5Block returns (states, position_bias)
        a = jnp.abs(x.astype(jnp.float32))
        per_channel = jnp.max(a.reshape(-1, a.shape[-1]), axis=0)
        out[name] = {"max_abs": jnp.max(a), "median_abs": jnp.median(a), "channel": jnp.argmax(per_channel)}
    return out


CALIB = calib.CalibConfig(hessian=False, histogram=False)


@functools.lru_cache(maxsize=None)
def report_fns(setup: Setup) -> dict[str, Any]:
    """The report's jitted pieces for one setup (cached: compiled once per process)."""
    enc, tr = setup.encoder, setup.transformer
    te_apply = lambda p, b: enc.apply({"params": p}, b["ids"], b["mask"])  # noqa: E731
    tr_apply = lambda p, b: tr.apply({"params": p}, b["x"], b["t"], b["text"])  # noqa: E731
    return {
        "te_apply": te_apply,
        "tr_apply": tr_apply,
        "te_step": calib.make_step(te_apply, CALIB),
        "tr_step": calib.make_step(tr_apply, CALIB),
        "text": jax.jit(lambda p, ids, mask: sm.encode_text(enc, p, ids, mask)),
        "te_res": jax.jit(lambda p, ids, mask: residual_stats(enc.apply, {"params": p}, (ids, mask))),
        "tr_res": jax.jit(lambda p, x, t, c: residual_stats(tr.apply, {"params": p}, (x, t, c))),
        "templates": {},  # zero statistics per model (shapes depend on the setup only)
    }


@dataclasses.dataclass
class Reporter:
    """The outlier statistics of a params tree on one fixed calibration workload; the jitted
    statistics steps are built once and reused at every report."""

    setup: Setup
    tr_config: WanConfig
    x0: jax.Array
    noise: jax.Array
    tokens: tuple[jax.Array, jax.Array]
    null: tuple[jax.Array, jax.Array]

    def __post_init__(self) -> None:
        fns = report_fns(self.setup)
        self._te_apply, self._tr_apply = fns["te_apply"], fns["tr_apply"]
        self._te_step, self._tr_step = fns["te_step"], fns["tr_step"]
        self._text, self._te_res, self._tr_res = fns["text"], fns["te_res"], fns["tr_res"]
        self._templates: dict[str, Any] = fns["templates"]

    def _stats(self, name: str, step: Callable, apply_fn: Callable, params: Any, batch: dict) -> calib.Stats:
        if name not in self._templates:
            self._templates[name] = calib.init(apply_fn, params, batch, CALIB)
        return step(jax.tree_util.tree_map(jnp.zeros_like, self._templates[name]), params, batch)

    def _batches(self, params: Any) -> dict[tuple[float, str], dict[str, jax.Array]]:
        te = params["text_encoder"]
        texts = {"cond": self._text(te, *self.tokens), "uncond": self._text(te, *self.null)}
        out = {}
        for s in SIGMAS:
            x = (1 - s) * self.x0 + s * self.noise
            t = jnp.full((self.x0.shape[0],), s * 1000.0, jnp.float32)
            for branch, text in texts.items():
                out[(s, branch)] = {"x": x, "t": t, "text": text}
        return out

    def __call__(self, params: Any) -> dict[str, Any]:
        """``{"transformer": ..., "text_encoder": ...}``, each: per-role rows
        (:func:`jquant.metrics.outliers.summarize`), the overall median/largest ratio, the
        median top-channel overlap across groups and the residual-stream statistics."""
        te, tr = params["text_encoder"], params["transformer"]
        by_group = {
            k: self._stats("transformer", self._tr_step, self._tr_apply, tr, b)
            for k, b in self._batches(params).items()
        }
        tr_rep = _summary(by_group, models.layer_roles(self.tr_config, tr))
        x_mid = (1 - SIGMAS[1]) * self.x0 + SIGMAS[1] * self.noise
        t_mid = jnp.full((self.x0.shape[0],), SIGMAS[1] * 1000.0, jnp.float32)
        tr_rep["residual"] = _residual_rows(self._tr_res(tr, x_mid, t_mid, self._text(te, *self.tokens)))
        te_groups = {
            branch: self._stats("text_encoder", self._te_step, self._te_apply, te, {"ids": ids, "mask": mask})
            for branch, (ids, mask) in (("cond", self.tokens), ("uncond", self.null))
        }
        te_rep = _summary(te_groups, assign_roles(te, t5.ROLE_RULES))
        te_rep["residual"] = _residual_rows(self._te_res(te, *self.tokens))
        return {"transformer": tr_rep, "text_encoder": te_rep}


def _summary(by_group: dict[Any, calib.Stats], roles: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """Role rows, overall median/max ratio and top-channel overlap of grouped layer statistics."""
    reports = orep.from_stats(calib.merge(*by_group.values()))
    overlap = [orep.top_overlap({k: np.asarray(s[p].absmax) for k, s in by_group.items()}) for p in reports]
    ratios = np.array([r.ratio for r in reports.values()])
    worst = max(reports, key=lambda p: reports[p].ratio)
    return {
        "layers": len(reports),
        "median_ratio": float(np.median(ratios)),
        "max_ratio": float(ratios.max()),
        "worst_layer": worst,
        "worst_top_channels": [c for c, _ in reports[worst].top],
        "median_top_overlap": float(np.median(overlap)),
        "roles": orep.summarize(reports, roles),
    }


def _residual_rows(stats: dict[str, dict[str, jax.Array]]) -> dict[str, Any]:
    """:func:`residual_stats` as JSON rows in block order, with ratio = max / median |value|."""
    blocks = []
    for name in sorted(stats, key=lambda n: int(n.rsplit("_", 1)[1])):  # blocks_<i> (Wan), block_<i> (T5)
        mx, med = float(stats[name]["max_abs"]), float(stats[name]["median_abs"])
        ratio = mx / med if med > 0 else math.inf
        blocks.append(
            {"block": name, "max_abs": mx, "median_abs": med, "ratio": ratio, "channel": int(stats[name]["channel"])}
        )
    return {"max_ratio": max(b["ratio"] for b in blocks), "blocks": blocks}


def make_reporter(setup: Setup, tr_config: WanConfig, key: jax.Array, clips: int) -> Reporter:
    """The fixed calibration workload (clips, noise and captions from `key`)."""
    k_attr, k_clip, k_noise = jax.random.split(key, 3)
    attrs = sd.sample_attributes(k_attr, clips)
    x0 = sd.clips_to_latents(sd.render_clips(k_clip, attrs, setup.data))
    return Reporter(
        setup,
        tr_config,
        x0,
        train_tiny.normal(k_noise, x0.shape),
        sd.caption_tokens(attrs, TEXT_LEN),
        sd.null_tokens(clips, TEXT_LEN),
    )


def one_line(step: int, loss: float, rep: dict[str, Any]) -> str:
    tr, te = rep["transformer"], rep["text_encoder"]
    return (
        f"  step {step:>6}  loss {loss:.4f}  transformer ratio med {tr['median_ratio']:.1f} max {tr['max_ratio']:.1f} "
        f"residual {tr['residual']['max_ratio']:.1f} | text encoder ratio med {te['median_ratio']:.1f} "
        f"max {te['max_ratio']:.1f} residual {te['residual']['max_ratio']:.1f}"
    )


# --- training ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _init_fn(te_cfg: t5.T5EncoderConfig, tr_cfg: WanConfig) -> Callable[[jax.Array], dict[str, Any]]:
    def init(key: jax.Array) -> dict[str, Any]:
        k_te, k_tr = jax.random.split(key)
        ids = jnp.zeros((1, TEXT_LEN), jnp.int32)
        te = t5.T5Encoder(te_cfg).init(k_te, ids, jnp.ones_like(ids))["params"]
        return {"text_encoder": te, "transformer": models.init_params(tr_cfg, k_tr)}

    return jax.jit(init)


def init_params(te_cfg: t5.T5EncoderConfig, tr_cfg: WanConfig, key: jax.Array) -> dict[str, Any]:
    """Random float32 params {"text_encoder": ..., "transformer": ...}."""
    return _init_fn(te_cfg, tr_cfg)(key)


def train(args: argparse.Namespace, setup: Setup, tr_cfg: WanConfig, key: jax.Array, log: Path) -> dict[str, Any]:
    """Train; returns the EMA params, the schedule actually run and the reports written to `log`."""
    te_cfg = setup.encoder.config
    k_init, k_data, k_cal = jax.random.split(key, 3)
    params = init_params(te_cfg, tr_cfg, k_init)
    chunk = math.gcd(train_tiny.CHUNK, args.report_every)
    tx, run = make_train_chunk(setup, chunk)
    opt_state = jax.jit(tx.init)(params)  # one program, not one per op and parameter shape
    ema = params
    reporter = make_reporter(setup, tr_cfg, k_cal, args.calib_clips)
    total = max(chunk, args.steps // chunk * chunk)
    losses: list[float] = []
    reports: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    report_s = 0.0

    def report(done: int) -> None:
        nonlocal report_s
        tr0 = time.perf_counter()
        since = losses[-args.report_every :] if done else []
        rep = reporter(ema)
        entry = {
            "step": done,
            "loss": float(np.mean(since)) if since else None,
            "lr": float(train_tiny.lr_at(jnp.int32(max(done - 1, 0)), jnp.float32(total), args.lr)),
            "wall_s": round(time.perf_counter() - t0, 2),
            **rep,
        }
        reports.append(entry)
        with log.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        report_s += time.perf_counter() - tr0
        print(one_line(done, entry["loss"] if since else math.nan, rep))

    report(0)
    done = 0
    chunk_times: list[float] = []
    while done < total:
        tc = time.perf_counter()
        params, ema, opt_state, chunk_losses = run(params, ema, opt_state, k_data, jnp.float32(total), jnp.int32(done))
        chunk_losses = np.asarray(chunk_losses)
        chunk_times.append(time.perf_counter() - tc)
        losses.extend(chunk_losses.tolist())
        done += chunk
        if not np.all(np.isfinite(chunk_losses)):
            raise FloatingPointError(f"training loss became non-finite at step {done} (lr={args.lr})")
        if args.max_seconds > 0 and done == 2 * chunk:
            per_step = chunk_times[-1] / chunk + report_s / max(len(reports), 1) / args.report_every
            total = steps_that_fit(done, total, per_step, args.max_seconds - (time.perf_counter() - t0), chunk)
            print(
                f"  {per_step * 1e3:.2f} ms/step (reports included) -> {total} steps fit in --max-seconds {args.max_seconds:g}"
            )
        if done % args.report_every == 0 or done == total:
            report(done)
    tail = max(1, len(losses) // 10)
    return {
        "ema": ema,
        "steps": total,
        "chunk": chunk,
        "wall_s": time.perf_counter() - t0,
        "report_s": report_s,
        "ms_per_step": 1e3 * float(np.median(chunk_times[1:] if len(chunk_times) > 1 else chunk_times)) / chunk,
        "first_loss": float(np.mean(losses[:chunk])),
        "final_loss": float(np.mean(losses[-tail:])),
        "final_loss_window": tail,
        "reports": reports,
    }


def to_weights(tree: Any) -> Any:
    """Host copies of a params tree in the shipped dtype (converted in one program, not one per leaf shape)."""
    return jax.device_get(jax.jit(lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, WEIGHT_DTYPE), t))(tree))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (transformer/, text_encoder/, tokenizer/, log, meta)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20000, help="optimizer steps (rounded down to the chunk size)")
    p.add_argument("--max-seconds", type=float, default=0.0, help="cap training wall time (0: no cap)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--report-every", type=int, default=1000, help="steps between outlier reports")
    p.add_argument("--calib-clips", type=int, default=32, help="clips of the fixed calibration batch")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="compute dtype of training (params stay float32; saved weights are bf16); auto: bf16 on GPU",
    )
    p.add_argument("--quick", action="store_true", help="1-layer toy configs and a few dozen steps (CPU smoke test)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--quick" in argv:  # quick changes the defaults; explicit flags still win
        p.set_defaults(steps=30, batch=4, report_every=10, calib_clips=4)
    a = p.parse_args(argv)
    if a.report_every < 1 or a.steps < 1:
        p.error("--steps and --report-every must be positive")
    if 2 * math.gcd(train_tiny.CHUNK, a.report_every) >= train_tiny.WARMUP:
        p.error("--report-every: two timing chunks must fit inside the warmup")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    backend = jax.default_backend()
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(
        args.dtype, jnp.bfloat16 if backend == "gpu" else jnp.float32
    )
    te_cfg = text_config(args.quick)
    tr_cfg = transformer_config(args.quick, te_cfg.d_model)
    data = data_config(args.quick)
    setup = Setup(
        t5.T5Encoder(te_cfg, dtype), WanTransformer3D(tr_cfg, dtype), data, args.batch, args.lr, args.caption_dropout
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / sm.LOG_NAME
    log.write_text("")
    n_tr = models.param_count(models.param_shapes(tr_cfg))
    n_te = models.param_count(jax.eval_shape(lambda: init_params(te_cfg, tr_cfg, jax.random.key(0)))["text_encoder"])
    size = jnp.dtype(WEIGHT_DTYPE).itemsize
    print(
        f"shapes model: transformer {n_tr:,} params, text encoder {n_te:,} params "
        f"({(n_tr + n_te) * size / 1e6:.1f} MB in bf16); {jax.devices()[0].device_kind} ({backend}), "
        f"compute {jnp.dtype(dtype).name}"
    )
    t_start = time.perf_counter()
    run = train(args, setup, tr_cfg, jax.random.key(args.seed), log)
    ema = run["ema"]

    models.save_pretrained(out / sm.TRANSFORMER_DIR, tr_cfg, to_weights(ema["transformer"]), overwrite=True)
    sm.save_text_encoder(out / sm.TEXT_ENCODER_DIR, te_cfg, to_weights(ema["text_encoder"]))
    sm.save_tokenizer(out / sm.TOKENIZER_DIR, TEXT_LEN)
    command = (
        "PYTHONPATH=. python3 scripts/train_outlier_model.py "
        + ("--quick " if args.quick else "")
        + f"--seed {args.seed} --steps {run['steps']} --batch {args.batch} --lr {args.lr:g} "
        f"--caption-dropout {args.caption_dropout:g} --report-every {args.report_every} "
        f"--calib-clips {args.calib_clips} --dtype {jnp.dtype(dtype).name}"
    )
    last = run["reports"][-1]
    meta = {
        "command": command,
        "seed": args.seed,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{jax.devices()[0].device_kind} ({backend})",
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__},
        "quick": args.quick,
        "data": dataclasses.asdict(data),
        "text_len": TEXT_LEN,
        "attributes": {name: list(v) for name, v in sd.ATTRIBUTES},
        "params": {"transformer": n_tr, "text_encoder": n_te},
        "weights_dtype": jnp.dtype(WEIGHT_DTYPE).name,
        "training": {
            "steps": run["steps"],
            "batch": args.batch,
            "peak_lr": args.lr,
            "warmup": train_tiny.WARMUP,
            "schedule": "linear warmup then cosine to 10%",
            "optimizer": "AdamW(b1=0.9, b2=0.99, wd=0.01), clip 1.0",
            "ema_decay": EMA_DECAY,
            "caption_dropout": args.caption_dropout,
            "compute_dtype": jnp.dtype(dtype).name,
            "sigma_sampling": "logit-normal(0, 1)",
            "wall_s": round(run["wall_s"], 1),
            "report_s": round(run["report_s"], 1),
            "ms_per_step": round(run["ms_per_step"], 3),
            "first_loss": run["first_loss"],
            "final_loss": run["final_loss"],
            "final_loss_window_steps": run["final_loss_window"],
        },
        "outliers": {
            "log": sm.LOG_NAME,
            "report_every": args.report_every,
            "calib_clips": args.calib_clips,
            "sigmas": list(SIGMAS),
            "final": {
                k: {f: last[k][f] for f in ("median_ratio", "max_ratio")}
                | {"residual_max_ratio": last[k]["residual"]["max_ratio"]}
                for k in ("transformer", "text_encoder")
            },
        },
        "total_wall_s": round(time.perf_counter() - t_start, 1),
    }
    (out / sm.META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e6
    print(f"wrote {out} (weights {size_mb:.2f} MB); final loss {run['final_loss']:.4f}; total {meta['total_wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
