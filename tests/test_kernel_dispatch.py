"""jquant's dispatch hands QArrays to the Pallas kernels with the right layouts and scales.

On the CPU the kernels cannot run, so each kernel entry point is replaced by its plain-JAX
reference (same signature) and the GPU checks are forced on; the result must equal the XLA
path. scripts/check_kernels_gpu.py checks the kernels themselves against the references.
"""

import chex
import jax
import jax.numpy as jnp
import pytest
from _bounds import assert_dot_close

import jquant
from jquant.dispatch import kernels as kd
from jquant.dispatch import linear
from pallas_kernels import _quant, act_quant, lowrank_quant, w4_table, w4a8, w8a8, weight_only

#: The per-shape rule with every covered layer on its kernel (the paths these tests check).
KERNELS_EVERYWHERE = {kind: ((None, paths[0]),) for kind, paths in kd.KIND_PATHS.items()}


@pytest.fixture
def fake_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(kd, "on_gpu", lambda: True)
    monkeypatch.setattr(kd, "PATH_TABLE", {})
    monkeypatch.setattr(kd, "DEFAULT_RULE", KERNELS_EVERYWHERE)
    monkeypatch.setattr(w8a8, "supports", lambda *a, **k: True)
    # The GPU checks pass; the shape rules (scale blocks the kernel takes) still apply.
    monkeypatch.setattr(
        weight_only, "supports", lambda x, group_size=128, decode="int": group_size in weight_only.TABLE_BLOCKS
    )

    def spy(name, fn):
        def wrapped(*a, **k):
            calls.append(name)
            return fn(*a, **k)

        return wrapped

    def int8_reference(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=jnp.bfloat16, *, lowrank=None):
        y = w8a8.int8_matmul_reference(x_q, x_scale, w_q, w_scale, bias, jnp.float32)
        if lowrank is not None:
            calls.append("epilogue")
            y = y + lowrank[0].astype(jnp.float32) @ lowrank[1].astype(jnp.float32).T
        return y.astype(out_dtype)

    def w4a8_reference(x_q, x_scale, w_packed, w_scale, bias=None, out_dtype=jnp.bfloat16, *, lowrank=None):
        w_q = weight_only.unpack_int4(w_packed, x_q.shape[1])
        return int8_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype, lowrank=lowrank)

    monkeypatch.setattr(w8a8, "int8_matmul", spy("int8", int8_reference))
    monkeypatch.setattr(w4a8, "w4a8_matmul", spy("w4a8", w4a8_reference))
    monkeypatch.setattr(w8a8, "fp8_matmul", spy("fp8", w8a8.fp8_matmul_reference))
    monkeypatch.setattr(weight_only, "w4a16_matmul", spy("w4a16", weight_only.w4a16_matmul_reference))
    monkeypatch.setattr(weight_only, "w8a16_matmul", spy("w8a16", weight_only.w8a16_matmul_reference))
    monkeypatch.setattr(w4_table, "w4_table_matmul", spy("table", w4_table.w4_table_matmul_reference))
    monkeypatch.setattr(w4_table, "uint4_matmul", spy("uint4", w4_table.uint4_matmul_reference))
    return calls


@pytest.mark.parametrize(
    "wspec, act, kernel",
    [
        ("int8", "int8/token", "int8"),
        ("fp8_e4m3", "fp8_e4m3/token", "fp8"),
        ("int4/g128", None, "w4a16"),
        ("int8", None, "w8a16"),
        ("int4/g32", None, "w4a16"),
        ("nf4/g64", None, "table"),
        ("mxfp4", None, "table"),
        ("nvfp4", None, "table"),
        ("fp4/g128", None, "table"),
        ("fp8_e4m3", None, "w8a16"),
        ("uint4/g32", None, "uint4"),
    ],
)
def test_kernel_path_equals_xla_path(fake_gpu, wspec, act, kernel):
    x = jax.random.normal(jax.random.key(0), (2, 5, 256), jnp.float32)
    w = jquant.quantize(jax.random.normal(jax.random.key(1), (256, 72)), wspec)
    a = None if act is None else jquant.parse_spec(act)
    y_kernel = linear(x, w, act=a, backend="auto")
    assert fake_gpu == [kernel]
    y_xla = linear(x, w, act=a, backend="xla")
    chex.assert_shape(y_kernel, (2, 5, 72))
    assert y_kernel.dtype == x.dtype
    err = float(jnp.linalg.norm(y_kernel - y_xla) / jnp.linalg.norm(y_xla))
    assert err < 1e-2, err  # kernels write bf16 outputs; the f32 XLA path does not round


@pytest.mark.parametrize("wspec, kernel", [("int4/g128", "w4a16"), ("int8", "w8a16")])
def test_large_m_weight_only_reaches_the_large_m_kernel(fake_gpu, monkeypatch, wspec, kernel):
    # From w4a16_gemm.MIN_M tokens the small-M kernel refuses; the dispatch still hands int4/g128
    # and int8 weights to the weight-only wrappers, which run w4a16_gemm where it applies
    # (weights of at least MIN_KN elements), and leaves small weights to XLA.
    from pallas_kernels import w4a16_gemm

    monkeypatch.setattr(weight_only, "supports", lambda x, group_size=128, decode="int": False)
    monkeypatch.setattr(
        w4a16_gemm,
        "supports",
        lambda x, block=128, decode="int", offsets=False, n=None, bits=4: (
            x.shape[0] >= w4a16_gemm.MIN_M and (n is None or x.shape[1] * n >= 256 * 72)
        ),
    )
    x = jax.random.normal(jax.random.key(0), (w4a16_gemm.MIN_M, 256), jnp.float32)
    w = jquant.quantize(jax.random.normal(jax.random.key(1), (256, 72)), wspec)
    y = linear(x, w, backend="auto")
    assert fake_gpu == [kernel]
    y_xla = linear(x, w, backend="xla")
    assert float(jnp.linalg.norm(y - y_xla) / jnp.linalg.norm(y_xla)) < 1e-2  # bf16 tokens in the kernel
    fake_gpu.clear()
    linear(x[:, :128], jquant.quantize(jax.random.normal(jax.random.key(1), (128, 72)), wspec), backend="auto")
    assert fake_gpu == []  # K x N under the threshold: XLA


def test_uncovered_formats_fall_back(fake_gpu):
    x = jnp.ones((4, 64), jnp.bfloat16)
    for spec, act in [
        ("uint4/g8", None),
        ("uint8", None),
        ("nf4/g8", None),
        ("int8", "fp8_e4m3/token"),
        ("int4/g32", "int8/token"),
    ]:
        w = jquant.quantize(jax.random.normal(jax.random.key(2), (64, 16)), spec)
        y = linear(x, w, act=None if act is None else jquant.parse_spec(act))
        chex.assert_shape(y, (4, 16))
    assert fake_gpu == []


@pytest.mark.parametrize(
    "wspec, m, rank, want",
    [
        ("int8", 5, 32, ["int8", "epilogue"]),
        ("int4", 1030, 16, ["w4a8", "epilogue"]),
        ("int8", 5, 8, ["int8"]),
        ("int4/g128", 5, 32, ["w4a16"]),
    ],
)
def test_svdquant_branch_fused_where_the_int8_kernel_runs(fake_gpu, wspec, m, rank, want):
    x = jax.random.normal(jax.random.key(0), (m, 256), jnp.float32).astype(jnp.bfloat16)
    w = jquant.quantize(jax.random.normal(jax.random.key(1), (256, 72)), wspec)
    a = jax.random.normal(jax.random.key(2), (256, rank)) / 16
    b = jax.random.normal(jax.random.key(3), (rank, 72)) / 4
    act = None if "/" in wspec else jquant.parse_spec("int8/token")
    y = linear(x, w, act=act, backend="auto", lowrank=(a, b))
    assert fake_gpu == want  # rank 8 does not fit the epilogue: the branch is added by XLA
    y_xla = linear(x, w, act=act, backend="xla") + ((x @ a.astype(x.dtype)) @ b.astype(x.dtype))
    err = float(jnp.linalg.norm((y - y_xla).astype(jnp.float32)) / jnp.linalg.norm(y_xla.astype(jnp.float32)))
    assert err < 2e-2, err


@pytest.mark.parametrize(
    "wspec, m, rank, fused", [("int8", 5, 32, True), ("int4", 1030, 16, True), ("int4", 1030, 48, False)]
)
def test_svdquant_down_projection_fuses_into_the_quantizer(fake_gpu, monkeypatch, wspec, m, rank, fused):
    # With the quantizer kernel available, h = x @ A comes out of its pass over x (power-of-two
    # ranks); rank 48 fits the epilogue but not the quantizer's dot, so h is an XLA GEMM.
    monkeypatch.setattr(act_quant, "supports", lambda x, hadamard=False: True)
    monkeypatch.setattr(
        act_quant, "quantize_int8", lambda x: fake_gpu.append("quant") or act_quant.quantize_int8_reference(x)
    )
    monkeypatch.setattr(lowrank_quant, "supports", lambda x, l1: l1.shape[1] in (16, 32, 64))
    monkeypatch.setattr(
        lowrank_quant,
        "quantize_lowrank",
        lambda x, l1, fmt: fake_gpu.append("quant+down") or lowrank_quant.reference(x, l1, fmt),
    )
    x = jax.random.normal(jax.random.key(0), (m, 256), jnp.float32).astype(jnp.bfloat16)
    w = jquant.quantize(jax.random.normal(jax.random.key(1), (256, 72)), wspec)
    a = jax.random.normal(jax.random.key(2), (256, rank)) / 16
    b = jax.random.normal(jax.random.key(3), (rank, 72)) / 4
    act = jquant.parse_spec("int8/token")
    y = linear(x, w, act=act, backend="auto", lowrank=(a, b))
    gemm = "w4a8" if wspec == "int4" else "int8"
    assert fake_gpu == (["quant+down", gemm, "epilogue"] if fused else ["quant", gemm, "epilogue"]), fake_gpu
    y_xla = linear(x, w, act=act, backend="xla") + ((x @ a.astype(x.dtype)) @ b.astype(x.dtype))
    err = float(jnp.linalg.norm((y - y_xla).astype(jnp.float32)) / jnp.linalg.norm(y_xla.astype(jnp.float32)))
    assert err < 2e-2, err


@pytest.mark.parametrize("wspec, act", [("int8", "int8/token"), ("fp8_e4m3", "fp8_e4m3/token"), ("int4", "int8/token")])
def test_dynamic_token_activations_go_through_the_quantizer_kernel(fake_gpu, monkeypatch, wspec, act):
    # Where the quantizer kernel applies, the dispatch hands it the activations; its rule is
    # jquant.quantize's, so the codes (and the output) equal the XLA path's exactly.
    monkeypatch.setattr(act_quant, "supports", lambda x, hadamard=False: True)
    monkeypatch.setattr(
        act_quant, "quantize_int8", lambda x: fake_gpu.append("quant") or act_quant.quantize_int8_reference(x)
    )
    monkeypatch.setattr(
        act_quant, "quantize_fp8", lambda x: fake_gpu.append("quant") or act_quant.quantize_fp8_reference(x)
    )
    m = 1030 if wspec == "int4" else 6
    x = jax.random.normal(jax.random.key(0), (m, 256), jnp.float32).astype(jnp.bfloat16)
    w = jquant.quantize(jax.random.normal(jax.random.key(1), (256, 72)), wspec)
    a = jquant.parse_spec(act)
    y_kernel = linear(x, w, act=a, backend="auto")
    assert fake_gpu[0] == "quant" and len(fake_gpu) == 2, fake_gpu
    fake_gpu.clear()
    monkeypatch.setattr(act_quant, "supports", lambda x, hadamard=False: False)
    y_xla_codes = linear(x, w, act=a, backend="auto")  # same kernel, jquant's XLA quantize
    assert fake_gpu and "quant" not in fake_gpu
    chex.assert_trees_all_equal(y_kernel, y_xla_codes)
    # A static scale never takes the dynamic kernel.
    fake_gpu.clear()
    monkeypatch.setattr(act_quant, "supports", lambda x, hadamard=False: True)
    linear(x, w, act=a, act_scale=jnp.float32(0.05), backend="auto")
    assert "quant" not in fake_gpu


@pytest.mark.parametrize("fused,rotation", [(True, True), (False, True), (True, 128), (False, 64)])
def test_online_hadamard_fuses_into_the_quantizer_or_rotates_in_xla(fake_gpu, monkeypatch, fused, rotation):
    # linear(..., hadamard=True) is linear(apply_hadamard(x), ...), hadamard=b the block-diagonal
    # rotation of order b: the rotation runs inside the quantizer kernel where it takes the width,
    # else in XLA before the usual paths.
    from jquant.hadamard import apply_block_hadamard, online_block

    seen = []
    monkeypatch.setattr(act_quant, "supports", lambda x, hadamard=False: fused or not hadamard)
    monkeypatch.setattr(
        act_quant,
        "quantize_int8",
        lambda x, hadamard=False: seen.append(hadamard) or _quant.reference(x, "int8", hadamard),
    )
    x = jax.random.normal(jax.random.key(0), (6, 256), jnp.float32).astype(jnp.bfloat16)
    w = jquant.quantize(jax.random.normal(jax.random.key(1), (256, 72)), "int8")
    a = jquant.parse_spec("int8/token")
    y = linear(x, w, act=a, backend="auto", hadamard=rotation)
    assert seen == [rotation if fused else False] and fake_gpu == ["int8"]
    xr = apply_block_hadamard(x, online_block(rotation), axis=-1).astype(x.dtype)
    y_ref = linear(xr, w, act=a, backend="xla")
    chex.assert_trees_all_close(y.astype(jnp.float32), y_ref.astype(jnp.float32), rtol=1e-2, atol=1e-2)
    # With an SVDQuant branch the rotation stays in XLA (the branch needs the rotated x).
    seen.clear()
    lr = (jnp.zeros((256, 16)), jnp.zeros((16, 72)))
    linear(x, w, act=a, backend="auto", hadamard=rotation, lowrank=lr)
    assert seen == [False]


# --------------------------------------------------------------------------
# The per-shape path rule (jquant.dispatch.kernels.choose_path / derive_table).
# --------------------------------------------------------------------------


def test_default_rule_keeps_w8a8_off_the_kernel_at_small_m():
    table = {}
    for m, want in [(1, "w16"), (16, "w16"), (256, "w16"), (1024, "w16"), (1025, "w8a8"), (32760, "w8a8")]:
        assert kd.choose_path("int8/w8a8", m, 1536, 1536, table=table) == want, m
        assert kd.choose_path("fp8/w8a8", m, 1536, 8960, table=table) == want, m
    assert kd.choose_path("int4g128/w16", 1, 1536, 1536, table=table) == "w16"


def test_layer_kind():
    def kind(wspec, act=None, act_scale=None):
        w = jquant.quantize(jax.random.normal(jax.random.key(1), (256, 72)), wspec)
        return kd.layer_kind(w, None if act is None else jquant.parse_spec(act), act_scale)

    assert kind("int8", "int8/token") == "int8/w8a8"
    assert kind("fp8_e4m3", "fp8_e4m3/token") == "fp8/w8a8"
    assert kind("int8") == "int8/w16"
    assert kind("int4/g128") == "int4g128/w16"
    assert kind("int8", "int8/token", jnp.float32(0.1)) is None  # static scales: as before
    for wspec, act in [("int4/g32", None), ("nf4/g64", None), ("int4", "int8/token"), ("int8", "fp8_e4m3/token")]:
        assert kind(wspec, act) is None, (wspec, act)


def _rows(kind, k, n, times, status="PASS"):
    return [
        {"kind": kind, "k": k, "n": n, "m": m, "path": path, "us": us, "status": status}
        for m, by_path in times.items()
        for path, us in by_path.items()
    ]


def test_derive_table_picks_the_fastest_passing_path_per_m():
    rows = _rows(
        "int8/w8a8",
        1536,
        1536,
        {
            1: {"w8a8": 21.8, "xla_w8a8": 12.0, "w16": 5.0, "xla_w16": 9.0},
            16: {"w8a8": 22.0, "xla_w8a8": 12.0, "w16": 5.5, "xla_w16": 9.0},
            256: {"w8a8": 25.0, "xla_w8a8": 20.0, "w16": 30.0, "xla_w16": 19.0},
            4096: {"w8a8": 34.0, "xla_w8a8": 40.0, "w16": 41.0, "xla_w16": 41.0},
            32760: {"w8a8": 176.0, "xla_w8a8": 230.0, "w16": 240.0, "xla_w16": 240.0},
        },
    )
    rows += [{"kind": "int8/w8a8", "k": 1536, "n": 1536, "m": 1, "path": "w16", "us": 0.1, "status": "FAIL"}]
    table = kd.derive_table(rows)
    # 1 and 16 -> w16 up to sqrt(16 * 256) = 64; 256 -> xla_w16 up to sqrt(256 * 4096) = 1024.
    assert table[("int8/w8a8", 1536, 1536)] == ((64, "w16"), (1024, "xla_w16"), (None, "w8a8"))
    assert table[("int8/w8a8", 0, 0)] == table[("int8/w8a8", 1536, 1536)]  # one shape: same default
    for m, want in [(1, "w16"), (64, "w16"), (65, "xla_w16"), (1024, "xla_w16"), (1025, "w8a8")]:
        assert kd.choose_path("int8/w8a8", m, 1536, 1536, table=table) == want
    # Unmeasured (K, N): the kind's default entry.
    assert kd.choose_path("int8/w8a8", 300, 4096, 1536, table=table) == "xla_w16"


def test_derive_table_default_minimises_the_worst_slowdown():
    rows = (
        _rows("int8/w16", 1536, 1536, {1: {"w16": 10.0, "xla_w16": 9.0}})
        + _rows("int8/w16", 1536, 8960, {1: {"w16": 10.0, "xla_w16": 30.0}})
        + _rows("int8/w16", 8960, 1536, {1: {"w16": 12.0}})
    )  # xla_w16 missing there: infinitely slow
    table = kd.derive_table(rows)
    # Only M=1 was measured: the entries reach sqrt(1 * 16) = 4, and DEFAULT_RULE decides above.
    assert table[("int8/w16", 1536, 1536)] == ((4, "xla_w16"),)
    assert table[("int8/w16", 1536, 8960)] == ((4, "w16"),)
    assert table[("int8/w16", 0, 0)] == ((4, "w16"),)  # worst case 1.11x, against 3x
    assert kd.choose_path("int8/w16", 1, 1536, 1536, table=table) == "xla_w16"
    assert kd.choose_path("int8/w16", 4096, 1536, 1536, table=table) == kd.DEFAULT_RULE["int8/w16"][-1][1]


def test_path_table_is_what_the_benchmark_json_gives():
    # PATH_TABLE must be derive_table of the committed measurement (and empty without one).
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "dispatch-NVIDIA_H200.json"
    if not path.exists():
        assert kd.PATH_TABLE == {}
        return
    rows = json.loads(path.read_text())["rows"]
    assert kd.PATH_TABLE == kd.derive_table([r for r in rows if r.get("section") == "paths"])


@pytest.fixture
def measured_rule(fake_gpu, monkeypatch):
    """fake_gpu with a measured-looking rule: weight-only product below M=1024, W8A8 kernel above;
    weight-only layers: kernel up to 64 tokens, XLA above."""
    rule = {
        "int8/w8a8": ((64, "w16"), (1024, "xla_w16"), (None, "w8a8")),
        "fp8/w8a8": ((1024, "xla_w8a8"), (None, "w8a8")),
        "int8/w16": ((64, "w16"), (None, "xla_w16")),
        "int4g128/w16": ((None, "w16"),),
    }
    monkeypatch.setattr(kd, "DEFAULT_RULE", rule)
    return fake_gpu


@pytest.mark.parametrize("m, want", [(10, ["w8a16"]), (300, []), (1030, ["int8"])])
def test_w8a8_layer_takes_the_rule_path(measured_rule, m, want):
    x = jax.random.normal(jax.random.key(0), (m, 256), jnp.float32).astype(jnp.bfloat16)
    w = jquant.quantize(jax.random.normal(jax.random.key(1), (256, 72)), "int8")
    a = jquant.parse_spec("int8/token")
    y = linear(x, w, act=a, backend="auto")
    assert measured_rule == want
    # Below the W8A8 threshold the layer is its weight-only product (bf16 activations).
    y_ref = linear(x, w, act=a if m > 1024 else None, backend="xla")
    err = float(jnp.linalg.norm((y - y_ref).astype(jnp.float32)) / jnp.linalg.norm(y_ref.astype(jnp.float32)))
    assert err < 1e-2, err
    # JQUANT_BACKEND=pallas (force) bypasses the rule: the W8A8 kernel runs at every M.
    measured_rule.clear()
    linear(x, w, act=a, backend="pallas")
    assert measured_rule == ["int8"]


def test_xla_paths_and_weight_only_rule(measured_rule):
    x = jax.random.normal(jax.random.key(0), (10, 256), jnp.float32).astype(jnp.bfloat16)
    w8 = jquant.quantize(jax.random.normal(jax.random.key(1), (256, 72)), "fp8_e4m3")
    a8 = jquant.parse_spec("fp8_e4m3/token")
    y = linear(x, w8, act=a8, backend="auto")  # xla_w8a8: jquant's XLA path, activations quantized
    assert measured_rule == []
    chex.assert_trees_all_equal(y, linear(x, w8, act=a8, backend="xla"))
    wi = jquant.quantize(jax.random.normal(jax.random.key(1), (256, 72)), "int8")
    linear(x, wi, backend="auto")
    assert measured_rule == ["w8a16"]
    measured_rule.clear()
    x_big = jnp.concatenate([x] * 10)  # 100 tokens: xla_w16
    linear(x_big, wi, backend="auto")
    assert measured_rule == []


def test_online_hadamard_with_the_weight_only_product(measured_rule, monkeypatch):
    # hadamard=True on a layer whose rule drops the activation quantizer: rotated in XLA, then
    # the weight-only product of the rotated activations.
    from jquant.hadamard import apply_hadamard

    monkeypatch.setattr(act_quant, "supports", lambda x, hadamard=False: True)
    x = jax.random.normal(jax.random.key(0), (6, 256), jnp.float32).astype(jnp.bfloat16)
    w = jquant.quantize(jax.random.normal(jax.random.key(1), (256, 72)), "int8")
    a = jquant.parse_spec("int8/token")
    y = linear(x, w, act=a, backend="auto", hadamard=True)
    assert measured_rule == ["w8a16"]
    xr = apply_hadamard(x, axis=-1).astype(x.dtype)
    y_ref = linear(xr, w, backend="xla")
    # Both round to bf16 (one unit in the last place each) from sums of exact products.
    assert_dot_close(
        y.astype(jnp.float32),
        y_ref.astype(jnp.float32),
        xr.astype(jnp.float32),
        jquant.dequantize(w, jnp.float32).T,
        tol=2**-7,
        what="weight-only product of rotated x",
    )
