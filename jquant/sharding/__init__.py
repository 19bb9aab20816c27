"""Sharding quantized DiTs over a device mesh with JAX's own SPMD (docs/sharding.md).

* :mod:`jquant.sharding.axes`: logical axes of every parameter (from its path or layer role),
  mesh rules and their presets (``fsdp``, ``tp``, ``fsdp_tp``), QArrays split along whole
  quantization blocks, per-device byte accounting.
* :mod:`jquant.sharding.attention`: sequence-parallel attention (Ulysses all-to-all, ring) as
  an attention hook that composes with ``jquant.attention.quantized_attention``.
* :mod:`jquant.sharding.linear`: tensor-parallel linears with the quantized GEMM per shard.
* :mod:`jquant.sharding.calib`: statistics and Hessians reduced across mesh axes.
"""

from jquant.sharding.attention import SP_MODES, SequenceParallel, sequence_parallel
from jquant.sharding.axes import (
    MODES,
    LeafPlan,
    device_bytes,
    expected_device_bytes,
    logical_axes,
    make_mesh,
    plan,
    shard_params,
    shardings,
)
from jquant.sharding.linear import TensorParallel, tensor_parallel

__all__ = [
    "MODES",
    "SP_MODES",
    "LeafPlan",
    "SequenceParallel",
    "TensorParallel",
    "device_bytes",
    "expected_device_bytes",
    "logical_axes",
    "make_mesh",
    "plan",
    "sequence_parallel",
    "shard_params",
    "shardings",
    "tensor_parallel",
]
