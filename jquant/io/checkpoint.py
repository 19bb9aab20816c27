"""orbax checkpoints of (quantized) param trees, bit-exact including QArray metadata.

Layout of a checkpoint directory::

    path/
      arrays/        orbax StandardCheckpointer output (a flat dict of numpy arrays)
      jquant.json    tree structure: for each leaf its path, kind and QArray metadata

Every array is stored through a lossless bit view (8-bit floats as uint8, bfloat16 as
uint16) so the round trip is exact whatever dtypes the storage backend supports. A save
writes into a fresh sibling directory and swaps it in with ``os.replace`` only once
complete, so a failed or interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import parse_spec
from jquant.qarray import QArray

FORMAT_VERSION = 1
_FIELDS = ("qvalue", "scale", "zero_point", "scale2")
_BIT_VIEW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _to_storable(x: Any) -> tuple[np.ndarray, str]:
    a = np.asarray(jax.device_get(x))
    dt = a.dtype
    if dt.kind in "iub" or dt in (np.float32, np.float64):
        return a, dt.name
    return a.view(_BIT_VIEW[dt.itemsize]), dt.name  # float16/bfloat16/float8: bit view


def _from_storable(a: np.ndarray, dtype: str) -> np.ndarray:
    target = jnp.dtype(dtype)
    a = np.asarray(a)
    return a if a.dtype == target else a.view(target)


def _encode_tree(tree: Any) -> tuple[dict[str, np.ndarray], Any]:
    """Flat {key: array} plus a JSON-able skeleton of the tree."""
    arrays: dict[str, np.ndarray] = {}

    def enc(node: Any) -> Any:
        if isinstance(node, QArray):
            meta = {"__qarray__": str(node.spec), "dtype": jnp.dtype(node.dtype).name, "pad": node.pad,
                    "axis": node.axis, "fields": {}}
            for f in _FIELDS:
                v = getattr(node, f)
                if v is not None:
                    key = f"a{len(arrays)}"
                    arrays[key], dt = _to_storable(v)
                    meta["fields"][f] = [key, dt]
            return meta
        if isinstance(node, dict):
            return {"__dict__": {str(k): enc(v) for k, v in node.items()}}
        if isinstance(node, (list, tuple)):
            return {"__list__": [enc(v) for v in node], "tuple": isinstance(node, tuple)}
        if node is None:
            return {"__none__": True}
        if hasattr(node, "shape") or isinstance(node, (int, float, np.number)):
            key = f"a{len(arrays)}"
            arrays[key], dt = _to_storable(node)
            return {"__array__": key, "dtype": dt}
        raise TypeError(f"cannot checkpoint a leaf of type {type(node).__name__}; use dicts, lists, arrays and QArrays")

    return arrays, enc(tree)


def _decode_tree(skel: Any, arrays: dict[str, np.ndarray]) -> Any:
    if "__qarray__" in skel:
        spec = parse_spec(skel["__qarray__"])
        fields = {f: jnp.asarray(_from_storable(arrays[k], dt)) for f, (k, dt) in skel["fields"].items()}
        return QArray(fields["qvalue"], fields.get("scale"), fields.get("zero_point"), fields.get("scale2"),
                      spec=spec, dtype=jnp.dtype(skel["dtype"]), pad=skel["pad"], axis=skel["axis"])
    if "__dict__" in skel:
        return {k: _decode_tree(v, arrays) for k, v in skel["__dict__"].items()}
    if "__list__" in skel:
        items = [_decode_tree(v, arrays) for v in skel["__list__"]]
        return tuple(items) if skel["tuple"] else items
    if "__none__" in skel:
        return None
    return jnp.asarray(_from_storable(arrays[skel["__array__"]], skel["dtype"]))


def _plain(tree: Any) -> Any:
    """nnx.State / FrozenDict -> plain nested dicts (QArrays kept)."""
    if hasattr(tree, "to_pure_dict"):
        tree = tree.to_pure_dict()
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    return tree


def save(path: str | os.PathLike, tree: Any, *, overwrite: bool = True) -> Path:
    """Save a param tree (QArray leaves allowed) to ``path`` atomically."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"checkpoint {path} exists and overwrite=False")
    arrays, skel = _encode_tree(_plain(tree))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "arrays", arrays)
            ckptr.wait_until_finished()
        (tmp / "jquant.json").write_text(json.dumps({"version": FORMAT_VERSION, "tree": skel}))
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def restore(path: str | os.PathLike) -> Any:
    """Restore a tree written by :func:`save` (QArrays with their metadata)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta_file = path / "jquant.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not a jquant checkpoint (no jquant.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {meta.get('version')} != {FORMAT_VERSION}")
    with ocp.StandardCheckpointer() as ckptr:
        arrays = ckptr.restore(path / "arrays")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    return _decode_tree(meta["tree"], arrays)
