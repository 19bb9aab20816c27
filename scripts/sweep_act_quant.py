"""Activation quantizer on the GPU, variant by variant, each checked bit for bit against the
reference first; prints microseconds and the fraction of the copy bandwidth measured in the
same run (bytes read + written).

* default: the earlier kernel (4 rows, 4 warps, two chunked passes), the single-pass kernel
  under several (rows, warps), and XLA's fusion -> ``benchmarks/act_quant_sweep-<device>.json``.
* ``--hadamard``: QuaRot's online rotation fused into the quantizer (``hadamard=True``) against
  XLA's ``apply_hadamard`` followed by the quantizer kernel, and all-XLA
  -> ``benchmarks/act_quant_hadamard-<device>.json`` (forces the fused kernel on).
* ``--block B``: the block-diagonal rotation of order ``B`` fused into the quantizer
  (``hadamard=B``, issue 26) under several programs (chunked: rows, warps, pipeline stages; one
  pass over whole rows) against XLA's ``apply_block_hadamard`` followed by the plain quantizer
  kernel, and all-XLA, at 32,760 tokens on Wan2.1's 1.3B and 14B widths
  -> ``benchmarks/act_quant_block-<device>.json`` (forces the kernels on).
* ``--activation gelu_tanh``: the FFN-up output's bias and activation applied as the quantizer
  loads it (``act_quant.quantize_act``) under several programs (one pass, chunked, one pass in
  approximate arithmetic: ``QuantizerConfig.approx``), beside the same kernel without
  the bias, the plain quantizer on the same input, and XLA's activation followed by the plain
  quantizer kernel (the unfused path), at 32,760 tokens on Wan's FFN widths
  -> ``benchmarks/act_quant_activation-<device>.json`` (forces the kernels on).
* ``--jax-triton``: the Triton-language quantizer (:mod:`pallas_kernels.triton_quant`, compiled
  by Triton's own compiler through jax-triton) beside the Pallas one (same single-pass design)
  and XLA -> ``benchmarks/jax_triton_eval-<device>.json``. jax-triton is not on the GPU image:
  carry its wheel (``.whl/``, see the device notes) and install it to a target directory first.

    python scripts/sweep_act_quant.py                         # GPU only
    PYTHONPATH=.:/tmp/site python scripts/sweep_act_quant.py --jax-triton

Run from the repository root: ``python scripts/sweep_act_quant.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/sweep_act_quant.py`` where jquant is not installed (e.g. the GPU machine).
"""

import argparse
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _quant, act_quant, timing, triton_quant

SHAPES = [(4096, 1536), (4096, 3072), (4096, 5120), (4096, 8960), (4096, 12288), (32760, 3072)]
TRITON_SHAPES = [(4096, 1536), (4096, 3072), (4096, 5120), (4096, 8960), (32760, 3072)]
HADAMARD_SHAPES = [(4096, 1536), (4096, 3072), (4096, 5120), (32760, 1536), (32760, 3072), (4096, 8960), (32760, 8960)]
BLOCK_SHAPES = [(32760, 1536), (32760, 8960), (32760, 5120), (32760, 13824)]
ACT_SHAPES = [(32760, 8960), (32760, 13824)]  # Wan2.1-1.3B's and 14B's FFN-down inputs
Q = act_quant.QuantizerConfig


def block_configs(k: int, block: int) -> dict[str, act_quant.QuantizerConfig]:
    """The block rotation's candidate programs for width ``k``: the GPU-checked default (chunked,
    16 rows, 4 warps), more rows, 8 warps and 2-3 pipeline stages, and one pass over whole rows
    (padded to a power of two) where they fit the registers (at least 16 chunks per program)."""
    cfgs = {"chunked_r16_w4": Q(16, 4, False)}
    for rows, warps, stages in ((16, 4, 2), (16, 4, 3), (32, 4, 2), (32, 8, 2), (64, 8, 2), (64, 8, 3)):
        cfgs[f"chunked_r{rows}_w{warps}_s{stages}"] = Q(rows, warps, False, stages)
    width = _quant.padded_width(k)
    if width <= _quant.SINGLE_PASS_MAX:
        for rows in (1, 2, 4, 8):
            if rows * width > 16384 or rows * width // block < 16:
                continue
            for warps in (4, 8) if rows * width <= 8192 else (8, 16):
                cfgs[f"single_r{rows}_w{warps}"] = Q(rows, warps, True)
    return cfgs


def block_variants(block: int):
    """``variants(fmt, k)`` for :func:`measure`: every :func:`block_configs` program and XLA's
    rotation followed by the plain quantizer kernel."""
    from jquant.hadamard import apply_block_hadamard

    def variants(fmt: str, k: int) -> dict:
        out = {
            name: (lambda x, cfg=cfg: act_quant.quantize_pallas(x, fmt, hadamard=block, config=cfg))
            for name, cfg in block_configs(k, block).items()
        }
        out["xla_rotate+kernel"] = lambda x: act_quant.quantize_pallas(
            apply_block_hadamard(x, block, axis=-1).astype(x.dtype), fmt
        )
        return out

    return variants


def activation_variants(activation: str):
    """``variants(fmt, k)`` for :func:`measure` with ``reference=act_reference``: the activation
    quantizer's programs on ``x`` with a zero bias (loaded, as a real one is), without a bias, and
    as baselines (each with its own reference) the plain quantizer and XLA's activation + the
    plain quantizer kernel."""
    from pallas_kernels.fused_producers import ACTIVATIONS

    def variants(fmt: str, k: int) -> dict:
        bias = jnp.zeros((k,), jnp.float32)
        cfgs = {"default": None, "single_r1_w16": Q(1, 16, True), "single_r1_w4": Q(1, 4, True)}
        for rows, warps, stages in ((4, 4, 1), (16, 4, 2), (32, 8, 2), (64, 8, 2)):
            cfgs[f"chunked_r{rows}_w{warps}_s{stages}"] = Q(rows, warps, False, stages)
        # The approximate arithmetic (QuantizerConfig.approx: fewer instructions a value).
        for rows, warps in ((1, 4), (1, 8), (2, 8)):
            cfgs[f"approx_r{rows}_w{warps}"] = Q(rows, warps, True, approx=True)
        out = {
            name: (lambda x, cfg=cfg: act_quant.quantize_pallas(x, fmt, config=cfg, bias=bias, activation=activation))
            for name, cfg in cfgs.items()
        }
        out["default_no_bias"] = lambda x: act_quant.quantize_pallas(x, fmt, activation=activation)
        out["plain_quantizer"] = (lambda x: act_quant.quantize_pallas(x, fmt), lambda x: _quant.reference(x, fmt))

        def unfused(x):  # XLA's activation pass, its bf16 output kept (XLA would drop the round trip)
            return _quant.round_to_bf16(ACTIVATIONS[activation](x.astype(jnp.float32) + bias)).astype(x.dtype)

        out["xla_act+kernel"] = (
            lambda x: act_quant.quantize_pallas(unfused(x), fmt),
            lambda x: _quant.reference(unfused(x), fmt),
        )
        return out

    return variants


def config_variants(fmt: str, k: int) -> dict:
    """The earlier chunked kernel, the default and neighbouring (rows, warps)."""
    base = act_quant.pick_config(k)
    cfgs = {"chunked_r4_w4": Q(4, 4, False), "default": base}
    if base.single_pass:
        cfgs[f"single_r{base.rows}_w4"] = Q(base.rows, 4, True)
        cfgs[f"single_r{base.rows * 2}_w16"] = Q(base.rows * 2, 16, True)
        if base.rows > 1:
            cfgs[f"single_r{base.rows // 2}_w4"] = Q(base.rows // 2, 4, True)
    return {name: (lambda x, cfg=cfg: act_quant.quantize_pallas(x, fmt, config=cfg)) for name, cfg in cfgs.items()}


def triton_variants(fmt: str, k: int) -> dict:
    del k
    return {
        "jax_triton": lambda x: triton_quant.quantize(x, fmt),
        "pallas": lambda x: act_quant.quantize_pallas(x, fmt),
    }


def hadamard_variants(fmt: str, k: int) -> dict:
    from jquant.hadamard import apply_hadamard

    out = {"fused": lambda x: act_quant._fused_hadamard(x, fmt)}  # pylint: disable=protected-access
    lay = act_quant.hadamard_layout(k)
    if lay is not None:
        rows = act_quant.hadamard_config(lay).rows
        out[f"fused_r{2 * rows}_w8"] = lambda x: act_quant.quantize_pallas(x, fmt, hadamard=True, config=Q(2 * rows, 8))
    out["xla_rotate+kernel"] = lambda x: act_quant.quantize_pallas(apply_hadamard(x, axis=-1), fmt)
    return out


def measure(
    shapes,
    variants,
    copy: float,
    hadamard: bool | int = False,
    fmts=("int8", "fp8"),
    activation: str | None = None,
    save=None,
) -> list[dict]:
    """Checks then times ``variants(fmt, k)`` (name -> fn, or (fn, its own reference)) and XLA on
    every shape and format; the reference is the activation quantizer's with ``activation``.
    ``save(rows)`` runs after every shape, so a time limit leaves the rows measured so far."""
    rows = []
    for fmt in fmts:
        ref = lambda x, fmt=fmt: _quant.reference(x, fmt, hadamard)  # pylint: disable=protected-access
        if activation is not None:
            ref = lambda x, fmt=fmt: act_quant.act_reference(x, jnp.zeros((x.shape[1],)), activation, fmt)
        for m, k in shapes:
            sets = [
                (jax.random.normal(jax.random.key(i), (m, k), jnp.float32).astype(jnp.bfloat16) * (1 + i),)
                for i in range(timing.copies_for(3 * m * k))
            ]
            want_all = jax.jit(ref)(*sets[0])
            for name, fn in {**variants(fmt, k), "xla": ref}.items():
                try:
                    want = want_all
                    if isinstance(fn, tuple):
                        fn, own = fn
                        want = jax.jit(own)(*sets[0])
                    got = jax.jit(fn)(*sets[0])
                    exact = all(
                        np.array_equal(np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32))
                        for a, b in zip(got, want)
                    )
                    # float32 sums in another order (a rotation), or another exponential: allow
                    # rare neighbouring codes
                    if (hadamard or activation) and not exact:
                        bits = lambda q: (
                            np.asarray(q).view(np.uint8).astype(np.int32)
                        )  # fp8: adjacent values differ by 1
                        d = np.abs(np.asarray(got[0], np.float32) - np.asarray(want[0], np.float32))
                        if fmt == "fp8":  # +0 / -0 differ in the bits only: count value changes
                            d = np.where(d > 0, np.abs(bits(got[0]) - bits(want[0])), 0)
                        exact = bool((d > 0).mean() <= (1e-3 if activation else 1e-4) and d.max() <= 1)
                    t = timing.time_fn(fn, sets, iterations=10) if exact else {}
                    us, us_min = t.get("us", float("nan")), t.get("us_min", float("nan"))
                    error = None
                except Exception as exc:  # pylint: disable=broad-except
                    traceback.print_exc()
                    exact, us, us_min, error = (
                        False,
                        float("nan"),
                        float("nan"),
                        f"{type(exc).__name__}: {str(exc)[:300]}",
                    )
                frac = (m * k * 3 + m * 4) / us / 1e3 / copy
                rows.append(
                    dict(
                        fmt=fmt,
                        m=m,
                        k=k,
                        variant=name,
                        exact=exact,
                        us=round(us, 2),
                        us_min=round(us_min, 2),
                        fraction_of_copy_bw=round(frac, 3),
                        error=error,
                    )
                )
                print(
                    f"{fmt:5s} {m:6d} {k:6d} {name:16s} {'exact' if exact else 'FAIL':6s} {us:8.1f} us"
                    f" {100 * frac:5.1f}%" + (f"  {error}" if error else ""),
                    flush=True,
                )
            if save is not None:
                save(rows)
    return rows


def summary(rows: list[dict]) -> None:
    """The table printed last: per format and width, the fastest checked variant, the default
    and XLA's paths (median us)."""
    print(f"\n{'fmt':5s} {'M':>6s} {'K':>6s} {'fastest':>24s} {'us':>8s} {'first':>8s} {'xla rot+q':>10s} {'xla':>8s}")
    for key in dict.fromkeys((r["fmt"], r["m"], r["k"]) for r in rows):
        group = [r for r in rows if (r["fmt"], r["m"], r["k"]) == key and r["exact"]]
        by = {r["variant"]: r["us"] for r in group}
        if not group:
            print(f"{key[0]:5s} {key[1]:6d} {key[2]:6d}  no variant passed its check")
            continue
        best = min(group, key=lambda r: r["us"])
        first = next(iter(by.values()))
        print(
            f"{key[0]:5s} {key[1]:6d} {key[2]:6d} {best['variant']:>24s} {best['us']:8.1f} {first:8.1f} "
            f"{by.get('xla_rotate+kernel', float('nan')):10.1f} {by.get('xla', float('nan')):8.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jax-triton", action="store_true", help="compare with the jax-triton quantizer")
    parser.add_argument("--hadamard", action="store_true", help="the fused online Hadamard")
    parser.add_argument("--block", type=int, default=0, help="the fused block-diagonal rotation of this order")
    parser.add_argument("--activation", default="", help="the bias + activation quantizer with this activation")
    parser.add_argument("--fmt", default="int8,fp8", help="formats (comma list)")
    parser.add_argument("--k", default="", help="only these widths (comma list)")
    args = parser.parse_args()
    fmts = tuple(args.fmt.split(","))
    if args.k:
        keep = {int(v) for v in args.k.split(",")}
        global SHAPES, TRITON_SHAPES, HADAMARD_SHAPES, BLOCK_SHAPES, ACT_SHAPES  # pylint: disable=global-statement
        SHAPES, TRITON_SHAPES, HADAMARD_SHAPES, BLOCK_SHAPES, ACT_SHAPES = (
            [s for s in shapes if s[1] in keep]
            for shapes in (SHAPES, TRITON_SHAPES, HADAMARD_SHAPES, BLOCK_SHAPES, ACT_SHAPES)
        )
    if args.jax_triton and not triton_quant.available():
        print("jax-triton / Triton not importable: nothing to compare")
        return 0
    copy = timing.copy_bandwidth()
    print(f"{jax.devices()[0].device_kind} jax {jax.__version__} copy bandwidth {copy:.0f} GB/s")
    if args.activation or args.block or args.hadamard:
        os.environ["JQUANT_BACKEND"] = "pallas"
    if args.activation:
        name = "act_quant_activation"
    else:
        name = "act_quant_block" if args.block else "act_quant_hadamard" if args.hadamard else None
        name = name or ("jax_triton_eval" if args.jax_triton else "act_quant_sweep")
    save = lambda rows: timing.write_rows(name, rows)  # noqa: E731
    if args.activation:
        act_variants = activation_variants(args.activation)
        rows = measure(ACT_SHAPES, act_variants, copy, fmts=fmts, activation=args.activation, save=save)
    elif args.block:
        rows = measure(BLOCK_SHAPES, block_variants(args.block), copy, args.block, fmts, save=save)
    elif args.hadamard:
        rows = measure(HADAMARD_SHAPES, hadamard_variants, copy, True, fmts, save=save)
    elif args.jax_triton:
        rows = measure(TRITON_SHAPES, triton_variants, copy, fmts=fmts, save=save)
    else:
        rows = measure(SHAPES, config_variants, copy, fmts=fmts, save=save)
    save(rows)
    summary(rows)
    wrong = [r for r in rows if not r["exact"]]
    for r in wrong:
        print(f"WRONG: {r['fmt']} {r['m']}x{r['k']} {r['variant']} {r['error'] or 'codes differ from the reference'}")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
