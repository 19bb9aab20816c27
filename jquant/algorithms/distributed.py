"""GPTQ of a large DiT with its layers spread over devices.

GPTQ is independent per layer once the Hessians are known (`jquant.sharding.calib` reduces them
across the mesh), so the layers are dealt to devices, most expensive first to the least loaded
device (cost K^2 N + K^3: the sweep and the Cholesky), and each device works through its own
list in its own thread: a layer's kernel and Hessian are committed to that device, so every
op of :func:`jquant.algorithms.gptq.gptq_layer` runs there. The math is the single-device
function's, so the result equals :func:`jquant.algorithms.gptq.gptq` (bit for bit on devices
of one kind); each new QArray stays on the device that made it.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import jax

from jquant.algorithms import gptq as _gptq
from jquant.algorithms import layerwise as lw
from jquant.formats import QSpec
from jquant.rules import Rule


def layer_cost(shape: Sequence[int]) -> int:
    """Relative GPTQ cost of a [K, N] kernel: the column sweep (K^2 N) plus the Cholesky (K^3)."""
    k, n = shape
    return k * k * n + k**3


def assign(layers: Sequence[lw.Layer], devices: Sequence[jax.Device]) -> dict[str, jax.Device]:
    """``{kernel path: device}``: largest layers first, each to the least loaded device."""
    if not devices:
        raise ValueError("gptq_spread: no devices given")
    load = [0] * len(devices)
    out: dict[str, jax.Device] = {}
    for layer in sorted(layers, key=lambda lay: (-layer_cost(lay.kernel.shape), lay.path)):
        i = min(range(len(devices)), key=lambda j: (load[j], j))
        load[i] += layer_cost(layer.kernel.shape)
        out[layer.path] = devices[i]
    return out


def gptq_spread(
    params: Any,
    stats: Mapping[str, Any],
    rules: Sequence[Rule] | QSpec | str,
    config: _gptq.GPTQConfig | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
    layers: Collection[str] | None = None,
) -> tuple[Any, dict[str, jax.Device]]:
    """:func:`jquant.algorithms.gptq.gptq` with the layers spread over ``devices`` (default: all).

    Returns (params with QArray kernels, ``{kernel path: device that quantized it}``).
    """
    config = config or _gptq.GPTQConfig()
    devices = list(jax.devices() if devices is None else devices)
    selected = lw.select(params, stats, rules, layers=layers, method="gptq")
    where = assign(selected, devices)

    def run(device: jax.Device, mine: list[lw.Layer]) -> dict[str, Any]:
        out = {}
        for layer in mine:
            w = jax.device_put(layer.kernel, device)
            h = jax.device_put(lw.mean_hessian(layer), device)
            out[layer.path] = _gptq.gptq_layer(w, h, layer.spec, config, path=layer.path)
        return out

    per_device = {d: [lay for lay in selected if where[lay.path] == d] for d in devices}
    new: dict[str, Any] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(devices)) as pool:
        for part in pool.map(lambda item: run(*item), [(d, m) for d, m in per_device.items() if m]):
            new.update(part)
    return lw.replace(params, new), where
