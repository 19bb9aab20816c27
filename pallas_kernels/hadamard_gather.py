"""The fused Hadamard quantizer for widths with no power-of-two row view (Wan's 8960 FFN width).

:func:`pallas_kernels.act_quant.hadamard_layout` views a row as ``[outer, inner]`` with only the
leading axis padded, which needs the order-K matrix to be ``kron(O, S)`` with ``O`` of padded
order <= 64 and ``S`` a Sylvester matrix. K = 8960 = 20 x 28 x 16 (two Paley factors) has no
such view: the padded leading block would be 560 -> 1024 wide. Here the row is instead gathered
into ``[p_1, ..., p_n]`` with every axis padded to a power of two (8960 -> 32 x 32 x 16 = 16384
lanes, the padding interior), each Kronecker group is applied along its axis as one small
``pl.dot`` (axes cycled with transposes), and the codes are scattered back to the row's columns.
Same rule and rounding as :mod:`pallas_kernels.act_quant` (the rows rounded to x's dtype after
the rotation, then jquant's per-token quantizer).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jquant.hadamard import kron_factors
from pallas_kernels import _common, _quant

#: Passed scripts/check_kernels_gpu.py's ``act_quant_hadamard_wide`` case on an H200 at K=8960
#: (M=300 and 2051; benchmarks/check_kernels-hadamard_wide-NVIDIA_H200.txt). That run's one
#: failure (K=8: scales wrong) was act_quant's [outer, inner] kernel with an inner factor under
#: 16 (since refused there); widths under :data:`MIN_K` rotate in XLA. 1.7x faster than XLA's rotation
#: + quantize (4096 x 8960: 477 vs 808 us; 32760 x 8960: 3724 vs 6232), so on by default, but
#: at 7% of the copy bandwidth: ~380 tensor-core multiply-adds per value (three exact bf16
#: pieces per float32 stage, 1.83x padding, K=16/32 dots).
GPU_VERIFIED = True
#: Narrowest row the gathered layout takes (activations are wider; tiny rows rotate in XLA).
MIN_K = 256
#: The largest padded order of one Kronecker group (a bf16 ``[p, p]`` operand per program).
GROUP_MAX = 128


@dataclasses.dataclass(frozen=True)
class GatherLayout:
    """``dims`` the real orders of the Kronecker groups, ``pads`` their padded orders (powers of two,
    >= 16), ``mats`` their +-1 matrices zero-padded to ``[p, p]``."""

    dims: tuple[int, ...]
    pads: tuple[int, ...]
    mats: tuple[np.ndarray, ...]

    @property
    def width(self) -> int:
        return math.prod(self.pads)


def _pad(order: int) -> int:
    return max(16, _quant.padded_width(order))


@functools.lru_cache(maxsize=64)
def gather_layout(k: int) -> GatherLayout | None:
    """The grouping of jquant's order-``k`` Kronecker factors into two or more groups with the
    fewest multiply-adds per value (padding counted), every group padded to at most
    :data:`GROUP_MAX` and the padded row at most ``_quant.SINGLE_PASS_MAX`` lanes; None where
    there is none (or an exact plan is missing)."""

    if k < MIN_K:
        return None
    factors = kron_factors(k)
    if not factors:
        return None
    best = None
    for cuts in itertools.product((False, True), repeat=len(factors) - 1):
        groups, cur = [], [factors[0]]
        for f, cut in zip(factors[1:], cuts):
            if cut:
                groups.append(cur)
                cur = [f]
            else:
                cur.append(f)
        groups.append(cur)
        if len(groups) < 2:  # one dense group: act_quant's [outer, inner] view, or XLA
            continue
        dims = tuple(math.prod(f.shape[0] for f in g) for g in groups)
        pads = tuple(_pad(d) for d in dims)
        if max(pads) > GROUP_MAX or math.prod(pads) > _quant.SINGLE_PASS_MAX:
            continue
        cost = (sum(pads) * math.prod(pads) / k, sum(p * p for p in pads))
        if best is None or cost < best[0]:
            best = (cost, groups, dims, pads)
    if best is None:
        return None
    _, groups, dims, pads = best
    mats = []
    for g, d, p in zip(groups, dims, pads):
        m = np.zeros((p, p), np.float32)
        m[:d, :d] = functools.reduce(np.kron, g, np.ones((1, 1), np.int8))
        mats.append(m)
    return GatherLayout(dims, pads, tuple(mats))


def columns(lay: GatherLayout, xp=np):
    """For each of the ``width`` padded lanes (row-major over ``pads``): its column in the row and
    whether it is a real one. ``xp=jnp`` builds them from an iota inside the kernel (Triton takes
    no constant arrays)."""
    lane = xp.arange(lay.width, dtype=xp.int32)
    col = xp.zeros((lay.width,), xp.int32)
    valid = xp.ones((lay.width,), bool)
    inner_p, inner_d = 1, 1
    for d, p in zip(reversed(lay.dims), reversed(lay.pads)):
        idx = (lane // inner_p) % p
        col = col + idx * inner_d
        valid = valid & (idx < d)
        inner_p, inner_d = inner_p * p, inner_d * d
    return col, valid


def _rotate(v, mats, lay: GatherLayout, k: int, dtype):
    """``v @ H`` for gathered rows ``[rows, width]``: each group's product along its axis, the
    axes cycled so the one to multiply is always last; rounded to ``dtype`` as jquant.nn does."""
    rows, n = v.shape[0], len(lay.pads)
    z = v.reshape(rows, *lay.pads)
    perm = (0, n) + tuple(range(1, n))  # the last axis moves to the front of the row axes
    for step in range(n):
        axis = n - 1 - step
        p = lay.pads[axis]
        pieces = 1 if (step == 0 and dtype == jnp.bfloat16) else 3
        shape = z.shape
        z = _quant.pm1_dot(z.reshape(-1, p), mats[axis][...], pieces).reshape(shape)  # pylint: disable=protected-access
        z = z.transpose(perm)
    y = z.reshape(rows, lay.width) * np.float32(1.0 / math.sqrt(k))
    if dtype == jnp.bfloat16:
        return _quant.round_to_bf16(y)
    return y.astype(dtype).astype(jnp.float32)


def _kernel(x_ref, *refs, m: int, k: int, fmt: str, lay: GatherLayout, rows: int, interpret: bool):
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.triton as pltriton  # pylint: disable=g-import-not-at-top

    n = len(lay.pads)
    mats, (q_ref, s_ref) = refs[:n], refs[n:]
    i = pl.program_id(0)
    row = i * rows + jnp.arange(rows, dtype=jnp.int32)
    row_ok = row < m
    col, valid = columns(lay, jnp)
    mask = row_ok[:, None] & valid[None, :]
    # Masked lanes point past the array: never touched on the GPU, dropped by the interpreter.
    rr = jnp.broadcast_to(jnp.where(row_ok, row, m)[:, None], mask.shape)
    cc = jnp.broadcast_to(jnp.where(valid, col, k)[None, :], mask.shape)
    v = pltriton.load(x_ref.at[rr, cc], mask=mask, other=0.0).astype(jnp.float32)
    v = _rotate(v, mats, lay, k, x_ref.dtype)
    scale = _quant.scale_of(jnp.max(jnp.abs(v), axis=1), fmt)  # pylint: disable=protected-access
    codes = _quant.to_q(v / scale[:, None], fmt, interpret)  # pylint: disable=protected-access
    pltriton.store(q_ref.at[rr, cc], codes, mask=mask)
    pltriton.store(s_ref.at[pl.ds(i * rows, rows)], scale, mask=row_ok)


def quantize_hadamard_gather(
    x: jax.Array, fmt: str, *, interpret: bool = False, rows: int | None = None, warps: int | None = None
):
    """``quantize(apply_hadamard(x))`` for widths :func:`gather_layout` takes: ``(codes [M, K],
    scale f32 [M, 1])``."""
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.triton as pltriton  # pylint: disable=g-import-not-at-top

    _quant.check(x)  # pylint: disable=protected-access
    m, k = x.shape
    lay = gather_layout(k)
    if lay is None:
        raise ValueError(f"quantize: no fused Hadamard for K={k} (see hadamard_gather.gather_layout)")
    rows = rows or max(1, 8192 // lay.width)
    warps = warps or (4 if lay.width <= 8192 else 8)
    call = pl.pallas_call(
        functools.partial(_kernel, m=m, k=k, fmt=fmt, lay=lay, rows=rows, interpret=interpret),
        out_shape=(
            jax.ShapeDtypeStruct((m, k), _quant.QDTYPE[fmt]),  # pylint: disable=protected-access
            jax.ShapeDtypeStruct((m,), jnp.float32),
        ),
        grid=(_common.cdiv(m, rows),),
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=warps, num_stages=1),
    )
    q, s = call(x, *(jnp.asarray(mat, jnp.bfloat16) for mat in lay.mats))
    return q, s.reshape(m, 1)
