"""The commit file under races: a writer killed mid-commit, and two writers without overwrite.

- TensorStore's file driver writes the commit file into ``checkpoint.msgpack.__lock``, fsyncs
  it and renames it into place; a writer SIGKILLed before the rename leaves that temp file
  behind, and TensorStore 0.1.86 reuses it *without truncating it*. The next, shorter commit
  file then kept the stale tail: the save returned, deleted the generation it replaced, and
  left a checkpoint that cannot be read (everything lost). ``_storage.reset_stale_temp``
  truncates the stale file first, under TensorStore's own lock.
- Two processes saving to one new path with ``overwrite=False`` used to both succeed, the
  later commit silently replacing a checkpoint whose save had already returned. The commit
  is now a conditional write ("only if there is none"): one wins, the other raises
  SaveError saying so and deletes its own data.

``PYTREE_CKPT_RACE_ROUNDS`` (default 10) sets the number of two-process races.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import time

import numpy as np
import pytest

import pytree_ckpt as pc
from pytree_ckpt import _format

ROUNDS = int(os.environ.get("PYTREE_CKPT_RACE_ROUNDS", 10))


def _generations(path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("d-"))


def test_a_stale_commit_temp_file_does_not_corrupt_the_next_commit(tmp_path):
    path = tmp_path / "c"
    pc.save({"a": np.zeros(2), "long": "x" * 10_000}, path)
    # What a writer killed between writing the temp file and renaming it leaves behind.
    shutil.copy(path / _format.COMMIT_FILE, path / (_format.COMMIT_FILE + ".__lock"))
    pc.save({"a": np.arange(3)}, path, overwrite=True)
    tree, _ = pc.restore(path)
    np.testing.assert_array_equal(tree["a"], np.arange(3))
    assert "long" not in tree


_KILLED_MID_COMMIT = """
import os, random, signal, sys, threading
import numpy as np, pytree_ckpt as pc
from pytree_ckpt import _decode
path, seed = sys.argv[1], int(sys.argv[2])
decode = _decode.decode
def checked_then_die(*args):
    # SIGKILL 1-4 ms after the commit file is encoded and checked as restore reads it: while
    # TensorStore writes and fsyncs its 4 MB temp file, before the rename.
    out = decode(*args)
    delay = random.Random(seed).uniform(0.001, 0.004)
    threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
    return out
_decode.decode = checked_then_die
pc.save({"w": np.zeros(3), "long": "x" * 4_000_000}, path, overwrite=True)
"""


def test_killed_during_the_commit_write_then_a_shorter_save(zygote, tmp_path):
    path = tmp_path / "c"
    pc.save({"w": np.ones(3)}, path)
    temp = path / (_format.COMMIT_FILE + ".__lock")
    for seed in range(10):
        child = zygote.run(_KILLED_MID_COMMIT, [path, seed])  # a fresh process, forked warm
        assert child.returncode == -9, child.stderr[-2000:]
        tree, _ = pc.restore(path)  # the old tree or the new one, whole
        assert "long" not in tree or len(tree["long"]) == 4_000_000
        if temp.exists() and temp.stat().st_size > 1000:
            break
    else:
        pytest.fail("no kill landed between writing the temp file and renaming it")
    pc.save({"w": np.arange(3)}, path, overwrite=True)  # a much shorter commit file
    tree, _ = pc.restore(path)
    np.testing.assert_array_equal(tree["w"], np.arange(3))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_commit_landing_meanwhile_makes_a_save_without_overwrite_fail(tmp_path, where):
    """Deterministic: while this save writes its data, another writer commits there."""
    from pytree_ckpt import _write

    path = str(tmp_path / "c") if where == "local" else f"memory://races/{tmp_path.name}"
    other = str(tmp_path / "other") if where == "local" else f"memory://races/o{tmp_path.name}"
    pc.save({"who": "other", "w": np.full(70_000, 2.0)}, other)
    inner = _write.write_data

    def another_writer_commits_first(*args):
        out = inner(*args)
        _copy_checkpoint(other, path)  # its data, then its commit file
        return out

    _write.write_data = another_writer_commits_first
    try:
        with pytest.raises(pc.SaveError, match="another save committed a checkpoint to .* while "
                           "this one was writing .with overwrite=False.; this save was not "
                           "committed and the other one is intact"):
            pc.save({"who": "me", "w": np.full(70_000, 1.0)}, path)
    finally:
        _write.write_data = inner
    tree, _ = pc.restore(path)
    assert tree["who"] == "other"
    np.testing.assert_array_equal(tree["w"], np.full(70_000, 2.0))
    if where == "local":
        assert len(_generations(tmp_path / "c")) == 1  # the loser deleted its own data


def _copy_checkpoint(src: str, dst: str) -> None:
    """Copies every key of a checkpoint (local or memory://), the commit file last."""
    from pytree_ckpt import _storage

    a = _storage.open_kvstore(_storage.location(src))
    b = _storage.open_kvstore(_storage.location(dst))
    keys = [k for k in a.list().result() if k != _format.COMMIT_FILE.encode()]
    for key in [*keys, _format.COMMIT_FILE.encode()]:
        b.write(key, a.read(key).result().value).result()


def _racer(me: int, root: str, rounds: int, barrier, results) -> None:
    rng = random.Random(me)
    for r in range(rounds):
        tree = {"who": me, "round": r, "w": np.full((512, 1024), me * 100 + r, np.float32),
                "small": [np.full(8, me * 1000 + r * 10 + k) for k in range(100)]}
        barrier.wait()
        time.sleep(rng.uniform(0, 0.08))  # every interleaving of the two saves' phases
        try:
            if r % 2:
                pc.save_async(tree, f"{root}/{r}").result()
            else:
                pc.save(tree, f"{root}/{r}")
            results.put((me, r, "ok", ""))
        except Exception as e:
            results.put((me, r, type(e).__name__, str(e)))


@pytest.mark.timeout(120 + 10 * ROUNDS)
def test_two_processes_saving_to_one_new_path(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(me, str(tmp_path), ROUNDS, barrier, results))
             for me in (0, 1)]
    for p in procs:
        p.start()
    outcomes: dict[int, dict[int, tuple[str, str]]] = {r: {} for r in range(ROUNDS)}
    for _ in range(2 * ROUNDS):
        me, r, result, message = results.get(timeout=120)
        outcomes[r][me] = (result, message)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    results.close()
    lost_late = 0
    for r, by_proc in outcomes.items():
        path = tmp_path / str(r)
        winners = [me for me, (result, _) in by_proc.items() if result == "ok"]
        assert len(winners) == 1, by_proc  # never both: a returned save is never replaced
        for result, message in by_proc.values():
            if result == "SaveError":  # lost at the commit
                assert f"another save committed a checkpoint to {path}" in message, message
                lost_late += 1
            elif result != "ok":  # started after the other had committed
                assert result == "CheckpointExistsError", (result, message)
        tree, status = pc.restore(path)
        status.assert_consumed()
        (me,) = winners
        assert tree["who"] == me and tree["round"] == r
        np.testing.assert_array_equal(tree["w"], np.full((512, 1024), me * 100 + r, np.float32))
        assert len(_generations(path)) == 1, list(path.iterdir())  # the loser cleaned up
    print(f"\n{ROUNDS} races: {lost_late} lost at the commit, the others at the start")
