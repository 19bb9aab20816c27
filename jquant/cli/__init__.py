"""The ``jquant`` command line: ``demo``, ``quantize``, ``eval``, ``generate``, ``formats``, ``export-gguf``.

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
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import jquant.formats as f
from jquant.algorithms.kquants import MIX_BASE
from jquant.cli import quantize as pipeline_cli
from jquant.cli.common import (
    DEBUG_FLAG,
    ArgumentParser,
    UsageError,
    check_model_dir,
    error_message,
    run_command,
)
from jquant.cli.demo import main as demo_main
from jquant.cli.generate import main_generate
from jquant.codecs import get_codec
from jquant.io.gguf import LAYOUTS, export_gguf
from jquant.io.gguf_layouts import FILE_TYPES

__all__ = ["DEBUG_FLAG", "ArgumentParser", "UsageError", "check_model_dir", "error_message", "main", "run_command"]


# --- subcommands ----------------------------------------------------------------------------------
def format_table() -> str:
    """Every format of :mod:`jquant.formats` (the plain formats, the block-scaled fp4 variants
    and the GGUF block codecs) with its kind, bits and default spec."""
    rows = []
    for name in [*f.FORMATS, *f.FP4_SCALINGS, *f.CODEC_FORMATS]:
        spec = f.parse_spec(name)
        fmt = spec.format
        if name in f.CODEC_FORMATS:
            c = get_codec(name)
            kind, bits = "codec", f"{c.bits_per_weight:g}"
            note = f"GGUF block codec: {c.block_elems}-value blocks of {c.block_bytes} bytes (bits include scales)"
        elif name in f.FP4_SCALINGS:
            scaling, group = f.FP4_SCALINGS[name]
            kind, bits = fmt.kind, str(fmt.bits)
            note = f"fp4 (e2m1) in {group}-value blocks, {'e8m0' if scaling == 'mx' else 'e4m3'} block scales" + (
                " and an fp32 tensor scale" if scaling == "nv" else ""
            )
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
    lines.append(
        "bits: per stored code before scales (int3/uint3 codes take 4-bit containers); for the GGUF "
        "codecs, per weight with the block scales."
    )
    return "\n".join(lines)


def _formats(_: argparse.Namespace) -> int:
    print(f.__doc__.split("Spec strings", 1)[1].split("\n", 1)[1].rstrip())
    print()
    print(format_table())
    return 0


def _export_gguf(a: argparse.Namespace) -> int:
    model_dir = check_model_dir(a.model_dir)
    out = Path(a.out)
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; pass the path of the .gguf file to write")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such folder (the output file's folder must exist)")
    mixes = sorted(FILE_TYPES) if a.layout == "comfy" else list(MIX_BASE)
    if a.type not in mixes:
        raise UsageError(f"--type {a.type} is not a {a.layout}-layout type; choose one of {', '.join(mixes)}")
    report = export_gguf(model_dir, out, type=a.type, layout=a.layout, progress=True)
    print(f"wrote {report.path} ({a.layout} layout, {report.bits_per_weight:.2f} bits per weight)")
    return 0


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="jquant",
        description="Quantization for diffusion and flow-matching transformers in JAX/Flax.",
        epilog=f"{DEBUG_FLAG} (anywhere on the command line) prints the full traceback of an error.",
    )
    p.add_argument(DEBUG_FLAG, action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("demo", help="quantize the bundled video model and compare (see `jquant demo -h`)", add_help=False)
    sub.add_parser(
        "quantize", help="calibrate on the trajectory, apply a recipe, save (see `jquant quantize -h`)", add_help=False
    )
    sub.add_parser(
        "eval", help="fidelity of a quantized checkpoint against its float model (see `jquant eval -h`)", add_help=False
    )
    sub.add_parser(
        "generate",
        help="a prompt to a clip or an image from a diffusers pipeline folder (see `jquant generate -h`)",
        add_help=False,
    )
    sub.add_parser(
        "formats",
        help="list every number format and the spec grammar",
        description="List every number format of jquant.formats and the spec string grammar.",
    ).set_defaults(fn=_formats)
    g = sub.add_parser(
        "export-gguf",
        help="write a diffusers model folder as a GGUF file (k-quant mix)",
        description="Quantize a diffusers model folder (config.json + safetensors) into one GGUF file: in jquant's "
        "layout (diffusers names, the codec of each tensor picked by layer role as llama.cpp's mixes do) or in the "
        "community layout ComfyUI-GGUF loads (--layout comfy: original names, its per-tensor type rules); "
        "docs/gguf.md.",
    )
    g.add_argument(
        "model_dir",
        help="diffusers model folder (config.json + safetensors); for a pipeline folder, its transformer/ subfolder",
    )
    g.add_argument("out", help="the .gguf file to write")
    g.add_argument(
        "--type",
        default="Q4_K_M",
        choices=sorted(set(list(MIX_BASE)) | set(FILE_TYPES)),
        metavar="TYPE",
        help="the k-quant mix (default Q4_K_M). jquant layout: "
        + ", ".join(list(MIX_BASE))
        + " (jquant's mixes by layer role); comfy layout: llama.cpp's file types "
        + ", ".join(sorted(FILE_TYPES))
        + " (ComfyUI-GGUF's per-tensor rules)",
    )
    g.add_argument(
        "--layout",
        default="jquant",
        choices=list(LAYOUTS),
        help="tensor names and type rules: jquant (diffusers names, any ported model) or comfy (the original "
        "checkpoint names, fused tensors and types ComfyUI-GGUF writes and loads: Wan, Flux, HunyuanVideo, "
        "LTX-Video); default jquant",
    )
    g.set_defaults(fn=_export_gguf)
    return p


def _dispatch(argv: Sequence[str]) -> Callable[[], int]:
    if argv[:1] == ["demo"]:  # the demo owns its own options

        def demo() -> int:
            return demo_main(list(argv[1:]))

        return demo
    if argv[:1] in (["quantize"], ["eval"]):  # the pipeline commands own their options too

        def pipeline() -> int:
            return (pipeline_cli.main_quantize if argv[0] == "quantize" else pipeline_cli.main_eval)(list(argv[1:]))

        return pipeline
    if argv[:1] == ["generate"]:  # generate owns its options too
        return lambda: main_generate(list(argv[1:]))
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
