"""Executing the project's notebooks in a real kernel, for the notebook tests."""

import os
import pathlib

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"


def execute(name: str, tmp_path: pathlib.Path, monkeypatch) -> list:
    """Run ``notebooks/<name>`` top to bottom; return every code cell's outputs, in order."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    _run(nb, tmp_path, monkeypatch)
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]


def execute_cells(sources: list[str], tmp_path: pathlib.Path, monkeypatch) -> list[list]:
    """Run a notebook of these code cells; return each cell's outputs."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    _run(nb, tmp_path, monkeypatch)
    return [cell.outputs for cell in nb.cells]


def _run(nb, tmp_path: pathlib.Path, monkeypatch) -> None:
    # The kernel must run this interpreter (the project's venv), whatever else is installed:
    # a kernel spec written for sys.executable, found first through JUPYTER_PATH.
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(str(tmp_path / "kernels" / "pytree_ckpt_test"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    src = str(NOTEBOOKS.parent / "src")  # this checkout's library, installed or not
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    client = NotebookClient(nb, timeout=240, kernel_name="pytree_ckpt_test",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
