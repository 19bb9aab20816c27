"""Captioned clips of moving shapes: the data of the second bundled model (issue 25).

A clip is drawn from four attributes, each an index into its vocabulary:

* object: square, circle, triangle, cross (anti-aliased signed-distance shapes);
* colour: red, green, blue, yellow, white, magenta (pure RGB, on black);
* motion: ``moves`` (a straight line), ``bounces`` (the same line plus hops to one side:
  up for horizontal motion, left for vertical), ``spins`` (the straight line while turning);
* direction: left, right, up (towards row 0), down.

Attribute tuples are int32 ``[B, 4]`` arrays (columns in :data:`ATTRIBUTES` order, see
:func:`sample_attributes`); :func:`caption` turns one into "a red circle moves left". The
caption's tokens are fixed by the template, so :func:`caption_tokens` computes them on the
device with the ids of :func:`vocabulary` (the WordLevel tokenizer of
``jquant.models.shapes_model`` uses the same ids). Nuisances drawn per clip from the key: size,
travel distance, the path's midpoint, brightness.

Pixel convention: clips are float ``[B, F, H, W, 3]`` in [0, 1]; the model's latents (raw
pixels, no VAE) are ``[B, 3, F, H, W] = 2 * clip - 1``. Everything here is pure and jittable.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

OBJECTS: tuple[str, ...] = ("square", "circle", "triangle", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "magenta")
MOTIONS: tuple[str, ...] = ("moves", "bounces", "spins")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
#: (name, vocabulary) of each column of an attribute array.
ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("object", OBJECTS),
    ("colour", COLOURS),
    ("motion", MOTIONS),
    ("direction", DIRECTIONS),
)
RGB = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 1, 1], [1, 0, 1]], np.float32)
#: unit step (dy, dx) of each direction; rows grow downwards, so "up" is -y.
DIRECTION_YX = np.array([[0, -1], [0, 1], [-1, 0], [1, 0]], np.float32)

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, UNK)  # ids 0, 1, 2 as in T5/UMT5
CAPTION_WORDS = 5  # "a", colour, object, motion, direction
WORDS: tuple[str, ...] = ("a", *COLOURS, *OBJECTS, *MOTIONS, *DIRECTIONS)


def vocabulary() -> dict[str, int]:
    """Token -> id: the special tokens (pad 0, eos 1, unk 2), then every template word."""
    return {t: i for i, t in enumerate((*SPECIAL_TOKENS, *WORDS))}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`frames` frames of `size` x `size` pixels. Lengths are fractions of `size`: the shape's
    radius in [min_radius, max_radius], the distance travelled over the clip in
    [min_travel, max_travel], the bounce height `hop`; `turns`: turns a spinning shape makes over
    the clip; brightness uniform in [min_brightness, 1]; `jitter`: the path's midpoint is the
    canvas centre +- jitter."""

    frames: int = 9
    size: int = 32
    min_radius: float = 0.12
    max_radius: float = 0.17
    min_travel: float = 0.25
    max_travel: float = 0.4
    hop: float = 0.12
    turns: float = 0.375
    min_brightness: float = 0.8
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.frames < 1 or self.size < 8:
            raise ValueError(f"DataConfig: need frames >= 1 and size >= 8, got frames={self.frames}, size={self.size}")
        if not 0 < self.min_radius <= self.max_radius or not 0 <= self.min_travel <= self.max_travel:
            raise ValueError(f"DataConfig: need 0 < min_radius <= max_radius and 0 <= min_travel <= max_travel: {self}")
        reach = self.jitter + self.max_radius + max(self.max_travel / 2, self.hop)
        if reach > 0.5:
            raise ValueError(
                f"DataConfig: shapes can leave the canvas (jitter + radius + travel/2 or hop = {reach} > 0.5)"
            )


def sample_attributes(key: jax.Array, batch: int) -> jax.Array:
    """Uniform attribute tuples int32 [batch, 4] (object, colour, motion, direction)."""
    keys = jax.random.split(key, len(ATTRIBUTES))
    cols = [jax.random.randint(k, (batch,), 0, len(v)) for k, (_, v) in zip(keys, ATTRIBUTES)]
    return jnp.stack(cols, axis=1).astype(jnp.int32)


def _check_row(attrs: Sequence[int]) -> tuple[int, ...]:
    row = tuple(int(a) for a in np.asarray(attrs).reshape(-1))
    if len(row) != len(ATTRIBUTES):
        raise ValueError(
            f"an attribute tuple has {len(ATTRIBUTES)} entries (object, colour, motion, direction), got {row}"
        )
    for (name, vocab), a in zip(ATTRIBUTES, row):
        if not 0 <= a < len(vocab):
            raise ValueError(f"attribute {name} = {a} is out of range [0, {len(vocab)})")
    return row


def caption(attrs: Sequence[int]) -> str:
    """The caption of one attribute tuple: "a {colour} {object} {motion} {direction}"."""
    o, c, m, d = _check_row(attrs)
    return f"a {COLOURS[c]} {OBJECTS[o]} {MOTIONS[m]} {DIRECTIONS[d]}"


def captions(attrs: np.ndarray | jax.Array) -> list[str]:
    """:func:`caption` of every row of an attribute array [B, 4]."""
    return [caption(row) for row in np.asarray(attrs).reshape(-1, len(ATTRIBUTES))]


def parse_caption(text: str) -> tuple[int, int, int, int]:
    """The attribute tuple of a template caption (inverse of :func:`caption`)."""
    words = text.lower().split()
    if len(words) != CAPTION_WORDS or words[0] != "a":
        raise ValueError(f"{text!r} is not a template caption 'a <colour> <object> <motion> <direction>'")
    _, c, o, m, d = words
    try:
        return OBJECTS.index(o), COLOURS.index(c), MOTIONS.index(m), DIRECTIONS.index(d)
    except ValueError:
        raise ValueError(f"{text!r}: unknown word (vocabulary: {WORDS})") from None


def caption_tokens(attrs: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    """Token ids and mask int32 [B, length] of the captions of `attrs` [B, 4]: the five words,
    eos, then padding (what the shapes tokenizer gives for :func:`caption`)."""
    if length < CAPTION_WORDS + 1:
        raise ValueError(f"caption_tokens: length must be >= {CAPTION_WORDS + 1} (5 words + eos), got {length}")
    vocab = vocabulary()
    tables = [jnp.asarray([vocab[w] for w in v], jnp.int32) for _, v in ATTRIBUTES]
    o, c, m, d = (tables[i][attrs[:, i]] for i in range(len(ATTRIBUTES)))
    b = attrs.shape[0]
    words = jnp.stack([jnp.full((b,), vocab["a"], jnp.int32), c, o, m, d, jnp.full((b,), vocab[EOS], jnp.int32)], 1)
    ids = jnp.pad(words, ((0, 0), (0, length - words.shape[1])), constant_values=vocab[PAD])
    mask = (jnp.arange(length) < words.shape[1]).astype(jnp.int32)
    return ids, jnp.broadcast_to(mask, (b, length))


def null_tokens(batch: int, length: int) -> tuple[jax.Array, jax.Array]:
    """Ids and mask [batch, length] of the empty caption (eos only): the CFG branch."""
    vocab = vocabulary()
    ids = jnp.full((batch, length), vocab[PAD], jnp.int32).at[:, 0].set(vocab[EOS])
    mask = jnp.zeros((batch, length), jnp.int32).at[:, 0].set(1)
    return ids, mask


def _sdf(obj: jax.Array, u: jax.Array, v: jax.Array, r: jax.Array) -> jax.Array:
    """Signed distance (pixels, negative inside) of shape `obj` of radius r at local coords (u=y, v=x)."""
    square = jnp.maximum(jnp.abs(u), jnp.abs(v)) - 0.85 * r
    circle = jnp.sqrt(u * u + v * v) - r
    # Equilateral triangle, apex up, inradius 0.6 r: the largest of its three edge distances.
    s3 = np.float32(np.sqrt(3.0) / 2)
    triangle = jnp.maximum(jnp.maximum(u, -0.5 * u + s3 * v), -0.5 * u - s3 * v) - 0.6 * r
    w = 0.35 * r
    cross = jnp.minimum(jnp.maximum(jnp.abs(u) - r, jnp.abs(v) - w), jnp.maximum(jnp.abs(u) - w, jnp.abs(v) - r))
    return jnp.stack([square, circle, triangle, cross])[obj]


def _render_one(key: jax.Array, attrs: jax.Array, cfg: DataConfig) -> jax.Array:
    """One clip [F, H, W, 3] of one attribute tuple."""
    obj, col, mot, dirn = attrs[0], attrs[1], attrs[2], attrs[3]
    k_r, k_travel, k_mid, k_bright = jax.random.split(key, 4)
    size = float(cfg.size)
    r = size * jax.random.uniform(k_r, (), minval=cfg.min_radius, maxval=cfg.max_radius)
    travel = size * jax.random.uniform(k_travel, (), minval=cfg.min_travel, maxval=cfg.max_travel)
    mid = size * (0.5 + cfg.jitter * jax.random.uniform(k_mid, (2,), minval=-1.0, maxval=1.0))
    bright = jax.random.uniform(k_bright, (), minval=cfg.min_brightness, maxval=1.0)

    tau = jnp.arange(cfg.frames, dtype=jnp.float32) / max(cfg.frames - 1, 1)  # [F] in [0, 1]
    step = jnp.asarray(DIRECTION_YX)[dirn]  # (dy, dx)
    side = -jnp.abs(step[::-1])  # hop up for horizontal motion, left for vertical
    hop = jnp.where(mot == 1, cfg.hop * size, 0.0) * jnp.abs(jnp.sin(2 * jnp.pi * tau))
    centre = mid + step * travel * (tau[:, None] - 0.5) + side * hop[:, None]  # [F, 2]
    angle = jnp.where(mot == 2, 2 * jnp.pi * cfg.turns, 0.0) * tau  # [F]

    pix = jnp.arange(cfg.size, dtype=jnp.float32) + 0.5
    dy = pix[None, :, None] - centre[:, 0, None, None]  # [F, H, 1]
    dx = pix[None, None, :] - centre[:, 1, None, None]  # [F, 1, W]
    cos, sin = jnp.cos(angle)[:, None, None], jnp.sin(angle)[:, None, None]
    u, v = cos * dy + sin * dx, -sin * dy + cos * dx  # rotate the canvas by -angle
    cover = jnp.clip(0.5 - _sdf(obj, u, v, r), 0.0, 1.0)  # one-pixel anti-aliased edge
    return cover[..., None] * (bright * jnp.asarray(RGB)[col])


@functools.partial(jax.jit, static_argnames=("cfg",))
def render_clips(key: jax.Array, attrs: jax.Array, cfg: DataConfig = DataConfig()) -> jax.Array:
    """Clips [B, F, H, W, 3] in [0, 1] of the attribute tuples `attrs` [B, 4]; the nuisances
    (size, travel, midpoint, brightness) of clip i come from `fold_in(key, i)`."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(attrs.shape[0]))
    return jax.vmap(lambda k, a: _render_one(k, a, cfg))(keys, attrs.astype(jnp.int32))


def clips_to_latents(clips: jax.Array) -> jax.Array:
    """Clips [B, F, H, W, 3] in [0, 1] -> the model's latents [B, 3, F, H, W] in [-1, 1]."""
    return jnp.moveaxis(2.0 * clips - 1.0, -1, 1)


def latents_to_clips(latents: jax.Array) -> jax.Array:
    """Latents [B, 3, F, H, W] -> clips [B, F, H, W, 3] clipped to [0, 1]."""
    return jnp.clip((jnp.moveaxis(latents.astype(jnp.float32), 1, -1) + 1.0) / 2.0, 0.0, 1.0)
