"""`make demo` runs: train, checkpoint, resume with identical losses, load the weights."""

import pathlib
import subprocess
import sys

import pytest

DEMO = pathlib.Path(__file__).parent.parent / "examples" / "demo.py"


@pytest.mark.timeout(300)
def test_demo_runs_and_resumes_with_identical_losses(tmp_path):
    out = subprocess.run([sys.executable, str(DEMO), "--dir", str(tmp_path / "ckpt")],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "kept steps [200, 240, 280] (keep=3)" in out.stdout
    assert "restored step 280" in out.stdout
    assert "RestoreStatus: 14 matched, 0 unmatched, 0 unused, 0 mismatched" in out.stdout
    assert "identical losses" in out.stdout
    assert "resume into a wider model refused: " in out.stdout
    assert "9 target leaves were not restored" in out.stdout
    assert ("with strict=False: 5 matched, 9 mismatched, e.g. params/hidden/bias: "
            "saved float32[64], target float32[96]") in out.stdout
    assert "10 unused under ['opt_state', 'step']" in out.stdout
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        ".steps", "200", "240", "280", "manager.lock"]
