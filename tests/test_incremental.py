"""Incremental steps: a CheckpointManager writes only the jax.Arrays that are not the same
objects as in the step it last committed, and every kept step stays restorable by its path
alone, through retention, copies, restarts and two processes (see the README, "Incremental
steps"). The SIGKILL campaign is in test_crash.py (mode "incremental")."""

import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from _multiprocess import assert_all_ok, format_results, run_multiprocess

import pytree_ckpt as pc
from pytree_ckpt import _decode, _format, _storage

BASE = 1 << 20  # elements: a 4 MiB frozen float32 base
CHUNK = re.compile(r"/d-[0-9a-f]+/a/(\d+)/c/")  # a zarr chunk's key: its array id


@pytest.fixture(scope="module")
def base():
    return jnp.arange(BASE, dtype=jnp.float32)


def state(base, step):
    """A frozen-base fine-tune: the base never changes; the adapter and its moment do."""
    return {"base": base, "lora": jnp.full((64, 16), step, jnp.float32),
            "mu": jnp.full(70_000, step, jnp.float32), "step": step}


def assert_state(tree, base, step):
    expected = state(base, step)
    assert tree.keys() == expected.keys()
    for key, want in expected.items():
        np.testing.assert_array_equal(np.asarray(tree[key]), np.asarray(want), err_msg=key)


def written_bytes(fn):
    """The bytes this process wrote (``wchar``: every thread's write calls) while ``fn`` ran."""
    def wchar():
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("wchar")).split()[1])
    before = wchar()
    fn()
    return wchar() - before


def test_a_later_step_writes_only_what_changed(tmp_path, base):
    with pc.CheckpointManager(tmp_path, keep=None, async_save=False) as mgr:
        full = written_bytes(lambda: mgr.save(1, state(base, 1)))
        later = written_bytes(lambda: mgr.save(2, state(base, 2)))
        info = mgr.metadata(2)
    assert full > BASE * 4
    assert later < 0.15 * full, (later, full)  # the 4 MiB base is carried, ~0.3 MiB written
    assert info.carried == {"base": "1"} and info.carried_nbytes == BASE * 4
    assert pc.metadata(tmp_path / "1").carried == {}
    for step in (1, 2):
        assert_state(pc.restore(tmp_path / str(step))[0], base, step)
    assert pc.verify(tmp_path / "2").ok


def test_numpy_new_arrays_and_the_opt_out_are_written_in_full(tmp_path, base):
    host = np.asarray(base)  # mutable: never carried
    with pc.CheckpointManager(tmp_path / "np", keep=None, async_save=False) as mgr:
        mgr.save(1, {"base": host})
        assert written_bytes(lambda: mgr.save(2, {"base": host})) > BASE * 4
        mgr.save(3, {"base": base})
        assert written_bytes(lambda: mgr.save(4, {"base": base + 0})) > BASE * 4  # a new object
    with pc.CheckpointManager(tmp_path / "off", keep=None, async_save=False,
                              incremental=False) as mgr:
        mgr.save(1, {"base": base})
        assert written_bytes(lambda: mgr.save(2, {"base": base})) > BASE * 4
    assert pc.metadata(tmp_path / "off" / "2").carried == {}


def test_retention_keeps_what_kept_steps_carry(tmp_path, base):
    with pc.CheckpointManager(tmp_path, keep=2) as mgr:
        for step in range(1, 6):
            mgr.save(step, state(base, step))
        mgr.wait()
        assert mgr.steps() == [4, 5]
    # Step 1 wrote the base: retired (not a step, only the base's array kept); 2 and 3 gone.
    assert sorted(os.listdir(tmp_path / "1")) == [_gen(tmp_path, 5), "retired"]
    assert not (tmp_path / "2").exists() and not (tmp_path / "3").exists()
    assert pc.latest(tmp_path) == str(tmp_path / "5")
    with pytest.raises(pc.CheckpointNotFoundError, match=r"/1: step 1 was deleted; its folder "
                       r"keeps only data that later steps carry"):
        pc.restore(tmp_path / "1")
    for step in (4, 5):
        assert_state(pc.restore(tmp_path / str(step))[0], base, step)
        assert pc.verify(tmp_path / str(step)).ok
    # clean (told every leftover is old) never deletes a retired folder's data.
    os.environ["PYTREE_CKPT_CLEAN_AFTER_S"] = "0"
    try:
        for where in (tmp_path, tmp_path / "1"):
            report = pc.clean(where, delete=True)
            assert str(tmp_path / "1") not in report.incomplete + report.orphaned
    finally:
        del os.environ["PYTREE_CKPT_CLEAN_AFTER_S"]
    # A new base: once no kept step carries step 1's data, a manager deletes the folder.
    with pc.CheckpointManager(tmp_path, keep=2) as mgr:
        assert mgr.steps() == [4, 5] and (tmp_path / "1").exists()  # restart: still needed
        for step in (6, 7):
            mgr.save(step, state(base + 1, step))
    assert not (tmp_path / "1").exists()
    assert sorted(os.listdir(tmp_path / ".steps")) == ["6", "7", "complete"]
    assert_state(pc.restore(tmp_path / "7")[0], base + 1, 7)


def test_retention_keeps_everything_when_a_kept_step_cannot_be_read(tmp_path, base):
    with pc.CheckpointManager(tmp_path, keep=2, async_save=False) as mgr:
        for step in (1, 2):
            mgr.save(step, state(base, step))
    before = sorted(p.relative_to(tmp_path / "1") for p in (tmp_path / "1").rglob("*")
                    if p.is_file() and p.name != _format.COMMIT_FILE)
    commit = tmp_path / "2" / _format.COMMIT_FILE
    raw = commit.read_bytes()
    commit.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))  # step 2's references: unknown
    with pc.CheckpointManager(tmp_path, keep=2, async_save=False) as mgr:
        mgr.save(3, state(base + 1, 3))  # step 1 leaves the kept steps: retired, kept whole
        assert mgr.steps() == [2, 3]
    after = sorted(p.relative_to(tmp_path / "1") for p in (tmp_path / "1").rglob("*")
                   if p.is_file() and p.name != "retired")
    assert after == before and (tmp_path / "1" / "retired").exists()
    commit.write_bytes(raw)
    assert_state(pc.restore(tmp_path / "2")[0], base, 2)


def _gen(directory, step):
    """The generation of the data ``step`` carries (the one its first reference names)."""
    raw = (directory / str(step) / _format.COMMIT_FILE).read_bytes()
    return _decode.decode(raw, "").refs[0][1]


def test_deleting_the_step_that_wrote_the_data_leaves_the_others_exact(tmp_path, base):
    with pc.CheckpointManager(tmp_path, keep=None, async_save=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state(base, step))
        mgr.delete(1)
        assert mgr.steps() == [2, 3]
        with pytest.raises(pc.CheckpointNotFoundError):
            mgr.restore(1)
        mgr.save(4, state(base, 4))  # still carried from step 1's kept data
        assert pc.metadata(tmp_path / "4").carried == {"base": "1"}
        for step in (2, 3, 4):
            assert_state(pc.restore(tmp_path / str(step))[0], base, step)
        # Once no kept step carries its data, the retired folder goes at once, and step 1 can
        # be saved again (a rollback).
        for step in (4, 3, 2):
            assert (tmp_path / "1").exists()
            mgr.delete(step)
        assert not (tmp_path / "1").exists()
        mgr.save(1, state(base, 1))
    assert_state(pc.restore(tmp_path / "1")[0], base, 1)


def test_a_step_copied_alone_fails_naming_what_is_missing(tmp_path, base):
    run = tmp_path / "run"
    with pc.CheckpointManager(run, keep=None, async_save=False) as mgr:
        for step in (1, 2):
            mgr.save(step, state(base, step))
    alone = tmp_path / "alone"
    shutil.copytree(run / "2", alone / "2")
    with pytest.raises(pc.CheckpointNotFoundError,
                       match=r"leaf 'base' is carried from step 1 .*alone/1/d-[0-9a-f]{32}.*"
                             r"pytree-ckpt convert"):
        pc.restore(alone / "2")
    assert pc.metadata(alone / "2").carried == {"base": "1"}  # reads no data
    report = pc.verify(alone / "2")
    assert list(report.problems) == ["base"] and "carried from step 1" in report.problems["base"]
    # Another run's step 1 beside it: its generation differs, so the same error, not its data.
    with pc.CheckpointManager(tmp_path / "other", keep=None, async_save=False) as mgr:
        mgr.save(1, state(base + 1, 1))
    shutil.copytree(tmp_path / "other" / "1", alone / "1")
    with pytest.raises(pc.CheckpointNotFoundError, match="carried from step 1"):
        pc.restore(alone / "2")
    # With the step it refers to copied beside it, the copy restores exactly.
    shutil.rmtree(alone / "1")
    shutil.copytree(run / "1", alone / "1")
    assert_state(pc.restore(alone / "2")[0], base, 2)
    # convert writes a self-contained copy.
    from pytree_ckpt._cli import main
    assert main(["convert", str(run / "2"), str(tmp_path / "whole")]) == 0
    assert pc.metadata(tmp_path / "whole").carried == {}
    shutil.rmtree(run / "1")
    assert_state(pc.restore(tmp_path / "whole")[0], base, 2)


def test_steps_shows_bytes_written_and_carried(tmp_path, base, capsys):
    from pytree_ckpt._cli import main
    with pc.CheckpointManager(tmp_path, keep=None, async_save=False) as mgr:
        for step in (1, 2):
            mgr.save(step, state(base, step))
    assert main(["steps", str(tmp_path), "--json"]) == 0
    import json
    rows = json.loads(capsys.readouterr().out)["steps"]
    assert [r["carried_bytes"] for r in rows] == [0, BASE * 4]
    assert rows[1]["written_bytes"] == rows[1]["nbytes"] - BASE * 4
    assert main(["ls", str(tmp_path / "2")]) == 0
    assert "carries 4.0 MiB from step(s) 1 (1 leaves)" in capsys.readouterr().out
    # Step 1 deleted: its folder, retired, keeps the base for step 2, and is listed so.
    # (Step 3, the first after a restart, writes the base anew.)
    with pc.CheckpointManager(tmp_path, keep=None, async_save=False) as mgr:
        mgr.save(3, state(base, 3))
        mgr.delete(1)
    assert main(["steps", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["steps"]
    assert [(r["step"], r["state"]) for r in rows] == [
        (1, "retired"), (2, "committed"), (3, "committed")]
    assert rows[0]["nbytes"] == BASE * 4 and rows[0]["leaf_count"] == 1
    assert rows[0]["carried_by"] == [2] and rows[0]["written_bytes"] is None
    assert main(["steps", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path}: 2 committed steps, latest 3")
    assert re.search(r"^ *1  retired +4\.0 MiB +1 +carried by 2$", out, re.M), out
    assert "retired: a deleted step's folder" in out and "pytree-ckpt clean" not in out


def test_a_forged_reference_cannot_leave_the_directory(tmp_path, base):
    with pc.CheckpointManager(tmp_path, keep=None, async_save=False) as mgr:
        for step in (1, 2):
            mgr.save(step, state(base, step))
    commit = _decode.decode((tmp_path / "2" / _format.COMMIT_FILE).read_bytes(), "")
    for step in ("..", "../1", "01", "/etc"):
        forged = commit._replace(refs=((step, commit.refs[0][1]),))
        crcs = [int(c) for p in commit.leaves if commit.leaves[p].storage.kind == "z"
                for c in _decode.chunk_crcs(commit, p)]
        with pytest.raises(pc.CorruptCheckpointError, match="bad 'refs' list"):
            _decode.decode(_format.encode(forged, crcs), "forged")


def _keys(kv, prefix):
    return sorted(k.decode() for k in kv.list(_storage.prefix_range(prefix)).result())


def test_incremental_steps_on_an_object_store(proxied, base, monkeypatch):
    """The same guarantees through moto's S3 and fake-gcs-server, every request counted."""
    from pytree_ckpt._cli import main

    proxy, url = proxied
    run = f"{url}/run"
    kv = _storage.open_kvstore(_storage.location(url))
    name = url.rpartition("/")[2]
    with pc.CheckpointManager(run, keep=2, async_save=False) as mgr:
        mgr.save(1, state(base, 1))
        first = [k for k in proxy.keys("put") if CHUNK.search(k)]
        proxy.clear()
        mgr.save(2, state(base, 2))
        # Step 2 PUTs the chunks of "mu" only (one array; "lora" is packed): none of "base".
        puts = [k for k in proxy.keys("put") if CHUNK.search(k)]
        assert puts and all(k.startswith(f"{name}/run/2/") for k in puts), puts
        assert len({CHUNK.search(k).group(1) for k in puts}) == 1, puts
        assert len(first) > len(puts)
        assert proxy.sent("put", r"/a/\d+/c/") < BASE  # base: 4 MiB, carried
        # The next step's base is the commit file the manager wrote: nothing is read back.
        assert f"{name}/run/2/{_format.COMMIT_FILE}" not in proxy.keys("get")
        info = mgr.metadata(2)
        assert info.carried == {"base": "1"} and info.carried_nbytes == BASE * 4
        proxy.clear()
        mgr.save(3, state(base, 3))  # retention deletes 1, the step that wrote the base
        assert mgr.steps() == [2, 3]
        # Retiring it lists its folder once, then deletes what is not needed.
        assert len([k for k in proxy.keys("list") if k.startswith(f"{name}/run/1")]) == 1, \
            proxy.keys("list")
        proxy.clear()
        mgr.save(4, state(base, 4))  # deletes 2; step 1's folder, pruned, is not listed again
        assert mgr.steps() == [3, 4]
        assert not [k for k in proxy.keys("list") if k.startswith(f"{name}/run/1")], \
            proxy.keys("list")
    # Step 1 is retired: its commit file and all but the base's array are gone.
    left = _keys(kv, "run/1/")
    assert "run/1/retired" in left and f"run/1/{_format.COMMIT_FILE}" not in left
    commit = _decode.decode(kv.read(f"run/3/{_format.COMMIT_FILE}").result().value, "")
    assert {k.split("/a/")[1].split("/")[0] for k in left if "/a/" in k} == {
        str(commit.leaves["base"].storage.index)}
    assert pc.latest(run) == f"{run}/4"
    with pytest.raises(pc.CheckpointNotFoundError, match="step 1 was deleted"):
        pc.restore(f"{run}/1")
    for step in (3, 4):
        proxy.clear()
        assert_state(pc.restore(f"{run}/{step}")[0], base, step)
        # The carried leaves are read from step 1's folder with no request before their reads.
        assert not [k for k in proxy.keys("get") if k.endswith("zarr.json")], proxy.keys("get")
        assert pc.verify(f"{run}/{step}").ok
    # clean, told every leftover is old, never deletes the retired folder's data.
    monkeypatch.setenv("PYTREE_CKPT_CLEAN_AFTER_S", "0")
    report = pc.clean(run, delete=True)
    assert f"{run}/1" not in report.incomplete + report.orphaned
    assert _keys(kv, "run/1/") == left
    assert_state(pc.restore(f"{run}/4")[0], base, 4)
    # A step copied alone fails naming what is missing; convert writes a whole copy.
    for key in _keys(kv, "run/4/"):
        kv.write(f"alone/4/{key[len('run/4/'):]}", kv.read(key).result().value).result()
    with pytest.raises(pc.CheckpointNotFoundError,
                       match=rf"leaf 'base' is carried from step 1 \({url}/alone/1/d-.*"
                             r"pytree-ckpt convert"):
        pc.restore(f"{url}/alone/4")
    assert main(["convert", f"{run}/4", f"{url}/whole"]) == 0
    assert pc.metadata(f"{url}/whole").carried == {}
    # A new base: no kept step needs step 1's data, so its folder goes.
    with pc.CheckpointManager(run, keep=2, async_save=False) as mgr:
        for step in (5, 6):
            mgr.save(step, state(base + 1, step))
    assert _keys(kv, "run/1/") == [] and _keys(kv, "run/.steps/") == [
        "run/.steps/5", "run/.steps/6", "run/.steps/complete"]
    assert_state(pc.restore(f"{url}/whole")[0], base, 4)
    assert_state(pc.restore(f"{run}/6")[0], base + 1, 6)

JOB = r"""
import jax, jax.numpy as jnp, numpy as np, pytree_ckpt as pc
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pytree_ckpt import _commit

mesh = Mesh(np.array(jax.devices()), ("x",))
def sharded(value):
    full = np.full(1 << 16, value, np.float32)
    return jax.make_array_from_callback(full.shape, NamedSharding(mesh, P("x")),
                                        lambda i: full[i])
frozen, other = sharded(7), sharded(8)
offers = []
real = _commit._carried
def spy(snap, o):
    offers.append(o)
    return real(snap, o)
_commit._carried = spy
with pc.CheckpointManager(args["dir"], keep=None, async_save=False) as mgr:
    mgr.save(1, {"frozen": frozen, "other": other})
    # Process 1 made "other" anew: only "frozen" is carried, by both processes.
    mine = sharded(8) if process_id == 1 else other
    mgr.save(2, {"frozen": frozen, "other": mine})
print("OFFERS", [sorted(o[1]) for o in offers[1]], flush=True)
"""


def test_two_processes_agree_on_the_carried_leaves(tmp_path):
    results = run_multiprocess(JOB, num_processes=2, devices_per_process=1, timeout_s=120,
                               args={"dir": str(tmp_path)},
                               env={"PYTREE_CKPT_BARRIER_TIMEOUT_S": "20"})
    assert_all_ok(results)
    for r in results:  # process 0 offered both leaves, process 1 only "frozen" (leaf 0)
        assert "OFFERS [[0, 1], [0]]" in r.stdout, format_results(results)
    assert pc.metadata(tmp_path / "2").carried == {"frozen": "1"}
    tree, status = pc.restore(tmp_path / "2")
    status.assert_consumed()
    np.testing.assert_array_equal(np.asarray(tree["frozen"]), np.full(1 << 16, 7, np.float32))
    np.testing.assert_array_equal(np.asarray(tree["other"]), np.full(1 << 16, 8, np.float32))


def test_a_format_5_checkpoint_still_restores(tmp_path, base, monkeypatch):
    monkeypatch.setattr(_format, "FORMAT_VERSION", 5)
    pc.save(state(base, 3), tmp_path / "v5")
    monkeypatch.undo()
    assert pc.metadata(tmp_path / "v5").format_version == 5
    assert_state(pc.restore(tmp_path / "v5")[0], base, 3)
    assert pc.verify(tmp_path / "v5").ok


def test_the_benchmark_runs(tmp_path):
    """benchmarks/incremental.py, on a tiny tree, on a local disk and loopback S3: it keeps
    up with the library."""
    import json
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "incremental.py"
    out = subprocess.run([sys.executable, str(script), "--smoke", "--workdir", str(tmp_path),
                          "--json"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    report = json.loads(out)
    for where in ("local", "s3"):
        full, inc = report[where]["full"], report[where]["incremental"]
        assert inc["later_step_stored"] < full["later_step_stored"] / 2, where
        assert inc["later_step_written"] < full["later_step_written"] / 2, where
        assert set(report[where]["ratios"]) == {"bytes (written)", "bytes (stored)", "time",
                                                "time with deletes", "restore"}
        assert full["with_deletes_s"] >= full["later_step_s"] > 0, where
    # On S3 the base's 16 arrays (a zarr.json and a chunk each) are PUT by the full side only.
    assert report["s3"]["full"]["later_step_puts"] >= report["s3"]["incremental"][
        "later_step_puts"] + 32
