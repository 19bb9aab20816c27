"""Orthogonal Hadamard matrices for any DiT width, their fast transforms, and the RHT.

Rotating a linear layer's input by an orthogonal ``H`` (``y = (x H)(H^T W)``) spreads
outliers across channels before quantization (QuaRot, QuIP#, SpinQuant). This module
builds a normalized Hadamard matrix (``H H^T = I``, entries ``±1/sqrt(n)``) for every
order it can construct and applies it in ``O(n log n + n * sum(m_i))`` without forming it.

Constructions (all over ±1 integers, normalized only when applied):

* Sylvester: ``H_{2^k}``, applied by the fast Walsh-Hadamard transform (:func:`fwht`).
* Paley I: order ``q + 1`` for a prime power ``q ≡ 3 (mod 4)``.
* Paley II: order ``2 (q + 1)`` for a prime power ``q ≡ 1 (mod 4)``.
* Kronecker products of the above.

For an order ``n`` the search (:func:`hadamard_plan`) picks the Kronecker chain
``F_1 ⊗ ... ⊗ F_r ⊗ H_{2^k}`` of Paley factors times a Sylvester factor with the least
work per element (the sum of the dense factor orders). Where no chain exists (for instance
``n`` odd, or ``n = 2 * odd``), the fallback is block-diagonal: the largest constructible
orders that tile ``n``, each normalized by its own size. It is orthogonal, but not a
Hadamard matrix; :func:`hadamard_construction` and ``HadamardPlan.exact`` say so.

Convention: ``apply_hadamard(x, axis)`` contracts ``x``'s ``axis`` with the *first* index
of ``H``, so for a vector ``x`` it is ``x @ H``, and for a weight ``W`` of shape ``(K, N)``
``apply_hadamard(W, axis=0)`` is ``H^T @ W``: exactly the pair a rotation needs.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "HadamardFactor",
    "HadamardPlan",
    "apply_block_hadamard",
    "online_block",
    "apply_hadamard",
    "apply_rht",
    "fwht",
    "hadamard_construction",
    "hadamard_matrix",
    "hadamard_plan",
    "inverse_rht",
    "kron_split",
    "random_hadamard",
    "rht_signs",
]

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- plans


@dataclasses.dataclass(frozen=True)
class HadamardFactor:
    """One Kronecker factor: ``kind`` is ``"sylvester"``, ``"paley1"`` or ``"paley2"``."""

    kind: str
    order: int
    q: int = 0  # the prime power of a Paley factor; 0 for Sylvester

    def describe(self) -> str:
        if self.kind == "sylvester":
            return f"sylvester({self.order})"
        return f"{self.kind}(q={self.q})"


@dataclasses.dataclass(frozen=True)
class HadamardPlan:
    """How the order-``n`` matrix is built: diagonal blocks, each a Kronecker chain.

    One block means ``H`` is a true Hadamard matrix (``exact``); several blocks mean the
    block-diagonal fallback (orthogonal, entries ``±1/sqrt(block order)``).
    """

    n: int
    blocks: tuple[tuple[HadamardFactor, ...], ...]

    @property
    def exact(self) -> bool:
        return len(self.blocks) == 1

    @property
    def block_orders(self) -> tuple[int, ...]:
        return tuple(math.prod(f.order for f in chain) for chain in self.blocks)

    def describe(self) -> str:
        chains = [" x ".join(f.describe() for f in chain) for chain in self.blocks]
        if self.exact:
            return chains[0]
        parts = " | ".join(f"{c} [{o}]" for c, o in zip(chains, self.block_orders))
        return (
            f"fallback block_diag({parts}): no Hadamard construction of order {self.n} "
            "is known here; orthogonal, but entries are ±1/sqrt(block order)"
        )


def _check_order(n: int, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, e)`` with ``q = p**e`` for a prime ``p``, else ``None``."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _paley_factor(m: int) -> HadamardFactor | None:
    """A Paley construction of order ``m`` if one exists (Paley I preferred, prime q first)."""
    options = []
    pp = _prime_power(m - 1)
    if pp is not None and (m - 1) % 4 == 3:
        options.append(HadamardFactor("paley1", m, m - 1))
    if m % 2 == 0:
        q = m // 2 - 1
        pp2 = _prime_power(q)
        if pp2 is not None and q % 4 == 1:
            options.append(HadamardFactor("paley2", m, q))
    if not options:
        return None
    options.sort(key=lambda f: (_prime_power(f.q)[1] != 1, f.kind))
    return options[0]


def _odd_part(n: int) -> int:
    while n % 2 == 0:
        n //= 2
    return n


@functools.lru_cache(maxsize=None)
def _best_chain(n: int) -> tuple[float, tuple[HadamardFactor, ...]] | None:
    """Cheapest Kronecker chain of Paley factors times one Sylvester factor, or None.

    Cost is the work per element of applying the chain: ``order`` for a dense factor,
    ``log2(order)`` for the Sylvester factor.
    """
    if n & (n - 1) == 0:
        return (math.log2(n), (HadamardFactor("sylvester", n),))
    best: tuple[float, tuple[HadamardFactor, ...]] | None = None
    for a in range(4, n + 1, 4):
        if n % a or _odd_part(a) == 1:
            continue
        factor = _paley_factor(a)
        if factor is None:
            continue
        rest = _best_chain(n // a)
        if rest is None:
            continue
        cost = a + rest[0]
        if best is None or cost < best[0]:
            # Dense factors first (sorted), Sylvester last, so x reshapes to (..., m, 2^k).
            dense = sorted(
                (factor,) + tuple(f for f in rest[1] if f.kind != "sylvester"), key=lambda f: (f.order, f.kind)
            )
            syl = tuple(f for f in rest[1] if f.kind == "sylvester" and f.order > 1)
            best = (cost, tuple(dense) + syl)
    return best


@functools.lru_cache(maxsize=None)
def hadamard_plan(n: int) -> HadamardPlan:
    """The construction used for order ``n`` (exact chain, or block-diagonal fallback)."""
    n = _check_order(n)
    chain = _best_chain(n)
    if chain is not None:
        return HadamardPlan(n, (chain[1],))
    blocks = []
    rest = n
    while rest:
        m = next(m for m in range(rest, 0, -1) if _best_chain(m) is not None)
        blocks.append(_best_chain(m)[1])
        rest -= m
    return HadamardPlan(n, tuple(blocks))


def hadamard_construction(n: int) -> str:
    """Human-readable construction of order ``n``, e.g. ``paley1(q=11) x sylvester(128)``."""
    return hadamard_plan(n).describe()


# ------------------------------------------------------------ finite fields, Paley


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of polynomial ``a`` by monic ``f`` over GF(p); coefficients low to high."""
    a = list(a)
    d = len(f) - 1
    for i in range(len(a) - 1, d - 1, -1):
        c = a[i] % p
        if c:
            for t in range(d + 1):
                a[i - d + t] = (a[i - d + t] - c * f[t]) % p
    return [c % p for c in a[:d]]


def _irreducible(p: int, e: int) -> list[int]:
    """The first monic irreducible polynomial of degree ``e`` over GF(p) (by trial division)."""

    def monic(deg: int):
        for code in range(p**deg):
            yield [(code // p**i) % p for i in range(deg)] + [1]

    for f in monic(e):
        if f[0] == 0:
            continue
        if all(any(_poly_mod(f, g, p)) for d in range(1, e // 2 + 1) for g in monic(d)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")


def _field_chi_and_diff(q: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadratic character over GF(q) and the table ``diff[i, j] = index(e_i - e_j)``.

    Element ``i`` is the polynomial whose base-p digits of ``i`` are its coefficients.
    """
    pp = _prime_power(q)
    if pp is None:
        raise ValueError(f"q={q} is not a prime power")
    p, e = pp
    if e == 1:
        idx = np.arange(q)
        squares = (idx * idx) % q
        diff = np.subtract.outer(idx, idx) % q
    else:
        f = np.array(_irreducible(p, e))
        digits = (np.arange(q)[:, None] // p ** np.arange(e)[None, :]) % p  # (q, e)
        prod = np.zeros((q, 2 * e - 1), dtype=np.int64)
        for i in range(e):
            for j in range(e):
                prod[:, i + j] += digits[:, i] * digits[:, j]
        for k in range(2 * e - 2, e - 1, -1):  # reduce by the monic f, highest degree first
            c = prod[:, k] % p
            prod[:, k - e : k + 1] -= c[:, None] * f[None, :]
        weights = p ** np.arange(e)
        squares = (prod[:, :e] % p) @ weights
        diff = ((digits[:, None, :] - digits[None, :, :]) % p) @ weights
    chi = -np.ones(q, dtype=np.int8)
    chi[squares] = 1
    chi[0] = 0
    return chi, diff


def _jacobsthal(q: int) -> np.ndarray:
    chi, diff = _field_chi_and_diff(q)
    return chi[diff]


@functools.lru_cache(maxsize=None)
def _factor_matrix(factor: HadamardFactor) -> np.ndarray:
    """The unnormalized ±1 matrix of one factor (int8, read-only)."""
    if factor.kind == "sylvester":
        h = np.ones((1, 1), dtype=np.int8)
        h2 = np.array([[1, 1], [1, -1]], dtype=np.int8)
        while h.shape[0] < factor.order:
            h = np.kron(h, h2)
    elif factor.kind == "paley1":
        q = factor.q
        s = np.zeros((q + 1, q + 1), dtype=np.int8)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        h = s + np.eye(q + 1, dtype=np.int8)
    elif factor.kind == "paley2":
        q = factor.q
        c = np.zeros((q + 1, q + 1), dtype=np.int8)
        c[0, 1:] = 1
        c[1:, 0] = 1
        c[1:, 1:] = _jacobsthal(q)
        h = np.kron(c, np.array([[1, 1], [1, -1]], dtype=np.int8)) + np.kron(
            np.eye(q + 1, dtype=np.int8), np.array([[1, -1], [-1, -1]], dtype=np.int8)
        )
    else:
        raise ValueError(f"unknown Hadamard factor kind {factor.kind!r}")
    h = np.ascontiguousarray(h, dtype=np.int8)
    h.flags.writeable = False
    return h


def _chain_matrix(chain: tuple[HadamardFactor, ...]) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int8)
    for f in chain:
        h = np.kron(h, _factor_matrix(f))
    return h


def kron_factors(n: int) -> list[np.ndarray] | None:
    """The unnormalized ±1 int8 factors of :func:`hadamard_matrix` ``(n)`` in Kronecker order
    (``kron(*factors) * n**-0.5`` is the matrix), each Sylvester factor split into order-2 ones
    so a kernel can regroup them; None for the block-diagonal fallback."""
    plan = hadamard_plan(n)
    if not plan.exact:
        return None
    out = []
    for f in plan.blocks[0]:
        if f.kind == "sylvester":
            out += [_factor_matrix(HadamardFactor("sylvester", 2))] * (f.order.bit_length() - 1)
        else:
            out.append(_factor_matrix(f))
    return out


def kron_split(n: int, inner_max: int = 256) -> tuple[np.ndarray, np.ndarray] | None:
    """``(outer, inner)`` unnormalized ±1 int8 matrices with ``kron(outer, inner) * n**-0.5``
    equal to :func:`hadamard_matrix` ``(n)``, the inner one a Sylvester matrix of order at
    most ``inner_max`` (at least 16, or ``n``): the split a kernel uses to apply ``H`` as a
    dense product on the row's last axis and a small mix across its leading blocks. None where
    the plan is the block-diagonal fallback or does not end in a Sylvester factor of order >= 16
    (n itself < 16 aside).
    """
    plan = hadamard_plan(n)
    if not plan.exact:
        return None
    chain = plan.blocks[0]
    last = chain[-1]
    if last.kind != "sylvester" or (last.order < 16 and last.order != n):
        return None
    b = min(last.order, inner_max)
    outer = _chain_matrix(chain[:-1]) if len(chain) > 1 else np.ones((1, 1), np.int8)
    rest = last.order // b
    if rest > 1:
        outer = np.kron(outer, _factor_matrix(HadamardFactor("sylvester", rest)))
    inner = _factor_matrix(HadamardFactor("sylvester", b))
    return outer, inner


def hadamard_matrix(n: int, dtype=jnp.float32) -> jax.Array:
    """The normalized order-``n`` matrix of :func:`hadamard_plan` (``H @ H.T = I``).

    Dense: ``n*n`` elements (1.4 GB in fp32 at ``n = 18944``). Prefer
    :func:`apply_hadamard` for activations; it applies the same matrix without forming it.
    """
    plan = hadamard_plan(n)
    out = np.zeros((plan.n, plan.n), dtype=np.float32)
    start = 0
    for chain, order in zip(plan.blocks, plan.block_orders):
        block = out[start : start + order, start : start + order]
        np.multiply(_chain_matrix(chain), np.float32(1.0 / math.sqrt(order)), out=block)
        start += order
    return jnp.asarray(out, dtype=dtype)


# ---------------------------------------------------------------- fast transforms


def _float_dtype(x: jax.Array, name: str) -> jnp.dtype:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    return jnp.promote_types(x.dtype, jnp.float32)


def _axis(x: jax.Array, axis: int, name: str) -> int:
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{name}: axis {axis} is out of range for an array of rank {x.ndim}")
    return axis % x.ndim


def _fwht_last(x: jax.Array, normalize: bool) -> jax.Array:
    """Unrolled butterflies over the last axis (a power of two), Sylvester order."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, n)
        h *= 2
    if normalize and n > 1:
        x = x * jnp.asarray(1.0 / math.sqrt(n), x.dtype)
    return x


@functools.partial(jax.jit, static_argnames=("axis", "normalize"))
def fwht(x: jax.Array, axis: int = -1, normalize: bool = True) -> jax.Array:
    """Fast Walsh-Hadamard transform along ``axis`` (length a power of two), O(n log n).

    Equals ``x @ hadamard_matrix(n)`` along ``axis`` (Sylvester order; the matrix is
    symmetric). ``normalize=False`` skips the ``1/sqrt(n)`` scale. Computes in at least
    fp32 and returns ``x.dtype``.
    """
    x = jnp.asarray(x)
    compute = _float_dtype(x, "fwht: x")
    axis = _axis(x, axis, "fwht")
    n = x.shape[axis]
    if n & (n - 1):
        raise ValueError(f"fwht: length {n} along axis {axis} is not a power of two")
    y = _fwht_last(jnp.moveaxis(x, axis, -1).astype(compute), normalize)
    return jnp.moveaxis(y, -1, axis).astype(x.dtype)


def _apply_chain_last(x: jax.Array, chain: tuple[HadamardFactor, ...], transpose: bool) -> jax.Array:
    """``x @ kron(chain)`` (or its transpose) over the last axis, factor by factor."""
    order = x.shape[-1]
    lead = x.shape[:-1]
    dims = tuple(f.order for f in chain)
    x = x.reshape(*lead, *dims)
    r = len(dims)
    for i, f in enumerate(chain):
        ax = x.ndim - r + i
        if f.kind == "sylvester":
            x = jnp.moveaxis(_fwht_last(jnp.moveaxis(x, ax, -1), normalize=False), -1, ax)
            continue
        m = _factor_matrix(f)
        m = m.T if transpose else m
        mat = jnp.asarray(m, dtype=x.dtype)
        x = jnp.moveaxis(jnp.matmul(jnp.moveaxis(x, ax, -1), mat, precision=_HIGHEST), -1, ax)
    x = x.reshape(*lead, order)
    return x * jnp.asarray(1.0 / math.sqrt(order), x.dtype)


@functools.partial(jax.jit, static_argnames=("axis", "transpose"))
def apply_hadamard(x: jax.Array, axis: int = -1, *, transpose: bool = False) -> jax.Array:
    """``x @ H`` along ``axis`` for ``H = hadamard_matrix(n)``, without forming ``H``.

    ``transpose=True`` applies ``H^T`` (the inverse). Cost ``O(n log n + n * sum(m_i))``
    per vector. Computes in at least fp32 and returns ``x.dtype``; jit-able.
    """
    x = jnp.asarray(x)
    compute = _float_dtype(x, "apply_hadamard: x")
    axis = _axis(x, axis, "apply_hadamard")
    plan = hadamard_plan(x.shape[axis])
    y = jnp.moveaxis(x, axis, -1).astype(compute)
    pieces, start = [], 0
    for chain, order in zip(plan.blocks, plan.block_orders):
        pieces.append(_apply_chain_last(y[..., start : start + order], chain, transpose))
        start += order
    y = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)
    return jnp.moveaxis(y, -1, axis).astype(x.dtype)


def apply_block_hadamard(x: jax.Array, block: int | None, axis: int = -1, *, transpose: bool = False) -> jax.Array:
    """``x @ blockdiag(H_b, ..., H_b)`` along ``axis``: independent order-``block`` Hadamards on
    consecutive channel groups (orthogonal; the rotation one producer tile of ``block`` channels
    can apply on its own). ``block=None`` or ``block >= n`` is :func:`apply_hadamard` over the
    whole axis. ``block`` must divide the axis length. Same dtype rules as :func:`apply_hadamard`.
    """
    x = jnp.asarray(x)
    axis = _axis(x, axis, "apply_block_hadamard")
    n = x.shape[axis]
    if block is None or block >= n:
        return apply_hadamard(x, axis, transpose=transpose)
    block = _check_order(block, "block")
    if n % block:
        raise ValueError(f"apply_block_hadamard: length {n} along axis {axis} is not a multiple of block {block}")
    y = jnp.moveaxis(x, axis, -1)
    y = apply_hadamard(y.reshape(*y.shape[:-1], n // block, block), -1, transpose=transpose)
    return jnp.moveaxis(y.reshape(*y.shape[:-2], n), -1, axis)


def online_block(rotation: bool | int) -> int | None:
    """The block order an online-rotation flag asks for: ``True`` is the full width (None), an
    int ``b`` the block-diagonal rotation of order ``b`` (``QuaRotConfig.online_block``). The
    dispatch and the activation quantizer take either flag."""
    if rotation is True:
        return None
    if isinstance(rotation, bool) or not isinstance(rotation, int) or rotation < 1:
        raise ValueError(f"online rotation: expected True or a block order >= 1, got {rotation!r}")
    return rotation


# ------------------------------------------------------- randomized Hadamard (RHT)


@functools.lru_cache(maxsize=256)
def _rht_signs_np(n: int, seed: int) -> np.ndarray:
    with jax.ensure_compile_time_eval(), jax.threefry_partitionable(True):
        key = jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), n)
        signs = np.asarray(jax.random.rademacher(key, (n,), dtype=jnp.int32), dtype=np.int8)
    signs.flags.writeable = False
    return signs


def rht_signs(n: int, seed: int, dtype=jnp.float32) -> jax.Array:
    """The RHT's ±1 diagonal: Rademacher signs from ``(seed, n)``.

    Key derivation is pinned so it is reproducible across runs, machines and JAX configs:
    ``fold_in(key(seed, impl="threefry2x32"), n)`` under ``threefry_partitionable(True)``,
    evaluated eagerly (also when called under ``jit``) and cached.
    """
    n = _check_order(n)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return jnp.asarray(_rht_signs_np(n, int(seed)), dtype=dtype)


def random_hadamard(n: int, seed: int, dtype=jnp.float32) -> jax.Array:
    """Dense randomized Hadamard ``R = diag(s) @ H`` (orthogonal); ``x @ R == apply_rht(x)``."""
    signs = rht_signs(n, seed, jnp.float32)
    return (signs[:, None] * hadamard_matrix(n, jnp.float32)).astype(dtype)


def _signs_along(x: jax.Array, axis: int, seed: int, dtype) -> jax.Array:
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return rht_signs(x.shape[axis], seed, dtype).reshape(shape)


def apply_rht(x: jax.Array, seed: int, axis: int = -1) -> jax.Array:
    """Randomized Hadamard transform ``x @ diag(s) @ H`` along ``axis``."""
    x = jnp.asarray(x)
    compute = _float_dtype(x, "apply_rht: x")
    axis = _axis(x, axis, "apply_rht")
    y = x.astype(compute) * _signs_along(x, axis, seed, compute)
    return apply_hadamard(y, axis).astype(x.dtype)


def inverse_rht(y: jax.Array, seed: int, axis: int = -1) -> jax.Array:
    """Inverse of :func:`apply_rht`: ``y @ H^T @ diag(s)``."""
    y = jnp.asarray(y)
    compute = _float_dtype(y, "inverse_rht: y")
    axis = _axis(y, axis, "inverse_rht")
    x = apply_hadamard(y.astype(compute), axis, transpose=True)
    return (x * _signs_along(y, axis, seed, compute)).astype(y.dtype)
