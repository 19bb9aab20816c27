"""scripts/dump_kernels.py on the CPU: it turns Mosaic GPU's dumps on before anything compiles,
checks each kernel against its reference, and names unknown cases."""

from __future__ import annotations

import os

import pytest
from _scripts import load_script, unload_script


@pytest.fixture()
def script(monkeypatch):
    for name in ("MOSAIC_GPU_DUMP_PTXAS", "MOSAIC_GPU_DUMP_PTX", "MOSAIC_GPU_DUMP_SASS", "MOSAIC_GPU_DUMP_TO"):
        monkeypatch.setenv(name, "")  # records the variable's state, restored after the test
        monkeypatch.delenv(name)
    module = load_script("dump_kernels")
    yield module
    unload_script(module)


def test_runs_and_checks_each_kernel(script, tmp_path, capsys):
    out = tmp_path / "dump"
    assert script.main(["--kernels", "w8a8_int8_block_n256,w8a8_int8", "--shape", "64,256,384", "--out", str(out)]) == 0
    assert out.is_dir() and os.environ["MOSAIC_GPU_DUMP_TO"] == str(out)
    assert all(os.environ[name] == "1" for name in script.DUMPS)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["PASS", "w8a8_int8_block_n256"], ["PASS", "w8a8_int8"]]


def test_unknown_kernel_is_named(script, tmp_path):
    with pytest.raises(SystemExit, match="unknown kernel case.*no_such_kernel"):
        script.main(["--kernels", "no_such_kernel", "--out", str(tmp_path)])
