"""Flash attention with quantized operands on Hopper (Pallas Mosaic GPU).

``quant_attention(q, k, v, ...)`` computes :func:`attention_ref.quant_attention_reference`
(same signature, same quantization; see that module for the numerics) with an online
softmax, in one kernel per (head, query tile pair, batch):

* the wrapper rotates (optional Hadamard), smooths and quantizes Q, K and V in one XLA
  pass (:func:`attention_ref.prepare`), pads the token axes to the tiles and folds the
  softmax scale and ``log2(e)`` into the per-token Q scales;
* two compute warpgroups each own 64 query rows; a third streams K and V tiles through a
  ``stages``-deep TMA ring (the structure of JAX's FlashAttention-3 example,
  ``jax/experimental/pallas/ops/gpu/attention_mgpu.py``);
* S = Q K^T runs on the 8-bit wgmma (int8 -> int32, or e4m3 -> fp32), is scaled by the
  per-token Q scale times the per-block K scale, and the online softmax runs in fp32 with
  ``exp2``;
* P V runs either in bf16 (P from registers, V as stored) or in fp8 e4m3 (P times 448
  written to shared memory, V pre-transposed to ``[B, H, D, T]`` because 8-bit wgmma
  operands must be K-major), with one V scale per channel applied at the end.

Padding keys (the token axis rounded up to ``block_k``, or past ``kv_lengths``) are zero
in K and V. A zero key code gives a score of exactly 0, so each padding key adds exactly
``2^(0 - m)`` to the softmax denominator and nothing to the numerator; the kernel
subtracts ``n_pad * 2^(-m)`` at the end instead of masking every tile. With K smoothed,
the mean real score of each query is 0, so the real maximum is >= 0 and the subtraction
cannot cancel catastrophically; without smoothing the wrapper falls back to the
reference whenever padding exists. Causal masking uses an index mask on the diagonal
tiles (padding keys then lie in the masked future of every real query).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common, attn_prep
from pallas_kernels import attention_ref as ref
from pallas_kernels.attention_ref import (  # noqa: F401  (re-exported API)
    HEAD_DIMS,
    PV_FORMATS,
    QK_FORMATS,
    exact_attention,
    quant_attention_reference,
    relative_l2,
)

#: Key blocks whose scales fit one kernel's shared memory (two copies of [n/32, 32] f32).
MAX_KEY_BLOCKS = 4096
#: Whether causal calls take the kernel on Hopper. The causal path (index mask on the
#: diagonal tiles, an epilogue draining the K/V ring) follows JAX's FA3 example, whose
#: causal mode ptxas of CUDA 12.8.0-12.9.1 miscompiles; scripts/check_attention_gpu.py
#: runs it explicitly.
CAUSAL_ON_KERNEL = True
INT_TO_FLOAT: tuple[str, ...] = ("cvt", "magic")
SCHEDULES: tuple[str, ...] = ("pingpong", "none", "round")
#: ``quant_attention``'s ``unpadded`` default (see AttentionConfig): False until
#: ``JQUANT_BACKEND=pallas scripts/check_attention_gpu.py --only unpadded`` passes on a GPU.
UNPADDED_DEFAULT = False
#: Token counts ``unpadded`` takes: Mosaic GPU's TMA copies need the global array's token axis to
#: be a multiple of the shared-memory tile's 8 rows (Wan2.1-1.3B's 32,760 and 512 are); other
#: calls keep the padded V and output.
UNPADDED_MULTIPLE = 8
#: Compute warpgroups per CTA the kernel can run with (3: ``schedule="round"`` only).
WARPGROUPS: tuple[int, ...] = (2, 3)
HANDOFFS: tuple[str, ...] = ("end", "exp", "max")
#: How the softmax rounds P to bf16 for P V (see AttentionConfig.p_round).
P_ROUNDS: tuple[str, ...] = ("cvt", "int")
#: (qk_format, pv_format) pairs the kernel handles on the GPU. Every other pair, and every
#: call off Hopper, runs the reference.
KERNEL_FORMATS: frozenset[tuple[str, str]] = frozenset((qk, pv) for qk in QK_FORMATS for pv in PV_FORMATS)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Tiling: each compute warpgroup owns ``block_q`` (64) query rows; ``block_k`` keys per
    step (also the K-scale block); ``stages`` K/V tiles in flight.

    ``int_to_float`` (int8 Q K^T only) turns the int32 scores into floats either with the
    conversion instruction (``"cvt"``, quarter rate on Hopper) or exactly with the
    magic-number trick (``"magic"``: add the bits of 1.5 * 2^23, reinterpret as f32; exact
    for |x| < 2^22, and int8 dot products over <= 128 channels stay below 2^21), which costs
    one integer add and folds the offset into the scaling FMA.

    ``k_scales``: ``"token"`` streams one K scale per key beside each K tile and applies it as
    a column scale (the Q row scale then rides in the ``exp2`` argument's FMA, so the score
    arithmetic costs what the per-block form does); ``"block"`` reads one scalar per tile.

    ``overlap`` (non-causal calls): FlashAttention-3's intra-warpgroup overlap. Each step issues
    Q K^T of tile j and P V of tile j - 1 together and runs tile j's softmax while P V is in
    flight; the output accumulator is rescaled after P V lands. ``schedule``: ``"pingpong"``
    makes the two compute warpgroups take turns on the tensor cores (one barrier each way per
    step); ``"none"`` lets them run free; ``"round"`` (non-causal, any ``overlap``) is the
    round-robin loop: in its turn a warpgroup issues P V of its previous tile and Q K^T of the
    next together, waits for both, then runs the softmax while the other warpgroups' GEMMs run.

    ``warpgroups`` (2 or 3; 3 with ``schedule="round"`` only): compute warpgroups per CTA, each
    owning ``block_q`` rows. The profile shows a step of two warpgroups is two softmaxes back to
    back (each longer than the other's GEMMs); with three, each softmax has two other
    warpgroups' GEMMs to hide under. Three warpgroups get 160 registers each instead of 232.

    ``raw_max`` (per-tile K scales): take each row's max on the unscaled scores and fold the
    row scale, the magic-number bias and the max into the one FMA that feeds ``exp2``: one
    instruction less per score, and the max no longer waits for the scaling.

    ``handoff`` (plain loop, ping-pong): when a warpgroup hands the softmax turn to the other:
    ``"end"`` after its whole softmax, ``"exp"`` once its exponentials are done (its row sums,
    output rescale and P conversion then run beside the other's softmax), ``"max"`` once its row
    maxima are known. The profiled step is otherwise two softmaxes back to back.

    ``magic_init`` (int8 Q K^T with ``int_to_float="magic"``, plain loop): the Q K^T accumulator
    starts at the magic number's bits instead of 0, so the tensor core adds the bias and the
    softmax reinterprets the result without an integer add per score (the sum stays below 2^31).

    ``fresh_pv`` (plain loop): P V of each tile goes into a fresh accumulator, added to the
    running output with one FMA per value once the MMA has landed (SageAttention2's two-level
    accumulation: the fp8 MMA's reduced-precision accumulator then spans one tile only; the
    output rescale leaves the softmax phase, which the profile shows sets the step).

    ``p_smem`` (bf16 P V): P goes through shared memory, so P V is a shared-memory wgmma whose
    issue need not wait for the tensor core to take P from registers (the profile shows the
    register-operand issue holding its warpgroup for about 290 cycles); fp8 P always does.

    ``p_round`` (bf16 P V): how P is rounded to bf16: ``"cvt"`` by the conversion instruction
    (round to nearest even), ``"int"`` by integer arithmetic on the fp32 bits (add half a bf16
    unit, keep the upper 16 bits: round to nearest, ties away from zero, exact for P in [0, 1]).
    The conversion runs on the quarter-rate pipe the exponentials also use; the integer form
    moves it to the full-rate integer pipe.

    ``exp_poly`` (plain loop, bf16 P from registers): of each tile's ``block_k`` keys, the last
    ``exp_poly`` (a multiple of 64: P V then runs one wgmma per piece, whose register operand's K
    must be a multiple of 64) take their ``exp2`` from :func:`exp2_poly` on the FMA pipe instead of
    the MUFU unit (0: none).

    ``max_split`` (per-tile K with ``raw_max``): take each row's max over this many column slices
    and combine the partial maxima as a tree. ptxas builds a row max as two dependent chains of
    16 ``FMNMX`` per row; more slices give it independent chains to interleave.

    ``unpadded``: V (bf16 P V) and the output keep the caller's token counts instead of the
    padded ones. The kernel's TMA copies read zeros past the last key (what the padding held)
    and skip the stores of rows past the last query, so XLA neither pads V nor slices the output:
    one copy of each per call (in a Wan2.1-1.3B step's profile, ``loop_pad_fusion`` 61 us for V
    and ``memcpy128`` 48 us for the output: 4.7 ms a step). Taken where both token counts are
    multiples of :data:`UNPADDED_MULTIPLE`. The field defaults to False; ``quant_attention``
    fills it from :data:`UNPADDED_DEFAULT` (False until GPU-checked), so configs built directly
    (``bench_attention.py``, ``attention_timeline.py``) run the padded layout.

    ``profile_dir``: record each warpgroup's phases (Q K^T issue and wait, the turn barriers,
    softmax, P V) with the SM clock into a trace there (the Mosaic GPU profiler; costs shared
    memory and a little time). ``scripts/attention_timeline.py`` reads it.
    """

    block_q: int = 64
    block_k: int = 128
    stages: int = 2
    int_to_float: str = "magic"
    k_scales: str = "token"
    overlap: bool = False
    schedule: str = "pingpong"
    raw_max: bool = True
    handoff: str = "end"
    magic_init: bool = True
    fresh_pv: bool = False
    p_smem: bool = False
    warpgroups: int = 2
    p_round: str = "cvt"
    exp_poly: int = 0
    max_split: int = 1
    unpadded: bool = False
    profile_dir: str = ""

    def __post_init__(self):
        if self.handoff not in HANDOFFS:
            raise ValueError(f"AttentionConfig: handoff must be one of {HANDOFFS}, got {self.handoff!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"AttentionConfig: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.k_scales not in ref.K_SCALES:
            raise ValueError(f"AttentionConfig: k_scales must be one of {ref.K_SCALES}, got {self.k_scales!r}")
        if self.int_to_float not in INT_TO_FLOAT:
            raise ValueError(f"AttentionConfig: int_to_float must be one of {INT_TO_FLOAT}, got {self.int_to_float!r}")
        if self.block_q != 64:
            raise ValueError(
                f"AttentionConfig: block_q must be 64 (one wgmma M tile per warpgroup), got {self.block_q}"
            )
        if self.block_k not in (64, 128, 256):
            raise ValueError(f"AttentionConfig: block_k must be 64, 128 or 256, got {self.block_k}")
        if self.stages < 2:
            raise ValueError(f"AttentionConfig: stages must be >= 2, got {self.stages}")
        if self.p_round not in P_ROUNDS:
            raise ValueError(f"AttentionConfig: p_round must be one of {P_ROUNDS}, got {self.p_round!r}")
        if self.exp_poly % 64 or not 0 <= self.exp_poly < self.block_k:
            raise ValueError(
                f"AttentionConfig: exp_poly must be a multiple of 64 in [0, block_k={self.block_k}) (a register "
                f"wgmma operand's K granularity), got {self.exp_poly}"
            )
        if self.max_split not in (1, 2, 4, 8) or self.block_k // self.max_split < 16:
            raise ValueError(
                f"AttentionConfig: max_split must be 1, 2, 4 or 8 with block_k / max_split >= 16, got {self.max_split}"
            )
        if self.warpgroups not in WARPGROUPS:
            raise ValueError(f"AttentionConfig: warpgroups must be one of {WARPGROUPS}, got {self.warpgroups}")
        if self.warpgroups == 3 and self.schedule != "round":
            raise ValueError(
                f"AttentionConfig: warpgroups=3 needs schedule='round' (the loop with one turn per warpgroup), "
                f"got schedule={self.schedule!r}"
            )


#: Coefficients of 2^f on [-0.5, 0.5] (degree 3, reweighted least squares on the relative error
#: at Chebyshev nodes: at most 7.5e-5 relative, far under a bf16 unit of P, 2^-9).
EXP2_POLY: tuple[float, ...] = (0.99992807, 0.69326101, 0.24261111, 0.05517153)
_ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: adding it rounds an fp32 of |x| < 2^22 to an integer


def exp2_poly(x: jax.Array) -> jax.Array:
    """2^x for fp32 x <= 0 on the FMA and integer pipes instead of the MUFU unit (FlashAttention-4's
    trick): n = round(x) by the magic-number add, 2^(x - n) by a cubic, and n added to the
    exponent bits. x is clamped at -126 (below it the result is a tiny positive number, a zero for
    the softmax, not 2^x); positive x is not
    handled (the softmax's arguments are <= 0)."""
    x = jnp.maximum(x, -126.0)  # 2^(f) has exponent field 126 or 127: n >= -126 keeps it >= 0
    t = x + _ROUND_MAGIC
    f = x - (t - _ROUND_MAGIC)  # in [-0.5, 0.5]
    c0, c1, c2, c3 = EXP2_POLY
    poly = c0 + f * (c1 + f * (c2 + f * c3))
    n_bits = lax.shift_left(lax.bitcast_convert_type(t, jnp.int32), 23)  # n << 23 (the magic's bits shift out)
    return lax.bitcast_convert_type(lax.bitcast_convert_type(poly, jnp.int32) + n_bits, jnp.float32)


def bf16_by_bits(p: jax.Array) -> jax.Array:
    """fp32 ``p`` in [0, 1] rounded to bf16 with integer arithmetic: add half a bf16 unit to the
    bits and keep the upper 16 (round to nearest, ties away from zero; ``astype`` rounds ties to
    even). No sign or overflow handling: the softmax's P is never negative and at most 1."""
    bits = lax.bitcast_convert_type(p, jnp.int32) + 0x8000
    return lax.bitcast_convert_type(lax.shift_right_logical(bits, 16).astype(jnp.int16), jnp.bfloat16)


def _swizzle_transforms(row_bytes: int, elem_bytes: int):
    import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

    swizzle = min(128, row_bytes)
    return (plgpu.TilingTransform((8, swizzle // elem_bytes)), plgpu.SwizzleTransform(swizzle))


#: Named phases a compute warpgroup records per key step when profiled (an upper bound).
PROFILE_RANGES_PER_STEP = 8


def _compiler_params(profile_dir: str = "", steps: int = 0):
    """approx_math, and with ``profile_dir`` the Mosaic GPU profiler: each warpgroup records its
    named phases (``jax.named_scope`` in the kernel) with the SM clock, room for ``steps`` steps."""
    import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

    profile = {}
    if profile_dir:
        profile = dict(profile_space=PROFILE_RANGES_PER_STEP * steps + 16, profile_dir=profile_dir)
    try:
        return plgpu.CompilerParams(approx_math=True, **profile)
    except TypeError:  # a JAX without the flag
        return plgpu.CompilerParams(**profile)


# jit: every call site with the same shapes and config shares one lowered kernel (a model's
# repeated layers lower it once instead of once per layer: minutes of compile time).
@functools.partial(jax.jit, static_argnames=("causal", "config", "tq_out"))
def attention_pallas(
    q8: jax.Array,
    k8: jax.Array,
    vv: jax.Array,
    qrow: jax.Array,
    ks: jax.Array,
    vs: jax.Array,
    *,
    causal: bool,
    config: AttentionConfig,
    tq_out: int | None = None,
) -> jax.Array:
    """Runs the kernel on prepared, padded operands.

    ``q8`` [B, Tq, H, D] and ``k8`` [B, Tk, H, D] 8-bit codes (Tq a multiple of
    ``config.warpgroups * block_q``, Tk of ``block_k``); ``vv`` bf16 [B, Tk, H, D] or e4m3 [B, H, D, Tk];
    ``qrow`` f32 [B, H, 2, Tq] (row 0: Q scale * sm_scale * log2 e, row 1: padding-key
    count); ``ks`` f32 K scales: [B, H, Tk] per token (``config.k_scales == "token"``) or
    [B, H, R, 32] per block (block j at [j // 32, j % 32]);
    ``vs`` f32 [B, H, D] (V scale / 448 for fp8, unused for bf16). Returns bf16 [B, Tq, H, D].
    With ``config.unpadded``, a bf16 ``vv`` may hold fewer keys than ``k8`` (the rest read as
    zeros) and the output has ``tq_out`` rows (required, at most Tq).
    """
    import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
    import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

    batch_size, tq, heads, head_dim = q8.shape
    tk = k8.shape[1]
    block_q, block_kv = config.block_q, config.block_k
    pv_fp8 = vv.dtype != jnp.bfloat16
    p_in_smem = pv_fp8 or config.p_smem  # P V reads P from shared memory (else from registers)
    int_qk = q8.dtype == jnp.int8
    acc_qk_dtype = jnp.int32 if int_qk else jnp.float32
    num_kv_steps = tk // block_kv
    max_concurrent_steps = min(config.stages, num_kv_steps)
    token_scales = config.k_scales == "token"
    ks_rows = 0 if token_scales else ks.shape[2]
    if causal and config.schedule == "round":
        raise ValueError("attention_pallas: schedule='round' runs non-causal calls only")
    compute_wgs = config.warpgroups
    round_robin = config.schedule == "round"
    overlapped_loop = config.overlap and not causal and not round_robin
    if config.exp_poly and (vv.dtype != jnp.bfloat16 or config.p_smem or overlapped_loop or round_robin):
        raise ValueError(
            "attention_pallas: exp_poly runs in the plain loop with bf16 P from registers "
            "(pv_format='bf16', p_smem=False, no overlap, schedule 'pingpong' or 'none')"
        )
    num_q_tiles = tq // (compute_wgs * block_q)
    tq_rows = tq
    if config.unpadded:
        m = UNPADDED_MULTIPLE
        v_ok = pv_fp8 or (0 < vv.shape[1] <= tk and vv.shape[1] % m == 0)
        if tq_out is None or not 0 < tq_out <= tq or tq_out % m or not v_ok:
            raise ValueError(
                f"attention_pallas: unpadded needs 0 < tq_out <= {tq} and a bf16 V of at most {tk} keys,"
                f" both multiples of {m} (TMA's tiled copies), got tq_out={tq_out}, V {vv.shape}"
            )
        tq_rows = tq_out
    out_dtype = jnp.bfloat16
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    col_layout = plgpu.Layout.WGMMA.reduce(0)

    def kernel(q_ref, k_ref, v_ref, qrow_ref, ks_ref, vs_ref, out_ref, scoped):
        batch = lax.axis_index("batch")
        head = lax.axis_index("heads")
        q_tile = lax.axis_index("q_seq")
        wg_idx = lax.axis_index("wg")
        smem, bars, consumed, schedule_barrier, turn_barriers = scoped
        free_running = config.schedule in ("none", "round")  # "round" takes turns, not the barrier
        q_smem2, o_smem2, k_smem, v_smem, p_smem2, qrow_smem2, ks_smem2, vs_smem2 = smem
        k_barriers, v_barriers, q_barriers, qrow_barriers, ks_barriers, vs_barriers, kt_barriers = bars
        k_consumed_barriers, v_consumed_barriers = consumed

        def perform_schedule_barrier():
            if free_running:
                return
            plgpu.barrier_arrive(schedule_barrier)
            plgpu.barrier_wait(schedule_barrier)

        if causal:
            block_q_end = (q_tile + 1) * (compute_wgs * block_q)
            block_max_kv_steps = pl.cdiv(block_q_end, jnp.array(block_kv, jnp.int32))
        else:
            block_max_kv_steps = num_kv_steps

        @pl.when(wg_idx < compute_wgs)
        def _compute_wg():
            plgpu.set_max_registers(232 if compute_wgs == 2 else 160, action="increase")
            q_smem = q_smem2.at[wg_idx]
            o_smem = o_smem2.at[wg_idx]
            qrow_smem = qrow_smem2.at[wg_idx]
            q_seq_base = q_tile * (compute_wgs * block_q) + wg_idx * block_q

            if causal:
                kv_steps = pl.cdiv(q_seq_base + block_q, jnp.array(block_kv, jnp.int32))
            else:
                kv_steps = block_max_kv_steps

            plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_seq_base, block_q), head], q_smem, q_barriers.at[wg_idx])
            plgpu.copy_gmem_to_smem(
                qrow_ref.at[batch, head, :, pl.ds(q_seq_base, block_q)], qrow_smem, qrow_barriers.at[wg_idx]
            )
            if not token_scales:
                plgpu.copy_gmem_to_smem(ks_ref.at[batch, head], ks_smem2.at[wg_idx], ks_barriers.at[wg_idx])
            if pv_fp8:
                plgpu.copy_gmem_to_smem(vs_ref.at[batch, head], vs_smem2.at[wg_idx], vs_barriers.at[wg_idx])
            plgpu.barrier_wait(qrow_barriers.at[wg_idx])
            if not token_scales:
                plgpu.barrier_wait(ks_barriers.at[wg_idx])
            q_scale = plgpu.load(qrow_smem.at[0], (), layout=row_layout)
            pad_count = plgpu.load(qrow_smem.at[1], (), layout=row_layout)
            plgpu.barrier_wait(q_barriers.at[wg_idx])

            m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, dtype=jnp.float32), row_layout)
            l_i = plgpu.layout_cast(jnp.full((block_q,), 0, dtype=jnp.float32), row_layout)
            acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0, dtype=jnp.float32), plgpu.Layout.WGMMA)
            magic_init = config.magic_init and int_qk and config.int_to_float == "magic"

            def exp2_tile(x):
                """2^x of a tile; with ``config.exp_poly`` a pair of column pieces (Mosaic GPU has no
                concatenate, so P V then takes one wgmma per piece): MUFU for the first, the
                polynomial for the last ``exp_poly`` columns."""
                if not config.exp_poly:
                    return jnp.exp2(x)
                cut = x.shape[1] - config.exp_poly
                return (jnp.exp2(x[:, :cut]), exp2_poly(x[:, cut:]))

            def row_max(x):
                """Each row's max, over ``config.max_split`` column slices combined as a tree."""
                if config.max_split == 1:
                    return x.max(axis=1)
                width = x.shape[1] // config.max_split
                parts = [x[:, i * width : (i + 1) * width].max(axis=1) for i in range(config.max_split)]
                while len(parts) > 1:
                    parts = [jnp.maximum(a, b) for a, b in zip(parts[::2], parts[1::2])]
                return parts[0]

            def row_sum(p):
                return sum(piece.sum(axis=1) for piece in p) if isinstance(p, tuple) else p.sum(axis=1)

            def p_bf16(p):
                """P (or its pieces) rounded to bf16 for P V, as ``config.p_round`` says."""
                if isinstance(p, tuple):
                    return tuple(p_bf16(piece) for piece in p)
                return p.astype(jnp.bfloat16) if config.p_round == "cvt" else bf16_by_bits(p)

            def v_operand(slot):  # P V's B operand: fp8 V is stored [D, T] (8-bit wgmma wants K-major)
                return plgpu.transpose_ref(v_smem.at[slot], (1, 0)) if pv_fp8 else v_smem.at[slot]

            def magic_acc():
                bits = jnp.full((block_q, block_kv), _common.MAGIC_BITS, dtype=jnp.int32)
                return plgpu.layout_cast(bits, plgpu.Layout.WGMMA)

            @pl.when(kv_steps > 0)
            def _():
                plgpu.barrier_wait(k_barriers.at[0])

            def tile_softmax(qk, slot, kv_step, causal_step: bool, m_i, biased: bool = False, after_max=None):
                """Online softmax of one tile of Q K^T accumulators: (p, alpha, new running max), in
                log2 units (log2 e is folded into the Q scale); releases the K slot. ``biased``: the
                int32 accumulator already holds the magic bias; ``after_max()`` runs once the new
                row maxima are known (per-tile K with ``raw_max`` only)."""
                shape = qk.shape
                magic = int_qk and config.int_to_float == "magic"
                if token_scales:
                    # x = codes . codes * k_scale (per column); the score is x * q_scale (per row).
                    plgpu.barrier_wait(kt_barriers.at[slot])
                    scale = plgpu.load(ks_smem2.at[slot], (), layout=col_layout)
                    dim = 1
                else:
                    scale = q_scale * ks_smem2[wg_idx, lax.div(kv_step, 32), lax.rem(kv_step, 32)]
                    dim = 0
                plgpu.barrier_arrive(k_consumed_barriers.at[slot])
                if magic:  # MAGIC_VALUE + codes . codes
                    raw = lax.bitcast_convert_type(qk, jnp.float32) if biased else _common.biased_int32_to_float32(qk)
                    bias = scale * -_common.MAGIC_VALUE
                else:
                    raw = qk.astype(jnp.float32) if int_qk else qk
                    bias = None
                if causal_step:
                    q_ids = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
                    kv_ids = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
                    mask = (q_ids + q_seq_base) >= (kv_ids + kv_step * block_kv)
                    raw = jnp.where(mask, raw, -jnp.inf)

                def rows(r):
                    return lax.broadcast_in_dim(r, shape, [0])

                if not token_scales and config.raw_max:
                    # The row scale is > 0, so the max commutes with it: take the max on the raw
                    # values and fold scale, bias and max into the one FMA that feeds exp2.
                    m_tile = row_max(raw) * scale + (0.0 if bias is None else bias)
                    m_ij = jnp.maximum(m_i, m_tile)
                    if after_max is not None:
                        m_ij = lax.optimization_barrier(m_ij)
                        after_max()
                        m_ij = lax.optimization_barrier(m_ij)
                    offset = -m_ij if bias is None else bias - m_ij
                    p = exp2_tile(raw * rows(scale) + rows(offset))
                    return p, jnp.exp2(m_i - m_ij), m_ij
                x = raw * lax.broadcast_in_dim(scale, shape, [dim])
                if bias is not None:
                    x = x + lax.broadcast_in_dim(bias, shape, [dim])
                if token_scales:  # Q scale > 0, so max(x * q) = max(x) * q
                    m_ij = jnp.maximum(m_i, x.max(axis=1) * q_scale)
                    p = exp2_tile(x * rows(q_scale) - rows(m_ij))
                else:
                    m_ij = jnp.maximum(m_i, x.max(axis=1))
                    p = exp2_tile(x - rows(m_ij))
                return p, jnp.exp2(m_i - m_ij), m_ij

            def kv_loop(kv_step, carry, causal_step: bool = False):
                acc, m_i, l_i = carry
                slot = lax.rem(kv_step, jnp.array(max_concurrent_steps, kv_step.dtype))

                def issue_qk(acc_ref):
                    with jax.named_scope("qk_issue"):
                        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    with jax.named_scope("turn_wait"):
                        perform_schedule_barrier()

                def compute_qk(acc_ref):
                    issue_qk(acc_ref)
                    with jax.named_scope("qk_wait"):
                        return acc_ref[...]

                if magic_init:
                    qk = pl.run_state(issue_qk)(plgpu.ACC.init(magic_acc()))
                else:
                    qk = pl.run_scoped(compute_qk, plgpu.ACC((block_q, block_kv), acc_qk_dtype))
                handoff = "end" if free_running else config.handoff
                if handoff == "max" and (token_scales or not config.raw_max):
                    handoff = "exp"  # the scaled max is not a separate phase there
                after_max = (lambda: plgpu.barrier_arrive(schedule_barrier)) if handoff == "max" else None
                with jax.named_scope("softmax"):
                    p, alpha, m_i = tile_softmax(qk, slot, kv_step, causal_step, m_i, magic_init, after_max)
                    if handoff == "exp":  # the exponentials done, the other warpgroup's softmax may start
                        p, alpha, m_i = lax.optimization_barrier((p, alpha, m_i))
                        plgpu.barrier_arrive(schedule_barrier)
                    if not config.fresh_pv:
                        acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
                    l_i *= alpha
                    # The optimization barrier cannot carry 2-element 8-bit register vectors, so
                    # the fp8 cast of P happens after it.
                    p_op = p * ref.P_SCALE if pv_fp8 else p_bf16(p)
                    l_i += row_sum(p)
                    acc, l_i, m_i, p_op, alpha = lax.optimization_barrier((acc, l_i, m_i, p_op, alpha))
                    if pv_fp8:
                        p_op = p_op.astype(jnp.float8_e4m3fn)

                def end_softmax_barriers():
                    if not free_running and handoff == "end":
                        plgpu.barrier_arrive(schedule_barrier)
                    plgpu.barrier_wait(v_barriers.at[slot])
                    if not free_running:
                        plgpu.barrier_wait(schedule_barrier)

                with jax.named_scope("turn_wait"):
                    end_softmax_barriers()

                def compute_pv(acc_ref):
                    with jax.named_scope("pv_issue"):
                        if p_in_smem:
                            p_smem = p_smem2.at[wg_idx]
                            p_smem[...] = p_op
                            plgpu.commit_smem()
                            plgpu.wgmma(acc_ref, p_smem, v_operand(slot))
                        elif isinstance(p_op, tuple):  # column pieces (exp_poly): one wgmma each
                            start = 0
                            for piece in p_op:
                                width = piece.shape[1]
                                plgpu.wgmma(acc_ref, piece, v_smem.at[slot, pl.ds(start, width)])
                                start += width
                        else:
                            plgpu.wgmma(acc_ref, p_op, v_smem.at[slot])
                    wait_step = kv_step + 1
                    wait_slot = lax.rem(wait_step, jnp.array(max_concurrent_steps, kv_step.dtype))

                    @pl.when(wait_step < kv_steps)
                    def _wait():
                        with jax.named_scope("k_wait"):
                            plgpu.barrier_wait(k_barriers.at[wait_slot])

                if config.fresh_pv:

                    def fresh_pv(pv_ref):
                        compute_pv(pv_ref)
                        return pv_ref[...]

                    with jax.named_scope("pv"):
                        pv = pl.run_scoped(fresh_pv, plgpu.ACC((block_q, head_dim), jnp.float32))
                    with jax.named_scope("rescale"):
                        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
                else:
                    with jax.named_scope("pv"):
                        acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_consumed_barriers.at[slot])
                return acc, m_i, l_i

            def slot_of(step):
                return lax.rem(step, jnp.array(max_concurrent_steps, step.dtype))

            def finish_steps(o_ref, step_fn, m, l, p_op, take_turn, issue_pv):
                """The overlapped and round-robin loops' common part: ``step_fn`` over tiles
                1 .. n - 1 (carrying m, l and P when P V takes it from registers), then the last
                tile's P V in this warpgroup's turn; returns (output, m, l) once it has landed."""
                carry = lax.fori_loop(1, block_max_kv_steps, step_fn, (m, l) if p_op is None else (m, l, p_op))
                m, l = carry[:2]
                p_op = carry[2] if len(carry) == 3 else None
                last = jnp.array(block_max_kv_steps - 1, jnp.int32)
                take_turn(lambda: issue_pv(p_op, last))
                o = o_ref[...]
                plgpu.barrier_arrive(v_consumed_barriers.at[slot_of(last)])
                return o, m, l

            def overlapped(o_ref):
                """FA3's intra-warpgroup overlap (non-causal): Q K^T of tile j and P V of tile
                j - 1 are issued together, tile j's softmax runs while P V is in flight, and the
                output is rescaled by tile j's alpha once P V has landed. With fp8 P V, P
                alternates between two shared-memory buffers per warpgroup."""
                pingpong = not free_running

                def take_turn(issue):  # the warpgroups alternate on the tensor cores
                    if pingpong:
                        plgpu.barrier_wait(turn_barriers.at[wg_idx])
                    issue()
                    if pingpong:
                        plgpu.barrier_arrive(turn_barriers.at[1 - wg_idx])  # two warpgroups

                def issue_pv(p_op, step):
                    slot = slot_of(step)
                    plgpu.barrier_wait(v_barriers.at[slot])
                    if p_in_smem:
                        p_buf = p_smem2.at[wg_idx * 2 + lax.rem(step, jnp.array(2, step.dtype))]
                        plgpu.wgmma(o_ref, p_buf, v_operand(slot))
                    else:
                        plgpu.wgmma(o_ref, p_op, v_smem.at[slot])

                def softmax(qk, step, m, l):
                    p, alpha, m = tile_softmax(qk, slot_of(step), step, False, m)
                    l = l * alpha + p.sum(axis=1)
                    if p_in_smem:  # the buffer P V of step - 2 read, which has landed
                        p_buf = p_smem2.at[wg_idx * 2 + lax.rem(step, jnp.array(2, step.dtype))]
                        p_buf[...] = (p * ref.P_SCALE).astype(jnp.float8_e4m3fn) if pv_fp8 else p_bf16(p)
                        plgpu.commit_smem()
                        p_op = None  # P lives in shared memory
                    else:
                        p_op = p_bf16(p)
                    return p_op, alpha, m, l

                o_ref[...] = plgpu.layout_cast(jnp.full((block_q, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
                first = jnp.array(0, jnp.int32)

                def first_qk(s_ref):
                    take_turn(lambda: plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[0], (1, 0))))
                    return s_ref[...]

                qk = pl.run_scoped(first_qk, plgpu.ACC((block_q, block_kv), acc_qk_dtype))
                p_op, _, m, l = softmax(qk, first, m_i, l_i)

                def step_fn(step, carry):
                    m, l, *p_prev = carry  # P of the previous tile in registers (bf16 P V only)
                    p_prev = p_prev[0] if p_prev else None
                    with jax.named_scope("k_wait"):
                        plgpu.barrier_wait(k_barriers.at[slot_of(step)])

                    def both(s_ref):
                        def issue():
                            plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot_of(step)], (1, 0)))
                            issue_pv(p_prev, step - 1)

                        with jax.named_scope("turn_wait"):  # the issue included
                            take_turn(issue)
                        with jax.named_scope("qk_wait"):
                            return plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # Q K^T, issued first

                    qk = pl.run_scoped(both, plgpu.ACC((block_q, block_kv), acc_qk_dtype))
                    with jax.named_scope("softmax"):
                        p_op, alpha, m, l = softmax(qk, step, m, l)
                    with jax.named_scope("pv_wait"):
                        o = plgpu.wgmma_accumulator_load(o_ref, wait_n=0)
                    plgpu.barrier_arrive(v_consumed_barriers.at[slot_of(step - 1)])
                    with jax.named_scope("rescale"):
                        o_ref[...] = o * lax.broadcast_in_dim(alpha, o.shape, [0])
                    return (m, l) if p_op is None else (m, l, p_op)

                return finish_steps(o_ref, step_fn, m, l, p_op, take_turn, issue_pv)

            def round_robin_loop(o_ref):
                """The round-robin loop (non-causal): in its turn a warpgroup issues P V of tile
                j - 1 and Q K^T of tile j together and hands the turn on; it waits for both (so
                neither the output accumulator nor the previous P is in flight during the
                softmax), then rescales the output and runs tile j's softmax while the other
                warpgroups' GEMMs run. P stays in registers (bf16) or goes through one shared-memory
                buffer per warpgroup (``p_smem``, fp8): P V of tile j - 1 has landed before tile j's
                P is written."""

                def take_turn(issue):
                    plgpu.barrier_wait(turn_barriers.at[wg_idx])
                    issue()
                    plgpu.barrier_arrive(turn_barriers.at[lax.rem(wg_idx + 1, compute_wgs)])

                def issue_pv(p_op, step):
                    slot = slot_of(step)
                    plgpu.barrier_wait(v_barriers.at[slot])
                    if p_in_smem:
                        plgpu.wgmma(o_ref, p_smem2.at[wg_idx], v_operand(slot))
                    else:
                        plgpu.wgmma(o_ref, p_op, v_smem.at[slot])

                def issue_qk(s_ref, step):
                    plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot_of(step)], (1, 0)))

                def scores(issue):
                    """Runs ``issue(s_ref)`` in this warpgroup's turn; returns Q K^T once every
                    wgmma it issued has landed. (The accumulator starts at the magic bias by a
                    store: ``run_state`` cannot hold the turn barriers.)"""

                    def body(s_ref):
                        if magic_init:
                            s_ref[...] = magic_acc()
                        with jax.named_scope("turn_wait"):  # the issue included
                            take_turn(lambda: issue(s_ref))
                        with jax.named_scope("qk_wait"):
                            return plgpu.wgmma_accumulator_load(s_ref, wait_n=0)

                    return pl.run_scoped(body, plgpu.ACC((block_q, block_kv), acc_qk_dtype))

                def softmax(qk, step, m, l):
                    p, alpha, m = tile_softmax(qk, slot_of(step), step, False, m, magic_init)
                    l = l * alpha + p.sum(axis=1)
                    if p_in_smem:
                        p_smem2[wg_idx] = (p * ref.P_SCALE).astype(jnp.float8_e4m3fn) if pv_fp8 else p_bf16(p)
                        plgpu.commit_smem()
                        return None, alpha, m, l
                    return p_bf16(p), alpha, m, l

                o_ref[...] = plgpu.layout_cast(jnp.full((block_q, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
                first = jnp.array(0, jnp.int32)
                qk = scores(lambda s_ref: issue_qk(s_ref, first))
                with jax.named_scope("softmax"):
                    p_op, _, m, l = softmax(qk, first, m_i, l_i)

                def step_fn(step, carry):
                    m, l, *p_prev = carry  # P of the previous tile in registers (bf16 P V only)
                    p_prev = p_prev[0] if p_prev else None
                    with jax.named_scope("k_wait"):
                        plgpu.barrier_wait(k_barriers.at[slot_of(step)])

                    def issue(s_ref):
                        issue_pv(p_prev, step - 1)
                        issue_qk(s_ref, step)

                    qk = scores(issue)
                    plgpu.barrier_arrive(v_consumed_barriers.at[slot_of(step - 1)])
                    with jax.named_scope("softmax"):
                        p_op, alpha, m, l = softmax(qk, step, m, l)
                    with jax.named_scope("rescale"):
                        o_ref[...] = o_ref[...] * lax.broadcast_in_dim(alpha, (block_q, head_dim), [0])
                    return (m, l) if p_op is None else (m, l, p_op)

                return finish_steps(o_ref, step_fn, m, l, p_op, take_turn, issue_pv)

            if round_robin:  # warpgroup 0 takes the first turn
                pl.when(wg_idx == compute_wgs - 1)(lambda: plgpu.barrier_arrive(turn_barriers.at[0]))
                acc, m_i, l_i = pl.run_scoped(round_robin_loop, plgpu.ACC((block_q, head_dim), jnp.float32))
            elif overlapped_loop:
                if not free_running:  # warpgroup 0 takes the first turn
                    pl.when(wg_idx == 1)(lambda: plgpu.barrier_arrive(turn_barriers.at[0]))
                acc, m_i, l_i = pl.run_scoped(overlapped, plgpu.ACC((block_q, head_dim), jnp.float32))
            elif not causal:
                pl.when(wg_idx == 1)(perform_schedule_barrier)
                acc, m_i, l_i = lax.fori_loop(0, block_max_kv_steps, kv_loop, (acc, m_i, l_i))
                pl.when(wg_idx == 0)(perform_schedule_barrier)
            else:
                pl.when(wg_idx == 1)(perform_schedule_barrier)

                def epilogue_kv_loop(kv_step, _):
                    slot = lax.rem(kv_step, jnp.array(max_concurrent_steps, kv_step.dtype))
                    plgpu.barrier_arrive(k_consumed_barriers.at[slot])
                    plgpu.barrier_arrive(v_consumed_barriers.at[slot])
                    perform_schedule_barrier()
                    perform_schedule_barrier()

                causal_kv_loop = functools.partial(kv_loop, causal_step=True)
                full_kv_steps = lax.div(q_seq_base, jnp.array(block_kv, jnp.int32))
                acc, m_i, l_i = lax.fori_loop(0, full_kv_steps, kv_loop, (acc, m_i, l_i))
                acc, m_i, l_i = lax.fori_loop(full_kv_steps, kv_steps, causal_kv_loop, (acc, m_i, l_i))
                lax.fori_loop(kv_steps, block_max_kv_steps, epilogue_kv_loop, None)
                pl.when(wg_idx == 0)(perform_schedule_barrier)

            # Each zero padding key added exactly 2^(0 - m) to l and nothing to acc.
            l_real = l_i - pad_count * jnp.exp2(-m_i)
            inv = 1.0 / l_real
            out = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
            if pv_fp8:
                plgpu.barrier_wait(vs_barriers.at[wg_idx])
                v_scale = plgpu.load(vs_smem2.at[wg_idx], (), layout=col_layout)
                out = out * lax.broadcast_in_dim(v_scale, acc.shape, [1])
            o_smem[...] = out.astype(out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, out_ref.at[batch, pl.ds(q_seq_base, block_q), head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg_idx == compute_wgs)
        def _memory_wg():
            plgpu.set_max_registers(40 if compute_wgs == 2 else 24, action="decrease")

            def k_src(step):
                return k_ref.at[batch, pl.ds(step * block_kv, block_kv), head]

            def v_src(step):
                if pv_fp8:
                    return v_ref.at[batch, head, :, pl.ds(step * block_kv, block_kv)]
                start = step * block_kv
                if config.unpadded:  # a traced start: Pallas bounds-checks static slices against V's length
                    start = start + 0 * batch
                return v_ref.at[batch, pl.ds(start, block_kv), head]

            def load_k(step, slot):
                plgpu.copy_gmem_to_smem(k_src(step), k_smem.at[slot], k_barriers.at[slot])
                if token_scales:
                    plgpu.copy_gmem_to_smem(
                        ks_ref.at[batch, head, pl.ds(step * block_kv, block_kv)],
                        ks_smem2.at[slot],
                        kt_barriers.at[slot],
                    )

            for i in range(max_concurrent_steps):
                load_k(i, i)
                plgpu.copy_gmem_to_smem(v_src(i), v_smem.at[i], v_barriers.at[i])

            @pl.loop(0, block_max_kv_steps - max_concurrent_steps)
            def _kv_loop(kv_step):
                tma_step = kv_step + max_concurrent_steps
                tma_slot = lax.rem(kv_step, jnp.array(max_concurrent_steps, kv_step.dtype))
                plgpu.barrier_wait(k_consumed_barriers.at[tma_slot])
                load_k(tma_step, tma_slot)
                plgpu.barrier_wait(v_consumed_barriers.at[tma_slot])
                plgpu.copy_gmem_to_smem(v_src(tma_step), v_smem.at[tma_slot], v_barriers.at[tma_slot])

    def entry(q_ref, k_ref, v_ref, qrow_ref, ks_ref, vs_ref, out_ref):
        qk_t = _swizzle_transforms(head_dim, 1)
        q_scratch = plgpu.SMEM((compute_wgs, block_q, head_dim), q8.dtype, transforms=qk_t)
        k_scratch = plgpu.SMEM((max_concurrent_steps, block_kv, head_dim), k8.dtype, transforms=qk_t)
        o_scratch = plgpu.SMEM(
            (compute_wgs, block_q, head_dim), out_dtype, transforms=_swizzle_transforms(head_dim * 2, 2)
        )
        if pv_fp8:
            v_scratch = plgpu.SMEM(
                (max_concurrent_steps, head_dim, block_kv), vv.dtype, transforms=_swizzle_transforms(block_kv, 1)
            )
            p_buffers = compute_wgs * (2 if overlapped_loop else 1)
            p_scratch = plgpu.SMEM(
                (p_buffers, block_q, block_kv), vv.dtype, transforms=_swizzle_transforms(block_kv, 1)
            )
            vs_scratch = plgpu.SMEM((compute_wgs, head_dim), jnp.float32)
        else:
            v_scratch = plgpu.SMEM(
                (max_concurrent_steps, block_kv, head_dim),
                jnp.bfloat16,
                transforms=_swizzle_transforms(head_dim * 2, 2),
            )
            vs_scratch = None
            p_scratch = None
            if config.p_smem:
                p_buffers = compute_wgs * (2 if overlapped_loop else 1)
                p_scratch = plgpu.SMEM(
                    (p_buffers, block_q, block_kv), jnp.bfloat16, transforms=_swizzle_transforms(block_kv * 2, 2)
                )
        qrow_scratch = plgpu.SMEM((compute_wgs, 2, block_q), jnp.float32)
        if token_scales:  # a ring beside the K tiles
            ks_scratch = plgpu.SMEM((max_concurrent_steps, block_kv), jnp.float32)
        else:  # every block scale of the (batch, head), one copy per compute warpgroup
            ks_scratch = plgpu.SMEM((compute_wgs, ks_rows, 32), jnp.float32)
        smem = (q_scratch, o_scratch, k_scratch, v_scratch, p_scratch, qrow_scratch, ks_scratch, vs_scratch)
        per_wg = lambda: plgpu.Barrier(num_barriers=compute_wgs)
        bars = (
            plgpu.Barrier(num_barriers=max_concurrent_steps),
            plgpu.Barrier(num_barriers=max_concurrent_steps),
            per_wg(),
            per_wg(),
            per_wg(),
            per_wg(),
            plgpu.Barrier(num_barriers=max_concurrent_steps),
        )
        consumed = (plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=max_concurrent_steps),) * 2
        pl.run_scoped(
            lambda *args: kernel(q_ref, k_ref, v_ref, qrow_ref, ks_ref, vs_ref, out_ref, args),
            smem,
            bars,
            consumed,
            plgpu.Barrier(num_arrivals=compute_wgs),
            plgpu.Barrier(num_barriers=compute_wgs),  # the overlapped loop's turns
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((batch_size, tq_rows, heads, head_dim), out_dtype),
        grid=(heads, num_q_tiles, batch_size),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=compute_wgs + 1,
        thread_name="wg",
        compiler_params=_compiler_params(config.profile_dir, num_kv_steps),
    )(q8, k8, vv, qrow, ks, vs)


def prepare_kernel_operands(
    q,
    k,
    v,
    *,
    causal,
    kv_lengths,
    qk_format,
    pv_format,
    config: AttentionConfig,
    smooth_k: bool,
    hadamard: bool,
    sm_scale: float,
    smooth_v: bool = True,
    prologue: attn_prep.Prologue | None = None,
):
    """Quantizes and pads the operands into the kernel's layouts (one XLA fusion).

    Returns ``(operands, v_mean)``: the six arguments of :func:`attention_pallas`, and the V
    mean [B, H, D] to add to its output (None without V smoothing). ``prologue``: q and k are
    raw projections; :mod:`pallas_kernels.attn_prep` applies it in its pass where it may
    (:func:`attn_prep.supports_prologue`), XLA first otherwise.
    """
    b, tq, h, d = q.shape
    tk = k.shape[1]
    tq_p = _common.round_up(tq, config.warpgroups * config.block_q)
    tk_p = _common.round_up(tk, config.block_k)
    fused_ok = tq_p % 128 == 0 and tk_p % 128 == 0 and config.block_k in attn_prep.TILES  # whole 128-token tiles
    fused = fused_ok and attn_prep.supports(q, k, kv_lengths)
    if prologue is not None and not (fused and attn_prep.supports_prologue(prologue)):
        q, k = prologue.apply(q, k)
        prologue = None
    if fused:
        return _fused_operands(
            q, k, v, qk_format, pv_format, config, smooth_k, hadamard, sm_scale, smooth_v, tq_p, tk_p, causal, prologue
        )
    prep = ref.prepare(
        q,
        k,
        v,
        kv_lengths=kv_lengths,
        qk_format=qk_format,
        pv_format=pv_format,
        block_k=config.block_k,
        smooth_k=smooth_k,
        hadamard=hadamard,
        smooth_v=smooth_v,
        k_scales=config.k_scales,
    )
    q8 = _common.pad_axis(prep.q_codes, 1, tq_p)
    k8 = _common.pad_axis(prep.k_codes, 1, tk_p)
    q_scale = _common.pad_axis(prep.q_scale, 1, tq_p, value=1.0) * (sm_scale * ref.LOG2E)
    if causal:
        pad_keys = jnp.zeros((b,), jnp.float32)  # the causal mask already hides them
    else:
        lengths = jnp.full((b,), tk, jnp.int32) if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
        pad_keys = (tk_p - lengths).astype(jnp.float32)
    qrow = jnp.stack(
        [jnp.transpose(q_scale, (0, 2, 1)), jnp.broadcast_to(pad_keys[:, None, None], (b, h, tq_p))], axis=2
    )
    if config.k_scales == "token":
        ks = _common.pad_axis(prep.k_scale, 2, tk_p, value=1.0)  # [B, H, Tk]
    else:
        rows = _common.cdiv(tk_p // config.block_k, 32)
        ks = _common.pad_axis(prep.k_scale, 2, rows * 32, value=1.0).reshape(b, h, rows, 32)
    if pv_format == "fp8_e4m3":
        vv = jnp.transpose(_common.pad_axis(prep.v, 1, tk_p), (0, 2, 3, 1))  # [B, H, D, Tk]
        vs = prep.v_scale / ref.P_SCALE
    else:
        vv = prep.v if config.unpadded else _common.pad_axis(prep.v, 1, tk_p)
        vs = prep.v_scale
    return (q8, k8, vv, qrow, ks, vs), prep.v_mean


def _fused_operands(
    q, k, v, qk_format, pv_format, config, smooth_k, hadamard, sm_scale, smooth_v, tq_p, tk_p, causal, prologue=None
):
    """:func:`prepare_kernel_operands` with Q and K from :mod:`pallas_kernels.attn_prep` (one
    pass each, codes and scales written in the kernel's padded layouts); every key valid. With a
    ``prologue`` the pass applies it to the raw q and k; K's smoothing mean is the mean of the
    prologue's K (an XLA reduction over K that writes nothing of K's size)."""
    b, tq, h, d = q.shape
    tk = k.shape[1]
    q_norm, q_rope = (None, None) if prologue is None else attn_prep.prologue_operands(q, prologue, "q")
    k_norm, k_rope = (None, None) if prologue is None else attn_prep.prologue_operands(k, prologue, "k")
    q8, q_scale = attn_prep.prep_tokens_pallas(
        q, fmt=qk_format, hadamard=hadamard, tokens_padded=tq_p, norm=q_norm, rope=q_rope
    )
    per_tile = config.k_scales != "token"
    mean = None
    if smooth_k:
        mean = attn_prep.key_mean(k if prologue is None else prologue.apply_one(k, "k"), hadamard)
    k8, ks = attn_prep.prep_tokens_pallas(
        k,
        fmt=qk_format,
        hadamard=hadamard,
        mean=mean,
        per_tile=per_tile,
        tokens_padded=tk_p,
        tile=config.block_k if per_tile else 128,
        norm=k_norm,
        rope=k_rope,
    )
    pad_keys = jnp.full((b,), 0.0 if causal else float(tk_p - tk), jnp.float32)
    qrow = jnp.stack(
        [q_scale * (sm_scale * ref.LOG2E), jnp.broadcast_to(pad_keys[:, None, None], (b, h, tq_p))], axis=2
    )
    if per_tile:
        rows = _common.cdiv(tk_p // config.block_k, 32)
        ks = _common.pad_axis(ks, 2, rows * 32, value=1.0).reshape(b, h, rows, 32)
    valid = ref.key_validity(b, tk, None)
    v_mean = None
    if pv_format == "fp8_e4m3":
        if smooth_v:
            v, v_mean = ref.smooth_values(v, valid)
        v_codes, v_scale = ref.quantize_values(v, valid)
        vv = jnp.transpose(_common.pad_axis(v_codes, 1, tk_p), (0, 2, 3, 1))  # [B, H, D, Tk]
        vs = v_scale / ref.P_SCALE
    else:
        vv = v.astype(jnp.bfloat16)
        vv = vv if config.unpadded else _common.pad_axis(vv, 1, tk_p)
        vs = jnp.ones((b, h, d), jnp.float32)
    return (q8, k8, vv, qrow, ks, vs), v_mean


def supports(q, k, *, causal, kv_lengths, qk_format, pv_format, smooth_k, config: AttentionConfig) -> bool:
    """True where the kernel applies: Hopper, known formats, few enough key blocks, and
    padding only together with K smoothing (see the module docstring)."""
    if not _common.on_hopper():
        return False
    if (qk_format, pv_format) not in KERNEL_FORMATS:
        return False
    tk = k.shape[1]
    if config.k_scales == "block" and _common.cdiv(tk, config.block_k) > MAX_KEY_BLOCKS:
        return False
    if causal and not CAUSAL_ON_KERNEL:
        return False
    if causal and kv_lengths is not None:
        return False  # rows past a length would see zero keys; the reference masks them
    has_padding = kv_lengths is not None or tk % config.block_k
    if has_padding and not smooth_k and not causal:
        return False
    return q.shape[1] > 0 and tk > 0


def quant_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    kv_lengths: jax.Array | None = None,
    qk_format: str = "int8",
    pv_format: str = "bf16",
    block_q: int = 64,
    block_k: int = 128,
    smooth_k: bool = True,
    hadamard: bool = False,
    sm_scale: float | None = None,
    stages: int = 2,
    int_to_float: str = "magic",
    smooth_v: bool = True,
    k_scales: str = "token",
    overlap: bool | None = None,
    schedule: str = "pingpong",
    raw_max: bool = True,
    handoff: str = "end",
    magic_init: bool = True,
    fresh_pv: bool = False,
    p_smem: bool = False,
    warpgroups: int = 2,
    p_round: str = "cvt",
    exp_poly: int = 0,
    max_split: int = 1,
    prologue: attn_prep.Prologue | None = None,
    unpadded: bool | None = None,
) -> jax.Array:
    """Quantized flash attention, bf16 [B, Tq, H, D]: the kernel on Hopper, the reference elsewhere.

    ``prologue`` (a :class:`jquant.models.attention.QKPrologue`): q and k are the raw Q/K
    projections, and attention runs on ``prologue.apply(q, k)``; the fused operand pass
    (:mod:`pallas_kernels.attn_prep`) applies it itself where it may, XLA applies it first
    everywhere else (the reference, ``kv_lengths``, layouts the pass does not take).
    Arguments as :func:`attention_ref.quant_attention_reference`; ``stages``, ``int_to_float``,
    ``overlap``, ``schedule``, ``raw_max``, ``handoff``, ``magic_init``, ``fresh_pv``, ``p_smem``, ``warpgroups``, ``p_round``, ``exp_poly``, ``max_split`` and ``unpadded`` (None: :data:`UNPADDED_DEFAULT`) tune the kernel (see
    :class:`AttentionConfig`; ``schedule="round"`` runs non-causal calls only); ``k_scales`` as
    the reference. ``overlap=None`` takes the measured choice: on for bf16 P V with per-token K
    scales and no causal mask (3% faster on the H200), off otherwise (12% slower with fp8 P V, 6%
    with per-tile K scales).
    """
    ref.check_inputs(
        q,
        k,
        v,
        causal=causal,
        kv_lengths=kv_lengths,
        qk_format=qk_format,
        pv_format=pv_format,
        block_q=block_q,
        block_k=block_k,
        k_scales=k_scales,
    )
    if prologue is not None:
        prologue.check(q, k)
    if overlap is None:  # exp_poly runs in the plain loop only
        overlap = pv_format == "bf16" and k_scales == "token" and not causal and not exp_poly
    config = AttentionConfig(
        block_q=block_q,
        block_k=block_k,
        stages=stages,
        int_to_float=int_to_float,
        k_scales=k_scales,
        overlap=overlap,
        schedule=schedule,
        raw_max=raw_max,
        handoff=handoff,
        magic_init=magic_init,
        fresh_pv=fresh_pv,
        p_smem=p_smem,
        warpgroups=warpgroups,
        p_round=p_round,
        exp_poly=exp_poly,
        max_split=max_split,
        unpadded=UNPADDED_DEFAULT if unpadded is None else unpadded,
    )
    if config.unpadded and (q.shape[1] % UNPADDED_MULTIPLE or k.shape[1] % UNPADDED_MULTIPLE):
        config = dataclasses.replace(config, unpadded=False)
    if causal and schedule == "round":
        raise ValueError("quant_attention: schedule='round' runs non-causal calls only; use 'pingpong' or 'none'")
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if not supports(
        q,
        k,
        causal=causal,
        kv_lengths=kv_lengths,
        qk_format=qk_format,
        pv_format=pv_format,
        smooth_k=smooth_k,
        config=config,
    ):
        if prologue is not None:
            q, k = prologue.apply(q, k)
        return quant_attention_reference(
            q,
            k,
            v,
            causal=causal,
            kv_lengths=kv_lengths,
            qk_format=qk_format,
            pv_format=pv_format,
            block_q=block_q,
            block_k=block_k,
            smooth_k=smooth_k,
            hadamard=hadamard,
            sm_scale=scale,
            smooth_v=smooth_v,
            k_scales=k_scales,
        )
    operands, v_mean = prepare_kernel_operands(
        q,
        k,
        v,
        causal=causal,
        kv_lengths=kv_lengths,
        qk_format=qk_format,
        pv_format=pv_format,
        config=config,
        smooth_k=smooth_k,
        hadamard=hadamard,
        sm_scale=scale,
        smooth_v=smooth_v,
        prologue=prologue,
    )
    tq_out = q.shape[1] if config.unpadded else None  # static: only where it shapes the output
    out = attention_pallas(*operands, causal=causal, config=config, tq_out=tq_out)[:, : q.shape[1]]
    if v_mean is not None:
        out = (out.astype(jnp.float32) + v_mean[:, None]).astype(out.dtype)
    return out
