"""Shared helpers for the Mosaic GPU kernels: platform checks, padding, SM count.

Every kernel in this package is a Pallas Mosaic GPU kernel that only lowers on a
Hopper (sm_90) GPU; on any other backend the public wrappers fall back to their
plain-JAX references. These helpers hold the decisions that the wrappers share so
that each one reads the same way.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

#: jquant's one path switch (docs/kernels.md): ``JQUANT_BACKEND=auto|xla|pallas``. "xla": no
#: kernel runs, every wrapper takes its plain-JAX reference and :mod:`jquant.dispatch` its XLA
#: paths; "pallas": every kernel runs wherever its shape/dtype checks pass, also those not yet
#: verified on a GPU and even where the platform check would say no (the GPU check script and the
#: CPU lowering tests use it), and the dispatch skips its measured per-shape choice. Unset or
#: "auto": kernels verified on the GPU run on a Hopper GPU where measured faster, references
#: elsewhere.
FORCE_ENV = "JQUANT_BACKEND"
BACKENDS = ("auto", "xla", "pallas")


def backend_env() -> str:
    """``$JQUANT_BACKEND`` lower-cased ("" when unset); a ValueError names the variable otherwise."""
    value = os.environ.get(FORCE_ENV, "").strip().lower()
    if value and value not in BACKENDS:
        raise ValueError(f"${FORCE_ENV} must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def forced_mode() -> str | None:
    """Returns "reference" (``xla``), "kernel" (``pallas``) or None from ``$JQUANT_BACKEND``."""
    return {"xla": "reference", "pallas": "kernel"}.get(backend_env())


@functools.lru_cache(maxsize=None)
def _default_device_is_hopper() -> bool:
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return False
    if device.platform != "gpu":
        return False
    capability = getattr(device, "compute_capability", None)
    if capability is None:
        return False
    major = int(str(capability).split(".")[0])
    return major == 9


@functools.lru_cache(maxsize=None)
def _default_device_is_gpu() -> bool:
    try:
        return jax.devices()[0].platform == "gpu"
    except RuntimeError:
        return False


def on_gpu() -> bool:
    """True when the default JAX device is a GPU (and ``$JQUANT_BACKEND`` allows kernels)."""
    if forced_mode() == "reference":
        return False
    return _default_device_is_gpu()


def kernel_enabled(verified_on_gpu: bool) -> bool:
    """Whether a kernel may be dispatched by default.

    Kernels whose GPU check (scripts/check_kernels_gpu.py) has not passed yet are
    only used when ``$JQUANT_BACKEND=pallas`` asks for them.
    """
    mode = forced_mode()
    if mode is not None:
        return mode == "kernel"
    return verified_on_gpu


def on_hopper() -> bool:
    """True when the default JAX device is an sm_90 (Hopper) GPU."""
    mode = forced_mode()
    if mode == "reference":
        return False
    if mode == "kernel":
        return True
    return _default_device_is_hopper()


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
    """Streaming multiprocessors of the default device (132 on an H100 SXM)."""
    try:
        device = jax.devices()[0]
        count = getattr(device, "core_count", None)
        if device.platform == "gpu" and count:
            return int(count)
    except RuntimeError:
        pass
    return 132


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pads ``x`` with ``value`` along ``axis`` up to ``size`` (no-op if already there)."""
    current = x.shape[axis]
    if current == size:
        return x
    if current > size:
        raise ValueError(f"cannot pad axis {axis} of size {current} down to {size}")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - current)
    return jnp.pad(x, widths, constant_values=value)


def check_rank(name: str, x: jax.Array, rank: int) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {x.shape}")


def check_dtype(name: str, x: jax.Array, dtypes) -> None:
    allowed = tuple(jnp.dtype(d) for d in dtypes)
    if jnp.dtype(x.dtype) not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise ValueError(f"{name} must have dtype in ({names}), got {x.dtype}")


#: ``1.5 * 2**23`` as a float32 and its bits: adding an int32 ``p`` with ``|p| <= 2**22`` to the
#: bits gives the float ``1.5 * 2**23 + p`` exactly (``p`` lands in the mantissa, whose last place
#: is 1 there). An int8 dot product over <= 128 channels is at most ``128**3 = 2**21``.
MAGIC_VALUE = 12582912.0
MAGIC_BITS = 0x4B400000


def biased_int32_to_float32(p: jax.Array) -> jax.Array:
    """``MAGIC_VALUE + p`` as float32 for int32 ``|p| <= 2**22``: one integer add and a bitcast.

    The attention kernel turns int8 Q K^T sums into floats this way instead of with the
    conversion instruction and folds ``-MAGIC_VALUE * scale`` into its scaling FMA.
    (In the block-scaled GEMMs' promotion the extra integer add and float subtract were slower
    than the conversion: benchmarks/notes.md, tenth session.)
    """
    return jax.lax.bitcast_convert_type(p + jnp.int32(MAGIC_BITS), jnp.float32)
