"""Reading and writing diffusers-layout checkpoints (config.json + safetensors) for the ports.

Every tensor goes through its port's explicit key map; a checkpoint whose keys or shapes do not
match the config fails with one error listing every problem, and a corrupt or truncated
config.json or weights file raises :class:`CheckpointError` naming the file. No network access.

:func:`save_pretrained` marks what it writes (``_jquant_writer`` in config.json, the index's
metadata and the safetensors metadata) and replaces or deletes only files so marked, unless
told ``overwrite=True``; each file is written to a temporary file and moved into place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from jquant.files import atomic_file
from jquant.models import (
    cogvideox,
    dit,
    flux,
    hunyuan_video,
    ltx2,
    ltx_video,
    mochi,
    wan,
)
from jquant.models.port import DiffusersConfig, KeyEntry, Port
from jquant.models.safetensors import (
    SafetensorsError,
    get_tensor,
    open_safetensors,
    read_header,
    weight_files,
)

PORTS: tuple[Port, ...] = (
    wan.PORT,
    flux.PORT,
    dit.PORT,
    hunyuan_video.PORT,
    cogvideox.PORT,
    mochi.PORT,
    ltx_video.PORT,
    ltx2.PORT,
)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SHARD_GLOB = "diffusion_pytorch_model-*.safetensors"
WRITER_KEY = "_jquant_writer"  # marks files save_pretrained wrote, so it may replace them
WRITER = "jquant.models.save_pretrained"


class CheckpointError(ValueError):
    """A model directory that cannot be read: corrupt or truncated config.json or weights."""


class CheckpointMismatchError(CheckpointError):
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


def read_config_json(config_file: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in a model's config.json; a missing file raises FileNotFoundError, an
    unparsable one :class:`CheckpointError` naming it."""
    config_file = Path(config_file)
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found (expected a diffusers model directory)")
    try:
        raw = json.loads(config_file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: corrupt: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file}: corrupt: a JSON {type(raw).__name__}, not an object")
    return raw


def read_config(path: str | os.PathLike) -> tuple[Port, DiffusersConfig]:
    """Parse `path/config.json` into (port, config)."""
    config_file = Path(path) / "config.json"
    raw = read_config_json(config_file)
    if "_class_name" not in raw:
        raise ValueError(f"{config_file}: no '_class_name' key")
    port = port_for_class(raw["_class_name"])
    return port, port.config_cls.from_diffusers(raw)


def _weight_files(path: Path) -> dict[str, Path]:
    """Map every tensor key to the safetensors file holding it: the diffusers index if present,
    else the single diffusers weights file (other safetensors in the folder are not weights),
    read through the core reader `jquant.models.safetensors.weight_files` (which checks every
    file's header)."""

    for name in (INDEX_NAME, WEIGHTS_NAME):
        if (path / name).is_file():
            try:
                return weight_files(path / name)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from e
    raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")


def check_keys(expected: set[str], present: set[str], ignore: tuple[str, ...], where: str) -> None:
    missing = sorted(expected - present)
    unexpected = sorted(k for k in present - expected if not any(re.search(p, k) for p in ignore))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{where} does not match the config's key map.\n"
            f"missing keys ({len(missing)}): {missing}\nunexpected keys ({len(unexpected)}): {unexpected}"
        )


def read_tensors(
    where: Path,
    files: Mapping[str, Path],
    entries: Sequence[KeyEntry],
    shapes: Mapping[str, Sequence[int]],
    dtype: Any,
    keep_fp32: Sequence[str] = (),
) -> dict[str, jax.Array]:
    """``{flax path: array}`` of every entry, read file by file from the safetensors ``files``
    (``{torch key: file}``), mapped to the Flax layout and cast to ``dtype`` (float32 where a
    ``keep_fp32`` regex matches the path). Every tensor whose shape differs from ``shapes`` is
    listed in one :class:`CheckpointMismatchError` naming ``where``; a damaged file raises
    :class:`CheckpointError` naming it. The one weight reader of the ports, text encoders and VAEs."""
    by_file: dict[Path, list[KeyEntry]] = {}
    for e in entries:
        by_file.setdefault(files[e.torch_key], []).append(e)
    flat: dict[str, jax.Array] = {}
    bad = []
    for file, file_entries in by_file.items():
        try:
            with open_safetensors(file) as f:
                for e in file_entries:
                    raw = get_tensor(f, file, e.torch_key)
                    want = tuple(shapes[e.flax_path])
                    array = e.to_flax(raw) if math.prod(raw.shape) == math.prod(want) else raw
                    if tuple(array.shape) != want:
                        bad.append(
                            f"{file.name}: {e.torch_key} {tuple(raw.shape)} -> {e.flax_path}: config needs {want}"
                        )
                        continue
                    keep = any(re.search(p, e.flax_path) for p in keep_fp32)
                    flat[e.flax_path] = jnp.asarray(array, jnp.float32 if keep else dtype)
        except SafetensorsError as err:
            raise CheckpointError(str(err)) from err
    if bad:
        raise CheckpointMismatchError(f"{where}: {len(bad)} tensors have the wrong shape:\n" + "\n".join(bad))
    return flat


def load_pretrained(path: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[nn.Module, dict[str, Any]]:
    """Load a diffusers model directory into (Flax module, params).

    The port is picked from config.json's `_class_name`. Params are cast to `dtype`, except those
    diffusers keeps in float32 (the port's `keep_fp32`); the module computes in `dtype`.
    Apply with `model.apply({"params": params}, ...)`. A corrupt config.json, index or
    weights file (truncated, bad header, a shard missing a tensor) raises
    :class:`CheckpointError` naming the file before any tensor is loaded.
    """

    path = Path(path)
    port, config = read_config(path)
    entries = port.key_map(config)
    files = _weight_files(path)
    check_keys({e.torch_key for e in entries}, set(files), port.ignore_unexpected, f"checkpoint {path}")

    shapes = traverse_util.flatten_dict(port.param_shapes(config), sep="/")
    map_paths = {e.flax_path for e in entries}
    if map_paths != set(shapes):
        raise AssertionError(
            f"{port.module_cls.__name__} key map out of sync with the module: {sorted(map_paths ^ set(shapes))}"
        )

    flat = read_tensors(path, files, entries, {k: v.shape for k, v in shapes.items()}, dtype, port.keep_fp32)
    return port.module(config, dtype), traverse_util.unflatten_dict(flat, sep="/")


def _is_own_file(file: Path) -> bool:
    """Whether `file` carries save_pretrained's marker (safetensors metadata, the index's metadata
    or a config.json key); an unreadable file does not."""

    try:
        if file.suffix == ".safetensors":
            meta = read_header(file).get("__metadata__")
        else:
            meta = json.loads(file.read_bytes())
            if file.name == INDEX_NAME and isinstance(meta, dict):
                meta = meta.get("metadata")
    except (OSError, SafetensorsError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and meta.get(WRITER_KEY) == WRITER


def save_pretrained(
    path: str | os.PathLike,
    model_config: DiffusersConfig,
    params: dict[str, Any],
    max_shard_bytes: int | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Write `params` in diffusers layout: config.json plus one safetensors file, or shards and an
    index when `max_shard_bytes` is set and exceeded. Tensors keep their dtypes.

    `path` is a directory (created if missing; other files in it are kept). Its config.json,
    weights and index are replaced, and stale ones deleted, only if save_pretrained wrote them
    (they carry its `_jquant_writer` marker); any other such file raises FileExistsError naming
    it before anything is written, unless `overwrite=True`. Every file goes to a temporary file
    beside it and all are moved into place only once complete, so a failure while writing
    leaves the previous files as they were and no temporary files behind.
    """

    path = Path(path)
    port = port_for_config(model_config)
    entries = port.key_map(model_config)
    flat = traverse_util.flatten_dict(params, sep="/")
    check_keys({e.flax_path for e in entries}, set(flat), (), "params tree")
    tensors = {e.torch_key: np.ascontiguousarray(e.to_torch(np.asarray(flat[e.flax_path]))) for e in entries}

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, array in tensors.items():
        if max_shard_bytes is not None and shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = array
        size += array.nbytes

    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: exists and is not a directory; save_pretrained writes a model directory")
    path.mkdir(parents=True, exist_ok=True)
    candidates = (path / "config.json", path / WEIGHTS_NAME, path / INDEX_NAME, *sorted(path.glob(SHARD_GLOB)))
    existing = [f for f in candidates if f.exists() or f.is_symlink()]
    odd = [f.name for f in existing if f.is_symlink() or not f.is_file()]
    if odd:
        raise FileExistsError(f"{path}: {odd} are not regular files; save_pretrained will not replace them")
    foreign = [f.name for f in existing if not _is_own_file(f)]
    if foreign and not overwrite:
        raise FileExistsError(
            f"{path}: holds {foreign}, not written by save_pretrained; not replacing them "
            "(save to another directory, or pass overwrite=True)"
        )

    metadata = {"format": "pt", WRITER_KEY: WRITER}
    # In reverse order of commit: unwinding the stack below moves the weights into place first,
    # then the index, then config.json.
    config_json = json.dumps({**model_config.to_diffusers(), WRITER_KEY: WRITER}, indent=2) + "\n"
    outputs: dict[str, Any] = {"config.json": config_json}
    if len(shards) == 1:
        outputs[WEIGHTS_NAME] = shards[0]
    else:
        names = [f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        total = sum(a.nbytes for a in tensors.values())
        index = {"metadata": {"total_size": total, WRITER_KEY: WRITER}, "weight_map": weight_map}
        outputs[INDEX_NAME] = json.dumps(index, indent=2)
        outputs.update(zip(names, shards))
    with contextlib.ExitStack() as stack:
        for name, content in outputs.items():
            tmp = stack.enter_context(atomic_file(path / name))
            if isinstance(content, str):
                tmp.write_text(content)
            else:
                save_file(content, tmp, metadata=metadata)
    for stale in existing:
        if stale.name not in outputs:
            stale.unlink(missing_ok=True)


def init_params(config: DiffusersConfig, rng: jax.Array) -> dict[str, Any]:
    """Random float32 params for any port's config."""
    return port_for_config(config).init_params(config, rng)


def layer_roles(config: DiffusersConfig, params: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """Role labels of every Dense kernel, for the port of `config`."""
    return port_for_config(config).layer_roles(params)


def param_shapes(config: DiffusersConfig) -> dict[str, Any]:
    """Param tree of ShapeDtypeStructs for a config (no allocation)."""
    return port_for_config(config).param_shapes(config)
