"""Fidelity metrics: analytic values, a numpy SSIM, translated-clip flow, Frechet distance."""

from __future__ import annotations

import math

import chex
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from jquant.metrics import (
    compare_videos,
    feature_frechet_distance,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    lucas_kanade_flow,
    mse,
    pooled_pixel_features,
    psnr,
    random_projection_features,
    ssim,
    temporal_flicker,
    warp,
    warp_error,
)

H = W = 32


def _rand(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _texture(seed=0, size=80):
    """A smooth random texture in [0, 1] and a cubic sampler over it."""
    import scipy.ndimage as nd

    t = nd.gaussian_filter(np.random.default_rng(seed).random((size, size)), 1.5)
    t = (t - t.min()) / (t.max() - t.min())
    return lambda x, y: nd.map_coordinates(t, [y + 16, x + 16], order=3, mode="reflect")


def _translating_clip(d=(1.3, -0.6), frames=3, channels=2):
    """[1, T, H, W, C] clip whose content moves by d = (dx, dy) pixels per frame."""
    f = _texture()
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    clip = np.stack([f(xx - d[0] * t, yy - d[1] * t) for t in range(frames)])
    clip = np.stack([clip * (0.6 + 0.4 * c / max(channels - 1, 1)) for c in range(channels)], -1)
    return clip[None].astype(np.float32)


# ---------------------------------------------------------------- PSNR / SSIM


def test_psnr_identical_and_constant_offset():
    ref = _rand((2, 3, H, W, 3))
    chex.assert_shape(psnr(ref, ref), (2, 3))
    assert np.all(np.isinf(psnr(ref, ref)))
    for delta, rng in ((0.05, 1.0), (3.0, 255.0)):
        p = np.asarray(psnr(ref * rng, ref * rng + delta, data_range=rng))
        np.testing.assert_allclose(p, 20 * math.log10(rng / delta), rtol=1e-4)
    np.testing.assert_allclose(mse(ref, ref + 0.1), 0.01, rtol=1e-4)


def test_images_are_one_frame_videos():
    a, b = _rand((2, H, W, 3), 1), _rand((2, H, W, 3), 2)
    chex.assert_shape(ssim(a, b), (2, 1))
    np.testing.assert_allclose(psnr(a, b)[:, 0], psnr(a[:, None], b[:, None])[:, 0])
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, b[:1])
    with pytest.raises(ValueError, match=r"\[batch, frames"):
        psnr(a[0, 0], b[0, 0])


def _ssim_numpy(a: np.ndarray, b: np.ndarray, data_range=1.0, win=11, sigma=1.5) -> float:
    """Straightforward SSIM of one [H, W, C] frame: valid 11x11 Gaussian windows, per channel."""
    r = np.arange(win) - (win - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    w2 = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    a, b = a.astype(np.float64), b.astype(np.float64)
    vals = []
    for c in range(a.shape[-1]):
        pa = np.lib.stride_tricks.sliding_window_view(a[..., c], (win, win))
        pb = np.lib.stride_tricks.sliding_window_view(b[..., c], (win, win))
        mu_a, mu_b = (pa * w2).sum((-1, -2)), (pb * w2).sum((-1, -2))
        va = (pa**2 * w2).sum((-1, -2)) - mu_a**2
        vb = (pb**2 * w2).sum((-1, -2)) - mu_b**2
        cov = (pa * pb * w2).sum((-1, -2)) - mu_a * mu_b
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
        vals.append(s.mean())
    return float(np.mean(vals))


def test_ssim_matches_numpy_reference():
    ref = _rand((1, 2, H, 24, 3), 3)
    test = np.clip(ref + 0.6 * (_rand(ref.shape, 4) - 0.5), 0, 1)
    got = np.asarray(ssim(ref, test))
    want = np.array([[_ssim_numpy(ref[0, t], test[0, t]) for t in range(2)]])
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.all(got < 0.9)
    np.testing.assert_allclose(ssim(ref, ref), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="win_size"):
        ssim(ref[..., :8, :8, :], ref[..., :8, :8, :])


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), scale=st.floats(0.01, 0.5))
def test_ssim_psnr_properties(seed, scale):
    a = _rand((1, 1, 16, 16, 1), seed)
    b = np.clip(a + scale * (_rand(a.shape, seed + 1) - 0.5), 0, 1).astype(np.float32)
    s_ab, s_ba = float(ssim(a, b)[0, 0]), float(ssim(b, a)[0, 0])
    assert s_ab == pytest.approx(s_ba, abs=1e-6) and -1 <= s_ab < 1
    # more noise never raises PSNR
    c = np.clip(a + 2 * scale * (_rand(a.shape, seed + 1) - 0.5), 0, 1).astype(np.float32)
    assert float(psnr(a, c)[0, 0]) <= float(psnr(a, b)[0, 0]) + 1e-4


# ---------------------------------------------------------------- temporal


def test_temporal_flicker_definition():
    ref = _rand((2, 4, 8, 8, 3))
    assert np.all(np.asarray(temporal_flicker(ref, ref + 0.2)) < 1e-6)  # static bias: no flicker
    alt = np.array([0.05, -0.05, 0.05, -0.05], np.float32)[None, :, None, None, None]
    np.testing.assert_allclose(temporal_flicker(ref, ref + alt), 0.1, rtol=1e-4)
    with pytest.raises(ValueError, match="at least 2 frames"):
        temporal_flicker(ref[:, :1], ref[:, :1])


def test_warp_integer_shift_and_mask():
    img = _rand((1, 6, 7, 2))
    flow = np.zeros((1, 6, 7, 2), np.float32)
    flow[..., 0] = 1.0  # sample one pixel to the right
    out, valid = warp(jnp.asarray(img), jnp.asarray(flow))
    np.testing.assert_allclose(out[:, :, :-1], img[:, :, 1:], atol=1e-6)
    assert bool(valid[:, :, :-1].all()) and not bool(valid[:, :, -1].any())


def test_flow_of_translated_clip():
    d = np.array([1.3, -0.6])
    clip = _translating_clip(tuple(d))
    flow = np.asarray(lucas_kanade_flow(clip[0, 1:], clip[0, :-1]))
    chex.assert_shape(flow, (2, H, W, 2))
    err = np.abs(flow + d)[:, 6:-6, 6:-6]  # frame t+1 -> t flow is -d
    assert np.median(err) < 0.05 and np.percentile(err, 95) < 0.15, (np.median(err), np.percentile(err, 95))


def test_warp_error_translated_clip():
    clip = _translating_clip((1.3, -0.6))
    we = warp_error(clip, clip)
    no_motion = float(np.mean((clip[:, 1:] - clip[:, :-1]) ** 2))
    assert float(we.ref[0]) < 0.02 * no_motion  # the flow explains the motion
    assert float(we.delta[0]) == 0.0
    s = 0.02
    noisy = clip + np.random.default_rng(0).normal(0, s, clip.shape).astype(np.float32)
    we = warp_error(clip, noisy)
    assert s**2 < float(we.delta[0]) < 2.2 * s**2, float(we.delta[0])
    static_bias = warp_error(clip, clip + 0.1)  # constant offset is temporally consistent
    assert abs(float(static_bias.delta[0])) < 1e-6


# ---------------------------------------------------------------- Frechet distance


def _fd_numpy(a, b):
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


def test_frechet_identical_shifted_and_reference():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((400, 8)) @ rng.standard_normal((8, 8))).astype(np.float32)
    scale = float(np.trace(np.cov(a, rowvar=False)))
    assert float(frechet_distance(a, a)) < 1e-4 * scale
    delta = rng.standard_normal(8).astype(np.float32)
    np.testing.assert_allclose(float(frechet_distance(a, a + delta)), float(delta @ delta), rtol=1e-3, atol=1e-3)
    b = (rng.standard_normal((300, 8)) * np.linspace(0.5, 2, 8) + 1.0).astype(np.float32)
    np.testing.assert_allclose(float(frechet_distance(a, b)), _fd_numpy(a, b), rtol=1e-3)
    mu, cov = gaussian_stats(a)
    np.testing.assert_allclose(cov, np.cov(a, rowvar=False), rtol=1e-4, atol=1e-4)
    assert float(frechet_distance_from_stats(mu, cov, mu, cov)) < 1e-4 * scale


def test_frechet_rank_deficient_and_errors():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 32)).astype(np.float32), rng.standard_normal((6, 32)).astype(np.float32)
    fd = float(frechet_distance(a, b))
    assert math.isfinite(fd) and fd > 0
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(a[:1], b)
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(a, b[:, :4])


def test_feature_extractors():
    v = _rand((2, 3, H, W, 3))
    f = pooled_pixel_features(v)
    chex.assert_shape(f, (6, 3 * (16 + 3)))
    rp = random_projection_features(dim=16, size=8)
    chex.assert_shape(rp(v), (6, 16))
    np.testing.assert_array_equal(rp(v), random_projection_features(dim=16, size=8)(v))  # deterministic
    assert float(feature_frechet_distance(v, v)) < 1e-6
    assert float(feature_frechet_distance(v, np.clip(v * 0.5, 0, 1))) > 1e-3
    assert float(feature_frechet_distance(v, v * 0.5, rp)) > 1e-3


# ---------------------------------------------------------------- compare_videos


def test_compare_videos_keys_values_and_hooks():
    clip = _translating_clip((1.3, -0.6))  # same shapes as the warp tests: the flow compiles once
    same = compare_videos(clip, clip)
    assert same["psnr"] == math.inf and same["ssim"] == pytest.approx(1.0)
    assert same["flicker"] == 0.0 and same["warp_error_delta"] == 0.0
    assert same["fd_pooled_pixels"] == pytest.approx(0.0, abs=1e-6)

    calls = []
    lpips_like = lambda r, t: (calls.append(r.shape), jnp.mean(jnp.abs(r - t), axis=(1, 2, 3, 4)))[1]  # noqa: E731
    noisy = np.clip(clip + np.random.default_rng(0).normal(0, 0.03, clip.shape), 0, 1).astype(np.float32)
    out = compare_videos(
        clip,
        noisy,
        feature_extractors={"rp": random_projection_features(8, size=8), "px": pooled_pixel_features},
        paired_metrics={"lpips": lpips_like},
    )
    expected = {
        "mse",
        "psnr",
        "psnr_min",
        "ssim",
        "ssim_min",
        "flicker",
        "warp_error_ref",
        "warp_error_test",
        "warp_error_delta",
        "fd_rp",
        "fd_px",
        "lpips",
    }
    assert set(out) == expected and all(type(v) is float for v in out.values())
    assert 25 < out["psnr"] < 35 and out["ssim"] < 0.99 and out["warp_error_delta"] > 0 and out["flicker"] > 0
    assert calls == [clip.shape]
    images = compare_videos(clip[:, 0], noisy[:, 0], feature_extractors={})
    assert "flicker" not in images and "fd_pooled_pixels" not in images
