"""notebooks/quickstart.ipynb runs top to bottom on a CPU and prints its measurements, in a
fresh kernel set up the way Colab runs it: the working directory holds the repository as a
folder named `jquant`, which Python would otherwise import as an empty namespace package.

The setup cell's install branch (jquant missing) runs in tests/test_new_user.py's fresh venv.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _outputs(nb) -> str:
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def _imported_from(text: str) -> Path:
    """The package folder the setup cell reports (`jquant 0.1.0 from DIR`)."""
    line = next(ln for ln in text.splitlines() if ln.startswith("jquant ") and " from " in ln)
    return Path(line.split(" from ", 1)[1].strip())


def test_quickstart_notebook_executes_next_to_a_clone(tmp_path):
    (tmp_path / "jquant").symlink_to(ROOT, target_is_directory=True)  # Colab: `!git clone ... jquant`
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = _outputs(nb)
    assert "installing:" not in text  # jquant is installed here: nothing to do
    pkg = _imported_from(text)
    assert (pkg / "__init__.py").is_file() and (pkg / "rules.py").is_file()  # the package, not the clone's root
    assert "PSNR" in text and "step groups of the scale table" in text and "one-step errors" in text
    assert "no pipeline directory at" in text  # the real-checkpoint cell says why it did nothing
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the clips side by side and the per-step error plot


@pytest.mark.parametrize("where", ["empty folder", "notebooks folder of the checkout"])
def test_setup_cell_imports_jquant(tmp_path, where):
    """The setup cell alone, from a folder without a clone and from the checkout's notebooks/."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = [c for c in nb.cells if c.cell_type == "code"][:1]
    cwd = tmp_path if where == "empty folder" else ROOT / "notebooks"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    text = _outputs(nb)
    assert "installing:" not in text and (_imported_from(text) / "__init__.py").is_file()
