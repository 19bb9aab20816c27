"""Kernel selection for jquant's dispatch: which Pallas kernel (if any) runs a matmul.

``maybe_run`` returns the kernel's output, or None when no kernel applies (not on a GPU,
formats or shapes the kernels do not cover); the caller then takes the XLA path.
"""

from __future__ import annotations

import jax

from jquant.formats import QSpec
from jquant.qarray import QArray


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def maybe_run(x: jax.Array, w: QArray, *, act: QSpec | None, act_scale, force: bool = False):
    """Run ``x @ w`` with a Pallas kernel if one applies, else return None."""
    if not on_gpu():
        if force:
            raise RuntimeError("JQUANT_BACKEND=pallas but the default JAX backend is not a GPU")
        return None
    return None
