"""Community LoRA files: a PEFT LoRA attached with diffusers' API and saved with
``save_lora_weights`` (diffusers/PEFT layout), and the same weights in the kohya layouts,
load onto the Flax ports and reproduce diffusers' output with the LoRA applied (fp32)."""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from test_models_parity import CASES, rel_err, run_both

from jquant import models
from jquant.io import lora as lio
from jquant.training import lora as tl

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = 1e-4
WAN = next(c for c in CASES if c.name == "wan_t2v")
FLUX = next(c for c in CASES if c.cls_name == "FluxTransformer2DModel")
WAN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"]


def _with_lora(case, tmp_path: Path, targets: list[str], rank: int = 4, alpha: float = 8.0):
    """(diffusers model with a random PEFT LoRA, Flax port + base params, LoRA state dict)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch_model = case.build()
    torch_model.save_pretrained(tmp_path / "base")
    model, params = models.load_pretrained(tmp_path / "base")
    torch.manual_seed(3)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    torch_model.add_adapter(cfg)
    with torch.no_grad():
        for n, p in torch_model.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn_like(p))
    state = get_peft_model_state_dict(torch_model)
    return torch_model, model, params, state, cfg


def _save_peft(pipeline_cls, state, cfg, path: Path) -> Path:
    from peft import get_peft_model_state_dict  # noqa: F401 (peft present)

    meta = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules)}
    pipeline_cls.save_lora_weights(path, transformer_lora_layers=state, transformer_lora_adapter_metadata=meta)
    return path / "pytorch_lora_weights.safetensors"


def _kohya(state: dict, alpha: float, rename) -> dict:
    """PEFT state -> kohya keys ``lora_unet_<name>.lora_down/lora_up.weight`` + ``.alpha``."""
    out = {}
    for k, v in state.items():
        mod, _, kind = k.rpartition(".lora_")
        name = "lora_unet_" + rename(mod.removeprefix("transformer.")).replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = v.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def _musubi_name(mod: str) -> str:
    inv = {v: k for k, v in lio._WAN_ORIGINAL.items()}
    head, rest = mod.split(".", 2)[:2], mod.split(".", 2)[2]
    return ".".join(head) + "." + inv[rest]


def _apply(model, params, lf: lio.LoRAFile, case, torch_model):
    v = tl.apply_lora({"params": params}, lf.adapters)
    from jquant import nn as jnn

    args, kwargs = case.make_inputs(torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch_model(*args, **kwargs).sample.numpy()
    to_jax = lambda t: jax.numpy.asarray(t.numpy())  # noqa: E731
    with jnn.quantized(None):
        out = model.apply(v, *map(to_jax, args), **{k: to_jax(x) for k, x in kwargs.items()})
    return np.asarray(out), ref


def test_wan_peft_and_kohya_layouts_match_diffusers(tmp_path: Path) -> None:
    torch_model, model, params, state, cfg = _with_lora(WAN, tmp_path, WAN_TARGETS)
    f_peft = _save_peft(diffusers.WanPipeline, state, cfg, tmp_path / "peft")
    keys = safetensors_torch.load_file(f_peft)
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    out_base, ref_lora = run_both(WAN, torch_model, model, params)
    assert rel_err(out_base, ref_lora) > 1e-2  # the LoRA changes the output: the test can fail
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unmatched
        lf = lio.load_lora(f_peft, model.config)
    assert lf.layout == "diffusers/peft" and not lf.unmatched
    assert len(lf.adapters) == len(state) // 2
    assert all(a.alpha == 8.0 and a.rank == 4 for a in lf.adapters.values())
    out, ref = _apply(model, params, lf, WAN, torch_model)
    assert rel_err(out, ref) <= TOL

    for layout, rename in (("diffusers names", lambda m: m), ("musubi (original Wan names)", _musubi_name)):
        f = tmp_path / f"kohya_{len(layout)}.safetensors"
        safetensors_torch.save_file(_kohya(state, cfg.lora_alpha, rename), str(f))
        lk = lio.load_lora(f, model.config, strict=True)
        assert lk.layout == "kohya", layout
        out_k, _ = _apply(model, params, lk, WAN, torch_model)
        assert rel_err(out_k, ref) <= TOL, layout


def test_flux_peft_layout_matches_diffusers(tmp_path: Path) -> None:
    targets = ["to_q", "to_k", "to_v", "add_q_proj", "to_out.0", "proj_mlp", "proj_out"]
    torch_model, model, params, state, cfg = _with_lora(FLUX, tmp_path, targets, rank=2, alpha=2.0)
    f = _save_peft(diffusers.FluxPipeline, state, cfg, tmp_path / "peft")
    lf = lio.load_lora(f, model.config, strict=True)
    assert lf.adapters and not lf.unmatched
    out, ref = _apply(model, params, lf, FLUX, torch_model)
    assert rel_err(out, ref) <= TOL


def test_unmatched_keys_are_named(tmp_path: Path) -> None:
    torch_model, model, params, state, cfg = _with_lora(WAN, tmp_path, ["to_q"])
    state, n = dict(state), len(state) // 2
    state["transformer.blocks.0.attn1.nonexistent.lora_A.weight"] = torch.zeros(4, 8)
    state["transformer.blocks.0.attn1.nonexistent.lora_B.weight"] = torch.zeros(8, 4)
    f = tmp_path / "bad.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(f))
    with pytest.warns(lio.UnmatchedLoRAKeysWarning, match="attn1.nonexistent.lora_A"):
        lf = lio.load_lora(f, model.config)
    assert len(lf.unmatched) == 2 and len(lf.adapters) == n
    assert all(a.alpha == a.rank for a in lf.adapters.values())  # no metadata, no .alpha: scale 1
    with pytest.raises(lio.LoRAFileError, match="nonexistent"):
        lio.load_lora(f, model.config, strict=True)
    g = tmp_path / "none.safetensors"
    safetensors_torch.save_file({"foo.lora_A.weight": torch.zeros(2, 2)}, str(g))
    with pytest.raises(lio.LoRAFileError, match="no key matches"):
        lio.load_lora(g, model.config)
