"""Fidelity of a quantized model against the float model on identical noise and conditioning.

:func:`reference` samples the float model once (keeping the trajectory);
:func:`evaluate` samples a :class:`~jquant.pipeline.runtime.QuantizedModel` on the same
workload and reports the :func:`jquant.metrics.compare_videos` metrics (PSNR, SSIM per
frame, temporal flicker, warp error, Frechet distance), the error after every denoising
step (RMS difference of the latents against the float trajectory), weight memory and bits
per weight, and the sampling time without compilation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant.coded import CodedArray
from jquant.metrics import compare_videos, psnr
from jquant.pipeline.denoiser import ModelBundle, Workload
from jquant.pipeline.runtime import QuantizedModel, float_model, timed, tree_bytes
from jquant.pipeline.trajectory import float_model_fn
from jquant.qarray import QArray
from jquant.rules import flatten_with_paths, leaf_nbytes
from jquant.sampling import cfg_combine

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class Reference:
    """The float model's output on one workload."""

    work: Workload
    latents: Array
    trajectory: Array  # [T + 1, B, ...], x_T first
    videos: Array
    data_range: float
    sample_s: float
    compile_s: float = 0.0


def reference(bundle: ModelBundle, work: Workload) -> Reference:
    """Sample the float model (with its trajectory) on ``work``."""
    fm = float_model(bundle)
    (lat, traj), run_s, comp_s = timed(fm.sample, bundle.denoiser, work, return_trajectory=True)
    vid, rng = bundle.to_video(lat)
    if rng is None:
        rng = float(jnp.max(vid) - jnp.min(vid)) or 1.0
    return Reference(work, lat, traj, vid, float(rng), run_s, comp_s)


def weight_summary(variables: dict[str, Any]) -> dict[str, float]:
    """Bytes of everything (params and aux), and bits per weight over the quantized kernels
    (their codes, scales and aux such as low-rank branches and multipliers)."""
    aux = variables.get("jquant", {})
    aux_by_mod: dict[str, int] = {}
    for p, leaf in flatten_with_paths(aux):
        aux_by_mod[p.rpartition("/")[0]] = aux_by_mod.get(p.rpartition("/")[0], 0) + leaf_nbytes(leaf)
    q_bits = q_elems = 0
    kernels = 0
    for p, leaf in flatten_with_paths(variables["params"]):
        if not p.endswith("/kernel"):
            continue
        n = int(np.prod(leaf.shape))
        kernels += n
        if isinstance(leaf, (QArray, CodedArray)):
            mod = p[: -len("/kernel")]
            q_bits += 8 * (leaf_nbytes(leaf) + aux_by_mod.get(mod, 0))
            q_elems += n
    return {
        "weight_bytes": float(tree_bytes(variables)),
        "bits_per_weight": float(q_bits / q_elems) if q_elems else 32.0,
        "quantized_fraction": float(q_elems / kernels) if kernels else 0.0,
    }


def step_errors(ref_traj: Array, test_traj: Array) -> np.ndarray:
    """RMS latent difference after each denoising step ``[T]``."""
    d = (jnp.asarray(test_traj[1:], jnp.float32) - jnp.asarray(ref_traj[1:], jnp.float32)).reshape(
        ref_traj.shape[0] - 1, -1
    )
    return np.asarray(jnp.sqrt(jnp.mean(d * d, axis=1)))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _guided_preds(
    model_fn: Any, float_fn: Any, xs: Array, ts: Array, cond: Any, uncond: Any, g: Array, data: Any, *, cfg: bool
):
    def pred(fn: Any, x: Array, t: Array, sl: Any) -> Array:
        if not cfg:
            return fn(x, t, cond, sl).astype(jnp.float32)
        both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)
        pu, pc = jnp.split(fn(jnp.concatenate([x, x]), t, both, sl).astype(jnp.float32), 2)
        return cfg_combine(pu, pc, g)

    def body(_, step):
        x, t, sl = step
        q, f = pred(model_fn, x, t, sl), pred(float_fn, x, t, None)
        return None, jnp.sqrt(jnp.mean((q - f) ** 2)) / jnp.sqrt(jnp.mean(f**2))

    return jax.lax.scan(body, None, (xs, ts, data))[1]


def one_step_errors(bundle: ModelBundle, qm: QuantizedModel, ref: Reference) -> np.ndarray:
    """Relative RMS error of the quantized model's guided prediction against the float
    one, at every step of the *float* trajectory ``[T]`` (teacher forcing: no error
    accumulation, so it measures each step's quantization error alone)."""
    den = bundle.denoiser
    fn, data = qm.model_fn(den)
    ffn = float_model_fn(den, bundle.params)
    xs = ref.trajectory[:-1]
    ts = jnp.asarray(den.timesteps())
    data = jnp.zeros((den.num_steps,)) if data is None else data
    errs = _guided_preds(
        fn, ffn, xs, ts, ref.work.cond, ref.work.uncond, jnp.float32(den.guidance_scale), data, cfg=den.cfg
    )
    return np.asarray(errs)


def evaluate(
    bundle: ModelBundle, qm: QuantizedModel, ref: Reference, *, extractors: dict | None = None
) -> dict[str, Any]:
    """Metrics of ``qm`` against ``ref`` (same workload). Keys: ``psnr``, ``ssim``,
    ``flicker``, ``warp_error_delta``, ``fd_pooled_pixels`` (when enough clips), ...,
    ``psnr_clips`` (per clip, for paired comparisons),
    ``step_rmse`` (list), ``weight_bytes``, ``bits_per_weight``, ``sample_s``,
    ``compile_s``, ``videos`` (array, not serializable: pop it before json)."""
    (lat, traj), run_s, comp_s = timed(qm.sample, bundle.denoiser, ref.work, return_trajectory=True)
    vid, _ = bundle.to_video(lat)
    r, t = ref.videos, vid
    if bundle.to_video(ref.latents)[1] is None:  # raw latents: shift into [0, range]
        lo = jnp.min(r)
        r, t = r - lo, t - lo
    win = min(11, r.shape[2], r.shape[3])
    m = compare_videos(
        r, t, data_range=ref.data_range, feature_extractors=extractors, ssim_win_size=win - (1 - win % 2)
    )
    out: dict[str, Any] = {"name": qm.name, **m, **weight_summary(qm.variables)}
    out["psnr_clips"] = np.asarray(psnr(r, t, data_range=ref.data_range)).mean(axis=1).tolist()
    out["step_rmse"] = step_errors(ref.trajectory, traj).tolist()
    out["sample_s"], out["compile_s"] = run_s, comp_s
    out["activations"] = qm.act or "-"
    out["videos"] = np.asarray(vid)
    return out
