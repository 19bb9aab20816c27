"""AQLM (Egiazarian et al. 2024): additive codebooks over 8-dim weight vectors.

A kernel W [K, N] is cut into vectors of 8 consecutive input rows (``W[8g:8g+8, n]``).
Each column gets a scale ``s_n`` (its RMS) and each vector is approximated by a *sum* of
``M`` codewords, one from each of ``M`` learned codebooks of ``2^B`` vectors:

    W[8g:8g+8, n] ~ s_n * sum_m C_m[b_{g,n,m}]

(``M * B`` bits per 8 weights: M=2, B=8 is 2 bits/weight before the codebooks' and
scales' overhead). The objective is the layer output error ``tr(dW^T H dW)``, restricted to
the 8x8 diagonal blocks ``H_gg`` of the Hessian (block-Jacobi; exact cross-group terms
would couple every code of a column). The alternation:

* **init**: residual k-means, one codebook after the other.
* **codes by beam search**: per vector, keep the ``beam`` best code tuples; for each
  codebook in turn, try all ``2^B`` replacements of that code in every beam entry
  (``err = r^T G r - 2 c^T G r + c^T G c`` for the residual ``r`` without that codebook's
  term), drop duplicate tuples, keep the best ``beam``.
* **codebooks by least squares**: with codes fixed the reconstruction is linear in the
  codebook entries; the normal equations
  ``sum_v s_v^2 (o_v o_v^T (x) G_v) c = sum_v s_v^2 o_v (x) G_v u_v`` (``o_v`` the one-hot
  code indicator, ``u_v = w_v / s_v``) are solved exactly, with a tiny ridge that keeps
  unused codewords where they were.

The result is an :class:`AQLMArray` leaf; ``dequantize`` is a gather and a sum (XLA).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant.algorithms.linear_tree import Variables, float_paths, get_kernel, hessian, update_layer
from jquant.algorithms.vq import DIM, RowVectorArray, check_rows, diagonal_blocks, from_row_vectors, row_vectors

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST


@jax.tree_util.register_pytree_node_class
class AQLMArray(RowVectorArray):
    """Codes [K/8, N, M], codebooks [M, 2^B, 8], per-column scales [N]."""

    def __init__(self, codes: Array, codebooks: Array, scales: Array, bits: int, dtype=jnp.float32):
        self.codes, self.codebooks, self.scales = codes, codebooks, scales
        self.bits, self.dtype = int(bits), jnp.dtype(dtype)

    def tree_flatten(self):
        return (self.codes, self.codebooks, self.scales), (self.bits, jnp.dtype(self.dtype).name)

    def nominal_bits(self) -> float:
        """Codes at ``B`` bits each plus the codebooks and scales at their stored width."""
        codes = self.codes.size * self.bits
        return float(
            codes
            + 8 * (self.codebooks.size * self.codebooks.dtype.itemsize + self.scales.size * self.scales.dtype.itemsize)
        )

    def dequantize(self, dtype=None) -> Array:
        vec = _reconstruct(self.codes.astype(jnp.int32), self.codebooks.astype(jnp.float32))  # [K/8, N, 8]
        w = from_row_vectors(vec) * self.scales.astype(jnp.float32)[None, :]
        return w.astype(self.dtype if dtype is None else dtype)


def _reconstruct(codes: Array, books: Array) -> Array:
    """sum_m books[m][codes[..., m]] -> [..., 8]."""
    return sum(books[m][codes[..., m]] for m in range(books.shape[0]))


# --- k-means init -----------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("size", "iters"))
def _kmeans(x: Array, key: Array, size: int, iters: int) -> tuple[Array, Array]:
    """Lloyd's k-means of rows of x [V, 8]: (centers [size, 8], assignment [V])."""
    centers = x[jax.random.choice(key, x.shape[0], (size,), replace=x.shape[0] < size)]

    def assign(c):
        d = jnp.sum(x**2, 1)[:, None] - 2 * jnp.matmul(x, c.T, precision=_HI) + jnp.sum(c**2, 1)[None]
        return jnp.argmin(d, 1)

    def step(c, _):
        a = assign(c)
        s = jax.ops.segment_sum(x, a, size)
        n = jax.ops.segment_sum(jnp.ones(x.shape[0]), a, size)
        return jnp.where(n[:, None] > 0, s / jnp.maximum(n, 1)[:, None], c), None

    centers, _ = jax.lax.scan(step, centers, None, length=iters)
    return centers, assign(centers)


# --- beam search ---------------------------------------------------------------------------------------
def _beam_chunk(u: Array, g: Array, codes: Array, books: Array, beam: int, sweeps: int) -> Array:
    """Best code tuple per vector; u [V, 8], g [V, 8, 8], codes [V, M] (start)."""
    m_books, size, _ = books.shape
    v = u.shape[0]
    beams = jnp.broadcast_to(codes[:, None, :], (v, beam, m_books))
    errs = jnp.full((v, beam), jnp.inf).at[:, 0].set(0.0)  # only the start is real
    cgc = jnp.einsum("mia,vab,mib->vmi", books, g, books, precision=_HI)  # [V, M, 2^B]
    radix = jnp.asarray([size**i for i in range(m_books)], jnp.int32)
    for _ in range(sweeps):
        for m in range(m_books):
            r = u[:, None, :] - _reconstruct(beams, books) + books[m][beams[..., m]]  # [V, b, 8]
            gr = jnp.einsum("vab,vkb->vka", g, r, precision=_HI)
            err = (
                jnp.sum(r * gr, -1)[..., None]
                - 2 * jnp.einsum("ia,vka->vki", books[m], gr, precision=_HI)
                + cgc[:, m][:, None, :]
            )
            err = jnp.where(jnp.isinf(errs)[..., None], jnp.inf, err).reshape(v, -1)  # [V, b * 2^B]
            cand = (
                jnp.broadcast_to(beams[:, :, None, :], (v, beam, size, m_books))
                .at[..., m]
                .set(jnp.arange(size)[None, None, :])
            )
            cand = cand.reshape(v, -1, m_books)
            key = jnp.sum(cand * radix, -1)
            order = jnp.argsort(key, axis=1)
            key_s = jnp.take_along_axis(key, order, 1)
            dup = jnp.concatenate([jnp.zeros((v, 1), bool), key_s[:, 1:] == key_s[:, :-1]], 1)
            err = jnp.take_along_axis(err, order, 1)
            err = jnp.where(dup, jnp.inf, err)
            neg, top = jax.lax.top_k(-err, beam)
            beams = jnp.take_along_axis(jnp.take_along_axis(cand, order[..., None], 1), top[..., None], 1)
            errs = -neg
    return beams[:, 0]


@functools.partial(jax.jit, static_argnames=("beam", "sweeps", "chunk"))
def _beam_search(u: Array, g: Array, codes: Array, books: Array, beam: int, sweeps: int, chunk: int) -> Array:
    n = u.shape[0]
    pad = (-n) % chunk
    padded = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in (u, g, codes)]
    resh = [a.reshape(-1, chunk, *a.shape[1:]) for a in padded]
    out = jax.lax.map(lambda t: _beam_chunk(*t, books, beam, sweeps), tuple(resh))
    return out.reshape(-1, codes.shape[-1])[:n]


# --- least-squares codebook update ----------------------------------------------------------------------
@jax.jit
def _ls_update(u: Array, gblk: Array, w2: Array, codes: Array, books: Array) -> Array:
    """Exact least-squares codebooks for fixed codes.

    u [nb, N, 8] normalized vectors, gblk [nb, 8, 8] metrics, w2 [N] = s_n^2,
    codes [nb, N, M].
    """
    m_books, size, _ = books.shape
    p = m_books * size
    nb, n, _ = u.shape
    flat = codes + (jnp.arange(m_books) * size)[None, None, :]  # global codeword index
    gi = jnp.broadcast_to(jnp.arange(nb)[:, None, None, None], (nb, n, m_books, m_books))
    pi = jnp.broadcast_to(flat[..., :, None], gi.shape)
    qi = jnp.broadcast_to(flat[..., None, :], gi.shape)
    wts = jnp.broadcast_to(w2[None, :, None, None], gi.shape)
    mg = jnp.zeros((nb, p, p)).at[gi, pi, qi].add(wts)
    a = jnp.einsum("gpq,gab->paqb", mg, gblk, precision=_HI).reshape(p * DIM, p * DIM)
    gu = jnp.einsum("gab,gnb->gna", gblk, u, precision=_HI) * w2[None, :, None]  # [nb, N, 8]
    rhs = jnp.zeros((p, DIM))
    for m in range(m_books):
        rhs = rhs.at[flat[..., m].reshape(-1)].add(gu.reshape(-1, DIM))
    lam = 1e-6 * jnp.trace(a) / (p * DIM) + 1e-12
    c = jnp.linalg.solve(a + lam * jnp.eye(p * DIM), rhs.reshape(-1) + lam * books.reshape(-1))
    return c.reshape(m_books, size, DIM)


# --- the method ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AQLMConfig:
    """AQLM options.

    Attributes:
      pattern: regex over module paths of the layers to quantize.
      num_codebooks / bits: ``M`` codebooks of ``2^B`` 8-dim vectors (``M * B / 8`` bits/weight).
      beam / sweeps: beam width and passes over the codebooks per beam search.
      iters: (least squares, beam search) rounds after the k-means init.
      kmeans_iters: Lloyd iterations per codebook at init.
      damp: Hessian damping (relative to its mean diagonal).
      codebook_dtype / scale_dtype: storage dtypes.
    """

    pattern: str = ".*"
    num_codebooks: int = 2
    bits: int = 8
    beam: int = 4
    sweeps: int = 1
    iters: int = 3
    kmeans_iters: int = 10
    damp: float = 1e-2
    seed: int = 0
    codebook_dtype: str = "float16"
    scale_dtype: str = "float16"
    chunk: int = 2048

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 16 or self.num_codebooks < 1 or self.beam < 1:
            raise ValueError(f"AQLMConfig: need 1 <= bits <= 16, num_codebooks >= 1, beam >= 1; got {self}")


def _block_metric(h: Array | None, k: int) -> Array:
    if h is None:
        return jnp.broadcast_to(jnp.eye(DIM), (k // DIM, DIM, DIM))
    g = diagonal_blocks(h)
    return g / jnp.mean(jnp.diagonal(g, axis1=1, axis2=2))


def aqlm_weight(
    w: Array, h: Array | None = None, config: AQLMConfig = AQLMConfig(), *, path: str = "layer"
) -> tuple[AQLMArray, list[float]]:
    """AQLM-quantize one kernel [K, N] (K a multiple of 8); ``h`` = the layer's ``X^T X``.

    Returns the leaf and the block-metric error after the init and after each round.
    """
    check_rows(w, path, "AQLM")
    k, n = w.shape
    w32 = jnp.asarray(w, jnp.float32)
    if h is not None:
        h = h + config.damp * jnp.mean(jnp.diag(h)) * jnp.eye(k)
    scales = jnp.sqrt(jnp.mean(w32**2, 0)) + 1e-12
    u = row_vectors(w32 / scales)  # [nb, N, 8]
    gblk = _block_metric(h, k)
    size, m_books = 2**config.bits, config.num_codebooks
    vecs = u.reshape(-1, DIM)
    key = jax.random.key(config.seed)
    books, codes, resid = [], [], vecs
    for m in range(m_books):
        c, a = _kmeans(resid, jax.random.fold_in(key, m), size, config.kmeans_iters)
        books.append(c)
        codes.append(a)
        resid = resid - c[a]
    books = jnp.stack(books)
    codes = jnp.stack(codes, -1).astype(jnp.int32)
    gv = jnp.broadcast_to(gblk[:, None], (k // DIM, n, DIM, DIM)).reshape(-1, DIM, DIM)
    w2 = scales**2

    def error(cd, bk):
        d = (vecs - _reconstruct(cd, bk)).reshape(k // DIM, n, DIM) * scales[None, :, None]
        return float(
            jnp.einsum("gna,gab,gnb->", d, gblk, d, precision=_HI)
            / jnp.einsum("gna,gab,gnb->", u * scales[None, :, None], gblk, u * scales[None, :, None], precision=_HI)
        )

    errors = [error(codes, books)]
    for _ in range(config.iters):
        books = _ls_update(u, gblk, w2, codes.reshape(k // DIM, n, m_books), books)
        codes = _beam_search(vecs, gv, codes, books, config.beam, config.sweeps, min(config.chunk, vecs.shape[0]))
        errors.append(error(codes, books))
    code_dtype = jnp.uint8 if config.bits <= 8 else jnp.uint16
    leaf = AQLMArray(
        codes.reshape(k // DIM, n, m_books).astype(code_dtype),
        books.astype(config.codebook_dtype),
        scales.astype(config.scale_dtype),
        config.bits,
        dtype=w.dtype,
    )
    if not np.all(np.isfinite(errors)):
        raise ValueError(f"{path}: AQLM produced a non-finite error")
    return leaf, errors


def aqlm(variables: Variables, stats: Any, config: AQLMConfig = AQLMConfig()) -> dict:
    """AQLM every float kernel whose module path matches ``config.pattern``; ``stats``
    (``{kernel path: LayerStats}``) weights the objective by the Hessian blocks (``None``:
    plain weight error)."""
    out = dict(variables)
    for path in float_paths(variables, config.pattern, "aqlm"):
        h = None if stats is None else hessian(stats, path)
        leaf, _ = aqlm_weight(get_kernel(out, path), h, config, path=path)
        out = update_layer(out, path, kernel=leaf)
    return out
