"""A community-layout GGUF from ``export_gguf(layout="comfy")`` loads in diffusers unchanged.

diffusers reads ComfyUI-GGUF files of the original checkpoints (its ``from_single_file`` runs
``convert_wan_transformer_to_diffusers`` on the GGUF tensors, keeping them quantized). A tiny
random ``WanTransformer3DModel`` (torch, float32) is saved, exported by jquant as Q4_K_M in the
community layout, and loaded offline by diffusers 0.42 with ``GGUFQuantizationConfig``; the
output is compared with the float model run on jquant's own decode of the same file (through
jquant's original->diffusers map). Bound: rel <= 1e-3, as in tests/test_gguf_diffusers.py
(diffusers dequantizes in float16).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jquant.codecs import CODECS  # noqa: E402
from jquant.io.gguf import export_gguf, from_community, load_gguf  # noqa: E402
from jquant.models import WanConfig  # noqa: E402
from jquant.qarray import QArray  # noqa: E402

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


def _rel(out: np.ndarray, ref: np.ndarray) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def test_comfy_export_loads_in_diffusers(tmp_path) -> None:
    pytest.importorskip("accelerate", reason="diffusers' GGUF loading requires accelerate")
    from diffusers.quantizers.gguf.utils import GGUFParameter

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**WAN).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model_dir = tmp_path / "transformer"
    model.save_pretrained(model_dir)
    report = export_gguf(model_dir, tmp_path / "wan-Q4_K_M.gguf", "Q4_K_M", layout="comfy")
    assert report.types["blocks.0.self_attn.v.weight"] == "Q6_K" and report.types["blocks.0.ffn.2.weight"] == "Q6_K"
    assert report.types["blocks.0.self_attn.q.weight"] == "Q4_K"

    loaded = diffusers.WanTransformer3DModel.from_single_file(
        str(report.path),
        config=str(model_dir),
        quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32),
        torch_dtype=torch.float32,
        local_files_only=True,
        low_cpu_mem_usage=True,
    )
    params = dict(loaded.named_parameters())
    assert isinstance(params["blocks.0.attn1.to_v.weight"], GGUFParameter)
    assert int(params["blocks.0.attn1.to_v.weight"].quant_type) == CODECS["q6_k"].ggml_type
    assert isinstance(params["blocks.1.ffn.net.0.proj.weight"], GGUFParameter)

    # jquant's reading of the same file: original names -> diffusers names, exact float32 decode.
    tensors, _ = load_gguf(report.path)
    named, _, missing, problems = from_community(tensors, WanConfig(**WAN))
    assert not missing and not problems
    sd = {}
    for name, v in named.items():
        if isinstance(v, QArray):
            v = np.asarray(CODECS[v.spec.fmt].decode(v.qvalue)).reshape(v.shape)
        sd[name] = torch.from_numpy(np.array(v, np.float32))
    ref_model = diffusers.WanTransformer3DModel.from_config(model.config).eval()
    ref_model.load_state_dict(sd, strict=True)

    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 4, 2, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 7, 256, generator=g))
    with torch.no_grad():
        out = loaded(*inputs).sample.float().numpy()
        ref = ref_model(*inputs).sample.float().numpy()
        float_out = model(*inputs).sample.float().numpy()
    assert np.isfinite(out).all()
    assert _rel(out, ref) <= 1e-3
    assert _rel(out, float_out) <= 0.07  # Q4_K's relative weight error on Gaussian weights
