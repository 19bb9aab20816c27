"""Sharding quantized DiTs over a device mesh with JAX SPMD (being built: issue 23)."""
