"""Quantization-aware distillation: the float model teaches its fake-quantized copy.

The teacher is the float model on its own sampled trajectories (:func:`teacher_data`:
every step's input ``x_t`` and the float prediction of *both* CFG branches). The student
starts at a PTQ result (:class:`~jquant.pipeline.runtime.QuantizedModel`: QArray kernels
become :class:`~jquant.training.fakequant.FakeQuant` with LSQ scales; a static scale
table's scales become trainable too) and is trained with optax on the per-step prediction:
the MSE of each branch plus the MSE of the guided (CFG-combined) prediction, each
normalised by the teacher's mean square, as in the video-DiT QAT/QAD work (e.g. ViDiT-Q,
Q-DM). Optional feature matching adds the MSE of every transformer block's output
(``DistillConfig.feature_weight``; the blocks are read with flax ``capture_intermediates``).

:func:`distill` returns the trained model as a QuantizedModel (QArrays with the learned
scales, the trained table) that samples in the same jitted sampler as any PTQ model, with
the loss history and wall time. :func:`save_state` / :func:`restore_state` checkpoint the
training state (params, optimizer state, step) through :mod:`jquant.io.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Sequence

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jquant import nn as jnn
from jquant.io import checkpoint as ckpt
from jquant.pipeline import trajectory as tj
from jquant.pipeline.denoiser import Denoiser, ModelBundle, Workload
from jquant.pipeline.runtime import QuantizedModel
from jquant.pipeline.tables import ScaleTable, expand
from jquant.sampling import cfg_combine
from jquant.training.budget import step_cost, steps_that_fit, time_is_up
from jquant.training.fakequant import FakeQuant, fake_quantized, from_quantized, is_fake_quant, to_quantized

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Training settings.

    Attributes:
      steps: optax steps.
      batch: samples per step (each runs both CFG branches at one timestep).
      lr: peak learning rate of the latent weights and float params (Adam, cosine decay).
      scale_lr: peak learning rate of the quantizer scales (weights' and the table's).
      guided_weight: weight of the guided-prediction MSE beside the two branch MSEs.
      feature_weight: weight of per-block feature matching (0: off).
      train_float: also train the float params (norms, biases, embedders, modulation).
      seed: minibatch sampling seed.
      chunk: optax steps per jitted call (a ``lax.scan``; minibatches gathered on the device),
        so a small model on a GPU is not bound by Python dispatch.
      max_seconds: cap on the training wall time (0: none). The first two chunks are timed and
        ``steps`` is lowered to what fits (the learning-rate schedule then spans the new total);
        after each of the first two rollouts it is fitted again, up to ``steps``, with each
        step's share of the latest rollout's seconds (the first one's include compiling). Past
        the cap the run stops at the current chunk (after the two timed chunks, which always
        run); ``info["distill"]`` records ``steps_run`` and ``stopped_by_budget``.
      rollout_every: every this many steps (0: never), the student samples the teacher data's
        workloads with its current weights and the float model labels the inputs it visited
        (both branches); those samples replace the second half of the training set, so the
        student also trains where its own trajectories go (DAgger-style; the first half stays
        the teacher's). Rounded up to whole chunks.
    """

    steps: int = 200
    batch: int = 4
    lr: float = 2e-4
    scale_lr: float = 1e-3
    guided_weight: float = 1.0
    feature_weight: float = 0.0
    train_float: bool = True
    seed: int = 0
    chunk: int = 1
    max_seconds: float = 0.0
    rollout_every: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.chunk < 1:
            raise ValueError(
                f"DistillConfig: steps, batch and chunk must be >= 1, got {self.steps}, {self.batch}, {self.chunk}"
            )
        if self.max_seconds < 0 or self.rollout_every < 0:
            raise ValueError(
                f"DistillConfig: max_seconds and rollout_every must be >= 0, got {self.max_seconds}, "
                f"{self.rollout_every}"
            )
        if self.lr < 0 or self.scale_lr < 0:
            raise ValueError("DistillConfig: learning rates must be >= 0")


@dataclasses.dataclass(frozen=True, eq=False)
class DistillData:
    """Teacher data: ``xs [T, N, ...]`` step inputs, ``ts [T]``, conditioning ``cond`` /
    ``uncond`` ``[N, ...]``, teacher predictions ``y_cond`` / ``y_uncond`` ``[T, N, ...]``."""

    xs: Array
    ts: Array
    cond: Array
    uncond: Array
    y_cond: Array
    y_uncond: Array
    guidance: float
    seconds: float = 0.0
    workloads: tuple[Workload, ...] = ()

    @property
    def num_samples(self) -> int:
        return int(self.xs.shape[1])


def _labelled(bundle: ModelBundle, workloads: Sequence[Workload], trajectories: Sequence[Array]) -> DistillData:
    """The float model's predictions of both CFG branches at every step input of
    ``trajectories`` (``[T + 1, n, ...]`` each, one per workload)."""
    den = bundle.denoiser
    xs = jnp.concatenate([x[:-1] for x in trajectories], axis=1)
    cond = jnp.concatenate([w.cond for w in workloads])
    uncond = jnp.concatenate([w.uncond for w in workloads])
    ts = jnp.asarray(den.timesteps())

    @jax.jit
    def preds(x, t):
        both = jnp.concatenate([uncond, cond])
        return jnp.split(den.apply({"params": bundle.params}, jnp.concatenate([x, x]), t, both), 2)

    yu, yc = zip(*(preds(xs[i], ts[i]) for i in range(xs.shape[0])))
    return DistillData(
        xs, ts, cond, uncond, jnp.stack(yc), jnp.stack(yu), float(den.guidance_scale), workloads=tuple(workloads)
    )


def teacher_data(bundle: ModelBundle, workloads: Sequence[Workload]) -> DistillData:
    """Sample the float model on ``workloads`` and keep every step's input and the float
    prediction of both CFG branches (the distillation targets)."""
    den = bundle.denoiser
    if not den.cfg:
        raise ValueError("teacher_data: the bundle samples without CFG; distillation here trains both branches")
    t0 = time.perf_counter()
    traj = tj.record(den, bundle.params, workloads)
    data = _labelled(bundle, [w for w, _ in traj.items], [x for _, x in traj.items])
    return dataclasses.replace(data, seconds=time.perf_counter() - t0)


def student_data(bundle: ModelBundle, model: QuantizedModel, workloads: Sequence[Workload]) -> DistillData:
    """The quantized ``model`` samples ``workloads``; the float model labels every step input
    the student visited (both branches): training data where the student's own trajectories go."""
    den = bundle.denoiser
    t0 = time.perf_counter()
    trajs = [jax.block_until_ready(model.sample(den, w, return_trajectory=True)[1]) for w in workloads]
    data = _labelled(bundle, workloads, trajs)
    return dataclasses.replace(data, seconds=time.perf_counter() - t0)


# --- the student -------------------------------------------------------------------------------------
def table_scales(table: ScaleTable | None) -> dict[str, Array]:
    """A table's ``{path: [G, Bn, Fn]}`` scales as trainable arrays (empty without a table)."""
    return {} if table is None else {p: jnp.asarray(v, jnp.float32) for p, v in table.scales.items()}


def _step_scales(den: Denoiser, table: ScaleTable, scales: dict[str, Array], group: Array, x_shape) -> dict:
    frames, tokens = den.frames_fn(x_shape) if den.frames_fn is not None else (1, -1)
    return {
        p: expand(s[group], table.ranks[p], p in table.video, x_shape[0], True, frames, tokens)
        for p, s in scales.items()
    }


def student_apply(
    den: Denoiser,
    params: Any,
    aux: Any,
    x: Array,
    t: Array,
    both: Array,
    act: str | None,
    act_scales: dict[str, Array] | None = None,
    capture: bool = False,
    act_rules: tuple = (),
):
    """The fake-quantized model on ``[uncond; cond]`` rows (``x`` already doubled)."""
    v = {"params": params}
    if aux:
        v[jnn.AUX_COLLECTION] = aux
    with fake_quantized(act, act_scales, act_rules):
        if not capture:
            return den.apply(v, x, t, both), None
        return _apply_capture(den, v, x, t, both)


_BLOCK = re.compile(r"^blocks_\d+$")


def block_outputs(fn, *args: Any) -> tuple[Any, list[Array]]:
    """``fn(*args)`` and the outputs of every linen submodule named ``blocks_<i>`` (the
    transformer blocks of the ports), in call order (for feature matching)."""
    feats: list[Array] = []

    def rec(next_fun, a, kw, context):
        out = next_fun(*a, **kw)
        m = context.module
        if context.method_name == "__call__" and _BLOCK.match(m.name or "") and not m.is_initializing():
            feats.append(out[0] if isinstance(out, tuple) else out)
        return out

    with flax_nn.intercept_methods(rec):
        out = fn(*args)
    return out, feats


def _apply_capture(den: Denoiser, v: dict, x: Array, t: Array, both: Array):
    return block_outputs(den.apply, v, x, t, both)


def _teacher_features(den: Denoiser, params: Any, x: Array, t: Array, both: Array) -> list[Array]:
    return block_outputs(den.apply, {"params": params}, x, t, both)[1]


def _labels(params: Any, scales: dict, train_float: bool) -> tuple[Any, dict]:
    def one(leaf: Any) -> Any:
        if is_fake_quant(leaf):
            return FakeQuant("w", "scale", leaf.spec)
        return "w" if train_float else "frozen"

    return jax.tree.map(one, params, is_leaf=is_fake_quant), {p: "scale" for p in scales}


def optimizer(config: DistillConfig, labels: Any) -> optax.GradientTransformation:
    """Adam with cosine decay; latent weights/float params at ``lr``, scales at ``scale_lr``."""

    def sched(peak: float):
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(1, config.steps // 20), config.steps, peak * 0.05)

    return optax.multi_transform(
        {
            "w": optax.adam(sched(config.lr)),
            "scale": optax.adam(sched(config.scale_lr)),
            "frozen": optax.set_to_zero(),
        },
        labels,
    )


def loss_fn(
    den: Denoiser,
    trainable: tuple[Any, dict],
    aux: Any,
    act: str | None,
    table: ScaleTable | None,
    batch: dict[str, Array],
    guidance: float,
    guided_weight: float,
    teacher_feats: list[Array] | None = None,
    feature_weight: float = 0.0,
    act_rules: tuple = (),
) -> Array:
    """Normalised MSE of both branches' predictions plus the guided prediction (and features);
    ``act_rules``: the model's per-layer activation specs (``QuantizedModel.act_rules``)."""
    params, scales = trainable
    x = jnp.concatenate([batch["x"], batch["x"]])
    both = jnp.concatenate([batch["uncond"], batch["cond"]])
    act_scales = None if table is None else _step_scales(den, table, scales, batch["group"], x.shape)
    capture = teacher_feats is not None and feature_weight > 0
    pred, feats = student_apply(den, params, aux, x, batch["t"], both, act, act_scales, capture, act_rules)
    pu, pc = jnp.split(pred.astype(jnp.float32), 2)
    yu, yc = batch["y_uncond"], batch["y_cond"]
    norm = jnp.mean(yc**2) + jnp.mean(yu**2) + 1e-8
    loss = (jnp.mean((pu - yu) ** 2) + jnp.mean((pc - yc) ** 2)) / norm
    g = jnp.float32(guidance)
    gy = cfg_combine(yu, yc, g)
    loss = loss + guided_weight * jnp.mean((cfg_combine(pu, pc, g) - gy) ** 2) / (jnp.mean(gy**2) + 1e-8)
    if capture:
        fl = [jnp.mean((a - b) ** 2) / (jnp.mean(b**2) + 1e-8) for a, b in zip(feats, teacher_feats)]
        loss = loss + feature_weight * sum(fl) / max(1, len(fl))
    return loss


@dataclasses.dataclass(frozen=True, eq=False)
class DistillResult:
    """The trained model (runnable QuantizedModel), the loss every step and the wall time."""

    model: QuantizedModel
    losses: np.ndarray
    seconds: float
    params: Any
    scales: dict[str, Array]


def _draws(data: DistillData, rng: np.random.Generator, batch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` minibatch draws: a trajectory step each and ``batch`` distinct samples."""
    b = min(batch, data.num_samples)
    steps = np.empty(n, np.int32)
    samples = np.empty((n, b), np.int32)
    for k in range(n):
        steps[k] = rng.integers(data.xs.shape[0])
        samples[k] = rng.choice(data.num_samples, size=b, replace=False)
    return steps, samples


def _gather(arrays: dict[str, Array], i: Array, idx: Array) -> dict[str, Array]:
    """The minibatch of trajectory step ``i`` and samples ``idx`` from :func:`_arrays` (traceable)."""
    return {
        "x": arrays["xs"][i][idx],
        "t": arrays["ts"][i],
        "cond": arrays["cond"][idx],
        "uncond": arrays["uncond"][idx],
        "y_cond": arrays["y_cond"][i][idx],
        "y_uncond": arrays["y_uncond"][i][idx],
        "group": arrays["groups"][i],
    }


def _arrays(data: DistillData, table: ScaleTable | None) -> dict[str, Array]:
    """The teacher data as jit arguments (not baked into the compiled step as constants)."""
    groups = np.zeros(data.xs.shape[0], np.int32) if table is None else np.asarray(table.groups, np.int32)
    fields = ("xs", "ts", "cond", "uncond", "y_cond", "y_uncond")
    return {**{f: jnp.asarray(getattr(data, f)) for f in fields}, "groups": jnp.asarray(groups)}


def distill(
    bundle: ModelBundle,
    start: QuantizedModel,
    data: DistillData,
    config: DistillConfig = DistillConfig(),
    *,
    name: str | None = None,
    log_every: int = 0,
) -> DistillResult:
    """Train ``start`` (a PTQ model: QArray kernels, its aux, activation spec and optional
    static table) to match the float teacher on ``data``; returns the trained QuantizedModel."""
    den = bundle.denoiser
    params = from_quantized(start.params)
    if not any(is_fake_quant(x) for x in jax.tree.leaves(params, is_leaf=is_fake_quant)):
        raise ValueError(f"distill: {start.name or 'the start model'} has no QArray kernels to train")
    aux = start.variables.get(jnn.AUX_COLLECTION, {})
    table = start.table
    act = start.act if table is None else table.act
    scales = table_scales(table)
    labels = _labels(params, scales, config.train_float)
    opt = optimizer(config, labels)
    trainable = (params, scales)
    opt_state = opt.init(trainable)
    use_feats = config.feature_weight > 0
    arrays = _arrays(data, table)

    def one(opt: optax.GradientTransformation, arrs: dict[str, Array], carry, draw):
        trainable, opt_state = carry
        batch = _gather(arrs, *draw)
        tf = None
        if use_feats:
            x2 = jnp.concatenate([batch["x"], batch["x"]])
            both = jnp.concatenate([batch["uncond"], batch["cond"]])
            tf = _teacher_features(den, bundle.params, x2, batch["t"], both)
        loss, grads = jax.value_and_grad(
            lambda tr: loss_fn(
                den,
                tr,
                aux,
                act,
                table,
                batch,
                data.guidance,
                config.guided_weight,
                tf,
                config.feature_weight,
                start.act_rules,
            )
        )(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), opt_state), loss

    def compile_chunk(total: int):
        opt = optimizer(dataclasses.replace(config, steps=total), labels)
        return jax.jit(lambda carry, draws, arrs: jax.lax.scan(lambda c, d: one(opt, arrs, c, d), carry, draws))

    rollout = _rollout_plan(data, config)

    def current_model(trainable) -> QuantizedModel:
        return _as_model(start, aux, table, *trainable, dataclasses.asdict(config), name)

    total = config.steps
    run_chunk = compile_chunk(total)
    rng = np.random.default_rng(config.seed)
    losses: list[np.ndarray] = []
    carry = (trainable, opt_state)
    t0 = time.perf_counter()
    done, chunks, last_log, t_prev = 0, 0, 0, t0
    per_step: float | None = None  # seconds a step takes (chunk 2, compiled), once timed
    rollout_s: float | None = None  # seconds the latest of the first two rollouts took
    rollouts, rollout_seconds, stopped_by_budget = 0, 0.0, False

    def out_of_time() -> bool:
        # The hard stop behind the fit, for costs it did not foresee; the two timed chunks always run.
        return done < total and chunks >= 2 and time_is_up(time.perf_counter() - t0, config.max_seconds)

    while done < total:
        n = min(config.chunk, total - done)
        draws = tuple(jnp.asarray(a) for a in _draws(data, rng, config.batch, n))
        carry, loss = run_chunk(carry, draws, arrays)
        losses.append(np.asarray(loss))
        done, chunks = done + n, chunks + 1
        refit = False
        if config.max_seconds and chunks == 2:
            per_step, refit = (time.perf_counter() - t_prev) / n, True
        if rollout is not None and done < total and done // config.rollout_every > (done - n) // config.rollout_every:
            if out_of_time():
                stopped_by_budget = True
                break
            t_roll = time.perf_counter()
            arrays = _with_student(arrays, student_data(bundle, current_model(carry[0]), rollout), table)
            rollouts, rollout_seconds = rollouts + 1, rollout_seconds + time.perf_counter() - t_roll
            if log_every:
                print(f"  rollout {rollouts} at step {done}: {time.perf_counter() - t_roll:.1f} s", flush=True)
            if rollouts <= 2:
                # The first rollout compiles the student's sampler; the second is the steady cost.
                rollout_s, refit = time.perf_counter() - t_roll, True
        if refit and per_step is not None and done < total:
            # The steps that fit (up to config.steps) at the cost of a step and its share of the
            # rollouts (0 before one ran): the schedule spans the new total.
            cost = step_cost(per_step, rollout_s or 0.0, config.rollout_every, config.chunk)
            fit = steps_that_fit(done, config.steps, cost, config.max_seconds - (time.perf_counter() - t0))
            if fit != total:
                total = fit
                run_chunk = compile_chunk(total)
        if out_of_time():
            stopped_by_budget = True
            break
        t_prev = time.perf_counter()
        if log_every and (done - last_log >= log_every or done >= total):
            print(f"  step {done:5d}/{total}  loss {np.mean(np.concatenate(losses)[-log_every:]):.5f}", flush=True)
            last_log = done
    seconds = time.perf_counter() - t0
    if log_every and stopped_by_budget:
        print(f"  stopped at step {done}/{total}: {seconds:.1f} s reached max_seconds={config.max_seconds}", flush=True)
    losses_all = np.concatenate(losses)
    trainable, _ = carry
    params, scales = trainable
    info = {
        **dataclasses.asdict(config),
        "steps_run": done,
        "seconds": seconds,
        "stopped_by_budget": stopped_by_budget,
        "rollouts": rollouts,
        "rollout_seconds": rollout_seconds,
    }
    model = _as_model(start, aux, table, params, scales, info, name)
    return DistillResult(model, losses_all, seconds, params, scales)


def _as_model(
    start: QuantizedModel, aux: Any, table: ScaleTable | None, params: Any, scales: dict, info: dict, name: str | None
) -> QuantizedModel:
    """The student as a runnable QuantizedModel: QArrays with the learned scales, the trained table."""
    new_table = None
    if table is not None:
        new_table = dataclasses.replace(table, scales={p: np.abs(np.asarray(s)) + 1e-12 for p, s in scales.items()})
    variables = {"params": to_quantized(params), **({jnn.AUX_COLLECTION: aux} if aux else {})}
    return QuantizedModel(
        variables,
        start.act,
        new_table,
        name or f"{start.name}+distill",
        {**start.info, "distill": info},
        start.act_rules,
    )


def _rollout_plan(data: DistillData, config: DistillConfig) -> tuple[Workload, ...] | None:
    """The workloads the student re-samples (the second half of the teacher data's), or None."""
    if not config.rollout_every:
        return None
    k = len(data.workloads)
    if k < 2:
        raise ValueError(f"distill: rollout_every needs teacher data from >= 2 workloads (teacher_data), got {k}")
    return data.workloads[k - k // 2 :]


def _with_student(arrays: dict[str, Array], student: DistillData, table: ScaleTable | None) -> dict[str, Array]:
    """``arrays`` with its last samples replaced by the student's (same shapes: no recompile)."""
    new = _arrays(student, table)
    n = new["cond"].shape[0]
    out = dict(arrays)
    for f in ("xs", "y_cond", "y_uncond"):
        out[f] = arrays[f].at[:, -n:].set(new[f])
    for f in ("cond", "uncond"):
        out[f] = arrays[f].at[-n:].set(new[f])
    return out


def mean_loss(bundle: ModelBundle, model: QuantizedModel, data: DistillData, guided_weight: float = 1.0) -> float:
    """The distillation loss of ``model`` averaged over every step and sample of ``data`` (one
    jitted call per step): the number to compare before and after training."""
    den = bundle.denoiser
    params = from_quantized(model.params)
    aux = model.variables.get(jnn.AUX_COLLECTION, {})
    table = model.table
    act = model.act if table is None else table.act
    scales = table_scales(table)

    @jax.jit
    def one(batch):
        return loss_fn(
            den, (params, scales), aux, act, table, batch, data.guidance, guided_weight, act_rules=model.act_rules
        )

    out = []
    for i in range(data.xs.shape[0]):
        batch = {
            "x": data.xs[i],
            "t": data.ts[i],
            "cond": data.cond,
            "uncond": data.uncond,
            "y_cond": data.y_cond[i],
            "y_uncond": data.y_uncond[i],
            "group": jnp.int32(0 if table is None else int(table.groups[i])),
        }
        out.append(float(one(batch)))
    return float(np.mean(out))


# --- checkpoints -----------------------------------------------------------------------------------------
def save_state(path: str | Path, state: Any, step: int) -> Path:
    """Checkpoint a training state (any pytree: params with FakeQuant leaves, optax state) and
    its step through :func:`jquant.io.checkpoint.save` (atomic, bit exact)."""
    return ckpt.save(path, {"leaves": list(jax.tree.leaves(state)), "step": np.int64(step)})


def restore_state(path: str | Path, like: Any) -> tuple[Any, int]:
    """Restore a state saved by :func:`save_state` into the structure of ``like`` (a state of
    the same model and optimizer, e.g. freshly initialised); mismatches name the leaf."""
    tree = ckpt.restore(path)
    leaves, treedef = jax.tree.flatten(like)
    got = tree["leaves"]
    if len(got) != len(leaves):
        raise ckpt.CheckpointError(f"{path}: checkpoint holds {len(got)} arrays, the state has {len(leaves)}")
    for i, (a, b) in enumerate(zip(got, leaves)):
        if np.shape(a) != np.shape(b):
            raise ckpt.CheckpointError(f"{path}: array {i} has shape {np.shape(a)}, the state expects {np.shape(b)}")
    return jax.tree.unflatten(treedef, got), int(tree["step"])
