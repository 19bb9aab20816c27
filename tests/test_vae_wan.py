"""The Flax AutoencoderKLWan vs diffusers on tiny random checkpoints (CPU, fp32): chunked decode,
chunked encode, tiled decode/encode, whole-clip passes equal to the chunked ones, loading from a
pipeline directory (single and sharded safetensors) and the errors of bad directories and inputs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import _draws as draws
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from jquant.models import CheckpointMismatchError
from jquant.models.wan_vae import Tiling, WanVAEConfig, key_map, load_wan_vae, param_shapes

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

ATOL = 2e-5  # fp32 on CPU; the ports differ from torch by ~2e-6

CONFIGS: dict[str, dict[str, Any]] = {
    # two levels (spatial 4x, temporal 2x), one resnet per level; docs/pipelines.md's example
    # uses this config and shapes, so it reuses the compiled decode
    "small": dict(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, 0.2, -0.3, 0.0],
        latents_std=[1.0, 2.0, 0.5, 1.5],
        scale_factor_spatial=4,
        scale_factor_temporal=2,
    ),
    # Wan2.1's layout (spatial 8x, temporal 4x), two resnets per level
    "wan21": dict(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=2,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ),
}


def _build(kwargs: dict[str, Any], seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKLWan(**kwargs)
    with torch.no_grad():  # perturb every param (norm gains too) so mix-ups show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


_BUILT: dict[str, tuple[Any, Any, Path]] = {}


def _case(name: str, tmp_path_factory: Any) -> tuple[Any, Any, Path]:
    """(torch model, Flax WanVAE, pipeline directory) of one tiny config, built once per session."""
    if name not in _BUILT:
        pipe = tmp_path_factory.mktemp(f"wan_{name}")
        index = {"_class_name": "WanPipeline", "vae": ["diffusers", "AutoencoderKLWan"]}
        (pipe / "model_index.json").write_text(json.dumps(index))
        model = _build(CONFIGS[name])
        model.save_pretrained(pipe / "vae")
        _BUILT[name] = (model, load_wan_vae(pipe), pipe)
    return _BUILT[name]


@pytest.fixture(params=sorted(CONFIGS))
def case(request: Any, tmp_path_factory: Any) -> tuple[Any, Any, Path]:
    return _case(request.param, tmp_path_factory)


@pytest.fixture
def small(tmp_path_factory: Any) -> tuple[Any, Any, Path]:
    return _case("small", tmp_path_factory)


def _randn(*shape: int, seed: int = 0) -> Any:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(out: Any, ref: Any) -> None:
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=ATOL, rtol=0)


def test_decode_matches_diffusers_and_whole_clip(case: Any) -> None:
    model, vae, _ = case
    z = _randn(1, 4, 3, 2, 3)
    with torch.no_grad():
        ref = model.decode(z).sample
    out = vae.decode(jnp.asarray(z.numpy()))
    t = vae.config.temporal_ratio
    assert out.shape == (1, 3, 1 + t * 2, 2 * vae.config.spatial_ratio, 3 * vae.config.spatial_ratio)
    _close(out, ref)
    chex.assert_trees_all_close(vae.decode_whole(jnp.asarray(z.numpy())), out, atol=1e-5, rtol=0)


def test_encode_matches_diffusers_and_whole_clip(case: Any) -> None:
    model, vae, _ = case
    r, t = vae.config.spatial_ratio, vae.config.temporal_ratio
    x = _randn(1, 3, 1 + 2 * t, 2 * r, 3 * r, seed=1).clamp(-1, 1)
    with torch.no_grad():
        ref = model.encode(x).latent_dist
    out = vae.encode(jnp.asarray(x.numpy()))
    assert out.mean.shape == (1, 4, 3, 2, 3)
    _close(out.mean, ref.mean)
    _close(out.logvar, ref.logvar)
    whole = vae.encode_whole(jnp.asarray(x.numpy()))
    chex.assert_trees_all_close((whole.mean, whole.logvar), (out.mean, out.logvar), atol=1e-5, rtol=0)


def _tiled_case(name: str, tmp_path_factory: Any) -> tuple[Any, Any, Tiling]:
    """The case with diffusers' tiling on (tiles of 4 x 4 latents, stride 3) and the same Tiling."""
    model, vae, _ = _case(name, tmp_path_factory)
    r = vae.config.spatial_ratio
    model.enable_tiling(*(4 * r,) * 2, *(3 * r,) * 2)
    return model, vae, Tiling(4 * r, 4 * r, 3 * r, 3 * r)


@pytest.mark.parametrize("name", ["small", pytest.param("wan21", marks=pytest.mark.slow)])
def test_tiled_decode_matches_diffusers(name: str, tmp_path_factory: Any) -> None:
    """diffusers' tiled_decode: a 5 x 6 latent in overlapping tiles, so edge tiles are smaller
    and blending runs both ways. One latent frame (the chunked scan is covered above), so each
    tile shape compiles one decoder pass."""
    model, vae, tiling = _tiled_case(name, tmp_path_factory)
    try:
        z = _randn(1, 4, 1, 5, 6, seed=2)
        with torch.no_grad():
            ref = model.decode(z).sample
        out = vae.decode(jnp.asarray(z.numpy()), tiling=tiling)
        _close(out, ref)
        assert float(jnp.abs(out - vae.decode(jnp.asarray(z.numpy()))).max()) > 1e-3  # tiling did change it
    finally:
        model.disable_tiling()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiled_encode_matches_diffusers(name: str, tmp_path_factory: Any) -> None:
    model, vae, tiling = _tiled_case(name, tmp_path_factory)
    r = vae.config.spatial_ratio
    try:
        x = _randn(1, 3, 1, 5 * r, 6 * r, seed=3).clamp(-1, 1)
        with torch.no_grad():
            ref = model.encode(x).latent_dist
        out = vae.encode(jnp.asarray(x.numpy()), tiling=tiling)
        _close(out.mean, ref.mean)
        _close(out.logvar, ref.logvar)
    finally:
        model.disable_tiling()


def test_bf16_decode_tracks_fp32(small: Any) -> None:
    """The pipeline's default VAE precision: bf16 params, activations and cache through the scan."""
    _, vae, pipe = small
    z = draws.normal(jax.random.key(0), (1, 4, 3, 2, 3))
    out = load_wan_vae(pipe, dtype=jnp.bfloat16).decode(z)
    assert out.dtype == jnp.bfloat16
    err = float(jnp.abs(out.astype(jnp.float32) - vae.decode(z)).max())
    assert 0 < err < 0.1, err


def test_latent_normalization_round_trips(small: Any) -> None:
    _, vae, _ = small
    z = draws.normal(jax.random.key(0), (1, 4, 2, 3, 3))
    mean = np.asarray(vae.config.latents_mean).reshape(1, 4, 1, 1, 1)
    std = np.asarray(vae.config.latents_std).reshape(1, 4, 1, 1, 1)
    np.testing.assert_allclose(vae.denormalize(z), np.asarray(z) * std + mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vae.normalize(vae.denormalize(z)), z, atol=1e-5)


def test_sharded_checkpoint_loads_the_same_params(small: Any, tmp_path: Path) -> None:
    model, vae, _ = small
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    chex.assert_trees_all_equal(load_wan_vae(tmp_path).params, vae.params)


def test_bad_directories_name_file_and_key(small: Any, tmp_path: Path) -> None:
    model, _, pipe = small
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no vae component"):
        load_wan_vae(tmp_path)
    shutil.copytree(pipe / "vae", tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    from safetensors.numpy import load_file, save_file

    tensors = load_file(weights)
    dropped = "decoder.conv_out.weight"
    del tensors[dropped]
    save_file(tensors, weights)
    with pytest.raises(CheckpointMismatchError, match=dropped):
        load_wan_vae(tmp_path)
    tensors[dropped] = np.zeros((2, 2, 3, 3, 3), np.float32)
    save_file(tensors, weights)
    with pytest.raises(CheckpointMismatchError, match=rf"diffusion_pytorch_model.safetensors: {dropped}"):
        load_wan_vae(tmp_path)
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="_class_name is 'AutoencoderKL'"):
        load_wan_vae(tmp_path)


def test_bad_inputs_are_refused(small: Any) -> None:
    _, vae, _ = small
    with pytest.raises(ValueError, match=r"expected \[B, 4, T, H, W\]"):
        vae.decode(jnp.zeros((1, 3, 2, 2, 2)))
    r, t = vae.config.spatial_ratio, vae.config.temporal_ratio
    with pytest.raises(ValueError, match=f"needs 1 \\+ {t}k frames"):
        vae.encode(jnp.zeros((1, 3, 2 + t, r, r)))
    with pytest.raises(ValueError, match="attn_scales"):
        WanVAEConfig(attn_scales=(1.0,))
    with pytest.raises(ValueError, match="Wan2.2"):
        WanVAEConfig(is_residual=True)
    with pytest.raises(ValueError, match="scale_factor_spatial is 8, the layers give 4"):
        WanVAEConfig(dim_mult=(1, 2, 2), temperal_downsample=(False, True))


def test_key_map_covers_every_tensor_once(case: Any) -> None:
    model, vae, _ = case
    entries = key_map(vae.config)
    assert sorted(e.torch_key for e in entries) == sorted(model.state_dict())
    assert len({e.flax_path for e in entries}) == len(entries)


def test_chunked_decode_memory_does_not_grow_with_the_clip(small: Any) -> None:
    """XLA's working set of the chunked decode is one latent frame's (plus the cache): tripling
    the clip adds less to it than the extra output video."""
    _, vae, _ = small
    r = vae.config.spatial_ratio
    short, long = vae.decode_bytes(3, 4 * r, 4 * r), vae.decode_bytes(9, 4 * r, 4 * r)
    assert long["outputs"] > 2 * short["outputs"]
    assert long["temporaries"] - short["temporaries"] < long["outputs"] - short["outputs"]


def test_docs_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The self-contained example of docs/pipelines.md's VAE section runs as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "pipelines.md").read_text()
    section = text.split("\n## VAEs", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    exec(compile(blocks[1], "docs/pipelines.md", "exec"), {})
    assert capsys.readouterr().out.split() == ["(1,", "3,", "5,", "8,", "12)", "True"]


def test_published_config_maps_tensor_for_tensor() -> None:
    """Wan2.1's published VAE config: every diffusers tensor (built on the meta device, no
    memory) has a key-map entry whose layout change gives the Flax param's shape."""
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan()
    cfg = WanVAEConfig.from_diffusers(dict(ref.config))
    shapes = flatten_dict(param_shapes(cfg), sep="/")
    entries = key_map(cfg)
    state = ref.state_dict()
    assert sorted(e.torch_key for e in entries) == sorted(state)
    for e in entries:
        torch_shape = tuple(state[e.torch_key].shape)
        assert e.to_flax(np.broadcast_to(np.float32(0), torch_shape)).shape == shapes[e.flax_path].shape, e.torch_key
    assert sum(v.size for v in shapes.values()) == sum(p.numel() for p in ref.parameters())
