"""Reading diffusers-style safetensors (single file, directory, or sharded with an index).

No network, no torch: tensors are read as numpy arrays (bfloat16 via ml_dtypes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

INDEX_SUFFIX = ".safetensors.index.json"


def weight_files(path: str | os.PathLike) -> dict[str, Path]:
    """Map each tensor name to the file that holds it.

    ``path`` may be a ``.safetensors`` file, a ``*.safetensors.index.json`` file, or a
    directory holding exactly one index or one or more safetensors files.
    """
    from safetensors import safe_open

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
        weight_map = json.loads(path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path}: not a safetensors index (no 'weight_map')")
        missing = sorted({f for f in weight_map.values() if not (path.parent / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{path}: shard file(s) missing: {missing}")
        return {k: path.parent / f for k, f in weight_map.items()}
    with safe_open(path, framework="np") as f:
        return {k: path for k in f.keys()}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flat ``{tensor name: numpy array}`` from a file, index or directory."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for k, f in weight_files(path).items():
        by_file.setdefault(f, []).append(k)
    out: dict[str, np.ndarray] = {}
    for f, keys in by_file.items():
        with safe_open(f, framework="np") as h:
            for k in keys:
                out[k] = h.get_tensor(k)
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
