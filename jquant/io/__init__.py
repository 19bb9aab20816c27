"""Checkpoints (orbax), safetensors and GGUF."""

from jquant.io.checkpoint import restore, save
from jquant.io.gguf import GGUFError, export_gguf, load_gguf, load_gguf_params, save_gguf
from jquant.io.safetensors import load_safetensors_tree, read_safetensors

__all__ = ["GGUFError", "export_gguf", "load_gguf", "load_gguf_params", "load_safetensors_tree", "read_safetensors",
           "restore", "save", "save_gguf"]
