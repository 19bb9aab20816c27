"""Checkpoints (orbax), safetensors and GGUF."""
