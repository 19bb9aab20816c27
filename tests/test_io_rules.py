"""Rules/report, orbax checkpoints (bit-exact, atomic) and safetensors loading."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import jquant
from jquant.io import checkpoint
from jquant.models.safetensors import load_safetensors_tree, read_safetensors
from jquant.rules import count_quantized, flatten_with_paths

ALL_SPECS = [
    "int8",
    "int4/g16",
    "uint4/g16",
    "int3/g16",
    "int2/c",
    "uint2/g16",
    "fp8_e4m3",
    "fp8_e5m2",
    "nf4/g16",
    "fp4/g16",
    "mxfp4",
    "nvfp4",
    "int8/b16x8",
    "int4/g16/s=bfloat16",
    "uint8/c",
]


def tree_of(x):
    return {
        "blocks_0": {"attn": {"kernel": x, "bias": jnp.zeros(x.shape[1])}, "norm": {"scale": jnp.ones(x.shape[1])}},
        "embed": {"embedding": x},
        "vec": jnp.arange(3.0),
    }


def test_default_rules_skip_norms_biases_embeddings_vectors():
    x = jax.random.normal(jax.random.key(0), (32, 16))
    q, report = jquant.quantize_params(tree_of(x), "int8")
    assert count_quantized(q) == 1
    assert isinstance(q["blocks_0"]["attn"]["kernel"], jquant.QArray)
    rows = {r.path: r for r in report.rows}
    assert rows["blocks_0/attn/kernel"].spec == "int8/c"
    assert rows["embed/embedding"].spec == "-"
    assert report.bytes_after < report.bytes_before
    assert "total" in report.table()


def test_first_matching_rule_wins_and_none_skips():
    x = jax.random.normal(jax.random.key(0), (32, 16))
    t = {"a": {"kernel": x}, "b": {"kernel": x}, "c": {"kernel": x}}
    q, _ = jquant.quantize_params(t, [("^a/", None), ("^b/", "int4/g16"), (".*", "fp8_e4m3")])
    assert not isinstance(q["a"]["kernel"], jquant.QArray)
    assert q["b"]["kernel"].spec.fmt == "int4" and q["c"]["kernel"].spec.fmt == "fp8_e4m3"


def test_rule_errors_name_the_path():
    t = {"blocks_3": {"ff": {"kernel": jnp.ones((30, 8))}}}
    with pytest.raises(ValueError, match="blocks_3/ff/kernel"):
        jquant.quantize_params(t, "int4/g16")
    t = {"blocks_3": {"ff": {"kernel": jnp.ones((32, 8)).at[0, 0].set(jnp.inf)}}}
    with pytest.raises(ValueError, match="blocks_3/ff/kernel.*NaN/Inf"):
        jquant.quantize_params(t, "int8")


def bits(a):
    a = np.asarray(a)
    return a.dtype, a.reshape(-1).view(np.uint8).tobytes()


def test_orbax_round_trip_bit_exact_every_format(tmp_path):
    x = jax.random.normal(jax.random.key(0), (64, 32), jnp.bfloat16)
    tree = {"params": {s.replace("/", "_"): jquant.quantize(x, s) for s in ALL_SPECS}, "float": x, "none": None}
    checkpoint.save(tmp_path / "ck", tree)
    back = checkpoint.restore(tmp_path / "ck")
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for s in ALL_SPECS:
        a, b = tree["params"][s.replace("/", "_")], back["params"][s.replace("/", "_")]
        assert (a.spec, a.dtype, a.pad, a.axis) == (b.spec, b.dtype, b.pad, b.axis)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
        assert bits(a) == bits(b)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    x = jax.random.normal(jax.random.key(0), (16, 8))
    old = {"w": jquant.quantize(x, "int8")}
    checkpoint.save(tmp_path / "ck", old)

    class Boom(Exception):
        pass

    def fail(*a, **k):
        raise Boom("disk full")

    monkeypatch.setattr(checkpoint.json, "dumps", fail)  # fails after arrays were written
    with pytest.raises(Boom):
        checkpoint.save(tmp_path / "ck", {"w": jquant.quantize(2 * x, "int8")})
    monkeypatch.undo()
    back = checkpoint.restore(tmp_path / "ck")
    assert bits(back["w"].qvalue) == bits(old["w"].qvalue)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp dirs left behind


def test_restore_of_a_non_checkpoint_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a jquant checkpoint"):
        checkpoint.restore(tmp_path)


def test_nnx_state_checkpoint(tmp_path):
    from flax import nnx

    m = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    _, st = nnx.split(m)
    q, _ = jquant.quantize_params(st, "int4/g8")
    checkpoint.save(tmp_path / "n", q)
    back = checkpoint.restore(tmp_path / "n")
    chex.assert_trees_all_close(jquant.dequantize(back["kernel"]), jquant.dequantize(q["kernel"].get_value()))


def test_safetensors_single_and_sharded(tmp_path):
    rng = np.random.default_rng(0)
    t = {
        "blocks.0.attn.to_q.weight": rng.normal(size=(4, 4)).astype(np.float32),
        "blocks.0.attn.to_q.bias": rng.normal(size=(4,)).astype(np.float32),
        "proj_out.weight": rng.normal(size=(2, 4)).astype(np.float32),
    }
    save_file(t, str(tmp_path / "model.safetensors"))
    tree = load_safetensors_tree(tmp_path / "model.safetensors")
    np.testing.assert_array_equal(tree["blocks"]["0"]["attn"]["to_q"]["weight"], t["blocks.0.attn.to_q.weight"])
    shard = tmp_path / "sharded"
    shard.mkdir()
    keys = list(t)
    save_file({k: t[k] for k in keys[:2]}, str(shard / "m-00001-of-00002.safetensors"))
    save_file({k: t[k] for k in keys[2:]}, str(shard / "m-00002-of-00002.safetensors"))
    idx = {
        "metadata": {},
        "weight_map": {
            k: ("m-00001-of-00002.safetensors" if i < 2 else "m-00002-of-00002.safetensors") for i, k in enumerate(keys)
        },
    }
    (shard / "m.safetensors.index.json").write_text(json.dumps(idx))
    flat = read_safetensors(shard)
    assert set(flat) == set(t)
    (shard / "m-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard"):
        read_safetensors(shard)


def test_report_paths_cover_every_leaf():
    x = jax.random.normal(jax.random.key(0), (32, 16))
    q, report = jquant.quantize_params(tree_of(x), "int8")
    assert [r.path for r in report.rows] == [p for p, _ in flatten_with_paths(tree_of(x))]
