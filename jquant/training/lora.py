"""LoRA over quantized bases: run-time adapters, merging, QLoRA fine-tuning, LoftQ init.

An adapter of one linear layer is ``(A [K, r], B [r, N])`` in the Flax kernel layout
(``y = x W + scale * (x A) B``, ``scale = alpha / r``). At run time it rides on the layer's
low-rank branch (aux ``lowrank_a`` / ``lowrank_b``, the branch SVDQuant uses), which the
dispatch adds to the quantized matmul (fused into the W4A8/W8A8 kernel's epilogue on the
GPU): the base QArray is never dequantized permanently. :func:`apply_lora` writes the
branch at a chosen strength (``B`` scaled by ``strength * alpha / r``), concatenating with
an existing branch (an SVDQuant model keeps its own branch); a layer's ``input_mul`` is
folded into ``A``. :func:`merge_lora` instead adds ``A B`` into the kernel (dequantizing
it) and optionally requantizes at the base's spec.

QLoRA (Dettmers et al. 2023): the base is frozen NF4 (or any QArray format), the adapters
train in bf16/fp32 with optax on the tiny Wan's flow-matching loss
(:func:`jquant.training.qat.flow_loss`); :func:`init_adapters` starts them as LoRA does (``A``
random, ``B`` zero: the model is unchanged at step 0) or by LoftQ
(:func:`jquant.algorithms.svd.loftq_weight`: base and adapter jointly fit the float
weight, so the adapted base starts nearer the float model).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jquant import nn as jnn
from jquant.algorithms.linear_tree import get_aux, get_kernel, linear_paths, update_layer
from jquant.algorithms.svd import loftq_weight
from jquant.formats import parse_spec
from jquant.qarray import QArray, dequantize, quantize
from jquant.training.qat import flow_loss

Array = jax.Array
Variables = dict[str, Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Adapter:
    """One layer's LoRA: ``a [K, r]``, ``b [r, N]`` (Flax layout), ``alpha`` (static)."""

    a: Array
    b: Array
    alpha: float = dataclasses.field(default=0.0, metadata={"static": True})

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    @property
    def scale(self) -> float:
        """``alpha / r`` (PEFT's scaling; alpha 0 means "no alpha given": 1.0)."""
        return self.alpha / self.rank if self.alpha else 1.0

    def delta(self) -> Array:
        """``scale * A B`` in float32 (the weight update, Flax layout [K, N])."""
        return self.scale * (self.a.astype(jnp.float32) @ self.b.astype(jnp.float32))


Adapters = Mapping[str, Adapter]


def _check_layer(variables: Variables, path: str, ad: Adapter) -> tuple[int, int]:
    try:
        w = get_kernel(variables, path)
    except KeyError as e:
        raise KeyError(f"LoRA: {e.args[0]}") from None
    if len(w.shape) != 2:
        raise ValueError(f"{path}: LoRA on a {len(w.shape)}-D kernel {tuple(w.shape)}; 2-D (K, N) kernels only")
    k, n = w.shape
    if ad.a.shape[0] != k or ad.b.shape[-1] != n or ad.a.shape[-1] != ad.b.shape[0]:
        raise ValueError(
            f"{path}: adapter A {tuple(ad.a.shape)} / B {tuple(ad.b.shape)} does not fit the kernel ({k}, {n})"
        )
    return k, n


def apply_lora(variables: Variables, adapters: Adapters, strength: float = 1.0, dtype: Any = None) -> Variables:
    """Add each adapter as the layer's run-time low-rank branch at ``strength`` (kernels untouched).

    A layer that already has a branch (SVDQuant, LoftQ, an earlier LoRA) gets the ranks
    concatenated, so branches add. A layer with an online Hadamard (QuaRot) is refused: its
    input lives in a rotated basis the adapter was not trained in.
    """
    out = dict(variables)
    for path, ad in adapters.items():
        _check_layer(out, path, ad)
        aux = get_aux(out, path)
        if "hadamard" in aux:
            raise ValueError(f"{path}: LoRA on a layer with an online Hadamard (rotated basis); merge before rotating")
        a = ad.a.astype(jnp.float32)
        if "input_mul" in aux:  # x is multiplied by input_mul before the branch: undo it in A
            a = a / aux["input_mul"].astype(jnp.float32)[:, None]
        b = ad.b.astype(jnp.float32) * (strength * ad.scale)
        if "lowrank_a" in aux:
            dt = aux["lowrank_a"].dtype
            a = jnp.concatenate([aux["lowrank_a"].astype(jnp.float32), a], axis=1)
            b = jnp.concatenate([aux["lowrank_b"].astype(jnp.float32), b], axis=0)
        else:
            dt = dtype or jnp.float32
        dt = dtype or dt
        out = update_layer(out, path, aux={"lowrank_a": a.astype(dt), "lowrank_b": b.astype(dt)})
    return out


def merge_lora(
    variables: Variables, adapters: Adapters, strength: float = 1.0, *, requantize: bool = False
) -> Variables:
    """Add ``strength * scale * A B`` into each kernel (QArray kernels are dequantized);
    with ``requantize`` a QArray kernel is quantized again at its own spec (RTN)."""
    out = dict(variables)
    for path, ad in adapters.items():
        _check_layer(out, path, ad)
        w = get_kernel(out, path)
        if "hadamard" in get_aux(out, path) or "input_mul" in get_aux(out, path):
            raise ValueError(f"{path}: merging into a rotated/smoothed kernel; merge into the float model first")
        merged = dequantize(w, jnp.float32) + strength * ad.delta()
        if isinstance(w, QArray):
            merged = quantize(merged, w.spec, path=f"{path}/kernel") if requantize else merged.astype(w.dtype)
        else:
            merged = merged.astype(w.dtype)
        out = update_layer(out, path, kernel=merged)
    return out


def select_paths(variables: Variables, pattern: str) -> list[str]:
    """2-D linear layers whose module path ``re.search``-matches ``pattern`` (an error if none)."""
    rx = re.compile(pattern)
    out = [p for p in linear_paths(variables) if rx.search(p) and len(get_kernel(variables, p).shape) == 2]
    if not out:
        raise ValueError(f"LoRA: pattern {pattern!r} matches no 2-D linear layer among {linear_paths(variables)[:8]}")
    return out


def init_adapters(
    variables: Variables, paths: list[str], rank: int, key: Array, *, alpha: float | None = None
) -> dict[str, Adapter]:
    """LoRA's initialisation: ``A ~ N(0, 1/K)``, ``B = 0`` (the model is unchanged at step 0)."""
    out = {}
    for i, p in enumerate(paths):
        k, n = get_kernel(variables, p).shape
        a = jax.random.normal(jax.random.fold_in(key, i), (k, rank), jnp.float32) / np.sqrt(k)
        out[p] = Adapter(a, jnp.zeros((rank, n), jnp.float32), float(alpha or rank))
    return out


def loftq_init(
    float_variables: Variables, paths: list[str], spec: str, rank: int, iters: int = 3
) -> tuple[Variables, dict[str, Adapter]]:
    """LoftQ: quantize each selected float kernel at ``spec`` jointly with a rank-``rank``
    adapter (``W ~ Q + A B``); returns the quantized variables and the adapters (alpha = r)."""
    parse_spec(spec)
    out, ads = dict(float_variables), {}
    for p in paths:
        w = get_kernel(out, p)
        q, a, b, _ = loftq_weight(jnp.asarray(w), spec, rank, iters, path=f"{p}/kernel")
        out = update_layer(out, p, kernel=q)
        ads[p] = Adapter(a, b, float(rank))
    return out, ads


# --- QLoRA fine-tuning ------------------------------------------------------------------------------
def adapted_apply(
    apply_fn: Callable[[Variables], Array], variables: Variables, adapters: Adapters, strength: float = 1.0
) -> Array:
    """``apply_fn(variables with the adapters as run-time branches)`` under ``jquant.nn.quantized``
    (weight-only): differentiable in the adapters, the QArray base frozen."""
    with jnn.quantized(None):
        return apply_fn(apply_lora(variables, adapters, strength))


@dataclasses.dataclass(frozen=True)
class QLoRAConfig:
    steps: int = 100
    lr: float = 1e-3
    seed: int = 0


def qlora_finetune(
    model: Any,
    variables: Variables,
    adapters: dict[str, Adapter],
    batches: Callable[[Array], tuple[Array, Array]],
    config: QLoRAConfig = QLoRAConfig(),
    *,
    log_every: int = 0,
) -> tuple[dict[str, Adapter], np.ndarray, float]:
    """Train only ``adapters`` on a frozen quantized base with optax Adam.

    ``batches(key) -> (x0 latents, text)`` draws one training batch (jittable). Returns the
    trained adapters, the loss per step and the wall seconds.
    """
    opt = optax.adam(optax.cosine_decay_schedule(config.lr, config.steps, 0.1))
    state = opt.init(adapters)

    @jax.jit
    def step(ads, st, key):
        kd, kl = jax.random.split(key)
        x0, text = batches(kd)

        def loss_of(a_):
            return flow_loss(
                lambda x, t, c: adapted_apply(lambda v: model.apply(v, x, t, c), variables, a_), x0, text, kl
            )

        loss, g = jax.value_and_grad(loss_of)(ads)
        upd, st = opt.update(g, st, ads)
        return optax.apply_updates(ads, upd), st, loss

    key = jax.random.key(config.seed)
    losses = []
    t0 = time.perf_counter()
    for i in range(config.steps):
        adapters, state, loss = step(adapters, state, jax.random.fold_in(key, i))
        losses.append(float(loss))
        if log_every and (i % log_every == 0 or i == config.steps - 1):
            print(f"  qlora step {i:4d}  loss {np.mean(losses[-log_every:]):.5f}", flush=True)
    return adapters, np.asarray(losses), time.perf_counter() - t0
