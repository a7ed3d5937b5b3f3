"""Two processes saving different trees to one path at once, with overwrite=True.

Whoever commits last wins; the path must always restore to one whole tree of one save,
never a mix, and never to nothing: a writer must not delete a generation that another
writer is still writing or has just committed. Each child also restores the path after
each of its own saves (it must be whole, of either writer).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pytree_ckpt as pc

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROUNDS = int(os.environ.get("PYTREE_CKPT_CONCURRENT_ROUNDS", "15"))

CHILD = textwrap.dedent(r'''
    import sys, time
    import numpy as np
    import pytree_ckpt as pc

    def tree(who, i):
        tag = who * 1000 + i
        return {"tag": tag, "big": np.full((1024, 1024), tag, np.float32),
                "big2": np.full((700, 512), tag, np.int64),
                "small": [np.full(8, tag * 10 + k, np.int32) for k in range(300)]}

    def check(path):
        t, _ = pc.restore(path)
        want = tree(t["tag"] // 1000, t["tag"] % 1000)
        ok = (np.array_equal(t["big"], want["big"]) and np.array_equal(t["big2"], want["big2"])
              and all(np.array_equal(a, b) for a, b in zip(t["small"], want["small"])))
        assert ok, f"a mix of generations at tag {t['tag']}"
        return t["tag"]

    who, path, rounds, go = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    time.sleep(max(0.0, go - time.time()))  # both start together
    for i in range(rounds):
        pc.save(tree(who, i), path, overwrite=True)
        print("saved", who, i, "now", check(path), flush=True)
''')


def test_two_processes_overwriting_one_path(tmp_path):
    import time

    path = tmp_path / "c"
    pc.save({"tag": -1}, path)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), JAX_PLATFORMS="cpu")
    go = time.time() + 6  # both children have imported JAX by then
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(who), str(path), str(ROUNDS),
                               str(go)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for who in (1, 2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err[-3000:]
    restored, status = pc.restore(path)
    tag = restored["tag"]
    assert tag // 1000 in (1, 2) and tag % 1000 == ROUNDS - 1, tag  # one writer's last save
    np.testing.assert_array_equal(restored["big"], np.full((1024, 1024), tag, np.float32))
    for k, a in enumerate(restored["small"]):
        np.testing.assert_array_equal(a, np.full(8, tag * 10 + k, np.int32))
    # The committed generation is there; so may be generations committed by one writer and
    # replaced by the other, which did not know them (orphans: harmless, never deleted by
    # guesswork, since a folder no commit file names may be a save in progress).
    from pytree_ckpt import _decode, _format

    gens = {p.name for p in path.iterdir() if p.name.startswith("d-")}
    assert _decode.generation_of((path / _format.COMMIT_FILE).read_bytes()) in gens
    assert len(gens) <= 2 * ROUNDS + 1


def _tree(tag):
    return {"big": np.full((256, 256), tag, np.float32),
            "small": [np.full(8, tag * 10 + k, np.int32) for k in range(50)]}


def test_a_restore_overwritten_while_it_reads_reads_the_new_checkpoint(tmp_path, monkeypatch):
    # The overwrite lands after restore has read the commit file and before it reads the
    # data: the generation it was about to read is deleted. It must come back whole, of the
    # new save, not fail as damaged.
    from pytree_ckpt import _open

    path = tmp_path / "c"
    pc.save(_tree(1), path)
    real, calls = _open.read_leaves, []

    def overwrite_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            pc.save(_tree(2), path, overwrite=True)
        return real(*args, **kwargs)

    monkeypatch.setattr(_open, "read_leaves", overwrite_first)
    restored, status = pc.restore(path)
    assert len(calls) == 2
    np.testing.assert_array_equal(restored["big"], _tree(2)["big"])
    for got, want in zip(restored["small"], _tree(2)["small"], strict=True):
        np.testing.assert_array_equal(got, want)


def test_blocks_of_a_checkpoint_overwritten_meanwhile_say_so(tmp_path):
    # Blocks are read one at a time: once the checkpoint is overwritten, the rest would be
    # another save's, so the iterator stops with an error that says what happened.
    path = tmp_path / "c"
    pc.save(_tree(1), path)
    blocks = pc.read_blocks(path, "big", block_bytes=64 * 1024)
    _, first = next(blocks)
    np.testing.assert_array_equal(first, np.full((64, 256), 1, np.float32))
    pc.save(_tree(2), path, overwrite=True)
    with pytest.raises(pc.CorruptCheckpointError,
                       match=f"^{path}: overwritten or deleted while it was read: its commit "
                             "file now names another generation than d-"):
        next(blocks)
