"""pc.clean and a manager's start-up reclaim what interrupted saves left (incomplete saves,
generations no commit file names), never what a save may still be writing."""

import os

import numpy as np
import pytest

import pytree_ckpt as pc
from pytree_ckpt import _clean

# Writes its data, then is SIGKILLed just before writing the commit file: what a crashed
# overwrite leaves is a generation folder that no commit file names.
_KILL_AT_COMMIT = """
import os, signal, sys
import numpy as np, pytree_ckpt as pc
from pytree_ckpt import _storage
real = _storage.write_key
def write_key(loc, kv, key, *a, **k):
    if key == "checkpoint.msgpack":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(loc, kv, key, *a, **k)
"""
_KILLED_BEFORE_COMMIT = _KILL_AT_COMMIT + """
_storage.write_key = write_key
pc.save({"w": np.full(100_000, 9.0)}, sys.argv[1], overwrite=True)
"""


def _crash_an_overwrite(zygote, path):
    child = zygote.run(_KILLED_BEFORE_COMMIT, [path])  # a fresh process, forked warm
    assert child.returncode == -9, child.stderr[-2000:]


def _generations(path):
    return sorted(p.name for p in path.iterdir() if p.name.startswith("d-"))


def test_crashed_overwrites_leave_generations_that_clean_reclaims_once_old(zygote, tmp_path,
                                                                           monkeypatch):
    path = tmp_path / "c"
    pc.save({"w": np.arange(3)}, path)
    (committed,) = _generations(path)
    for _ in range(2):
        _crash_an_overwrite(zygote, path)
    orphans = [g for g in _generations(path) if g != committed]
    assert len(orphans) == 2
    # Minutes old: as far as anyone can tell, saves still writing. Nothing is deleted.
    report = pc.clean(path, delete=True)
    assert report == pc.CleanReport(str(path), (), (), tuple(str(path / g) for g in orphans),
                                    True)
    assert _generations(path) == sorted([committed, *orphans])
    monkeypatch.setattr(_clean, "live_save_s", lambda: 0.0)  # as if hours had passed
    report = pc.clean(path)
    assert report.orphaned == tuple(str(path / g) for g in orphans) and not report.deleted
    assert _generations(path) == sorted([committed, *orphans])  # only listed
    assert "2 orphaned generations can be deleted" in str(report)
    assert pc.clean(path, delete=True).deleted
    assert _generations(path) == [committed]
    tree, _ = pc.restore(path)
    np.testing.assert_array_equal(tree["w"], np.arange(3))
    assert pc.clean(path) == pc.CleanReport(str(path), (), (), (), False)
    assert pc.clean(path=path).path == str(path)  # the field and the argument, as elsewhere
    assert pc.CleanReport._fields == ("path", "incomplete", "orphaned", "kept", "deleted")


def test_a_manager_start_reclaims_orphaned_generations_and_incomplete_steps(zygote, tmp_path):
    run = tmp_path / "run"
    with pc.CheckpointManager(run, async_save=False) as mgr:
        mgr.save(1, {"w": np.arange(3)})
    (committed,) = _generations(run / "1")
    _crash_an_overwrite(zygote, run / "1")  # an orphan inside a committed step
    _crash_an_overwrite(zygote, run / "2")  # an incomplete step
    assert len(_generations(run / "1")) == 2 and len(_generations(run / "2")) == 1
    (orphan,) = [g for g in _generations(run / "1") if g != committed]
    assert pc.clean(run).kept == (str(run / "1" / orphan), str(run / "2"))  # minutes old
    with pc.CheckpointManager(run) as mgr:  # holding the lock: every leftover goes
        assert mgr.steps() == [1]
    assert _generations(run / "1") == [committed] and not (run / "2").exists()
    tree, _ = pc.restore(run / "1")
    np.testing.assert_array_equal(tree["w"], np.arange(3))


def test_clean_reports_an_incomplete_checkpoint_and_deletes_only_leftovers(zygote, tmp_path,
                                                                          monkeypatch):
    path = tmp_path / "c"
    _crash_an_overwrite(zygote, path)
    monkeypatch.setattr(_clean, "live_save_s", lambda: 0.0)
    assert pc.clean(path).incomplete == (str(path),)
    pc.clean(path, delete=True)
    assert os.listdir(path) == []
    with pytest.raises(pc.CheckpointNotFoundError):
        pc.restore(path)


# A manager's save of step 2 with metrics, killed just before its commit file: the metrics
# file (written first) and the step folder stay.
_MANAGER_KILLED_BEFORE_COMMIT = _KILL_AT_COMMIT + """
mgr = pc.CheckpointManager(sys.argv[1], async_save=False)
_storage.write_key = write_key
mgr.save(2, {"w": np.full(1000, 9.0)}, metrics={"loss": 0.25})
"""


def test_clean_reclaims_the_metrics_files_of_steps_that_never_committed(zygote, tmp_path,
                                                                        monkeypatch):
    run = tmp_path / "run"
    with pc.CheckpointManager(run, async_save=False) as mgr:
        mgr.save(1, {"w": np.arange(3)}, metrics={"loss": 0.5})
    child = zygote.run(_MANAGER_KILLED_BEFORE_COMMIT, [run])
    assert child.returncode == -9, child.stderr[-2000:]
    # A metrics file whose save died before it made its step folder, and TensorStore's
    # temporary file of a metrics write that never finished.
    (run / "3.metrics.msgpack").write_bytes((run / "2.metrics.msgpack").read_bytes())
    (run / "1.metrics.msgpack.__lock").write_bytes(b"")
    leftovers = (str(run / "1.metrics.msgpack.__lock"), str(run / "2"),
                 str(run / "2.metrics.msgpack"), str(run / "3.metrics.msgpack"))
    # Minutes old: a save may still be writing them.
    assert pc.clean(run, delete=True) == pc.CleanReport(str(run), (), (), leftovers, True)
    assert (run / "2.metrics.msgpack").exists() and (run / "3.metrics.msgpack").exists()
    monkeypatch.setattr(_clean, "live_save_s", lambda: 0.0)
    assert pc.clean(run) == pc.CleanReport(str(run), leftovers, (), (), False)
    assert "4 incomplete saves" in str(pc.clean(run, delete=True))
    assert sorted(os.listdir(run)) == [".steps", "1", "1.metrics.msgpack", "manager.lock"]
    with pc.CheckpointManager(run, read_only=True) as mgr:
        assert mgr.steps() == [1] and mgr.metrics(1) == {"loss": 0.5}
