"""The port_weights notebook runs top to bottom in a real kernel, and shows what it claims."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "port_weights.ipynb"


@pytest.mark.timeout(300)
def test_port_weights_notebook_executes(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # A kernel of this interpreter, running this checkout's library (as test_notebook.py).
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(str(tmp_path / "kernels" / "pytree_ckpt_test"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    src = str(NOTEBOOK.parent.parent / "src")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    client = NotebookClient(nb, timeout=240, kernel_name="pytree_ckpt_test",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    texts = "".join(o.get("text", "") for o in outputs)
    assert "safetensors checkpoint" in texts and "model/layers/0/mlp/up_proj/weight" in texts
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    # The first restore: the PyTorch-layout weights are mismatched, the buffer unused.
    first = next(h for h in html if "RestoreStatus: 4 matched" in h)
    assert "1 unused, 3 mismatched" in first and "model/rotary_emb/inv_freq" in first
    assert "layers/0/kernel" in first and "head/kernel" in first
    # After transposing them every parameter is filled, and the outputs agree.
    assert "RestoreStatus: 7 matched, 0 unmatched, 1 unused, 0 mismatched" in texts
    assert "outputs match: True" in texts
    # The model written back as safetensors restores with everything consumed.
    assert any("RestoreStatus: 7 matched, 0 unmatched, 0 unused, 0 mismatched" in h
               for h in html)
