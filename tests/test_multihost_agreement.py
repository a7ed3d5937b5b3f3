"""Every process agrees on a save before any data is written, in real 2-process
``jax.distributed`` jobs: a save whose processes differ (the path, the tree) or fail (a
snapshot error on one) fails on every process, names what differed, and the next save of the
same job commits and restores; a process that is slow to write but alive is waited for.

The cases share one job, in turn (the snapshot error first: its message names the job's first
save); each prints its lines prefixed with its name.
"""

import numpy as np
import pytest
from _multiprocess import assert_all_ok, run_multiprocess

import pytree_ckpt as pc

JOB = r"""
import time
import jax, numpy as np, pytree_ckpt as pc
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pytree_ckpt import _write

mesh = Mesh(np.array(jax.devices()), ("x",))
full = np.arange(16, dtype=np.float32)
w = jax.make_array_from_callback((16,), NamedSharding(mesh, P("x")), lambda i: full[i])
good = {"w": w, "step": 3}
real = _write.write_data
for case, paths in args.items():
    bad_tree, bad_path = good, paths["bad"]
    if case == "paths":  # e.g. a hostname or a timestamp in the path
        bad_path = paths["bad"] + ("-host1" if process_id == 1 else "")
    elif case == "snapshot" and process_id == 1:
        bad_tree = dict(good, odd=object())  # unsupported: raises during the snapshot
    elif case == "trees":
        bad_tree = dict(good, extra=np.zeros(3 if process_id == 0 else 4))
    elif case == "weak":  # a Python float is weakly typed, a NumPy float32 is not
        lr = jax.device_put(0.5 if process_id == 0 else np.float32(0.5), NamedSharding(mesh, P()))
        assert lr.weak_type == (process_id == 0)
        bad_tree = dict(good, lr=lr)
    elif case == "slow" and process_id == 1:
        def slow(*a):
            time.sleep(5)  # longer than the arrival timeout, alive all along
            return real(*a)
        _write.write_data = slow
    try:
        pc.save(bad_tree, bad_path)
        print(case, "FIRST SAVED", flush=True)
    except Exception as e:
        print(case, "FIRST FAILED", type(e).__name__, str(e).replace("\n", " "), flush=True)
    _write.write_data = real
    pc.save(good, paths["good"])
    print(case, "SECOND SAVED", flush=True)
"""

CASES = ["snapshot", "paths", "trees", "weak", "slow"]


@pytest.fixture(scope="module")
def outs(tmp_path_factory) -> dict:
    """Each case's folder and its two processes' lines (without the case's name)."""
    tmp = tmp_path_factory.mktemp("agreement")
    args = {}
    for case in CASES:
        (tmp / case).mkdir()
        args[case] = {"bad": str(tmp / case / "first"), "good": str(tmp / case / "second")}
    results = run_multiprocess(JOB, num_processes=2, devices_per_process=1, timeout_s=150,
                               args=args, env={"PYTREE_CKPT_BARRIER_TIMEOUT_S": "2",
                                               "PYTREE_CKPT_LIVENESS_TIMEOUT_S": "2"})
    assert_all_ok(results)
    return {case: (tmp / case, ["\n".join(line.removeprefix(case + " ")
                                         for line in r.stdout.splitlines()
                                         if line.startswith(case + " "))
                               for r in results])
            for case in CASES}


def _job(outs, case):
    tmp_path, lines = outs[case]
    assert all("SECOND SAVED" in out for out in lines), lines
    tree, status = pc.restore(tmp_path / "second")  # the next save committed, whole
    status.assert_consumed()
    np.testing.assert_array_equal(np.asarray(tree["w"]), np.arange(16, dtype=np.float32))
    assert tree["step"] == 3
    return tmp_path, lines


def _first(out):
    (line,) = [line for line in out.splitlines() if line.startswith("FIRST")]
    return line


def _nothing_committed(*paths):
    for path in paths:
        with pytest.raises((pc.CheckpointNotFoundError, pc.IncompleteCheckpointError)):
            pc.restore(path)


@pytest.mark.timeout(250)
def test_processes_saving_to_different_paths_commit_nothing(outs):
    tmp_path, lines = _job(outs, "paths")
    for out, own in zip(lines, ["first", "first-host1"], strict=True):
        assert _first(out).startswith(
            f"FIRST FAILED DistributedError {tmp_path / own}: save refused on every "
            f"process: process(es) 1 saved another checkpoint path than process 0 (process 0: "
            f"'{tmp_path / 'first'}'; process 1: '{tmp_path / 'first-host1'}')"), out
    _nothing_committed(tmp_path / "first", tmp_path / "first-host1")


@pytest.mark.timeout(250)
def test_a_snapshot_error_on_one_process_fails_the_save_on_every_process(outs):
    tmp_path, (out0, out1) = _job(outs, "snapshot")
    assert _first(out1).startswith("FIRST FAILED UnsupportedLeafError"), out1
    assert "'odd'" in _first(out1)
    assert _first(out0).startswith(
        f"FIRST FAILED DistributedError {tmp_path / 'first'}: save failed before writing: "
        "'save/1/agree' failed on process(es) 1 (seen from process 0): process 1 failed: "
        "UnsupportedLeafError"), out0
    _nothing_committed(tmp_path / "first")


@pytest.mark.timeout(250)
@pytest.mark.parametrize("case", ["trees", "weak"])
def test_processes_saving_different_trees_commit_nothing(outs, case):
    # "weak": the same tree, one leaf weakly typed on process 1 only. Restore gives back the
    # weak type it finds, so the hosts must agree on it too.
    tmp_path, lines = _job(outs, case)
    for out in lines:
        assert _first(out).startswith(
            f"FIRST FAILED DistributedError {tmp_path / 'first'}: save refused on every "
            "process: process(es) 1 saved another tree (its structure, or a leaf's path, "
            "kind, dtype, weak type, shape or sharding) than process 0 (process 0: '3 leaves, "
            "1 nodes, digest "), out
    _nothing_committed(tmp_path / "first")


@pytest.mark.timeout(250)
def test_a_slow_but_live_process_is_waited_for(outs):
    # Process 1 writes for 5 s; the arrival timeout and the liveness timeout are 2 s: it
    # is alive all along (its heartbeat), so the save commits instead of failing at 2 s.
    tmp_path, lines = _job(outs, "slow")
    assert all(_first(out) == "FIRST SAVED" for out in lines), lines
    tree, _ = pc.restore(tmp_path / "first")
    np.testing.assert_array_equal(np.asarray(tree["w"]), np.arange(16, dtype=np.float32))
