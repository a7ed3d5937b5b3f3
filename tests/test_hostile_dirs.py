"""Hostile or odd directories: links planted where the library keeps its own files, FIFOs
where it reads, files named like steps. Nothing is written or deleted through a link, no
read blocks forever, and each case is a typed error naming the file, or is left alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import pytree_ckpt as pc
from pytree_ckpt import _format

TREE = {"w": np.arange(1000.0), "b": np.ones(3, np.float32)}
VICTIM_BYTES = b"precious data that is not a checkpoint\n"


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_bytes(VICTIM_BYTES)
    return path


def test_a_link_where_the_commit_file_is_written_is_refused(tmp_path, victim):
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    link = ckpt / (_format.COMMIT_FILE + ".__lock")
    link.symlink_to(victim)
    with pytest.raises(pc.SaveError, match="checkpoint.msgpack.__lock: a symbolic link"):
        pc.save(TREE, ckpt)
    assert victim.read_bytes() == VICTIM_BYTES
    assert link.is_symlink()
    with pytest.raises(pc.IncompleteCheckpointError):
        pc.restore(ckpt)


def test_a_link_in_place_of_the_managers_lock_file_is_refused(tmp_path, victim):
    root = tmp_path / "run"
    root.mkdir()
    (root / "manager.lock").symlink_to(victim)
    with pytest.raises(pc.NotACheckpointError, match=r"manager.lock: a symbolic link"):
        pc.CheckpointManager(root)
    assert victim.read_bytes() == VICTIM_BYTES


def test_a_link_where_a_metrics_file_is_written_is_refused(tmp_path, victim):
    root = tmp_path / "run"
    with pc.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, TREE, metrics={"loss": 1.0})
        (root / "2.metrics.msgpack.__lock").symlink_to(victim)
        with pytest.raises(pc.NotACheckpointError,
                           match=r"2.metrics.msgpack.__lock: a symbolic link"):
            mgr.save(2, TREE, metrics={"loss": 0.5})
        assert mgr.steps() == [1]
    assert victim.read_bytes() == VICTIM_BYTES


def test_a_link_in_place_of_the_step_index_is_refused(tmp_path):
    root, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("mine")
    with pc.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, TREE)
    (root / ".steps" / "1").unlink()
    (root / ".steps" / "complete").unlink()
    (root / ".steps").rmdir()
    (root / ".steps").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(pc.NotACheckpointError, match=r"\.steps: a symbolic link"):
        pc.CheckpointManager(root)
    assert sorted(os.listdir(elsewhere)) == ["notes.txt"]  # nothing written through it
    assert pc.latest(root) == str(root / "1")  # locally the listing is the truth


def test_retention_never_deletes_through_a_step_folder_that_is_a_link(tmp_path):
    archive = tmp_path / "archive"
    pc.save(TREE, archive)
    root = tmp_path / "run"
    root.mkdir()
    (root / "1").symlink_to(archive, target_is_directory=True)
    with pc.CheckpointManager(root, keep=1, async_save=False) as mgr:
        assert mgr.steps() == []  # a link is not one of the manager's steps
        mgr.save(2, TREE)
        mgr.save(3, TREE)
        assert mgr.steps() == [3]
    assert (archive / _format.COMMIT_FILE).is_file()
    assert (root / "1").is_symlink()
    restored, _ = pc.restore(archive)
    np.testing.assert_array_equal(restored["w"], TREE["w"])
    assert pc.latest(root) == str(root / "3")


def test_saving_into_a_step_folder_that_is_a_link_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = tmp_path / "run"
    root.mkdir()
    (root / "4").symlink_to(elsewhere, target_is_directory=True)
    with pc.CheckpointManager(root, async_save=False) as mgr:
        with pytest.raises(pc.NotACheckpointError, match=r"run/4: a symbolic link named like "
                           "step 4"):
            mgr.save(4, TREE)
    assert os.listdir(elsewhere) == []


@pytest.mark.parametrize("kind", ["file", "link to a file", "dangling link"])
def test_things_named_like_steps_are_left_alone(tmp_path, kind):
    root = tmp_path / "run"
    root.mkdir()
    stray = root / "7"
    if kind == "file":
        stray.write_bytes(b"notes")
    elif kind == "link to a file":
        (tmp_path / "notes").write_bytes(b"notes")
        stray.symlink_to(tmp_path / "notes")
    else:
        stray.symlink_to(tmp_path / "nowhere")
    with pc.CheckpointManager(root, async_save=False, keep=1) as mgr:
        assert mgr.steps() == []
        with pytest.raises(pc.NotACheckpointError, match="named like step 7"):
            mgr.save(7, TREE)
        mgr.save(8, TREE)
        mgr.save(9, TREE)
        assert mgr.steps() == [9]
    assert os.path.lexists(stray)
    if kind != "dangling link":
        assert stray.read_bytes() == b"notes"
    assert pc.latest(root) == str(root / "9")


def _blocks_or_raises(call, fifo) -> BaseException | None:
    """``call()``'s exception, failing the test if it is still blocked after 30 s (the FIFO is
    then opened for writing and closed, so that the blocked read ends)."""
    outcome: list = []

    def run():
        try:
            call()
            outcome.append(None)
        except BaseException as e:  # handed to the test below
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        os.close(fd)
        thread.join(10)
        pytest.fail(f"blocked on the FIFO {fifo}")
    return outcome[0]


def test_a_fifo_in_place_of_the_commit_file_is_refused(tmp_path):
    ckpt = tmp_path / "c"
    pc.save(TREE, ckpt)
    (ckpt / _format.COMMIT_FILE).unlink()
    os.mkfifo(ckpt / _format.COMMIT_FILE)
    for call in (lambda: pc.restore(ckpt), lambda: pc.metadata(ckpt)):
        error = _blocks_or_raises(call, ckpt / _format.COMMIT_FILE)
        assert isinstance(error, pc.NotACheckpointError), error
        assert "checkpoint.msgpack: not a regular file" in str(error)


def test_a_fifo_in_place_of_a_packed_blob_is_refused(tmp_path):
    ckpt = tmp_path / "c"
    pc.save(TREE, ckpt)
    (blob,) = [os.path.join(root, f) for root, _, files in os.walk(ckpt) if "/p/" in root + "/"
               for f in files]
    os.unlink(blob)
    os.mkfifo(blob)
    error = _blocks_or_raises(lambda: pc.restore(ckpt), blob)
    assert isinstance(error, pc.NotACheckpointError), error
    assert f"{blob}: not a regular file" in str(error)


_FULL_DISK_CHILD = textwrap.dedent(r'''
    import json, resource, signal, sys
    import pytree_ckpt as pc
    root = sys.argv[1]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))  # writing the lock owner fails
    try:
        pc.CheckpointManager(root)
        first = "opened"
    except OSError as e:
        first = type(e).__name__ + ": " + str(e)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    try:
        with pc.CheckpointManager(root, async_save=False) as mgr:
            mgr.save(1, {"w": 1.0})
            second = mgr.steps()
    except Exception as e:
        second = type(e).__name__ + ": " + str(e)
    print(json.dumps([first, second]))
''')


def test_a_manager_that_fails_to_open_on_a_full_disk_releases_its_lock(tmp_path):
    import json

    src = os.path.dirname(os.path.dirname(pc.__file__))
    out = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(tmp_path / "run")],
                         env=dict(os.environ, PYTHONPATH=src), capture_output=True, text=True,
                         timeout=120, check=True).stdout
    first, second = json.loads(out.strip().splitlines()[-1])
    assert first.startswith("OSError") and "File too large" in first, first
    assert second == [1], second


_READ_ONLY_CHILD = textwrap.dedent(r'''
    import json, sys
    import numpy as np
    import pytree_ckpt as pc
    root, phase = sys.argv[1], sys.argv[2]
    if phase == "write":
        with pc.CheckpointManager(root, async_save=False) as mgr:
            mgr.save(3, {"w": np.arange(4.0)})
        sys.exit(0)
    out = {}
    with pc.CheckpointManager(root, read_only=True) as mgr:
        tree, _ = mgr.restore()
        out["read_only"] = [mgr.steps(), tree["w"].tolist(), pc.verify(root + "/3").ok]
    try:
        pc.CheckpointManager(root)
        out["writer"] = "opened"
    except OSError as e:
        out["writer"] = type(e).__name__ + ": " + str(e)
    print(json.dumps(out))
''')


def test_a_manager_on_read_only_media_restores_without_a_lock(tmp_path):
    """A directory on a read-only file system (a tmpfs remounted read-only, in a private
    mount namespace): a read-only manager lists, restores and verifies with no lock; a
    writing one says why it cannot take the lock, and how to only read."""
    import json
    import shutil

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare -m to mount a private tmpfs")
    src = os.path.dirname(os.path.dirname(pc.__file__))
    py = f"{sys.executable} -c '{_READ_ONLY_CHILD}'"
    script = (f"mount -t tmpfs -o size=8m none {mnt} && {py} {mnt}/run write && "
              f"mount -o remount,ro {mnt} && {py} {mnt}/run read")
    out = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=src), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["read_only"] == [[3], [0.0, 1.0, 2.0, 3.0], True], result
    assert result["writer"] == (
        f"OSError: [Errno 30] {mnt}/run/manager.lock: cannot create the lock file (Read-only "
        "file system); to only read this directory, open it with read_only=True"), result
