"""Every notebook in colab/ runs top to bottom in a real Jupyter kernel, install cell included."""
import pathlib

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

COLAB = pathlib.Path(__file__).parent.parent / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))


def test_the_three_notebooks_are_there():
  assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "test_time_scaling.ipynb",
                                         "hf_checkpoint_on_a_mesh.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_a_kernel(path, tmp_path, monkeypatch):
  nb = nbformat.read(path, as_version=4)
  first = "".join(nb.cells[1].source) if len(nb.cells) > 1 else ""
  assert "pip" in first and "install" in first, "the first code cell installs the package"
  # The kernel starts in the checkout, as in a clone; it must not need a display or the network.
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(COLAB.parent)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors
