"""The ``jquant`` command line: ``demo``, ``quantize``, ``eval``, ``formats``, ``export-gguf``.

Each subcommand is a thin wrapper over a library function, so scripts and notebooks can
call the same code directly.
"""

from __future__ import annotations

import argparse
import sys


def _formats(_: argparse.Namespace) -> int:
    import jquant.formats as f

    print(f.__doc__.split("Spec strings", 1)[1].split("\n", 1)[1])
    print(f"{'format':<10} {'kind':<6} {'bits':>4}")
    for name, fmt in f.FORMATS.items():
        print(f"{name:<10} {fmt.kind:<6} {fmt.bits:>4}")
    return 0


def _export_gguf(a: argparse.Namespace) -> int:
    from jquant.io.gguf import export_gguf

    report = export_gguf(a.model_dir, a.out, type=a.type, progress=True)
    print(f"wrote {report.path} ({report.bits_per_weight:.2f} bits per weight)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the demo owns its own options
        from jquant.demo import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] in (["quantize"], ["eval"]):  # the pipeline commands own their options too
        from jquant.pipeline import cli as pipeline_cli

        return (pipeline_cli.main_quantize if argv[0] == "quantize" else pipeline_cli.main_eval)(argv[1:])
    p = argparse.ArgumentParser(prog="jquant", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="quantize the bundled video model and compare (see `jquant demo -h`)")
    sub.add_parser("quantize", help="calibrate on the trajectory, apply a recipe, save (see `jquant quantize -h`)")
    sub.add_parser("eval", help="fidelity of a quantized checkpoint against its float model (see `jquant eval -h`)")
    sub.add_parser("formats", help="list number formats and the spec grammar").set_defaults(fn=_formats)
    g = sub.add_parser("export-gguf", help="write a diffusers model dir as a GGUF file (k-quant mix)")
    g.add_argument("model_dir")
    g.add_argument("out")
    g.add_argument("--type", default="Q4_K_M", choices=["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"])
    g.set_defaults(fn=_export_gguf)
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    raise SystemExit(main())
