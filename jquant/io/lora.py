"""Community LoRA files for the Flax ports: diffusers/PEFT and kohya safetensors layouts.

Layouts read (the key conventions of diffusers' ``loaders/lora_conversion_utils.py`` and
``lora_pipeline.py``):

* **diffusers / PEFT** (``save_lora_weights``): ``transformer.<module>.lora_A.weight``
  ``[r, in]`` and ``.lora_B.weight`` ``[out, r]``, ``<module>`` the diffusers module name
  (``blocks.0.attn1.to_q``); alpha from the file's ``lora_adapter_metadata`` header entry
  (``transformer.lora_alpha`` / ``alpha_pattern``), else ``alpha = r`` (scale 1), as
  diffusers loads it. A ``.alpha`` tensor beside a module overrides both.
* **kohya** (sd-scripts / musubi-tuner): ``lora_unet_<module with '_' for '.'>.lora_down.weight``,
  ``.lora_up.weight`` and a scalar ``.alpha`` (scale ``alpha / r``). The module part is
  either the diffusers name (``lora_unet_blocks_0_attn1_to_q``) or, for Wan, the original
  Wan name (musubi-tuner: ``lora_unet_blocks_0_self_attn_q``, ``cross_attn_*``,
  ``ffn_0``/``ffn_2``).
* **original Wan** (``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` / ``lora_down``,
  with optional ``.alpha``).

Modules are mapped to Flax param paths through the port's own diffusers key map
(:mod:`jquant.models`), so every port with a key map (Wan, Flux, ...) loads the
diffusers/PEFT layout. Keys that match no 2-D linear layer of the model are *not*
dropped silently: :func:`load_lora` returns them in ``unmatched`` and warns
(:class:`UnmatchedLoRAKeysWarning`, naming them), or raises under ``strict=True``.
Kohya's fused BFL Flux names (``double_blocks_*_img_attn_qkv``) need splitting into
q/k/v and are reported as unmatched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jquant.models.loading import port_for_config
from jquant.models.port import DiffusersConfig
from jquant.models.safetensors import read_header, read_safetensors
from jquant.training.lora import Adapter

METADATA_KEY = "lora_adapter_metadata"
_WAN_ORIGINAL = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}


class LoRAFileError(ValueError):
    """A LoRA file that cannot be read as any supported layout (names the file and why)."""


class UnmatchedLoRAKeysWarning(UserWarning):
    """Keys of a LoRA file that match no linear layer of the model (listed in the message)."""


@dataclasses.dataclass(frozen=True)
class LoRAFile:
    """A loaded LoRA: ``adapters`` by Flax module path, the ``layout`` detected, and the file
    keys that matched no layer (``unmatched``)."""

    adapters: dict[str, Adapter]
    layout: str
    unmatched: tuple[str, ...]
    file: str


def module_map(config: DiffusersConfig) -> dict[str, str]:
    """``{diffusers module name: Flax module path}`` of every linear layer of the port."""
    port = port_for_config(config)
    out = {}
    for e in port.key_map(config):
        if e.kind == "linear" and e.torch_key.endswith(".weight") and e.flax_path.endswith("/kernel"):
            out[e.torch_key[: -len(".weight")]] = e.flax_path[: -len("/kernel")]
    return out


def _wan_original(name: str) -> str | None:
    m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
    if m and m.group(2) in _WAN_ORIGINAL:
        return f"blocks.{m.group(1)}.{_WAN_ORIGINAL[m.group(2)]}"
    return None


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``(module, role, layout)`` with role ``down``/``up``/``alpha`` (None: not a LoRA key)."""
    for suffix, role, layout in (
        (".lora_A.weight", "down", "peft"),
        (".lora_B.weight", "up", "peft"),
        (".lora_down.weight", "down", "kohya"),
        (".lora_up.weight", "up", "kohya"),
        (".alpha", "alpha", "any"),
    ):
        if key.endswith(suffix):
            return key[: -len(suffix)], role, layout
    return None


def _resolve(module: str, modules: dict[str, str], kohya: dict[str, str]) -> str | None:
    """The Flax path of a file's module name, whatever prefix/naming it uses."""
    if module.startswith("lora_unet_"):
        return kohya.get(module[len("lora_unet_") :])
    for prefix in ("transformer.", "diffusion_model.", "model.diffusion_model.", ""):
        if prefix and not module.startswith(prefix):
            continue
        name = module[len(prefix) :]
        if name in modules:
            return modules[name]
        orig = _wan_original(name)
        if orig is not None and orig in modules:
            return modules[orig]
    return None


def _kohya_names(modules: dict[str, str]) -> dict[str, str]:
    """kohya's underscore names -> Flax path: diffusers names and (Wan) original names."""
    out = {k.replace(".", "_"): v for k, v in modules.items()}
    for orig, diff in _WAN_ORIGINAL.items():
        for name, path in modules.items():
            m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
            if m and m.group(2) == diff:
                out[f"blocks_{m.group(1)}_{orig.replace('.', '_')}"] = path
    return out


def _metadata_alpha(file: Path) -> tuple[float | None, dict[str, float]]:
    meta = read_header(file).get("__metadata__") or {}
    raw = meta.get(METADATA_KEY)
    if not raw:
        return None, {}
    try:
        md = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoRAFileError(f"{file}: {METADATA_KEY} header entry is not valid JSON ({e})") from None
    alpha = md.get("transformer.lora_alpha", md.get("lora_alpha"))
    pattern = md.get("transformer.alpha_pattern", md.get("alpha_pattern")) or {}
    return (None if alpha is None else float(alpha)), {str(k): float(v) for k, v in pattern.items()}


def load_lora(
    file: str | os.PathLike, config: DiffusersConfig, *, strict: bool = False, dtype: Any = jnp.float32
) -> LoRAFile:
    """Read a LoRA safetensors file for the port of ``config`` (see module docstring).

    Adapters come back in the Flax layout (``a [K, r]``, ``b [r, N]``) with their alpha;
    apply them with :func:`jquant.training.lora.apply_lora` (run time, any strength) or
    :func:`jquant.training.lora.merge_lora`. Unmatched keys warn (or raise with ``strict``).
    """
    file = Path(file)
    tensors = read_safetensors(file)
    modules = module_map(config)
    kohya = _kohya_names(modules)
    meta_alpha, alpha_pattern = _metadata_alpha(file)
    parts: dict[str, dict[str, Any]] = {}
    names: dict[str, str] = {}
    unmatched: list[str] = []
    layouts = set()
    for key, arr in tensors.items():
        sp = _split_key(key)
        path = None if sp is None else _resolve(sp[0], modules, kohya)
        if sp is None or path is None:
            unmatched.append(key)
            continue
        module, role, layout = sp
        if layout != "any":
            layouts.add("kohya" if module.startswith("lora_unet_") or layout == "kohya" else "diffusers/peft")
        parts.setdefault(path, {})[role] = np.asarray(arr, np.float32)
        names[path] = module
    adapters: dict[str, Adapter] = {}
    for path, p in parts.items():
        if "down" not in p or "up" not in p:
            have = sorted(p)
            unmatched.append(f"{names[path]} (only {', '.join(have)}: needs both down/A and up/B)")
            continue
        down, up = p["down"], p["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoRAFileError(f"{file}: {names[path]}: down/A {down.shape} and up/B {up.shape} are not a rank-r pair")
        r = down.shape[0]
        if "alpha" in p:
            alpha = float(np.asarray(p["alpha"]).reshape(()))
        else:
            alpha = next((a for pat, a in alpha_pattern.items() if re.search(pat, names[path])), meta_alpha)
            alpha = float(r) if alpha is None else alpha
        adapters[path] = Adapter(jnp.asarray(down.T, dtype), jnp.asarray(up.T, dtype), alpha)
    if not adapters and tensors:
        raise LoRAFileError(
            f"{file}: no key matches a linear layer of this {type(config).__name__} model "
            f"(first keys: {sorted(tensors)[:4]})"
        )
    if unmatched:
        msg = f"{file}: {len(unmatched)} LoRA key(s) match no linear layer of the model: {sorted(unmatched)}"
        if strict:
            raise LoRAFileError(msg)
        warnings.warn(msg, UnmatchedLoRAKeysWarning, stacklevel=2)
    layout = "+".join(sorted(layouts)) or "unknown"
    return LoRAFile(adapters, layout, tuple(sorted(unmatched)), str(file))
