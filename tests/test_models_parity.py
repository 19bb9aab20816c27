"""Flax ports vs diffusers on tiny random models (CPU, fp32): same checkpoint, same inputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import models

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-4


def rel_err(out: Any, ref: Any) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@dataclasses.dataclass(frozen=True)
class Case:
    """A tiny diffusers config plus a builder of (torch args, torch kwargs)."""

    name: str
    cls_name: str
    kwargs: dict[str, Any]
    make_inputs: Callable[[Any], tuple[tuple[Any, ...], dict[str, Any]]]

    def build(self, seed: int = 0) -> Any:
        torch.manual_seed(seed)
        model = getattr(diffusers, self.cls_name)(**self.kwargs)
        with torch.no_grad():  # perturb every param (norm weights, biases too) so mix-ups show
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        return model.eval()


def _wan_inputs(frames: int, h: int, w: int, in_ch: int, text_len: int, text_dim: int, image: tuple[int, int] | None):
    def make(g: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kw = {}
        if image is not None:
            kw["encoder_hidden_states_image"] = torch.randn(2, *image, generator=g)
        x = torch.randn(2, in_ch, frames, h, w, generator=g)
        return (x, torch.tensor([10.0, 731.0]), torch.randn(2, text_len, text_dim, generator=g)), kw

    return make


def _flux_inputs(img_tokens: int, txt_tokens: int, in_ch: int, joint: int, pooled: int, guidance: bool):
    def make(g: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        img_ids = torch.randint(0, 9, (img_tokens, 3), generator=g).float()
        txt_ids = torch.zeros(txt_tokens, 3)
        kw = {
            "hidden_states": torch.randn(2, img_tokens, in_ch, generator=g),
            "encoder_hidden_states": torch.randn(2, txt_tokens, joint, generator=g),
            "pooled_projections": torch.randn(2, pooled, generator=g),
            "timestep": torch.tensor([0.25, 0.9]),
            "img_ids": img_ids,
            "txt_ids": txt_ids,
        }
        if guidance:
            kw["guidance"] = torch.tensor([3.5, 1.0])
        return (), kw

    return make


def _dit_inputs(in_ch: int, size: int, num_classes: int):
    def make(g: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        x = torch.randn(2, in_ch, size, size, generator=g)
        return (x, torch.tensor([3, 700]), torch.tensor([1, num_classes])), {}  # num_classes = null class

    return make


CASES = [
    Case(
        "wan_t2v",
        "WanTransformer3DModel",
        dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=32,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
        ),
        _wan_inputs(3, 4, 6, 4, 7, 16, None),
    ),
    Case(
        "wan_i2v_patch212",
        "WanTransformer3DModel",
        dict(
            patch_size=(2, 1, 2),
            num_attention_heads=3,
            attention_head_dim=12,
            in_channels=5,
            out_channels=6,
            text_dim=8,
            freq_dim=16,
            ffn_dim=24,
            num_layers=2,
            cross_attn_norm=False,
            image_dim=8,
            added_kv_proj_dim=36,
        ),
        _wan_inputs(4, 3, 4, 5, 512, 8, (3, 8)),  # diffusers' I2V path assumes 512 text tokens
    ),
    Case(
        "flux_schnell_like",
        "FluxTransformer2DModel",
        dict(
            patch_size=1,
            in_channels=8,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=12,
            pooled_projection_dim=10,
            guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),
        ),
        _flux_inputs(6, 5, 8, 12, 10, False),
    ),
    Case(
        "flux_dev_like_patch2",
        "FluxTransformer2DModel",
        dict(
            patch_size=2,
            in_channels=8,
            out_channels=4,
            num_layers=2,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=12,
            pooled_projection_dim=10,
            guidance_embeds=True,
            axes_dims_rope=(2, 6, 8),
        ),
        _flux_inputs(9, 4, 8, 12, 10, True),
    ),
    Case(
        "dit_learned_sigma",
        "DiTTransformer2DModel",
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
        ),
        _dit_inputs(4, 8, 10),
    ),
    Case(
        "dit_patch4_affine_resized",
        "DiTTransformer2DModel",
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=3,
            num_layers=2,
            sample_size=16,
            patch_size=4,
            num_embeds_ada_norm=5,
            norm_elementwise_affine=True,
            activation_fn="gelu",
            attention_bias=False,
        ),
        _dit_inputs(3, 12, 5),  # 12x12 input != sample_size 16: the position embedding is recomputed
    ),
]


def run_both(case: Case, torch_model: Any, model: Any, params: Any) -> tuple[np.ndarray, np.ndarray]:
    args, kwargs = case.make_inputs(torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch_model(*args, **kwargs).sample.numpy()
    to_jax = lambda t: jnp.asarray(t.numpy())  # noqa: E731
    out = jax.jit(model.apply)({"params": params}, *map(to_jax, args), **{k: to_jax(v) for k, v in kwargs.items()})
    return np.asarray(out), ref


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_diffusers(case: Case, tmp_path: Path) -> None:
    torch_model = case.build()
    torch_model.save_pretrained(tmp_path)
    model, params = models.load_pretrained(tmp_path)
    out, ref = run_both(case, torch_model, model, params)
    assert rel_err(out, ref) <= TOL
    # The role table covers every kernel of every config.
    roles = models.layer_roles(model.config, params)
    assert roles and all(roles.values())


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    case = CASES[0]
    torch_model = case.build()
    torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    model, params = models.load_pretrained(tmp_path)
    out, ref = run_both(case, torch_model, model, params)
    assert rel_err(out, ref) <= TOL


def load_in_diffusers(cls_name: str, path: Path) -> Any:
    """diffusers model from our config.json and safetensors, loaded strictly.

    (`from_pretrained` needs `accelerate` for Wan's fp32-kept modules; it is not installed here.)
    """
    from safetensors.torch import load_file

    cls = getattr(diffusers, cls_name)
    torch_model = cls.from_config(cls.load_config(path))
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    torch_model.load_state_dict(state, strict=True)
    return torch_model.eval()


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=lambda c: c.name)
def test_flax_params_saved_load_in_diffusers(case: Case, tmp_path: Path) -> None:
    """Params changed on the Flax side and shipped with save_pretrained (sharded) run in diffusers
    with the same output: the inverse key map and layouts are right."""
    case.build().save_pretrained(tmp_path / "src")
    model, params = models.load_pretrained(tmp_path / "src")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32), params)
    models.save_pretrained(tmp_path / "dst", model.config, params, max_shard_bytes=40_000)
    assert (tmp_path / "dst" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    torch_model = load_in_diffusers(case.cls_name, tmp_path / "dst")
    out, ref = run_both(case, torch_model, model, params)
    assert rel_err(out, ref) <= TOL


def test_bf16_load_close_to_fp32(tmp_path: Path) -> None:
    case = CASES[0]
    torch_model = case.build()
    torch_model.save_pretrained(tmp_path)
    model, params = models.load_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert params["blocks_0"]["attn1"]["to_q"]["kernel"].dtype == jnp.bfloat16
    assert params["blocks_0"]["scale_shift_table"].dtype == jnp.float32  # diffusers' _keep_in_fp32_modules
    assert params["condition_embedder"]["time_embedder"]["linear_1"]["kernel"].dtype == jnp.float32
    out, ref = run_both(case, torch_model, model, params)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref) < 3e-2
