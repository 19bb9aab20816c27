"""Quantized execution of unmodified linen and NNX transformer blocks, in all three modes."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jquant
import jquant.nn as jnn
from jquant.dispatch import linear


class LinenBlock(nn.Module):
    """A pre-norm transformer block using Dense, DenseGeneral and Einsum (unmodified by jquant)."""

    dim: int = 64
    heads: int = 4

    @nn.compact
    def __call__(self, x):
        hd = self.dim // self.heads
        h = nn.LayerNorm()(x)
        q = nn.DenseGeneral((self.heads, hd), name="q")(h)
        k = nn.DenseGeneral((self.heads, hd), name="k")(h)
        v = nn.DenseGeneral((self.heads, hd), name="v")(h)
        a = jax.nn.dot_product_attention(q, k, v)
        x = x + nn.Einsum((self.heads, hd, self.dim), "bthk,hkd->btd", name="o")(a)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(self.dim, name="down")(nn.gelu(nn.Dense(4 * self.dim, name="up")(h)))


class NNXBlock(nnx.Module):
    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.o = nnx.Linear(dim, dim, rngs=rngs)
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x):
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(self.norm(x)), 3, axis=-1)
        sh = lambda z: z.reshape(b, t, 4, d // 4)
        x = x + self.o(jax.nn.dot_product_attention(sh(q), sh(k), sh(v)).reshape(b, t, d))
        return x + self.down(nnx.gelu(self.up(self.norm(x))))


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture(scope="module")
def linen_setup():
    m = LinenBlock()
    x = jax.random.normal(jax.random.key(1), (2, 16, 64))
    v = m.init(jax.random.key(0), x)
    return m, v, x, m.apply(v, x)


def static_scales(m, v, x):
    """Calibrate per-layer static activation scales with jquant.nn.observe (absmax / 127)."""
    seen = {}

    def obs(path, a):
        seen[path] = jnp.max(jnp.abs(a)) / 127.0

    with jnn.observe(obs):
        m.apply(v, x)
    tree = {}
    for path, s in seen.items():
        node = tree
        for p in path.split("/"):
            node = node.setdefault(p, {})
        node["input_scale"] = s
    return tree


@pytest.mark.parametrize("mode", ["weight_only", "dynamic", "static"])
def test_linen_block_three_modes(linen_setup, mode):
    m, v, x, ref = linen_setup
    qv, report = jquant.quantize_params(v, "int8")
    assert report.bytes_after < 0.5 * report.bytes_before
    if mode == "static":
        qv = {**qv, jnn.AUX_COLLECTION: static_scales(m, v, x)}
    act = {"weight_only": None, "dynamic": "int8/token", "static": "int8/t"}[mode]
    f = jax.jit(lambda qv, x: jnn.apply(m, qv, x, act=act, static=mode == "static"))
    y = f(qv, x)
    chex.assert_shape(y, ref.shape)
    assert rel(y, ref) < 0.02, rel(y, ref)
    assert rel(y, ref) > 0  # quantization really happened


def test_linen_w4a16_printed(linen_setup, capsys):
    m, v, x, ref = linen_setup
    qv, _ = jquant.quantize_params(v, [("o/kernel", "int4/c"), (".*", "int4/g16")])
    y = jax.jit(lambda qv, x: jnn.apply(m, qv, x))(qv, x)
    err = rel(y, ref)
    print(f"W4A16 linen block relative error: {err:.4f}")
    assert 0 < err < 0.2


def test_unmodified_model_code_is_used(linen_setup):
    """Outside the context the same quantized params fail in flax's own Dense (proof of interception)."""
    m, v, x, ref = linen_setup
    qv, _ = jquant.quantize_params(v, "int8")
    with pytest.raises(Exception):
        m.apply(qv, x)
    chex.assert_trees_all_close(jnn.apply(m, v, x), ref)  # float params run unchanged


@pytest.mark.parametrize("mode", ["weight_only", "dynamic", "static"])
def test_nnx_block_three_modes(mode):
    model = NNXBlock(64, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, 64))
    ref = model(x)
    gd, st = nnx.split(model)
    qst, _ = jquant.quantize_params(st, "int8")
    aux = None
    if mode == "static":
        seen = {}
        with jnn.observe(
            lambda p, a: seen.__setitem__(p, {"input_scale": jnp.max(jnp.abs(a)) / 127.0}), nnx_model=model
        ):
            model(x)
        assert set(seen) == {"qkv", "o", "up", "down"}
        aux = seen
    act = {"weight_only": None, "dynamic": "int8/token", "static": "int8/t"}[mode]
    y = jax.jit(lambda s, x: jnn.nnx_apply(gd, s, x, act=act, static=mode == "static", aux=aux))(qst, x)
    assert 0 < rel(y, ref) < 0.02


def test_w4a16_nnx_printed():
    model = NNXBlock(64, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, 64))
    gd, st = nnx.split(model)
    qst, _ = jquant.quantize_params(st, "int4/g32")
    err = rel(jax.jit(lambda s, x: jnn.nnx_apply(gd, s, x))(qst, x), model(x))
    print(f"W4A16 nnx block relative error: {err:.4f}")
    assert 0 < err < 0.2


def test_static_mode_without_scales_is_a_clear_error(linen_setup):
    m, v, x, _ = linen_setup
    qv, _ = jquant.quantize_params(v, "int8")
    with pytest.raises(KeyError, match="input_scale"):
        jnn.apply(m, qv, x, act="int8/t", static=True)


def test_int8_xla_path_equals_simulated_path():
    """The int8 x int8 -> int32 path equals dequantize(x_q) @ dequantize(w_q) up to fp32 rounding."""
    x = jax.random.normal(jax.random.key(0), (8, 32))
    w = jquant.quantize(jax.random.normal(jax.random.key(1), (32, 16)), "int8")
    act = jquant.parse_spec("int8/token")
    y = linear(x, w, act=act, backend="xla")
    from jquant.dispatch import quantize_activation

    sim = jquant.dequantize(quantize_activation(x, act, None)) @ jquant.dequantize(w)
    chex.assert_trees_all_close(y, sim, rtol=1e-5, atol=1e-5)


def test_aux_input_mul_and_lowrank_are_exact_in_float():
    """input_mul folded into the kernel and a low-rank split leave the float output unchanged."""
    m = nn.Dense(16)
    x = jax.random.normal(jax.random.key(0), (4, 32))
    v = m.init(jax.random.key(1), x)
    k = v["params"]["kernel"]
    s = jnp.linspace(0.5, 2.0, 32)
    a = jax.random.normal(jax.random.key(2), (32, 4))
    b = a.T[:, :16] * 0.1
    v2 = {
        "params": {"kernel": (k - a @ b) / s[:, None], "bias": v["params"]["bias"]},
        jnn.AUX_COLLECTION: {"input_mul": s, "lowrank_a": a / s[:, None], "lowrank_b": b},
    }
    with jnn.quantized(None):
        y = m.apply(v2, x)
    chex.assert_trees_all_close(y, m.apply(v, x), rtol=1e-5, atol=1e-5)


def test_backend_flag_validation(monkeypatch):
    monkeypatch.setenv("JQUANT_BACKEND", "cuda")
    w = jquant.quantize(jnp.ones((8, 4)), "int8")
    with pytest.raises(ValueError, match="JQUANT_BACKEND"):
        linear(jnp.ones((2, 8)), w)
    monkeypatch.setenv("JQUANT_BACKEND", "pallas")
    if jax.default_backend() != "gpu":
        with pytest.raises(RuntimeError, match="not a GPU"):
            linear(jnp.ones((2, 8)), w)
