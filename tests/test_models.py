"""models/ without torch: loading errors, save/load round trip, roles, shared blocks, param counts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from jquant import models
from jquant.models import dit, flux, wan
from jquant.models.attention import apply_rope, attention
from jquant.models.blocks import patchify, unpatchify
from jquant.models.roles import ROLES, assign_roles, kernel_paths

TINY = {
    "wan": wan.WanConfig(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=8,
        freq_dim=16,
        ffn_dim=16,
        num_layers=2,
    ),
    "wan_i2v": wan.WanConfig(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        text_dim=8,
        freq_dim=16,
        ffn_dim=16,
        num_layers=1,
        image_dim=6,
        added_kv_proj_dim=24,
        cross_attn_norm=False,
    ),
    "flux": flux.FluxConfig(
        in_channels=8,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=10,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    "dit": dit.DiTConfig(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        num_embeds_ada_norm=10,
    ),
}


def random_params(config: Any, seed: int = 0, dtype: Any = np.float32) -> dict[str, Any]:
    """Random numpy params with the port's shapes (no init compile)."""
    rng = np.random.default_rng(seed)
    shapes = models.param_shapes(config)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(dtype), shapes)


def test_save_load_round_trip_sharded(tmp_path: Path) -> None:
    params = random_params(TINY["flux"])
    models.save_pretrained(tmp_path, TINY["flux"], params, max_shard_bytes=20_000)
    index = json.loads((tmp_path / models.loading.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "FluxTransformer2DModel"
    model, loaded = models.load_pretrained(tmp_path)
    assert model.config == TINY["flux"]
    chex.assert_trees_all_equal(loaded, jax.tree.map(jnp.asarray, params))
    # Re-saving unsharded over the same directory removes the stale shards and index.
    models.save_pretrained(tmp_path, TINY["flux"], params)
    assert not (tmp_path / models.loading.INDEX_NAME).exists()
    chex.assert_trees_all_equal(models.load_pretrained(tmp_path)[1], loaded)


def test_bf16_round_trip_and_keep_fp32(tmp_path: Path) -> None:
    import ml_dtypes

    params = random_params(TINY["wan"], dtype=ml_dtypes.bfloat16)
    models.save_pretrained(tmp_path, TINY["wan"], params)
    raw = load_file(tmp_path / models.loading.WEIGHTS_NAME)
    assert raw["blocks.0.attn1.to_q.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(raw["blocks.0.attn1.to_q.weight"], params["blocks_0"]["attn1"]["to_q"]["kernel"].T)
    model, loaded = models.load_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert model.dtype == jnp.bfloat16
    assert loaded["blocks_1"]["ffn"]["net_2"]["kernel"].dtype == jnp.bfloat16
    assert loaded["scale_shift_table"].dtype == jnp.float32
    assert loaded["blocks_0"]["norm2"]["scale"].dtype == jnp.float32


def test_missing_and_unexpected_keys_listed(tmp_path: Path) -> None:
    models.save_pretrained(tmp_path, TINY["dit"], random_params(TINY["dit"]))
    file = tmp_path / models.loading.WEIGHTS_NAME
    tensors = load_file(file)
    del tensors["transformer_blocks.1.attn1.to_k.weight"]
    del tensors["proj_out_2.bias"]
    tensors["transformer_blocks.7.bogus.weight"] = np.zeros(3, np.float32)
    save_file(tensors, file)
    with pytest.raises(models.CheckpointMismatchError) as err:
        models.load_pretrained(tmp_path)
    msg = str(err.value)
    for key in ("transformer_blocks.1.attn1.to_k.weight", "proj_out_2.bias", "transformer_blocks.7.bogus.weight"):
        assert key in msg
    assert "missing keys (2)" in msg and "unexpected keys (1)" in msg


def test_shape_mismatch_lists_every_tensor(tmp_path: Path) -> None:
    models.save_pretrained(tmp_path, TINY["wan"], random_params(TINY["wan"]))
    config = json.loads((tmp_path / "config.json").read_text())
    config["ffn_dim"] = 20
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(models.CheckpointMismatchError, match="6 tensors have the wrong shape") as err:
        models.load_pretrained(tmp_path)
    assert "blocks.1.ffn.net.2.weight" in str(err.value)


def test_bad_directory_and_class(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="no Flax port for diffusers class 'UNet2DConditionModel'"):
        models.load_pretrained(tmp_path)
    with pytest.raises(models.CheckpointMismatchError, match="params tree"):
        params = random_params(TINY["dit"])
        del params["proj_out_1"]
        models.save_pretrained(tmp_path, TINY["dit"], params)


def test_config_validation_and_unknown_keys() -> None:
    with pytest.raises(ValueError, match="axes_dims_rope"):
        flux.FluxConfig(attention_head_dim=64)
    with pytest.raises(ValueError, match="norm_type"):
        dit.DiTConfig(norm_type="ada_norm")
    with pytest.raises(ValueError, match="image_dim and added_kv_proj_dim"):
        wan.WanConfig(image_dim=1280)
    with pytest.warns(UserWarning, match="num_vector_embeds"):
        cfg = dit.DiTConfig.from_diffusers(
            {"_class_name": "Transformer2DModel", "num_vector_embeds": None, "patch_size": 2}
        )
    assert cfg == dit.DiTConfig()
    round_trip = wan.WanConfig.from_diffusers(wan.WAN21_T2V_1_3B.to_diffusers())
    assert round_trip == wan.WAN21_T2V_1_3B


def test_published_param_counts() -> None:
    """Counts from jax.eval_shape of the published configs; Flux.1-dev's is its known 11.9B."""
    assert models.param_count(models.param_shapes(flux.FLUX1_DEV)) == 11_901_408_320
    assert models.param_count(models.param_shapes(wan.WAN21_T2V_1_3B)) == 1_418_996_800


def test_init_params_matches_shapes() -> None:
    config = dataclasses.replace(TINY["dit"], num_layers=1)
    params = dit.init_params(config, jax.random.key(0))
    chex.assert_trees_all_equal_shapes_and_dtypes(params, models.param_shapes(config))
    chex.assert_tree_all_finite(params)
    assert float(jnp.abs(params["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]).sum()) > 0
    out = jax.jit(dit.PORT.module(config).apply)(
        {"params": params}, jnp.ones((1, 4, 8, 8)), jnp.array([5]), jnp.array([3])
    )
    assert out.shape == (1, 8, 8, 8)


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_kernel_has_roles(name: str) -> None:
    config = TINY[name]
    shapes = models.param_shapes(config)
    roles = models.layer_roles(config, shapes)
    assert set(roles) == set(kernel_paths(shapes)) and len(roles) > 10
    for path, labels in roles.items():
        assert labels and set(labels) <= ROLES, path


def test_role_semantics() -> None:
    w = models.layer_roles(TINY["wan_i2v"], models.param_shapes(TINY["wan_i2v"]))
    assert {"self_attn", "temporal", "attn.qkv"} <= set(w["blocks_0/attn1/to_q/kernel"])
    assert {"cross_attn", "cross_attn.kv", "text_fusion"} <= set(w["blocks_0/attn2/to_k/kernel"])
    assert {"cross_attn", "cross_attn.kv"} <= set(w["blocks_0/attn2/add_v_proj/kernel"])
    assert "cross_attn.kv" not in w["blocks_0/attn2/to_q/kernel"]
    assert w["blocks_0/ffn/net_0/proj/kernel"] == ("ffn.up",)
    assert w["proj_out/kernel"] == ("final",)

    f = models.layer_roles(TINY["flux"], models.param_shapes(TINY["flux"]))
    double, single = f["transformer_blocks_1/attn/to_q/kernel"], f["single_transformer_blocks_1/attn/to_q/kernel"]
    assert "double_stream" in double and "single_stream" in single and set(double) != set(single)
    assert not any("single_stream" in r for p, r in f.items() if p.startswith("transformer_blocks_"))
    assert not any("double_stream" in r for p, r in f.items() if p.startswith("single_transformer_blocks_"))
    assert "modulation" in f["single_transformer_blocks_0/norm/linear/kernel"]
    assert "embedder" in f["time_text_embed/guidance_embedder/linear_1/kernel"]

    d = models.layer_roles(TINY["dit"], models.param_shapes(TINY["dit"]))
    assert "modulation" in d["transformer_blocks_0/norm1/linear/kernel"]
    assert d["transformer_blocks_0/norm1/emb/timestep_embedder/linear_2/kernel"] == ("embedder",)


def test_assign_roles_rejects_gaps_and_unknown_roles() -> None:
    params = {"a": {"kernel": 0}, "b": {"kernel": 0, "bias": 0}}
    with pytest.raises(ValueError, match="no layer role for kernels: \\['b/kernel'\\]"):
        assign_roles(params, [("a", ("final",))])
    with pytest.raises(ValueError, match="unknown roles"):
        assign_roles(params, [("a|b", ("fnal",))])
    assert assign_roles(params, [("a|b", ("final",)), ("b", ("embedder", "final"))])["b/kernel"] == (
        "final",
        "embedder",
    )


def test_attention_matches_softmax_reference() -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    k, v = rng.standard_normal((2, 2, 7, 3, 8)).astype(np.float32)

    @jax.jit
    def reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)

    chex.assert_trees_all_close(jax.jit(attention)(q, k, v), reference(q, k, v), atol=1e-5)
    with pytest.raises(ValueError, match="implementation"):
        attention(q, k, v, implementation="flash")


@settings(max_examples=6, deadline=None)
@given(t=st.integers(1, 6), half=st.integers(1, 4), seed=st.integers(0, 100))
def test_apply_rope_is_complex_rotation(t: int, half: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, t, 2, 2 * half)).astype(np.float32)
    angles = rng.uniform(-4, 4, (t, half))
    out = apply_rope(
        jnp.asarray(x),
        jnp.asarray(np.repeat(np.cos(angles), 2, -1), jnp.float32),
        jnp.asarray(np.repeat(np.sin(angles), 2, -1), jnp.float32),
    )
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles)[None, :, None, :]
    np.testing.assert_allclose(np.asarray(out)[..., 0::2], z.real, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out)[..., 1::2], z.imag, atol=1e-5)
    # rotations preserve the norm of each pair
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@settings(max_examples=5, deadline=None)
@given(patch=st.lists(st.integers(1, 3), min_size=2, max_size=3), grid_seed=st.integers(0, 1000))
def test_patchify_dense_equals_strided_conv(patch: list[int], grid_seed: int) -> None:
    rng = np.random.default_rng(grid_seed)
    grid = rng.integers(1, 4, len(patch))
    c, out_ch = 3, 5
    x = rng.standard_normal((2, c, *[g * p for g, p in zip(grid, patch)])).astype(np.float32)
    w = rng.standard_normal((out_ch, c, *patch)).astype(np.float32)
    tokens, got_grid = patchify(jnp.asarray(x), patch)
    assert got_grid == tuple(grid)
    dense = tokens @ w.reshape(out_ch, -1).T
    conv = jax.lax.conv_general_dilated(jnp.asarray(x), jnp.asarray(w), patch, "VALID", precision="highest")
    np.testing.assert_allclose(dense, conv.reshape(2, out_ch, -1).transpose(0, 2, 1), rtol=1e-4, atol=1e-4)
    # unpatchify puts feature (p..., c) of token g at pixel g*patch + p of channel c
    feats = rng.standard_normal((2, int(np.prod(grid)), int(np.prod(patch)) * 2)).astype(np.float32)
    img = np.asarray(unpatchify(jnp.asarray(feats), tuple(grid), patch))
    g_last, p_last = tuple(g - 1 for g in grid), tuple(p - 1 for p in patch)
    pixel = tuple(g * p + q for g, p, q in zip(g_last, patch, p_last))
    np.testing.assert_array_equal(img[1, 1][pixel], feats[1, -1, -1])
    with pytest.raises(ValueError, match="not divisible"):
        patchify(jnp.zeros((1, 1, *[3] * len(patch))), [2] * len(patch))
