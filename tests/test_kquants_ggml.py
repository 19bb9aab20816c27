"""jquant's GGUF encoders write ggml's reference quantizer bytes, and its decoders give ggml's
values, on stored fixtures.

tests/fixtures/ggml/ was made by scripts/make_ggml_fixtures.py from ggml itself
(``ggml_quantize_chunk`` without an importance matrix, and the type's ``to_float``; ggml of
llama-cpp-python 0.3.36, llama.cpp commit in the fixtures' metadata): seeded float32 rows of
256 values in several kinds (Gaussian, heavy tails, outlier columns, zero, constant, tiny,
huge, mixed-sign extremes, exact rounding ties, ...), ggml's bytes for every type, and a
digest of ggml's decoded row. No ggml is needed here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from jquant import codecs
from jquant.codecs import GGML_CODECS

FIXTURES = Path(__file__).parent / "fixtures" / "ggml"


@pytest.fixture(scope="module")
def inputs() -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    d = np.load(FIXTURES / "inputs.npz")
    return d["x"], d["kind"], [str(k) for k in d["kinds"]], json.loads(str(d["meta"]))


def _ggml(name: str) -> dict[str, np.ndarray]:
    d = np.load(FIXTURES / f"{name}.npz")
    return {k: d[k] for k in d.files}


def _digests(y: np.ndarray) -> np.ndarray:
    """BLAKE2b-128 of each row's float32 bytes, as the fixture script computes them."""
    y = np.ascontiguousarray(y, "<f4")
    return np.stack([np.frombuffer(hashlib.blake2b(r.tobytes(), digest_size=16).digest(), np.uint8) for r in y])


def _bad_kinds(bad_rows: np.ndarray, kind: np.ndarray, kinds: list[str]) -> dict[str, int]:
    return {kinds[k]: int(bad_rows[kind == k].sum()) for k in range(len(kinds)) if bad_rows[kind == k].any()}


def test_fixtures_cover_every_codec(inputs) -> None:
    x, kind, kinds, meta = inputs
    assert set(GGML_CODECS) <= set(meta["types"])
    assert x.dtype == np.float32 and x.shape == (len(kind), 256) and np.isfinite(x).all()
    assert {"gauss", "outlier_cols", "zeros", "constant", "tiny_1e-8", "huge_1e4", "ties"} <= set(kinds)
    assert meta["ggml_commit"].startswith("ggml-org/llama.cpp@")


@pytest.mark.parametrize("name", sorted(GGML_CODECS))
def test_encoder_bytes_equal_ggml(name: str, inputs) -> None:
    x, kind, kinds, _ = inputs
    ref = _ggml(name)["blocks"]
    ours = GGML_CODECS[name].encode(x)
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    bad = (ours != ref).reshape(len(x), -1).any(-1)
    assert not bad.any(), f"{name}: {bad.sum()}/{len(x)} rows differ from ggml, by kind: {_bad_kinds(bad, kind, kinds)}"


@pytest.mark.parametrize("name", sorted(GGML_CODECS))
def test_decoder_equals_ggml_to_float(name: str, inputs) -> None:
    x, kind, kinds, _ = inputs
    ref = _ggml(name)
    y = np.asarray(GGML_CODECS[name].decode(jnp.asarray(ref["blocks"])))
    assert y.shape == x.shape and y.dtype == np.float32
    bad = (_digests(y) != ref["deq_digest"]).any(-1)
    assert not bad.any(), f"{name}: decode differs from ggml's to_float on rows of kinds {_bad_kinds(bad, kind, kinds)}"
    flat = ref["blocks"].reshape(len(x), -1)  # and the gguf package agrees, bit for bit
    np.testing.assert_array_equal(y.view(np.uint32), gguf.quants.dequantize(flat, T[name.upper()]).view(np.uint32))


@pytest.mark.parametrize("name", sorted(GGML_CODECS))
def test_encoder_bytes_across_chunks_and_leading_axes(name: str, inputs) -> None:
    """Inputs tiled past one encode chunk, with two leading axes: still ggml's bytes."""
    x = inputs[0]
    codec = GGML_CODECS[name]
    chunk_rows = codecs._CHUNK_BLOCKS if codec.block_elems == codecs.QK_K else codecs._SMALL_CHUNK * 32 // 256
    reps = chunk_rows // len(x) + 1
    ours = codec.encode(np.broadcast_to(x, (reps,) + x.shape))
    np.testing.assert_array_equal(ours, np.broadcast_to(_ggml(name)["blocks"], (reps,) + ours.shape[1:]))
