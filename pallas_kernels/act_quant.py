"""Per-token activation quantizer: bf16 ``[M, K]`` -> int8 / fp8 e4m3 values + f32 scales.

``scale[m] = max(max_k |x[m, k]| / QMAX, 1e-12)``, ``q = x / scale`` clipped to
``[-QMAX, QMAX]`` and rounded to nearest-even for int8 (QMAX = 127 for int8, 448 for e4m3), so
``q * scale`` approximates ``x``. This is :func:`jquant.quantize`'s per-token rule to the bit
(same scale floor, same division), so :mod:`jquant.dispatch` can hand its activations to this
kernel and get the XLA path's codes. The outputs feed :func:`pallas_kernels.w8a8.int8_matmul` /
``fp8_matmul`` directly (``x_scale`` is ``[M, 1]``).

Two implementations with the same result:

* ``"pallas"``: one Pallas program per ``rows`` tokens (Triton lowering; plain Pallas, so it
  also runs under ``interpret=True`` on the CPU). Where a padded row fits in registers
  (K <= :data:`SINGLE_PASS_MAX`) a program loads its rows once, takes the absmax and writes the
  codes from the same registers; wider rows go in ``CHUNK``-wide pieces twice (absmax, then
  quantize; the second read comes from L2). On the GPU int8 rounds with one ``cvt.rni`` per
  value (inline PTX); the interpreter builds the same round-half-even from ``floor``.
* ``"xla"``: the same arithmetic as jnp ops, fused by XLA.

* ``"triton"``: the same single-pass program in the Triton language
  (:mod:`pallas_kernels.triton_quant`, through jax-triton: the optional ``gpu`` extra).

``method="auto"`` picks, on a GPU where the kernels are verified (:data:`GPU_VERIFIED`; see
docs/kernels.md), the jax-triton version when it is installed (it measured 0-20% faster) and
the Pallas kernel otherwise; XLA off the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant.hadamard import kron_split, online_block
from pallas_kernels import _common, _quant, hadamard_gather, triton_quant
from pallas_kernels._quant import (  # noqa: F401 (part of this module's API)
    CHUNK,
    SCALE_FLOOR,
    SINGLE_PASS_MAX,
    QuantizerConfig,
    padded_width,
    pick_config,
    round_to_bf16,
)
from pallas_kernels.fused_producers import ACTIVATIONS, activation_quantize

#: The Pallas quantizer matched the reference bit for bit on an H200 (codes and
#: scales, 9 shapes incl. ragged; benchmarks/check_kernels-NVIDIA_H200.txt).
GPU_VERIFIED = True
#: The fused Hadamard + quantize path matched the reference on an H200 (int8 and fp8, 11 shapes
#: incl. ragged; at most 1e-6 of codes one step apart from float32 sums in another order;
#: benchmarks/check_kernels-hadamard-w4a16large-NVIDIA_H200.txt). Its first GPU runs failed:
#: a float32 256 x 256 Sylvester operand overflowed shared memory (now bf16, exact for +-1),
#: and the reference itself quantized unrounded rows on the GPU (XLA drops an f32 -> bf16 ->
#: f32 round trip; it now rounds on the bits, :func:`round_to_bf16`).
HADAMARD_GPU_VERIFIED = True
#: The Triton-language version (pallas_kernels/triton_quant.py, through jax-triton) matched the
#: reference bit for bit on an H200 and ran 0-20% faster than this Pallas kernel at the same
#: design (benchmarks/jax_triton_eval-NVIDIA_H200.json), so ``method="auto"`` prefers it where
#: the ``gpu`` extra is installed.
TRITON_GPU_VERIFIED = True


#: The block-diagonal rotation + quantize path (``hadamard=b``, QuaRotConfig.online_block). Its
#: default programs (:func:`block_config`) were chosen from ``scripts/sweep_act_quant.py --block
#: 128`` on an H200 (every program matched the reference bit for bit; cc83f7c) and passed
#: ``scripts/check_kernels_gpu.py --kernels act_quant_block128,_wide,_fp8`` there at 8c835d3 (int8
#: and fp8, every shape 128 divides; ``benchmarks/check_kernels-block_hadamard-NVIDIA_H200.txt``).
#: A W8A8 linear with it: 1271 us at 8960 -> 1536 and 32,760 tokens against 4286 us with the
#: full-width rotation and 1216 us in bf16 (``linear_path-block_hadamard-NVIDIA_H200.json``).
BLOCK_HADAMARD_GPU_VERIFIED = True

#: The bias + activation + quantize path (``quantize_act``: FFN-down's per-token codes straight
#: from the FFN-up GEMM's bf16 output, no GELU pass in between) passed
#: ``scripts/check_kernels_gpu.py --kernels act_quant_gelu_int8,act_quant_gelu_fp8`` on an H200 at
#: 56ca68d with its :func:`act_config` programs (every shape; int8: at most 3.7e-7 of the codes one
#: step apart, fp8 3.9e-4; ``benchmarks/check_kernels-act_gelu-NVIDIA_H200.txt``). At 32,760 x 8960
#: it takes 542.4 us on 4 warps against 699 for the unfused pair (XLA's GELU pass ~430 us in the
#: step's profile + the plain quantizer 257.8 us; ``benchmarks/act_quant_activation-NVIDIA_H200.log``);
#: 568 us a call in the step (``benchmarks/e2e-session22-nvidia-h200.json``).
ACT_GPU_VERIFIED = True
#: The approximate program of that path (``QuantizerConfig.approx``: 1,296 SASS instructions a
#: program against 2,496 at K = 8960, sm_90a, ``scripts/triton_resources.py``), which
#: :func:`act_config` picks once it passes ``check_kernels_gpu.py --kernels
#: act_quant_gelu_int8_approx,act_quant_gelu_fp8_approx``: passed on an H200 at 0a17808 (every
#: shape; int8 at most 3.7e-7 of the codes one step apart, as the exact program; fp8 at most 3.9e-4
#: one e4m3 step apart; scales as the exact program's; ``benchmarks/check_kernels-act_gelu_approx-NVIDIA_H200.txt``).
ACT_APPROX_GPU_VERIFIED = True
#: Whether :func:`act_config` takes the approximate program: not until it is timed (the sweep's
#: ``approx_*`` rows and the step, ``benchmarks/notes.md``); fewer instructions alone did not make
#: the attention prologue faster.
ACT_APPROX_DEFAULT = False
#: The activations the kernel lowers (exact ``gelu`` needs ``erfc``, which Pallas' Triton
#: lowering lacks: it stays on the reference).
KERNEL_ACTIVATIONS = ("gelu_tanh", "silu", "relu")

#: Widest leading-block mix the fused Hadamard takes (a dense [a', a'] product per row).
HADAMARD_OUTER_MAX = 64


@dataclasses.dataclass(frozen=True)
class HadamardLayout:
    """How a program applies jquant's order-K Hadamard to rows in registers.

    The row (zero-padded to ``outer * inner``) is viewed as ``[outer, inner]``; ``H = kron(O, S) /
    sqrt(K)`` with ``S`` the ``inner``-order Sylvester matrix (one ``pl.dot`` on the tensor cores)
    and ``O`` the leading factors, zero-padded to ``outer`` (a second, small ``pl.dot``).
    """

    inner: int
    outer: int
    o: np.ndarray  # [outer, outer] float32, +-1 and zero padding
    s: np.ndarray  # [inner, inner] float32, +-1

    @property
    def width(self) -> int:
        return self.outer * self.inner


@functools.lru_cache(maxsize=64)
def hadamard_layout(k: int) -> HadamardLayout | None:
    """The fused layout for width ``k``, or None where the kernel does not take it (block-diagonal
    fallback plans, an inner Sylvester factor under 16, or more than ``HADAMARD_OUTER_MAX``
    leading blocks: Wan's 8960 and 13824 FFN widths)."""

    best = None
    for inner_max in (16, 32, 64, 128, 256):
        split = kron_split(k, inner_max)
        if split is None:
            return None
        o, s = split
        a, b = o.shape[0], s.shape[0]
        if b < 16:  # tl.dot needs 16 on every side (K=8 stored wrong scales on the GPU)
            continue
        outer = 1 if a == 1 else max(16, padded_width(k) // b)  # tl.dot wants >= 16 on every side
        # Fewest multiply-adds per value (inner + outer, times the zero padding), then the smaller
        # +-1 operands: each program reads them from L2 (a 256 x 256 one made K=3072 run at 5% of
        # the copy bandwidth on an H200).
        cost = ((b + (outer if outer > 1 else 0)) * outer * b / k, b * b + outer * outer)
        if outer <= HADAMARD_OUTER_MAX and (best is None or cost < best[0]):
            best = (cost, o, s, outer)
    if best is None:
        return None
    _, o, s, outer = best
    o_pad = np.zeros((outer, outer), np.float32)
    o_pad[: o.shape[0], : o.shape[0]] = o
    return HadamardLayout(s.shape[0], outer, o_pad, s.astype(np.float32))


def hadamard_config(lay: HadamardLayout) -> QuantizerConfig:
    """The fused Hadamard's program: 8K values on 4 warps (16K: 8 warps); 16 rows where the whole
    row is one Sylvester product (its ``pl.dot`` needs 16 rows)."""
    rows = 16 if lay.outer == 1 else max(1, 8192 // lay.width)
    return QuantizerConfig(rows=rows, warps=4 if lay.width <= 8192 else 8)


def block_config(k: int, block: int) -> QuantizerConfig:
    """The block rotation's default program: one pass over whole rows, 8K values per 4-warp
    program, up to 2048 wide; wider, two chunked passes of 64 rows on 8 warps, 2 stages deep.

    The fastest or within 2% of it at every Wan width in ``scripts/sweep_act_quant.py --block 128``
    on an H200 (int8, 32,760 tokens; ``benchmarks/act_quant_block-NVIDIA_H200.json``): 98.5 us at
    K=1536, 404 at 5120, 698 at 8960 and 1071 at 13824, against 257, 877, 1519 and 2333 us for the
    first program (16 rows, 4 warps, unpipelined)."""
    width = padded_width(k)
    if width <= 2048 and (8192 // width) * width // block >= 16:
        return QuantizerConfig(rows=8192 // width, warps=4, single_pass=True)
    return QuantizerConfig(rows=64, warps=8, single_pass=False, stages=2)


@functools.lru_cache(maxsize=16)
def act_config(k: int) -> QuantizerConfig:
    """The bias + activation path's program: :func:`pick_config`, except rows padded past 8192
    lanes run on 4 warps, not 8 (one row a program either way). Measured on an H200
    (``benchmarks/act_quant_activation-NVIDIA_H200.log``, GELU-tanh with bias, 32,760 tokens):
    542.4 against 606.5 us at 8960 wide, 855.6 against 939.9 us at 13,824. The approximate
    arithmetic (``approx``) once :data:`ACT_APPROX_GPU_VERIFIED` and :data:`ACT_APPROX_DEFAULT`."""
    cfg = pick_config(k)
    if cfg.single_pass and padded_width(k) > 8192:
        cfg = QuantizerConfig(rows=1, warps=4, single_pass=True)
    return dataclasses.replace(cfg, approx=ACT_APPROX_GPU_VERIFIED and ACT_APPROX_DEFAULT)


def block_matrix(k: int, block: int) -> np.ndarray | None:
    """The +-1 order-``block`` matrix of a block-diagonal rotation of width ``k`` (jquant's
    ``hadamard_matrix(block) * sqrt(block)``, one Sylvester product), or None where the kernel
    does not take it: ``block`` not dividing ``k``, not below ``k``, or not one Sylvester factor
    of 16..256 (a ``pl.dot`` operand on every side)."""
    if block >= k or k % block or not 16 <= block <= 256:
        return None
    split = kron_split(block, block)
    if split is None or split[0].shape != (1, 1):
        return None
    o, s = split
    return (float(o[0, 0]) * s).astype(np.float32)


def quantize_int8_reference(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Plain-JAX per-token int8 quantization: ``(int8[M, K], f32[M, 1])``."""
    return _quant.reference(x, "int8")


def quantize_fp8_reference(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Plain-JAX per-token fp8 e4m3 quantization: ``(e4m3[M, K], f32[M, 1])``."""
    return _quant.reference(x, "fp8")


def _rotate(v: jax.Array, h_s, h_o, lay: HadamardLayout, k: int, dtype) -> jax.Array:
    """``v @ H`` for ``[rows, lay.width]`` rows (zeros past ``k``), rounded to ``dtype`` like
    jquant.nn's XLA path: the inner Sylvester product, then the leading-block mix."""
    rows = v.shape[0]
    # bf16 rows are one exact piece; float32 rows take three.
    z = _quant.pm1_dot(v.reshape(rows * lay.outer, lay.inner), h_s[...], 1 if dtype == jnp.bfloat16 else 3)
    if lay.outer > 1:
        z = z.reshape(rows, lay.outer, lay.inner).transpose(0, 2, 1).reshape(rows * lay.inner, lay.outer)
        z = _quant.pm1_dot(z, h_o[...], 3).reshape(rows, lay.inner, lay.outer).transpose(0, 2, 1)
    y = z.reshape(rows, lay.width) * np.float32(1.0 / math.sqrt(k))
    if dtype == jnp.bfloat16:
        return round_to_bf16(y)
    return y.astype(dtype).astype(jnp.float32)


def kernel_activation(name: str, v: jax.Array, interpret: bool = True, approx: bool = False) -> jax.Array:
    """The kernel's formula for ``ACTIVATIONS[name]``: the same function with one base-2
    exponential (``gelu_tanh(v) = v * sigmoid(2 u)`` for ``0.5 v (1 + tanh(u))``; ``silu(v) = v *
    sigmoid(v)``), on the GPU one ``ex2.approx`` (:func:`_quant.exp2`) where Pallas' Triton
    lowering would call libdevice's longer ``tanhf`` / ``expf``. (In the step the formula did not
    set the quantizer's time: 828 / 801 / 808 us with each of the three, until the bias's layout
    was fixed; ``benchmarks/notes.md``, twenty-first session.) Both ends saturate without NaN
    (``v / inf = 0``). ``approx`` (``QuantizerConfig.approx``): the division and the exponential
    in their approximate, subnormal-flushing forms, GELU's cubic in Horner form."""

    def sigmoid_times(v, t):  # v / (1 + 2^t)
        e = _quant.exp2(t, interpret, ftz=approx)
        return _quant.div_approx(v, 1.0 + e, interpret) if approx else v / (1.0 + e)

    if name == "gelu_tanh":
        c = 2.0 * math.sqrt(2.0 / math.pi) / math.log(2.0)
        if approx:  # -u = v (-c - 0.044715 c v^2): a multiply, a multiply-add, a multiply
            return sigmoid_times(v, v * (np.float32(-c) + np.float32(-c * 0.044715) * (v * v)))
        u = np.float32(c) * (v + np.float32(0.044715) * (v * v * v))
        return sigmoid_times(v, -u)
    if name == "silu":
        return sigmoid_times(v, np.float32(-1.0 / math.log(2.0)) * v)
    if name == "relu":
        return jnp.maximum(v, 0.0)
    raise ValueError(f"kernel_activation: {name!r} not in {KERNEL_ACTIVATIONS}")


def _kernel(
    x_ref,
    *refs,
    m: int,
    k: int,
    fmt: str,
    cfg: QuantizerConfig,
    interpret: bool,
    lay: HadamardLayout | None = None,
    block: int = 0,
    activation: str | None = None,
):
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.triton as pltriton  # pylint: disable=g-import-not-at-top

    h_s = h_o = bias_ref = None
    if lay is not None:
        h_s, h_o, q_ref, s_ref = refs
    elif block:
        h_s, q_ref, s_ref = refs
    elif activation is not None and len(refs) == 3:
        bias_ref, q_ref, s_ref = refs
    else:
        q_ref, s_ref = refs
    i = pl.program_id(0)
    rows = cfg.rows
    row_ok = i * rows + jnp.arange(rows) < m
    if lay is not None:
        width = lay.width
    elif block and not cfg.single_pass:  # one order-`block` rotation per chunk: chunks are its blocks
        width = block
    else:
        width = padded_width(k) if cfg.single_pass else CHUNK

    def span(c):
        cols = c * width + jnp.arange(width)
        mask = row_ok[:, None] & (cols < k)[None, :]
        idx = (pl.ds(i * rows, rows), pl.ds(c * width, width))
        return idx, mask

    def load(c):
        idx, mask = span(c)
        v = pltriton.load(x_ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)
        if activation is not None:  # the FFN-up output's bias and activation, in float32
            if bias_ref is not None:
                # A [1, width] block: the layout of x's rows (a 1-D load broadcast to them would
                # be a layout conversion through shared memory in every program).
                cols = (c * width + jnp.arange(width))[None, :]
                v = v + pltriton.load(bias_ref.at[pl.ds(0, 1), pl.ds(c * width, width)], mask=cols < k, other=0.0)
            # Padded columns stay 0 (x and bias load as 0; every activation maps 0 to 0).
            v = kernel_activation(activation, v, interpret, approx=cfg.approx)
        if not block:
            return v
        # Whole rows (single pass) are their width / block chunks stacked: one dot rotates all
        # (the zero padding past K rotates to zeros).
        return _quant.rotate_block(v.reshape(-1, block), h_s, block, x_ref.dtype).reshape(v.shape)

    def store(c, v, scale):
        idx, mask = span(c)
        if cfg.approx:  # one reciprocal a row, a multiply a value
            codes = _quant.to_q_saturating(v * (1.0 / scale)[:, None], fmt, interpret)
        else:
            codes = _quant.to_q(v / scale[:, None], fmt, interpret)
        pltriton.store(q_ref.at[idx], codes, mask=mask)

    if cfg.single_pass:  # the rows stay in registers between the absmax and the codes
        v = load(0)
        if lay is not None:
            v = _rotate(v, h_s, h_o, lay, k, x_ref.dtype)
        scale = _quant.scale_of(jnp.max(jnp.abs(v), axis=1), fmt)
        store(0, v, scale)
    else:
        n_chunks = _common.cdiv(k, width)
        amax = lax.fori_loop(
            0,
            n_chunks,
            lambda c, acc: jnp.maximum(acc, jnp.max(jnp.abs(load(c)), axis=1)),
            jnp.zeros((rows,), jnp.float32),
        )
        scale = _quant.scale_of(amax, fmt)

        def quant_step(c, carry):
            store(c, load(c), scale)
            return carry

        lax.fori_loop(0, n_chunks, quant_step, 0)
    pltriton.store(s_ref.at[pl.ds(i * rows, rows)], scale, mask=row_ok)


def quantize_pallas(
    x: jax.Array,
    fmt: str,
    *,
    interpret: bool = False,
    config: QuantizerConfig | None = None,
    hadamard: bool | int = False,
    bias: jax.Array | None = None,
    activation: str | None = None,
):
    """The Pallas kernel (Triton lowering on GPU, or the interpreter when asked).

    ``hadamard=True`` rotates each row by jquant's order-K Hadamard (QuaRot's online transform,
    ``apply_hadamard``) in registers before quantizing: one pass over ``x`` instead of three or
    more. Widths :func:`hadamard_layout` rejects raise. ``hadamard=b`` (an int) applies the
    block-diagonal rotation of order ``b`` instead (``apply_block_hadamard``): by default two
    chunked passes of ``b``-wide chunks (absmax, then codes; each chunk rotated by one
    ``pl.dot``), so any width ``b`` divides works (:func:`block_matrix` says which); with a
    ``single_pass`` config, whole rows (padded to a power of two) in one pass, their chunks
    stacked under one ``pl.dot`` (at least 16 chunks per program).

    ``activation`` (one of :data:`KERNEL_ACTIVATIONS`) quantizes ``activation(x + bias)`` instead
    (``bias`` ``[K]`` or None), computed in float32 as each piece is loaded: the FFN-up
    output of a per-token W8A8 model goes from its GEMM to FFN-down's codes without a GELU pass
    (:func:`quantize_act`). Not with a rotation.
    """
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.triton as pltriton  # pylint: disable=g-import-not-at-top

    _quant.check(x)
    m, k = x.shape
    lay = None
    extra = ()
    block = 0 if not hadamard else (online_block(hadamard) or 0)
    if block >= k:
        block = 0  # a block as wide as the row is the full-width rotation
    if block:
        mat = block_matrix(k, block)
        if mat is None:
            raise ValueError(f"quantize: no fused block-{block} rotation for K={k} (see act_quant.block_matrix)")
        config = config or block_config(k, block)
        if config.rows * (padded_width(k) if config.single_pass else block) // block < 16:
            raise ValueError(f"quantize: the block rotation's dot needs >= 16 chunks per program, got {config}")
        extra = (jnp.asarray(mat, jnp.bfloat16),)
    elif hadamard:
        lay = hadamard_layout(k)
        if lay is None:
            raise ValueError(f"quantize: no fused Hadamard for K={k} (see act_quant.hadamard_layout)")
        config = config or hadamard_config(lay)
        # The +-1 matrices travel as bf16 (exact): a float32 256 x 256 operand alone would fill
        # the 227 KB of shared memory Triton stages dot operands in.
        extra = (jnp.asarray(lay.s, jnp.bfloat16), jnp.asarray(lay.o, jnp.bfloat16))
    if activation is not None:
        if hadamard or activation not in KERNEL_ACTIVATIONS:
            raise ValueError(
                f"quantize: activation {activation!r} needs one of {KERNEL_ACTIVATIONS} and no rotation "
                f"(hadamard={hadamard!r})"
            )
        if bias is not None:
            b = jnp.asarray(bias, jnp.float32).reshape(1, -1)
            if b.shape != (1, k):
                raise ValueError(f"quantize: bias must have {k} values (one per channel), got shape {jnp.shape(bias)}")
            extra = (b,)
        config = config or act_config(k)
    cfg = config or pick_config(k)
    if cfg.single_pass and padded_width(k) > SINGLE_PASS_MAX:
        raise ValueError(f"quantize: K={k} is too wide for the single-pass kernel (at most {SINGLE_PASS_MAX})")
    if cfg.approx and activation is None:
        raise ValueError(f"quantize: config.approx is for the activation path (activation=...), got {cfg}")
    if lay is not None and (not cfg.single_pass or cfg.rows * lay.outer < 16):
        raise ValueError(f"quantize: the fused Hadamard needs one pass and rows * {lay.outer} >= 16, got {cfg}")
    call = pl.pallas_call(
        functools.partial(
            _kernel, m=m, k=k, fmt=fmt, cfg=cfg, interpret=interpret, lay=lay, block=block, activation=activation
        ),
        out_shape=(jax.ShapeDtypeStruct((m, k), _quant.QDTYPE[fmt]), jax.ShapeDtypeStruct((m,), jnp.float32)),
        grid=(_common.cdiv(m, cfg.rows),),
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=cfg.warps, num_stages=cfg.stages),
    )
    q, s = call(x, *extra)
    return q, s.reshape(m, 1)


def _quantize(x, fmt, method, hadamard: bool | int = False):
    _quant.check(x)
    if method not in ("auto", "pallas", "triton", "xla"):
        raise ValueError(f"quantize: method must be auto/pallas/triton/xla, got {method!r}")
    if method == "pallas":
        interpret = not _common._default_device_is_gpu()  # pylint: disable=protected-access
        if hadamard:
            return _fused_hadamard(x, fmt, interpret, hadamard)
        return quantize_pallas(x, fmt, interpret=interpret)
    if method == "triton":
        if hadamard:
            raise ValueError("quantize: the jax-triton quantizer has no fused Hadamard; use method='pallas'")

        return triton_quant.quantize(x, fmt)
    if method == "auto" and supports(x, hadamard):
        if hadamard:
            return _fused_hadamard(x, fmt, hadamard=hadamard)
        if _triton_usable(x):
            return triton_quant.quantize(x, fmt)
        return quantize_pallas(x, fmt)
    return _quant.reference(x, fmt, hadamard)


def _block(hadamard: bool | int, k: int) -> int | None:
    """The block order of a rotation flag for width ``k`` (None: full width)."""
    b = online_block(hadamard)
    return None if b is None or b >= k else b


def _fused_hadamard(x: jax.Array, fmt: str, interpret: bool = False, hadamard: bool | int = True):
    """The fused rotation + quantizer: the block-diagonal chunks for ``hadamard=b``; for the
    full width the ``[outer, inner]`` view where K has one, else the gathered multi-axis view
    (:mod:`pallas_kernels.hadamard_gather`, e.g. Wan's 8960)."""
    if _block(hadamard, x.shape[1]) is not None:
        return quantize_pallas(x, fmt, interpret=interpret, hadamard=hadamard)
    if hadamard_layout(x.shape[1]) is not None:
        return quantize_pallas(x, fmt, interpret=interpret, hadamard=True)

    return hadamard_gather.quantize_hadamard_gather(x, fmt, interpret=interpret)


def _fused_hadamard_takes(k: int, hadamard: bool | int = True) -> bool:
    """Whether a fused rotation exists for width ``k`` and is verified (or forced) on the GPU."""
    b = _block(hadamard, k)
    if b is not None:
        return block_matrix(k, b) is not None and _common.kernel_enabled(BLOCK_HADAMARD_GPU_VERIFIED)
    if hadamard_layout(k) is not None:
        return _common.kernel_enabled(HADAMARD_GPU_VERIFIED)
    return hadamard_gather.gather_layout(k) is not None and _common.kernel_enabled(hadamard_gather.GPU_VERIFIED)


def _triton_usable(x: jax.Array) -> bool:
    """The jax-triton quantizer (``gpu`` extra) where it is installed, verified and takes K."""

    return TRITON_GPU_VERIFIED and triton_quant.available() and padded_width(x.shape[1]) <= SINGLE_PASS_MAX


def quantize_int8(x: jax.Array, method: str = "auto", *, hadamard: bool | int = False) -> tuple[jax.Array, jax.Array]:
    """Per-token int8 quantization ``(int8[M, K], f32[M, 1])`` in one pass over ``x``
    (``method``: auto / pallas / triton / xla). ``hadamard=True`` quantizes ``apply_hadamard(x)``
    (QuaRot's online rotation), fused into the same pass where :func:`hadamard_layout` takes K;
    ``hadamard=b`` the block-diagonal rotation of order ``b`` (:func:`block_matrix`)."""
    return _quantize(x, "int8", method, hadamard)


def quantize_fp8(x: jax.Array, method: str = "auto", *, hadamard: bool | int = False) -> tuple[jax.Array, jax.Array]:
    """Per-token fp8 e4m3 quantization ``(e4m3[M, K], f32[M, 1])`` in one pass over ``x``."""
    return _quantize(x, "fp8", method, hadamard)


def supports(x: jax.Array, hadamard: bool | int = False) -> bool:
    """True where ``method="auto"`` runs a compiled quantizer kernel: a GPU, a 2-D float input,
    the kernel verified there (or ``JQUANT_BACKEND=pallas``); with ``hadamard``, also a width
    :func:`hadamard_layout` (or ``hadamard_gather.gather_layout``) takes and that fused kernel
    verified (:data:`HADAMARD_GPU_VERIFIED`, ``hadamard_gather.GPU_VERIFIED``)."""
    ok = (
        _common.on_gpu()
        and _common.kernel_enabled(GPU_VERIFIED)
        and x.ndim == 2
        and x.size > 0
        and jnp.issubdtype(x.dtype, jnp.floating)
    )
    if hadamard:
        ok = ok and _fused_hadamard_takes(x.shape[1], hadamard)
    return ok


def act_reference(y: jax.Array, bias: jax.Array | None, activation: str, fmt: str) -> tuple[jax.Array, jax.Array]:
    """Plain-JAX :func:`quantize_act`: ``activation(y + bias)`` in float32, quantized per token
    (``fused_producers.activation_quantize`` with one block per row): ``(codes [M, K], f32 [M, 1])``."""
    _quant.check(y)
    v = y.astype(jnp.float32)
    if bias is not None:
        v = v + jnp.asarray(bias, jnp.float32).reshape(-1)
    codes, scales = activation_quantize(v, activation, fmt, block=y.shape[-1])
    return codes, scales.reshape(-1, 1)


def supports_act(y: jax.Array, activation: str) -> bool:
    """True where :func:`quantize_act` runs the kernel: :func:`supports` (a GPU, a 2-D float
    input) with :data:`ACT_GPU_VERIFIED` (or ``JQUANT_BACKEND=pallas``) and an activation in
    :data:`KERNEL_ACTIVATIONS`."""
    return supports(y) and activation in KERNEL_ACTIVATIONS and _common.kernel_enabled(ACT_GPU_VERIFIED)


def quantize_act(
    y: jax.Array,
    bias: jax.Array | None,
    activation: str,
    fmt: str,
    method: str = "auto",
    config: QuantizerConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-token codes of ``activation(y + bias)`` (``fmt`` "int8" / "fp8"), the activation applied
    as the quantizer loads ``y``: an FFN-up GEMM's bf16 output ``y [M, F]`` and its bias ``[F]``
    become FFN-down's per-token codes in one pass, without XLA's GELU pass (which reads and writes
    the widest activation of a block once more). ``method``: "auto" (the kernel where
    :func:`supports_act`, else the reference), "pallas" (the kernel; the interpreter off the GPU)
    or "xla" (:func:`act_reference`). Everything is float32 here, where the unfused path rounds
    ``y + bias`` and the activation to bf16: codes match it within one rounding step. ``config``:
    the kernel's program (None: :func:`act_config`)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"quantize_act: activation {activation!r} not in {sorted(ACTIVATIONS)}")
    if method not in ("auto", "pallas", "xla"):
        raise ValueError(f"quantize_act: method must be auto/pallas/xla, got {method!r}")
    if method == "pallas" or (method == "auto" and supports_act(y, activation)):
        interpret = not _common._default_device_is_gpu()  # pylint: disable=protected-access
        return quantize_pallas(y, fmt, interpret=interpret, config=config, bias=bias, activation=activation)
    return act_reference(y, bias, activation, fmt)
