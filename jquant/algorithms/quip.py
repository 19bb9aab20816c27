"""QuIP# (Tseng et al. 2024): RHT incoherence on both sides + the E8P lattice codebook, 2 bits/weight.

**Incoherence.** ``W~ = U^T W V`` with randomized Hadamards ``U = D_K H_K``, ``V = D_N H_N``
(:mod:`jquant.hadamard`; signs from seeds) makes the weight entries roughly
i.i.d. Gaussian, the regime where a lattice codebook is near optimal. The Hessian follows
the input side: ``H~ = U^T H U``.

**E8P codebook** (QuIP#'s "E8P12"): 8-dimensional vectors, one 16-bit code each (2 bits
per weight):

* ``D8^ = {x in (Z + 1/2)^8 : sum(x) even}``; its points with ``||x||^2 <= 10`` have 227
  distinct *absolute-value patterns*. 29 patterns of norm^2 12 (five entries 3/2, three
  1/2) fill the table to 256. (QuIP# hand-picks these 29 of the 56 candidates, listing
  one twice; here they are the first 29 in lexicographic order of the positions of the
  1/2 entries, so codes are not bit-compatible with QuIP# checkpoints; the mean squared
  error is the same to three digits on Gaussian data.)
* A code is ``abs index (8 bits) | signs of coordinates 1..7 (7 bits) | shift (1 bit)``;
  coordinate 0's sign is implied by parity (the number of negated coordinates must make
  the sum even: even for patterns with an even entry sum, odd otherwise), and the shift
  adds +1/4 or -1/4 to every coordinate. The 2^16 codewords are a subset of ``E8 + 1/4``.
* Nearest codeword, exactly, without enumerating 2^16 points: for each shift, with
  ``y = x -+ 1/4``, the best signs of pattern ``a`` are ``sign(y)`` and score
  ``sum_j a_j |y_j|``; if the parity is wrong, the cheapest fix flips the coordinate with
  the smallest ``a_j |y_j|``. So each vector costs 2 x 256 x 8 work.

**LDLQ** (optional, with a Hessian): QuIP's GPTQ-like feedback with 8-row blocks. With
``H~ = C C^T`` (Cholesky) and ``L = C diag(C_kk)^{-1}`` unit block-lower-triangular,
``tr(E^T H~ E) = sum_k ||C_kk^T Z_k||^2`` for ``Z = L^T E``; processing blocks from the last
to the first, ``W^_k = Q(W~_k + sum_{j>k} L_jk^T (W~_j - W^_j))`` leaves only block k's own
rounding error in ``Z_k``.

The result is an :class:`E8PArray` leaf (codes uint16 [K/8, N], one fp32 scale, the two
RHT seeds as static metadata); ``dequantize`` decodes with a gather and undoes both RHTs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant import policy as pol
from jquant.algorithms.linear_tree import Variables, float_paths, get_kernel, hessian, update_layer
from jquant.algorithms.vq import DIM, RowVectorArray, check_rows, diagonal_blocks, from_row_vectors, row_vectors
from jquant.hadamard import apply_rht, inverse_rht
from jquant.policy import Policy
from jquant.transform import Context, Transform

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=1)
def e8p_abs_grid() -> np.ndarray:
    """The 256 absolute-value patterns [256, 8] of the E8P codebook (float32, multiples of 1/2)."""
    # every |x| pattern of half-integers is reached by some x with an even sum (negating
    # one entry changes the parity), so the patterns are those of norm^2 <= 10
    mags = np.stack(np.meshgrid(*[np.arange(4) + 0.5] * DIM, indexing="ij"), -1).reshape(-1, DIM)
    small = np.unique(mags[(mags**2).sum(1) <= 10], axis=0)  # 227 patterns, lexicographic
    extra = []
    for ones in itertools.combinations(range(DIM), 3):
        v = np.full(DIM, 1.5)
        v[list(ones)] = 0.5
        extra.append(v)
    grid = np.concatenate([small, np.array(extra[: 256 - len(small)])]).astype(np.float32)
    grid.flags.writeable = False
    return grid


@functools.lru_cache(maxsize=1)
def _odd_parity() -> np.ndarray:
    """1 where a pattern's entry sum is odd (it then needs an odd number of negations)."""
    return (np.round(e8p_abs_grid().sum(1)).astype(np.int64) % 2).astype(np.int32)


def e8p_decode(codes: Array) -> Array:
    """Codewords [..., 8] of 16-bit codes [...]."""
    c = codes.astype(jnp.int32)
    idx, bits, shift = c >> 8, (c >> 1) & 0x7F, c & 1
    grid = jnp.asarray(e8p_abs_grid())
    absv = grid[idx]
    neg = (bits[..., None] >> jnp.arange(7)) & 1  # coordinates 1..7
    neg0 = (jnp.sum(neg, -1) + jnp.asarray(_odd_parity())[idx]) % 2
    neg = jnp.concatenate([neg0[..., None], neg], -1)
    sign = 1.0 - 2.0 * neg.astype(jnp.float32)
    return absv * sign + jnp.where(shift[..., None] == 1, 0.25, -0.25)


def _nearest_shifted(y: Array) -> tuple[Array, Array, Array]:
    """Best (score, abs index, negation mask) of ``y`` [V, 8] over D8^-sign patterns."""
    grid = jnp.asarray(e8p_abs_grid())
    norms = jnp.sum(grid**2, -1)
    ay = jnp.abs(y)
    contrib = ay[:, None, :] * grid[None]  # [V, 256, 8]
    neg = (y < 0).astype(jnp.int32)
    mismatch = (jnp.sum(neg, -1)[:, None] + jnp.asarray(_odd_parity())[None]) % 2  # [V, 256]
    flip = jnp.argmin(contrib, -1)  # coordinate to flip if the parity is wrong
    score = 2.0 * (jnp.sum(contrib, -1) - 2.0 * mismatch * jnp.min(contrib, -1)) - norms  # larger is closer
    best = jnp.argmax(score, -1)
    take = lambda a: jnp.take_along_axis(a, best[:, None], 1)[:, 0]  # noqa: E731
    negmask = neg ^ (take(mismatch)[:, None] * (jnp.arange(DIM)[None] == take(flip)[:, None]))
    return jnp.max(score, -1) - jnp.sum(y**2, -1), best, negmask


@jax.jit
def e8p_quantize(x: Array) -> Array:
    """Nearest E8P codeword of each row of ``x`` [V, 8]: 16-bit codes [V] (uint16)."""
    sp, ip, np_ = _nearest_shifted(x - 0.25)
    sm, im, nm = _nearest_shifted(x + 0.25)
    plus = sp >= sm
    idx = jnp.where(plus, ip, im)
    neg = jnp.where(plus[:, None], np_, nm)
    bits = jnp.sum(neg[:, 1:] << jnp.arange(7), -1)
    return ((idx << 8) | (bits << 1) | plus.astype(jnp.int32)).astype(jnp.uint16)


def _quantize_rows(w: Array) -> tuple[Array, Array]:
    """codes [K/8, N] and decoded values [K, N] of 8-row blocks of ``w`` (unit scale)."""
    k, n = w.shape
    vecs = row_vectors(w).reshape(-1, DIM)
    codes = jax.lax.map(e8p_quantize, vecs.reshape(-1, min(vecs.shape[0], 4096), DIM)).reshape(-1)
    dec = from_row_vectors(e8p_decode(codes).reshape(k // DIM, n, DIM))
    return codes.reshape(k // DIM, n), dec


@jax.tree_util.register_pytree_node_class
class E8PArray(RowVectorArray):
    """QuIP# weight: E8P codes of the incoherent ``W~ / scale`` plus the RHT seeds."""

    def __init__(self, codes: Array, scale: Array, k_seed: int, n_seed: int, dtype=jnp.float32):
        self.codes, self.scale = codes, scale
        self.k_seed, self.n_seed, self.dtype = int(k_seed), int(n_seed), jnp.dtype(dtype)

    def tree_flatten(self):
        return (self.codes, self.scale), (self.k_seed, self.n_seed, jnp.dtype(self.dtype).name)

    def dequantize(self, dtype=None) -> Array:
        wt = from_row_vectors(e8p_decode(self.codes)) * self.scale.astype(jnp.float32)
        w = inverse_rht(inverse_rht(wt, self.k_seed, axis=0), self.n_seed, axis=1)
        return w.astype(self.dtype if dtype is None else dtype)


def incoherent(w: Array, k_seed: int, n_seed: int) -> Array:
    """``U^T W V`` with ``U = D_K H_K``, ``V = D_N H_N``."""
    return apply_rht(apply_rht(jnp.asarray(w, jnp.float32), k_seed, axis=0), n_seed, axis=1)


def _ldl_blocks(h: Array) -> Array:
    """``L`` (unit block-lower-triangular, 8x8 blocks) of ``H = L D L^T``."""
    c = jnp.linalg.cholesky(h)
    k = h.shape[0]
    inv = jnp.linalg.inv(diagonal_blocks(c))  # [nb, 8, 8]
    return jnp.einsum("iajb,jbc->iajc", c.reshape(k // DIM, DIM, k // DIM, DIM), inv).reshape(k, k)


@jax.jit
def _ldlq(wt: Array, lmat: Array) -> tuple[Array, Array]:
    """LDLQ over 8-row blocks, last block first: (codes [K/8, N], decoded [K, N])."""
    k, n = wt.shape
    nb = k // DIM

    def body(carry, blk):
        err = carry
        rows = jax.lax.dynamic_slice_in_dim(lmat, blk * DIM, DIM, axis=1)  # L[:, block] [K, 8]
        fb = jnp.matmul(rows.T, err, precision=_HI)  # sum_{j>k} L_jk^T E_j (E_j = 0 for j <= k)
        target = jax.lax.dynamic_slice_in_dim(wt, blk * DIM, DIM, axis=0) + fb
        codes = e8p_quantize(target.T)
        q = e8p_decode(codes).T
        err = jax.lax.dynamic_update_slice_in_dim(
            err, jax.lax.dynamic_slice_in_dim(wt, blk * DIM, DIM, 0) - q, blk * DIM, 0
        )
        return err, (codes, q)

    _, (codes, q) = jax.lax.scan(body, jnp.zeros_like(wt), jnp.arange(nb - 1, -1, -1))
    return codes[::-1], q[::-1].reshape(k, n)


@dataclasses.dataclass(frozen=True)
class QuIPConfig:
    """QuIP# options: layers by module-path regex, LDLQ on/off, RHT seeds, scale search."""

    pattern: str = ".*"
    ldlq: bool = True
    damp: float = 1e-2
    seed: int = 0
    scales: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.2, 1.3)


def quip_weight(
    w: Array, h: Array | None = None, config: QuIPConfig = QuIPConfig(), *, path: str = "layer"
) -> E8PArray:
    """QuIP#-quantize one kernel [K, N] (K a multiple of 8); ``h`` = ``X^T X`` for LDLQ
    and for choosing the scale by output error (else by weight error)."""
    check_rows(w, path, "QuIP#")
    k, n = w.shape
    ks, ns = config.seed, config.seed + 1
    wt = incoherent(w, ks, ns)
    sigma = jnp.sqrt(jnp.mean(wt**2))
    ht = None
    if h is not None:
        ht = incoherent(h, ks, ks)
        ht = ht + config.damp * jnp.mean(jnp.diag(ht)) * jnp.eye(k)
    lmat = _ldl_blocks(ht) if (config.ldlq and ht is not None) else None
    best = None
    for c in config.scales:
        scale = sigma / c
        codes, q = _ldlq(wt / scale, lmat) if lmat is not None else _quantize_rows(wt / scale)
        d = wt - q * scale
        err = float(jnp.sum(d * jnp.matmul(ht, d, precision=_HI)) if ht is not None else jnp.sum(d**2))
        if best is None or err < best[0]:
            best = (err, codes, scale)
    if not np.isfinite(best[0]):
        raise ValueError(f"{path}: QuIP# produced a non-finite error (Hessian not positive definite? raise damp)")
    return E8PArray(best[1], jnp.asarray(best[2], jnp.float32), ks, ns, dtype=w.dtype)


def quip(variables: Variables, stats: Any, config: QuIPConfig = QuIPConfig()) -> dict:
    """QuIP# every float kernel whose module path matches ``config.pattern``.

    ``stats`` (``{kernel path: LayerStats}``) enables LDLQ and output-error scale choice;
    ``None`` quantizes data-free.
    """
    out = dict(variables)
    for path in float_paths(variables, config.pattern, "quip"):
        w = get_kernel(out, path)
        h = None if stats is None else hessian(stats, path)
        out = update_layer(out, path, kernel=quip_weight(w, h, config, path=path))
    return out


def transform(policy: Policy, ldlq: bool = True) -> Transform:
    """QuIP# (two-sided RHT + E8P lattice codebook, 2 bits/weight, LDLQ on trajectory
    Hessians) on the layers the policy quantizes (the policy's specs are not used)."""

    def fn(v: Variables, ctx: Context) -> Variables:
        mods = [p[: -len("/kernel")] for p, prec in policy.plan(ctx.roles).items() if prec not in (None, pol.BF16)]
        pattern = "^(?:" + "|".join(re.escape(m) for m in mods) + ")$"
        return quip(v, ctx.stats(v) if ldlq else None, QuIPConfig(pattern=pattern, ldlq=ldlq))

    return Transform(f"quip[{policy.name}]", fn, ldlq)
