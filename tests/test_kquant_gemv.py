"""pallas_kernels.kquant_gemv off the GPU: the activation permutation, the wrapper's checks, and the
kernels themselves run by Triton's CPU interpreter against ggml's decode (jquant.codecs).

The interpreter reads ``TRITON_INTERPRET`` when a kernel is defined, so those runs happen in a
child process (``_interpret``) that imports the module with it set; they need only Triton and
PyTorch (the interpreter's tensors), not a GPU or jax-triton.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import kquant_gemv as kg
from pallas_kernels import kquant_triton as kq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("fmt", sorted(kq.FORMATS))
@pytest.mark.parametrize("mma", [False, True])
def test_x_order_is_a_permutation(fmt: str, mma: bool) -> None:
    order = kg.x_order(fmt, mma)
    np.testing.assert_array_equal(np.sort(order), np.arange(kq.TILE))


def test_x_order_names_the_format() -> None:
    with pytest.raises(ValueError, match="q3_k"):
        kg.x_order("q3_k", False)


@pytest.mark.parametrize("fmt", sorted(kq.FORMATS))
def test_permute_x_moves_values_by_the_order(fmt: str) -> None:
    x = jnp.arange(2 * 512, dtype=jnp.float32).reshape(2, 512)
    got = np.asarray(kg.permute_x(x, fmt, False))
    order = kg.x_order(fmt, False)
    np.testing.assert_array_equal(got[1, 256:], np.asarray(x)[1, 256 + order])
    # the same multiset of values in each tile: nothing is lost or repeated
    np.testing.assert_array_equal(np.sort(got.reshape(2, 2, 256), -1), np.asarray(x).reshape(2, 2, 256))


@pytest.mark.skipif(kg.jt is not None, reason="jax-triton is installed here")
def test_kquant_gemv_needs_the_gpu_extra() -> None:
    blocks = jnp.zeros((4, 2, 144), jnp.uint8)
    with pytest.raises(ImportError, match="gpu' extra"):
        kg.kquant_gemv(jnp.zeros((1, 512), jnp.bfloat16), blocks, "q4_k")


_CHILD = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np, torch, jax.numpy as jnp
    from pallas_kernels import kquant_gemv as kg, kquant_triton as kq
    out = []
    for fmt, m, mma, rows, split, depth in json.loads(sys.argv[1]):
        n, k = 32, 1024
        blocks = kq.random_blocks(fmt, n, k, seed=3, absmax=0.05)
        w = np.asarray(kq.decode_reference(jnp.asarray(blocks), fmt, jnp.float32))
        x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
        x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # the kernels take bf16 x
        ref, mag = x @ w.T, np.abs(x) @ np.abs(w).T
        xk = np.asarray(kg.kernel_x(jnp.asarray(x), fmt, mma))
        if not mma and fmt in ("q6_k", "q8_0"):  # read as bf16 pairs: the bf16 bits themselves
            xp = torch.tensor(xk.view(np.int16))
        else:
            xp = torch.tensor(xk.astype(np.float32))
        y = torch.zeros((split, 16, n), dtype=torch.float32)
        kg._gemv_kernel[(n // rows, split)](
            xp, torch.tensor(blocks), 15, y, M=m, N=n, K=k, R=rows, SPLIT=split, MMA=mma,
            FMT=kq.FORMATS[fmt], TB=kq.tile_bytes(fmt), F16=True, DEPTH=depth)
        got = y.sum(0)[:m].numpy()
        out.append(float(np.max(np.abs(got - ref) / (mag + 1e-12))))
    print(json.dumps(out))
    """
)


def _interpret(cases: list[tuple]) -> list[float]:
    """Max error relative to ``|x| @ |w|`` of each case, run by Triton's interpreter in a child process."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(cases)], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _interpreter_cases(fmt: str) -> list[tuple]:
    # the CUDA-core path (fp32 throughout) at M = 1 and 2, split K, loading 0-4 tiles ahead of the
    # 4 (2 when split) tiles a program decodes; the tensor-core path at M = 5
    cases = [(fmt, 1, False, 8, 1, d) for d in (4, 3)]
    return cases + [(fmt, 2, False, 16, 1, 2), (fmt, 2, False, 16, 2, 0), (fmt, 5, True, 16, 2, 1)]


@pytest.fixture(scope="module")
def interpreted() -> dict[str, list[float]]:
    """Every format's cases in one child process (its imports of Triton, PyTorch and JAX cost
    more than a format's kernel runs): {fmt: the errors of its cases}."""
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    fmts = sorted(kq.FORMATS)
    errors = iter(_interpret([case for fmt in fmts for case in _interpreter_cases(fmt)]))
    return {fmt: [next(errors) for _ in _interpreter_cases(fmt)] for fmt in fmts}


@pytest.mark.parametrize("fmt", sorted(kq.FORMATS))
def test_kernel_matches_ggml_decode_in_the_interpreter(fmt: str, interpreted: dict[str, list[float]]) -> None:
    *fma, mma = interpreted[fmt]
    assert max(fma) < 1e-6, fma
    assert mma < 2e-3, mma  # fp16 operands (the interpreter's stand-in for bf16), fp32 accumulation


def test_wrapper_picks_path_split_and_operands(monkeypatch) -> None:
    """The launch the wrapper asks jax-triton for (recorded by a stand-in, no GPU needed)."""
    calls = []

    def triton_call(*args, kernel, out_shape, grid, **kw):
        calls.append({"args": args, "grid": grid, **kw})
        return jnp.zeros(out_shape.shape, out_shape.dtype)

    monkeypatch.setattr(kg, "jt", type("JT", (), {"triton_call": staticmethod(triton_call)}))
    monkeypatch.setattr(kg._common, "num_sms", lambda: 132)  # pylint: disable=protected-access
    blocks = jnp.zeros((5120, 24, 34), jnp.uint8)  # q8_0, K = 768: three 256-value tiles
    y = kg.kquant_gemv(jnp.ones((1, 768), jnp.float32), blocks, "q8_0")
    assert y.shape == (1, 5120) and y.dtype == jnp.bfloat16
    c = calls[-1]
    # 160 programs of 32 rows; about two per SM wants a split of 2, which does not divide 3 tiles
    assert c["MMA"] is False and c["grid"] == (160, 1) and c["SPLIT"] == 1
    assert c["args"][0].shape == (1, 768) and c["args"][0].dtype == jnp.bfloat16  # Q8_0: x as it is
    assert type(c["args"][2]) is int  # a scalar kernel argument, not a 0-d array
    blocks = jnp.zeros((5120, 32, 34), jnp.uint8)  # K = 1024: four tiles, so the split of 2 is taken
    kg.kquant_gemv(jnp.ones((16, 1024), jnp.bfloat16), blocks, "q8_0")
    c = calls[-1]
    assert c["MMA"] is True and c["grid"] == (160, 2) and c["args"][0].shape == (16, 1024)
    kg.kquant_gemv(jnp.ones((1, 1024), jnp.bfloat16), jnp.zeros((64, 4, 144), jnp.uint8), "q4_k")
    assert calls[-1]["args"][0].dtype == jnp.float32  # Q4_K's permuted x comes in fp32
    with pytest.raises(ValueError, match="above the CUDA-core path"):
        kg.kquant_gemv(jnp.ones((3, 1024), jnp.bfloat16), blocks, "q8_0", mma=False)
    with pytest.raises(ValueError, match="power of two"):
        kg.kquant_gemv(jnp.ones((3, 1024), jnp.bfloat16), blocks, "q8_0", rows=8)


def test_dispatch_keeps_other_paths_off_the_gpu() -> None:
    assert not kg.supports(jnp.ones((1, 5120), jnp.bfloat16), "q4_k", 5120 * 5120)  # CPU: never the kernel


def test_dispatch_tiling_runs_the_cuda_core_path(monkeypatch) -> None:
    calls = []

    def triton_call(*args, kernel, out_shape, grid, **kw):
        calls.append({"grid": grid, **kw})
        return jnp.zeros(out_shape.shape, out_shape.dtype)

    monkeypatch.setattr(kg, "jt", type("JT", (), {"triton_call": staticmethod(triton_call)}))
    blocks = jnp.zeros((64, 4, 210), jnp.uint8)  # q6_k, K = 1024
    kg.dispatch_matmul(jnp.ones((2, 1024), jnp.bfloat16), blocks, "q6_k")
    assert calls[-1]["MMA"] is False and calls[-1]["R"] == kg.DISPATCH_TILING["q6_k"]["rows"]
    assert set(kg.DISPATCH_TILING) == set(kq.FORMATS)


def test_dispatch_leaves_small_weights_and_larger_m_to_the_first_kernel(monkeypatch) -> None:
    monkeypatch.setattr(kg, "jt", object())
    monkeypatch.setattr(kg._common, "on_hopper", lambda: True)  # pylint: disable=protected-access
    big = 5120 * 5120
    assert kg.supports(jnp.ones((2, 5120), jnp.bfloat16), "q6_k", big)
    assert not kg.supports(jnp.ones((3, 5120), jnp.bfloat16), "q6_k", big)  # M > 2: tensor cores lose
    assert not kg.supports(jnp.ones((1, 1536), jnp.bfloat16), "q6_k", 1536 * 1536)  # below the floor
    assert not kg.supports(jnp.ones((1, 5120), jnp.bfloat16), "q3_k", big)
