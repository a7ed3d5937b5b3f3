"""The quickstart notebook runs top to bottom in a real kernel, and shows what it claims."""

import pytest
from _notebooks import execute


@pytest.mark.timeout(300)
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    outputs = execute("quickstart.ipynb", tmp_path, monkeypatch)
    assert not [o for o in outputs if o.output_type == "error"]
    texts = "".join(o.get("text", "") for o in outputs)
    assert "next loss, original:" in texts
    original, restored = texts.split("next loss, original:")[1].split("\n")[0].split("restored:")
    assert float(original) == float(restored)
    # The manager's resume into the wider model is refused, naming the hidden layer's leaves.
    assert "9 target leaves were not restored" in texts
    assert "    params/hidden/kernel: saved float32[4, 32], target float32[4, 48]" in texts
    assert "To accept a partial restore, pass strict=False" in texts
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("RestoreStatus: 14 matched, 0 unmatched, 0 unused, 0 mismatched" in h for h in html)
    assert any("mismatched" in h and "params/hidden/kernel" in h for h in html)
    assert any("params/hidden/kernel" in h and "<table>" in h and "float32" in h for h in html)
