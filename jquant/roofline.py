"""Roofline model of a linear layer: arithmetic intensity, ridge points, attainable rate.

A linear layer ``Y = X W`` with ``X`` of shape ``(M, K)`` and ``W`` of shape ``(K, N)``
does ``2 M K N`` FLOPs (one multiply and one add per multiply-accumulate) and, at best,
moves each operand once::

    bytes = K N bw + M K ba + M N bo        (bw, ba, bo: bytes per element)
    I     = 2 M K N / bytes                 (FLOP per byte)

For a diffusion transformer ``M`` is the number of *tokens* that pass through the layer
(batch x CFG branches x sequence length), not the batch size: a Wan2.1 480x832 81-frame
video is 32,760 tokens per sample. A layer is bandwidth-bound when ``I`` is below the
ridge point ``peak / bandwidth`` of the format it computes in, and compute-bound above it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

__all__ = [
    "Ceilings",
    "FORMAT_BITS",
    "H100_SXM",
    "H100_MEASURED_XLA",
    "Table4Row",
    "attainable",
    "format_bits",
    "format_table",
    "linear_bytes",
    "linear_flops",
    "linear_intensity",
    "linear_time",
    "ridge_point",
    "ridge_summary",
    "table4_grid",
]

FORMAT_BITS: dict[str, float] = {
    "FP32": 32,
    "FP16": 16,
    "BF16": 16,
    "FP8": 8,
    "E4M3": 8,
    "E5M2": 8,
    "INT8": 8,
    "INT4": 4,
    "UINT4": 4,
    "NF4": 4,
    "FP4": 4,
}

Bits = float | str


def format_bits(fmt: Bits, name: str = "format") -> float:
    """Bits per element of a format name (``"INT4"`` -> 4) or a positive number of bits.

    Fractional bits are allowed, e.g. ``4.125`` for INT4 with one 16-bit scale per 128.
    """
    if isinstance(fmt, str):
        key = fmt.upper()
        if key not in FORMAT_BITS:
            raise ValueError(f"{name}: unknown format {fmt!r}; known: {sorted(FORMAT_BITS)}")
        return float(FORMAT_BITS[key])
    if isinstance(fmt, bool) or not isinstance(fmt, (int, float)) or not fmt > 0:
        raise ValueError(f"{name}: bits must be a positive number or a format name, got {fmt!r}")
    return float(fmt)


def _dims(m: int, k: int, n: int) -> None:
    for name, v in (("m", m), ("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def linear_flops(m: int, k: int, n: int) -> float:
    """``2 M K N``: FLOPs of an ``(M, K) x (K, N)`` product (2 per multiply-accumulate)."""
    _dims(m, k, n)
    return 2.0 * m * k * n


def linear_bytes(m: int, k: int, n: int, w_bits: Bits, a_bits: Bits, out_bits: Bits = 16) -> float:
    """``K N bw + M K ba + M N bo``: compulsory traffic (each operand read or written once)."""
    _dims(m, k, n)
    bw = format_bits(w_bits, "w_bits") / 8
    ba = format_bits(a_bits, "a_bits") / 8
    bo = format_bits(out_bits, "out_bits") / 8
    return k * n * bw + m * k * ba + m * n * bo


def linear_intensity(m: int, k: int, n: int, w_bits: Bits, a_bits: Bits, out_bits: Bits = 16) -> float:
    """Arithmetic intensity (FLOP/byte) of ``Y[M,N] = X[M,K] W[K,N]`` (handbook eq. 7).

    ``m`` is the number of rows of ``X``: for a DiT, the token count through the layer
    (batch x CFG branches x sequence), not the batch size. Bits may be numbers or format
    names (``"FP16"``, ``"FP8"``, ``"INT8"``, ``"INT4"``...); the output defaults to FP16.
    """
    return linear_flops(m, k, n) / linear_bytes(m, k, n, w_bits, a_bits, out_bits)


def ridge_point(peak_flops: float, bandwidth: float) -> float:
    """Intensity (FLOP/byte) where the bandwidth roof meets the compute roof."""
    if not peak_flops > 0 or not bandwidth > 0:
        raise ValueError(f"peak_flops and bandwidth must be positive, got {peak_flops!r}, {bandwidth!r}")
    return peak_flops / bandwidth


def attainable(intensity: float, peak_flops: float, bandwidth: float) -> float:
    """Roofline bound ``min(peak, I * bandwidth)`` in FLOP/s."""
    ridge_point(peak_flops, bandwidth)
    if not intensity >= 0:
        raise ValueError(f"intensity must be non-negative, got {intensity!r}")
    return min(peak_flops, intensity * bandwidth)


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """Peak rates (FLOP/s or OP/s, dense) and memory bandwidth (bytes/s) of one device.

    Defaults are the H100 SXM datasheet. Pass measured numbers for realistic roofs, e.g.
    ``Ceilings(name="measured", bf16_flops=7.0e14, bandwidth=2.88e12, ...)``.
    """

    name: str = "H100 SXM datasheet (dense)"
    bf16_flops: float = 989e12
    fp8_flops: float = 1979e12
    int8_ops: float = 1979e12
    fp32_flops: float = 67e12
    bandwidth: float = 3.35e12

    def __post_init__(self) -> None:
        for f in ("bf16_flops", "fp8_flops", "int8_ops", "fp32_flops", "bandwidth"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"Ceilings.{f} must be a positive number, got {v!r}")

    def peak(self, w_format: str, a_format: str) -> float:
        """Peak of the format the product computes in.

        The MMA runs in the activation's format (low-bit weights are widened to it), or in
        the weight's when the weight is the wider one. Hopper has no INT4/FP4 tensor cores:
        INT4 runs on the INT8 path, FP4/NF4 on FP8 (an upper bound; it needs widening).
        """
        w, a = w_format.upper(), a_format.upper()
        fmt = w if format_bits(w, "w_format") > format_bits(a, "a_format") else a
        family = {
            "FP32": self.fp32_flops,
            "FP16": self.bf16_flops,
            "BF16": self.bf16_flops,
            "FP8": self.fp8_flops,
            "E4M3": self.fp8_flops,
            "E5M2": self.fp8_flops,
            "FP4": self.fp8_flops,
            "NF4": self.bf16_flops,  # a lookup format: decoded to 16-bit before the MMA
            "INT8": self.int8_ops,
            "INT4": self.int8_ops,
            "UINT4": self.int8_ops,
        }
        return family[fmt]

    def ridge(self, w_format: str, a_format: str) -> float:
        return ridge_point(self.peak(w_format, a_format), self.bandwidth)

    def attainable(self, intensity: float, w_format: str, a_format: str) -> float:
        return attainable(intensity, self.peak(w_format, a_format), self.bandwidth)


H100_SXM = Ceilings()
# Measured on the lent H100 with XLA (JAX 0.11.2): 8192^3 GEMMs (bf16 702 TFLOP/s, int8
# 907 TOP/s, fp8 901 TFLOP/s) and a device copy at 2.88 TB/s (docs/roofline.md, DESIGN.md).
H100_MEASURED_XLA = Ceilings(
    name="H100 SXM measured (XLA, JAX 0.11.2)",
    bf16_flops=702e12,
    fp8_flops=901e12,
    int8_ops=907e12,
    fp32_flops=67e12,
    bandwidth=2.88e12,
)


def linear_time(
    m: int,
    k: int,
    n: int,
    w_format: str,
    a_format: str,
    out_format: str = "FP16",
    ceilings: Ceilings = H100_SXM,
) -> float:
    """Roofline lower bound on the time (s): ``max(FLOPs / peak, bytes / bandwidth)``."""
    flops = linear_flops(m, k, n)
    nbytes = linear_bytes(m, k, n, w_format, a_format, out_format)
    return max(flops / ceilings.peak(w_format, a_format), nbytes / ceilings.bandwidth)


@dataclasses.dataclass(frozen=True)
class Table4Row:
    """One cell of the Table 4 grid: a token count and a weight/activation format pair."""

    batch: int
    weight: str
    act: str
    out: str
    flops: float
    bytes: float
    intensity: float
    ridge: float
    attainable_flops: float

    @property
    def bound(self) -> str:
        return "memory" if self.intensity < self.ridge else "compute"


DEFAULT_BATCHES: tuple[int, ...] = tuple(2**i for i in range(11))  # 1 .. 1024
DEFAULT_COMBOS: tuple[tuple[str, str], ...] = (
    ("FP16", "FP16"),
    ("INT8", "FP16"),
    ("FP8", "FP8"),
    ("INT8", "INT8"),
    ("INT4", "FP16"),
    ("INT4", "INT8"),
    ("INT4", "FP8"),
    ("INT4", "INT4"),
)


def table4_grid(
    batches: Sequence[int] = DEFAULT_BATCHES,
    combos: Sequence[tuple[str, str]] = DEFAULT_COMBOS,
    k: int = 4096,
    n: int = 4096,
    out_format: str | None = "FP16",
    ceilings: Ceilings = H100_SXM,
) -> list[Table4Row]:
    """The handbook's Table 4 grid, recomputed: a ``k x n`` layer for each batch and combo.

    ``out_format=None`` writes the output in the activation's format instead of FP16.
    Rows are ordered batch-major, combos in the given order.
    """
    if not batches or not combos:
        raise ValueError("table4_grid: batches and combos must be non-empty")
    rows = []
    for b in batches:
        for w, a in combos:
            out = a if out_format is None else out_format
            flops = linear_flops(b, k, n)
            nbytes = linear_bytes(b, k, n, w, a, out)
            intensity = flops / nbytes
            rows.append(
                Table4Row(
                    batch=b,
                    weight=w,
                    act=a,
                    out=out,
                    flops=flops,
                    bytes=nbytes,
                    intensity=intensity,
                    ridge=ceilings.ridge(w, a),
                    attainable_flops=ceilings.attainable(intensity, w, a),
                )
            )
    return rows


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:.1f}"
    if v >= 10:
        return f"{v:.2f}"
    return f"{v:.4f}"


def format_table(rows: Sequence[Table4Row], value: str = "intensity") -> str:
    """Markdown grid: one row per batch, one column per ``W/A`` combo.

    ``value`` is ``"intensity"`` (FLOP/byte), ``"attainable"`` (TFLOP/s on the rows'
    ceilings) or ``"bound"`` (memory/compute).
    """
    getters = {
        "intensity": lambda r: _fmt(r.intensity),
        "attainable": lambda r: _fmt(r.attainable_flops / 1e12),
        "bound": lambda r: r.bound,
    }
    if value not in getters:
        raise ValueError(f"format_table: value must be one of {sorted(getters)}, got {value!r}")
    if not rows:
        raise ValueError("format_table: rows is empty")
    combos = list(dict.fromkeys((r.weight, r.act) for r in rows))
    batches = list(dict.fromkeys(r.batch for r in rows))
    cells = {(r.batch, r.weight, r.act): getters[value](r) for r in rows}
    header = "| B | " + " | ".join(f"{w}/{a}" for w, a in combos) + " |"
    sep = "|---:|" + "---:|" * len(combos)
    lines = [header, sep]
    for b in batches:
        vals = [cells.get((b, w, a), "") for w, a in combos]
        lines.append(f"| {b} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def ridge_summary(ceilings: Ceilings = H100_SXM) -> str:
    """Markdown list of the ridge points of the 16-bit, FP8 and INT8 compute paths."""
    parts = [
        ("BF16/FP16", ceilings.ridge("FP16", "FP16")),
        ("FP8", ceilings.ridge("FP8", "FP8")),
        ("INT8", ceilings.ridge("INT8", "INT8")),
    ]
    items = ", ".join(f"{name} {r:.1f}" for name, r in parts)
    return f"ridge points on {ceilings.name} (FLOP/byte): {items}"
