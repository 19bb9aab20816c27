"""Fused producers in a quantized run (jquant.producers, issue 19): a Wan block's adaLN inputs
reach their token128 consumers as the codes of one norm + modulation + quantization pass."""

from __future__ import annotations

import dataclasses

import _draws as draws
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant.nn as jnn
from jquant import dispatch, models, producers
from jquant import policy as pol
from jquant.formats import parse_spec
from jquant.models.vae_blocks import random_params
from jquant.models.wan import WanConfig
from jquant.qarray import quantize
from pallas_kernels import fused_producers, norm_quant

CFG = WanConfig(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=64,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=256,
    num_layers=2,
)


def _init(cfg, dtype=jnp.float32):
    """Random params of ``cfg``'s port drawn with NumPy, in the port's distributions (kernels
    N(0, 1/fan_in), biases zero, norm scales one, Wan's modulation tables N(0, 1/dim)): the
    port's own init is a jitted program of every initializer, ~4 s of compile a config."""
    rng = np.random.default_rng(1)

    def table(path, leaf):
        if str(getattr(path[-1], "key", path[-1])) == "scale_shift_table":
            return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * leaf.shape[-1] ** -0.5, dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(table, random_params(models.param_shapes(cfg), 0, dtype))


@pytest.fixture(scope="module")
def wan():
    port = models.port_for_config(CFG)
    module = port.module(CFG, jnp.bfloat16)
    params = _init(CFG, jnp.bfloat16)
    roles = models.layer_roles(CFG, params)
    k1, k2 = jax.random.split(jax.random.key(1))
    x = draws.normal(k1, (2, 4, 2, 8, 8), jnp.float32)
    text = draws.normal(k2, (2, 8, CFG.text_dim), jnp.bfloat16)
    t = jnp.asarray([500.0, 500.0])
    return module, params, roles, (x, t, text)


_QUANTIZED: dict[tuple[int, str], tuple] = {}


def _quantized(params, roles, weights: str):
    """``params`` quantized to ``weights`` (every layer), once per params tree and spec: the runs
    below take the same few trees many times (each an op-by-op pass over every layer)."""
    key = (id(params), weights)
    if key not in _QUANTIZED:  # the params are kept with their tree: their id is not reused
        _QUANTIZED[key] = (params, pol.uniform(weights).quantize(params, roles))
    return _QUANTIZED[key][1]


def _run(wan, weights: str, act: str, **kw):
    module, params, roles, inputs = wan
    q = _quantized(params, roles, weights)
    with jnn.quantized(act, **kw):
        return jax.jit(lambda p, *a: module.apply({"params": p}, *a))(q, *inputs)


def _count_productions(monkeypatch) -> list:
    calls = []
    real = fused_producers.norm_modulate_quantize

    def counting(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(fused_producers, "norm_modulate_quantize", counting)
    return calls


@pytest.mark.parametrize("weights,act", [("int8", "int8/token128"), ("fp8_e4m3/b128x128", "fp8_e4m3/token128")])
def test_fused_codes_match_the_unfused_run(wan, weights, act, monkeypatch):
    calls = _count_productions(monkeypatch)
    fused = _run(wan, weights, act)
    # Three producers per block (the self-attention, cross-attention query and FFN inputs), each
    # made once for all its consumers.
    assert len(calls) == 3 * CFG.num_layers
    unfused = _run(wan, weights, act, producers=False)
    assert len(calls) == 3 * CFG.num_layers  # the unfused run makes none
    f, u = np.asarray(fused, np.float32), np.asarray(unfused, np.float32)
    assert np.isfinite(f).all()
    # Codes from the f32 modulated values instead of their bf16 rounding: within a rounding step.
    assert np.linalg.norm(f - u) / np.linalg.norm(u) < 2e-2


def test_other_activation_specs_take_the_float_value(wan, monkeypatch):
    calls = _count_productions(monkeypatch)
    fused = _run(wan, "int8", "int8/token")  # per-token scales: only with token_producers
    unfused = _run(wan, "int8", "int8/token", producers=False)
    assert calls == []
    chex.assert_trees_all_equal(fused, unfused)


@pytest.mark.parametrize(
    "weights,act", [("int8", "int8/token"), ("fp8_e4m3", "fp8_e4m3/token"), ("int4", "int8/token")]
)
def test_per_token_consumers_take_the_norm_producers_codes(wan, weights, act, monkeypatch):
    calls = []
    real = fused_producers.norm_modulate_quantize

    def counting(*a, **k):
        calls.append(k.get("block"))
        return real(*a, **k)

    monkeypatch.setattr(fused_producers, "norm_modulate_quantize", counting)
    fused = _run(wan, weights, act, token_producers=True)
    # Both adaLN inputs and the cross-attention norm of every block, one scale per token (block =
    # the model width).
    assert calls == [CFG.num_attention_heads * CFG.attention_head_dim] * (3 * CFG.num_layers)
    unfused = _run(wan, weights, act)
    f, u = np.asarray(fused, np.float32), np.asarray(unfused, np.float32)
    assert np.isfinite(f).all()
    assert np.linalg.norm(f - u) / np.linalg.norm(u) < 2e-2  # codes within one rounding step


def test_float_run_is_untouched(wan):
    module, params, _, inputs = wan
    with jnn.quantized(None):  # no QArray anywhere: the consumers take the value
        inside = module.apply({"params": params}, *inputs)
    chex.assert_trees_all_equal(inside, module.apply({"params": params}, *inputs))


def test_observers_see_arrays(wan):
    module, params, _, inputs = wan
    seen = {}
    with jnn.observe(lambda path, x: seen.setdefault(path, type(x))):
        module.apply({"params": params}, *inputs)
    assert seen and all(issubclass(t, jax.Array) for t in seen.values())


def test_linear_quantized_is_the_dispatch_on_its_own_codes():
    x = jax.random.normal(jax.random.key(2), (3, 5, 256), jnp.bfloat16)
    w = quantize(jax.random.normal(jax.random.key(3), (256, 64), jnp.float32) * 0.05, parse_spec("int8"))
    act = parse_spec("int8/token128")
    got = dispatch.linear_quantized(quantize(x, act, check_finite=False), w)
    chex.assert_trees_all_equal(got, dispatch.linear(x, w, act=act))
    per_token = parse_spec("int8/token")
    got = dispatch.linear_quantized(quantize(x, per_token, check_finite=False), w)
    chex.assert_trees_all_equal(got, dispatch.linear(x, w, act=per_token))
    with pytest.raises(ValueError, match="must be a <fmt>/token or <fmt>/tokenN QArray"):
        dispatch.linear_quantized(quantize(x, parse_spec("int8/t"), check_finite=False), w)
    with pytest.raises(ValueError, match="does not match the kernel"):
        dispatch.linear_quantized(quantize(x[..., :128], act, check_finite=False), w)


def test_per_token_codes_reach_the_per_token_gemm_on_a_gpu(monkeypatch):
    """On a (pretend) GPU, per-token codes go to the per-token W8A8 / W4A8 kernel as they are
    (no second quantization), with their [M, 1] scales and the per-channel weight scales."""
    from jquant.dispatch import kernels as kd  # pylint: disable=import-outside-toplevel
    from pallas_kernels import w4a8, w8a8  # pylint: disable=import-outside-toplevel

    monkeypatch.setattr(kd, "on_gpu", lambda: True)
    monkeypatch.setattr(kd, "quantize_tokens", lambda *a, **k: pytest.fail("codes quantized again"))
    calls = []

    def fake(name):
        def run(x_q, xs, w_q, ws, bias, out_dtype, **kw):
            calls.append((name, x_q.dtype, xs.shape, w_q.shape, ws.shape))
            return jnp.zeros((x_q.shape[0], w_q.shape[0]), out_dtype)

        return run

    monkeypatch.setattr(w8a8, "supports", lambda *a: True)
    monkeypatch.setattr(w4a8, "supports", lambda *a: True)
    monkeypatch.setattr(w8a8, "int8_matmul", fake("int8"))
    monkeypatch.setattr(w8a8, "fp8_matmul", fake("fp8"))
    monkeypatch.setattr(w4a8, "w4a8_matmul", fake("w4a8"))
    x = jax.random.normal(jax.random.key(2), (3, 5, 256), jnp.bfloat16)
    wf = jax.random.normal(jax.random.key(3), (256, 64), jnp.float32) * 0.05
    for weights, act, name in (
        ("int8", "int8/token", "int8"),
        ("fp8_e4m3", "fp8_e4m3/token", "fp8"),
        ("int4", "int8/token", "w4a8"),
    ):
        xq = quantize(x, parse_spec(act), check_finite=False)
        y = dispatch.linear_quantized(xq, quantize(wf, parse_spec(weights)))
        assert y.shape == (3, 5, 64) and y.dtype == x.dtype
        packed = 128 if name == "w4a8" else 256  # int4 weights travel packed, two per byte
        assert calls[-1] == (name, xq.qvalue.dtype, (15, 1), (64, packed), (64,)), calls[-1]
    assert len(calls) == 3


def test_takes_only_what_a_producer_makes():
    assert producers.takes(parse_spec("int8/token128")) and producers.takes(parse_spec("fp8_e4m3/token128"))
    for spec in ("int8/token", "int8/token64", "int4/token128", "fp8_e5m2/token128", None):
        assert not producers.takes(None if spec is None else parse_spec(spec)), spec
    # Per-token scales only where the consumer asks for a norm producer's codes.
    assert producers.takes(parse_spec("int8/token"), per_token=True)
    assert producers.takes(parse_spec("fp8_e4m3/token"), per_token=True)
    for spec in ("int8/token64", "int4/token", "int8/t"):
        assert not producers.takes(parse_spec(spec), per_token=True), spec


def test_the_gpu_producer_lowers_to_one_triton_kernel_per_sample(monkeypatch):
    # On Hopper the codes come from pallas_kernels.norm_quant, one call per sample under vmap.
    monkeypatch.setattr(norm_quant, "supports", lambda x, hadamard=0, per_token=False: True)
    b, t, d = 2, 16, 256
    S = jax.ShapeDtypeStruct
    # With QuaRot's block rotation in the producer too, and with one scale per token.
    for hadamard, spec in ((0, "fp8_e4m3/token128"), (128, "fp8_e4m3/token128"), (0, "int8/token")):

        def make(x, shift, scale, hadamard=hadamard, spec=spec):
            p = producers.NormProduced(x, x, shift, scale, 1e-6)
            return p.quantized(parse_spec(spec), hadamard, per_token=True).qvalue

        args = (S((b, t, d), jnp.bfloat16), S((b, d), jnp.float32), S((b, d), jnp.float32))
        text = jax.jit(make).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "xla.gpu.triton" in text


def _random_like(v, seed: int):
    """Random float inputs where the port's dummy ones are float zeros; the rest as they are."""
    if not isinstance(v, jax.Array) or not jnp.issubdtype(v.dtype, jnp.floating):
        return v
    return jax.random.normal(jax.random.key(seed), v.shape, v.dtype)


def _port_cases():
    from _pipeline_util import CONFIG as TINY_WAN
    from _pipeline_util import DIT
    from test_quantize_families import CONFIGS

    return {"wan": TINY_WAN, "dit": DIT, **CONFIGS}


@pytest.mark.parametrize("family", sorted(_port_cases()))
def test_every_port_runs_with_producers_on(family):
    # A token128 spec somewhere turns the producers on for the whole model: every port's
    # NormModulate outputs must reach their consumers (or be turned back into arrays) without
    # breaking anything. Here every layer's own spec is per-token, so all take the float value
    # and the run equals the one without producers, bit for bit.
    cfg = _port_cases()[family]
    port = models.port_for_config(cfg)
    module = port.module(cfg, jnp.float32)
    params = _init(cfg)  # the runs with producers on and off are compared, not their values
    q = pol.uniform("int8").quantize(params, models.layer_roles(cfg, params))
    inputs = port.dummy_inputs(cfg)
    inputs = {k: _random_like(v, i) for i, (k, v) in enumerate(inputs.items())}
    arrays = {k: v for k, v in inputs.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in inputs.items() if not isinstance(v, jax.Array)}
    rules = (("^no-such-layer$", "int8/token128"),)
    outs = []
    for on in (True, False):
        with jnn.quantized("int8/token", act_rules=rules, producers=on) as cfg_on:
            assert cfg_on.takes_codes
            # jitted, a fresh function each run (traced under its own settings): one program
            # instead of one per op of the model
            outs.append(jax.jit(lambda p, a: module.apply({"params": p}, **a, **static))(q, arrays))
    chex.assert_trees_all_equal(*outs)


def test_mm_dit_ffn_inputs_are_produced(monkeypatch):
    # Flux's double-stream blocks feed their two FFNs through NormModulate: with token128 on the
    # FFN-up layers only, each block makes two productions (image and text streams).
    from _pipeline_util import FLUX

    cfg = dataclasses.replace(FLUX, attention_head_dim=64, axes_dims_rope=(16, 24, 24))  # width 128
    port = models.port_for_config(cfg)
    module = port.module(cfg, jnp.float32)
    params = _init(cfg)
    q = pol.uniform("int8").quantize(params, models.layer_roles(cfg, params))
    inputs = {k: _random_like(v, i) for i, (k, v) in enumerate(port.dummy_inputs(cfg).items())}
    rules = ((r"ff(_context)?/net_0/proj$", "int8/token128"),)
    calls = _count_productions(monkeypatch)
    outs = []
    for on in (True, False):
        with jnn.quantized("int8/token", act_rules=rules, producers=on):  # jitted: a fresh trace each run
            outs.append(np.asarray(jax.jit(lambda p, i: module.apply({"params": p}, **i))(q, inputs)))
    assert len(calls) == 2 * cfg.num_layers
    assert np.linalg.norm(outs[0] - outs[1]) / np.linalg.norm(outs[1]) < 1e-2  # f32 model: nearly equal


def _rotated_wan(weights: str, rotated: tuple[str, ...]):
    """A 256-wide tiny Wan (two 128-blocks per input) with ``weights`` and QuaRot's block-128
    online rotation on the layers whose paths contain ``rotated``: (cfg, module, variables,
    inputs)."""
    import flax

    cfg = dataclasses.replace(CFG, num_attention_heads=4)
    port = models.port_for_config(cfg)
    module = port.module(cfg, jnp.bfloat16)
    params = _init(cfg, jnp.bfloat16)
    q = pol.uniform(weights).quantize(params, models.layer_roles(cfg, params))
    aux = {
        path[:-1] + ("hadamard",): jnp.ones((128,), jnp.float32)
        for path in flax.traverse_util.flatten_dict(params)
        if path[-1] == "kernel" and any(r in "/".join(path) + "/" for r in rotated)
    }
    assert len(aux) == len(rotated) * cfg.num_layers
    variables = {"params": q, jnn.AUX_COLLECTION: flax.traverse_util.unflatten_dict(aux)}
    k1, k2 = jax.random.split(jax.random.key(1))
    inputs = (
        draws.normal(k1, (2, 4, 2, 8, 8), jnp.float32),
        jnp.asarray([500.0, 500.0]),
        draws.normal(k2, (2, 8, cfg.text_dim), jnp.bfloat16),
    )
    return cfg, module, variables, inputs


def _run_variables(module, variables, inputs, **kw) -> np.ndarray:
    with jnn.quantized("int8/token128", **kw):
        return np.asarray(jax.jit(lambda v, *a: module.apply(v, *a))(variables, *inputs), np.float32)


def test_block_rotation_goes_into_the_producer(monkeypatch):
    # QuaRot's block-diagonal online rotation on the adaLN consumers (Q, K, V, FFN up): the
    # producer rotates before quantizing, once per block input, instead of the consumers taking
    # the float value and rotating it themselves.
    rotated = ("attn1/to_q/", "attn1/to_k/", "attn1/to_v/", "ffn/net_0/proj/")
    cfg, module, variables, inputs = _rotated_wan("int8", rotated)
    seen = []
    real = fused_producers.norm_modulate_quantize
    monkeypatch.setattr(
        fused_producers, "norm_modulate_quantize", lambda *a, **k: seen.append(k.get("hadamard")) or real(*a, **k)
    )

    fused = _run_variables(module, variables, inputs)
    # Each block's two adaLN inputs, rotated in the producer; the cross-attention query (not
    # rotated here) takes its norm's producer unrotated.
    assert seen == [128, 0, 128] * cfg.num_layers
    unfused = _run_variables(
        module, variables, inputs, producers=False
    )  # the consumers rotate the bf16 value, then quantize it
    assert len(seen) == 3 * cfg.num_layers
    assert np.isfinite(fused).all() and np.linalg.norm(fused - unfused) / np.linalg.norm(unfused) < 2e-2


def _count_ffn_productions(monkeypatch) -> list:
    from pallas_kernels import gemm_act_quant

    calls = []
    real = gemm_act_quant.gemm_act_quant

    def counting(*a, **k):
        calls.append((a[0].shape, a[2].shape, k.get("act"), k.get("fmt"), k.get("hadamard")))
        return real(*a, **k)

    monkeypatch.setattr(gemm_act_quant, "gemm_act_quant", counting)
    return calls


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_ffn_down_takes_the_ffn_up_epilogue_codes(wan, fmt, monkeypatch):
    # Block-scaled weights and token128 activations: each block's FFN-up GEMM quantizes its own
    # gelu output (one producer call per block, [B*T, dim] x [ffn_dim, dim]), FFN-down takes it.
    calls = _count_ffn_productions(monkeypatch)
    fused = _run(wan, f"{fmt}/b128x128", f"{fmt}/token128")
    tokens = 2 * 2 * 4 * 4  # batch x frames x (8/2)^2 patches
    short = "int8" if fmt == "int8" else "fp8"
    assert calls == [((tokens, CFG.attention_head_dim * 2), (CFG.ffn_dim, 128), "gelu_tanh", short, 0)] * CFG.num_layers
    unfused = _run(wan, f"{fmt}/b128x128", f"{fmt}/token128", producers=False)
    assert len(calls) == CFG.num_layers  # the unfused run makes none
    f, u = np.asarray(fused, np.float32), np.asarray(unfused, np.float32)
    assert np.isfinite(f).all()
    assert np.linalg.norm(f - u) / np.linalg.norm(u) < 2e-2


def test_ffn_producer_needs_a_block_scaled_pair(wan, monkeypatch):
    # Per-channel int8 weights have no block-scaled kernel: FFN-down takes the float value.
    calls = _count_ffn_productions(monkeypatch)
    _run(wan, "int8", "int8/token128")
    assert calls == []


def test_ffn_producer_codes_equal_the_reference_composition():
    # ActProduced's codes are gemm_act_quant's on the FFN-up input codes, reshaped per token.
    x = jax.random.normal(jax.random.key(4), (2, 7, 256), jnp.float32)
    w = quantize(jax.random.normal(jax.random.key(5), (256, 384), jnp.float32) * 0.1, parse_spec("int8/b128x128"))
    bias = jax.random.normal(jax.random.key(6), (384,), jnp.float32)
    xq = quantize(x, parse_spec("int8/token128"), check_finite=False)
    p = producers.ActProduced(x, xq, w, bias, "gelu_tanh")
    got = p.quantized(parse_spec("int8/token128"))
    assert got.shape == (2, 7, 384) and got.scale.shape == (2, 7, 3)
    assert p.quantized(parse_spec("int8/token128"), 64) is None  # only one tile's order rotates
    y = dispatch.block_scaled_linear(xq, w).astype(jnp.float32) + bias
    for rotation in (0, 128):  # plain, and with FFN-down's online block rotation
        got = p.quantized(parse_spec("int8/token128"), rotation)
        codes, scales = fused_producers.activation_quantize(y, "gelu_tanh", "int8", hadamard=rotation)
        diff = np.abs(np.asarray(got.qvalue, np.float32) - np.asarray(codes, np.float32))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-2
        np.testing.assert_allclose(np.asarray(got.scale), np.asarray(scales), rtol=1e-5)
    plain, rotated = p.quantized(parse_spec("int8/token128")), p.quantized(parse_spec("int8/token128"), 128)
    assert (np.asarray(plain.qvalue) != np.asarray(rotated.qvalue)).mean() > 0.5


def test_ffn_down_rotation_goes_into_the_ffn_up_epilogue(monkeypatch):
    # QuaRot with block-128 online rotations on FFN up and FFN down, block-scaled int8 weights:
    # FFN-down's rotation is applied by FFN-up's epilogue (gemm_act_quant(hadamard=128)), once
    # per block, and the run stays within a rounding step of the unfused one, where FFN-down
    # rotates the bf16 hidden activation itself.
    cfg, module, variables, inputs = _rotated_wan("int8/b128x128", ("ffn/net_0/proj/", "ffn/net_2/"))
    calls = _count_ffn_productions(monkeypatch)
    fused = _run_variables(module, variables, inputs)
    assert [c[-1] for c in calls] == [128] * cfg.num_layers
    unfused = _run_variables(module, variables, inputs, producers=False)
    assert len(calls) == cfg.num_layers
    assert np.isfinite(fused).all() and np.linalg.norm(fused - unfused) / np.linalg.norm(unfused) < 2e-2


@pytest.mark.parametrize("rotation", [0, 128])
def test_ffn_producer_reaches_the_kernel_on_hopper_with_3d_activations(rotation, monkeypatch):
    """On a (pretend) Hopper GPU, with the kernels' own shape and verification checks left real,
    a [B, T, K] FFN-up input reaches the epilogue kernel as its [B*T, K] operand. A check made
    on the 3-D codes once refused every Wan step on the GPU, where FFN-down then ran GELU and a
    quantizer pass in XLA (the CPU suite runs the reference either way and could not see it)."""
    from jquant.dispatch import kernels as kd  # pylint: disable=import-outside-toplevel
    from pallas_kernels import _common, gemm_act_quant  # pylint: disable=import-outside-toplevel

    monkeypatch.setattr(kd, "on_gpu", lambda: True)
    monkeypatch.setattr(_common, "_default_device_is_gpu", lambda: True)
    monkeypatch.setattr(_common, "_default_device_is_hopper", lambda: True)
    calls = []

    def kernel(x_q, x_scale, w_q, w_scale, bias=None, mul=None, **kw):
        calls.append((x_q.shape, w_q.shape))
        return gemm_act_quant.gemm_act_quant_reference(x_q, x_scale, w_q, w_scale, bias, mul, **kw)

    monkeypatch.setattr(gemm_act_quant, "gemm_act_quant", kernel)
    x = jax.random.normal(jax.random.key(7), (2, 9, 256), jnp.float32)
    w = quantize(jax.random.normal(jax.random.key(8), (256, 384), jnp.float32) * 0.1, parse_spec("int8/b128x128"))
    xq = quantize(x, parse_spec("int8/token128"), check_finite=False)
    assert gemm_act_quant.supports(xq.qvalue.reshape(-1, 256), w.qvalue.T, "gelu_tanh", rotation)
    out = kd.block_act_quantized(xq, w, None, "gelu_tanh", "int8", rotation)
    assert out is not None and calls == [((18, 256), (384, 256))]
    codes, scales = out
    assert codes.shape == (2, 9, 384) and scales.shape == (2, 9, 3)


def test_quarot_random_signs_go_into_both_producers(monkeypatch):
    # QuaRot's randomized block-128 rotations (random signs as each consumer's input_mul): the norm
    # producer folds the signs into the norm's affine and the shift (Q, K, V and FFN-up take its
    # codes), the FFN-up epilogue multiplies by FFN-down's signs before rotating; the run stays
    # within a rounding step of the unfused one, where each consumer multiplies and rotates itself.
    from jquant.algorithms import quarot  # pylint: disable=import-outside-toplevel

    cfg = dataclasses.replace(CFG, num_attention_heads=4)
    port = models.port_for_config(cfg)
    module = port.module(cfg, jnp.bfloat16)
    p32 = _init(cfg)
    roles = models.layer_roles(cfg, p32)
    plan = quarot.dit_plan(p32, roles, cfg.attention_head_dim, online_block=128, skip_roles=("attn.out",))
    variables = quarot.quarot({"params": p32}, None, plan)
    variables["params"] = pol.uniform("int8/b128x128").quantize(
        jax.tree.map(lambda a: a.astype(jnp.bfloat16), variables["params"]), roles
    )
    seen, ffn = [], _count_ffn_productions(monkeypatch)
    real = fused_producers.norm_modulate_quantize

    def counting(x, norm_scale, *a, **k):
        seen.append((k.get("hadamard"), norm_scale is not None))
        return real(x, norm_scale, *a, **k)

    monkeypatch.setattr(fused_producers, "norm_modulate_quantize", counting)
    k1, k2 = jax.random.split(jax.random.key(1))
    inputs = (
        draws.normal(k1, (2, 4, 2, 8, 8), jnp.float32),
        jnp.asarray([500.0, 500.0]),
        draws.normal(k2, (2, 8, cfg.text_dim), jnp.bfloat16),
    )
    fused = _run_variables(module, variables, inputs)
    # Q, K, V, the cross-attention Q (one multiplier array each) and FFN-up: the signs ride in as
    # the norm's scale.
    assert seen == [(128, True)] * (5 * cfg.num_layers)
    assert [c[-1] for c in ffn] == [128] * cfg.num_layers  # FFN-down's rotation in FFN-up's epilogue
    unfused = _run_variables(module, variables, inputs, producers=False)
    assert len(seen) == 5 * cfg.num_layers and len(ffn) == cfg.num_layers
    assert np.isfinite(fused).all() and np.linalg.norm(fused - unfused) / np.linalg.norm(unfused) < 2e-2


def test_norm_without_modulation_is_the_plain_norm():
    # Wan's cross-attention norm is a NormModulate without shift and scale (so its query can take
    # a producer's codes): its float value is LayerNorm's, bit for bit, params at the same paths.
    from jquant.models import blocks  # pylint: disable=import-outside-toplevel

    x = jax.random.normal(jax.random.key(4), (2, 5, 128), jnp.bfloat16)
    norm = blocks.NormModulate(1e-6, affine=True)
    params = norm.init(jax.random.key(5), x)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(6), p.shape), params)
    plain = blocks.LayerNorm(1e-6, affine=True).apply(params, x.astype(jnp.float32)).astype(x.dtype)
    chex.assert_trees_all_equal(norm.apply(params, x), plain)
    with pytest.raises(ValueError, match="shift and scale go together"):
        norm.apply(params, x, jnp.zeros((2, 128)))


@pytest.mark.parametrize("weights,act", [("int8", "int8/token"), ("int4", "int8/token")])
def test_per_token_ffn_down_takes_codes_made_from_the_ffn_up_output(wan, weights, act, monkeypatch):
    # With per-token producers, FFN-down's codes come from the activation quantizer applied to the
    # FFN-up GEMM's output (bias and gelu_tanh on load): once per block, [B*T, ffn_dim] wide.
    from pallas_kernels import act_quant  # pylint: disable=import-outside-toplevel

    calls = []
    real = act_quant.quantize_act

    def counting(y, bias, activation, fmt, *a, **k):
        calls.append((y.shape, None if bias is None else bias.shape, activation, fmt))
        return real(y, bias, activation, fmt, *a, **k)

    monkeypatch.setattr(act_quant, "quantize_act", counting)
    fused = _run(wan, weights, act, token_producers=True)
    tokens = 2 * 2 * 4 * 4
    assert calls == [((tokens, CFG.ffn_dim), (CFG.ffn_dim,), "gelu_tanh", "int8")] * CFG.num_layers
    unfused = _run(wan, weights, act, producers=False)
    assert len(calls) == CFG.num_layers  # the unfused run makes none
    f, u = np.asarray(fused, np.float32), np.asarray(unfused, np.float32)
    assert np.isfinite(f).all() and np.linalg.norm(f - u) / np.linalg.norm(u) < 2e-2


def test_per_token_ffn_codes_equal_the_reference_composition():
    # ActProduced with per-token codes: the per-token GEMM's output plus bias, then the activation
    # and jquant's per-token rule (act_quant.act_reference), bit for bit on the CPU. A rotation or
    # a multiplier is not this path's (None: FFN-down then takes the float value).
    from pallas_kernels import act_quant  # pylint: disable=import-outside-toplevel

    x = jax.random.normal(jax.random.key(4), (2, 7, 256), jnp.float32)
    w = quantize(jax.random.normal(jax.random.key(5), (256, 384), jnp.float32) * 0.1, parse_spec("int8"))
    bias = jax.random.normal(jax.random.key(6), (384,), jnp.float32)
    spec = parse_spec("int8/token")
    xq = quantize(x, spec, check_finite=False)
    p = producers.ActProduced(x, xq, w, bias, "gelu_tanh")
    got = p.quantized(spec, per_token=True)
    assert got.shape == (2, 7, 384) and got.scale.shape == (2, 7, 1)
    y = dispatch.linear_quantized(xq, w)
    codes, scales = act_quant.act_reference(y.reshape(14, 384), bias, "gelu_tanh", "int8")
    chex.assert_trees_all_equal((got.qvalue, got.scale), (codes.reshape(2, 7, 384), scales.reshape(2, 7, 1)))
    assert p.quantized(spec, 128, per_token=True) is None
    assert p.quantized(spec, per_token=True, mul=jnp.ones((384,))) is None
    assert producers.ActProduced(x, xq, w, bias, "swish").quantized(spec, per_token=True) is None


def test_per_token_ffn_producer_on_a_gpu_runs_only_a_verified_kernel(monkeypatch):
    """On a (pretend) GPU the per-token FFN producer runs the quantizer kernel where it is
    verified or forced, and otherwise hands FFN-down the float value (None), not a float32
    reference."""
    from jquant.dispatch import kernels as kd  # pylint: disable=import-outside-toplevel
    from pallas_kernels import _common, act_quant  # pylint: disable=import-outside-toplevel

    monkeypatch.setattr(kd, "on_gpu", lambda: True)
    monkeypatch.setattr(_common, "_default_device_is_gpu", lambda: True)
    y = jax.random.normal(jax.random.key(9), (2, 9, 384), jnp.bfloat16)
    bias = jnp.ones((384,), jnp.bfloat16)
    monkeypatch.setattr(act_quant, "ACT_GPU_VERIFIED", False)
    monkeypatch.delenv(_common.FORCE_ENV, raising=False)
    assert kd.token_act_quantized(y, bias, "gelu_tanh", "int8") is None
    calls = []

    def kernel(y2, b, activation, fmt, method="auto"):
        calls.append((y2.shape, b.dtype, activation, fmt))
        return act_quant.act_reference(y2, b, activation, fmt)

    monkeypatch.setattr(act_quant, "quantize_act", kernel)
    monkeypatch.setenv(_common.FORCE_ENV, "pallas")
    codes, scales = kd.token_act_quantized(y, bias, "gelu_tanh", "fp8")
    assert calls == [((18, 384), jnp.float32, "gelu_tanh", "fp8")]
    assert codes.shape == (2, 9, 384) and scales.shape == (2, 9, 1)
    assert kd.token_act_quantized(y, bias, "gelu", "int8") is None  # exact gelu: no kernel formula
