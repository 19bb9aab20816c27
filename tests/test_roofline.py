"""Roofline: eq. (7) intensities worked out by hand, ridge points, the Table 4 grid."""

import importlib.util
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jquant import roofline as rl

K = N = 4096


@pytest.mark.parametrize(
    "b, w, a, expected",
    [
        # FP16/FP16, B=1: 2*1*4096*4096 / (4096*4096*2 + 1*4096*2 + 1*4096*2) = 8192/8196
        (1, "FP16", "FP16", 8192 / 8196),
        # FP16/FP16, B=1024: 2*1024*4096^2 / (4096^2*2 + 1024*4096*2 + 1024*4096*2)
        #   = 2*1024*4096 / (8192 + 2048 + 2048) = 8388608 / 12288 = 682.67
        (1024, "FP16", "FP16", 8388608 / 12288),
        # INT4/FP16, B=1: 2*4096^2 / (4096^2*0.5 + 4096*2 + 4096*2) = 8192 / (2048 + 4)
        (1, "INT4", "FP16", 8192 / 2052),
        # FP8/FP8 (FP16 out), B=16: 2*16*4096^2 / (4096^2*1 + 16*4096*1 + 16*4096*2)
        #   = 32*4096 / (4096 + 16 + 32)
        (16, "FP8", "FP8", 32 * 4096 / 4144),
        # INT8/INT8 (FP16 out), B=256: 512*4096 / (4096 + 256 + 512) = 431.16
        (256, "INT8", "INT8", 512 * 4096 / 4864),
        # INT4/INT8 (FP16 out), B=64: 128*4096 / (2048 + 64 + 128) = 234.06
        (64, "INT4", "INT8", 128 * 4096 / 2240),
    ],
)
def test_linear_intensity_matches_hand_computed_cells(b, w, a, expected):
    assert rl.linear_intensity(b, K, N, w, a) == pytest.approx(expected, rel=1e-12)
    bits = {"FP16": 16, "FP8": 8, "INT8": 8, "INT4": 4}
    assert rl.linear_intensity(b, K, N, bits[w], bits[a], 16) == pytest.approx(expected, rel=1e-12)


def test_fp16_b1_is_about_one_not_the_printed_half():
    i = rl.linear_intensity(1, K, N, 16, 16)
    assert i == pytest.approx(0.9995, abs=1e-4)
    # The printed 0.5 is what counting B*K*N multiply-adds (not 2*B*K*N FLOPs) gives.
    assert round(i / 2, 1) == 0.5
    # Ignoring activation and output bytes does not produce it: 2*K*N / (2*K*N) = 1.
    assert rl.linear_flops(1, K, N) / (K * N * 2) == 1.0


def test_output_format_matters():
    fp16_out = rl.linear_intensity(1024, K, N, "FP8", "FP8", "FP16")
    fp8_out = rl.linear_intensity(1024, K, N, "FP8", "FP8", "FP8")
    assert fp8_out == pytest.approx(2 * 1024 * 4096 / (4096 + 1024 + 1024))
    assert fp8_out > fp16_out


def test_ridge_and_attainable():
    assert rl.ridge_point(989e12, 3.35e12) == pytest.approx(295.22, abs=0.01)
    assert rl.H100_SXM.ridge("FP8", "FP8") == pytest.approx(1979 / 3.35)
    assert rl.H100_SXM.ridge("INT4", "FP16") == rl.H100_SXM.ridge("FP16", "FP16")
    assert rl.H100_SXM.ridge("INT4", "INT8") == rl.H100_SXM.ridge("INT8", "INT8")
    assert rl.attainable(1.0, 989e12, 3.35e12) == 3.35e12  # bandwidth roof
    assert rl.attainable(1e4, 989e12, 3.35e12) == 989e12  # compute roof
    measured = rl.Ceilings(name="measured", bf16_flops=750e12, bandwidth=2.9e12)
    assert measured.ridge("FP16", "FP16") == pytest.approx(750 / 2.9)
    assert rl.H100_MEASURED_XLA.bandwidth == 2.88e12


def test_linear_time_is_max_of_compute_and_memory():
    # M=1: pure weight streaming. 4096^2*2 + 2*4096*2 bytes at 3.35 TB/s.
    t = rl.linear_time(1, K, N, "FP16", "FP16")
    assert t == pytest.approx((K * N * 2 + 4 * K) / 3.35e12)
    # Big M: compute-bound at 989 TFLOP/s.
    t = rl.linear_time(32760, 5120, 5120, "FP16", "FP16")
    assert t == pytest.approx(2 * 32760 * 5120 * 5120 / 989e12)


def test_dit_token_counts_are_compute_bound_and_small_m_is_not():
    wan_tokens = 21 * (480 // 16) * (832 // 16)  # 81 frames -> 21 latents, 2x2 patches
    assert wan_tokens == 32760
    for k, n in [(1536, 1536), (1536, 8960), (5120, 5120), (5120, 13824), (13824, 5120)]:
        for w, a in [("FP16", "FP16"), ("FP8", "FP8"), ("INT4", "FP16")]:
            i = rl.linear_intensity(wan_tokens, k, n, w, a)
            assert i > rl.H100_SXM.ridge(w, a), (k, n, w, a)
    for m in (1, 2, 16):
        assert rl.linear_intensity(m, 5120, 30720, "FP16", "FP16") < 16.1
        assert rl.linear_intensity(m, 5120, 30720, "FP16", "FP16") < rl.H100_SXM.ridge("FP16", "FP16")


def test_table4_grid_shape_and_values():
    rows = rl.table4_grid()
    assert len(rows) == len(rl.DEFAULT_BATCHES) * len(rl.DEFAULT_COMBOS)
    assert rl.DEFAULT_BATCHES == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    cell = {(r.batch, r.weight, r.act): r for r in rows}
    assert cell[(1, "FP16", "FP16")].intensity == pytest.approx(8192 / 8196)
    assert cell[(1, "FP16", "FP16")].bound == "memory"
    assert cell[(1024, "FP16", "FP16")].bound == "compute"
    assert cell[(128, "INT4", "FP16")].bound == "compute"  # 409.6 > 295.2
    assert cell[(128, "INT4", "INT8")].bound == "memory"  # 431.2 < 590.7
    for r in rows:
        assert r.attainable_flops <= rl.H100_SXM.peak(r.weight, r.act)
        assert r.intensity == pytest.approx(r.flops / r.bytes)
    act_out = {(r.batch, r.weight, r.act): r for r in rl.table4_grid(out_format=None)}
    assert act_out[(1024, "INT8", "INT8")].out == "INT8"
    assert act_out[(1024, "INT8", "INT8")].intensity > cell[(1024, "INT8", "INT8")].intensity


def test_format_table_markdown():
    rows = rl.table4_grid(batches=(1, 2), combos=(("FP16", "FP16"), ("INT4", "FP8")))
    text = rl.format_table(rows)
    lines = text.splitlines()
    assert lines[0] == "| B | FP16/FP16 | INT4/FP8 |"
    assert lines[2].startswith("| 1 | 0.9995 | ")
    assert len(lines) == 4
    assert "memory" in rl.format_table(rows, "bound")
    assert lines[3].split("|")[2].strip() == "1.9980"


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 1 << 16),
    k=st.integers(1, 1 << 14),
    n=st.integers(1, 1 << 14),
    wb=st.sampled_from([4, 8, 16]),
    ab=st.sampled_from([4, 8, 16]),
)
def test_intensity_properties(m, k, n, wb, ab):
    i = rl.linear_intensity(m, k, n, wb, ab)
    # Bounded by the weight-only and activation-only limits, monotone in the token count.
    assert i <= 2 * m * 8 / wb + 1e-9
    assert i <= rl.linear_flops(m, k, n) / (m * k * ab / 8)
    assert rl.linear_intensity(m + 1, k, n, wb, ab) >= i
    # Fewer weight bits never lower the intensity.
    assert rl.linear_intensity(m, k, n, wb / 2, ab) >= i


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown format"):
        rl.linear_intensity(1, 8, 8, "INT3", "FP16")
    with pytest.raises(ValueError, match="m must be a positive integer"):
        rl.linear_intensity(0, 8, 8, 16, 16)
    with pytest.raises(ValueError, match="w_bits"):
        rl.linear_intensity(1, 8, 8, -4, 16)
    with pytest.raises(ValueError, match="positive"):
        rl.ridge_point(0, 1)
    with pytest.raises(ValueError, match="Ceilings.bandwidth"):
        rl.Ceilings(bandwidth=0)
    with pytest.raises(ValueError, match="value must be one of"):
        rl.format_table(rl.table4_grid(batches=(1,)), "speed")


def test_script_prints_and_writes(tmp_path, capsys):
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "roofline_table.py"
    spec = importlib.util.spec_from_file_location("roofline_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--hypotheses"]) == 0
    out = capsys.readouterr().out
    assert "| 1 | 0.9995 |" in out and "| 1 | 0.9995 | 0.4998 | 1 | 0.5 |" in out
    target = tmp_path / "table.md"
    assert mod.main(["--write", str(target)]) == 0
    text = target.read_text()
    assert "H100 SXM measured" in text and "attainable (TFLOP/s)" in text
