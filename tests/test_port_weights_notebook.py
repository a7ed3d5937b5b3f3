"""The port_weights notebook runs top to bottom in a real kernel, and shows what it claims."""

import pytest
from _notebooks import execute


@pytest.mark.timeout(300)
def test_port_weights_notebook_executes(tmp_path, monkeypatch):
    outputs = execute("port_weights.ipynb", tmp_path, monkeypatch)
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
