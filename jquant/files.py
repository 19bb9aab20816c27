"""Atomic file writing: a write either completes or leaves the old file as it was.

Floor 0 (standard library only): the checkpoint, safetensors, GGUF and model writers share it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator


def _sibling_name(path: Path, tag: str) -> Path:
    """A random hidden sibling name of ``path``: ``.NAME.TAG-<8 hex digits>``."""
    return path.with_name(f".{path.name[:180]}.{tag}-{secrets.token_hex(4)}")


def unused_sibling(path: Path, tag: str) -> Path:
    """A hidden sibling name of ``path`` that does not exist now (a rename target)."""
    while True:
        cand = _sibling_name(path, tag)
        if not (cand.exists() or cand.is_symlink()):
            return cand


def fresh_sibling(path: Path, tag: str, *, directory: bool = False) -> Path:
    """Create a new hidden sibling of ``path`` (``.NAME.TAG-<random>``) and return it.

    Made with the default mode, so the umask applies (``mkdtemp``/``mkstemp`` make it private,
    and a file or directory renamed into place would stay private)."""
    for _ in range(100):
        cand = _sibling_name(path, tag)
        try:
            if directory:
                os.mkdir(cand)
            else:
                os.close(os.open(cand, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return cand
    raise FileExistsError(f"{path.parent}: cannot find a free temporary name for {path.name}")


def fsync_path(path: Path, *, directory: bool = False) -> None:
    """Flush a file's data (or a directory's entries: best effort) to disk before a rename
    publishes it, so a crash cannot leave a complete-looking but empty file."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def check_file_target(path: Path) -> None:
    """Refuse an output file path that is a directory or a symlink: ``os.replace`` fails on the
    first after all the work, and on the second replaces the link, not the file it points to."""
    if path.is_symlink():
        raise FileExistsError(
            f"{path}: is a symlink; not replacing it (write to the file it points to, or remove the link)"
        )
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory; expected the name of an output file")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Write one file atomically: yields a fresh temporary path beside ``path`` for the caller to
    write; on success it is fsynced and moved onto ``path`` with ``os.replace``, on any exception
    deleted. ``path`` ends with its old or its complete new contents, never a half file.

    An existing regular file at ``path`` is replaced (the caller names it as its output); a
    directory or a symlink raises before anything is written."""
    path = Path(path).absolute()
    check_file_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_sibling(path, "tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent, directory=True)
    finally:
        tmp.unlink(missing_ok=True)
