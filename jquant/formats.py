"""Number formats, granularities and the spec grammar.

A :class:`QSpec` says *what* a tensor is quantized to (the format) and *how the scales
are shared* (the granularity). Every granularity is resolved to a block shape: each
axis of the tensor is cut into blocks and one scale (and zero point) is kept per block.
That single representation covers per-tensor, per-channel, per-group, per-token and 2-D
block scaling, and survives vmap/scan stacking, because the block shape of a stored
QArray is recovered as ``value.shape // scale.shape``.

Spec strings (used by the CLI, recipes and rules)::

    SPEC   := FORMAT ( "/" OPTION )*
    FORMAT := int8 | int4 | int3 | int2 | uint8 | uint4 | uint3 | uint2
            | fp8_e4m3 | fp8_e5m2 | nf4 | fp4 | mxfp4 | nvfp4
            | q8_0 | q4_k | q5_k | q6_k | q4_0 | q4_1       (GGUF block codecs)
            | q5_0 | q5_1 | q2_k | q3_k
    OPTION := t | tensor          per-tensor scale
            | c | channel         per output channel (reduce over the contraction axis)
            | gN                  groups of N along the contraction axis (e.g. g128)
            | token             dynamic per-token (activations: reduce over the last axis)
            | tokenN            dynamic, one scale per token per N channels of the last axis
                                (e.g. token128, DeepGEMM's fine-grained activation scales)
            | bRxC              2-D blocks of R x C over the last two axes (e.g. b128x128, b1x128)
            | sym | asym        symmetric, or asymmetric with a zero point
            | s=DTYPE           scale dtype: float32 | bfloat16 | float16
            | axis=N            contraction axis (default 0: Flax kernels are (in, out))

GGUF codecs fix their blocks and (float16) scales, and mxfp4/nvfp4 their scale encodings:
options that would be ignored there (a granularity for a codec, ``s=`` for either) are errors.

Examples: ``"int8"`` (per channel), ``"int4/g128"``, ``"uint4/g128"`` (zero points),
``"fp8_e4m3"``, ``"nf4/g64"``, ``"mxfp4"`` (32-element blocks, e8m0 scales), ``"nvfp4"``
(16-element blocks, e4m3 scales and an fp32 tensor scale), ``"int8/token"``,
``"fp8_e4m3/token128"`` (a block-scaled GEMM's activations: one scale per token per 128 channels).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

import jax.numpy as jnp
import ml_dtypes
import numpy as np

Granularity = Literal["tensor", "channel", "group", "token", "block"]


@dataclasses.dataclass(frozen=True)
class Format:
    """Static facts about one number format."""

    name: str
    kind: Literal["int", "float", "table", "codec"]
    bits: int  # bits per stored element (container bits for int3: 4)
    signed: bool = True
    qmax: float = 0.0  # largest representable magnitude (int: largest code)
    qmin: float = 0.0  # smallest code (int formats only)
    storage: str = "int8"  # dtype of the unpacked codes
    table: tuple[float, ...] = ()  # codebook values for table formats, index = code


# QLoRA's NormalFloat-4 table (Dettmers et al. 2023), index = 4-bit code.
NF4_TABLE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# OCP FP4 E2M1: code = sign << 3 | magnitude code; magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6.
_E2M1_MAG = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_TABLE = _E2M1_MAG + tuple(-v for v in _E2M1_MAG)


def _int_format(bits: int, signed: bool) -> Format:
    name = ("int" if signed else "uint") + str(bits)
    container = 8 if bits == 8 else (4 if bits >= 3 else 2)
    if signed:  # symmetric range, so that -q and q are both codes
        return Format(name, "int", container, True, 2 ** (bits - 1) - 1, -(2 ** (bits - 1) - 1))
    return Format(name, "int", container, False, 2**bits - 1, 0, "uint8")


FORMATS: dict[str, Format] = {
    **{f"int{b}": _int_format(b, True) for b in (8, 4, 3, 2)},
    **{f"uint{b}": _int_format(b, False) for b in (8, 4, 3, 2)},
    "fp8_e4m3": Format(
        "fp8_e4m3", "float", 8, True, float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max), storage="float8_e4m3fn"
    ),
    "fp8_e5m2": Format(
        "fp8_e5m2", "float", 8, True, float(ml_dtypes.finfo(ml_dtypes.float8_e5m2).max), storage="float8_e5m2"
    ),
    "nf4": Format("nf4", "table", 4, True, 1.0, storage="uint8", table=NF4_TABLE),
    "fp4": Format("fp4", "table", 4, True, 6.0, storage="uint8", table=FP4_TABLE),
}
# Block-scaled fp4 variants are fp4 with fixed grouping and scale encodings.
FP4_SCALINGS = {"mxfp4": ("mx", 32), "nvfp4": ("nv", 16)}
CODEC_FORMATS = ("q8_0", "q4_k", "q5_k", "q6_k", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k")
# Values per GGUF block along the contraction axis: fixed by the codec, so a codec spec's only
# granularity is groups of this size.
CODEC_BLOCK = {
    "q8_0": 32,
    "q4_k": 256,
    "q5_k": 256,
    "q6_k": 256,
    "q4_0": 32,
    "q4_1": 32,
    "q5_0": 32,
    "q5_1": 32,
    "q2_k": 256,
    "q3_k": 256,
}
SCALE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class QSpec:
    """How to quantize one tensor. Hashable and static under jit.

    Attributes:
      fmt: a key of :data:`FORMATS`, or a GGUF codec name.
      granularity: how scales are shared (see module docstring).
      group_size: elements per group along the contraction axis ("group"); for "token", the
        channels of the last axis that share one scale (None: the whole row).
      block: 2-D block shape over the last two axes ("block").
      axis: contraction axis of a weight (0 for Flax (in, out) kernels).
      symmetric: False keeps a zero point per block (unsigned codes).
      scale_dtype: dtype the scales are stored in.
      scaling: "mx" (e8m0 power-of-two scales) or "nv" (e4m3 scales with an fp32
        tensor scale) for fp4; "" otherwise.
    """

    fmt: str
    granularity: Granularity = "channel"
    group_size: int | None = None
    block: tuple[int, int] | None = None
    axis: int = 0
    symmetric: bool = True
    scale_dtype: str = "float32"
    scaling: str = ""

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS and self.fmt not in CODEC_FORMATS:
            raise ValueError(
                f"unknown format {self.fmt!r}; known: {sorted(FORMATS) + list(FP4_SCALINGS) + list(CODEC_FORMATS)}"
            )
        if self.granularity not in ("tensor", "channel", "group", "token", "block"):
            raise ValueError(f"unknown granularity {self.granularity!r}")
        if self.granularity == "group" and not (self.group_size and self.group_size > 0):
            raise ValueError("granularity 'group' needs a positive group_size")
        if self.granularity == "token" and self.group_size is not None and self.group_size < 1:
            raise ValueError(f"granularity 'token' with channel blocks needs a positive size, got {self.group_size}")
        if self.granularity == "block" and (self.block is None or len(self.block) != 2 or min(self.block) < 1):
            raise ValueError("granularity 'block' needs block=(rows, cols) with positive sizes")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale dtype {self.scale_dtype!r} not in {sorted(SCALE_DTYPES)}")
        if not self.symmetric and self.format.kind != "int":
            raise ValueError(f"format {self.fmt} has no asymmetric variant")
        if self.symmetric and self.fmt.startswith("uint"):
            raise ValueError(
                f"{self.fmt} is asymmetric by definition (zero points); use int{self.fmt[4:]} for symmetric"
            )
        if self.scaling and self.fmt != "fp4":
            raise ValueError("scaling 'mx'/'nv' applies only to fp4")
        if self.scaling and self.scale_dtype != "float32":
            raise ValueError(f"{spec_to_string(self)}: the block scales are e8m0/e4m3 by definition; s= does not apply")
        if self.fmt in CODEC_FORMATS:  # ggml blocks fix their grouping and their (float16) scales
            n = CODEC_BLOCK[self.fmt]
            if self.granularity != "group" or self.group_size != n or self.scale_dtype != "float32":
                raise ValueError(
                    f"{self.fmt} has fixed {n}-value blocks with float16 scales; options t/c/gN/token/bRxC/s= do not "
                    f"apply (only axis=N), got {self.granularity}"
                    + (f" {self.group_size}" if self.granularity == "group" else "")
                    + (f" s={self.scale_dtype}" if self.scale_dtype != "float32" else "")
                )

    @property
    def format(self) -> Format:
        if self.fmt in CODEC_FORMATS:
            return Format(self.fmt, "codec", 8, storage="uint8")
        return FORMATS[self.fmt]

    @property
    def dynamic(self) -> bool:
        """Per-token specs (one scale per token, or per token per N channels) are computed at run
        time from the activation itself."""
        return self.granularity == "token"

    @property
    def packed(self) -> bool:
        """4-bit (and 2-bit) codes are packed into bytes along the contraction axis."""
        return self.format.kind in ("int", "table") and self.format.bits < 8

    def block_shape(self, shape: tuple[int, ...], path: str = "") -> tuple[int, ...]:
        """Resolve the granularity to one block size per axis of ``shape``.

        A zero-length axis gets block size 0 along it (no blocks); every other axis must be
        divided evenly by its block size.
        """
        where = f"{path}: " if path else ""
        nd = len(shape)
        if nd == 0:
            return ()
        if self.granularity == "tensor":
            return tuple(shape)
        if self.granularity == "token":
            g = self.group_size
            if g is None:
                return (1,) * (nd - 1) + (shape[-1],)
            if shape[-1] % g:
                raise ValueError(
                    f"{where}{spec_to_string(self)} keeps one scale per {g} channels, but the last axis of shape "
                    f"{shape} has {shape[-1]} (not a multiple of {g}); use per-token scales ('{self.fmt}/token') "
                    "or keep this layer in float"
                )
            return (1,) * (nd - 1) + (g,)
        if self.granularity == "block":
            if nd < 2:
                raise ValueError(f"{where}2-D block scales need a tensor of rank >= 2, got shape {shape}")
            r, c = self.block
            if shape[-2] % r or shape[-1] % c:
                raise ValueError(f"{where}block {r}x{c} does not divide the last two axes of shape {shape}")
            return (1,) * (nd - 2) + (r, c)
        a = self.contraction_axis(nd, path)
        if self.granularity == "channel":
            return tuple(shape[i] if i == a else 1 for i in range(nd))
        g = self.group_size
        if shape[a] % g:
            raise ValueError(f"{where}group size {g} does not divide axis {a} (size {shape[a]}) of shape {shape}")
        return tuple(g if i == a else 1 for i in range(nd))

    def contraction_axis(self, ndim: int, path: str = "") -> int:
        a = self.axis + ndim if self.axis < 0 else self.axis
        if not 0 <= a < ndim:
            raise ValueError((f"{path}: " if path else "") + f"axis {self.axis} out of range for rank {ndim}")
        return a

    def __str__(self) -> str:
        return spec_to_string(self)


def parse_spec(spec: str | QSpec) -> QSpec:
    """Parse a spec string (see module docstring); a QSpec passes through."""
    if isinstance(spec, QSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a spec must be a non-empty string or QSpec, got {spec!r}")
    fmt, *opts = spec.strip().lower().split("/")
    kw: dict = {}
    if fmt in FP4_SCALINGS:
        scaling, g = FP4_SCALINGS[fmt]
        kw.update(scaling=scaling, granularity="group", group_size=g)
        kw["scale_dtype"] = "float32"
        fmt = "fp4"
    elif fmt == "nf4":
        kw.update(granularity="group", group_size=64)
    elif fmt.startswith("uint"):
        kw["symmetric"] = False
    elif fmt in CODEC_FORMATS:
        kw.update(granularity="group", group_size=CODEC_BLOCK[fmt])
    if fmt not in FORMATS and fmt not in CODEC_FORMATS:
        raise ValueError(
            f"unknown format {fmt!r} in spec {spec!r}; known: {sorted(FORMATS) + list(FP4_SCALINGS) + list(CODEC_FORMATS)}"
        )
    for opt in opts:
        if opt in ("t", "tensor"):
            kw.update(granularity="tensor", group_size=None)
        elif opt in ("c", "channel"):
            kw.update(granularity="channel", group_size=None)
        elif opt in ("token", "tok"):
            kw.update(granularity="token", group_size=None, axis=-1)
        elif m := re.fullmatch(r"tok(?:en)?(\d+)", opt):
            kw.update(granularity="token", group_size=int(m.group(1)), axis=-1)
        elif m := re.fullmatch(r"g(\d+)", opt):
            kw.update(granularity="group", group_size=int(m.group(1)))
        elif m := re.fullmatch(r"b(\d+)x(\d+)", opt):
            kw.update(granularity="block", block=(int(m.group(1)), int(m.group(2))), group_size=None)
        elif opt in ("sym", "asym"):
            kw["symmetric"] = opt == "sym"
            if opt == "asym" and fmt.startswith("int"):
                fmt = "u" + fmt
        elif m := re.fullmatch(r"s=(\w+)", opt):
            kw["scale_dtype"] = m.group(1)
        elif m := re.fullmatch(r"axis=(-?\d+)", opt):
            kw["axis"] = int(m.group(1))
        else:
            raise ValueError(f"unknown option {opt!r} in spec {spec!r}")
    return QSpec(fmt=fmt, **kw)


def spec_to_string(s: QSpec) -> str:
    """The canonical spec string; ``parse_spec(spec_to_string(s)) == s``."""
    if s.fmt == "fp4" and s.scaling:
        name = {"mx": "mxfp4", "nv": "nvfp4"}[s.scaling]
        default = FP4_SCALINGS[name][1]
        parts = [name] + ([] if s.granularity == "group" and s.group_size == default else [_gran_str(s)])
    else:
        parts = [s.fmt, _gran_str(s)]
        if s.fmt.startswith("int") and not s.symmetric:
            parts.append("asym")
    if s.scale_dtype != "float32":
        parts.append(f"s={s.scale_dtype}")
    if s.axis != (-1 if s.granularity == "token" else 0):
        parts.append(f"axis={s.axis}")
    return "/".join(parts)


def _gran_str(s: QSpec) -> str:
    if s.granularity == "token":
        return "token" if s.group_size is None else f"token{s.group_size}"
    return {"tensor": "t", "channel": "c"}.get(s.granularity) or (
        f"g{s.group_size}" if s.granularity == "group" else f"b{s.block[0]}x{s.block[1]}"
    )


def np_dtype(name: str) -> np.dtype:
    """numpy dtype (ml_dtypes for 8-bit floats) of a storage dtype name."""
    return np.dtype(getattr(ml_dtypes, name, name))


def parse_rule(label: str, rule: Any) -> tuple[str, re.Pattern, QSpec | None]:
    """One ``(regex, spec or None)`` rule: its pattern, the compiled regex and the parsed spec.

    The shared grammar of weight rules (``jquant.rules.normalize_rules``) and activation rules
    (``jquant.nn.quantized(act_rules=...)``); every error starts with ``label`` (e.g. ``"rule 2"``).
    """
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], (str, re.Pattern))):
        raise ValueError(f"{label}: expected a (regex, spec or None) pair, got {rule!r}")
    pattern, spec = rule
    pattern = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        at = f" at position {e.pos}" if e.pos is not None else ""
        raise ValueError(f"{label} {pattern!r}: bad regular expression: {e.msg}{at}") from e
    try:
        return pattern, compiled, None if spec is None else parse_spec(spec)
    except ValueError as e:
        raise ValueError(f"{label} {pattern!r}: {e}") from e
