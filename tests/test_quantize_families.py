"""`jquant quantize` on tiny random directories of the six families beyond Wan and DiT (Flux,
HunyuanVideo, CogVideoX, Mochi-1, LTX-Video, LTX-2) and on a tiny Wan pipeline directory with a
prompt file: the output loads, the quantized step stays close to the float one, each sampler is
its pipeline's, the prompts reach the calibration, and bad settings are one line naming the flag."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _pipeline_util import FLUX
from hypothesis import given
from hypothesis import strategies as st
from test_models import random_params

from jquant import cli, models
from jquant.models import cogvideox, hunyuan_video, ltx2, ltx_video, mochi
from jquant.pipeline import bundles as B
from jquant.pipeline.artifacts import load_quantized
from jquant.pipeline.evaluate import one_step_errors, reference
from jquant.sampling import COGVIDEOX_5B_SCHEDULER, cogvideox_ddim_schedule, flow_match_schedule

#: Tiny configs (1-2 layers, widths 16-32), as scripts/bench_models_forward.py's --tiny ones.
CONFIGS: dict[str, Any] = {
    "flux": dataclasses.replace(FLUX, guidance_embeds=True),
    "hunyuan_video": hunyuan_video.HunyuanVideoConfig(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6),
    ),
    "cogvideox": cogvideox.CogVideoXConfig(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        time_embed_dim=16,
        text_embed_dim=16,
        max_text_seq_length=8,
        use_rotary_positional_embeddings=True,
    ),
    "mochi": mochi.MochiConfig(
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        in_channels=4,
        pooled_projection_dim=16,
        text_embed_dim=16,
        time_embed_dim=16,
    ),
    "ltx_video": ltx_video.LTXVideoConfig(
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=1,
        in_channels=8,
        out_channels=8,
        caption_channels=16,
    ),
    "ltx2": ltx2.LTX2Config(
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=1,
        in_channels=8,
        out_channels=8,
        audio_in_channels=8,
        audio_out_channels=8,
        audio_num_attention_heads=2,
        audio_attention_head_dim=8,
        audio_cross_attention_dim=16,
        caption_channels=16,
    ),
}
GRID = {"flux": ("1", "8", "8")}  # images; the video families: 2 latent frames of 8 x 8
FAST = ["--steps", "2", "--calib-samples", "1", "--calib-batch", "1"]
REL_ERR = 0.15  # bound on the relative RMS error of one step with fp8 e4m3 weights and static activations


def save_tiny(root: Path, name: str) -> Path:
    """A tiny random diffusers directory of family ``name`` (weights scaled to keep activations O(1))."""
    d = root / name
    cfg = CONFIGS[name]
    models.save_pretrained(d, cfg, jax.tree.map(lambda a: 0.2 * a, random_params(cfg)))
    return d


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: save_tiny(root, name) for name in CONFIGS}


def quantize_args(d: Path, out: Path, name: str, *extra: str) -> list[str]:
    frames, h, w = GRID.get(name, ("2", "8", "8"))
    grid = ["--frames", frames, "--height", h, "--width", w]
    return ["quantize", str(d), "--recipe", "fp8-wa", "--out", str(out), *FAST, *grid, *extra]


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in ("ltx2", "mochi") else n for n in sorted(CONFIGS)]
)
def test_quantize_family_loads_and_stays_close(
    name: str, tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "q"
    per_frame = [] if name == "flux" else ["--table", "variance", "--groups", "2", "--per-frame"]
    assert cli.main(quantize_args(tiny_dirs[name], out, name, *per_frame)) == 0
    printed = capsys.readouterr().out
    assert f"{CONFIGS[name].CLASS_NAME} transformer folder" in printed and "(latent)" in printed
    assert "2 flow steps" in printed or "2 ddim (v_prediction) steps" in printed

    qm, meta = load_quantized(out)
    assert meta["bundle_kwargs"] == {"frames": int(GRID.get(name, "2")[0]), "height": 8, "width": 8}
    assert qm.act == "fp8_e4m3/t" and qm.table is not None and qm.table.num_steps == 2
    assert qm.table.config.per_frame == (name != "flux")
    bundle = B.load_bundle(tiny_dirs[name], num_steps=meta["num_steps"], **meta["bundle_kwargs"])
    # the calibration workload (seed: --calib-seed's default): its static ranges cover it, so the
    # error is the formats' alone, not a second sample's range outliers
    ref = reference(bundle, bundle.workload(1, seed=meta["calibration"]["seed"]))
    assert np.isfinite(np.asarray(ref.latents)).all()
    quant_latents = qm.sample(bundle.denoiser, ref.work)
    assert np.isfinite(np.asarray(quant_latents)).all()
    errs = one_step_errors(bundle, qm, ref)
    assert errs.shape == (2,) and np.all(errs > 0) and np.all(errs < REL_ERR), errs


def test_samplers_are_the_pipelines(tiny_dirs: dict[str, Path]) -> None:
    """Each family's Denoiser samples on its pipeline's schedule and prediction type."""
    b = {n: B.load_bundle(tiny_dirs[n], num_steps=4, **({"frames": 1} if n == "flux" else {})) for n in CONFIGS}
    cog = b["cogvideox"].denoiser
    assert cog.sampler == "ddim" and cog.prediction_type == "v_prediction" and cog.cfg
    np.testing.assert_array_equal(cog.timesteps(), cogvideox_ddim_schedule(4, **COGVIDEOX_5B_SCHEDULER).timesteps)
    mochi_t = b["mochi"].denoiser.timesteps()
    np.testing.assert_allclose(
        mochi_t, flow_match_schedule(sigmas=list(mochi.linear_quadratic_sigmas(4)), invert_sigmas=True).timesteps
    )
    assert np.all(np.diff(mochi_t) > 0)  # inverted sigmas: Mochi's timesteps rise
    hy = b["hunyuan_video"].denoiser
    np.testing.assert_allclose(hy.timesteps(), flow_match_schedule(sigmas=[1, 0.75, 0.5, 0.25], shift=7.0).timesteps)
    assert not hy.cfg and not b["flux"].denoiser.cfg  # embedded guidance, no CFG branch
    flux_sched = b["flux"].denoiser.schedule()
    assert flux_sched.sigmas[1] != pytest.approx(0.75)  # the dynamic shift moved linspace(1, 1/4, 4)
    lt = b["ltx_video"].denoiser.schedule()
    assert lt.sigmas[-2] == pytest.approx(0.1, abs=1e-6)  # LTX-Video's shift_terminal
    assert b["ltx2"].denoiser.schedule().sigmas[-2] != pytest.approx(0.1, abs=1e-3)  # none for LTX-2
    for n, bundle in b.items():
        work = bundle.workload(2, seed=3, start=1)
        assert work.labels == (1, 2) and work.x_T.shape[0] == 2
        zeros = jax.tree.map(lambda a: float(jnp.abs(a).max()), work.uncond)
        if isinstance(zeros, dict):
            zeros.pop("guidance", None)
        assert max(jax.tree.leaves(zeros)) == 0.0, n  # the CFG branch is null conditioning


@given(
    st.integers(1, 2),
    st.integers(1, 3),
    st.sampled_from([(1, 1), (1, 2), (2, 1), (2, 2)]),
    st.integers(1, 2),
    st.integers(1, 2),
    st.integers(0, 9),
)
def test_pack_video_round_trips(b: int, c: int, patch: tuple[int, int], fk: int, hk: int, seed: int) -> None:
    pt, p = patch
    shape = (b, c, fk * pt, hk * p, 2 * p)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)  # numpy: no compile per shape
    packed = B.pack_video(x, pt, p)
    assert packed.shape == (b, fk * hk * 2, c * pt * p * p)
    np.testing.assert_array_equal(B.unpack_video(packed, shape, pt, p), x)
    # token i is frame-major: the first h * w tokens are the first latent frame(s)
    np.testing.assert_array_equal(packed[:, : hk * 2], B.pack_video(x[:, :, :pt], pt, p))


def test_ltx2_audio_frames_follow_the_clip_duration() -> None:
    cfg = ltx2.LTX2_19B
    # 121 frames at 24 fps = 5.04 s; 16 kHz / 160 hop / 4 = 25 audio latents per second
    assert B.ltx2_audio_frames(cfg, 16) == round(121 / 24 * 25)
    assert B.ltx2_audio_frames(cfg, 1) == 1


@pytest.mark.parametrize(
    ("name", "args", "flag", "words"),
    [
        ("mochi", ["--height", "7"], "--height", "patch 1x2x2"),
        ("flux", ["--frames", "2"], "--frames", "frames must be 1"),
        ("mochi", ["--steps", "1", "--frames", "2", "--height", "8", "--width", "8"], "--steps", "at least 2 steps"),
        ("ltx_video", ["--frames", "0"], "--frames", "must be >= 1"),
        ("ltx2", ["--prompts", "p.txt"], "--prompts", "transformer folder"),
    ],
)
def test_bad_settings_are_one_line_naming_the_flag(
    name: str,
    args: list[str],
    flag: str,
    words: str,
    tiny_dirs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_dirs[name]), "--recipe", "int8-w", "--out", str(out), *args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jquant quantize: error: ") and flag in err and words in err
    if flag in ("--height", "--frames") and words.startswith("patch"):
        assert str(tiny_dirs[name]) in err
    assert not out.exists()


# --- a Wan pipeline directory: real prompts ---------------------------------------------------------
@pytest.fixture(scope="module")
def wan_pipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers")
    from test_t2v import save_wan_pipeline

    root = tmp_path_factory.mktemp("wan_pipe_q")
    save_wan_pipeline(root)
    return root


PROMPTS = ["a red kite over a green hill", "# a comment, skipped", "", "a lighthouse in a storm at night"]
PIPE_GRID = ["--frames", "3", "--height", "16", "--width", "16"]


@pytest.mark.slow
def test_wan_pipeline_calibrates_on_the_prompt_file(
    wan_pipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jquant.pipeline.t2v import load_pipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "q"
    argv = ["quantize", str(wan_pipe), "--recipe", "fp8-wa", "--out", str(out), *FAST, "--calib-samples", "2"]
    assert cli.main([*argv, "--calib-batch", "2", "--prompts", str(prompts), *PIPE_GRID]) == 0
    printed = capsys.readouterr().out
    assert "WanPipeline pipeline folder" in printed and "3 x 16 x 16 (pixels), latents 4x2x4x4" in printed
    assert "prompt 0: a red kite over a green hill" in printed and "prompt 1: a lighthouse in a storm" in printed
    assert "a comment" not in printed and "CFG 5 (both branches calibrated)" in printed
    qm, meta = load_quantized(out)
    want = [PROMPTS[0], PROMPTS[3]]
    assert meta["bundle_kwargs"] == {"frames": 3, "height": 16, "width": 16, "prompts": want}

    # the calibration workloads hold those prompts' embeddings (and "" for the CFG branch)
    bundle = B.load_bundle(wan_pipe, num_steps=2, prompts=want, frames=3, height=16, width=16)
    work = bundle.workload(2, seed=0)
    pipe = load_pipeline(wan_pipe, dtype=jnp.float32)
    cond, uncond = pipe.encode(want, ["", ""], True, 5.0)
    np.testing.assert_allclose(work.cond, cond, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(work.uncond, uncond, rtol=1e-6, atol=1e-6)
    assert not np.allclose(work.cond[0], work.cond[1])  # two prompts, two conditionings
    stand_in = B.wan_bundle(pipe.transformer, pipe.params, pipe.config, frames=2, size=4, text_tokens=8)
    assert stand_in.workload(1, 0).cond.shape[1] != work.cond.shape[1]  # not the stand-in embeddings

    capsys.readouterr()
    assert cli.main(["eval", str(out), "--clips", "1"]) == 0  # eval rebuilds the same prompted bundle
    res = json.loads((out / "eval.json").read_text())
    assert len(res["step_rmse"]) == 2 and res["labels"] == [0] and np.isfinite(res["psnr"])


def test_default_prompts_are_printed(wan_pipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    argv = ["quantize", str(wan_pipe), "--recipe", "int8-w", "--out", str(out), *FAST, *PIPE_GRID]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for i, p in enumerate(B.DEFAULT_PROMPTS):
        assert f"prompt {i}: {p}" in printed
    _, meta = load_quantized(out)
    assert meta["bundle_kwargs"]["prompts"] == list(B.DEFAULT_PROMPTS)


def test_pipeline_settings_errors_name_the_flag(
    wan_pipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["quantize", str(wan_pipe), "--recipe", "int8-w", "--out", str(tmp_path / "q"), *FAST]
    assert cli.main([*base, "--frames", "4", "--height", "16", "--width", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--frames/--height/--width" in err and "1 + 2k frames" in err
    assert cli.main([*base, "--prompts", str(tmp_path / "none.txt")]) == 2
    err = capsys.readouterr().err
    assert "--prompts" in err and "no such prompt file" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    assert cli.main([*base, "--prompts", str(empty)]) == 2
    assert "no prompts" in capsys.readouterr().err
