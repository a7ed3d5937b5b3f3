"""Shared reads' plan (pure: here with invented processes) and, in real ``jax.distributed``
jobs on loopback, restores that read each replicated byte from the store once."""

from __future__ import annotations

import collections
import itertools
import re

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pytree_ckpt import _share


def _mesh(shape, names):
    return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


def _covered(plan, leaves):
    """Every shared region's parts, per region, with their readers."""
    parts = {}
    for rnd in plan.rounds:
        for piece, _offset in rnd:
            parts.setdefault((piece.job, piece.key), []).append((piece.reader, piece.part))
    return parts


def _cells(part):
    return set(itertools.product(*(range(a, b) for a, b in part)))


def test_holders_see_every_process():
    # 2 processes x 4 devices, mesh (replica=2 across processes, model=4 within): each
    # model shard is held by both processes.
    mesh = _mesh((2, 4), ("replica", "model"))
    found = _share.holders(NamedSharding(mesh, P(None, "model")), (6, 8),
                           process_of=lambda d: d.id // 4)
    assert found == {((0, 6), (2 * i, 2 * i + 2)): (0, 1) for i in range(4)}
    # Replica axis within processes, model across: each region on one process only.
    mesh = _mesh((4, 2), ("replica", "model"))
    found = _share.holders(NamedSharding(mesh, P(None, "model")), (6, 8),
                           process_of=lambda d: d.id % 2)
    assert found == {((0, 6), (0, 4)): (0,), ((0, 6), (4, 8)): (1,)}


@pytest.mark.parametrize("procs", [2, 3, 4])
def test_plan_splits_each_region_among_its_holders_exactly_once(procs):
    mesh = _mesh((8,), ("x",))
    leaves = [
        # Replicated, 10 chunk rows of 3 (the last short): uneven among 3 and 4 holders.
        _share.Leaf(_share.holders(NamedSharding(mesh, P()), (29, 5),
                                   process_of=lambda d: d.id % procs), (3, 5), 4),
        # 0-d, and empty: one holder reads the 0-d one; the empty one is nobody's.
        _share.Leaf(_share.holders(NamedSharding(mesh, P()), (), lambda d: d.id % procs), (), 2),
        _share.Leaf(_share.holders(NamedSharding(mesh, P()), (0, 4), lambda d: d.id % procs),
                    (1, 4), 1),
        # One chunk row along axis 0: split along axis 1.
        _share.Leaf(_share.holders(NamedSharding(mesh, P()), (2, 64), lambda d: d.id % procs),
                    (2, 8), 1),
    ]
    plans = [_share.plan(leaves, me, send_most=40) for me in range(procs)]
    assert all(p.rounds == plans[0].rounds for p in plans)  # the same on every process
    parts = _covered(plans[0], leaves)
    assert set(parts) == {(0, ((0, 29), (0, 5))), (1, ()), (3, ((0, 2), (0, 64)))}
    for (job, key), got in parts.items():
        cells = [c for _r, part in got for c in _cells(part)]
        assert sorted(cells) == sorted(_cells(key)), (job, key)  # each cell read once
        for me in range(procs):  # what each process reads is its own pieces
            assert sorted(c for p in plans[me].reads[(job, key)] for c in _cells(p)) == sorted(
                c for r, part in got if r == me for c in _cells(part))
    # Chunk rows (10, of 3 rows; the last of 2) go to holders as evenly as whole rows allow.
    rows = [sum(len(_share._rows(a, b, 3)) - 1 for r, ((a, b), _) in
                parts[(0, ((0, 29), (0, 5)))] if r == me) for me in range(procs)]
    assert rows == [len(range(i * 10 // procs, (i + 1) * 10 // procs)) for i in range(procs)]
    # No process sends more than send_most in a round, unless one piece (a chunk row) is
    # larger: that piece is then the only one its reader sends in the round.
    for rnd, width in zip(plans[0].rounds, plans[0].width, strict=True):
        loads, sent = {}, collections.Counter(piece.reader for piece, _o in rnd)
        for piece, offset in rnd:
            assert offset == loads.get(piece.reader, 0)
            loads[piece.reader] = offset + piece.nbytes
        assert max(loads.values()) == width
        assert all(load <= 40 or sent[r] == 1 for r, load in loads.items()), rnd


def test_pieces_larger_than_a_round_share_it_with_other_readers():
    """Chunk rows of 4 MiB among 4 holders, each sending at most 1 MiB a round: a round
    carries one row from each holder (as wide as one row), not one row alone."""
    mesh = _mesh((4,), ("x",))
    leaf = _share.Leaf(_share.holders(NamedSharding(mesh, P()), (12 * 1024, 1024),
                                      process_of=lambda d: d.id), (1024, 1024), 4)
    plan = _share.plan([leaf], 0, send_most=1 << 20)
    assert [sorted(p.reader for p, _o in rnd) for rnd in plan.rounds] == [[0, 1, 2, 3]] * 3
    assert plan.width == [4 << 20] * 3


def test_plan_leaves_singly_held_regions_alone():
    mesh = _mesh((2, 4), ("replica", "model"))
    sharding = NamedSharding(mesh, P("replica", "model"))  # every region on one device
    leaf = _share.Leaf(_share.holders(sharding, (4, 8), lambda d: d.id // 4), (1, 1), 4)
    plan = _share.plan([leaf], 0, send_most=1 << 20)
    assert plan.rounds == [] and plan.reads == {}


def test_a_leaf_of_several_rounds_is_gathered_whole(monkeypatch):
    """Process 0 of 2 invented ones, a replicated leaf of 8 rows (chunk rows of 1) in
    rounds of 2 rows a process: each round sends this process's next rows and puts the
    other's where they belong; the leaf comes out, bit for bit, once its last round ran."""
    from pytree_ckpt import _distributed

    truth = np.arange(32, dtype=np.float32).reshape(8, 4)
    key = ((0, 8), (0, 4))
    plan = _share.plan([_share.Leaf({key: (0, 1)}, (1, 4), 4)], 0, send_most=32)
    sharing = _share.Sharing(plan, 0, 2)
    assert sharing.parts(0, key) == [((0, 2), (0, 4)), ((2, 4), (0, 4))]
    meetings, sent = [], []
    monkeypatch.setattr(_distributed, "exchange",
                        lambda name, value, *a, **k: meetings.append(name) or [value] * 2)

    def all_gather(send, count):  # what process 1 sends: its rows of this round
        sent.append(send.view(np.float32).reshape(-1, 4).copy())
        theirs = np.zeros_like(send)
        for piece, offset in plan.rounds[len(sent) - 1]:
            if piece.reader == 1:
                (a, b), _ = piece.part
                theirs[offset:offset + piece.nbytes] = truth[a:b].view(np.uint8).reshape(-1)
        return np.stack([send, theirs])

    monkeypatch.setattr(_share, "_all_gather", all_gather)
    buf = np.full((8, 4), np.nan, np.float32)
    buf[:4] = truth[:4]  # this process's rows, as its reader read them

    def leaves():
        yield "w", None, None, {key: buf}
        assert len(sent) == 2  # both rounds ran once the leaf came, before it went on

    assert [leaf[0] for leaf in sharing.complete(leaves())] == ["w"]
    assert len(meetings) == 2 and len(set(meetings)) == 2  # one agreement per round
    np.testing.assert_array_equal(sent[0], truth[0:2])
    np.testing.assert_array_equal(sent[1], truth[2:4])
    assert buf.tobytes() == truth.tobytes()


def test_local_places_a_part_in_its_region():
    assert _share.local(((4, 6), (2, 3)), ((3, 9), (0, 5))) == (slice(1, 3), slice(2, 3))
    assert _share.local((), ()) == ()


# ---- real jobs: 2 processes x 2 devices, restoring from moto's S3 through a counting proxy ----

# The saved tree, built the same way in the test (to save it) and in each process (to check).
TREE = r"""
import jax, jax.numpy as jnp, ml_dtypes, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

def tree(devices):
    rng = np.random.default_rng(0)
    over = lambda n: NamedSharding(Mesh(np.array(devices[:n]), ("x",)), P("x"))
    put = lambda a, n=8: jax.device_put(a, over(n))
    # Chunks of a (4, 2) mesh's shards: none straddles the restoring mesh's model split.
    grid = NamedSharding(Mesh(np.array(devices[:8]).reshape(4, 2), ("x", "y")), P("x", "y"))
    put2 = lambda a: jax.device_put(a, grid)
    return {
        "w": put2(rng.standard_normal((256, 1024), dtype=np.float32)),  # 1 MiB, 8 chunks
        "bf16": put2(rng.standard_normal((16, 6)).astype(jnp.bfloat16)),
        "bool": put2(rng.random((16, 6)) > 0.5),
        "int4": put2(rng.integers(-8, 8, (16, 6)).astype(ml_dtypes.int4)),
        "u8": put2(rng.integers(0, 256, (16, 6), dtype=np.uint8)),
        "uneven": put(np.arange(20, dtype=np.int32).reshape(5, 4), 5),  # 5 chunk rows
        "empty": jax.device_put(np.zeros((0, 8), np.float32),
                                NamedSharding(Mesh(np.array(devices[:8]), ("x",)), P(None, "x"))),
        "scalar": jnp.float32(3.5),
        "key": jax.random.key(7),
        "step": 7,
    }

FOREIGN = ("w", "bf16", "bool", "u8", "uneven")  # also written as Orbax and safetensors
"""

JOB = TREE + r"""
import time
import pytree_ckpt as pc
from pytree_ckpt import _binding, _build, _share

_share.ROUND_BYTES, _share._MIN_SEND = 256 << 10, 1  # several rounds for "w"
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("replica", "model"))  # replica: processes
spec = {"w": P(None, "model"), "bf16": P(None, "model"), "bool": P(None, "model"),
        "int4": P(None, "model"), "u8": P(None, "model"), "uneven": P(), "empty": P(None, "model"),
        "scalar": P()}
with np.load(args["npz"]) as npz:
    saved = dict(npz)
saved["bf16"] = saved["bf16"].view(jnp.bfloat16)
saved["int4"] = saved["int4"].astype(ml_dtypes.int4)
target = {k: jax.ShapeDtypeStruct(saved[k].shape, saved[k].dtype,
                                  sharding=NamedSharding(mesh, spec[k])) for k in spec}
target["key"], target["step"] = jax.random.key(0), 0

def check(got, what):
    for k in spec:
        assert got[k].dtype == saved[k].dtype, (what, k, got[k].dtype)
        for shard in got[k].addressable_shards:
            assert np.asarray(shard.data).tobytes() == saved[k][shard.index].tobytes(), (what, k)
    assert (jax.random.key_data(got["key"]) == jax.random.key_data(jax.random.key(7))).all()
    assert got["step"] == 7

on, status = pc.restore(args["on"], target)
assert len(status.matched) == len(target), status
check(on, "shared")
off, _ = pc.restore(args["off"], target, share_reads=False)
check(off, "not shared")
print("EQUAL", process_id)

# Other tools' files: an Orbax item and a safetensors file, shared (by default, from an
# object store) and not. Orbax's "w" is split by chunk rows within each model shard; the
# safetensors "w", replicated, by rows, read as ranges small enough to be split.
from pytree_ckpt._foreign import safetensors_read
safetensors_read._PIECE_BYTES = 64 << 10
for fmt, w_spec in (("orbax", spec["w"]), ("st", P())):
    specs = {k: w_spec if k == "w" else spec[k] for k in FOREIGN}
    ftarget = {k: jax.ShapeDtypeStruct(saved[k].shape, saved[k].dtype,
                                       sharding=NamedSharding(mesh, specs[k])) for k in FOREIGN}
    on, status = pc.restore(args[f"{fmt}_on"], ftarget)
    assert set(status.matched) == set(FOREIGN), (fmt, status)
    off, _ = pc.restore(args[f"{fmt}_off"], ftarget, share_reads=False)
    for k in FOREIGN:
        for a, b in zip(on[k].addressable_shards, off[k].addressable_shards, strict=True):
            assert a.index == b.index and np.asarray(a.data).tobytes() == np.asarray(
                b.data).tobytes() == saved[k][a.index].tobytes(), (fmt, k)
print("FOREIGN EQUAL", process_id)

# A share that fails: process 1's reads raise; both processes raise, naming it.
# (Chunks are read through TensorStore's zarr driver, or by key from an object store.)
real, real_chunk = _build.read_into, _binding.checked_chunk
def failing(*args):
    raise RuntimeError("injected read failure")
if process_id == 1:
    _build.read_into = _binding.checked_chunk = failing
t = time.monotonic()
try:
    pc.restore(args["fail"], target)
except Exception as e:
    print("FAILED", process_id, type(e).__name__, round(time.monotonic() - t, 1), str(e)[:400])
_build.read_into, _binding.checked_chunk = real, real_chunk

# A process killed mid-read: process 0 raises within the liveness timeout, naming it.
if process_id == 1:
    _build.read_into = _binding.checked_chunk = lambda *args: crash()
t = time.monotonic()
try:
    pc.restore(args["fail"], target)
except Exception as e:
    print("KILLED", process_id, type(e).__name__, round(time.monotonic() - t, 1), str(e)[:400])
"""


def _foreign_files(tree, tmp_path):
    """The tree's FOREIGN leaves as an Orbax item (zarr without OCDBT: an object per chunk)
    and a safetensors file, each written by its own library; returns their local paths and
    the safetensors file's byte range of "w"."""
    import json

    import orbax.checkpoint as ocp
    from safetensors.numpy import save_file

    namespace: dict = {}
    exec(TREE, namespace)
    leaves = {k: tree[k] for k in namespace["FOREIGN"]}
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)).save(
        str(tmp_path / "orbax"), leaves)
    save_file({k: np.asarray(v) for k, v in leaves.items()}, str(tmp_path / "st.safetensors"))
    data = (tmp_path / "st.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8:8 + n])["w"]["data_offsets"]
    return tmp_path / "orbax", tmp_path / "st.safetensors", (8 + n + begin, 8 + n + end)


def _range_bytes(proxy, key, span):
    """GETs of ``key`` whose ranges lie in ``span`` ([start, stop)), and their bytes."""
    got = [(r, n) for kind, k, r, n in proxy.answers if kind == "get" and k == key and r]
    inside = [n for r, n in got
              if span[0] <= int(re.match(r"bytes=(\d+)-", r)[1]) < span[1]]
    return len(inside), sum(inside)


def _chunk_gets(proxy, prefix):
    """GETs of each chunk object under ``prefix`` (data and, where still read, trailers)."""
    return collections.Counter(k[k.index("/a/"):] for k in proxy.keys("get")
                               if k.startswith(prefix) and re.search(r"/a/\d+/c/", k))


def test_two_processes_read_each_chunk_once_and_fail_together(s3_server, monkeypatch, tmp_path):
    import _upload
    from _multiprocess import format_results, run_multiprocess
    from _proxy import FaultProxy

    import pytree_ckpt as pc
    from pytree_ckpt import _storage

    namespace: dict = {}
    exec(TREE, namespace)
    tree = namespace["tree"](jax.devices())
    saved = {k: np.asarray(v) for k, v in tree.items() if k not in ("key", "step")}
    saved["bf16"], saved["int4"] = saved["bf16"].view(np.uint16), saved["int4"].astype(np.int8)
    np.savez(tmp_path / "saved.npz", **saved)
    orbax_dir, st_file, w_span = _foreign_files(tree, tmp_path)
    with FaultProxy(s3_server.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("AWS_REGION", s3_server.region)
        _storage.forget_contexts()
        try:
            url = f"{s3_server.url}/test_share"
            pc.save(tree, f"{url}/on")
            pc.save(tree, f"{url}/off")
            pc.save(tree, f"{url}/fail")
            for mode in ("on", "off"):
                _upload.upload(str(orbax_dir), f"{url}/orbax_{mode}")
                _upload.write(f"{url}/st_{mode}.safetensors", st_file.read_bytes())
            objects = [k[k.index("/a/"):] for k in proxy.keys("put")
                       if k.startswith("test_share/on/") and "/a/" in k and "/c/" in k]
            proxy.clear()
            results = run_multiprocess(
                JOB, num_processes=2, devices_per_process=2, timeout_s=150,
                heartbeat_timeout_s=60, env={"PYTREE_CKPT_LIVENESS_TIMEOUT_S": "4"},
                args={"on": f"{url}/on", "off": f"{url}/off", "fail": f"{url}/fail",
                      "npz": str(tmp_path / "saved.npz"),
                      **{f"{fmt}_{mode}": f"{url}/{fmt}_{mode}" + (".safetensors" * (fmt == "st"))
                         for fmt in ("orbax", "st") for mode in ("on", "off")}})
        finally:
            _storage.forget_contexts()
    out = format_results(results)
    assert "EQUAL 0" in results[0].stdout and "EQUAL 1" in results[1].stdout, out
    # Every chunk object is read by one process with sharing, by both without.
    on, off = _chunk_gets(proxy, "test_share/on/"), _chunk_gets(proxy, "test_share/off/")
    assert set(objects) == set(on) == set(off) and len(objects) > 8, (objects, on, off)
    per_read = set(on.values())  # 2 GETs a chunk where its trailer is read apart, else 1
    assert len(per_read) == 1 and set(off.values()) == {2 * min(per_read)}, (on, off)
    print(f"chunk objects {len(objects)}: GETs shared {sum(on.values())}, "
          f"not shared {sum(off.values())}")
    # Other tools' files, bit for bit, each chunk (Orbax) or byte ("w" in the safetensors
    # file) read once with sharing, twice without.
    assert "FOREIGN EQUAL 0" in results[0].stdout and "FOREIGN EQUAL 1" in results[1].stdout, out
    orbax = {mode: collections.Counter(
        k.split("/", 2)[2] for k in proxy.keys("get")
        if k.startswith(f"test_share/orbax_{mode}/") and re.search(r"/\d+(\.\d+)*$", k))
        for mode in ("on", "off")}
    assert len(orbax["on"]) == 37 and set(orbax["on"]) == set(orbax["off"]), orbax
    assert set(orbax["on"].values()) == {1} and set(orbax["off"].values()) == {2}, orbax
    st = {mode: _range_bytes(proxy, f"test_share/st_{mode}.safetensors", w_span)
          for mode in ("on", "off")}
    w_bytes = w_span[1] - w_span[0]
    assert st == {"on": (16, w_bytes), "off": (32, 2 * w_bytes)}, st
    print(f"orbax chunk GETs shared {sum(orbax['on'].values())}, not shared "
          f"{sum(orbax['off'].values())}; safetensors 'w' GETs, bytes {st}")
    failed = [line for r in results for line in r.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2, out
    assert failed[1].startswith("FAILED 1 RuntimeError") and "injected read failure" in failed[1]
    assert failed[0].startswith("FAILED 0 DistributedError") and "process 1 failed" in failed[0]
    assert "injected read failure" in failed[0], failed
    killed = [line for line in results[0].stdout.splitlines() if line.startswith("KILLED")]
    assert results[1].returncode == -9 and len(killed) == 1, out
    assert killed[0].startswith("KILLED 0 DistributedError") and "1" in killed[0], out
    assert "showed no sign of life for 4 s" in killed[0], out
    assert float(killed[0].split()[3]) < 15, killed


def test_shared_by_default_from_object_stores_only(monkeypatch):
    # As if 2 processes held devices alternately (the decision, not the reads).
    from pytree_ckpt import _build, _distributed, _leaves
    monkeypatch.setattr(_distributed, "is_multiprocess", lambda: True)
    monkeypatch.setattr(_distributed, "process_count", lambda: 2)
    monkeypatch.setattr(_distributed, "process_index", lambda: 0)
    real = _share.holders
    monkeypatch.setattr(_share, "holders", lambda s, shape: real(s, shape, lambda d: d.id % 2))
    mesh = _mesh((8,), ("x",))
    storage = type("S", (), {"chunks": (4, 4), "stored_dtype": "float32"})()
    rec = type("R", (), {"shape": (16, 4), "storage": storage})()
    want = _build.Want(_leaves.JAX, np.dtype(np.float32), (16, 4), NamedSharding(mesh, P()))
    jobs = [("w", rec, want)]
    grid = _share.zarr_grid
    assert isinstance(_share.plan_reads(jobs, grid, remote=True, share=None), _share.Sharing)
    assert _share.plan_reads(jobs, grid, remote=False, share=None) is _share.ALONE
    for flag, remote, shared in [(True, False, True), (False, True, False)]:
        got = _share.plan_reads(jobs, grid, remote=remote, share=flag)
        assert isinstance(got, _share.Sharing) is shared and (got is _share.ALONE) is not shared


def test_share_reads_reaches_the_plan_from_restore_and_the_manager(monkeypatch):
    # The keyword's way down (restore and CheckpointManager.restore -> the source's read ->
    # the plan), one process: what the plan does with it is the job's test above.
    import jax.numpy as jnp

    import pytree_ckpt as pc
    seen = []
    real = _share.plan_reads

    def recording(jobs, grid, remote, share, *args):
        seen.append(share)
        return real(jobs, grid, remote, share, *args)

    monkeypatch.setattr(_share, "plan_reads", recording)
    with pc.CheckpointManager("memory://share/mgr", async_save=False) as mgr:
        mgr.save(1, {"w": jnp.ones((64, 64))})
        for flag in (None, True, False):
            mgr.restore(1, {"w": jnp.zeros((64, 64))}, share_reads=flag)
            pc.restore(f"{mgr.directory}/1", share_reads=flag)
        mgr.restore(1)
    assert seen == [None, None, True, True, False, False, None]
