"""The per-token activation quantizer in the Triton language, called through jax-triton.

jax-triton (the optional ``gpu`` extra: ``pip install jquant[gpu]``) compiles a ``@triton.jit``
kernel with Triton's own compiler and calls it from JAX. This module exists to measure whether
that beats Pallas's Triton lowering on the one Pallas-on-Triton kernel jquant has, the
quantizer (:mod:`pallas_kernels.act_quant`): same arithmetic (``scale = max(absmax / QMAX,
1e-12)``, codes ``clip(x / scale)`` rounded half to even by ``libdevice.rint`` for int8,
converted to e4m3 for fp8), one program per ``rows`` tokens holding its rows in registers.
``scripts/sweep_act_quant.py --jax-triton`` checks it bit for bit against the reference and times both on
the GPU; ``act_quant`` stays the dispatched kernel (see docs/kernels.md for the numbers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _common, _quant

try:  # Only with the ``gpu`` extra on a CUDA machine.
    import jax_triton as jt
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    jt = triton = tl = None


def available() -> bool:
    """True when jax-triton and Triton import (the ``gpu`` extra is installed)."""
    return jt is not None


if triton is not None:  # pragma: no cover - needs Triton

    @triton.jit
    def _quant_kernel(
        x_ptr,
        q_ptr,
        s_ptr,
        M: tl.constexpr,
        K: tl.constexpr,
        BLOCK_K: tl.constexpr,
        ROWS: tl.constexpr,
        FP8: tl.constexpr,
        FLOOR: tl.constexpr,
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        offs = rows[:, None].to(tl.int64) * K + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        qmax: tl.constexpr = 448.0 if FP8 else 127.0
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.maximum(amax / qmax, FLOOR)
        v = x / scale[:, None]
        v = tl.minimum(tl.maximum(v, -qmax), qmax)
        if FP8:
            q = v.to(tl.float8e4nv)
        else:
            q = tl.extra.cuda.libdevice.rint(v).to(tl.int8)
        tl.store(q_ptr + offs, q, mask=mask)
        tl.store(s_ptr + rows, scale, mask=rows < M)


def quantize(x: jax.Array, fmt: str, *, rows: int | None = None, warps: int = 8):
    """``(codes [M, K], scale f32 [M, 1])`` like :func:`act_quant.quantize_int8` / ``_fp8``."""
    if not available():
        raise ImportError(
            "pallas_kernels.triton_quant needs jax-triton and Triton: install the 'gpu' extra "
            "(pip install 'jquant[gpu]') on a CUDA machine"
        )
    _quant.check(x)  # pylint: disable=protected-access
    if fmt not in ("int8", "fp8"):
        raise ValueError(f"quantize: fmt must be 'int8' or 'fp8', got {fmt!r}")
    m, k = x.shape
    width = _quant.padded_width(k)
    if width > _quant.SINGLE_PASS_MAX:
        raise ValueError(f"quantize: K={k} is wider than the single-pass kernel takes ({_quant.SINGLE_PASS_MAX})")
    rows = rows or _quant.pick_config(k).rows
    dtype = jnp.int8 if fmt == "int8" else jnp.float8_e4m3fn
    q, s = jt.triton_call(
        x,
        kernel=_quant_kernel,
        out_shape=[jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((m,), jnp.float32)],
        grid=(_common.cdiv(m, rows),),
        num_warps=warps,
        num_stages=1,
        M=m,
        K=k,
        BLOCK_K=width,
        ROWS=rows,
        FP8=fmt == "fp8",
        FLOOR=_quant.SCALE_FLOOR,
    )
    return q, s.reshape(m, 1)
