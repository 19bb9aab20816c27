"""Writers never destroy data they did not write and leave no half files; damaged files raise errors naming them.

Covers jquant.io.checkpoint (save targets, the swap under failure at every step, damaged
checkpoints), jquant.io.gguf (atomic writes, truncation), jquant.models.safetensors (truncated
and inconsistent files and indexes) and jquant.models.loading (save_pretrained's marker,
corrupt model directories). Tiny trees only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file

import jquant
from jquant import models
from jquant.codecs import CODECS
from jquant.io import checkpoint
from jquant.io.checkpoint import CheckpointError, CheckpointTargetError
from jquant.io.gguf import CONFIG_KEY, GGUFError, codec_qarray, export_gguf, load_gguf, load_gguf_params, save_gguf
from jquant.models import dit
from jquant.models.loading import INDEX_NAME, WEIGHTS_NAME
from jquant.models.loading import CheckpointError as ModelCheckpointError
from jquant.models.safetensors import SafetensorsError, read_safetensors

DIT = dit.DiTConfig(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,
    num_layers=1,
    sample_size=8,
    num_embeds_ada_norm=10,
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tree(scale: float = 1.0) -> dict:
    x = scale * np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    return {"w": jquant.quantize(jax.numpy.asarray(x), "int8"), "b": np.arange(5, dtype=np.float32) * scale}


def _bits(tree: dict) -> list[bytes]:
    return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(tree)]


def _snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) with its bytes, to prove it untouched."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved_ckpt(tmp_path_factory) -> tuple[Path, list[bytes]]:
    """One checkpoint of _tree(), copied by the tests that damage or replace it."""
    path = tmp_path_factory.mktemp("ckpt") / "ck"
    checkpoint.save(path, _tree())
    return path, _bits(_tree())


def _copy_ckpt(saved: Path, dst: Path) -> Path:
    shutil.copytree(saved, dst)
    return dst


# ----------------------------------------------------------------------------- checkpoint targets


def test_save_refuses_what_it_did_not_write(tmp_path: Path, saved_ckpt) -> None:
    saved, _ = saved_ckpt
    user_dir = tmp_path / "user_dir"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("precious")
    user_file = tmp_path / "user_file"
    user_file.write_bytes(b"precious bytes")
    (tmp_path / "link_dir").symlink_to(user_dir)
    (tmp_path / "link_file").symlink_to(user_file)
    (tmp_path / "link_ckpt").symlink_to(_copy_ckpt(saved, tmp_path / "real_ckpt"))
    foreign = tmp_path / "foreign"  # another tool's jquant.json
    foreign.mkdir()
    (foreign / "jquant.json").write_text(json.dumps({"version": 1, "settings": {}}))
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "jquant.json").write_text("{not json")
    extra = _copy_ckpt(saved, tmp_path / "ckpt_plus_user_file")  # a checkpoint the user added a file to
    (extra / "README").write_text("mine")

    cases = {
        user_dir: "not a jquant checkpoint",
        user_file: "is a file",
        tmp_path / "link_dir": "symlink",
        tmp_path / "link_file": "symlink",
        tmp_path / "link_ckpt": "symlink",
        foreign: "format",
        garbled: "not valid JSON",
        extra: r"does not have: \['README'\]",
    }
    before = {p: _snapshot(p) for p in cases}
    listing = sorted(os.listdir(tmp_path))
    for path, why in cases.items():
        with pytest.raises(CheckpointTargetError, match=why) as err:
            checkpoint.save(path, _tree(2.0))
        assert str(path) in str(err.value) and "left untouched" in str(err.value)
    assert {p: _snapshot(p) for p in cases} == before
    assert sorted(os.listdir(tmp_path)) == listing  # no temporary directories
    assert (tmp_path / "link_dir").is_symlink() and os.readlink(tmp_path / "link_dir") == str(user_dir)


def test_save_into_empty_dir_and_over_its_own_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    path.mkdir()
    checkpoint.save(path, _tree())
    assert (path.stat().st_mode & 0o777) == (0o777 & ~_umask())  # not mkdtemp's private 0700
    meta = json.loads((path / "jquant.json").read_text())
    assert meta["format"] == checkpoint.FORMAT_MARKER
    with pytest.raises(FileExistsError, match="overwrite=False"):
        checkpoint.save(path, _tree(3.0), overwrite=False)
    checkpoint.save(path, _tree(2.0))
    assert _bits(checkpoint.restore(path)) == _bits(_tree(2.0))
    assert os.listdir(tmp_path) == ["ck"]


def test_checkpoint_from_before_the_marker_is_replaceable(tmp_path: Path, saved_ckpt) -> None:
    path = _copy_ckpt(saved_ckpt[0], tmp_path / "ck")
    meta = json.loads((path / "jquant.json").read_text())
    (path / "jquant.json").write_text(json.dumps({"version": meta["version"], "tree": meta["tree"]}))
    assert _bits(checkpoint.restore(path)) == saved_ckpt[1]  # no checksums recorded: still loads
    checkpoint.save(path, _tree(2.0))
    assert _bits(checkpoint.restore(path)) == _bits(_tree(2.0))


# ----------------------------------------------------------------------------- checkpoint swap under failure


class Boom(BaseException):  # BaseException: cleanup must also run on KeyboardInterrupt-like exits
    pass


def _fail_rename(monkeypatch, when, exc: type[BaseException] = Boom) -> None:
    real = os.rename

    def rename(src, dst, *a, **k):
        if when(Path(src), Path(dst)):
            raise exc(f"rename {src} -> {dst}")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(checkpoint.os, "rename", rename)


def _fail_ocp_save(monkeypatch, path) -> None:
    def save(self, *a, **k):
        raise Boom("disk full inside the array writer")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save)


def _fail_meta(monkeypatch, path) -> None:
    real = Path.write_text

    def write_text(self, *a, **k):
        if self.name == "jquant.json":
            real(self, '{"version": 1, "tr', encoding="utf-8")  # half written, then the failure
            raise Boom("disk full writing jquant.json")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)


FAILURES = {
    "array_writer": _fail_ocp_save,
    "metadata": _fail_meta,
    "move_old_aside": lambda mp, path: _fail_rename(mp, lambda s, d: s == path),
    "move_new_in": lambda mp, path: _fail_rename(mp, lambda s, d: d == path and ".tmp-" in s.name),
}


@pytest.mark.parametrize("where", sorted(FAILURES))
def test_failed_save_keeps_previous_checkpoint_bit_for_bit(tmp_path: Path, saved_ckpt, monkeypatch, where) -> None:
    path = _copy_ckpt(saved_ckpt[0], tmp_path / "ck")
    before = _snapshot(path)
    FAILURES[where](monkeypatch, path)
    with pytest.raises(Boom):
        checkpoint.save(path, _tree(2.0))
    monkeypatch.undo()
    assert _snapshot(path) == before
    assert _bits(checkpoint.restore(path)) == saved_ckpt[1]
    assert os.listdir(tmp_path) == ["ck"]  # no temporary or backup directories


def test_failed_first_save_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    _fail_ocp_save(monkeypatch, None)
    with pytest.raises(Boom):
        checkpoint.save(tmp_path / "new", _tree())
    assert os.listdir(tmp_path) == []


def test_previous_checkpoint_that_cannot_be_put_back_is_named(tmp_path: Path, saved_ckpt, monkeypatch) -> None:
    path = _copy_ckpt(saved_ckpt[0], tmp_path / "ck")
    _fail_rename(monkeypatch, lambda s, d: d == path, OSError)  # neither the new one nor the old one can move in
    with pytest.raises(CheckpointError, match="previous checkpoint could not be moved back; it is intact at") as err:
        checkpoint.save(path, _tree(2.0))
    monkeypatch.undo()
    (backup,) = [p for p in tmp_path.iterdir()]  # the temporary directory is gone, the backup kept
    assert str(backup) in str(err.value)
    assert _bits(checkpoint.restore(backup)) == saved_ckpt[1]
    os.rename(backup, path)
    _fail_rename(monkeypatch, lambda s, d: d == path)  # an interrupt stays an interrupt, with the backup noted
    with pytest.raises(Boom) as err:
        checkpoint.save(path, _tree(2.0))
    monkeypatch.undo()
    (backup,) = [p for p in tmp_path.iterdir()]
    assert any(str(backup) in note for note in err.value.__notes__)


def test_undeletable_backup_warns_after_a_successful_save(tmp_path: Path, saved_ckpt, monkeypatch) -> None:
    path = _copy_ckpt(saved_ckpt[0], tmp_path / "ck")
    real = shutil.rmtree

    def rmtree(p, *a, **k):
        if ".old-" in Path(p).name:
            raise PermissionError(f"cannot delete {p}")
        return real(p, *a, **k)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    with pytest.warns(UserWarning, match="could not be deleted"):
        checkpoint.save(path, _tree(2.0))
    monkeypatch.undo()
    assert _bits(checkpoint.restore(path)) == _bits(_tree(2.0))


# ----------------------------------------------------------------------------- damaged checkpoints


def test_damaged_checkpoints_raise_naming_them(tmp_path: Path, saved_ckpt) -> None:
    saved = saved_ckpt[0]
    no_arrays = _copy_ckpt(saved, tmp_path / "no_arrays")
    shutil.rmtree(no_arrays / "arrays")
    with pytest.raises(CheckpointError, match=f"{no_arrays}: arrays/ is missing"):
        checkpoint.restore(no_arrays)

    bad_meta = _copy_ckpt(saved, tmp_path / "bad_meta")
    text = (bad_meta / "jquant.json").read_text()
    (bad_meta / "jquant.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=f"{bad_meta / 'jquant.json'}: corrupt: not valid JSON"):
        checkpoint.restore(bad_meta)
    (bad_meta / "jquant.json").write_text(text.replace('"a1"', '"a9"', 1))  # tree names an array not stored
    with pytest.raises(CheckpointError, match="tree does not match the stored arrays"):
        checkpoint.restore(bad_meta)

    data = max((p for p in (saved / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    rel = data.relative_to(saved)
    cut = _copy_ckpt(saved, tmp_path / "truncated")
    (cut / rel).write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{cut / 'arrays'}: cannot read the arrays"):
        checkpoint.restore(cut)

    flipped = _copy_ckpt(saved, tmp_path / "flipped")  # same length, one byte of array data changed
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    (flipped / rel).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{flipped / 'arrays'}: array 'a\\d' is corrupt: CRC-32"):
        checkpoint.restore(flipped)


# ----------------------------------------------------------------------------- GGUF


def _gguf_tensors(scale: float = 1.0) -> dict:
    blocks = CODECS["q4_k"].encode(scale * np.ones((2, 256), np.float32))
    return {"a.weight": codec_qarray(blocks, "q4_k"), "b": scale * np.ones(300, np.float32)}


def test_save_gguf_targets_and_failures(tmp_path: Path, monkeypatch) -> None:
    path = save_gguf(tmp_path / "m.gguf", _gguf_tensors())
    assert (path.stat().st_mode & 0o777) == (0o666 & ~_umask())  # not mkstemp's private 0600
    before = path.read_bytes()

    def fail(self, *a, **k):
        raise Boom("disk full in the tensor data")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(Boom):
        save_gguf(path, _gguf_tensors(2.0))
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.gguf"]

    save_gguf(path, _gguf_tensors(2.0))  # its own output file is replaced
    assert path.read_bytes() != before

    user_dir = tmp_path / "dir.gguf"
    user_dir.mkdir()
    (user_dir / "x").write_text("mine")
    (tmp_path / "link.gguf").symlink_to(path)
    with pytest.raises(IsADirectoryError, match=f"{user_dir}: is a directory"):
        save_gguf(user_dir, _gguf_tensors())
    with pytest.raises(FileExistsError, match="link.gguf: is a symlink"):
        save_gguf(tmp_path / "link.gguf", _gguf_tensors())
    assert (user_dir / "x").read_text() == "mine" and (tmp_path / "link.gguf").is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["dir.gguf", "link.gguf", "m.gguf"]


def test_truncated_gguf_names_file_and_sizes(tmp_path: Path) -> None:
    path = save_gguf(tmp_path / "m.gguf", _gguf_tensors(), {"k": "v"})
    data = path.read_bytes()
    start = gguf.GGUFReader(path).tensors[0].data_offset
    bad = tmp_path / "bad.gguf"
    for cut, why in [
        (0, "truncated: empty file"),
        (3, r"truncated or corrupt header: .* needs 4 bytes, file has 3"),
        (100, "truncated or corrupt header"),
        (start + 100, r"truncated: header says 1488 bytes of tensor data, file has 100 \(tensor 'a"),
        (start + 400, r"truncated: header says 1488 bytes of tensor data, file has 400 \(tensor 'b'"),
    ]:
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match=f"{bad}: {why}"):
            load_gguf(bad)

    save_gguf(bad, _gguf_tensors(), {CONFIG_KEY: "{not json"})
    with pytest.raises(GGUFError, match=f"{bad}: corrupt: metadata 'jquant.config' is not valid JSON"):
        load_gguf_params(bad)


# ----------------------------------------------------------------------------- safetensors


def test_damaged_safetensors_raise_naming_the_file(tmp_path: Path) -> None:
    t = {"a": np.arange(100, dtype=np.float32), "b": np.ones((4, 4), np.float32)}
    good = tmp_path / "m.safetensors"
    save_file(t, str(good))
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    bad = tmp_path / "bad.safetensors"
    for blob, why in [
        (data[:5], "truncated: 5 bytes, too short"),
        (data[:40], f"truncated: header says {n} bytes of JSON header, file has 32"),
        (data[:-10], "truncated: header says 464 bytes of tensor data, file has 454"),
        (data[:8] + b"[" + data[9:], "corrupt: header is not valid JSON"),
    ]:
        bad.write_bytes(blob)
        with pytest.raises(SafetensorsError, match=f"{bad}: {why}"):
            read_safetensors(bad)

    shards = tmp_path / "sharded"
    shards.mkdir()
    save_file({"a": t["a"]}, str(shards / "m-1.safetensors"))
    save_file({"b": t["b"]}, str(shards / "m-2.safetensors"))
    index = shards / "m.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(SafetensorsError, match=f"{index}: corrupt index: not valid JSON"):
        read_safetensors(shards)
    index.write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "b": "m-1.safetensors"}}))
    with pytest.raises(SafetensorsError, match=f"{index}: maps tensors to shards that do not hold them: .*'b' -> m-1"):
        read_safetensors(shards)
    index.write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "b": "m-3.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=f"{index}: shard file\\(s\\) missing: \\['m-3.safetensors'\\]"):
        read_safetensors(shards)
    index.write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}))
    shard = shards / "m-2.safetensors"
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(SafetensorsError, match=f"{shard}: truncated: header says 64 bytes of tensor data, file has 59"):
        read_safetensors(index)


# ----------------------------------------------------------------------------- models/loading


def _dit_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), models.param_shapes(DIT))


def test_save_pretrained_replaces_only_its_own_files(tmp_path: Path, monkeypatch) -> None:
    theirs = tmp_path / "theirs"  # a model directory another tool wrote (no jquant marker)
    theirs.mkdir()
    (theirs / "config.json").write_text(json.dumps(DIT.to_diffusers()))
    save_file({"x": np.ones(3, np.float32)}, str(theirs / WEIGHTS_NAME), metadata={"format": "pt"})
    before = _snapshot(theirs)
    with pytest.raises(
        FileExistsError,
        match=r"holds \['config.json', 'diffusion_pytorch_model.safetensors'\], not "
        r"written by save_pretrained",
    ):
        models.save_pretrained(theirs, DIT, _dit_params())
    assert _snapshot(theirs) == before
    models.save_pretrained(theirs, DIT, _dit_params(), overwrite=True)  # the explicit override
    assert models.load_pretrained(theirs)[1]["proj_out_2"]["bias"].shape == (32,)

    ours = tmp_path / "ours"
    models.save_pretrained(ours, DIT, _dit_params(), max_shard_bytes=3_000)
    (ours / "notes.txt").write_text("kept")
    n_shards = len(list(ours.glob("diffusion_pytorch_model-*.safetensors")))
    assert n_shards > 1
    before = _snapshot(ours)

    real = models.loading.save_file
    calls = []

    def save_file_failing(tensors, filename, *a, **k):  # the second file fails half written
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"half")
            raise Boom("disk full")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(models.loading, "save_file", save_file_failing)
    with pytest.raises(Boom):
        models.save_pretrained(ours, DIT, _dit_params(1), max_shard_bytes=3_000)
    monkeypatch.undo()
    assert _snapshot(ours) == before  # old files bit for bit, no temporary files

    models.save_pretrained(ours, DIT, _dit_params(1))  # sharded -> single: its stale shards and index go
    assert sorted(os.listdir(ours)) == ["config.json", WEIGHTS_NAME, "notes.txt"]
    bias = models.load_pretrained(ours)[1]["proj_out_2"]["bias"]
    np.testing.assert_array_equal(bias, _dit_params(1)["proj_out_2"]["bias"])

    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    with pytest.raises(NotADirectoryError, match=f"{a_file}: exists and is not a directory"):
        models.save_pretrained(a_file, DIT, _dit_params())
    assert a_file.read_text() == "mine"


def test_damaged_model_directories_raise_naming_the_file(tmp_path: Path) -> None:
    single = tmp_path / "single"
    models.save_pretrained(single, DIT, _dit_params())
    config = single / "config.json"
    text = config.read_text()
    config.write_text(text[:20])
    with pytest.raises(ModelCheckpointError, match=f"{config}: corrupt: not valid JSON"):
        models.load_pretrained(single)
    with pytest.raises(ModelCheckpointError, match=f"{config}: corrupt: not valid JSON"):
        export_gguf(single, tmp_path / "x.gguf", "Q8_0")
    config.write_text(text)
    weights = single / WEIGHTS_NAME
    with pytest.raises(ValueError, match="is one of the model's own files"):
        export_gguf(single, weights, "Q8_0")
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(ModelCheckpointError, match=f"{weights}: truncated: header says \\d+ bytes of tensor data"):
        models.load_pretrained(single)
    with pytest.raises(SafetensorsError, match=f"{weights}: truncated"):
        export_gguf(single, tmp_path / "x.gguf", "Q8_0")
    assert not (tmp_path / "x.gguf").exists()

    sharded = tmp_path / "sharded"
    models.save_pretrained(sharded, DIT, _dit_params(), max_shard_bytes=3_000)
    shards = sorted(sharded.glob("diffusion_pytorch_model-*.safetensors"))
    shards[1].write_bytes(shards[1].read_bytes()[:100])
    with pytest.raises(ModelCheckpointError, match=f"{shards[1]}: truncated"):
        models.load_pretrained(sharded)
    shards[1].unlink()
    missing = f"{sharded / INDEX_NAME}: shard file\\(s\\) missing: \\['{shards[1].name}'\\]"
    with pytest.raises(FileNotFoundError, match=missing):
        models.load_pretrained(sharded)
    assert issubclass(models.CheckpointMismatchError, ModelCheckpointError)
