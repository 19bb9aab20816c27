"""scripts/bench_qk_prep.py's codes rows off the GPU: each variant, run by Pallas's interpreter at a
small token grid, passes the judge the GPU run applies (a row that fails there fails after the
device time is spent)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from _scripts import load_script, unload_script

from jquant.models.embeddings import wan_rope_tables
from pallas_kernels import attn_prep


@pytest.fixture(scope="module")
def bench():
    module = load_script("bench_qk_prep")
    yield module
    unload_script(module)


def _args(bench, grid: tuple[int, int, int], seed: int = 0) -> tuple:
    cos, sin = wan_rope_tables(bench.HEAD_DIM, grid)
    tokens, width = grid[0] * grid[1] * grid[2], bench.HEADS * bench.HEAD_DIM
    kx, ks = jax.random.split(jax.random.key(seed))
    x = (jax.random.normal(kx, (1, tokens, width)) * 3).astype(jnp.bfloat16)
    return x, 1 + 0.1 * jax.random.normal(ks, (width,)), jnp.asarray(cos), jnp.asarray(sin)


def test_codes_rows_pass_their_judges_in_the_interpreter(bench, monkeypatch):
    monkeypatch.setattr(bench, "HEADS", 2)
    monkeypatch.setattr(bench, "TOKENS_PADDED", 1024)  # 8 tiles of 128: every row's tiles a program divide
    real = attn_prep.prep_tokens_pallas
    orders = []

    def interpreted(x, **kw):
        orders.append(kw.get("heads_inner"))
        if "warps" in kw:  # the interpreter ignores warps: check the value the GPU gets is valid
            assert kw["warps"] in attn_prep.WARPS
        return real(x, **kw, interpret=True)

    monkeypatch.setattr(attn_prep, "prep_tokens_pallas", interpreted)
    args = _args(bench, (2, 3, 35))  # 210 tokens: a partial last 128-token tile
    plain = {f"{r} {n}" for r in "qk" for n in ("xla+prep", "prologue-inner", "prologue-outer")}
    assert plain <= set(bench.QUANT_ROWS) and set(bench.QUANT_VARIANTS) == set(bench.QUANT_ROWS)
    for name, fn in bench.QUANT_VARIANTS.items():  # jitted, as check_then_time runs them
        verdict = bench.check_codes(*bench.QUANT_ROWS[name][:2], args)(jax.jit(fn)(*args))
        assert verdict["ok"], (name, verdict)
    launch = {"xla": None, "inner": True, "outer": False}  # the XLA rows leave the default
    assert orders == [launch[where] for _, where, _ in bench.QUANT_ROWS.values()]
    assert orders[:6] == [None, True, False] * 2


def test_codes_judge_catches_a_prologue_left_out(bench, monkeypatch):
    monkeypatch.setattr(bench, "HEADS", 2)
    monkeypatch.setattr(bench, "TOKENS_PADDED", 256)
    real = attn_prep.prep_tokens_pallas
    monkeypatch.setattr(
        attn_prep, "prep_tokens_pallas", lambda x, **kw: real(x, **{**kw, "rope": None}, interpret=True)
    )
    args = _args(bench, (2, 3, 35), seed=1)
    assert not bench.check_codes("q", "inner", args)(bench.QUANT_VARIANTS["q prologue-inner"](*args))["ok"]
