"""The bundled tiny Wan video model: its data (moving digits), conditioning, judge and loader.

`scripts/train_tiny.py` trains a small `WanTransformer3D` by rectified flow on clips drawn here
(a digit 0-9 from a 5x7 bitmap font, scaled 2x, moving and bouncing on a 32x32 canvas) and
writes, in one diffusers-layout directory (default: the package's `assets/tiny_wan/`):

* ``config.json`` + ``diffusion_pytorch_model.safetensors``: the transformer (`models.save_pretrained`);
* ``conditioning.safetensors``: ``class_embeddings`` [10, tokens, text_dim] (the fixed "text
  tokens" of each digit) and ``null_embedding`` [tokens, text_dim] (zeros, the CFG branch);
* ``classifier.safetensors`` + ``classifier.json``: a small CNN trained on real clips, used to
  measure how recognisable sampled clips are (`sample_accuracy`);
* ``tiny_wan.json``: data settings, sampling defaults and the training summary.

Pixel convention: clips are [B, F, H, W] in [0, 1]; the model's latents are
[B, 1, F, H, W] = 2 * clip - 1. The flow runs from data (sigma 0) to noise (sigma 1):
x_sigma = (1 - sigma) x_0 + sigma * noise, the model predicts v = noise - x_0 at timestep
sigma * 1000, exactly what `jquant.sampling.sample_flow_euler` integrates.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from jquant.files import atomic_file
from jquant.models.loading import load_pretrained
from jquant.models.wan import WanConfig

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tiny_wan"
META_NAME = "tiny_wan.json"
CONDITIONING_NAME = "conditioning.safetensors"
CLASSIFIER_NAME = "classifier.safetensors"
CLASSIFIER_CONFIG_NAME = "classifier.json"
NUM_CLASSES = 10

# 5x7 bitmap glyphs of the digits 0-9 ("#" = ink), one string per row.
DIGIT_FONT: tuple[tuple[str, ...], ...] = (
    (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
)


def glyphs(scale: int = 2) -> np.ndarray:
    """The ten digit bitmaps as float32 [10, 7*scale, 5*scale] (1 = ink), nearest-upscaled."""
    if scale < 1:
        raise ValueError(f"glyph scale must be >= 1, got {scale}")
    base = np.array([[[c == "#" for c in row] for row in g] for g in DIGIT_FONT], np.float32)
    return base.repeat(scale, axis=1).repeat(scale, axis=2)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Moving-digit clips: `frames` frames of `size` x `size`, glyphs scaled `glyph_scale`x,
    speeds (pixels per frame, per axis) drawn uniformly in [min_speed, max_speed] with a random
    sign, ink brightness uniform in [min_ink, 1]. Digits bounce off the canvas edges."""

    frames: int = 8
    size: int = 32
    glyph_scale: int = 2
    min_speed: float = 0.5
    max_speed: float = 1.5
    min_ink: float = 0.7

    def __post_init__(self) -> None:
        gh, gw = 7 * self.glyph_scale, 5 * self.glyph_scale
        if self.frames < 1 or self.size <= max(gh, gw):
            raise ValueError(f"DataConfig: need frames >= 1 and size > glyph size {gh}x{gw}, got {self}")
        if not 0 <= self.min_speed <= self.max_speed:
            raise ValueError(f"DataConfig: need 0 <= min_speed <= max_speed, got {self.min_speed}, {self.max_speed}")


def _bounce(p: jax.Array, limit: float) -> jax.Array:
    """Reflect positions into [0, limit] (a point bouncing between two walls)."""
    m = jnp.mod(p, 2 * limit)
    return limit - jnp.abs(m - limit)


@functools.partial(jax.jit, static_argnames=("cfg",))
def render_clips(key: jax.Array, labels: jax.Array, cfg: DataConfig = DataConfig()) -> jax.Array:
    """Clips [B, F, H, W] in [0, 1] of the digits `labels` [B] moving with random start, velocity
    and brightness drawn from `key`. Sub-pixel positions are rendered bilinearly."""
    g = jnp.asarray(glyphs(cfg.glyph_scale))
    gh, gw = g.shape[1:]
    b = labels.shape[0]
    k_pos, k_speed, k_sign, k_ink = jax.random.split(key, 4)
    limits = jnp.array([cfg.size - gh, cfg.size - gw], jnp.float32)
    start = jax.random.uniform(k_pos, (b, 2)) * limits
    speed = jax.random.uniform(k_speed, (b, 2), minval=cfg.min_speed, maxval=cfg.max_speed)
    vel = speed * jnp.where(jax.random.bernoulli(k_sign, 0.5, (b, 2)), 1.0, -1.0)
    ink = jax.random.uniform(k_ink, (b,), minval=cfg.min_ink, maxval=1.0)
    t = jnp.arange(cfg.frames, dtype=jnp.float32)
    pos = _bounce(start[:, None] + vel[:, None] * t[None, :, None], limits)  # [B, F, 2] (y, x)

    # Pixel (i, j) samples the glyph at (i - y, j - x); zero outside, bilinear in between.
    padded = jnp.pad(g, ((0, 0), (1, 1), (1, 1)))  # zero border so clipped reads are ink-free
    ii = jnp.arange(cfg.size, dtype=jnp.float32)

    def one(label: jax.Array, p: jax.Array) -> jax.Array:
        gy = ii[:, None] - p[0] + 1.0  # +1: the pad
        gx = ii[None, :] - p[1] + 1.0
        y0, x0 = jnp.floor(gy), jnp.floor(gx)
        wy, wx = gy - y0, gx - x0
        img = padded[label]

        def at(y: jax.Array, x: jax.Array) -> jax.Array:
            inside = (y >= 0) & (y <= gh + 1) & (x >= 0) & (x <= gw + 1)
            v = img[jnp.clip(y, 0, gh + 1).astype(jnp.int32), jnp.clip(x, 0, gw + 1).astype(jnp.int32)]
            return jnp.where(inside, v, 0.0)

        return (
            at(y0, x0) * (1 - wy) * (1 - wx)
            + at(y0, x0 + 1) * (1 - wy) * wx
            + at(y0 + 1, x0) * wy * (1 - wx)
            + at(y0 + 1, x0 + 1) * wy * wx
        )

    frames = jax.vmap(lambda lab, ps: jax.vmap(lambda p: one(lab, p))(ps))(labels, pos)
    return frames * ink[:, None, None, None]


def clips_to_latents(clips: jax.Array) -> jax.Array:
    """[B, F, H, W] in [0, 1] -> Wan latents [B, 1, F, H, W] in [-1, 1]."""
    return (2.0 * clips - 1.0)[:, None]


def latents_to_clips(latents: jax.Array) -> jax.Array:
    """Wan latents [B, 1, F, H, W] -> clips [B, F, H, W] clipped to [0, 1]."""
    return jnp.clip((latents[:, 0].astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def class_embeddings(num_classes: int, tokens: int, text_dim: int, seed: int) -> np.ndarray:
    """Fixed "text tokens" per class: float32 [num_classes, tokens, text_dim], standard normal from `seed`."""
    return np.random.default_rng(seed).standard_normal((num_classes, tokens, text_dim)).astype(np.float32)


def velocity(model: nn.Module, params: Any, x: jax.Array, t: jax.Array, text: jax.Array) -> jax.Array:
    """The model's flow velocity for latents x [B, 1, F, H, W] at scalar or [B] timestep t (sigma*1000)."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    return model.apply({"params": params}, x, t, text)


# --- the judge: a small CNN that names the digit in a clip ---------------------------------------
@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Per-frame CNN (3x3 convs `features`, 2x2 max-pools between, global max-pool, Dense to
    `num_classes`); a clip's logits are the mean of its frames' logits."""

    features: tuple[int, ...] = (16, 32, 64)
    num_classes: int = NUM_CLASSES


class DigitClassifier(nn.Module):
    """Clips [B, F, H, W] in [0, 1] -> class logits [B, num_classes]."""

    config: ClassifierConfig

    @nn.compact
    def __call__(self, clips: jax.Array) -> jax.Array:
        b, f, h, w = clips.shape
        x = clips.reshape(b * f, h, w, 1).astype(jnp.float32) * 2.0 - 1.0
        for i, feat in enumerate(self.config.features):
            if i:
                x = nn.max_pool(x, (2, 2), (2, 2))
            x = nn.relu(nn.Conv(feat, (3, 3), name=f"conv_{i}")(x))
        x = jnp.max(x, axis=(1, 2))
        logits = nn.Dense(self.config.num_classes, name="head")(x)
        return logits.reshape(b, f, -1).mean(axis=1)


@functools.partial(jax.jit, static_argnums=0)
def classify(classifier: DigitClassifier, params: Any, clips: jax.Array) -> jax.Array:
    """Predicted digit [B] (argmax of the frame-averaged logits) of clips [B, F, H, W] in [0, 1]."""
    return jnp.argmax(classifier.apply({"params": params}, clips), axis=-1)


def init_classifier(config: ClassifierConfig, key: jax.Array, data: DataConfig = DataConfig()) -> dict[str, Any]:
    """Random classifier params (jitted init: eager convolutions would each compile on their own)."""
    clf = DigitClassifier(config)
    return jax.jit(clf.init)(key, jnp.zeros((1, data.frames, data.size, data.size)))["params"]


def sample_accuracy(classifier: DigitClassifier, params: Any, clips: jax.Array, labels: jax.Array) -> float:
    """Recognisability: the fraction of clips whose predicted digit is the class they were
    generated for (sampled clips [B, F, H, W] in [0, 1], conditioning labels [B])."""
    pred = np.asarray(classify(classifier, params, clips))
    return float(np.mean(pred == np.asarray(labels)))


def _flat_save(tree: Mapping[str, Any], file: Path, metadata: dict[str, str] | None = None) -> None:
    flat = traverse_util.flatten_dict(tree, sep="/")
    with atomic_file(file) as tmp:
        save_file({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()}, tmp, metadata=metadata)


def save_classifier(path: str | os.PathLike, config: ClassifierConfig, params: Any) -> None:
    """Write `classifier.safetensors` (flat '/'-joined keys) and `classifier.json` into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _flat_save(params, path / CLASSIFIER_NAME)
    cfg = {"_class_name": "DigitClassifier", **dataclasses.asdict(config)}
    with atomic_file(path / CLASSIFIER_CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")


def load_classifier(path: str | os.PathLike) -> tuple[DigitClassifier, dict[str, Any]]:
    """Read the classifier written by `save_classifier`; returns (module, params)."""
    path = Path(path)
    for name in (CLASSIFIER_NAME, CLASSIFIER_CONFIG_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found (expected the tiny_wan classifier)")
    raw = json.loads((path / CLASSIFIER_CONFIG_NAME).read_text())
    config = ClassifierConfig(features=tuple(raw["features"]), num_classes=int(raw["num_classes"]))
    module = DigitClassifier(config)
    flat = {k: jnp.asarray(v) for k, v in load_file(path / CLASSIFIER_NAME).items()}
    params = traverse_util.unflatten_dict(flat, sep="/")
    want = traverse_util.flatten_dict(
        jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1, 32, 32))))["params"], sep="/"
    )
    got = {k: v.shape for k, v in flat.items()}
    if {k: v.shape for k, v in want.items()} != got:
        raise ValueError(f"{path / CLASSIFIER_NAME}: tensors {got} do not match {config}")
    return module, params


def save_conditioning(path: str | os.PathLike, class_emb: np.ndarray) -> None:
    """Write `conditioning.safetensors`: class_embeddings [C, L, D] and null_embedding (zeros) [L, D]."""
    class_emb = np.asarray(class_emb, np.float32)
    if class_emb.ndim != 3:
        raise ValueError(f"class_emb must be [classes, tokens, text_dim], got {class_emb.shape}")
    tensors = {"class_embeddings": class_emb, "null_embedding": np.zeros(class_emb.shape[1:], np.float32)}
    with atomic_file(Path(path) / CONDITIONING_NAME) as tmp:
        save_file(tensors, tmp)


@dataclasses.dataclass(frozen=True)
class TinyWan:
    """Everything `load_tiny` returns: the transformer, its conditioning and its judge."""

    model: nn.Module
    params: dict[str, Any]
    config: WanConfig
    class_embeddings: jax.Array  # [num_classes, tokens, text_dim]
    null_embedding: jax.Array  # [tokens, text_dim]
    classifier: DigitClassifier
    classifier_params: dict[str, Any]
    data: DataConfig
    meta: dict[str, Any]

    def text(self, labels: jax.Array) -> jax.Array:
        """Conditioning [B, tokens, text_dim] of digit labels [B]."""
        return self.class_embeddings[jnp.asarray(labels)]

    def null_text(self, batch: int) -> jax.Array:
        """The unconditional (CFG) embedding repeated for a batch."""
        return jnp.broadcast_to(self.null_embedding, (batch, *self.null_embedding.shape))

    def latent_shape(self, batch: int) -> tuple[int, int, int, int, int]:
        return (batch, self.config.in_channels, self.data.frames, self.data.size, self.data.size)


def load_tiny(path: str | os.PathLike = ASSET_DIR, dtype: Any = jnp.float32) -> TinyWan:
    """Load a tiny_wan directory (default: the bundled one) with `models.load_pretrained`."""
    path = Path(path)
    meta_file = path / META_NAME
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{meta_file} not found: {path} is not a tiny_wan directory (run scripts/train_tiny.py)"
        )
    meta = json.loads(meta_file.read_text())
    model, params = load_pretrained(path, dtype=dtype)
    cond = load_file(path / CONDITIONING_NAME)
    classifier, classifier_params = load_classifier(path)
    return TinyWan(
        model=model,
        params=params,
        config=model.config,
        class_embeddings=jnp.asarray(cond["class_embeddings"]),
        null_embedding=jnp.asarray(cond["null_embedding"]),
        classifier=classifier,
        classifier_params=classifier_params,
        data=DataConfig(**meta["data"]),
        meta=meta,
    )
