"""jquant: quantization for diffusion transformers in JAX/Flax."""
