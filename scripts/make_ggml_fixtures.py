"""Write tests/fixtures/ggml/: ggml's reference quantizer bytes for seeded inputs.

Usage: python scripts/make_ggml_fixtures.py PATH/TO/libggml-base.so [--out tests/fixtures/ggml]

The library is ggml's base library (it holds ``ggml_quantize_chunk`` and the reference
quantizers), e.g. from llama-cpp-python's install or built from its sdist's
``vendor/llama.cpp/ggml``. Inputs are seeded numpy rows of 256 float32 values in several
kinds (Gaussian, heavy tails, outlier columns, zero/constant/tiny/huge blocks, exact rounding
ties, ...). Each type is quantized with ``ggml_quantize_chunk`` (imatrix NULL, i.e. the
``quantize_row_*_ref`` path) and decoded with ggml's ``to_float``; the fixtures hold the
inputs, ggml's bytes, and a BLAKE2b digest of every decoded row (the full decoded floats
would be 10x the size). ``tests/test_kquants_ggml.py`` reads only these files.

Run from the repository root: ``python scripts/make_ggml_fixtures.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/make_ggml_fixtures.py`` where jquant is not installed (e.g. the GPU machine).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
from pathlib import Path

import numpy as np

# name -> (ggml_type, values per block, bytes per block)
TYPES = {
    "q4_0": (2, 32, 18),
    "q4_1": (3, 32, 20),
    "q5_0": (6, 32, 22),
    "q5_1": (7, 32, 24),
    "q8_0": (8, 32, 34),
    "q2_k": (10, 256, 84),
    "q3_k": (11, 256, 110),
    "q4_k": (12, 256, 144),
    "q5_k": (13, 256, 176),
    "q6_k": (14, 256, 210),
}
N = 256  # values per row: one k-quant super-block, eight 32-value blocks
SEED = 20240611
SOURCE = {
    "llama_cpp_python": "0.3.36 (sdist, vendor/llama.cpp)",
    "ggml_commit": "ggml-org/llama.cpp@0c1e57098bba43ac29e6e3b677cdceebdd22334f",
    "ggml_version": "0.25.3",
    "build": "cmake -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_TYPE=Release, target ggml-base, gcc, x86-64",
}


def make_inputs() -> tuple[np.ndarray, list[str], np.ndarray]:
    """(x f32[R, 256], kind names, kind index of each row), deterministic."""
    rng = np.random.default_rng(SEED)
    g = lambda r: rng.standard_normal((r, N))  # noqa: E731
    kinds: dict[str, np.ndarray] = {}
    kinds["gauss"] = g(24)
    kinds["student_t3"] = rng.standard_t(3, (16, N))
    x = g(16)
    cols = rng.choice(N, 6, replace=False)
    x[:, cols] *= rng.uniform(20, 100, 6)
    kinds["outlier_cols"] = x
    kinds["subblock_scales"] = (g(16).reshape(16, 8, 32) * np.exp(rng.uniform(-7, 3, (16, 8, 1)))).reshape(16, N)
    kinds["row_scales"] = g(8) * np.exp(rng.uniform(-8, 4, (8, 1)))
    kinds["positive_offset"] = g(8) + 3
    kinds["negative_offset"] = g(8) - 3
    kinds["uniform"] = rng.uniform(-1, 1, (8, N))
    kinds["sparse"] = g(8) * (rng.random((8, N)) < 0.05)
    kinds["zeros"] = np.zeros((2, N))
    const = np.stack([np.full(N, v) for v in (3.0, -0.7, 1e-3, -5e3)])
    per16 = np.repeat(rng.standard_normal((2, 16)) * 2, 16, -1)  # constant 16-value groups
    kinds["constant"] = np.concatenate([const, per16])
    kinds["one_hot"] = np.stack([np.eye(1, N, 7)[0] * 5, -np.eye(1, N, 200)[0] * 0.25])
    kinds["tiny_1e-8"] = g(4) * 1e-8
    kinds["tiny_1e-6"] = g(4) * 1e-6
    kinds["huge_1e4"] = g(8) * 1e4
    x = g(8)
    idx = rng.integers(0, N, (8, 6))
    np.put_along_axis(x, idx, rng.choice([-1.0, 1.0], (8, 6)) * rng.uniform(1e3, 1e4, (8, 6)), -1)
    x[6] = np.where(np.arange(N) % 2, 1.0, -1.0) * 7.5  # alternating +-amax
    x[7, ::32] = -x[7, ::32].max() * 50  # a large negative value leading every block
    kinds["mixed_sign_extremes"] = x
    # values on half-integer grids: the products with the inverse scales hit exact rounding ties
    t = rng.integers(-254, 255, (8, N)) / 2.0
    t[:, ::32] = 127.0
    t[4:] /= 16
    kinds["ties"] = t
    names = list(kinds)
    x = np.concatenate([kinds[k] for k in names]).astype(np.float32)
    kind = np.concatenate([np.full(len(kinds[k]), i, np.int16) for i, k in enumerate(names)])
    return x, names, kind


class _Traits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def load(lib_path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(lib_path)
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    return lib


def quantize(lib: ctypes.CDLL, name: str, x: np.ndarray) -> np.ndarray:
    """ggml's bytes of the rows of x: u8[R, n // block, block_bytes]."""
    t, be, bb = TYPES[name]
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // be, bb), np.uint8)
    n = lib.ggml_quantize_chunk(t, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    assert n == out.nbytes, (name, n, out.nbytes)
    return out


def dequantize(lib: ctypes.CDLL, name: str, blocks: np.ndarray) -> np.ndarray:
    """ggml's ``to_float`` of blocks u8[R, nb, bb] -> f32[R, nb * block]."""
    t, be, _ = TYPES[name]
    traits = lib.ggml_get_type_traits(t).contents
    assert traits.blck_size == be and traits.type_name.decode() == name.replace("_k", "_K"), traits.type_name
    blocks = np.ascontiguousarray(blocks)
    y = np.zeros((blocks.shape[0], blocks.shape[1] * be), np.float32)
    _TO_FLOAT(traits.to_float)(blocks.ctypes.data, y.ctypes.data, y.size)
    return y


def row_digests(y: np.ndarray) -> np.ndarray:
    """BLAKE2b-128 of each row's float32 little-endian bytes: u8[R, 16]."""
    y = np.ascontiguousarray(y, "<f4")
    return np.stack([np.frombuffer(hashlib.blake2b(r.tobytes(), digest_size=16).digest(), np.uint8) for r in y])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lib", help="path of libggml-base.so (or a libggml*.so exporting ggml_quantize_chunk)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "ggml"))
    args = ap.parse_args()
    lib = load(args.lib)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, names, kind = make_inputs()
    meta = dict(SOURCE, seed=SEED, kinds=names, types=list(TYPES))
    np.savez_compressed(out / "inputs.npz", x=x, kind=kind, kinds=np.array(names), meta=np.array(json.dumps(meta)))
    for name in TYPES:
        blocks = quantize(lib, name, x)
        np.savez_compressed(out / f"{name}.npz", blocks=blocks, deq_digest=row_digests(dequantize(lib, name, blocks)))
    total = sum(p.stat().st_size for p in out.glob("*.npz"))
    print(f"wrote {len(TYPES) + 1} files, {x.shape[0]} rows, {total / 1024:.0f} KiB to {out}")


if __name__ == "__main__":
    main()
