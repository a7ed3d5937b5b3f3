"""Multi-host saves and restores in real ``jax.distributed`` processes on loopback.

A globally sharded Flax-style training state (params plus optax Adam moments with non-zero
values, and a step) is saved by 2 processes x 2 devices and by 4 processes x 1 device,
synchronously and asynchronously; restored in the same job onto another mesh, in one process
with 4 devices, and in this (8-device) test process; and a process killed in the middle of a
save leaves no commit, an error naming it on the survivors, and the earlier checkpoint intact.

The jobs are shared, four in all: 2x2 saves A; 4x1 saves B and restores A onto its mesh; 2x2
restores B and then loses a process in the middle of a save; 1x4 restores A and B.
"""

import jax
import numpy as np
import pytest
from _multiprocess import assert_all_ok, format_results, run_multiprocess

import pytree_ckpt as pc
from pytree_ckpt import _open, _storage

STATE = r"""
import jax, jax.numpy as jnp, numpy as np, optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import pytree_ckpt as pc

mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))

def make(shape, spec, k):
    full = (np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1) * k
    return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), lambda i: full[i])

params = {"dense": {"kernel": make((16, 8), P("x", "y"), 1.0), "bias": make((8,), P(), 2.0)},
          "embed": make((32, 4), P(None, "x"), 3.0)}
tx = optax.adam(0.1)
opt_state = jax.jit(tx.init)(params)
grads = jax.tree.map(lambda p: p * 0.5, params)
_, opt_state = jax.jit(tx.update)(grads, opt_state, params)
# A leaf on one device of the last process: only that process can write it (packed there).
local = jax.make_array_from_callback(
    (5,), jax.sharding.SingleDeviceSharding(jax.devices()[-1]),
    lambda i: np.arange(5, dtype=np.float32)[i] * 1.5, dtype=np.float32)
state = {"params": params, "opt_state": opt_state, "step": 7, "extra": {"local": local}}
"""

SAVE = STATE + r"""
pc.save(state, args["sync"])
fut = pc.save_async(state, args["async"])
assert fut.result() == args["async"]
from pytree_ckpt import _graph
flat = _graph.flatten(state)
full = {p: np.asarray(multihost_utils.process_allgather(x, tiled=True))
        for p, x in zip(flat.paths, flat.leaves) if p in args["paths"]}
assert sorted(full) == sorted(args["paths"])
if process_id == 0:
    np.savez(args["expected"], **{p.replace("/", "|"): v for p, v in full.items()})
print("SAVED", process_id)
"""

RESTORE = r"""
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import pytree_ckpt as pc

expected = {k.replace("|", "/"): v for k, v in np.load(args["expected"]).items()}
mesh = Mesh(np.array(jax.devices()).reshape(-1), ("d",))
for ckpt in (args["sync"], args["async"]):
    info = pc.metadata(ckpt)
    target = {}
    for path, leaf in info.leaves.items():
        spec = P("d") if leaf.shape and leaf.shape[0] % len(jax.devices()) == 0 else P()
        target[path] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))
    tree = {}
    for path in target:  # restore leaf by leaf through at=, each onto its new sharding
        tree[path], status = pc.restore(ckpt, target[path], at=path)
        status.assert_consumed()
    for path, value in expected.items():
        assert tree[path].sharding == target[path].sharding, path
        for shard in tree[path].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index], err_msg=path)
    assert pc.restore(ckpt, 0, at="step")[0] == 7
    np.testing.assert_array_equal(np.asarray(tree["extra/local"]), np.arange(5.0) * 1.5)
print("RESTORED", args["name"], process_id, len(expected))
"""

LEAVES = ["opt_state/0/count", "opt_state/0/mu/dense/bias", "opt_state/0/mu/dense/kernel",
          "opt_state/0/mu/embed", "opt_state/0/nu/dense/bias", "opt_state/0/nu/dense/kernel",
          "opt_state/0/nu/embed", "params/dense/bias", "params/dense/kernel", "params/embed"]


def paths(tmp_path, name):
    return {"name": name, "sync": str(tmp_path / name / "sync"),
            "async": str(tmp_path / name / "async"),
            "expected": str(tmp_path / f"expected-{name}.npz"), "paths": LEAVES}


def _commit(ckpt):
    loc = _storage.location(ckpt)
    return _open.load_commit(loc, _storage.open_kvstore(loc))


def check_here(args):
    """This process (8 devices, not the saved 4) restores both checkpoints, no target."""
    expected = {k.replace("|", "/"): v for k, v in np.load(args["expected"]).items()}
    assert sorted(expected) == sorted(LEAVES)
    for ckpt in (args["sync"], args["async"]):
        tree, status = pc.restore(ckpt)
        status.assert_consumed()
        for path, value in expected.items():
            leaf = tree
            for name in path.split("/"):
                leaf = leaf[int(name)] if isinstance(leaf, (list, tuple)) else leaf[name]
            np.testing.assert_array_equal(np.asarray(leaf), value, err_msg=path)
        assert tree["step"] == 7
        np.testing.assert_array_equal(np.asarray(tree["extra"]["local"]), np.arange(5.0) * 1.5)
        # Saved on the job's 4 devices, whose ids this process lacks (a job's CPU devices
        # have ids of their own per process): restored above on the default device.
        ids = _commit(ckpt).leaves["params/dense/kernel"].sharding.device_ids
        assert len(set(ids)) == 4 and not set(ids) <= {d.id for d in jax.devices()}
        assert pc.metadata(ckpt).leaves["params/dense/kernel"].sharding == (
            "P('x', 'y') over mesh(x=2, y=2) (saved on devices not all here: restores on the "
            "default device)")


KILLED = STATE + r"""
from pytree_ckpt import _write
pc.save(state, args["before"])
if process_id == 1:
    def dying(*a, **k):
        crash()  # SIGKILL in the middle of the save, before reporting its part
    _write.write_data = dying
try:
    pc.save(state, args["after"])
except pc.SaveError as e:
    print("SAVE FAILED:", e)
"""


def job(*snippets: tuple[str, str]) -> str:
    """One job running ``snippets`` in turn, each (code, key): ``args[key]`` is its ``args``."""
    return "".join(f"args = ARGS[{key!r}]\n{code}\n" for code, key in snippets)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict:
    """The four jobs' results, and the arguments of checkpoints A (saved by 2x2) and B (by
    4x1) and of the killed save."""
    tmp = tmp_path_factory.mktemp("multihost")
    (tmp / "A").mkdir()
    (tmp / "B").mkdir()
    args = {"A": paths(tmp, "A"), "B": paths(tmp, "B"),
            "killed": {"before": str(tmp / "before"), "after": str(tmp / "after")}}

    def run(code, processes, devices, **kw):
        return run_multiprocess("ARGS = args\n" + code, num_processes=processes,
                                devices_per_process=devices, timeout_s=90, args=args, **kw)

    return {
        "args": args,
        "2x2 saves A": run(job((SAVE, "A")), 2, 2),
        "4x1 saves B, restores A": run(job((SAVE, "B"), (RESTORE, "A")), 4, 1),
        # Liveness of 3 s: the killed save's survivor gives up quickly.
        "2x2 restores B, killed": run(job((RESTORE, "B"), (KILLED, "killed")), 2, 2,
                                      env={"PYTREE_CKPT_LIVENESS_TIMEOUT_S": "3"}),
        "1x4 restores A and B": run(job((RESTORE, "A"), (RESTORE, "B")), 1, 4),
    }


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name,processes,saved_by,restored_by", [
    ("A", 2, "2x2 saves A", "4x1 saves B, restores A"),
    ("B", 4, "4x1 saves B, restores A", "2x2 restores B, killed")], ids=["2x2", "4x1"])
def test_multihost_save_and_restore_on_other_topologies(jobs, name, processes, saved_by,
                                                        restored_by):
    args = jobs["args"][name]
    results = jobs[saved_by]
    assert_all_ok(results)
    assert all(f"SAVED {i}" in r.stdout for i, r in enumerate(results)), format_results(results)
    assert pc.metadata(args["sync"]).writer["processes"] == processes
    commit = _commit(args["sync"])
    assert {proc for proc, _, _ in commit.blobs} == {0, processes - 1}  # "local" packed there
    # The same checkpoints restored by a job of another shape, onto another mesh.
    # (The 2x2 job goes on to lose a process: its exit statuses are checked by the last test.)
    results = jobs[restored_by]
    assert all(f"RESTORED {name} {i} 10" in r.stdout for i, r in enumerate(results)), (
        format_results(results))
    # One process with 4 devices, and this process with 8.
    results = jobs["1x4 restores A and B"]
    assert_all_ok(results)
    assert f"RESTORED {name} 0 10" in results[0].stdout, format_results(results)
    check_here(args)


@pytest.mark.timeout(400)
def test_a_process_killed_mid_save_means_no_commit(jobs):
    args = jobs["args"]["killed"]
    results = jobs["2x2 restores B, killed"]
    assert results[1].returncode != 0  # killed
    assert results[0].returncode == 0, format_results(results)
    assert "SAVE FAILED:" in results[0].stdout and "nothing was committed" in results[0].stdout
    assert "process(es) 1 showed no sign of life for 3 s" in results[0].stdout
    # Nothing restorable: the primary deleted the failed save's data (or a part of it is left).
    with pytest.raises((pc.IncompleteCheckpointError, pc.CheckpointNotFoundError)):
        pc.restore(args["after"])
    tree, status = pc.restore(args["before"])
    status.assert_consumed()
    assert tree["step"] == 7
    np.testing.assert_array_equal(
        np.asarray(tree["params"]["embed"]),
        (np.arange(128, dtype=np.float32).reshape(32, 4) + 1) * 3.0)
