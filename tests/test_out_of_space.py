"""Out of space in every phase of a save, beyond test_full_disk.py: a zarr chunk, the commit
file and a packed blob that cannot fit, each with ``save``, ``save_async`` and
``overwrite=True`` over a committed checkpoint. Each raises a SaveError naming the path, the
phase and the OS error; nothing partial is restorable; the overwritten checkpoint stays
intact; and the failed save deletes its own data, so that a save that fits still succeeds
afterwards (without that, a full disk stays full and every later save fails too).

Two ways to run out, each in a child process (tests/_out_of_space_child.py):

- ``RLIMIT_FSIZE`` of 1 MiB: every write past it fails with EFBIG, TensorStore's own I/O
  threads included (the limit is per process); SIGXFSZ is ignored so that it is an error.
- a real full filesystem: an 8 MiB tmpfs mounted in a private mount namespace
  (``unshare -m``, root only; skipped elsewhere), so ENOSPC, invisible to the rest of the host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

CHILD = os.path.join(os.path.dirname(__file__), "_out_of_space_child.py")


def _env() -> dict[str, str]:
    here = os.path.dirname(__file__)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(here, "..", "src"), here]))


def _check(saved: dict, verified: dict, root: str, *, reason: str, phases: bool) -> None:
    assert len(saved["errors"]) == 9
    for name, how, path, error, message in saved["errors"]:
        assert error == "SaveError", (name, how, error, message)
        assert message.startswith(f"{path}: "), message  # names the checkpoint
        assert reason in message, message  # and says why
        if phases:  # (a full filesystem may fill up in an earlier phase than the one aimed at)
            phase = ("writing the commit file failed" if name == "commit"
                     else "nothing was committed")
            assert phase in message, message
    assert verified["A"], "the earlier checkpoint does not restore"
    # Nothing partial is restorable, and the failed saves deleted their data.
    assert set(verified["others"].values()) <= {"CheckpointNotFoundError",
                                                "IncompleteCheckpointError"}, verified
    # (TensorStore may still create an empty chunk directory after a write failed: no bytes.)
    for name, gens in verified["listing"].items():
        holding_data = [g for g, files in gens.items() if files]
        assert len(holding_data) == (1 if name == "A" else 0), (name, gens)


def test_file_size_limit(tmp_path):
    run = [sys.executable, CHILD]
    saved = json.loads(subprocess.run(run + ["save", str(tmp_path), str(1 << 20)], env=_env(),
                                      check=True, capture_output=True, text=True).stdout)
    # Checked from a new process, without the limit.
    verified = json.loads(subprocess.run(run + ["verify", str(tmp_path)], env=_env(),
                                         check=True, capture_output=True, text=True).stdout)
    _check(saved, verified, str(tmp_path), reason="File too large", phases=True)


def _can_mount_private_tmpfs(where: str) -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m none {where}"],
                           capture_output=True)
    return probe.returncode == 0


def test_full_filesystem(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _can_mount_private_tmpfs(str(mnt)):
        pytest.skip("needs root and unshare -m to mount a private tmpfs")
    py = f"{sys.executable} {CHILD}"
    script = (f"mount -t tmpfs -o size=8m none {mnt} && {py} save {mnt} 0 && "
              f"{py} verify {mnt}")
    out = subprocess.run(["unshare", "-m", "sh", "-c", script], env=_env(), check=True,
                         capture_output=True, text=True).stdout.splitlines()
    saved, verified = json.loads(out[0]), json.loads(out[1])
    _check(saved, verified, str(mnt), reason="No space left on device", phases=False)
    assert os.listdir(mnt) == []  # the tmpfs lived in the private namespace only
