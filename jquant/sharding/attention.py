"""Sequence-parallel attention: Ulysses (all-to-all over heads) and ring attention, as a hook.

Inside ``with sequence_parallel(mesh, axis="seq"):`` every call of the ports' one attention
function (`jquant.models.attention.attention`) traced in the block runs under ``shard_map``
with the tokens split over the mesh axis ``axis`` (and the batch over ``batch_axis`` when given):

* ``"ulysses"`` (DeepSpeed-Ulysses): q, k and v ``[B, T/n, H, D]`` are exchanged with one
  all-to-all each into ``[B, T, H/n, D]``, each device runs attention over the whole sequence for
  its heads, and a last all-to-all brings the output back to token shards. Per-shard attention is
  the ports' attention function again, so an enclosing ``jquant.attention.quantized_attention``
  policy runs its quantized kernel on each shard (its statistics are per head: the result
  equals the unsharded quantized attention). Needs H divisible by n.
* ``"ring"``: each device keeps its query block and passes its key/value block around the ring
  (``ppermute``), combining blocks with an online softmax in float32 (flash attention's
  running max and sum), so no device ever holds the whole sequence's keys. Float attention only
  (the quantized kernel returns no log-sum-exp to merge blocks with).

Calls where the keys are not the queries' tokens (cross-attention to text), and Ulysses calls
whose head count does not divide by n, split only the queries: each device attends with its
query block to all keys (gathered). On a 1-device mesh the calls still run under ``shard_map``
(the code path a 1-GPU benchmark measures); ring attention over one device is local attention. Calls whose
token count does not divide by n, or whose mask depends on the query or head, fall through to
the unsharded attention (XLA's partitioner places them).

Enter the context around the code that *traces* the model (inside the jitted function), as
with ``quantized_attention``. The innermost attention hook is asked first, so enter
``sequence_parallel`` *inside* ``quantized_attention`` for the quantized kernel to run per shard
(the other way round the quantized hook takes each call whole, unsharded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jquant.models.attention import attention, attention_hook

SP_MODES = ("ulysses", "ring")
_LOCAL = threading.local()


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """Mesh, token axis, optional batch axis and mode of a sequence-parallel attention block."""

    mesh: Mesh
    axis: str
    batch_axis: str | None = None
    mode: str = "ulysses"

    def __post_init__(self) -> None:
        if self.mode not in SP_MODES:
            raise ValueError(f"sequence_parallel: mode {self.mode!r} is not one of {SP_MODES}")
        for a in (self.axis, self.batch_axis):
            if a is not None and a not in self.mesh.shape:
                raise ValueError(f"sequence_parallel: axis {a!r} is not in the mesh {tuple(self.mesh.shape)}")
        if self.axis == self.batch_axis:
            raise ValueError(f"sequence_parallel: axis and batch_axis are both {self.axis!r}")

    @property
    def n(self) -> int:
        return self.mesh.shape[self.axis]


@contextlib.contextmanager
def sequence_parallel(
    mesh: Mesh, axis: str = "seq", *, batch_axis: str | None = None, mode: str = "ulysses"
) -> Iterator[SequenceParallel]:
    """Run the attention calls traced in this block sequence-parallel over ``mesh[axis]``."""
    sp = SequenceParallel(mesh, axis, batch_axis, mode)
    with attention_hook(functools.partial(sharded_attention, sp)):
        yield sp


@contextlib.contextmanager
def _inside() -> Iterator[None]:
    """Per-shard attention calls the ports' attention again; the hook must not take them."""
    _LOCAL.depth = getattr(_LOCAL, "depth", 0) + 1
    try:
        yield
    finally:
        _LOCAL.depth -= 1


def _local_attention(implementation: str | None, q, k, v, mask=None):
    with _inside():
        return attention(q, k, v, mask, implementation=implementation)


def _ulysses(sp: SequenceParallel, implementation: str | None, q, k, v, mask):
    to_heads = functools.partial(jax.lax.all_to_all, axis_name=sp.axis, split_axis=2, concat_axis=1, tiled=True)
    to_tokens = functools.partial(jax.lax.all_to_all, axis_name=sp.axis, split_axis=1, concat_axis=2, tiled=True)
    out = _local_attention(implementation, to_heads(q), to_heads(k), to_heads(v), mask)
    return to_tokens(out)


def _ring(sp: SequenceParallel, q, k, v, mask):
    """Online-softmax attention over the key/value blocks passed around the ring (float32)."""
    n = sp.n
    perm = [(i, (i + 1) % n) for i in range(n)]
    qf = q.astype(jnp.float32) * (q.shape[-1] ** -0.5)
    b, tq, h, _ = q.shape
    big_neg = jnp.float32(-0.7 * jnp.finfo(jnp.float32).max)
    m = jnp.full((b, h, tq), -jnp.inf, jnp.float32)
    denom = jnp.zeros((b, h, tq), jnp.float32)
    acc = jnp.zeros(q.shape, jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    for step in range(n):
        s = jnp.einsum("bqhd,bkhd->bhqk", qf, k.astype(jnp.float32), precision=hi)
        if mask is not None:
            s = jnp.where(mask, s, big_neg)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        denom = denom * corr + p.sum(-1)
        acc = acc * jnp.transpose(corr, (0, 2, 1))[..., None]
        acc = acc + jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32), precision=hi)
        m = m_new
        if step < n - 1:
            k, v = jax.lax.ppermute(k, sp.axis, perm), jax.lax.ppermute(v, sp.axis, perm)
            if mask is not None:
                mask = jax.lax.ppermute(mask, sp.axis, perm)
    return (acc / jnp.transpose(denom, (0, 2, 1))[..., None]).astype(q.dtype)


def sharded_attention(
    sp: SequenceParallel,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    implementation: str | None,
) -> jax.Array | None:
    """The attention hook: this call under ``shard_map`` (see the module docstring), or None."""
    if getattr(_LOCAL, "depth", 0):
        return None
    n = sp.n
    b, tq, h, _ = q.shape
    tk = k.shape[1]
    if tq % n:
        return None
    if mask is not None and (mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1):
        return None  # only key masks [B, 1, 1, Tk] split with the keys
    bax = sp.batch_axis if sp.batch_axis is not None and b % sp.mesh.shape[sp.batch_axis] == 0 else None
    mask_bax = bax if mask is not None and mask.shape[0] == b else None
    tokens = PartitionSpec(bax, sp.axis, None, None)
    self_attention = tk == tq
    if self_attention and sp.mode == "ulysses" and h % n == 0:
        body = functools.partial(_ulysses, sp, implementation)
        kv_spec, mask_spec = tokens, PartitionSpec(mask_bax, None, None, None)
    elif self_attention and sp.mode == "ring" and n > 1:
        body = functools.partial(_ring, sp)
        kv_spec, mask_spec = tokens, PartitionSpec(mask_bax, None, None, sp.axis)
    else:  # queries split, every device sees all keys
        body = functools.partial(_local_attention, implementation)
        kv_spec, mask_spec = PartitionSpec(bax, None, None, None), PartitionSpec(mask_bax, None, None, None)
    specs = (tokens, kv_spec, kv_spec) + (() if mask is None else (mask_spec,))
    args = (q, k, v) + (() if mask is None else (mask,))

    def run(*a):
        return body(*a) if mask is not None else body(*a, None)

    fn = jax.shard_map(run, mesh=sp.mesh, in_specs=specs, out_specs=tokens, check_vma=False)
    return fn(*args)
