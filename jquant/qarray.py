"""QArray: the one quantized array type, and quantize / dequantize / fake_quant.

A QArray is a registered pytree. Its children are arrays (codes, scales, optional zero
points, an optional second-level tensor scale); its static metadata is the QSpec, the
logical dtype and the packing padding. The logical shape is *derived* from the children
(the block shape is ``logical_shape // scale.shape``), so a QArray stacked along new
leading axes (vmap, scan over layers) stays valid with no metadata change.

Layouts:
  * int/uint codes are int8/uint8; fp8 codes are float8 arrays.
  * 4-bit codes (int4, uint4, int3, nf4, fp4) are packed two per byte, and 2-bit codes
    four per byte, along the contraction axis: element ``2j`` in the low nibble of byte
    ``j``, element ``2j+1`` in the high nibble (nibbles hold the two's-complement code).
  * GGUF codec formats store raw ggml blocks, contraction axis moved last:
    ``uint8[..., n_blocks, block_bytes]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jquant.codecs import CODECS
from jquant.coded import CodedArray
from jquant.formats import FORMATS, SCALE_DTYPES, QSpec, np_dtype, parse_spec

Array = jax.Array


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class QArray:
    """Packed values + scales (+ zero points) + static metadata."""

    qvalue: Array
    scale: Array | None
    zero_point: Array | None = None
    scale2: Array | None = None  # NVFP4 per-tensor fp32 scale
    spec: QSpec = dataclasses.field(default=None)  # static
    dtype: Any = jnp.float32  # static: logical dtype
    pad: int = 0  # static: padding added along the packed axis
    axis: int = -2  # static: contraction axis counted from the end (stable under stacking)

    def tree_flatten(self):
        aux = (self.spec, jnp.dtype(self.dtype).name, self.pad, self.axis)
        return (self.qvalue, self.scale, self.zero_point, self.scale2), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        spec, dtype, pad, axis = aux
        return cls(*children, spec=spec, dtype=jnp.dtype(dtype), pad=pad, axis=axis)

    # --- shape ---------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical (unquantized) shape."""
        s = list(self.qvalue.shape)
        if self.spec.fmt not in FORMATS:  # codec blocks: [..., nb, bytes] with axis moved last
            codec = CODECS[self.spec.fmt]
            s = s[:-2] + [s[-2] * codec.block_elems]
            last = s.pop(-1)
            s.insert(len(s) + 1 + self.axis, last)
            return tuple(s)
        if self.spec.packed:
            s[self.axis] = s[self.axis] * (8 // self.spec.format.bits) - self.pad
        return tuple(s)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Real storage footprint in bytes: codes plus scales, zero points and tensor scale."""
        return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in self.tree_flatten()[0] if x is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(self.size, 1)

    def dequantize(self, dtype=None) -> Array:
        return dequantize(self, dtype)

    # --- array views (exact: codes, scales and zero points move together, nothing decodes) ---------
    @property
    def T(self) -> "QArray":
        return self.transpose()

    def transpose(self, axes: tuple[int, ...] | None = None) -> "QArray":
        """The same quantized tensor with its axes permuted (reversed by default); the
        contraction axis follows. GGUF block codes keep ggml's row layout: for them (2-D only)
        the transpose relabels which logical axis the blocks run along."""
        n = self.ndim
        axes = tuple(reversed(range(n))) if axes is None else tuple(int(a) % n for a in axes)
        if sorted(axes) != list(range(n)):
            raise ValueError(f"transpose: axes {axes} are not a permutation of {n} axes")
        new_axis = axes.index(self.axis % n)
        spec = dataclasses.replace(self.spec, axis=new_axis)
        if self.spec.fmt not in FORMATS:
            if n != 2:
                raise ValueError(f"transpose: {self.spec} block codes transpose only as 2-D arrays, got rank {n}")
            return dataclasses.replace(self, spec=spec, axis=new_axis - n)
        perm = lambda a: None if a is None else jnp.transpose(a, axes)  # noqa: E731
        return dataclasses.replace(
            self,
            qvalue=perm(self.qvalue),
            scale=perm(self.scale),
            zero_point=perm(self.zero_point),
            spec=spec,
            axis=new_axis - n,
        )

    def reshape(self, *shape: int) -> "QArray":
        """Split or merge the axes other than the contraction axis, which must stay first (or
        last) with its size; scales must be per element or shared along those axes (per
        channel, per group, per tensor), so no block is cut."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
        old, n = self.shape, self.ndim
        if shape.count(-1) == 1:
            known = math.prod(d for d in shape if d != -1)
            shape = tuple(self.size // max(known, 1) if d == -1 else d for d in shape)
        a = self.axis % n
        if self.spec.fmt not in FORMATS or math.prod(shape) != self.size or a not in (0, n - 1) or not shape:
            raise ValueError(
                f"reshape: cannot view {self.spec} {old} as {shape}: the size must match and the "
                "contraction axis must be first or last (GGUF block codes: dequantize first)"
            )
        new_a = 0 if a == 0 else len(shape) - 1
        if shape[new_a] != old[a]:
            raise ValueError(
                f"reshape: the contraction axis (size {old[a]}) must stay at the "
                f"{'front' if a == 0 else 'end'} of {shape}"
            )
        rest_old = [d for i, d in enumerate(old) if i != a]
        rest_new = [d for i, d in enumerate(shape) if i != new_a]

        def view(x: Array | None, along: int) -> Array | None:
            if x is None or x.ndim == 0:
                return x
            x_rest = [d for i, d in enumerate(x.shape) if i != a]
            if all(d == 1 for d in x_rest):
                rest = [1] * len(rest_new)
            elif x_rest == rest_old:
                rest = rest_new
            else:
                raise ValueError(f"reshape: {self.spec}'s blocks span axes {tuple(x.shape)} of {old}; dequantize first")
            return x.reshape(([along] + rest) if new_a == 0 else (rest + [along]))

        return dataclasses.replace(
            self,
            qvalue=view(self.qvalue, self.qvalue.shape[a]),
            scale=view(self.scale, self.scale.shape[a]),
            zero_point=None if self.zero_point is None else view(self.zero_point, self.zero_point.shape[a]),
            spec=dataclasses.replace(self.spec, axis=new_a),
            axis=new_a - len(shape),
        )

    def __repr__(self) -> str:
        return f"QArray({self.spec}, shape={self.shape}, dtype={jnp.dtype(self.dtype).name}, nbytes={self.nbytes})"


# An nnx.Module attribute holding a QArray is data (a pytree leaf group), like an array.
nnx.register_data_type(QArray)


# --- packing --------------------------------------------------------------------------
def pack(codes: Array, bits: int, axis: int) -> tuple[Array, int]:
    """Pack 4- or 2-bit codes (int8/uint8, two's complement) into uint8 along ``axis``."""
    per = 8 // bits
    codes = jnp.moveaxis(codes, axis, -1)
    n = codes.shape[-1]
    pad = (-n) % per
    if pad:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    u = codes.astype(jnp.uint8) & jnp.uint8(2**bits - 1)
    u = u.reshape(*u.shape[:-1], (n + pad) // per, per)  # explicit sizes: -1 is ambiguous when empty
    out = u[..., 0]
    for i in range(1, per):
        out = out | (u[..., i] << jnp.uint8(bits * i))
    return jnp.moveaxis(out, -1, axis), pad


def unpack(packed: Array, bits: int, axis: int, pad: int, signed: bool) -> Array:
    """Inverse of :func:`pack`: int8 codes (sign-extended when ``signed``) or uint8."""
    per = 8 // bits
    p = jnp.moveaxis(packed, axis, -1)
    mask = jnp.uint8(2**bits - 1)
    parts = [(p >> jnp.uint8(bits * i)) & mask for i in range(per)]
    u = jnp.stack(parts, axis=-1).reshape(*p.shape[:-1], p.shape[-1] * per)
    if pad:
        u = u[..., : u.shape[-1] - pad]
    if signed:  # sign-extend from `bits`
        shift = 8 - bits
        u = (u.astype(jnp.int8) << shift) >> shift
    return jnp.moveaxis(u, -1, axis)


# --- block helpers ----------------------------------------------------------------------
def _blocked(x: Array, block: tuple[int, ...]) -> Array:
    """Reshape [s0, s1, ...] -> [s0/b0, b0, s1/b1, b1, ...]."""
    new = []
    for s, b in zip(x.shape, block):
        new += [s // b, b]
    return x.reshape(new)


def _block_reduce(x: Array, block: tuple[int, ...], fn) -> Array:
    xb = _blocked(x, block)
    return fn(xb, axis=tuple(range(1, xb.ndim, 2)))


def _broadcast_blocks(s: Array, shape: tuple[int, ...]) -> Array:
    """Expand a per-block array [n0, n1, ...] to [n0, b0, n1, b1, ...] for broadcasting."""
    new = []
    for n in s.shape:
        new += [n, 1]
    del shape
    return s.reshape(new)


def _apply_blocks(x: Array, s: Array, op) -> Array:
    """op(x, scale-broadcast-to-x) for per-block scales, returning x's shape."""
    block = tuple(a // b for a, b in zip(x.shape, s.shape))
    out = op(_blocked(x, block), _broadcast_blocks(s, x.shape))
    return out.reshape(x.shape)


def _nearest_code(y: Array, table: tuple[float, ...]) -> Array:
    """Index of the nearest table value (ties to the lower value), as uint8."""
    order = np.argsort(table, kind="stable")
    vals = np.asarray(table, np.float32)[order]
    mids = jnp.asarray((vals[1:] + vals[:-1]) / 2)
    idx = jnp.searchsorted(mids, y, side="left")
    return jnp.asarray(order.astype(np.uint8))[idx]


def _check_finite(x: Array, path: str) -> None:
    if isinstance(x, jax.core.Tracer):
        return
    finite = np.isfinite(np.asarray(x, np.float32))
    if not finite.all():
        n = int((~finite).sum())
        raise ValueError(f"{path or 'array'}: {n} NaN/Inf value(s); refusing to quantize")


# --- scale ranges ------------------------------------------------------------------------
#: Smallest scale jquant stores (also the activation kernels' floor, pallas_kernels.act_quant):
#: blocks with max |x| below ``qmax * SCALE_FLOOR`` are numerically zero and quantize against it
#: (absolute error at most ``SCALE_FLOOR / 2`` per step of the format).
SCALE_FLOOR = 1e-12
#: Largest |x| quantize accepts: beyond it a scale's reciprocal (XLA divides by multiplying)
#: leaves float32's normal range, or a decoded value rounds past float32's max.
MAX_MAGNITUDE = 2.0**124
_SCALE_CEIL = 2.0**125


def scale_range(scale_dtype: str) -> tuple[float, float]:
    """(smallest, largest) scale stored in ``scale_dtype``: normal, finite, reciprocal normal."""
    fi = jnp.finfo(SCALE_DTYPES[scale_dtype])
    return max(SCALE_FLOOR, float(fi.tiny)), min(float(fi.max), _SCALE_CEIL)


def _round_up_to(s: Array, dtype) -> Array:
    """Positive finite f32 ``s`` cast to ``dtype``, rounded up (never below ``s``), so codes
    computed against the stored scale stay within the format's range."""
    out = s.astype(dtype)
    if jnp.dtype(dtype).itemsize == 4:
        return out
    uint = {1: jnp.uint8, 2: jnp.uint16}[jnp.dtype(dtype).itemsize]
    up = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(out, uint) + uint(1), dtype)
    return jnp.where(out.astype(jnp.float32) < s, up, out)


def _store_scale(s: Array, scale_dtype: str) -> Array:
    """Clamp ideal f32 scales into the stored range of ``scale_dtype`` and round them up into it."""
    lo, hi = scale_range(scale_dtype)
    return _round_up_to(jnp.clip(s, lo, hi), SCALE_DTYPES[scale_dtype])


def _ideal_scales(xf: Array, spec: QSpec, block: tuple[int, ...]) -> tuple[Array, Array | None]:
    """Unclamped f32 per-block scale (and the asymmetric block minimum) of an int/float/table spec."""
    f = spec.format
    if f.kind == "int" and not spec.symmetric:
        lo = jnp.minimum(_block_reduce(xf, block, jnp.min), 0.0)
        hi = jnp.maximum(_block_reduce(xf, block, jnp.max), 0.0)
        return (hi - lo) / f.qmax, lo  # inf past 3.4e38: clipped to the largest scale, or refused
    return _block_reduce(jnp.abs(xf), block, jnp.max) / f.qmax, None


# --- quantize / dequantize ---------------------------------------------------------------
def compute_scales(x: Array, spec: QSpec, block: tuple[int, ...]) -> tuple[Array, Array | None, Array | None]:
    """(scale, zero_point, scale2) for ``x`` under ``spec`` with the resolved block shape.

    Scales are clamped into :func:`scale_range` of the scale dtype and rounded up into it, so
    an all-zero block gets the floor scale and codes 0 (decodes to exact zeros), and the codes
    of every block stay within the format's range. Out-of-range inputs saturate here (traced
    activations); :func:`quantize` refuses them for concrete weights.
    """
    f = spec.format
    xf = x.astype(jnp.float32)
    if spec.scaling == "mx":  # e8m0: 2^(floor(log2 amax) - emax(e2m1)=2), stored as biased exponent
        amax = _block_reduce(jnp.abs(xf), block, jnp.max)
        e = jnp.floor(jnp.log2(jnp.maximum(amax, 2.0**-126))) - 2
        return jnp.clip(e + 127, 1, 254).astype(jnp.uint8), None, None  # 2^-126..2^127: normal f32
    if spec.scaling == "nv":  # e4m3 block scale relative to an fp32 tensor scale
        amax = _block_reduce(jnp.abs(xf), block, jnp.max)
        s2 = jnp.clip(jnp.max(amax) / (6.0 * 448.0), SCALE_FLOOR, _SCALE_CEIL)
        ratio = jnp.clip(amax / 6.0 / s2, 2.0**-9, 448.0)  # zero blocks: the smallest e4m3 step
        return _round_up_to(ratio, jnp.float8_e4m3fn), None, s2.astype(jnp.float32)
    ideal, lo = _ideal_scales(xf, spec, block)
    scale = _store_scale(ideal, spec.scale_dtype)
    if lo is None:
        return scale, None, None
    zero = jnp.clip(jnp.round(-lo / scale.astype(jnp.float32)), 0, f.qmax).astype(jnp.uint8)
    return scale, zero, None


def _range_error(x: Array, spec: QSpec, block: tuple[int, ...]) -> str | None:
    """Why concrete ``x`` cannot be quantized under ``spec`` without overflow or silent loss, or None.

    Refused: magnitudes above :data:`MAX_MAGNITUDE`; scales above the scale dtype's range
    (float16: 65504); and a tensor whose largest block needs a scale below the float16 floor
    (6.1e-5) so far that it keeps under half its levels (under fp8's normal range for the float
    formats). Blocks below :data:`SCALE_FLOOR` are numerically zero and always accepted.
    """
    xf = np.abs(np.asarray(x, np.float32))
    amax = float(xf.max())
    if amax > MAX_MAGNITUDE:
        return (
            f"values up to {amax:.3g} exceed the largest magnitude jquant quantizes ({MAX_MAGNITUDE:.3g}: "
            "larger scales overflow float32 on decode); rescale the tensor"
        )
    if spec.scaling or spec.scale_dtype == "float32" or amax == 0.0:
        return None
    lo, hi = scale_range(spec.scale_dtype)
    smax = float(jnp.max(_ideal_scales(jnp.asarray(x, jnp.float32), spec, block)[0]))
    sdt = spec.scale_dtype
    if smax > hi:
        return (
            f"values up to {amax:.3g} overflow the {sdt} scale range of {spec} (largest scale {hi:.3g}, "
            f"this tensor needs {smax:.3g}); use s=float32"
        )
    if smax < lo and smax >= SCALE_FLOOR:
        f = spec.format
        top = f.qmax * smax / lo  # the largest code magnitude this tensor reaches at the floor scale
        small = top < float(ml_dtypes.finfo(np_dtype(f.storage)).tiny) if f.kind == "float" else top < f.qmax / 2
        if small:
            return (
                f"values up to {amax:.3g} underflow the {sdt} scale range of {spec} (smallest normal scale "
                f"{lo:.3g}; codes would reach only {top:.3g} of {f.qmax:g}); use s=float32 or s=bfloat16"
            )
    return None


def decode_scale(q: QArray) -> Array:
    """Per-block multiplicative scale in fp32 (decodes e8m0 / e4m3 block scales)."""
    if q.spec.scaling == "mx":  # 2^(e - 127) built from its bits: exact, where exp2 may flush 2^-126
        return jax.lax.bitcast_convert_type(q.scale.astype(jnp.uint32) << 23, jnp.float32)
    s = q.scale.astype(jnp.float32)
    if q.scale2 is not None:
        s = s * q.scale2
    return s


def encode(x: Array, scale: Array, zero: Array | None, spec: QSpec) -> Array:
    """Unpacked codes of ``x`` given per-block fp32 ``scale`` (and ``zero``)."""
    f = spec.format
    y = _apply_blocks(x.astype(jnp.float32), scale, lambda a, s: a / s)
    if f.kind == "int":
        if zero is not None:
            y = _apply_blocks(y, zero.astype(jnp.float32), lambda a, z: a + z)
        return jnp.clip(jnp.round(y), f.qmin, f.qmax).astype(f.storage)
    if f.kind == "float":
        return jnp.clip(y, -f.qmax, f.qmax).astype(f.storage)
    return _nearest_code(jnp.clip(y, -f.qmax, f.qmax), f.table)


def decode(codes: Array, scale: Array, zero: Array | None, spec: QSpec, dtype=jnp.float32) -> Array:
    """Inverse of :func:`encode` (codes unpacked, ``scale`` decoded to fp32)."""
    f = spec.format
    if f.kind == "table":
        y = jnp.asarray(np.asarray(f.table, np.float32))[codes.astype(jnp.int32)]
    else:
        y = codes.astype(jnp.float32)
    if zero is not None:
        y = _apply_blocks(y, zero.astype(jnp.float32), lambda a, z: a - z)
    return _apply_blocks(y, scale, lambda a, s: a * s).astype(dtype)


def quantize(
    x: Array, spec: QSpec | str, *, path: str = "", scale: Array | None = None, check_finite: bool = True
) -> QArray:
    """Quantize ``x`` to a QArray.

    An all-zero block decodes to exact zeros; an empty ``x`` gives an empty QArray that
    dequantizes to an empty array. Errors are ValueErrors that start with ``path``.

    Args:
      x: floating array (the dtype is kept as the QArray's logical dtype).
      spec: a QSpec or spec string.
      path: param path, used in error messages.
      scale: optional precomputed per-block scale (static activation scales, clipping
        searches); for asymmetric specs a zero point is still derived from the data.
      check_finite: for concrete (non-traced) inputs, reject NaN/Inf and values whose scales
        would overflow or underflow the scale dtype (:func:`_range_error`); off for
        activations, which saturate into the scale range instead.
    """
    spec = parse_spec(spec)
    x = jnp.asarray(x)
    where = f"{path}: " if path else ""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{where}can only quantize floating arrays, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{where}cannot quantize a scalar")
    axis = spec.contraction_axis(x.ndim, path) - x.ndim
    concrete = check_finite and not isinstance(x, jax.core.Tracer)
    if concrete:
        _check_finite(x, path)
    if spec.fmt not in FORMATS:
        return _quantize_codec(x, spec, path, concrete)
    block = spec.block_shape(x.shape, path)
    if x.size == 0:
        return _quantize_empty(x, spec, block)
    if concrete and scale is None and (why := _range_error(x, spec, block)):
        raise ValueError(where + why)
    s, z, s2 = compute_scales(x, spec, block)
    if scale is not None:
        given = jnp.asarray(scale, jnp.float32)
        if not isinstance(given, jax.core.Tracer):
            g = np.asarray(given)
            if not (np.isfinite(g).all() and (g > 0).all()):
                raise ValueError(
                    f"{where}a given scale must be positive and finite, got values in [{g.min():g}, {g.max():g}]"
                )
            if spec.scaling == "" and g.max() > scale_range(spec.scale_dtype)[1]:
                raise ValueError(
                    f"{where}a given scale of {g.max():.3g} overflows the {spec.scale_dtype} scale range of {spec}"
                )
        given = jnp.broadcast_to(given, s.shape)
        s = _store_scale(given, spec.scale_dtype) if spec.scaling == "" else given.astype(s.dtype)
    q = QArray(None, s, z, s2, spec=spec, dtype=x.dtype, axis=axis)
    return from_codes(encode(x, decode_scale(q), z, spec), s, z, s2, spec, x.dtype)


def _quantize_empty(x: Array, spec: QSpec, block: tuple[int, ...]) -> QArray:
    """The QArray of a zero-size ``x``: empty codes, and scales with zero blocks along the empty axes."""
    nblocks = tuple(n // b if n else 0 for n, b in zip(x.shape, block))
    s = jnp.ones(nblocks, jnp.float32)
    z = s2 = None
    if spec.scaling == "mx":
        s = jnp.full(nblocks, 127, jnp.uint8)
    elif spec.scaling == "nv":
        s, s2 = s.astype(jnp.float8_e4m3fn), jnp.float32(1.0)
    else:
        s = s.astype(SCALE_DTYPES[spec.scale_dtype])
        if not spec.symmetric:
            z = jnp.zeros(nblocks, jnp.uint8)
    f = spec.format
    codes_ = jnp.zeros(x.shape, np_dtype(f.storage) if f.kind != "table" else jnp.uint8)
    return from_codes(codes_, s, z, s2, spec, x.dtype)


def from_codes(codes: Array, scale: Array, zero: Array | None, scale2: Array | None, spec: QSpec, dtype) -> QArray:
    """Build a QArray from unpacked codes (packs 4/2-bit codes along the contraction axis)."""
    axis = spec.contraction_axis(codes.ndim) - codes.ndim
    pad = 0
    if spec.packed:
        codes, pad = pack(codes, spec.format.bits, axis)
    return QArray(codes, scale, zero, scale2, spec=spec, dtype=dtype, pad=pad, axis=axis)


def codes(q: QArray) -> Array:
    """Unpacked codes of a QArray (int8/uint8/float8), logical shape."""
    if not q.spec.packed:
        return q.qvalue
    f = q.spec.format
    signed = f.kind == "int" and f.signed
    return unpack(q.qvalue, f.bits, q.axis, q.pad, signed)


def dequantize(q: QArray | Array, dtype=None) -> Array:
    """Float array of a QArray's logical shape.

    Other weight leaves that decode themselves (``CodedArray``: codebooks, low-rank,
    SpQR) are decoded by their own ``dequantize``; plain arrays pass through.
    """
    if not isinstance(q, QArray):
        if is_coded(q):
            return q.dequantize(q.dtype if dtype is None else dtype)
        return q if dtype is None else jnp.asarray(q).astype(dtype)
    dtype = q.dtype if dtype is None else dtype
    if q.size == 0:  # no blocks to decode (block sizes are undefined along empty axes)
        return jnp.zeros(q.shape, dtype)
    if q.spec.fmt not in FORMATS:
        return _dequantize_codec(q, dtype)
    return decode(codes(q), decode_scale(q), q.zero_point, q.spec, dtype)


@jax.custom_vjp
def _ste(x: Array, xq: Array) -> Array:
    return xq


def _ste_fwd(x, xq):
    return xq, None


def _ste_bwd(_, g):
    return g, None


_ste.defvjp(_ste_fwd, _ste_bwd)


def fake_quant(x: Array, spec: QSpec | str, *, path: str = "") -> Array:
    """Quantize-dequantize ``x`` with a straight-through (identity) gradient, for QAT.

    ``path`` names ``x`` in errors (concrete inputs are checked as :func:`quantize` does).
    """
    spec = parse_spec(spec)
    xq = jax.lax.stop_gradient(dequantize(quantize(x, spec, path=path), x.dtype))
    return _ste(x, xq)


# --- GGUF block codecs -------------------------------------------------------------------
def _quantize_codec(x: Array, spec: QSpec, path: str, check: bool = True) -> QArray:
    """GGUF blocks of ``x``; with ``check``, refuse a tensor the codec cannot represent.

    The codecs keep float16 block scales: a tensor whose values underflow them decodes to
    (near) zeros, so the decode is checked against the codec's tensor-wide bound (a full step
    of a ``bits``-bit grid over max |x|) and a miss is refused with the reason.
    """
    codec = CODECS[spec.fmt]
    where = f"{path}: " if path else ""
    a = spec.contraction_axis(x.ndim, path)
    xm = np.moveaxis(np.asarray(x, np.float32), a, -1)
    n = codec.block_elems
    if xm.shape[-1] % n:
        raise ValueError(f"{where}{spec.fmt} needs the contraction axis (size {xm.shape[-1]}) to be a multiple of {n}")
    if xm.size == 0:
        blocks = np.zeros(xm.shape[:-1] + (xm.shape[-1] // n, codec.block_bytes), np.uint8)
        return QArray(jnp.asarray(blocks), None, spec=spec, dtype=x.dtype, axis=a - x.ndim)
    amax = float(np.abs(xm).max())
    if check and amax > MAX_MAGNITUDE:
        raise ValueError(
            f"{where}values up to {amax:.3g} exceed the largest magnitude jquant quantizes ({MAX_MAGNITUDE:.3g})"
        )
    try:
        blocks = codec.encode(xm)
    except ValueError as e:
        raise ValueError(f"{where}{spec.fmt}: {e}") from e
    q = QArray(jnp.asarray(blocks), None, spec=spec, dtype=x.dtype, axis=a - x.ndim)
    if check and amax > 0:
        bits = int(spec.fmt[1])  # q8_0, q4_k, q5_k, q6_k: the name carries the code width
        err = float(np.max(np.abs(np.asarray(codec.decode(q.qvalue), np.float32) - xm)))
        if not err <= max(2 * amax / (2**bits - 1), SCALE_FLOOR):  # below the floor: numerically zero
            raise ValueError(
                f"{where}{spec.fmt} cannot represent this tensor: values up to {amax:.3g} decode with error "
                f"{err:.3g} (its float16 block scales underflow or overflow); keep it in float or use int8"
            )
    return q


def _dequantize_codec(q: QArray, dtype) -> Array:
    codec = CODECS[q.spec.fmt]
    y = codec.decode(q.qvalue)
    return jnp.moveaxis(y, -1, q.axis).astype(dtype)


def is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


def is_coded(x: Any) -> bool:
    """A non-QArray weight leaf that decodes itself (see jquant.coded)."""
    return isinstance(x, CodedArray)


def is_quantized_leaf(x: Any) -> bool:
    """QArray or CodedArray: a leaf that reports, checkpoints and dispatch treat as one weight."""
    return isinstance(x, QArray) or is_coded(x)


def dequantize_any(w: Any, dtype=jnp.float32) -> Array:
    """Dense float kernel of a QArray, a CodedArray or a plain array."""
    if isinstance(w, CodedArray):
        return w.dequantize(dtype)
    return jnp.asarray(dequantize(w, dtype), dtype)
