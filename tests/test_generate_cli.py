"""`jquant generate` on a tiny random WanPipeline saved by diffusers: GIF, mp4 and PNG frames with the
expected frame count, the memory report printed; bad input gives one line and exit status 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from test_t2v import save_wan_pipeline

from jquant import cli
from jquant.pipeline.t2v import frames as t2v_frames

pytest.importorskip("diffusers")

PROMPT = ["--prompt", "a red fox runs through the snow", "--negative-prompt", "the rain", "--steps", "2", "--seed", "3"]
# 16x32, the size of docs/pipelines.md's example (test_docs_example_runs): the same prompts, shapes and
# default policy, so that example reads this test's compiled programs back from the compilation cache
BASE = [*PROMPT, "--frames", "5", "--height", "16", "--width", "32"]


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wan_cli")
    save_wan_pipeline(root)
    return root


def test_generate_writes_gif_mp4_and_frames(wan_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gif = tmp_path / "clip.gif"
    assert cli.main(["generate", str(wan_dir), *BASE, "--out", str(gif)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {gif} (5 frames, 16x32)" in out
    for name in ("text_encoder", "transformer", "vae", "pipeline"):
        assert name in out
    assert "int8 weight-only" in out and "bfloat16" in out  # the default policy, reported
    frames = iio.imread(gif, index=None)
    assert frames.shape[:3] == (5, 16, 32) and frames.std() > 0

    mp4 = tmp_path / "clip.mp4"
    args = ["generate", str(wan_dir), *BASE, "--dtype", "float32", "--vae-dtype", "float32", "--text-encoder", "float"]
    args += ["--offload", "vae"]
    assert cli.main([*args, "--out", str(mp4)]) == 0
    n, _ = t2v_frames.imageio_ffmpeg.count_frames_and_secs(str(mp4))
    assert n == 5

    folder = tmp_path / "frames"
    assert cli.main([*args, "--out", str(folder)]) == 0
    pngs = sorted(folder.glob("frame_*.png"))
    assert len(pngs) == 5 and iio.imread(pngs[0]).shape == (16, 32, 3)
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left behind


def test_generate_bad_input_is_one_line(
    wan_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(*args: str) -> str:
        assert cli.main(["generate", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("jquant generate: error:") and "\n" not in err
        return err

    assert "model_index.json" in run(str(wan_dir / "vae"), *BASE, "--out", str(tmp_path / "a.gif"))
    gif = ["--out", str(tmp_path / "a.gif")]
    assert "16 x 16" in run(str(wan_dir), *PROMPT, "--frames", "5", "--height", "24", "--width", "16", *gif)
    assert "1 + 2k frames" in run(str(wan_dir), *PROMPT, "--frames", "4", "--height", "16", "--width", "16", *gif)
    assert "unknown output type" in run(str(wan_dir), *BASE, "--out", str(tmp_path / "a.avi"))
    assert "did you mean" in run(str(wan_dir), *BASE, "--recipe", "int8-wa-smoth", "--out", str(tmp_path / "a.gif"))
    monkeypatch.setattr(t2v_frames, "imageio_ffmpeg", None)
    assert "jquant[video]" in run(str(wan_dir), *BASE, "--out", str(tmp_path / "a.mp4"))
    index = json.loads((wan_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"  # untouched
    assert not list(tmp_path.iterdir())  # nothing written on errors
    assert np.all([not p.name.startswith(".") for p in wan_dir.iterdir()])


@pytest.mark.slow
def test_docs_example_runs(
    wan_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The example of docs/pipelines.md's ## Generating runs as written on the tiny pipeline."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "pipelines.md").read_text()
    section = text.split("## Generating", 1)[1]
    block = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/pipelines.md", "exec"), {"pipeline_dir": str(wan_dir)})
    out = capsys.readouterr().out
    assert "(1, 5, 16, 32, 3) float32" in out and "int8 weight-only" in out and "(device-resident)" in out
    assert iio.imread(tmp_path / "fox.gif", index=None).shape[:3] == (5, 16, 32)


def test_notebook_real_checkpoint_cell(wan_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """notebooks/quickstart.ipynb's real-checkpoint cell, run on a tiny diffusers WanPipeline
    directory (its sizes made small): a clip is written and the memory report printed."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "real-checkpoint" in c.metadata.get("tags", []))
    line = 'FRAMES, HEIGHT, WIDTH, STEPS, RECIPE = 33, 480, 832, 30, "int8-w"'
    assert line in cell.source
    # 16x32 as in test_generate_writes_gif_mp4_and_frames: its bf16 VAE decode comes from the compilation cache
    cell.source = cell.source.replace(line, 'FRAMES, HEIGHT, WIDTH, STEPS, RECIPE = 5, 16, 32, 2, "int8-w"')
    nb.cells = [cell]
    monkeypatch.setenv("JQUANT_PIPELINE_DIR", str(wan_dir))
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "\n".join(o.get("text", "") for o in cell.get("outputs", []))
    assert "transformer" in text and "text_encoder" in text and "vae" in text, text
    assert "wrote fox.gif (5 frames, 16x32)" in text, text
    assert iio.imread(tmp_path / "fox.gif").shape[:3] == (5, 16, 32)
