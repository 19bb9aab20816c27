"""Weights coded as vectors of 8 consecutive input rows: the layout QuIP# (E8P lattice) and
AQLM (additive codebooks) share.

A kernel ``W [K, N]`` (K a multiple of :data:`DIM`) is cut into the vectors
``W[8g:8g+8, n]``; codes are stored ``[K/8, N, ...]``. :func:`row_vectors` and
:func:`from_row_vectors` convert between the two layouts, :func:`diagonal_blocks` takes the
8 x 8 diagonal blocks of a ``[K, K]`` matrix (each vector's share of a Hessian), and
:class:`RowVectorArray` is the base of the coded leaves (shape from the codes, pytree
unflattening).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jquant.coded import CodedArray

Array = jax.Array
DIM = 8


def check_rows(w: Array, path: str, method: str) -> None:
    """An error naming ``method`` unless ``w``'s input dimension is a multiple of 8."""
    if w.shape[0] % DIM:
        raise ValueError(f"{path}: {method} needs the input dimension to be a multiple of 8, got shape {w.shape}")


def row_vectors(w: Array) -> Array:
    """``[K, N] -> [K/8, N, 8]``: vector ``(g, n)`` is ``w[8g:8g+8, n]``."""
    k, n = w.shape
    return w.reshape(k // DIM, DIM, n).transpose(0, 2, 1)


def from_row_vectors(v: Array) -> Array:
    """``[K/8, N, 8] -> [K, N]``, the inverse of :func:`row_vectors`."""
    nb, n, _ = v.shape
    return v.transpose(0, 2, 1).reshape(nb * DIM, n)


def diagonal_blocks(m: Array) -> Array:
    """The 8 x 8 diagonal blocks ``[K/8, 8, 8]`` of ``m [K, K]``."""
    nb = m.shape[0] // DIM
    idx = jnp.arange(nb)
    return m.reshape(nb, DIM, nb, DIM)[idx, :, idx, :]


class RowVectorArray(CodedArray):
    """Base of the coded leaves whose ``codes`` are ``[K/8, N, ...]``; a subclass's
    ``tree_flatten`` returns its constructor's positional arguments (children, then aux)."""

    codes: Array

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.codes.shape[0] * DIM, self.codes.shape[1])
