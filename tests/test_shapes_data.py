"""The shapes data of the second bundled model: each attribute changes the clip as its word says,
captions and their on-device tokens match the tokenizer, rendering is deterministic per key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jquant.models import shapes_data as sd
from jquant.models import shapes_model as sm
from jquant.models.tokenize import load_tokenizer

CFG = sd.DataConfig()
attr_rows = st.tuples(*(st.integers(0, len(v) - 1) for _, v in sd.ATTRIBUTES))


def _clip(attrs, seed=0, cfg=CFG) -> np.ndarray:
    return np.asarray(sd.render_clips(jax.random.key(seed), jnp.array([attrs]), cfg))[0]


def _centroids(clip: np.ndarray) -> np.ndarray:
    """Intensity centroid (y, x) per frame of [F, H, W, 3]."""
    m = clip.sum(-1)
    ii = np.arange(m.shape[1]) + 0.5
    total = m.sum((1, 2))
    return np.stack([(m.sum(2) * ii).sum(1) / total, (m.sum(1) * ii).sum(1) / total], 1)


@settings(max_examples=12, deadline=None)
@given(attrs=attr_rows, seed=st.integers(0, 2**31 - 1))
def test_colour_is_the_captioned_rgb_and_the_shape_stays_on_canvas(attrs, seed):
    clip = _clip(attrs, seed)
    assert clip.shape == (CFG.frames, CFG.size, CFG.size, 3)
    assert clip.min() >= 0.0 and clip.max() <= 1.0
    rgb = sd.RGB[attrs[1]]
    means = clip.mean((0, 1, 2))
    assert np.all(means[rgb == 0] == 0.0) and np.all(means[rgb == 1] > 0.01)
    border = np.concatenate([clip[:, 0], clip[:, -1], clip[:, :, 0], clip[:, :, -1]])
    assert border.max() == 0.0  # nothing touches the edge: the whole shape is in every frame


@settings(max_examples=12, deadline=None)
@given(obj=st.integers(0, 3), colour=st.integers(0, 5), direction=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_direction_moves_the_centroid_that_way_and_bounces_hop_sideways(obj, colour, direction, seed):
    step = sd.DIRECTION_YX[direction]
    along = _centroids(_clip((obj, colour, 0, direction), seed)) @ step
    assert np.all(np.diff(along) > 0.5), along  # "moves": steadily along its direction
    side = -np.abs(step[::-1])
    straight = _centroids(_clip((obj, colour, 0, direction), seed)) @ side
    hopping = _centroids(_clip((obj, colour, 1, direction), seed)) @ side
    assert np.ptp(straight) < 0.25 and np.ptp(hopping) > 0.5 * CFG.hop * CFG.size
    np.testing.assert_allclose(  # the hop adds to the straight path, back to it at both ends
        (hopping - straight)[[0, -1]], 0.0, atol=1e-3
    )


def test_spins_turn_the_shape_while_moves_keep_its_orientation():
    cfg = sd.DataConfig(size=64)

    def widths(motion: int) -> np.ndarray:
        clip = _clip((0, 4, motion, 2), 1, cfg).sum(-1)  # a white square going up
        return (clip.max(1) > 0.5).sum(-1)  # columns it covers, per frame

    moves, spins = widths(0), widths(2)
    assert np.ptp(moves) <= 1
    assert spins.max() >= 1.2 * spins[0]  # a square turned by 22-45 degrees is wider


def test_objects_differ_in_area():
    areas = [_clip((o, 4, 0, 0), 5).sum() for o in range(len(sd.OBJECTS))]
    assert len({round(float(a)) for a in areas}) == len(sd.OBJECTS)


@settings(max_examples=20, deadline=None)
@given(attrs=attr_rows)
def test_caption_round_trips_and_names_every_attribute(attrs):
    text = sd.caption(attrs)
    assert sd.parse_caption(text) == attrs
    words = text.split()
    assert words[1] == sd.COLOURS[attrs[1]] and words[2] == sd.OBJECTS[attrs[0]]
    assert words[3] == sd.MOTIONS[attrs[2]] and words[4] == sd.DIRECTIONS[attrs[3]]


def test_bad_attributes_and_captions_are_named():
    with pytest.raises(ValueError, match="colour = 9"):
        sd.caption((0, 9, 0, 0))
    with pytest.raises(ValueError, match="4 entries"):
        sd.caption((0, 1))
    with pytest.raises(ValueError, match="unknown word"):
        sd.parse_caption("a purple circle moves left")
    with pytest.raises(ValueError, match="leave the canvas"):
        sd.DataConfig(max_travel=0.9)


def test_device_tokens_equal_the_saved_tokenizer(tmp_path):
    sm.save_tokenizer(tmp_path, 8)
    tok = load_tokenizer(tmp_path)
    assert tok.model_max_length == 8 and tok.pad_id == 0
    attrs = sd.sample_attributes(jax.random.key(4), 16)
    ids, mask = sd.caption_tokens(attrs, 8)
    batch = tok.encode(sd.captions(attrs))
    np.testing.assert_array_equal(batch.ids, ids)
    np.testing.assert_array_equal(batch.mask, mask)
    empty = tok.encode([""] * 2)
    null_ids, null_mask = sd.null_tokens(2, 8)
    np.testing.assert_array_equal(empty.ids, null_ids)
    np.testing.assert_array_equal(empty.mask, null_mask)
    assert tok.decode(batch.ids[0]) == sd.caption(np.asarray(attrs[0]))


def test_sampling_and_rendering_are_deterministic_per_key():
    k1, k2 = jax.random.key(7), jax.random.key(8)
    a1 = sd.sample_attributes(k1, 32)
    np.testing.assert_array_equal(a1, sd.sample_attributes(k1, 32))
    assert not np.array_equal(a1, sd.sample_attributes(k2, 32))
    for col, (_, vocab) in enumerate(sd.ATTRIBUTES):
        assert 0 <= int(a1[:, col].min()) and int(a1[:, col].max()) < len(vocab)
    c1 = sd.render_clips(k1, a1[:4])
    np.testing.assert_array_equal(c1, sd.render_clips(k1, a1[:4]))
    assert not np.array_equal(c1, sd.render_clips(k2, a1[:4]))
    lat = sd.clips_to_latents(c1)
    assert lat.shape == (4, 3, CFG.frames, CFG.size, CFG.size)
    np.testing.assert_allclose(sd.latents_to_clips(lat), c1, atol=1e-6)
