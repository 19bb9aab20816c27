"""Checkpoints (orbax), safetensors and GGUF."""

from jquant.io.checkpoint import CheckpointError, CheckpointTargetError, restore, save
from jquant.io.gguf import (
    GGUFError,
    export_gguf,
    load_gguf,
    load_gguf_params,
    params_to_tensors,
    save_gguf,
    save_gguf_params,
)
from jquant.models.safetensors import (
    SafetensorsError,
    load_safetensors_tree,
    read_safetensors,
)

__all__ = [
    "CheckpointError",
    "CheckpointTargetError",
    "GGUFError",
    "SafetensorsError",
    "export_gguf",
    "load_gguf",
    "load_gguf_params",
    "load_safetensors_tree",
    "read_safetensors",
    "restore",
    "save",
    "params_to_tensors",
    "save_gguf",
    "save_gguf_params",
]
