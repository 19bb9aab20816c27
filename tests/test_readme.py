"""The README's API example runs as written, and its Quick start has exactly two commands."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "no python example in README.md"
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "W8A8 relative error" in out and "total" in out


def test_quick_start_has_two_commands():
    quick = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    cmds = re.findall(r"```\n(.*?)\n```", quick, re.S)
    assert len(cmds) == 2 and cmds[0].rstrip().endswith("jquant demo") and "pytest" in cmds[1]
