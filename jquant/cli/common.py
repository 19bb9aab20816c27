"""What every ``jquant`` subcommand shares: one-line errors with hints, and the argument parser.

A mistake in the input (a missing or wrong folder, a corrupt file, an unknown recipe, a bad
regex) is one line ``jquant CMD: error: ...`` on stderr and exit status 2; an unexpected
exception (a bug) one ``internal error`` line and status 1; ``--debug`` (anywhere on the
command line) or ``JQUANT_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, NoReturn

from safetensors import SafetensorError

DEBUG_FLAG = "--debug"
_PIP_NAMES = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml"}  # import name -> pip name
_MAX_MESSAGE = 600  # characters of a (joined) multi-line error message printed without --debug


class UsageError(ValueError):
    """A command-line mistake the CLI detects itself; printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: msg (see `prog -h`)``, exit status 2)
    instead of the usage block followed by the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} -h`)\n")


# --- checks with hints ----------------------------------------------------------------------------
def check_model_dir(path: str | os.PathLike) -> Path:
    """``path`` if it looks like a diffusers model folder (``config.json``), else a
    :class:`FileNotFoundError` that says what to pass instead: the ``transformer/``
    subfolder of a diffusers *pipeline* folder (``model_index.json``), a model folder one
    level down, or just that the folder does not exist."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such folder (expected a diffusers model folder with config.json)")
    if not p.is_dir():
        raise NotADirectoryError(f"{p} is a file; pass the model folder that holds config.json and the safetensors")
    if (p / "config.json").is_file():
        try:
            json.loads((p / "config.json").read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{p / 'config.json'}: not valid JSON ({e})") from e
        return p
    subs = sorted(d.name for d in p.iterdir() if d.is_dir() and (d / "config.json").is_file())
    if (p / "model_index.json").is_file():
        denoisers = [s for s in subs if s.startswith("transformer")] or [s for s in subs if s == "unet"]
        if denoisers:
            more = f" (or {', '.join(s + '/' for s in denoisers[1:])})" if len(denoisers) > 1 else ""
            raise FileNotFoundError(
                f"{p} is a diffusers pipeline folder (model_index.json), not a model folder; pass its "
                f"{denoisers[0]}/ subfolder{more}: {p / denoisers[0]}"
            )
        raise FileNotFoundError(
            f"{p} is a diffusers pipeline folder (model_index.json) with no transformer/ subfolder; pass the "
            f"denoiser's subfolder (folders with a config.json: {', '.join(subs) or 'none'})"
        )
    hint = (
        f"; did you mean {p / subs[0]}?"
        if len(subs) == 1
        else (f"; subfolders with a config.json: {', '.join(subs)}" if subs else "")
    )
    raise FileNotFoundError(f"{p} has no config.json (expected a diffusers model folder){hint}")


# --- error reporting ------------------------------------------------------------------------------
def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input or environment, not a bug in jquant."""
    return (ValueError, OSError, KeyError, ImportError, re.error, SafetensorError)  # the last: a corrupt .safetensors


def error_message(e: BaseException) -> str:
    """One line describing ``e`` (multi-line messages joined with '; ', long ones cut)."""
    if isinstance(e, re.error):
        pattern = e.pattern.decode() if isinstance(e.pattern, bytes) else e.pattern
        msg = f"bad regular expression {pattern!r}: {e.msg}" + (f" at position {e.pos}" if e.pos is not None else "")
    elif isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        msg = e.args[0]  # str(KeyError) would quote it
    elif isinstance(e, OSError) and e.strerror and e.filename and str(e).startswith("[Errno"):
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e)
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else type(e).__name__
    for ln in lines[1:]:
        msg += (" " if msg.endswith(":") else "; ") + ln
    top = (getattr(e, "name", None) or "").split(".")[0]
    if (
        isinstance(e, ModuleNotFoundError)
        and top
        and top not in ("jquant", "pallas_kernels")
        and "pip install" not in msg
    ):
        msg += f" (install it: pip install {_PIP_NAMES.get(top, top.replace('_', '-'))})"
    if len(msg) > _MAX_MESSAGE:
        msg = msg[: _MAX_MESSAGE - 1] + "… (--debug prints all)"
    return msg


def run_command(prog: str, fn: Callable[[], int], debug: bool = False) -> int:
    """Run ``fn``; turn exceptions into one line on stderr (exit 2 for input errors, 1 for
    bugs) unless ``debug``, where they propagate with their traceback."""
    try:
        return fn()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if debug:
            raise
        print(f"{prog}: error: {error_message(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: say so, and how to see where
        if debug:
            raise
        print(
            f"{prog}: internal error: {type(e).__name__}: {error_message(e)} (a bug in jquant; rerun with "
            f"{DEBUG_FLAG} for the traceback and report it)",
            file=sys.stderr,
        )
        return 1
