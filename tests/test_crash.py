"""Crash consistency: SIGKILL a saving process at random instants, then check what is left.

A child (forked from a warm zygote, see _crash_child.py) saves step after step, in one of
four ways: ``save`` to a new path per step, ``save_async(...).result()`` to a new path per
step, ``save(overwrite=True)`` of one path again and again, and a ``CheckpointManager`` with
async saves (``mgr.save`` then ``mgr.wait``). After each save is complete it appends the step
to an fsynced log. The test SIGKILLs it after a random delay and then checks:

- every acknowledged checkpoint restores bit-exactly (the tree of its step);
- every path that restores at all restores one whole tree of one step, never a mix of two
  generations (every leaf depends on the step);
- a path without a commit file never restores (IncompleteCheckpointError);
- the overwritten path restores a step >= its last acknowledged one;
- a fresh CheckpointManager's ``latest_step()`` is >= the last acknowledged step and restores
  bit-exactly; the next cycle's fresh process (and finally this one) saves successfully.

A fifth mode, ``incremental``, is ``manager`` with a frozen base (one jax.Array, the same at
every step): later steps carry it from the step that wrote it, and retention retires that
step; kills land in incremental saves and in retirements, and every check above holds.

The default is 32 kills in all (8 per mode) and 4 for ``incremental``; set
``PYTREE_CKPT_CRASH_KILLS`` for a longer campaign, e.g.
``PYTREE_CKPT_CRASH_KILLS=2000 pytest tests/test_crash.py``. The delays come
from a fixed seed, ``PYTREE_CKPT_CRASH_SEED`` (default 0): a failing run is run again with the
same delays, and another seed tries other instants.
"""

from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import pytree_ckpt as pc
from pytree_ckpt import _format

sys.path.insert(0, os.path.dirname(__file__))
from _crash_child import frozen, tree  # noqa: E402

KILLS = int(os.environ.get("PYTREE_CKPT_CRASH_KILLS", "32"))
SEED = os.environ.get("PYTREE_CKPT_CRASH_SEED", "0")
MODES = ("sync", "async", "overwrite", "manager", "incremental")
HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def zygote():
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"), JAX_PLATFORMS="cpu",
               XLA_FLAGS="")
    proc = subprocess.Popen([sys.executable, str(HERE / "_crash_child.py")], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)
    proc.stdout.close()


def spawn(zygote, mode: str, root: pathlib.Path, first: int, log: pathlib.Path) -> int:
    zygote.stdin.write(f"{mode} {root} {first} {log}\n")
    zygote.stdin.flush()
    return int(zygote.stdout.readline())


def acked(log: pathlib.Path) -> list[tuple[int, str]]:
    if not log.exists():
        return []
    return [(int(s), p) for s, p in (line.split(" ", 1) for line in log.read_text().split("\n")
                                     if line)]


def assert_exact(restored, step: int) -> None:
    expected = tree(step)
    if "frozen" in restored:  # mode "incremental"
        expected["frozen"] = frozen()
    got = jax.tree.leaves(restored)
    want = jax.tree.leaves(expected)
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for a, b in zip(got, want, strict=True):
        if isinstance(b, np.ndarray):
            a = np.asarray(a)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        else:
            assert type(a) is type(b) and a == b


def restored_step(path) -> int | None:
    """The step of the one whole tree at ``path``, or None if it does not restore."""
    try:
        restored, _ = pc.restore(path)
    except (pc.IncompleteCheckpointError, pc.CheckpointNotFoundError):
        assert not (pathlib.Path(path) / _format.COMMIT_FILE).exists(), path
        return None
    assert_exact(restored, restored["step"])  # one generation, whole
    return restored["step"]


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_at_random_instants(zygote, tmp_path, mode):
    rng = random.Random(f"{mode}-{SEED}")
    log = tmp_path / "acks.log"
    shared = tmp_path / ("ow" if mode == "overwrite" else "mgr")
    managed = mode in ("manager", "incremental")
    kills = max(KILLS // (8 if mode == "incremental" else 4), 1)
    next_step, last_acked = 0, -1
    cycle = 0
    # Up to 3 more cycles while no save has completed (a loaded machine): those kill only
    # after the child's first acknowledgement, at a random instant of its next save.
    while cycle < kills or (last_acked < 0 and cycle < kills + 3):
        root = shared if mode == "overwrite" or managed else tmp_path / f"c{cycle}"
        before = len(acked(log))
        pid = spawn(zygote, mode, root, next_step, log)
        if cycle >= kills:
            deadline = time.monotonic() + 120
            while len(acked(log)) == before and time.monotonic() < deadline:
                time.sleep(0.05)
        # The first save of a fresh child includes starting JAX's CPU backend: ~0.3-1 s.
        # An incremental child needs a few steps: the first writes the base, later ones carry.
        time.sleep(rng.uniform(0.15, 3.0 if mode == "incremental" else 1.3))
        cycle += 1
        os.kill(pid, signal.SIGKILL)
        _wait_gone(zygote, pid)
        acks = acked(log)
        for step, path in acks[before:]:
            last_acked = max(last_acked, step)
            if mode in ("sync", "async"):
                assert restored_step(path) == step, (step, path)  # bit-exact
        if mode in ("sync", "async"):
            for d in sorted(root.iterdir()) if root.exists() else ():
                got = restored_step(d)  # committed but not yet acknowledged is fine
                assert got in (None, int(d.name)), (d, got)
        elif mode == "overwrite" and last_acked >= 0:
            assert restored_step(shared) >= last_acked
        elif managed and last_acked >= 0:
            with pc.CheckpointManager(shared, keep=2) as mgr:
                latest = mgr.latest_step()
                assert latest is not None and latest >= last_acked, (latest, last_acked)
                assert restored_step(shared / str(latest)) == latest
        next_step = max([next_step] + [s + 1 for s, _ in acks]) + 1
    assert last_acked >= 0, "no save ever completed: the kill delays are too short"
    # The next save, here, succeeds where the killed ones left their leftovers.
    target = shared if mode == "overwrite" or managed else tmp_path / "c0" / "next"
    if managed:
        with pc.CheckpointManager(shared, keep=2) as mgr:
            mgr.save(next_step + 10, tree(next_step + 10))
        assert restored_step(shared / str(next_step + 10)) == next_step + 10
    else:
        pc.save(tree(next_step + 10), target, overwrite=True)
        assert restored_step(target) == next_step + 10


def _wait_gone(zygote, pid: int) -> None:
    # Only waitpid knows when every thread of the killed child is gone (and with them its
    # open files and its manager's flock); /proc shows a zombie leader before that.
    zygote.stdin.write(f"reap {pid}\n")
    zygote.stdin.flush()
    assert zygote.stdout.readline().strip() == "reaped"
