"""GGUF files from ``jquant export-gguf`` load in diffusers and run close to the float model.

A tiny random WanTransformer3DModel (torch, float32) is saved, exported with
:func:`jquant.io.gguf.export_gguf` as Q4_K_M and Q5_K_M (the other mixes pass too, with the
bounds below) and read back by diffusers 0.42, offline (local file, local config):

* ``from_single_file(path, config=model_dir, quantization_config=GGUFQuantizationConfig(...))``,
  diffusers' full GGUF path (GGUFLinear layers on the quantized blocks); diffusers requires
  ``accelerate`` for it, so that test skips without it;
* diffusers' own GGUF reader and dequantizers (``load_gguf_checkpoint``,
  ``dequantize_gguf_tensor``) into a plain float model, which needs no ``accelerate``.

Bounds (rel = ||out - ref|| / ||ref|| over the model output):

* vs the float model run on jquant's decode of the same file: rel <= 1e-3. diffusers
  dequantizes in float16 (``dtype=None`` keeps its f16 scales), so each weight moves by at
  most a few f16 roundings (2^-11 relative each) from jquant's exact float32 decode; measured
  0.6-2.4e-4.
* vs the unquantized model: rel <= the relative RMS weight error of the mix's base codec on
  Gaussian weights (Q4_K 0.07, Q5_K 0.036, Q6_K 0.0175, Q8_0 0.0053; tests/test_kquants.py
  measures these): for random inputs each linear's relative output error is about its weight
  error, and the unquantized/F16 parts and residual paths only dilute it; measured 3-4x lower
  (Q4_K_M 0.021, Q5_K_M 0.010, Q6_K 0.0039, Q8_0 0.0014).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("gguf")

from jquant.codecs import CODECS  # noqa: E402
from jquant.io.gguf import export_gguf, load_gguf  # noqa: E402
from jquant.qarray import QArray  # noqa: E402

MIXES = ("Q4_K_M", "Q5_K_M")  # between them: Q4_K, Q5_K, Q6_K, Q8_0, F16 and F32 tensors
BASE_REL_RMSE = {"Q4_K_M": 0.07, "Q5_K_M": 0.036, "Q6_K": 0.0175, "Q8_0": 0.0053}
F16_DEQUANT_REL = 1e-3
# Contraction sizes are multiples of 256 so the k-quant mixes apply (inner 256, ffn 512).
WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=128,
    in_channels=4,
    out_channels=4,
    text_dim=256,
    freq_dim=256,
    ffn_dim=512,
    num_layers=2,
    cross_attn_norm=True,
)


def _rel(out: Any, ref: Any) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> dict[str, Any]:
    """The float model, its saved folder, one input and the float output."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**WAN).eval()
    with torch.no_grad():  # perturb every param (norms, biases too) so a mis-loaded tensor shows
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model_dir = tmp_path_factory.mktemp("wan_gguf") / "transformer"
    model.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 4, 2, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 7, 256, generator=g))
    with torch.no_grad():
        ref = model(*inputs).sample.numpy()
    return {"model": model, "dir": model_dir, "inputs": inputs, "ref": ref, "files": {}, "decoded": {}}


def _export(wan: dict[str, Any], mix: str) -> Path:
    if mix not in wan["files"]:
        wan["files"][mix] = export_gguf(wan["dir"], wan["dir"].parent / f"wan-{mix}.gguf", mix).path
    return wan["files"][mix]


def _run(model: Any, inputs: tuple) -> np.ndarray:
    with torch.no_grad():
        return model(*inputs).sample.float().numpy()


def _float_model(wan: dict[str, Any], state_dict: dict[str, Any]) -> Any:
    model = diffusers.WanTransformer3DModel.from_config(wan["model"].config).eval()
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model


def _jquant_decoded(wan: dict[str, Any], path: Path) -> np.ndarray:
    """Output of the float model on jquant's float32 decode of every tensor in the file."""
    if path in wan["decoded"]:
        return wan["decoded"][path]
    tensors, _ = load_gguf(path)
    sd = {}
    for name, v in tensors.items():
        if isinstance(v, QArray):
            v = np.asarray(CODECS[v.spec.fmt].decode(v.qvalue)).reshape(v.shape)
        sd[name] = torch.from_numpy(np.array(v, np.float32))
    wan["decoded"][path] = out = _run(_float_model(wan, sd), wan["inputs"])
    return out


def _check(wan: dict[str, Any], mix: str, path: Path, out: np.ndarray) -> None:
    assert np.isfinite(out).all()
    assert _rel(out, _jquant_decoded(wan, path)) <= F16_DEQUANT_REL
    assert _rel(out, wan["ref"]) <= BASE_REL_RMSE[mix]


@pytest.mark.parametrize("mix", MIXES)
def test_from_single_file_with_gguf_quantization_config(wan, mix: str) -> None:
    pytest.importorskip("accelerate", reason="diffusers' GGUF loading requires accelerate")
    from diffusers.quantizers.gguf.utils import GGUFParameter

    path = _export(wan, mix)
    model = diffusers.WanTransformer3DModel.from_single_file(
        str(path),
        config=str(wan["dir"]),
        quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32),
        torch_dtype=torch.float32,
        local_files_only=True,
        low_cpu_mem_usage=True,
    )
    tensors, _ = load_gguf(path)
    params = dict(model.named_parameters())
    quantized = [n for n, v in tensors.items() if isinstance(v, QArray)]
    assert quantized and set(tensors) == set(params)
    for name in quantized:  # stays quantized in diffusers (GGUFLinear), with the file's type
        assert isinstance(params[name], GGUFParameter), name
        assert int(params[name].quant_type) == CODECS[tensors[name].spec.fmt].ggml_type, name
    _check(wan, mix, path, _run(model, wan["inputs"]))


@pytest.mark.parametrize("mix", MIXES)
def test_diffusers_gguf_reader_and_dequantizers(wan, mix: str) -> None:
    from diffusers.models.model_loading_utils import load_gguf_checkpoint
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    path = _export(wan, mix)
    checkpoint = load_gguf_checkpoint(str(path))
    assert set(checkpoint) == set(wan["model"].state_dict())
    model = _float_model(wan, {k: dequantize_gguf_tensor(v) for k, v in checkpoint.items()})
    _check(wan, mix, path, _run(model, wan["inputs"]))
