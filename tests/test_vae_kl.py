"""The Flax AutoencoderKL (Flux's image VAE) vs diffusers on tiny random checkpoints (CPU, fp32):
decode, encode, tiled decode/encode, Flux's latent scaling, loading from a pipeline directory;
and a property of the tile blending shared with the Wan VAE."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from hypothesis import given, settings
from hypothesis import strategies as st

from jquant.models.autoencoder_kl import AutoencoderKLConfig, Tiling, key_map, load_autoencoder_kl, param_shapes
from jquant.models.vae_blocks import TilePlan, tiled

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

ATOL = 2e-5  # fp32 on CPU; the ports differ from torch by ~2e-6

CONFIGS: dict[str, dict[str, Any]] = {
    # Flux's layout: 16 latent channels, scaling + shift, no quant convs
    "flux": dict(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    # SD-style: quant convs, three levels, two resnets, no mid-block attention
    "sd": dict(
        block_out_channels=[8, 8, 16],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        mid_block_add_attention=False,
    ),
}
_BUILT: dict[str, tuple[Any, Any, Path]] = {}


def _case(name: str, tmp_path_factory: Any) -> tuple[Any, Any, Path]:
    """(torch model, Flax KLVAE, pipeline directory) of one tiny config, built once per session."""
    if name not in _BUILT:
        torch.manual_seed(0)
        model = diffusers.AutoencoderKL(**CONFIGS[name])
        with torch.no_grad():  # perturb every param (norms too) so mix-ups show
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.eval()
        pipe = tmp_path_factory.mktemp(f"kl_{name}")
        index = {"_class_name": "FluxPipeline", "vae": ["diffusers", "AutoencoderKL"]}
        (pipe / "model_index.json").write_text(json.dumps(index))
        model.save_pretrained(pipe / "vae")
        _BUILT[name] = (model, load_autoencoder_kl(pipe), pipe)
    return _BUILT[name]


@pytest.fixture(params=sorted(CONFIGS))
def case(request: Any, tmp_path_factory: Any) -> tuple[Any, Any, Path]:
    return _case(request.param, tmp_path_factory)


def _randn(*shape: int, seed: int = 0) -> Any:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(out: Any, ref: Any) -> None:
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=ATOL, rtol=0)


def test_decode_matches_diffusers(case: Any) -> None:
    model, vae, _ = case
    c = vae.config.latent_channels
    z = _randn(2, c, 3, 5)
    with torch.no_grad():
        ref = model.decode(z).sample
    out = vae.decode(jnp.asarray(z.numpy()))
    r = vae.config.spatial_ratio
    assert out.shape == (2, 3, 3 * r, 5 * r)
    _close(out, ref)


def test_encode_matches_diffusers(case: Any) -> None:
    model, vae, _ = case
    r = vae.config.spatial_ratio
    x = _randn(2, 3, 3 * r, 5 * r, seed=1).clamp(-1, 1)
    with torch.no_grad():
        ref = model.encode(x).latent_dist
    out = vae.encode(jnp.asarray(x.numpy()))
    _close(out.mean, ref.mean)
    _close(out.logvar, ref.logvar)
    np.testing.assert_allclose(np.asarray(out.std), ref.std.numpy(), rtol=1e-4)


@pytest.mark.parametrize("name", ["flux", pytest.param("sd", marks=pytest.mark.slow)])
def test_tiled_decode_matches_diffusers(name: str, tmp_path_factory: Any) -> None:
    """diffusers' tiled_decode with its config-sized tiles (1/4 overlap): a latent of 1.25 x 1.25
    tiles, so edge tiles are smaller and blending runs both ways."""
    model, vae, _ = _case(name, tmp_path_factory)
    latent = vae.config.tile_size // vae.config.spatial_ratio
    model.enable_tiling()
    try:
        z = _randn(1, vae.config.latent_channels, latent + latent // 4, latent + latent // 4, seed=2)
        with torch.no_grad():
            ref = model.decode(z).sample
        out = vae.decode(jnp.asarray(z.numpy()), tiling=Tiling())
        _close(out, ref)
        assert float(jnp.abs(out - vae.decode(jnp.asarray(z.numpy()))).max()) > 1e-3  # tiling did change it
    finally:
        model.disable_tiling()


@pytest.mark.parametrize("name", ["flux", pytest.param("sd", marks=pytest.mark.slow)])
def test_tiled_encode_matches_diffusers(name: str, tmp_path_factory: Any) -> None:
    model, vae, _ = _case(name, tmp_path_factory)
    size = vae.config.tile_size + vae.config.tile_size // 4
    model.enable_tiling()
    try:
        x = _randn(1, 3, size, size, seed=3).clamp(-1, 1)
        with torch.no_grad():
            ref = model.encode(x).latent_dist
        _close(vae.encode(jnp.asarray(x.numpy()), tiling=Tiling()).mean, ref.mean)
    finally:
        model.disable_tiling()


def test_flux_latent_scaling(tmp_path_factory: Any) -> None:
    """FluxPipeline decodes `latents / scaling_factor + shift_factor`; normalize inverts it."""
    _, vae, _ = _case("flux", tmp_path_factory)
    z = jnp.linspace(-2, 2, 16 * 4).reshape(1, 16, 2, 2)
    np.testing.assert_allclose(vae.denormalize(z), np.asarray(z) / 0.3611 + 0.1159, rtol=1e-6)
    np.testing.assert_allclose(vae.normalize(vae.denormalize(z)), z, atol=1e-6)


def test_key_map_covers_every_tensor_once(case: Any) -> None:
    model, vae, _ = case
    entries = key_map(vae.config)
    assert sorted(e.torch_key for e in entries) == sorted(model.state_dict())
    assert len({e.flax_path for e in entries}) == len(entries)


def test_bad_directories_and_configs(tmp_path: Path, tmp_path_factory: Any) -> None:
    _, _, pipe = _case("flux", tmp_path_factory)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no vae component"):
        load_autoencoder_kl(tmp_path)
    (tmp_path / "vae").mkdir()
    cfg = json.loads((pipe / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderKLWan"}))
    with pytest.raises(ValueError, match="_class_name is 'AutoencoderKLWan'"):
        load_autoencoder_kl(tmp_path)
    (tmp_path / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_autoencoder_kl(tmp_path)
    with pytest.raises(ValueError, match="not divisible by norm_num_groups"):
        AutoencoderKLConfig(
            block_out_channels=(8, 12),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8,
        )
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        AutoencoderKLConfig(block_out_channels=(32,), down_block_types=("AttnDownEncoderBlock2D",))


def test_bad_inputs_are_refused(tmp_path_factory: Any) -> None:
    _, vae, _ = _case("flux", tmp_path_factory)
    with pytest.raises(ValueError, match=r"expected \[B, 16, H, W\]"):
        vae.decode(jnp.zeros((1, 4, 2, 2)))
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(jnp.zeros((1, 3, 5, 4)))


@settings(max_examples=8)
@given(height=st.integers(1, 11), width=st.integers(1, 11), tile=st.integers(4, 7), data=st.data())
def test_tiling_a_pointwise_map_changes_nothing(height: int, width: int, tile: int, data: Any) -> None:
    """Blending overlapping tiles of a pointwise map reproduces the map on the whole input:
    the overlaps hold the same values in both tiles, whatever the edge tiles' sizes."""
    stride = tile - data.draw(st.integers(1, tile // 2), label="overlap")
    x = np.arange(height * width * 2, dtype=np.float32).reshape(1, height, width, 2)  # NumPy: no compile a shape
    plan = TilePlan((tile, tile), (stride, stride), (tile - stride,) * 2, (stride, stride), crop=(height, width))
    np.testing.assert_allclose(tiled(_pointwise, x, plan), 2.0 * x + 1.0, rtol=1e-6)


@jax.jit  # one program a tile shape (eager: one for each op)
def _pointwise(t: Any) -> Any:
    return 2.0 * t + 1.0


FLUX_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    latent_channels=16,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def test_flux_config_maps_tensor_for_tensor() -> None:
    """FLUX.1's VAE config: every diffusers tensor (built on the meta device, no memory) has a
    key-map entry whose layout change gives the Flax param's shape."""
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**FLUX_VAE)
    cfg = AutoencoderKLConfig.from_diffusers(FLUX_VAE)
    shapes = flatten_dict(param_shapes(cfg), sep="/")
    state = ref.state_dict()
    entries = key_map(cfg)
    assert sorted(e.torch_key for e in entries) == sorted(state)
    for e in entries:
        torch_shape = tuple(state[e.torch_key].shape)
        assert e.to_flax(np.broadcast_to(np.float32(0), torch_shape)).shape == shapes[e.flax_path].shape, e.torch_key
    assert sum(v.size for v in shapes.values()) == sum(p.numel() for p in ref.parameters())


def test_decode_bytes_counts_the_call(case: Any) -> None:
    """`decode_bytes`: XLA's analysis of the decode call; its output is the image, its arguments
    hold the decoder's weights and the latents; a size the VAE cannot decode is named."""
    _, vae, _ = case
    r = vae.config.spatial_ratio
    mem = vae.decode_bytes(4 * r, 2 * r, batch=2)
    item = jnp.dtype(vae.dtype).itemsize
    assert mem["outputs"] == 2 * (4 * r) * (2 * r) * vae.config.out_channels * item
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(vae.params))
    latents = 2 * 4 * 2 * vae.config.latent_channels * item
    assert latents < mem["arguments"] <= weights + latents  # the decoder's weights (XLA drops the encoder's)
    assert mem["temporaries"] > 0
    with pytest.raises(ValueError, match="multiples of"):
        vae.decode_bytes(4 * r + 1, 2 * r)
