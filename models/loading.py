"""Reading and writing diffusers-layout checkpoints (config.json + safetensors) for the ports.

Every tensor goes through its port's explicit key map; a checkpoint whose keys or shapes do not
match the config fails with one error listing every problem. No network access.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from jquant.models import cogvideox, dit, flux, hunyuan_video, ltx2, ltx_video, mochi, wan
from jquant.models.port import DiffusersConfig, Port

PORTS: tuple[Port, ...] = (wan.PORT, flux.PORT, dit.PORT, hunyuan_video.PORT, cogvideox.PORT, mochi.PORT, ltx_video.PORT, ltx2.PORT)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the key map of its config."""


def port_for_class(class_name: str) -> Port:
    """The port registered for a diffusers `_class_name`."""
    for port in PORTS:
        if class_name in port.class_names:
            return port
    known = sorted(n for p in PORTS for n in p.class_names)
    raise ValueError(f"no Flax port for diffusers class {class_name!r}; known: {known}")


def port_for_config(config: DiffusersConfig) -> Port:
    """The port whose config dataclass `config` is."""
    for port in PORTS:
        if isinstance(config, port.config_cls):
            return port
    raise TypeError(f"{type(config).__name__} is not the config of any port")


def read_config(path: str | os.PathLike) -> tuple[Port, DiffusersConfig]:
    """Parse `path/config.json` into (port, config)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found (expected a diffusers model directory)")
    raw = json.loads(config_file.read_text())
    if "_class_name" not in raw:
        raise ValueError(f"{config_file}: no '_class_name' key")
    port = port_for_class(raw["_class_name"])
    return port, port.config_cls.from_diffusers(raw)


def _weight_files(path: Path) -> dict[str, Path]:
    """Map every tensor key to the safetensors file holding it: the diffusers index if present,
    else the single diffusers weights file (other safetensors in the folder are not weights),
    read through the core reader `jquant.io.safetensors.weight_files`."""
    from jquant.io.safetensors import weight_files  # noqa: PLC0415 (keeps `import models` free of orbax)

    for name in (INDEX_NAME, WEIGHTS_NAME):
        if (path / name).is_file():
            return weight_files(path / name)
    raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")


def _check_keys(expected: set[str], present: set[str], ignore: tuple[str, ...], where: str) -> None:
    missing = sorted(expected - present)
    unexpected = sorted(k for k in present - expected if not any(re.search(p, k) for p in ignore))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{where} does not match the config's key map.\n"
            f"missing keys ({len(missing)}): {missing}\nunexpected keys ({len(unexpected)}): {unexpected}"
        )


def load_pretrained(path: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[nn.Module, dict[str, Any]]:
    """Load a diffusers model directory into (Flax module, params).

    The port is picked from config.json's `_class_name`. Params are cast to `dtype`, except those
    diffusers keeps in float32 (the port's `keep_fp32`); the module computes in `dtype`.
    Apply with `model.apply({"params": params}, ...)`.
    """
    path = Path(path)
    port, config = read_config(path)
    entries = port.key_map(config)
    files = _weight_files(path)
    _check_keys({e.torch_key for e in entries}, set(files), port.ignore_unexpected, f"checkpoint {path}")

    shapes = traverse_util.flatten_dict(port.param_shapes(config), sep="/")
    map_paths = {e.flax_path for e in entries}
    if map_paths != set(shapes):
        raise AssertionError(f"{port.module_cls.__name__} key map out of sync with the module: {sorted(map_paths ^ set(shapes))}")

    by_file: dict[Path, list[Any]] = {}
    for e in entries:
        by_file.setdefault(files[e.torch_key], []).append(e)
    flat: dict[str, jax.Array] = {}
    bad_shapes = []
    for file, file_entries in by_file.items():
        with safe_open(file, framework="np") as f:
            for e in file_entries:
                array = e.to_flax(f.get_tensor(e.torch_key))
                want = shapes[e.flax_path].shape
                if array.shape != want:
                    bad_shapes.append(f"{e.torch_key} -> {e.flax_path}: got {array.shape}, config needs {want}")
                    continue
                keep = any(re.search(p, e.flax_path) for p in port.keep_fp32)
                flat[e.flax_path] = jnp.asarray(array, jnp.float32 if keep else dtype)
    if bad_shapes:
        raise CheckpointMismatchError(f"{path}: {len(bad_shapes)} tensors have the wrong shape:\n" + "\n".join(bad_shapes))
    return port.module(config, dtype), traverse_util.unflatten_dict(flat, sep="/")


def save_pretrained(
    path: str | os.PathLike,
    model_config: DiffusersConfig,
    params: dict[str, Any],
    max_shard_bytes: int | None = None,
) -> None:
    """Write `params` in diffusers layout: config.json plus one safetensors file, or shards and an
    index when `max_shard_bytes` is set and exceeded. Tensors keep their dtypes."""
    path = Path(path)
    port = port_for_config(model_config)
    entries = port.key_map(model_config)
    flat = traverse_util.flatten_dict(params, sep="/")
    _check_keys({e.flax_path for e in entries}, set(flat), (), "params tree")
    tensors = {e.torch_key: np.ascontiguousarray(e.to_torch(np.asarray(flat[e.flax_path]))) for e in entries}

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, array in tensors.items():
        if max_shard_bytes is not None and shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = array
        size += array.nbytes

    path.mkdir(parents=True, exist_ok=True)
    for stale in [path / WEIGHTS_NAME, path / INDEX_NAME, *path.glob("diffusion_pytorch_model-*.safetensors")]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], path / WEIGHTS_NAME, metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / name, metadata=metadata)
            weight_map.update({key: name for key in shard})
        total = sum(a.nbytes for a in tensors.values())
        (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(model_config.to_diffusers(), indent=2) + "\n")


def init_params(config: DiffusersConfig, rng: jax.Array) -> dict[str, Any]:
    """Random float32 params for any port's config."""
    return port_for_config(config).init_params(config, rng)


def layer_roles(config: DiffusersConfig, params: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """Role labels of every Dense kernel, for the port of `config`."""
    return port_for_config(config).layer_roles(params)


def param_shapes(config: DiffusersConfig) -> dict[str, Any]:
    """Param tree of ShapeDtypeStructs for a config (no allocation)."""
    return port_for_config(config).param_shapes(config)

