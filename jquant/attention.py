"""Quantized attention as a policy: which attention calls of a model run quantized, and how.

Every model port calls one function, `models.attention.attention`. Inside
``with quantized_attention(...)`` that function routes the calls the policy selects to
`pallas_kernels.attention.quant_attention` (the Mosaic GPU kernel on Hopper, its plain-JAX
reference elsewhere); every other call, and every call outside the context, stays the
float `jax.nn.dot_product_attention`. The model is not edited.

Selection, all optional:

* ``layers``: a regex fully matching the Flax module path of the attention layer
  (e.g. ``r"blocks_\\d+/attn1"`` for Wan's self-attention);
* ``roles``: layer roles (`models.roles.ROLES`) of the layer's ``to_q`` projection under
  the ports' role rules, e.g. ``("self_attn",)`` or ``("cross_attn",)``;
* ``min_kv_tokens``: calls with fewer keys stay float (short text cross-attention gains
  nothing from a flash kernel);
* ``enabled``: a Python bool, or a traced boolean scalar. A traced value switches per
  denoising step inside a jitted sampler: put a boolean row in ``step_data`` (see
  :func:`step_schedule`) and enter the context inside ``model_fn`` with
  ``enabled=step_slice[...]``; both paths are compiled and ``lax.cond`` picks one per step.

Calls with a mask, or a head_dim the kernel does not support, stay float. A call that brings a
`models.attention.QKPrologue` (the layer's Q/K RMSNorm and RoPE still to apply: Wan's
self-attention) hands it to the kernel's operand pass, which folds it into its one read of Q and
K where it can (``pallas_kernels.attn_prep``) and applies it in XLA first otherwise.

    with quantized_attention(roles=("self_attn",)):
        out = model.apply(variables, x, t, text)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import sys
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import module as linen_module

from jquant.models.attention import QKPrologue, attention_hook
from jquant.models.loading import PORTS
from jquant.models.roles import ROLES
from pallas_kernels import attention as _kernel


@dataclasses.dataclass(frozen=True)
class AttentionPolicy:
    """What quantized attention applies to, and its numerics (see `quant_attention`)."""

    enabled: bool | jax.Array = True
    qk_format: str = "int8"
    pv_format: str = "bf16"
    smooth_k: bool = True
    hadamard: bool = True
    k_scales: str = "block"
    block_k: int = 128
    layers: str = ".*"
    roles: tuple[str, ...] | None = None
    min_kv_tokens: int = 0

    def __post_init__(self) -> None:
        if self.qk_format not in _kernel.QK_FORMATS:
            raise ValueError(f"quantized_attention: qk_format={self.qk_format!r}, expected one of {_kernel.QK_FORMATS}")
        if self.pv_format not in _kernel.PV_FORMATS:
            raise ValueError(f"quantized_attention: pv_format={self.pv_format!r}, expected one of {_kernel.PV_FORMATS}")
        try:
            re.compile(self.layers)
        except re.error as e:
            raise ValueError(f"quantized_attention: layers={self.layers!r} is not a regex: {e}") from e
        if self.roles is not None:
            unknown = set(self.roles) - ROLES
            if isinstance(self.roles, str) or unknown:
                raise ValueError(f"quantized_attention: roles must be a tuple of {sorted(ROLES)}, got {self.roles!r}")
        if self.min_kv_tokens < 0:
            raise ValueError(f"quantized_attention: min_kv_tokens must be >= 0, got {self.min_kv_tokens}")
        if isinstance(self.enabled, jax.Array) and (self.enabled.shape != () or self.enabled.dtype != jnp.bool_):
            raise ValueError(
                f"quantized_attention: enabled must be a bool scalar, got {self.enabled.dtype}"
                f"{list(self.enabled.shape)}"
            )


_STATE = threading.local()


def _stack() -> list[AttentionPolicy]:
    if not hasattr(_STATE, "stack"):
        _STATE.stack = []
    return _STATE.stack


@contextlib.contextmanager
def quantized_attention(
    enabled: bool | jax.Array = True,
    *,
    qk_format: str = "int8",
    pv_format: str = "bf16",
    smooth_k: bool = True,
    hadamard: bool = True,
    k_scales: str = "block",
    block_k: int = 128,
    layers: str = ".*",
    roles: tuple[str, ...] | None = None,
    min_kv_tokens: int = 0,
) -> Iterator[AttentionPolicy]:
    """Route the selected attention calls traced inside this block to quantized attention.

    The innermost context wins. The policy acts at trace time: enter it around the code that
    traces the model (inside ``model_fn`` for a jitted sampler).
    """
    if not isinstance(enabled, bool):
        enabled = jnp.asarray(enabled)  # numpy, concrete or traced: one bool scalar array
    policy = AttentionPolicy(
        enabled=enabled,
        qk_format=qk_format,
        pv_format=pv_format,
        smooth_k=smooth_k,
        hadamard=hadamard,
        k_scales=k_scales,
        block_k=block_k,
        layers=layers,
        roles=None if roles is None else tuple(roles),
        min_kv_tokens=min_kv_tokens,
    )
    _stack().append(policy)
    try:
        with attention_hook(maybe_quantized, takes_prologue=True):
            yield policy
    finally:
        _stack().pop()


def active_policy() -> AttentionPolicy | None:
    """The innermost policy in force, or None."""
    stack = _stack()
    return stack[-1] if stack else None


def step_schedule(num_steps: int, *, float_first: int = 0, float_last: int = 0) -> np.ndarray:
    """Boolean [num_steps]: True where a step uses quantized attention (a ``step_data`` row).

    ``float_first``/``float_last`` steps at either end stay in float attention.
    """
    if num_steps < 1 or float_first < 0 or float_last < 0 or float_first + float_last > num_steps:
        raise ValueError(
            f"step_schedule: need 0 <= float_first + float_last <= num_steps, got "
            f"num_steps={num_steps}, float_first={float_first}, float_last={float_last}"
        )
    on = np.ones((num_steps,), bool)
    on[:float_first] = False
    on[num_steps - float_last :] = False
    return on


def current_module_path() -> str | None:
    """'/'-joined scope path of the Flax linen module being called, or None outside one."""

    stack = linen_module._context.module_stack  # pylint: disable=protected-access
    module = stack[-1] if stack else None
    if module is None or module.scope is None:
        return None
    return "/".join(str(p) for p in module.scope.path)


@functools.lru_cache(maxsize=None)
def _role_rules() -> tuple[tuple[re.Pattern[str], tuple[str, ...]], ...]:

    rules = []
    for port in PORTS:
        module = sys.modules.get(port.module_cls.__module__)
        for pattern, roles in getattr(module, "ROLE_RULES", ()):
            rules.append((re.compile(pattern), tuple(roles)))
    return tuple(rules)


def layer_roles(module_path: str | None) -> tuple[str, ...]:
    """Roles of the attention layer at ``module_path``: those of its ``to_q`` projection."""
    if module_path is None:
        return ()
    target = f"{module_path}/to_q"
    out: list[str] = []
    for regex, roles in _role_rules():
        if regex.fullmatch(target):
            out.extend(r for r in roles if r not in out)
    return tuple(out)


def selects(
    policy: AttentionPolicy, module_path: str | None, q: jax.Array, k: jax.Array, mask: jax.Array | None
) -> bool:
    """Whether ``policy`` routes this call (static: shapes, mask, layer path and roles)."""
    if mask is not None or q.shape[-1] not in _kernel.HEAD_DIMS or k.shape[1] < policy.min_kv_tokens:
        return False
    if isinstance(policy.enabled, bool) and not policy.enabled:
        return False
    if not re.fullmatch(policy.layers, module_path or ""):
        return False
    return policy.roles is None or bool(set(policy.roles) & set(layer_roles(module_path)))


def _quantized(
    policy: AttentionPolicy, q: jax.Array, k: jax.Array, v: jax.Array, prologue: QKPrologue | None = None
) -> jax.Array:
    out = _kernel.quant_attention(
        q,
        k,
        v,
        qk_format=policy.qk_format,
        pv_format=policy.pv_format,
        block_k=policy.block_k,
        smooth_k=policy.smooth_k,
        hadamard=policy.hadamard,
        k_scales=policy.k_scales,
        prologue=prologue,
    )
    return out.astype(q.dtype)


def maybe_quantized(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    implementation: str | None,
    *,
    prologue: QKPrologue | None = None,
) -> jax.Array | None:
    """Quantized attention for this call if the active policy selects it, else None.

    Called by `models.attention.attention` (installed with ``takes_prologue=True``: with a
    ``prologue``, q and k are the raw projections and the kernel's operand pass applies it); with
    a traced ``enabled`` the result is a ``lax.cond`` between the quantized and the float path.
    """
    policy = active_policy()
    if policy is None or not selects(policy, current_module_path(), q, k, mask):
        return None
    if isinstance(policy.enabled, bool):
        return _quantized(policy, q, k, v, prologue=prologue)

    def float_path(q, k, v):
        if prologue is not None:
            q, k = prologue.apply(q, k)
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)

    quantized = functools.partial(_quantized, policy, prologue=prologue)
    return jax.lax.cond(policy.enabled, quantized, float_path, q, k, v)
