"""benchmarks/formats.py runs end to end on tiny trees and writes the JSON it promises.

Timings are not checked (they mean nothing at smoke size); the structure is.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "formats.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_every_comparison_is_reported(tmp_path):
    out = tmp_path / "formats.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--workdir",
               str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=540, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["smoke"] is True and record["repeats"] == 1
    assert set(record["comparisons"]) == {"orbax-small", "orbax-big", "orbax-train",
                                          "safetensors-big"}
    for name, result in record["comparisons"].items():
        assert set(result["runs"]) == {"theirs", "ours"}, name
        assert all(len(runs) == 1 and runs[0] > 0 for runs in result["runs"].values()), name
        assert result["ratio"] > 0 and result["target"] > 0, name
    assert record["comparisons"]["orbax-small"]["target"] == 10.0
    assert "orbax-small" in done.stdout and "theirs/ours" in done.stdout
    assert list(tmp_path.iterdir()) == [out]  # the checkpoints it wrote are gone
