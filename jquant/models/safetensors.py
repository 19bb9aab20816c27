"""Reading diffusers-style safetensors (single file, directory, or sharded with an index).

No network, no torch: tensors are read as numpy arrays (bfloat16 via ml_dtypes). A truncated
or corrupt file, or an index naming a shard that does not hold a tensor, raises
:class:`SafetensorsError` naming the file before any tensor is read.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

INDEX_SUFFIX = ".safetensors.index.json"
_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header


class SafetensorsError(ValueError):
    """A safetensors file or index that cannot be read (truncated, corrupt or inconsistent)."""


def read_header(file: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size.

    Reads only the header, so it is cheap enough to run on every shard before loading; a file
    shorter than its header says raises :class:`SafetensorsError` with both sizes.
    """
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{file}: truncated: {size} bytes, too short for the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER:
            raise SafetensorsError(f"{file}: corrupt: header length field says {n} bytes (not a safetensors file?)")
        if n > size - 8:
            raise SafetensorsError(f"{file}: truncated: header says {n} bytes of JSON header, file has {size - 8}")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{file}: corrupt: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{file}: corrupt: header is a JSON {type(header).__name__}, not an object")
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise SafetensorsError(f"{file}: corrupt: tensor {name!r} has no valid data_offsets ({info!r:.80})")
        data_end = max(data_end, offsets[1])
    have = size - 8 - n
    if data_end > have:
        raise SafetensorsError(f"{file}: truncated: header says {data_end} bytes of tensor data, file has {have}")
    return header


@contextlib.contextmanager
def open_safetensors(file: str | os.PathLike) -> Iterator[Any]:
    """``safe_open(file, framework="np")`` after :func:`read_header`'s checks; errors name the file."""
    file = Path(file)
    read_header(file)
    try:
        handle = safe_open(file, framework="np")
    except (SafetensorError, ValueError, TypeError) as e:
        raise SafetensorsError(f"{file}: not a readable safetensors file ({e})") from e
    with handle as h:
        yield h


def get_tensor(handle: Any, file: str | os.PathLike, name: str) -> np.ndarray:
    """``handle.get_tensor(name)`` with errors naming the file and the tensor."""
    try:
        return handle.get_tensor(name)
    except (SafetensorError, ValueError, TypeError, KeyError) as e:
        raise SafetensorsError(f"{file}: tensor {name!r} cannot be read ({type(e).__name__}: {e})") from e


def weight_files(path: str | os.PathLike) -> dict[str, Path]:
    """Map each tensor name to the file that holds it.

    ``path`` may be a ``.safetensors`` file, a ``*.safetensors.index.json`` file, or a
    directory holding exactly one index or one or more safetensors files. Every file's header
    is checked (:func:`read_header`), and an index must name existing shards that hold the
    tensors it maps to them.
    """
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
        if len(indexes) > 1:
            raise ValueError(f"{path}: several safetensors indexes {[p.name for p in indexes]}; pass one")
        if indexes:
            path = indexes[0]
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{path}: no *.safetensors or {INDEX_SUFFIX} file")
            out: dict[str, Path] = {}
            for f in files:
                out.update(weight_files(f))
            return out
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.name.endswith(INDEX_SUFFIX):
        return _index_files(path)
    return {k: path for k in read_header(path) if k != "__metadata__"}


def _index_files(index: Path) -> dict[str, Path]:
    """The weight map of a shard index, checked against the shards' headers."""
    try:
        raw = json.loads(index.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{index}: corrupt index: not valid JSON ({e})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise SafetensorsError(f"{index}: not a safetensors index (no 'weight_map' of tensor -> file name)")
    missing = sorted({f for f in weight_map.values() if not (index.parent / f).is_file()})
    if missing:
        raise FileNotFoundError(f"{index}: shard file(s) missing: {missing}")
    held = {f: read_header(index.parent / f) for f in set(weight_map.values())}
    absent = sorted(f"{k!r} -> {f}" for k, f in weight_map.items() if k == "__metadata__" or k not in held[f])
    if absent:
        raise SafetensorsError(
            f"{index}: maps tensors to shards that do not hold them: {absent[:10]}"
            + (f" and {len(absent) - 10} more" if len(absent) > 10 else "")
        )
    return {k: index.parent / f for k, f in weight_map.items()}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flat ``{tensor name: numpy array}`` from a file, index or directory."""
    by_file: dict[Path, list[str]] = {}
    for k, f in weight_files(path).items():
        by_file.setdefault(f, []).append(k)
    out: dict[str, np.ndarray] = {}
    for f, keys in by_file.items():
        with open_safetensors(f) as h:
            for k in keys:
                out[k] = get_tensor(h, f, k)
    return out


def unflatten(flat: dict[str, Any], sep: str = ".") -> dict[str, Any]:
    """``{'a.b.c': x}`` -> ``{'a': {'b': {'c': x}}}``; clashing names raise."""
    tree: dict[str, Any] = {}
    for key, v in flat.items():
        node = tree
        *parents, leaf = key.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"tensor name {key!r} clashes with a tensor at {p!r}")
        if leaf in node:
            raise ValueError(f"tensor name {key!r} clashes with a group of the same name")
        node[leaf] = v
    return tree


def load_safetensors_tree(path: str | os.PathLike) -> dict[str, Any]:
    """Nested dict of numpy arrays, split on '.' (diffusers module paths)."""
    return unflatten(read_safetensors(path))
