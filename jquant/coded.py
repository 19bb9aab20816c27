"""Weight leaves that are not QArrays but decode to a dense kernel: low-rank, codebooks.

QArray covers scalar formats (one code per element). Vector codebooks (QuIP#'s E8P,
AQLM) and low-rank factorizations (SVD-LLM) store a weight differently; each is a
registered pytree subclassing :class:`CodedArray`, with the same duck interface as
QArray: ``shape``, ``dtype``, ``nbytes`` (real bytes, codebooks included),
``bits_per_weight`` and ``dequantize(dtype)`` (an XLA gather/sum/matmul decode).

Execution: ``jquant.qarray.dequantize`` and ``jquant.dispatch.linear`` decode a
``CodedArray`` kernel to a dense one (``w.dequantize(x.dtype)``) and run the float path, and
``jquant.rules`` treats it as one weight leaf, so models run unchanged under
:mod:`jquant.nn`. :func:`decode_tree` materializes every CodedArray of a tree as its dense
kernel (e.g. to run a plain ``model.apply``).
"""

from __future__ import annotations

import abc
import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


class CodedArray(abc.ABC):
    """Base class: a weight stored as codes/factors that decodes to a dense (K, N) kernel."""

    dtype: Any

    @abc.abstractmethod
    def dequantize(self, dtype=None) -> Array:
        """The dense kernel, decoded with XLA ops."""

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Logical (K, N) shape of the decoded kernel."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def _arrays(self) -> list[Array]:
        children, _ = jax.tree_util.tree_flatten(self)
        return [c for c in children if c is not None]

    @property
    def nbytes(self) -> int:
        """Real storage: every array child (codes, codebooks, scales, factors)."""
        return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in self._arrays())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(self.size, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, bits_per_weight={self.bits_per_weight:.3f})"


def is_coded(x: Any) -> bool:
    return isinstance(x, CodedArray)


def decode_tree(tree: Any, dtype=None) -> Any:
    """Replace every CodedArray leaf of ``tree`` by its dense kernel (QArrays untouched)."""
    return jax.tree_util.tree_map(
        lambda x: x.dequantize(x.dtype if dtype is None else dtype) if isinstance(x, CodedArray) else x,
        tree,
        is_leaf=lambda x: isinstance(x, CodedArray),
    )


@jax.tree_util.register_pytree_node_class
class LowRankArray(CodedArray):
    """A kernel stored as ``a @ b`` (``a`` [K, r], ``b`` [r, N]): SVD-LLM's compression."""

    def __init__(self, a: Array, b: Array, dtype=jnp.float32):
        self.a, self.b, self.dtype = a, b, jnp.dtype(dtype)

    def tree_flatten(self):
        return (self.a, self.b), jnp.dtype(self.dtype).name

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, dtype=aux)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.a.shape[0], self.b.shape[-1])

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    def dequantize(self, dtype=None) -> Array:
        dt = self.dtype if dtype is None else dtype
        return jnp.matmul(self.a.astype(jnp.float32), self.b.astype(jnp.float32)).astype(dt)
