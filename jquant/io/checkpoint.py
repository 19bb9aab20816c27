"""orbax checkpoints of (quantized) param trees, bit-exact including QArray metadata.

Layout of a checkpoint directory::

    path/
      arrays/        orbax StandardCheckpointer output (a flat dict of numpy arrays)
      jquant.json    format marker, tree structure (each leaf's path, kind and QArray
                     metadata) and each array's shape, dtype and CRC-32

Every array is stored through a lossless bit view (8-bit floats as uint8, bfloat16 as
uint16) so the round trip is exact whatever dtypes the storage backend supports.

Saving never destroys data it did not write. :func:`save` replaces only a previous jquant
checkpoint (a directory holding nothing but ``arrays/`` and a ``jquant.json`` with the
format marker) or an empty directory; anything else (a file, a symlink, another directory)
raises :class:`CheckpointTargetError` and is left untouched. The new checkpoint is written
into a fresh hidden sibling directory and swapped in by renames only once complete; on any
failure the previous checkpoint is put back as it was and no temporary directory is left.
:func:`restore` checks the marker, the arrays and their checksums, so a damaged checkpoint
raises :class:`CheckpointError` naming it.

:func:`jquant.files.atomic_file` gives the single-file writers (GGUF, safetensors) the same guarantee:
a temporary file beside the target, fsync, ``os.replace``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jquant.files import fresh_sibling, fsync_path, unused_sibling
from jquant.formats import parse_spec
from jquant.qarray import QArray

FORMAT_VERSION = 1
FORMAT_MARKER = "jquant.io.checkpoint"  # jquant.json's "format": marks what save() may replace
META_NAME = "jquant.json"
ARRAYS_NAME = "arrays"
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
            meta = {
                "__qarray__": str(node.spec),
                "dtype": jnp.dtype(node.dtype).name,
                "pad": node.pad,
                "axis": node.axis,
                "fields": {},
            }
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
        return QArray(
            fields["qvalue"],
            fields.get("scale"),
            fields.get("zero_point"),
            fields.get("scale2"),
            spec=spec,
            dtype=jnp.dtype(skel["dtype"]),
            pad=skel["pad"],
            axis=skel["axis"],
        )
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


class CheckpointError(ValueError):
    """A jquant checkpoint that cannot be read: damaged metadata, missing or corrupt arrays."""


class CheckpointTargetError(FileExistsError):
    """A save target that is neither a previous jquant checkpoint nor an empty directory."""


# ----------------------------------------------------------------------------- save / restore

_NODE_KEYS = frozenset({"__dict__", "__list__", "__qarray__", "__array__", "__none__"})


def _is_own_meta(meta: Any) -> bool:
    """Whether parsed jquant.json contents were written by :func:`save`: the format marker, or
    (checkpoints from before the marker) version 1 with a tree of save()'s own node kinds."""
    if not isinstance(meta, dict):
        return False
    if "format" in meta:
        return meta["format"] == FORMAT_MARKER
    tree = meta.get("tree")
    return meta.get("version") == 1 and isinstance(tree, dict) and bool(_NODE_KEYS & set(tree))


def _not_a_checkpoint(path: Path, entries: list[str]) -> str | None:
    """Why the non-empty directory ``path`` is not a checkpoint save() may replace, or None."""
    meta_file = path / META_NAME
    if META_NAME not in entries or meta_file.is_symlink() or not meta_file.is_file():
        return f"directory is not a jquant checkpoint (no {META_NAME})"
    extra = [e for e in entries if e not in (META_NAME, ARRAYS_NAME)]
    if extra:
        return f"directory holds entries a jquant checkpoint does not have: {extra[:10]}"
    arrays = path / ARRAYS_NAME
    if arrays.is_symlink() or (arrays.exists() and not arrays.is_dir()):
        return f"{ARRAYS_NAME} is not a directory"
    try:
        meta = json.loads(meta_file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{META_NAME} is not valid JSON, so the directory is not recognisably a jquant checkpoint"
    if not _is_own_meta(meta):
        return f'{META_NAME} is not a jquant checkpoint\'s (no "format": "{FORMAT_MARKER}")'
    return None


def _target_state(path: Path) -> str:
    """'new', 'empty' or 'checkpoint': what :func:`save` finds at ``path``; anything it may not
    replace raises :class:`CheckpointTargetError` saying what it is."""
    refuse = (
        "save() replaces only a previous jquant checkpoint or an empty directory; left untouched "
        "(choose another path, or remove it yourself)"
    )
    if path.is_symlink():
        raise CheckpointTargetError(f"{path}: is a symlink; {refuse}")
    if not path.exists():
        return "new"
    if not path.is_dir():
        raise CheckpointTargetError(f"{path}: is a file, not a jquant checkpoint; {refuse}")
    entries = sorted(e.name for e in path.iterdir())
    if not entries:
        return "empty"
    why = _not_a_checkpoint(path, entries)
    if why:
        raise CheckpointTargetError(f"{path}: {why}; {refuse}")
    return "checkpoint"


def _array_info(a: np.ndarray) -> dict[str, Any]:
    """Shape, dtype and CRC-32 of a stored array, checked by :func:`restore`."""
    crc = zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return {"shape": list(a.shape), "dtype": a.dtype.name, "crc32": crc}


def _finish_swap(path: Path, tmp: Path, backup: Path | None) -> None:
    """save()'s cleanup, whatever happened: if the new checkpoint did not reach ``path``, put the
    previous one back and delete the temporary directory; if it did, delete the previous one."""
    if tmp.exists():  # the final rename did not happen
        try:
            if backup is not None and backup.exists():
                if path.exists() or path.is_symlink():
                    raise FileExistsError(f"{path} was created by something else during the save")
                os.rename(backup, path)
        except BaseException as e:
            msg = (
                f"{path}: the save failed and the previous checkpoint could not be moved back; it is intact at {backup}"
            )
            if isinstance(e, OSError):
                raise CheckpointError(msg) from e
            e.add_note(msg)  # an interrupt stays an interrupt
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    elif backup is not None and backup.exists():
        try:
            shutil.rmtree(backup)
        except OSError as e:
            warnings.warn(
                f"{path}: saved, but the previous checkpoint's copy {backup} could not be deleted: {e}", stacklevel=3
            )


def save(path: str | os.PathLike, tree: Any, *, overwrite: bool = True) -> Path:
    """Save a param tree (QArray leaves allowed) to the directory ``path``, atomically.

    ``path`` may be new, an empty directory or (with ``overwrite``) a previous jquant checkpoint;
    anything else raises :class:`CheckpointTargetError` before any work and is left untouched.
    The checkpoint is written to a hidden sibling directory and renamed into place once
    complete; a previous checkpoint is moved aside meanwhile and deleted only after the swap,
    or moved back if anything fails, so ``path`` ends with the old or the complete new
    checkpoint and no temporary directory remains beside it.
    """
    path = Path(path).absolute()
    if _target_state(path) == "checkpoint" and not overwrite:
        raise FileExistsError(f"checkpoint {path} exists and overwrite=False")
    arrays, skel = _encode_tree(_plain(tree))
    meta = {
        "format": FORMAT_MARKER,
        "version": FORMAT_VERSION,
        "tree": skel,
        "arrays": {k: _array_info(a) for k, a in arrays.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_sibling(path, "tmp", directory=True)
    backup = None
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / ARRAYS_NAME, arrays)
            ckptr.wait_until_finished()
        (tmp / META_NAME).write_text(json.dumps(meta))
        fsync_path(tmp / META_NAME)
        state = _target_state(path)  # again: something may have appeared at path meanwhile
        if state == "checkpoint" and not overwrite:
            raise FileExistsError(f"checkpoint {path} appeared during the save and overwrite=False")
        if state != "new":
            backup = unused_sibling(path, "old")
            os.rename(path, backup)
        os.rename(tmp, path)
        fsync_path(path.parent, directory=True)
    finally:
        _finish_swap(path, tmp, backup)
    return path


def _verify(path: Path, arrays: dict[str, np.ndarray], infos: Any) -> None:
    """Check the restored arrays against the shapes, dtypes and CRC-32s recorded at save."""
    where = path / ARRAYS_NAME
    if not isinstance(infos, dict):
        raise CheckpointError(f"{path / META_NAME}: corrupt: 'arrays' is not an object")
    missing = sorted(set(infos) - set(arrays))
    if missing:
        raise CheckpointError(f"{where}: array(s) {missing[:10]} recorded in {META_NAME} are missing")
    for key, info in infos.items():
        a = arrays[key]
        try:
            want = (tuple(info["shape"]), info["dtype"], int(info["crc32"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path / META_NAME}: corrupt: bad record for array {key!r}") from None
        if (a.shape, a.dtype.name) != want[:2]:
            raise CheckpointError(
                f"{where}: array {key!r} is {a.dtype.name}{list(a.shape)}, {META_NAME} "
                f"recorded {want[1]}{list(want[0])} (damaged checkpoint)"
            )
        got = _array_info(a)["crc32"]
        if got != want[2]:
            raise CheckpointError(
                f"{where}: array {key!r} is corrupt: CRC-32 {got:#010x}, {META_NAME} recorded {want[2]:#010x}"
            )


def restore(path: str | os.PathLike) -> Any:
    """Restore a tree written by :func:`save` (QArrays with their metadata).

    A missing ``jquant.json`` raises FileNotFoundError; damaged metadata, a missing ``arrays/``,
    unreadable (e.g. truncated) array files or arrays whose checksums differ from those recorded
    at save raise :class:`CheckpointError` naming the checkpoint.
    """
    path = Path(path).absolute()
    meta_file = path / META_NAME
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a jquant checkpoint (no {META_NAME})")
    try:
        meta = json.loads(meta_file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_file}: corrupt: not valid JSON ({e})") from None
    if not _is_own_meta(meta):
        raise CheckpointError(
            f'{meta_file}: not a jquant checkpoint\'s metadata (expected "format": "{FORMAT_MARKER}")'
        )
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('version')} != {FORMAT_VERSION}")
    arrays_dir = path / ARRAYS_NAME
    if not arrays_dir.is_dir():
        raise CheckpointError(f"{path}: {ARRAYS_NAME}/ is missing (incomplete or damaged checkpoint)")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(arrays_dir)
        arrays = {k: np.asarray(v) for k, v in restored.items()}
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(
            f"{arrays_dir}: cannot read the arrays (damaged or truncated file?): {type(e).__name__}: {e}"
        ) from e
    if "arrays" in meta:  # absent in checkpoints written before checksums were recorded
        _verify(path, arrays, meta["arrays"])
    try:
        return _decode_tree(meta["tree"], arrays)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"{meta_file}: corrupt: its tree does not match the stored arrays ({type(e).__name__}: {e})"
        ) from e
