"""HunyuanVideo, CogVideoX, Mochi-1, LTX-Video and LTX-2 Flax ports vs diffusers (CPU, fp32).

Each tiny random diffusers model is saved, loaded with `models.load_pretrained` and run on the
same inputs (two or more configurations per model). Each model also runs its jitted sampler for
a few steps against the matching diffusers scheduler loop driven by the torch model.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import models, sampling
from jquant.models import cogvideox, hunyuan_video, ltx2, ltx_video, mochi

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
B = 2


def rel_err(out: Any, ref: Any) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def to_jax(tree: Any) -> Any:
    return jax.tree.map(lambda t: jnp.asarray(t.numpy()) if isinstance(t, torch.Tensor) else t, tree)


@dataclasses.dataclass(frozen=True)
class Case:
    """A tiny diffusers config and its inputs: `inputs(g)` -> (torch kwargs, jax kwargs)."""

    name: str
    cls_name: str
    kwargs: dict[str, Any]
    inputs: Callable[[Any], tuple[dict[str, Any], dict[str, Any]]]
    roles: tuple[str, ...] = ()  # roles that must appear somewhere

    def build(self) -> Any:
        torch.manual_seed(0)
        model = getattr(diffusers, self.cls_name)(**self.kwargs)
        with torch.no_grad():  # perturb every param (norm weights, biases too) so mix-ups show
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        return model.eval()


def same(kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return kw, to_jax(kw)


def _mask(rows: list[list[int]]) -> Any:
    return torch.tensor(rows)


# ------------------------------------------------------------------ inputs per model


def hunyuan_inputs(frames: int, h: int, w: int, mask: list[list[int]] | None, guidance: bool, in_ch: int = 4):
    def make(g: Any):
        text_len = len(mask[0]) if mask else 5
        kw = dict(
            hidden_states=torch.randn(B, in_ch, frames, h, w, generator=g),
            timestep=torch.tensor([10.0, 700.0]),
            encoder_hidden_states=torch.randn(B, text_len, 8, generator=g),
            encoder_attention_mask=_mask(mask) if mask else torch.ones(B, text_len),
            pooled_projections=torch.randn(B, 6, generator=g),
        )
        if guidance:
            kw["guidance"] = torch.tensor([3500.0, 6000.0])
        t_kw, j_kw = same(kw)
        if mask is None:
            j_kw["encoder_attention_mask"] = None  # all tokens real: the port takes no mask
        return t_kw, j_kw

    return make


def crop_region(src: tuple[int, int], tw: int, th: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The CogVideoX pipeline's `get_resize_crop_region_for_grid` (pipelines import transformers)."""
    h, w = src
    if h / w > th / tw:
        rh, rw = th, int(round(th / h * w))
    else:
        rw, rh = tw, int(round(tw / w * h))
    top, left = int(round((th - rh) / 2.0)), int(round((tw - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def cogvideox_rope(kw: dict[str, Any], frames: int, h: int, w: int) -> Any:
    """The pipeline's `_prepare_rotary_positional_embeddings`, which diffusers' model takes as input."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    p, pt = kw["patch_size"], kw.get("patch_size_t")
    gh, gw = h // p, w // p
    base_w, base_h = kw["sample_width"] // p, kw["sample_height"] // p
    if pt is None:
        return get_3d_rotary_pos_embed(
            kw["attention_head_dim"], crop_region((gh, gw), base_w, base_h), (gh, gw), frames
        )
    return get_3d_rotary_pos_embed(
        kw["attention_head_dim"], None, (gh, gw), (frames + pt - 1) // pt, grid_type="slice", max_size=(base_h, base_w)
    )


def cogvideox_inputs(kw: dict[str, Any], frames: int, h: int, w: int, text_len: int, ofs: bool = False):
    def make(g: Any):
        base = dict(
            hidden_states=torch.randn(B, frames, kw["in_channels"], h, w, generator=g),
            encoder_hidden_states=torch.randn(B, text_len, kw["text_embed_dim"], generator=g),
            timestep=torch.tensor([10, 700]),
        )
        if ofs:
            base["ofs"] = torch.tensor([2.0, 2.0])
        t_kw, j_kw = same(base)
        if kw.get("use_rotary_positional_embeddings"):
            t_kw = dict(t_kw, image_rotary_emb=cogvideox_rope(kw, frames, h, w))
        return t_kw, j_kw

    return make


def mochi_inputs(frames: int, h: int, w: int, mask: list[list[int]], in_ch: int = 4):
    def make(g: Any):
        return same(
            dict(
                hidden_states=torch.randn(B, in_ch, frames, h, w, generator=g),
                encoder_hidden_states=torch.randn(B, len(mask[0]), 16, generator=g),
                timestep=torch.tensor([10.0, 700.0]),
                encoder_attention_mask=_mask(mask),
            )
        )

    return make


def ltx_inputs(frames: int, h: int, w: int, mask: list[list[int]], scale: tuple | None, coords: bool, per_token: bool):
    def make(g: Any):
        s = frames * h * w
        kw = dict(
            hidden_states=torch.randn(B, s, 8, generator=g),
            encoder_hidden_states=torch.randn(B, len(mask[0]), 12, generator=g),
            timestep=torch.rand(B, s, generator=g) * 1000 if per_token else torch.tensor([10.0, 700.0]),
            encoder_attention_mask=_mask(mask),
        )
        if coords:
            kw["video_coords"] = torch.rand(B, 3, s, generator=g) * torch.tensor([20.0, 300.0, 500.0])[None, :, None]
        t_kw, j_kw = same(kw)
        static = dict(num_frames=frames, height=h, width=w, rope_interpolation_scale=scale)
        return dict(t_kw, **static), dict(j_kw, **static)

    return make


def ltx2_inputs(frames: int, h: int, w: int, audio_frames: int, text_len: int, **options: Any):
    """`options`: extra forward arguments (torch values; lists become tuples for the port)."""

    def make(g: Any):
        mask = torch.ones(B, text_len)
        mask[0, -2:] = 0
        kw = dict(
            hidden_states=torch.randn(B, frames * h * w, 8, generator=g),
            audio_hidden_states=torch.randn(B, audio_frames, 6, generator=g),
            encoder_hidden_states=torch.randn(B, text_len, 10, generator=g),
            audio_encoder_hidden_states=torch.randn(B, text_len, 10, generator=g),
            timestep=torch.tensor([10.0, 700.0]),
            encoder_attention_mask=mask,
            audio_encoder_attention_mask=mask,
        )
        static = dict(num_frames=frames, height=h, width=w, fps=25.0, audio_num_frames=audio_frames)
        t_kw, j_kw = same(dict(kw, **{k: v for k, v in options.items() if isinstance(v, torch.Tensor)}))
        flags = {k: v for k, v in options.items() if not isinstance(v, torch.Tensor)}
        j_flags = {k: tuple(v) if isinstance(v, list) else v for k, v in flags.items()}
        return dict(t_kw, **static, **flags), dict(j_kw, **static, **j_flags)

    return make


HY = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=1,
    num_single_layers=1,
    num_refiner_layers=1,
    text_embed_dim=8,
    pooled_projection_dim=6,
    rope_axes_dim=(4, 6, 6),
)
COG = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    time_embed_dim=12,
    text_embed_dim=8,
    num_layers=2,
    sample_width=6,
    sample_height=4,
    sample_frames=9,
    patch_size=2,
    max_text_seq_length=5,
)
COG_ROPE = dict(COG, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True)
COG_15 = dict(
    COG, use_rotary_positional_embeddings=True, patch_size_t=2, ofs_embed_dim=12, patch_bias=False, sample_width=8
)
MOCHI = dict(
    patch_size=2,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    pooled_projection_dim=12,
    in_channels=4,
    text_embed_dim=16,
    time_embed_dim=8,
)
LTX = dict(
    in_channels=8,
    out_channels=8,
    num_attention_heads=2,
    attention_head_dim=16,
    cross_attention_dim=32,
    num_layers=2,
    caption_channels=12,
)
LTX2 = dict(
    in_channels=8,
    out_channels=8,
    num_attention_heads=2,
    attention_head_dim=12,
    cross_attention_dim=24,
    audio_in_channels=6,
    audio_out_channels=6,
    audio_num_attention_heads=2,
    audio_attention_head_dim=8,
    audio_cross_attention_dim=16,
    num_layers=2,
    caption_channels=10,
)
LTX2_23 = dict(
    LTX2,
    rope_type="split",
    gated_attn=True,
    audio_gated_attn=True,
    cross_attn_mod=True,
    audio_cross_attn_mod=True,
    ff_bias=False,
    use_keyframes_abs_pos_embedding=True,
    perturbed_attn=True,
    norm_elementwise_affine=True,
    rope_double_precision=False,
)
KEYFRAMES = torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0]).reshape(1, 8, 1).repeat(2, 1, 1)

CASES = [
    Case(
        "hunyuan_guidance_masked",
        "HunyuanVideoTransformer3DModel",
        dict(HY, guidance_embeds=True),
        hunyuan_inputs(3, 4, 6, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], True),
        ("double_stream", "single_stream", "text_fusion"),
    ),
    Case(
        "hunyuan_no_guidance_2frames",
        "HunyuanVideoTransformer3DModel",
        dict(HY, guidance_embeds=False, num_layers=2, num_single_layers=0, patch_size_t=2, mlp_ratio=2.0),
        hunyuan_inputs(4, 2, 4, None, False),
        ("double_stream",),
    ),
    Case(
        "cogvideox_2b_sincos", "CogVideoXTransformer3DModel", COG, cogvideox_inputs(COG, 3, 4, 6, 5), ("text_fusion",)
    ),
    Case(
        "cogvideox_5b_i2v_rope_learned", "CogVideoXTransformer3DModel", COG_ROPE, cogvideox_inputs(COG_ROPE, 3, 4, 6, 5)
    ),
    Case(
        "cogvideox_15_patch_t_ofs",
        "CogVideoXTransformer3DModel",
        COG_15,
        cogvideox_inputs(COG_15, 4, 4, 6, 3, ofs=True),
    ),
    Case(
        "mochi_right_padded",
        "MochiTransformer3DModel",
        MOCHI,
        mochi_inputs(2, 4, 6, [[1, 1, 1, 0], [1, 1, 1, 1]]),
        ("text_fusion",),
    ),
    Case(
        "mochi_3layers_patch1_gapped_mask",
        "MochiTransformer3DModel",
        dict(MOCHI, num_layers=3, out_channels=6, patch_size=1),
        mochi_inputs(3, 2, 3, [[1, 0, 1, 0, 1], [0, 1, 1, 1, 1]]),
    ),
    Case(
        "ltx_pipeline_rope_scale",
        "LTXVideoTransformer3DModel",
        LTX,
        ltx_inputs(3, 2, 3, [[1, 1, 1, 0], [1, 1, 1, 1]], (8 / 25, 32, 32), False, False),
        ("temporal", "cross_attn.kv"),
    ),
    Case(
        "ltx_coords_per_token_t_affine",
        "LTXVideoTransformer3DModel",
        dict(LTX, norm_elementwise_affine=True, attention_head_dim=12, cross_attention_dim=24, out_channels=5),
        ltx_inputs(2, 2, 2, [[1, 1, 0], [1, 1, 1]], None, True, True),
    ),
    Case("ltx2_base", "LTX2VideoTransformer3DModel", LTX2, ltx2_inputs(3, 2, 3, 5, 4), ("cross_attn", "temporal")),
    Case(
        "ltx2_23_split_gated_stg",
        "LTX2VideoTransformer3DModel",
        LTX2_23,
        ltx2_inputs(
            2,
            2,
            2,
            4,
            3,
            sigma=torch.tensor([0.3, 0.9]),
            audio_timestep=torch.tensor([50.0, 600.0]),
            spatio_temporal_guidance_blocks=[1],
            perturbation_mask=torch.tensor([0.0, 1.0]),
            use_cross_timestep=True,
            video_keyframes_mask=KEYFRAMES,
        ),
        ("modulation",),
    ),
    Case(
        "ltx2_isolated_fixed_prompt_mod",
        "LTX2VideoTransformer3DModel",
        dict(LTX2, cross_attn_mod=True, use_prompt_adaln_single=False),
        ltx2_inputs(2, 2, 2, 4, 3, isolate_modalities=True),
    ),
]


@functools.lru_cache(maxsize=None)
def loaded(name: str, tmp: str) -> tuple[Any, Any, Any]:
    """(torch model, Flax module, params) of a case, built and loaded once per session."""
    case = next(c for c in CASES if c.name == name)
    torch_model = case.build()
    torch_model.save_pretrained(Path(tmp) / name)
    module, params = models.load_pretrained(Path(tmp) / name)
    return torch_model, module, params


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("models2"))


def outputs(result: Any) -> tuple[np.ndarray, ...]:
    """diffusers' output object -> tuple of arrays (LTX-2 returns video and audio)."""
    if hasattr(result, "audio_sample"):
        return result.sample.numpy(), result.audio_sample.numpy()
    return (result.sample.numpy(),)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_diffusers(case: Case, tmp_dir: str) -> None:
    torch_model, module, params = loaded(case.name, tmp_dir)
    t_kw, j_kw = case.inputs(torch.Generator().manual_seed(1))
    with torch.no_grad():
        refs = outputs(torch_model(**t_kw))
    arrays = {k: v for k, v in j_kw.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in j_kw.items() if not isinstance(v, jax.Array)}
    out = jax.jit(lambda p, a: module.apply({"params": p}, **a, **static))(
        params, arrays
    )  # jit: ~3x less CPU than eager
    outs = out if isinstance(out, tuple) else (out,)
    for o, r in zip(outs, refs, strict=True):
        assert rel_err(o, r) <= TOL
    roles = models.layer_roles(module.config, params)
    assert roles and all(roles.values())
    present = {r for rs in roles.values() for r in rs}
    assert set(case.roles) <= present


def test_hunyuan_roles_split_double_and_single_stream(tmp_dir: str) -> None:
    _, module, params = loaded("hunyuan_guidance_masked", tmp_dir)
    roles = models.layer_roles(module.config, params)
    assert "double_stream" in roles["transformer_blocks_0/attn/add_q_proj/kernel"]
    assert "single_stream" in roles["single_transformer_blocks_0/proj_out/kernel"]
    assert not {"double_stream", "single_stream"} & set(
        roles["context_embedder/token_refiner/refiner_blocks_0/attn/to_q/kernel"]
    )


def test_mochi_fusion_projections_cross_widths(tmp_dir: str) -> None:
    _, module, params = loaded("mochi_right_padded", tmp_dir)
    roles = models.layer_roles(module.config, params)
    attn = params["transformer_blocks_0"]["attn1"]
    assert attn["add_q_proj"]["kernel"].shape == (12, 32) and attn["to_add_out"]["kernel"].shape == (32, 12)
    for proj in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_q"):
        assert "text_fusion" in roles[f"transformer_blocks_0/attn1/{proj}/kernel"]
    assert "to_add_out" not in params["transformer_blocks_1"]["attn1"]  # last block: context_pre_only


# ------------------------------------------------------------------ jitted samplers vs scheduler loops


def flow_loop(scheduler: Any, x: Any, velocity: Callable[[Any, Any], Any], **set_kw: Any) -> Any:
    scheduler.set_timesteps(**set_kw)
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t), t, x).prev_sample
    return x


def test_hunyuan_flow_sampler_matches_pipeline_loop(tmp_dir: str) -> None:
    """HunyuanVideo pipeline: shift-7 flow matching on sigmas linspace(1, 0, n + 1)[:-1], embedded guidance."""
    torch_model, module, params = loaded("hunyuan_guidance_masked", tmp_dir)
    t_kw, _ = CASES[0].inputs(torch.Generator().manual_seed(2))
    sigmas = list(hunyuan_video.flow_shift_sigmas(2))
    assert sigmas == [1.0, 0.5]
    cond_t = {k: v for k, v in t_kw.items() if k not in ("hidden_states", "timestep")}
    with torch.no_grad():
        ref = flow_loop(
            diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
            t_kw["hidden_states"],
            lambda x, t: torch_model(hidden_states=x, timestep=t.expand(B), **cond_t).sample,
            sigmas=sigmas,
        )

    def model_fn(x, t, cond, _):
        return module.apply({"params": params}, x, jnp.full((B,), t), **cond)

    ours = sampling.sample_flow_euler(model_fn, to_jax(t_kw["hidden_states"]), to_jax(cond_t), sigmas=sigmas, shift=7.0)
    assert rel_err(ours, ref.numpy()) <= TOL


def test_cogvideox_ddim_sampler_with_cfg_matches_pipeline_loop(tmp_dir: str) -> None:
    """CogVideoX pipeline: CogVideoXDDIMScheduler (2B settings, v-prediction) with batched CFG."""
    torch_model, module, params = loaded("cogvideox_2b_sincos", tmp_dir)
    t_kw, _ = CASES[2].inputs(torch.Generator().manual_seed(2))
    x, text = t_kw["hidden_states"], t_kw["encoder_hidden_states"]
    sched = diffusers.CogVideoXDDIMScheduler(prediction_type="v_prediction", **sampling.COGVIDEOX_2B_SCHEDULER)
    sched.set_timesteps(2)
    with torch.no_grad():
        for t in sched.timesteps:
            v_u, v_c = torch_model(torch.cat([x, x]), torch.cat([0 * text, text]), t.expand(2 * B)).sample.chunk(2)
            x = sched.step(v_u + 6.0 * (v_c - v_u), t, x).prev_sample

    def model_fn(lat, t, cond, _):
        return module.apply({"params": params}, lat, cond, jnp.full((lat.shape[0],), t))

    text_j = to_jax(text)
    ours = sampling.sample_ddim(
        model_fn,
        to_jax(t_kw["hidden_states"]),
        text_j,
        uncond=0 * text_j,
        guidance_scale=6.0,
        schedule=sampling.cogvideox_ddim_schedule(2, **sampling.COGVIDEOX_2B_SCHEDULER),
        prediction_type="v_prediction",
    )
    assert rel_err(ours, x.numpy()) <= TOL


def test_mochi_flow_sampler_matches_pipeline_loop(tmp_dir: str) -> None:
    """Mochi pipeline: linear-quadratic sigmas through an inverted-sigma flow-match scheduler."""
    torch_model, module, params = loaded("mochi_right_padded", tmp_dir)
    t_kw, _ = CASES[5].inputs(torch.Generator().manual_seed(2))
    sigmas = mochi.linear_quadratic_sigmas(3)
    cond_t = {k: t_kw[k] for k in ("encoder_hidden_states", "encoder_attention_mask")}
    with torch.no_grad():
        ref = flow_loop(
            diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
            t_kw["hidden_states"],
            lambda x, t: torch_model(hidden_states=x, timestep=t.expand(B), **cond_t).sample,
            sigmas=sigmas,
        )

    def model_fn(x, t, cond, _):
        return module.apply(
            {"params": params}, x, cond["encoder_hidden_states"], jnp.full((B,), t), cond["encoder_attention_mask"]
        )

    schedule = sampling.flow_match_schedule(sigmas=list(sigmas), invert_sigmas=True)
    ours = sampling.sample_flow_euler(model_fn, to_jax(t_kw["hidden_states"]), to_jax(cond_t), schedule=schedule)
    assert rel_err(ours, ref.numpy()) <= TOL


def test_ltx_flow_sampler_matches_pipeline_loop(tmp_dir: str) -> None:
    """LTX pipeline: dynamic-shift flow matching (mu from the token count, shift_terminal 0.1)."""
    torch_model, module, params = loaded("ltx_pipeline_rope_scale", tmp_dir)
    t_kw, j_kw = CASES[7].inputs(torch.Generator().manual_seed(2))
    tokens = t_kw["hidden_states"].shape[1]
    kw = ltx_video.flow_schedule_kwargs(2, tokens)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    cond_t = {k: v for k, v in t_kw.items() if k not in ("hidden_states", "timestep")}
    with torch.no_grad():
        ref = flow_loop(
            sched,
            t_kw["hidden_states"],
            lambda x, t: torch_model(hidden_states=x, timestep=t.expand(B), **cond_t).sample,
            sigmas=kw["sigmas"],
            mu=kw["mu"],
        )
    static = {k: j_kw[k] for k in ("num_frames", "height", "width", "rope_interpolation_scale")}

    def model_fn(x, t, cond, _):
        return module.apply({"params": params}, x, cond["text"], jnp.full((B,), t), cond["mask"], **static)

    cond = {"text": j_kw["encoder_hidden_states"], "mask": j_kw["encoder_attention_mask"]}
    ours = sampling.sample_flow_euler(
        model_fn, j_kw["hidden_states"], cond, schedule=sampling.flow_match_schedule(**kw)
    )
    assert rel_err(ours, ref.numpy()) <= TOL


def test_ltx2_audio_video_sampler_matches_pipeline_loop(tmp_dir: str) -> None:
    """LTX-2 pipeline without guidance: video and audio stepped with the same sigmas (packed into one array)."""
    torch_model, module, params = loaded("ltx2_base", tmp_dir)
    t_kw, j_kw = CASES[9].inputs(torch.Generator().manual_seed(2))
    kw = ltx_video.flow_schedule_kwargs(2, t_kw["hidden_states"].shape[1], shift_terminal=None)
    assert "shift_terminal" not in kw
    sched_kw = dict(
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096
    )
    video_s, audio_s = (diffusers.FlowMatchEulerDiscreteScheduler(**sched_kw) for _ in range(2))
    video_s.set_timesteps(sigmas=kw["sigmas"], mu=kw["mu"])
    audio_s.set_timesteps(sigmas=kw["sigmas"], mu=kw["mu"])
    x, a = t_kw["hidden_states"], t_kw["audio_hidden_states"]
    cond_t = {k: v for k, v in t_kw.items() if k not in ("hidden_states", "audio_hidden_states", "timestep")}
    with torch.no_grad():
        for t in video_s.timesteps:
            out = torch_model(hidden_states=x, audio_hidden_states=a, timestep=t.expand(B), **cond_t)
            x = video_s.step(out.sample, t, x).prev_sample
            a = audio_s.step(out.audio_sample, t, a).prev_sample
    v_shape, a_shape = j_kw["hidden_states"].shape[1:], j_kw["audio_hidden_states"].shape[1:]
    cond = {
        k: v
        for k, v in j_kw.items()
        if isinstance(v, jax.Array) and k not in ("hidden_states", "audio_hidden_states", "timestep")
    }
    static = {k: v for k, v in j_kw.items() if not isinstance(v, jax.Array)}

    def model_fn(packed, t, c, _):
        video, audio = ltx2.unpack_av(packed, v_shape, a_shape)
        out = module.apply({"params": params}, video, audio, timestep=jnp.full((B,), t), **c, **static)
        return ltx2.pack_av(*out)

    packed = ltx2.pack_av(j_kw["hidden_states"], j_kw["audio_hidden_states"])
    ours = sampling.sample_flow_euler(model_fn, packed, cond, schedule=sampling.flow_match_schedule(**kw))
    video, audio = ltx2.unpack_av(ours, v_shape, a_shape)
    assert rel_err(video, x.numpy()) <= TOL and rel_err(audio, a.numpy()) <= TOL


def test_cogvideox_dpm_sampler_runs_the_model(tmp_dir: str) -> None:
    """CogVideoX-5B's recommended DPM scheduler drives the 1.5-style port (patch_size_t, ofs) in one scan."""
    _, module, params = loaded("cogvideox_15_patch_t_ofs", tmp_dir)
    _, j_kw = CASES[4].inputs(torch.Generator().manual_seed(2))

    def model_fn(x, t, cond, _):
        return module.apply({"params": params}, x, cond["text"], jnp.full((B,), t), cond["ofs"])

    cond = {"text": j_kw["encoder_hidden_states"], "ofs": j_kw["ofs"]}
    x_T = j_kw["hidden_states"]
    out, traj = sampling.sample_cogvideox_dpm(
        model_fn, x_T, cond, num_steps=2, key=jax.random.key(0), return_trajectory=True
    )
    assert out.shape == x_T.shape and traj.shape == (3, *x_T.shape)
    assert np.all(np.isfinite(np.asarray(traj))) and not np.allclose(out, x_T)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="token_replace"):
        models.HunyuanVideoConfig(image_condition_type="token_replace")
    with pytest.raises(ValueError, match="learned positional"):
        models.CogVideoXConfig(use_learned_positional_embeddings=True)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        models.LTXVideoConfig(cross_attention_dim=100)
    with pytest.raises(ValueError, match="split RoPE"):
        models.LTX2Config(rope_type="split", audio_num_attention_heads=16, audio_attention_head_dim=128)
    with pytest.raises(ValueError, match="linear_steps"):
        mochi.linear_quadratic_sigmas(1)
    np.testing.assert_allclose(cogvideox.rope_positions(models.CogVideoXConfig(), (1, 30, 45))[:, 1].max(), 29.0)
