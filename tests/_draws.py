"""Random test inputs that compile fast: ``jax.random.normal(key, shape, dtype)`` bit for bit,
drawn flat and reshaped (threefry counts each element's flat index). XLA:CPU compiles a 4-D or
5-D threefry draw in 1.5-4 s against 0.4 s for a flat one, once per shape and test module (the
suite drops compiled programs after each module). For draws made on their own, outside jit: in a
larger program the reshape can change fusion, and with it the rounding of what the draw feeds."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)
