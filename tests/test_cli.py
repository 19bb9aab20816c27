"""The `jquant` command line as a new user meets it: one-line errors with hints, `--debug`,
help on every option, every format listed. In-process (fast) except one subprocess run of
the real entry point."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jquant
import jquant.formats as F
from jquant import cli
from jquant.cli import demo, generate
from jquant.cli import quantize as pcli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jquant" / "models" / "assets" / "tiny_wan"
README_FORMATS = (
    "int8 int4 int3 int2 uint8 uint4 uint3 uint2 fp8_e4m3 fp8_e5m2 nf4 fp4 mxfp4 nvfp4 q8_0 q4_k q5_k q6_k "
    "q4_0 q4_1 q5_0 q5_1 q2_k q3_k"
).split()


def one_line_error(capsys, prog: str) -> str:
    """The captured stderr, asserted to be exactly one `prog: error: ...` line."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    return err


# --- listings and help ------------------------------------------------------------------------------
def test_formats_lists_every_format_of_the_registry(capsys):
    assert cli.main(["formats"]) == 0
    out = capsys.readouterr().out
    assert "SPEC   := FORMAT" in out  # the grammar
    listed = [
        ln.split()[0] for ln in out.split("default spec", 1)[1].splitlines()[1:] if ln and not ln.startswith("bits:")
    ]
    registry = [*F.FORMATS, *F.FP4_SCALINGS, *F.CODEC_FORMATS]
    assert listed == registry and sorted(listed) == sorted(README_FORMATS)
    assert re.search(r"^q4_k\s+codec\s+4\.5\s+q4_k/g256", out, re.M) and re.search(
        r"^nvfp4\s+table\s+4\s+nvfp4", out, re.M
    )


def _parsers() -> dict[str, argparse.ArgumentParser]:
    top = cli._parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    out = {"jquant": top, **{f"jquant {n}": p for n, p in subs.choices.items() if p.add_help}}
    out.update(
        {
            "jquant quantize": pcli.quantize_parser(),
            "jquant eval": pcli.eval_parser(),
            "jquant demo": demo.parser(),
            "jquant generate": generate.generate_parser(),
        }
    )
    return out


def test_every_subcommand_and_option_has_help(capsys):
    parsers = _parsers()
    assert set(parsers) == {
        "jquant",
        "jquant formats",
        "jquant export-gguf",
        "jquant quantize",
        "jquant eval",
        "jquant demo",
        "jquant generate",
    }
    for name, p in parsers.items():
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                helps = {c.dest: c.help for c in a._choices_actions}
                assert set(helps) == {"demo", "quantize", "eval", "formats", "export-gguf", "generate"} and all(
                    helps.values()
                )
            elif not isinstance(a, argparse._HelpAction):
                assert a.help and a.help != argparse.SUPPRESS, (name, a.dest)
        assert p.description or name == "jquant", name
    with pytest.raises(SystemExit) as e:
        cli.main(["export-gguf", "-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "the .gguf file to write" in out and "transformer/ subfolder" in out and "k-quant mix" in out


def test_quantize_list_needs_no_model_dir_and_separates_memory_only_recipes(capsys):
    from jquant.pipeline import recipes as rc

    assert cli.main(["quantize", "--list"]) == 0
    out = capsys.readouterr().out
    runnable = out.split("\n\n", 1)[0]
    assert all(f"  {n} " in runnable for n in pcli.savable_recipes())
    for n, r in rc.RECIPES.items():
        assert (f"  {n} " in runnable) == r.checkpointable  # quip2 is listed apart, with the reason
    assert "quip2" in out.split("In memory only", 1)[1]
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--recipe", "int8-w"])
    assert e.value.code == 2
    err = one_line_error(capsys, "jquant quantize")
    assert "missing MODEL_DIR, --out" in err


# --- one-line errors with hints ------------------------------------------------------------------
def test_recipe_typo_suggests_the_name(tmp_path, capsys):
    assert cli.main(["quantize", str(TINY), "--recipe", "int8-wa-smoth", "--out", str(tmp_path / "o")]) == 2
    assert "unknown recipe 'int8-wa-smoth'; did you mean 'int8-wa-smooth'" in one_line_error(capsys, "jquant quantize")
    assert cli.main(["demo", "--recipes", "int8-w,nf5", "--out", str(tmp_path / "d")]) == 2
    assert "did you mean 'nf4'" in one_line_error(capsys, "jquant demo")
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_pipeline_folder_gets_the_transformer_hint(tmp_path, capsys):
    pipe = tmp_path / "Wan2.1-T2V"
    for sub in ("transformer", "vae", "text_encoder"):
        (pipe / sub).mkdir(parents=True)
        (pipe / sub / "config.json").write_text("{}")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    assert cli.main(["export-gguf", str(pipe), str(tmp_path / "m.gguf")]) == 2
    err = one_line_error(capsys, "jquant export-gguf")
    assert "diffusers pipeline folder" in err and f"pass its transformer/ subfolder: {pipe / 'transformer'}" in err
    # quantize takes a Wan pipeline folder whole (it calibrates on prompts through its text
    # encoder): an incomplete one is named with the component it lacks, and nothing is written.
    assert cli.main(["quantize", str(pipe), "--recipe", "int8-w", "--out", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys, "jquant quantize")
    assert str(pipe / "model_index.json") in err and "component 'tokenizer' is missing" in err
    assert not (tmp_path / "o").exists()
    (pipe / "transformer_2").mkdir()
    (pipe / "transformer_2" / "config.json").write_text("{}")  # Wan2.2: two experts
    assert cli.main(["export-gguf", str(pipe), str(tmp_path / "m.gguf")]) == 2
    assert "(or transformer_2/)" in one_line_error(capsys, "jquant export-gguf")


def test_missing_or_wrong_folders(tmp_path, capsys):
    assert cli.main(["quantize", str(tmp_path / "nope"), "--recipe", "int8-w", "--out", str(tmp_path / "o")]) == 2
    assert "nope: no such folder" in one_line_error(capsys, "jquant quantize")
    (tmp_path / "parent" / "model").mkdir(parents=True)
    (tmp_path / "parent" / "model" / "config.json").write_text("{}")
    assert cli.main(["export-gguf", str(tmp_path / "parent"), str(tmp_path / "m.gguf")]) == 2
    assert f"did you mean {tmp_path / 'parent' / 'model'}?" in one_line_error(capsys, "jquant export-gguf")
    assert cli.main(["eval", str(tmp_path / "parent")]) == 2
    assert "not a `jquant quantize` output" in one_line_error(capsys, "jquant eval")


def _broken_model(tmp_path: Path) -> Path:
    d = tmp_path / "broken"
    d.mkdir()
    shutil.copy(TINY / "config.json", d / "config.json")
    (d / "diffusion_pytorch_model.safetensors").write_bytes(
        (TINY / "diffusion_pytorch_model.safetensors").read_bytes()[:100]
    )
    return d


def test_corrupt_shard_and_config_name_their_file(tmp_path, capsys):
    d = _broken_model(tmp_path)
    shard = str(d / "diffusion_pytorch_model.safetensors")
    assert cli.main(["quantize", str(d), "--recipe", "int8-w", "--out", str(tmp_path / "o")]) == 2
    assert shard in one_line_error(capsys, "jquant quantize")
    assert cli.main(["export-gguf", str(d), str(tmp_path / "m.gguf")]) == 2
    assert shard in one_line_error(capsys, "jquant export-gguf")
    (d / "config.json").write_text('{"_class_name": ')
    assert cli.main(["quantize", str(d), "--recipe", "int8-w", "--out", str(tmp_path / "o")]) == 2
    assert f"{d / 'config.json'}: not valid JSON" in one_line_error(capsys, "jquant quantize")


def test_bad_rule_regex_names_the_rule(capsys):
    params = {"blocks_0": {"kernel": np.ones((8, 8), np.float32)}}
    assert cli.run_command("jquant x", lambda: jquant.quantize_params(params, [("blocks_(0", "int8")])) == 2
    assert "blocks_(0" in one_line_error(capsys, "jquant x")


def test_error_messages_are_one_line():
    assert (
        cli.error_message(ValueError("3 tensors have the wrong shape:\n  a\n  b"))
        == "3 tensors have the wrong shape: a; b"
    )
    assert (
        cli.error_message(FileNotFoundError(2, "No such file or directory", "x.json"))
        == "x.json: No such file or directory"
    )
    assert cli.error_message(KeyError("unknown recipe 'w3'")) == "unknown recipe 'w3'"  # no KeyError quotes
    assert cli.error_message(ValueError("")) == "ValueError"
    long = cli.error_message(ValueError("x" * 5000))
    assert len(long) < 700 and long.endswith("(--debug prints all)")
    assert "pip install torch" in cli.error_message(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert "pip" not in cli.error_message(ModuleNotFoundError("No module named 'jquant.x'", name="jquant.x"))


def test_bugs_say_internal_error_and_debug_shows_the_traceback(capsys, monkeypatch):
    def bug() -> int:
        return 1 // 0

    assert cli.run_command("jquant x", bug) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: ZeroDivisionError" in err and "rerun with --debug" in err
    with pytest.raises(ZeroDivisionError):
        cli.run_command("jquant x", bug, debug=True)
    typo = ["quantize", str(TINY), "--recipe", "nf5", "--out", "o"]
    for argv in (["--debug", *typo], [*typo, "--debug"]):  # a global flag: anywhere on the line
        with pytest.raises(cli.UsageError, match="did you mean 'nf4'"):
            cli.main(argv)
    monkeypatch.setenv("JQUANT_DEBUG", "1")
    with pytest.raises(cli.UsageError):
        cli.main(typo)


def test_argparse_errors_are_one_line(capsys):
    for argv, prog, text in (
        (["quantize", "--steps", "x"], "jquant quantize", "invalid int value"),
        ([], "jquant", "required: COMMAND"),
        (["frobnicate"], "jquant", "invalid choice: 'frobnicate'"),
        (["demo", "--clips", "0"], "jquant demo", "--clips must be >= 1"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        assert text in one_line_error(capsys, prog)


def test_entry_point_exit_status_and_stderr(tmp_path):
    """The installed `jquant` script: exit status 2, one stderr line, no traceback."""
    exe = Path(sys.executable).with_name("jquant")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "jquant.cli"]
    r = subprocess.run(
        [*cmd, "quantize", str(tmp_path / "missing"), "--recipe", "int8-w", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "missing: no such folder" in r.stderr and "Traceback" not in r.stderr
