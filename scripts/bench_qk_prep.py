#!/usr/bin/env python3
"""Wan's Q/K preparation before attention (RMSNorm across heads, then the 3-D RoPE) as XLA runs
it on the GPU: jquant's formulation against the earlier one whose pair swap was a ``stack``.

Why: a Wan2.1-1.3B step's profile (``benchmarks/e2e-session22-nvidia-h200.json``) shows about
14 ms of XLA work around Q and K: the norm's reduction and scaling, and an
``input_concatenate_fusion`` of 122 us per tensor (the RoPE's ``stack``, a concatenate on the
GPU, 60 a step). :func:`jquant.models.attention.apply_rope` now swaps each pair with a reversal
and a sign, an elementwise op XLA can fuse with the norm that produces its input.

Rows (one projection output ``[1, 32,760, 1536]`` bf16, Wan2.1-1.3B's 480x832 x 81 frames):

* ``stack``: the norm, then the RoPE with the ``stack`` swap (the earlier code, kept here);
* ``jquant``: :class:`jquant.models.blocks.RMSNorm`'s arithmetic, then ``apply_rope``;
* ``copy``: ``x + 1`` in bf16, one read and one write (the pass a perfect fusion would cost).

And the whole preparation for the quantized attention (Hadamard rotation, int8 codes; Q per
token, K smoothed with one scale per 128-key tile), for Q and for K:

* ``<q|k> xla+prep``: the norm and RoPE in XLA, then ``attn_prep``'s verified pass (today's path
  while ``attn_prep.PROLOGUE_DEFAULT`` is False);
* ``<q|k> prologue-inner`` / ``prologue-outer``: ``attn_prep`` applying the prologue itself, its
  programs launched with a tile's heads side by side or each head's tiles in turn (what the
  cos / sin tables cost depends on what L2 keeps between the heads' reads);
* ``<q|k> prologue-inner-w16``, ``q prologue-inner-t64[-w8]``, ``q xla+prep-t64-w8``,
  ``q xla+prep-t256-w16``, ``<q|k> xla+prep-tpp4-s2``, ``q xla+prep-tpp8-s3``,
  ``<q|k> prologue-inner-tpp4-s2``: other programs of
  the same passes, 16 warps, Q in 64- or 256-token tiles, several tiles a program with their loads
  pipelined (registers per thread and programs an SM: :data:`QUANT_ROWS`).

Each bf16 row is checked against ``stack`` first (at most 1e-3 of the values may differ, by at
most one bf16 step, where XLA contracts a multiply-add differently), each codes row against
``attn_prep.reference_tokens`` (``attn_prep.judge``: the kernel check's tolerances). CUPTI kernel time,
median and minimum of >= 10 runs, inputs rotated past L2, and each row's kernels. Writes
``benchmarks/qk_prep-<device>.json``; exits 1 on a wrong row.

    PYTHONPATH=. python3 scripts/bench_qk_prep.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jquant.models.attention import QKPrologue, apply_rope  # noqa: E402
from jquant.models.embeddings import wan_rope_tables  # noqa: E402
from pallas_kernels import attn_prep, timing  # noqa: E402

GRID = (21, 30, 52)  # Wan2.1 at 480x832, 81 frames: 32,760 tokens
HEADS, HEAD_DIM = 12, 128
EPS = 1e-6


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``blocks.RMSNorm``'s arithmetic (float32, rounded back to x's dtype)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + EPS) * scale
    return y.astype(x.dtype)


def stack_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """The RoPE as jquant computed it before: the pair swap as a ``stack``."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]).astype(x.dtype)


def prep(rope_fn):
    def fn(x, scale, cos, sin):
        b, t, _ = x.shape
        return rope_fn(rms_norm(x, scale).reshape(b, t, HEADS, HEAD_DIM), cos, sin)

    return fn


VARIANTS = {
    "stack": prep(stack_rope),
    "jquant": prep(apply_rope),
    "copy": lambda x, scale, cos, sin: x + jnp.ones((), x.dtype),
}


#: the codes rows' quantization: (role, smoothed, one scale per 128-key tile), as the step's Q and K
ROLES = {"q": (False, False), "k": (True, True)}
TOKENS_PADDED = 32768


def _prologue(x: jax.Array, scale: jax.Array, cos: jax.Array, sin: jax.Array):
    """x as [B, T, H, D] and the Q/K prologue of the norm weight ``scale`` (both roles) and the tables."""
    b, t, _ = x.shape
    return x.reshape(b, t, HEADS, HEAD_DIM), QKPrologue(norm=(scale, scale), eps=EPS, rope=(cos, sin))


def quantized_prep(role: str, where: str, **tuning):
    """The quantized attention's operand pass for ``role``: the prologue in XLA first
    (``where="xla"``) or in the kernel with heads ``"inner"`` / ``"outer"``; ``tuning``: more
    keywords of the kernel (``warps``, ``tile``)."""
    smooth, per_tile = ROLES[role]

    def fn(x, scale, cos, sin):
        x4, prologue = _prologue(x, scale, cos, sin)
        prepared = prologue.apply_one(x4, role)
        mean = attn_prep.key_mean(prepared, True) if smooth else None
        kw = dict(fmt="int8", hadamard=True, mean=mean, per_tile=per_tile, tokens_padded=TOKENS_PADDED)
        if where == "xla":
            return attn_prep.prep_tokens_pallas(prepared, **kw, **tuning)
        norm, rope = attn_prep.prologue_operands(x4, prologue, role)
        return attn_prep.prep_tokens_pallas(x4, norm=norm, rope=rope, heads_inner=where == "inner", **kw, **tuning)

    return fn


#: row name -> (role, where the prologue runs: "xla", or the kernel's launch order "inner" /
#: "outer", more keywords of the kernel). The tuned programs, compiled for sm_90a here
#: (``scripts/triton_resources.py``): the default 128 x 128 program of 8 warps holds 114
#: registers without the prologue (two programs an SM by registers) and 185 with it; Q in 64-token
#: tiles on 8 warps, 80 (three an SM); 16 warps, 128 (the prologue) or 114 (256-token tiles). K's
#: tile is the attention's key block (one scale per tile), so only its warps vary. ``tpp``: tiles
#: a program loops over, the +-1 matrix read once and (``s`` stages > 1) the next tile's loads
#: issued as asynchronous copies during this one's arithmetic (92-95 registers, 112 KB of shared
#: memory at two stages; with the prologue 209 and 145 KB, one program an SM).
QUANT_ROWS = {
    f"{role} {name}": (role, where, {})
    for role in ROLES
    for name, where in (("xla+prep", "xla"), ("prologue-inner", "inner"), ("prologue-outer", "outer"))
} | {
    "q xla+prep-t64-w8": ("q", "xla", {"tile": 64, "warps": 8}),
    "q xla+prep-t256-w16": ("q", "xla", {"tile": 256, "warps": 16}),
    "q xla+prep-tpp4-s2": ("q", "xla", {"tiles_per_program": 4, "stages": 2}),
    "k xla+prep-tpp4-s2": ("k", "xla", {"tiles_per_program": 4, "stages": 2}),
    "q xla+prep-tpp8-s3": ("q", "xla", {"tiles_per_program": 8, "stages": 3}),
    "q prologue-inner-tpp4-s2": ("q", "inner", {"tiles_per_program": 4, "stages": 2}),
    "k prologue-inner-tpp4-s2": ("k", "inner", {"tiles_per_program": 4, "stages": 2}),
    "q prologue-inner-w16": ("q", "inner", {"warps": 16}),
    "k prologue-inner-w16": ("k", "inner", {"warps": 16}),
    "q prologue-inner-t64": ("q", "inner", {"tile": 64}),
    "q prologue-inner-t64-w8": ("q", "inner", {"tile": 64, "warps": 8}),
}
QUANT_VARIANTS = {name: quantized_prep(role, where, **tuning) for name, (role, where, tuning) in QUANT_ROWS.items()}


#: The prologue rows' tolerances (codes differing by one step, scales' relative error). Jitted,
#: XLA computes the inverse RMS the kernel is handed in its own order (a float32 ulp from the
#: eager reference's here and there), which can move a normed value across a bf16 rounding
#: boundary: one bf16 step of one element, at most 2^-8 of a token's scale. K's smoothing mean
#: comes from XLA's jitted prologue, which keeps float32 between the norm and the RoPE, while the
#: kernel and the reference round there: a shift far below a code step that moves the codes
#: on a boundary (2.6e-3 of them at 210 tokens in the interpreter, 3.3e-4 on the H200 at 32,760).
PROLOGUE_TOLERANCE = {"max_differing": 1e-2, "max_scale_rel": 2.0**-8}


def check_codes(role: str, where: str, args: tuple):
    """A judge of a codes row (:func:`attn_prep.judge` against ``attn_prep.reference_tokens``).
    ``where="xla"``: the reference quantizes the XLA prologue's own output (jitted, as the row
    runs it: XLA keeps the norm's float32 into the RoPE, so the eager prologue would differ in
    every bf16 rounding); otherwise it applies the prologue itself, eagerly. Both within
    :data:`PROLOGUE_TOLERANCE`: jitted together with the operand pass, XLA fuses the prologue
    otherwise than jitted alone (on the H200 at 0a17808, Q's scales of the XLA row moved by 6.3e-4,
    7e-6 of its codes by one step, so the kernel check's tolerances failed the row)."""
    smooth, per_tile = ROLES[role]
    x4, prologue = _prologue(*args)
    kw = dict(fmt="int8", hadamard=True, smooth=smooth, per_tile=per_tile, tile=128)
    if where == "xla":
        prepared = jax.jit(lambda x: prologue.apply_one(x, role))(x4)
        ref_codes, ref_scales = attn_prep.reference_tokens(prepared, **kw)
        return lambda out: attn_prep.judge(*out, ref_codes, ref_scales, "int8", **PROLOGUE_TOLERANCE)
    ref_codes, ref_scales = attn_prep.reference_tokens(x4, prologue=prologue, role=role, **kw)
    return lambda out: attn_prep.judge(*out, ref_codes, ref_scales, "int8", **PROLOGUE_TOLERANCE)


def check(ref: np.ndarray):
    def judge(out) -> dict:
        out = np.asarray(out, np.float32).reshape(ref.shape)
        diff = out != ref
        frac = float(diff.mean())
        step = np.abs(ref) * 2.0**-7 + 1e-30  # one bf16 step at ref's magnitude (upper bound)
        worst = float((np.abs(out - ref) / step).max())
        return {"ok": frac <= 1e-3 and worst <= 1.0, "mismatch_frac": frac, "max_steps": worst}

    return judge


def main() -> int:
    cos, sin = wan_rope_tables(HEAD_DIM, GRID)
    tokens = int(np.prod(GRID))
    width = HEADS * HEAD_DIM
    sets = []
    copies = timing.copies_for(tokens * width * 4.0)
    for i in range(copies):
        kx, ks = jax.random.split(jax.random.key(i))
        x = (jax.random.normal(kx, (1, tokens, width), jnp.float32) * 3).astype(jnp.bfloat16)
        scale = 1 + 0.1 * jax.random.normal(ks, (width,), jnp.float32)
        sets.append((x, scale, jnp.asarray(cos), jnp.asarray(sin)))
    ref = np.asarray(jax.jit(VARIANTS["stack"])(*sets[0]), np.float32)
    result = {"benchmark": "qk_prep", **timing.run_metadata("scripts/bench_qk_prep.py"), "tokens": tokens}
    result["rows"] = []
    failed = False
    for name, fn in {**VARIANTS, **QUANT_VARIANTS}.items():
        if name in QUANT_VARIANTS:
            judge = check_codes(*QUANT_ROWS[name][:2], sets[0])
        else:
            judge = (lambda out: {"ok": True}) if name == "copy" else check(ref)
        row = {"variant": name, **timing.check_then_time(fn, sets, judge)}
        if row["status"] == "PASS":
            row["kernels"] = timing.kernel_breakdown(fn, sets[0])
        failed |= row["status"] != "PASS"
        result["rows"].append(row)
    path = timing.write_json(f"qk_prep-{timing.device_slug()}.json", result)
    print(f"{'variant':18s} {'status':6s} {'us':>8s} {'min':>8s}  kernels (us)")
    for row in result["rows"]:
        kernels = ", ".join(f"{k['kernel']} {k['us']:.0f}" for k in row.get("kernels", []))
        print(f"{row['variant']:18s} {row['status']:6s} {row.get('us', 0):8.1f} {row.get('us_min', 0):8.1f}  {kernels}")
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
