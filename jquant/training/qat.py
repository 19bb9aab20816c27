"""QAT on the task loss: the fake-quantized model trained on data, not on a teacher.

The bundled tiny Wan's own objective (rectified flow on rendered moving-digit clips, the
loss ``scripts/train_tiny.py`` trained it with: ``x_t = (1 - s) x0 + s noise``, target
``noise - x0``, timestep ``1000 s``, the class text dropped to the null embedding with
probability ``drop_prob`` so CFG keeps working) with LSQ fake quantization of the weights
(:class:`~jquant.training.fakequant.FakeQuant`) and of the activations (dynamic per token,
STE). Same optimizer and export as :func:`jquant.training.distill.distill`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jquant import nn as jnn
from jquant.models import tiny_wan as tw
from jquant.pipeline.denoiser import ModelBundle
from jquant.pipeline.runtime import QuantizedModel
from jquant.training.distill import DistillConfig, DistillResult, _labels, optimizer
from jquant.training.fakequant import fake_quantized, from_quantized, to_quantized

Array = jax.Array


def tiny_wan_batches(bundle: ModelBundle, batch: int, drop_prob: float = 0.1) -> Callable[[Array], tuple]:
    """``key -> (x0 latents, text)``: fresh clips of random digits, text dropped with ``drop_prob``."""
    tiny = bundle.extra["tiny"]

    def draw(key: Array) -> tuple[Array, Array]:
        k_lab, k_clip, k_drop = jax.random.split(key, 3)
        labels = jax.random.randint(k_lab, (batch,), 0, tw.NUM_CLASSES)
        x0 = tw.clips_to_latents(tw.render_clips(k_clip, labels, tiny.data))
        drop = jax.random.bernoulli(k_drop, drop_prob, (batch,))
        text = jnp.where(drop[:, None, None], tiny.null_text(batch), tiny.text(labels))
        return x0, text

    return draw


def flow_loss(apply: Callable[[Array, Array, Array], Array], x0: Array, text: Array, key: Array) -> Array:
    """Rectified-flow MSE of ``apply(x_t, timestep, text)`` (logit-normal ``s``)."""
    k_s, k_n = jax.random.split(key)
    s = jax.nn.sigmoid(jax.random.normal(k_s, (x0.shape[0],)))
    noise = jax.random.normal(k_n, x0.shape)
    sb = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    v = apply((1 - sb) * x0 + sb * noise, s * 1000.0, text)
    return jnp.mean((v.astype(jnp.float32) - (noise - x0)) ** 2)


def qat(
    bundle: ModelBundle,
    start: QuantizedModel,
    config: DistillConfig = DistillConfig(),
    *,
    batches: Callable[[Array], tuple] | None = None,
    name: str | None = None,
    log_every: int = 0,
) -> DistillResult:
    """Train ``start`` (dynamic or weight-only activations) on the task loss; returns the
    trained QuantizedModel (QArrays with the learned scales), losses and wall time."""
    if start.table is not None:
        raise ValueError("qat: static scale tables are trained by distill (the teacher gives every step's target)")
    params = from_quantized(start.params)
    aux = start.variables.get(jnn.AUX_COLLECTION, {})
    draw = batches or tiny_wan_batches(bundle, config.batch)
    opt = optimizer(config, _labels(params, {}, config.train_float)[0])
    opt_state = opt.init(params)
    module = bundle.denoiser.module

    def apply(p, x, t, text):
        v = {"params": p, **({jnn.AUX_COLLECTION: aux} if aux else {})}
        with fake_quantized(start.act, act_rules=start.act_rules):
            return module.apply(v, x, t, text)

    @jax.jit
    def step(p, st, key):
        kd, kl = jax.random.split(key)
        x0, text = draw(kd)
        loss, g = jax.value_and_grad(lambda q: flow_loss(lambda *a: apply(q, *a), x0, text, kl))(p)
        upd, st = opt.update(g, st, p)
        return optax.apply_updates(p, upd), st, loss

    key = jax.random.key(config.seed)
    losses = []
    t0 = time.perf_counter()
    for i in range(config.steps):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, i))
        losses.append(float(loss))
        if log_every and (i % log_every == 0 or i == config.steps - 1):
            print(f"  qat step {i:4d}  loss {np.mean(losses[-log_every:]):.5f}", flush=True)
    seconds = time.perf_counter() - t0
    variables = {"params": to_quantized(params), **({jnn.AUX_COLLECTION: aux} if aux else {})}
    info = {**start.info, "qat": {**dataclasses.asdict(config), "seconds": seconds}}
    model = QuantizedModel(variables, start.act, None, name or f"{start.name}+qat", info, start.act_rules)
    return DistillResult(model, np.asarray(losses), seconds, params, {})
