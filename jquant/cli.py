"""The ``jquant`` command line: ``demo``, ``quantize``, ``eval``, ``formats``, ``export-gguf``.

Each subcommand is a thin wrapper over a library function, so scripts and notebooks can
call the same code directly.

Errors: a mistake in the input (a missing or wrong folder, a corrupt file, an unknown recipe,
a bad regex) prints one line ``jquant CMD: error: ...`` on stderr and exits with status 2;
an unexpected exception (a bug) prints one ``internal error`` line and exits with status 1.
``--debug`` (anywhere on the command line) or ``JQUANT_DEBUG=1`` shows the full traceback
instead.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, NoReturn, Sequence

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
        import json

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
    hint = f"; did you mean {p / subs[0]}?" if len(subs) == 1 else (f"; subfolders with a config.json: {', '.join(subs)}" if subs else "")
    raise FileNotFoundError(f"{p} has no config.json (expected a diffusers model folder){hint}")


def unknown_recipe_message(name: str, known: Iterable[str]) -> str:
    """``unknown recipe 'x'; did you mean 'y'?`` (difflib), or why a registered-but-missing
    recipe is not available."""
    from jquant.pipeline import recipes as rc

    if name in rc.MISSING:
        return f"recipe {name!r} is not available: {rc.MISSING[name]}"
    known = list(known)
    close = difflib.get_close_matches(name, known, n=2, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; known: {', '.join(known)}"
    return f"unknown recipe {name!r}{hint} (`jquant quantize --list` describes them)"


class UnknownRecipeError(KeyError):
    """An unknown recipe name (a KeyError, like :func:`jquant.pipeline.recipes.get`'s), printed without
    KeyError's quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# --- error reporting ------------------------------------------------------------------------------
def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input or environment, not a bug in jquant."""
    errs: list[type[BaseException]] = [ValueError, OSError, KeyError, ImportError, re.error]
    try:
        from safetensors import SafetensorError  # a corrupt or truncated .safetensors file

        errs.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a base dependency
        pass
    return tuple(errs)


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
    if isinstance(e, ModuleNotFoundError) and top and top not in ("jquant", "pallas_kernels") and "pip install" not in msg:
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
        print(f"{prog}: internal error: {type(e).__name__}: {error_message(e)} (a bug in jquant; rerun with "
              f"{DEBUG_FLAG} for the traceback and report it)", file=sys.stderr)
        return 1


# --- subcommands ----------------------------------------------------------------------------------
def format_table() -> str:
    """Every format of :mod:`jquant.formats` (the plain formats, the block-scaled fp4 variants
    and the GGUF block codecs) with its kind, bits and default spec."""
    import jquant.formats as f

    rows = []
    for name in [*f.FORMATS, *f.FP4_SCALINGS, *f.CODEC_FORMATS]:
        spec = f.parse_spec(name)
        fmt = spec.format
        if name in f.CODEC_FORMATS:
            from jquant.codecs import get_codec

            c = get_codec(name)
            kind, bits = "codec", f"{c.bits_per_weight:g}"
            note = f"GGUF block codec: {c.block_elems}-value blocks of {c.block_bytes} bytes (bits include scales)"
        elif name in f.FP4_SCALINGS:
            scaling, group = f.FP4_SCALINGS[name]
            kind, bits = fmt.kind, str(fmt.bits)
            note = f"fp4 (e2m1) in {group}-value blocks, {'e8m0' if scaling == 'mx' else 'e4m3'} block scales" + (
                " and an fp32 tensor scale" if scaling == "nv" else "")
        else:
            kind, bits = fmt.kind, str(fmt.bits)
            if fmt.kind == "int":
                note = f"{'signed, symmetric' if fmt.signed else 'unsigned, zero points'}; codes {fmt.qmin:g}..{fmt.qmax:g}"
            elif fmt.kind == "table":
                note = f"{len(fmt.table)}-value codebook, max |x| {fmt.qmax:g}"
            else:
                note = f"stored as {fmt.storage}, max |x| {fmt.qmax:g}"
        rows.append((name, kind, bits, str(spec), note))
    head = ("format", "kind", "bits", "default spec", "notes")
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = [f"{head[0]:<{w[0]}}  {head[1]:<{w[1]}}  {head[2]:>{w[2]}}  {head[3]:<{w[3]}}  {head[4]}"]
    lines += [f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]:<{w[3]}}  {r[4]}" for r in rows]
    lines.append("bits: per stored code before scales (int3/uint3 codes take 4-bit containers); for the GGUF "
                 "codecs, per weight with the block scales.")
    return "\n".join(lines)


def _formats(_: argparse.Namespace) -> int:
    import jquant.formats as f

    print(f.__doc__.split("Spec strings", 1)[1].split("\n", 1)[1].rstrip())
    print()
    print(format_table())
    return 0


def _export_gguf(a: argparse.Namespace) -> int:
    from jquant.io.gguf import export_gguf

    model_dir = check_model_dir(a.model_dir)
    out = Path(a.out)
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; pass the path of the .gguf file to write")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such folder (the output file's folder must exist)")
    report = export_gguf(model_dir, out, type=a.type, progress=True)
    print(f"wrote {report.path} ({report.bits_per_weight:.2f} bits per weight)")
    return 0


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="jquant", description="Quantization for diffusion and flow-matching transformers in JAX/Flax.",
        epilog=f"{DEBUG_FLAG} (anywhere on the command line) prints the full traceback of an error.",
    )
    p.add_argument(DEBUG_FLAG, action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("demo", help="quantize the bundled video model and compare (see `jquant demo -h`)", add_help=False)
    sub.add_parser("quantize", help="calibrate on the trajectory, apply a recipe, save (see `jquant quantize -h`)",
                   add_help=False)
    sub.add_parser("eval", help="fidelity of a quantized checkpoint against its float model (see `jquant eval -h`)",
                   add_help=False)
    sub.add_parser("formats", help="list every number format and the spec grammar",
                   description="List every number format of jquant.formats and the spec string grammar.").set_defaults(fn=_formats)
    g = sub.add_parser(
        "export-gguf", help="write a diffusers model folder as a GGUF file (k-quant mix)",
        description="Quantize a diffusers model folder (config.json + safetensors) into one GGUF file, the codec "
                    "of each tensor picked by layer role as llama.cpp's mixes do (docs/gguf.md).",
    )
    g.add_argument("model_dir", help="diffusers model folder (config.json + safetensors); for a pipeline folder, its "
                                     "transformer/ subfolder")
    g.add_argument("out", help="the .gguf file to write")
    g.add_argument("--type", default="Q4_K_M", choices=["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"],
                   help="the k-quant mix (default Q4_K_M: Q4_K base, Q6_K on the protected layers)")
    g.set_defaults(fn=_export_gguf)
    return p


def _dispatch(argv: Sequence[str]) -> Callable[[], int]:
    if argv[:1] == ["demo"]:  # the demo owns its own options
        def demo() -> int:
            from jquant.demo import main as demo_main

            return demo_main(list(argv[1:]))

        return demo
    if argv[:1] in (["quantize"], ["eval"]):  # the pipeline commands own their options too
        def pipeline() -> int:
            from jquant.pipeline import cli as pipeline_cli

            return (pipeline_cli.main_quantize if argv[0] == "quantize" else pipeline_cli.main_eval)(list(argv[1:]))

        return pipeline
    a = _parser().parse_args(argv)
    return lambda: a.fn(a)


def main(argv: Sequence[str] | None = None) -> int:
    """``jquant [--debug] COMMAND ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    debug = DEBUG_FLAG in argv[:cut] or os.environ.get("JQUANT_DEBUG", "") not in ("", "0")
    argv = [x for i, x in enumerate(argv) if i >= cut or x != DEBUG_FLAG]
    prog = "jquant" + (f" {argv[0]}" if argv and not argv[0].startswith("-") else "")
    return run_command(prog, lambda: _dispatch(argv)(), debug)


if __name__ == "__main__":
    raise SystemExit(main())
