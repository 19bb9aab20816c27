"""Small synthetic problems with DiT-like outliers, shared by tests, tables and docs.

* :class:`TinyDiTBlock`: one adaLN-modulated DiT block (linen, every linear an
  ``nn.Dense``): ``h = LN(x) * (1 + scale(c)) + shift(c)``, self-attention (optional
  per-head RMSNorm on q/k and RoPE), ``x += gate * out_proj(attn)``, then the same around a
  GELU MLP. Layer names follow diffusers: ``to_q/to_k/to_v/to_out``, ``ff_up/ff_down``,
  ``adaLN`` (the modulation).
* :func:`outlier_block`: a block whose weights and inputs carry the outliers real DiTs have
  (a few massive residual channels, modulation scales that amplify some channels, outlier
  value columns that hit ``to_out`` and up-projection units that fire large into
  ``ff_down``).
* :func:`outlier_layer`: one ``(x, W)`` pair with structured outlier channels, and
  :func:`one_layer` to run it as a linen model.
* :func:`layer_roles`: the role labels of these modules (:mod:`jquant.models.roles`), so
  policies and the library's transforms treat them like a ported DiT's layers.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jquant.models.roles import assign_roles

Array = jax.Array


def _layernorm(x: Array, eps: float = 1e-6) -> Array:
    m = x.mean(-1, keepdims=True)
    return (x - m) * jax.lax.rsqrt(jnp.square(x - m).mean(-1, keepdims=True) + eps)


def rope(x: Array, base: float = 10000.0) -> Array:
    """Rotary embedding over the last axis of ``x`` [B, T, heads, head_dim] (pairs 2i, 2i+1)."""
    t, d = x.shape[1], x.shape[-1]
    freq = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    ang = jnp.arange(t, dtype=jnp.float32)[:, None] * freq[None]  # [T, d/2]
    cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)


class TinyDiTBlock(nn.Module):
    """One adaLN DiT block; ``__call__(x [B, T, D], c [B, D]) -> [B, T, D]``."""

    dim: int = 128
    heads: int = 4
    mlp: int = 512
    qk_norm: bool = False
    use_rope: bool = False

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        d, nh = self.dim, self.heads
        hd = d // nh
        mod = nn.Dense(6 * d, name="adaLN")(nn.silu(c))[:, None]
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        h = _layernorm(x) * (1 + scale1) + shift1
        q = nn.Dense(d, name="to_q")(h).reshape(*x.shape[:2], nh, hd)
        k = nn.Dense(d, name="to_k")(h).reshape(*x.shape[:2], nh, hd)
        v = nn.Dense(d, name="to_v")(h).reshape(*x.shape[:2], nh, hd)
        if self.qk_norm:
            q = nn.RMSNorm(name="norm_q")(q)
            k = nn.RMSNorm(name="norm_k")(k)
        if self.use_rope:
            q, k = rope(q), rope(k)
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(x.shape)
        x = x + gate1 * nn.Dense(d, name="to_out")(o)
        h2 = _layernorm(x) * (1 + scale2) + shift2
        u = nn.gelu(nn.Dense(self.mlp, name="ff_up")(h2))
        return x + gate2 * nn.Dense(d, name="ff_down")(u)


TIMESTEP_OUTLIER = 4.0


def heavy_tailed(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit-variance heavy-tailed samples: a Gaussian scale mixture ``n1 * exp(n2 / 2)``
    (kurtosis ~ 8, like trained transformer weights)."""
    n1, n2 = rng.standard_normal((2, *shape))
    return (n1 * np.exp(0.5 * n2) / math.e**0.25).astype(np.float32)


def outlier_block(
    seed: int = 0, dim: int = 128, heads: int = 4, mlp: int = 512, tokens: int = 64, batch: int = 2, **block_kw
) -> tuple[TinyDiTBlock, dict, tuple[Array, Array]]:
    """(block, variables, (x, c)) with DiT-like activation outliers (see module docstring).

    Built with numpy from ``seed`` (no compilation; identical on every JAX version).
    """
    block = TinyDiTBlock(dim, heads, mlp, **block_kw)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, tokens, dim)).astype(np.float32)
    hot = rng.choice(dim, max(2, dim // 32), replace=False)
    x[..., hot] *= 25.0  # massive residual channels
    c = rng.standard_normal((batch, dim)).astype(np.float32)
    shapes = jax.eval_shape(block.init, jax.random.key(0), x, c)["params"]
    params: dict = {}
    for name in sorted(shapes):  # trained weights are heavy-tailed (flax's init is a truncated normal)
        params[name] = {k: np.zeros(v.shape, np.float32) for k, v in shapes[name].items()}
        if "kernel" in shapes[name]:
            fan_in = shapes[name]["kernel"].shape[0]
            params[name]["kernel"] = heavy_tailed(rng, shapes[name]["kernel"].shape) * np.float32(
                math.sqrt(0.6 / fan_in)
            )
        if "bias" in shapes[name]:
            params[name]["bias"] = (0.02 * rng.standard_normal(shapes[name]["bias"].shape)).astype(np.float32)
        if "scale" in shapes[name]:
            params[name]["scale"] = np.ones(shapes[name]["scale"].shape, np.float32)
    # modulation: scale1/scale2 amplify a few channels (adaLN), as trained DiTs do ...
    bias = params["adaLN"]["bias"].reshape(6, dim)
    bias[1, hot] = bias[4, hot] = 3.0
    # ... and which channels are amplified depends on the timestep embedding c
    kern = params["adaLN"]["kernel"].reshape(dim, 6, dim)
    tcols = rng.choice(dim, max(4, dim // 8), replace=False)
    boost = TIMESTEP_OUTLIER * rng.standard_normal((dim, len(tcols))) / math.sqrt(dim)
    kern[:, 1, tcols] = boost
    kern[:, 4, tcols] = boost[:, ::-1]
    params["to_v"]["kernel"][:, rng.choice(dim, max(2, dim // 32), replace=False)] *= 12.0  # outlier value columns
    params["ff_up"]["kernel"][:, rng.choice(mlp, max(2, mlp // 64), replace=False)] *= 10.0  # large GELU units
    params = jax.tree.map(jnp.asarray, params)
    return block, {"params": params}, (jnp.asarray(x), jnp.asarray(c))


def outlier_layer(
    seed: int = 0, k: int = 256, n: int = 256, tokens: int = 512, n_outliers: int = 8, scale: float = 30.0
) -> tuple[Array, Array]:
    """(x [tokens, K], W [K, N]) with ``n_outliers`` activation channels ``scale`` x larger
    and correlated (structured) across tokens, and heavy-tailed weights (numpy, seeded)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    ch = rng.choice(k, n_outliers, replace=False)
    common = rng.standard_normal((tokens, 1)).astype(np.float32)
    x[:, ch] = scale * (common + 0.3 * x[:, ch])
    w = heavy_tailed(rng, (k, n)) / np.float32(math.sqrt(k))
    return jnp.asarray(x), jnp.asarray(w)


class OneLayer(nn.Module):
    """A single ``nn.Dense`` named ``layer``: the unit every per-layer table runs through."""

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return nn.Dense(self.features, name="layer")(x)


def one_layer(w: Array, bias: Array | None = None) -> tuple[OneLayer, dict]:
    """(model, variables) of :class:`OneLayer` holding kernel ``w`` [K, N] (zero bias by default)."""
    b = jnp.zeros((w.shape[1],), w.dtype) if bias is None else bias
    return OneLayer(w.shape[1]), {"params": {"layer": {"kernel": w, "bias": b}}}


# Roles of the toy modules: the block's attention and FFN linears as a DiT's, adaLN as its
# modulation, OneLayer's ``layer`` as a linear fed by the (normalized) stream.
ROLE_RULES = (
    ("adaLN", ("modulation",)),
    ("to_[qkv]", ("attn.qkv", "self_attn")),
    ("to_out", ("attn.out", "self_attn")),
    ("ff_up", ("ffn.up",)),
    ("ff_down", ("ffn.down",)),
    ("layer", ("ffn.up",)),
)


def layer_roles(variables: dict) -> dict[str, tuple[str, ...]]:
    """``{kernel path: roles}`` of a :class:`TinyDiTBlock`'s or :class:`OneLayer`'s variables."""
    return assign_roles(variables["params"], ROLE_RULES)
