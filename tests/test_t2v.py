"""jquant.pipeline.t2v: whole tiny random Wan and Flux pipelines, saved by diffusers, generate what
diffusers' WanPipeline / FluxPipeline generate from the same initial latents; bad input is named."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_text_encoders import T5_CASES, perturbed, save_clip, save_t5
from test_tokenize import SENTENCES, build_tokenizer

from jquant import cli
from jquant.models.tokenize import PromptTruncatedWarning
from jquant.pipeline.t2v import (
    MemoryReport,
    PipelineError,
    UniPC,
    image_ids,
    load_pipeline,
    pack_latents,
    unipc_schedule,
    unpack_latents,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

ATOL = 2e-4  # frames in [0, 1], fp32 on CPU, two steps through encoder, transformer and VAE
F32 = dict(dtype=jnp.float32, text_encoder="float", vae_dtype=jnp.float32)
WAN_VAE = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True],
    latents_mean=[0.1, 0.2, -0.3, 0.0],
    latents_std=[1.0, 2.0, 0.5, 1.5],
    scale_factor_spatial=4,
    scale_factor_temporal=2,
)
FLUX_VAE = dict(
    block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def save_wan_pipeline(root: Path, seed: int = 0) -> Any:
    """A tiny random WanPipeline (UMT5, AutoencoderKLWan, WanTransformer3DModel, Euler at shift 3)
    saved with save_pretrained; returns the diffusers pipeline."""
    torch.manual_seed(seed)
    te = save_t5(root / "te_tmp", "umt5", T5_CASES["umt5-gated-gelu"][1], seed)
    shutil.rmtree(root / "te_tmp")
    tok = transformers.AutoTokenizer.from_pretrained(build_tokenizer(root / "tok_tmp", "t5", model_max_length=512))
    shutil.rmtree(root / "tok_tmp")
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=16,
        ffn_dim=24,
        num_layers=2,
        rope_max_seq_len=32,
    )
    vae = diffusers.AutoencoderKLWan(**WAN_VAE)
    pipe = diffusers.WanPipeline(
        tokenizer=tok,
        text_encoder=te,
        vae=perturbed(vae, seed),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=perturbed(transformer, seed),
    )
    pipe.save_pretrained(root)
    return pipe


def save_flux_pipeline(root: Path, seed: int = 0) -> Any:
    """A tiny random FluxPipeline (CLIP, T5, guidance-distilled FluxTransformer2DModel, AutoencoderKL,
    Euler with dynamic shifting) saved with save_pretrained."""
    torch.manual_seed(seed)
    clip = save_clip(root / "clip_tmp", 2, "quick_gelu")
    t5 = save_t5(root / "t5_tmp", "t5", T5_CASES["t5-gated-gelu"][1], seed)
    tok = transformers.AutoTokenizer.from_pretrained(build_tokenizer(root / "tk1", "clip", model_max_length=24))
    tok2 = transformers.AutoTokenizer.from_pretrained(build_tokenizer(root / "tk2", "t5", model_max_length=512))
    for d in ("clip_tmp", "t5_tmp", "tk1", "tk2"):
        shutil.rmtree(root / d)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=4, max_image_seq_len=64
    )
    pipe = diffusers.FluxPipeline(
        scheduler=scheduler,
        vae=perturbed(diffusers.AutoencoderKL(**FLUX_VAE), seed),
        text_encoder=clip,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=tok2,
        transformer=perturbed(transformer, seed),
    )
    pipe.save_pretrained(root)
    return pipe


@pytest.fixture(scope="module")
def wan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    root = tmp_path_factory.mktemp("wan_pipe")
    return root, save_wan_pipeline(root)


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    root = tmp_path_factory.mktemp("flux_pipe")
    return root, save_flux_pipeline(root)


@pytest.fixture(scope="module")
def wan_f32(wan: tuple[Path, Any]) -> Any:
    """The float32 Jax pipeline (one per module: its compiled steps are reused across tests)."""
    return load_pipeline(wan[0], **F32)


@pytest.fixture(scope="module")
def flux_f32(flux: tuple[Path, Any]) -> Any:
    return load_pipeline(flux[0], **F32)


def test_wan_pipeline_matches_diffusers(wan: tuple[Path, Any], wan_f32: Any) -> None:
    root, ref_pipe = wan
    latents = np.random.default_rng(0).standard_normal((1, 4, 3, 4, 8)).astype(np.float32)  # 5 frames, 16 x 32
    kw = dict(negative_prompt="the rain", height=16, width=32, guidance=5.0)
    with torch.no_grad():
        ref = ref_pipe(
            SENTENCES[0],
            negative_prompt=kw["negative_prompt"],
            height=16,
            width=32,
            num_frames=5,
            num_inference_steps=2,
            guidance_scale=5.0,
            latents=torch.from_numpy(latents),
            output_type="np",
        ).frames
    out = wan_f32(SENTENCES[0], frames=5, steps=2, latents=jnp.asarray(latents), progress=False, **kw)
    assert out.frames.shape == (1, 5, 16, 32, 3) == np.shape(ref)
    np.testing.assert_allclose(out.frames, ref, atol=ATOL)
    assert float(np.std(out.frames)) > 1e-3  # not a constant image
    # the memory report: every component, resident weights = the params' bytes, peaks above them
    mem = out.memory
    assert isinstance(mem, MemoryReport) and [c.name for c in mem.components] == ["text_encoder", "transformer", "vae"]
    n_transformer = sum(p.numel() * 4 for p in ref_pipe.transformer.parameters())
    assert mem.components[1].resident_bytes == n_transformer
    assert all(c.peak_bytes is not None and c.peak_bytes >= c.resident_bytes for c in mem.components)
    assert "pipeline" in str(mem) and mem.peak_bytes >= mem.resident_bytes


@pytest.mark.slow
def test_wan_default_policy_and_recipe(wan: tuple[Path, Any], wan_f32: Any) -> None:
    """int8 weight-only text encoder (default) and an int8 transformer stay close to float; a
    calibrated recipe (SmoothQuant + static table) calibrates on the call's own prompts."""
    root, _ = wan
    latents = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4, 2, 4, 4)), jnp.float32)
    kw = dict(negative_prompt="blurry", frames=3, height=16, width=16, steps=2, latents=latents, progress=False)
    ref = wan_f32(SENTENCES[1], measure_memory=False, **kw).frames
    pipe = load_pipeline(root, dtype=jnp.float32, vae_dtype=jnp.float32, recipe="int8-wa-smooth")
    assert pipe.precisions["text_encoder"] == "int8 weight-only"
    out = pipe(SENTENCES[1], measure_memory=False, **kw)
    assert pipe.quantized is not None and pipe.quantized.table is not None and pipe.recipe is None
    err = float(np.abs(out.frames - ref).mean())
    assert 0 < err < 0.05, err


UNIPC = dict(  # the published Wan2.1 checkpoints' scheduler_config.json
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    solver_order=2,
    solver_type="bh2",
    predict_x0=True,
    lower_order_final=True,
    final_sigmas_type="zero",
    num_train_timesteps=1000,
)


def test_wan_unipc_matches_diffusers(wan: tuple[Path, Any], tmp_path: Path) -> None:
    """UniPC (order 2, bh2, corrector, lower-order final step) over 4 steps, as WanPipeline."""
    root, ref_pipe = wan
    d = _copy(root, tmp_path / "unipc")
    scheduler = diffusers.UniPCMultistepScheduler(**UNIPC)
    ref = diffusers.WanPipeline(**{**ref_pipe.components, "scheduler": scheduler})
    shutil.rmtree(d / "scheduler")
    ref.save_pretrained(d)
    assert json.loads((d / "model_index.json").read_text())["scheduler"][1] == "UniPCMultistepScheduler"
    latents = np.random.default_rng(5).standard_normal((1, 4, 2, 4, 4)).astype(np.float32)
    with torch.no_grad():
        want = ref(
            SENTENCES[2],
            negative_prompt="blurry",
            height=16,
            width=16,
            num_frames=3,
            num_inference_steps=4,
            guidance_scale=4.0,
            latents=torch.from_numpy(latents),
            output_type="np",
        ).frames
    pipe = load_pipeline(d, **F32)
    got = pipe(
        SENTENCES[2],
        negative_prompt="blurry",
        frames=3,
        height=16,
        width=16,
        steps=4,
        guidance=4.0,
        latents=jnp.asarray(latents),
        progress=False,
        measure_memory=False,
    )
    np.testing.assert_allclose(got.frames, want, atol=ATOL)
    euler = load_pipeline(d, scheduler="euler", **F32)
    assert not euler.unipc and pipe.unipc
    other = euler(
        SENTENCES[2],
        negative_prompt="blurry",
        frames=3,
        height=16,
        width=16,
        steps=4,
        guidance=4.0,
        latents=jnp.asarray(latents),
        progress=False,
        measure_memory=False,
    )
    assert float(np.abs(other.frames - want).max()) > 50 * ATOL  # Euler's path differs: the check has teeth


def test_flux_pipeline_matches_diffusers(flux: tuple[Path, Any], flux_f32: Any) -> None:
    root, ref_pipe = flux
    latents = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)  # 16 x 16 image
    with torch.no_grad():
        ref = ref_pipe(
            SENTENCES[2],
            height=16,
            width=16,
            num_inference_steps=2,
            guidance_scale=3.5,
            latents=torch.from_numpy(np.array(pack_latents(jnp.asarray(latents)))),
            output_type="np",
        ).images
    out = flux_f32(
        SENTENCES[2], height=16, width=16, steps=2, guidance=3.5, latents=jnp.asarray(latents), progress=False
    )
    assert out.frames.shape == (1, 1, 16, 16, 3) and np.shape(ref) == (1, 16, 16, 3)
    np.testing.assert_allclose(out.frames[:, 0], ref, atol=ATOL)
    assert float(np.std(out.frames)) > 1e-3
    assert [c.name for c in out.memory.components] == ["text_encoder", "text_encoder_2", "transformer", "vae"]


def test_flux_true_cfg_matches_diffusers(flux: tuple[Path, Any], flux_f32: Any) -> None:
    root, ref_pipe = flux
    latents = np.random.default_rng(3).standard_normal((1, 4, 4, 8)).astype(np.float32)  # 8 x 16
    with torch.no_grad():
        ref = ref_pipe(
            SENTENCES[3],
            negative_prompt="the rain",
            true_cfg_scale=2.0,
            height=8,
            width=16,
            num_inference_steps=2,
            latents=torch.from_numpy(np.array(pack_latents(jnp.asarray(latents)))),
            output_type="np",
        ).images
    out = flux_f32(
        SENTENCES[3],
        negative_prompt="the rain",
        true_cfg=2.0,
        height=8,
        width=16,
        steps=2,
        latents=jnp.asarray(latents),
        progress=False,
        measure_memory=False,
    )
    np.testing.assert_allclose(out.frames[:, 0], ref, atol=ATOL)


def test_pack_unpack_round_trip() -> None:
    z = jnp.arange(2 * 3 * 4 * 6, dtype=jnp.float32).reshape(2, 3, 4, 6)
    packed = pack_latents(z)
    assert packed.shape == (2, 6, 12)
    ref = diffusers.FluxPipeline._pack_latents(torch.from_numpy(np.array(z)), 2, 3, 4, 6).numpy()
    np.testing.assert_array_equal(packed, ref)
    np.testing.assert_array_equal(unpack_latents(packed, 4, 6), z)


# --- bad input --------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_and_unsupported_components(wan: tuple[Path, Any], tmp_path: Path) -> None:
    root, _ = wan
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(root / "transformer")
    d = _copy(root, tmp_path / "no_vae")
    shutil.rmtree(d / "vae")
    with pytest.raises(FileNotFoundError, match="component folder 'vae'"):
        load_pipeline(d)
    index = json.loads((d / "model_index.json").read_text())
    index.pop("vae")
    (d / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineError, match="component 'vae' is missing"):
        load_pipeline(d)
    index["vae"] = ["diffusers", "AutoencoderKLHunyuanVideo"]
    (d / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineError, match="'vae' is a AutoencoderKLHunyuanVideo"):
        load_pipeline(d)
    index["_class_name"] = "HunyuanVideoPipeline"
    (d / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineError, match="not a pipeline jquant runs"):
        load_pipeline(d)
    u = _copy(root, tmp_path / "unipc")
    (u / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0, "use_flow_sigmas": False})
    )
    with pytest.raises(PipelineError, match="use_flow_sigmas=False"):
        load_pipeline(u, **F32)
    assert load_pipeline(u, scheduler="euler", **F32).scheduler["shift"] == 3.0
    with pytest.raises(PipelineError, match="scheduler='dpm'"):
        load_pipeline(u, scheduler="dpm")
    with pytest.raises(ValueError, match="int8 weight-only at most"):
        load_pipeline(root, text_encoder="int4")


def test_tokenizer_mismatch_is_named(wan: tuple[Path, Any], tmp_path: Path) -> None:
    root, _ = wan
    d = _copy(root, tmp_path / "mismatch")
    shutil.rmtree(d / "text_encoder")
    save_t5(d / "text_encoder", "umt5", {**T5_CASES["umt5-gated-gelu"][1], "vocab_size": 8})
    with pytest.raises(ValueError, match="does not belong to this encoder"):
        load_pipeline(d, **F32)


def test_long_prompt_warns_and_bad_sizes_are_named(wan_f32: Any, flux_f32: Any) -> None:
    with pytest.warns(PromptTruncatedWarning, match="tokenizer"):  # CLIP takes 24 tokens here
        cond, _ = flux_f32.encode(" ".join(SENTENCES), None, False, 3.5)
    assert cond["pooled"].shape == (1, 32) and cond["embeds"].shape == (1, 512, 32)
    with pytest.warns(PromptTruncatedWarning, match="tokenizer"):  # UMT5 takes 512
        wan_f32.encode(" ".join(SENTENCES * 12), None, True, 5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wan_f32.encode(SENTENCES[0], "blurry", True, 5.0)
    with pytest.raises(ValueError, match="multiples of 4"):
        flux_f32("a cat", height=10, width=8, steps=1)
    with pytest.raises(ValueError, match="frames=1"):
        flux_f32("a cat", frames=5, height=8, width=8)
    with pytest.raises(ValueError, match="multiples of 16 x 16"):
        wan_f32("a cat", frames=5, height=12, width=16)
    with pytest.raises(ValueError, match="1 \\+ 2k frames"):
        wan_f32("a cat", frames=4, height=16, width=16)
    with pytest.raises(ValueError, match="latents have shape"):
        wan_f32("a cat", frames=5, height=16, width=16, latents=jnp.zeros((1, 4, 2, 4, 4)))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        wan_f32("a cat", frames=5, height=16, width=16, steps=0)


@pytest.mark.slow
def test_offload_and_quantized_dir(wan: tuple[Path, Any], wan_f32: Any, tmp_path: Path) -> None:
    """Host-kept weights give the same frames and drop out of the device-resident bytes; a
    `jquant quantize` output runs as the transformer, and one of another model is refused."""
    root, _ = wan
    latents = jnp.asarray(np.random.default_rng(4).standard_normal((1, 4, 2, 4, 4)), jnp.float32)
    kw = dict(negative_prompt="blurry", frames=3, height=16, width=16, steps=2, latents=latents, progress=False)
    ref = wan_f32(SENTENCES[4], measure_memory=False, **kw)
    host = load_pipeline(root, offload=["text_encoder", "vae", "transformer"], **F32)
    out = host(SENTENCES[4], **kw)
    np.testing.assert_allclose(out.frames, ref.frames, atol=1e-6)
    assert all(c.host for c in out.memory.components) and out.memory.resident_bytes == 0
    assert out.memory.peak_bytes == max(c.peak_bytes for c in out.memory.components)
    with pytest.raises(ValueError, match="not a component of WanPipeline"):
        load_pipeline(root, offload=["text_encoder_2"])

    q = tmp_path / "q"
    assert cli.main(["quantize", str(root / "transformer"), "--recipe", "int8-w", "--out", str(q)]) == 0
    pipe = load_pipeline(root, quantized_dir=q, **F32)
    assert pipe.params is None and pipe.precisions["transformer"].startswith("int8-w")
    got = pipe(SENTENCES[4], measure_memory=False, **kw)
    err = float(np.abs(got.frames - ref.frames).mean())
    assert 0 < err < 0.05, err
    other = tmp_path / "other"
    shutil.copytree(root, other)
    cfg = json.loads((other / "transformer" / "config.json").read_text())
    (other / "transformer" / "config.json").write_text(json.dumps({**cfg, "num_layers": 1}))
    with pytest.raises(PipelineError, match="quantized for another transformer"):
        load_pipeline(other, quantized_dir=q, **F32)


# --- properties -------------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(
    steps=st.integers(1, 6),
    shift=st.floats(1.0, 6.0),
    seed=st.integers(0, 2**16),
)
def test_first_order_unipc_is_flow_euler(steps: int, shift: float, seed: int) -> None:
    """Without the corrector, first-order UniPC in flow sigmas is exactly Euler's
    x + (sigma_next - sigma) v (predict-x0 with alpha = 1 - sigma collapses to it)."""
    config = {**UNIPC, "flow_shift": shift, "solver_order": 1, "disable_corrector": list(range(steps))}
    sched = unipc_schedule(config, steps)
    solver = UniPC(config, sched.sigmas)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)
    for i in range(steps):
        v = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)
        want = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * v
        x = solver.step(i, v, x)
        np.testing.assert_allclose(x, want, rtol=1e-4, atol=1e-4)
    assert sched.sigmas[-1] == 0 and np.all(np.diff(sched.sigmas) < 0)


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 2), c=st.integers(1, 4), h=st.integers(1, 4), w=st.integers(1, 4))
def test_pack_unpack_inverse(b: int, c: int, h: int, w: int) -> None:
    z = np.random.default_rng(b * 1000 + c * 100 + h * 10 + w).standard_normal((b, c, 2 * h, 2 * w))
    packed = pack_latents(z)
    assert packed.shape == (b, h * w, 4 * c)
    np.testing.assert_array_equal(unpack_latents(packed, 2 * h, 2 * w), z)
    ids = np.asarray(image_ids(2 * h, 2 * w))
    assert ids.shape == (h * w, 3) and np.all(ids[:, 0] == 0) and ids[-1, 1] == h - 1 and ids[-1, 2] == w - 1
