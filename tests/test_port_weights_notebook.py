"""The port_weights notebook runs top to bottom in a real kernel, shows what it claims, and
fails when its port is wrong."""

import nbformat
import pytest
from _notebooks import NOTEBOOKS, execute, execute_cells
from nbclient.exceptions import CellExecutionError

THE_RULE = 'transform=[(r".*/kernel", np.transpose)]'


@pytest.mark.timeout(300)
def test_port_weights_notebook_executes(tmp_path, monkeypatch):
    outputs = execute("port_weights.ipynb", tmp_path, monkeypatch)
    assert not [o for o in outputs if o.output_type == "error"]
    texts = "".join(o.get("text", "") for o in outputs)
    assert "safetensors 39 tensors" in texts
    # By name alone, the square attention weights "match" in PyTorch's layout.
    assert "RestoreStatus: 35 matched, 0 unmatched, 0 unused, 4 mismatched" in texts
    assert ("9 kernels 'matched' in PyTorch's layout, e.g. "
            "encoder/layer/0/attention/self/query/kernel") in texts
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    ported = next(h for h in html if "13 transformed" in h)
    assert "RestoreStatus: 39 matched, 0 unmatched, 0 unused, 0 mismatched" in ported
    assert "encoder/layer/1/attention/self/query/kernel" in ported
    # Checked against transformers' own conversion; the old recipe is shown to be wrong.
    assert "same parameters as transformers' conversion: True" in texts
    assert "same outputs: True" in texts
    wrong = texts.split("transposing only the mismatched weights: largest difference ")[1]
    assert float(wrong.split()[0]) > 0.1
    assert "round trip exact: True" in texts
    assert any("RestoreStatus: 39 matched, 0 unmatched, 0 unused, 0 mismatched" in h
               for h in html[1:])


@pytest.mark.timeout(300)
def test_a_wrong_port_fails_the_notebook(tmp_path, monkeypatch):
    # Transposing only what came back mismatched (square attention weights stay in PyTorch's
    # layout, and the status still says matched): the check against transformers' fails.
    nb = nbformat.read(NOTEBOOKS / "port_weights.ipynb", as_version=4)
    sources = [c.source for c in nb.cells if c.cell_type == "code"]
    assert sum(THE_RULE in s for s in sources) == 1
    wrong_rule = ('transform=[("|".join(re.escape(m.path) for m in by_name.mismatched), '
                  "np.transpose)]")
    sources = [s.replace(THE_RULE, wrong_rule) for s in sources]
    with pytest.raises(CellExecutionError, match="AssertionError") as raised:
        execute_cells(sources, tmp_path, monkeypatch)
    assert "assert difference == 0.0" in str(raised.value)
