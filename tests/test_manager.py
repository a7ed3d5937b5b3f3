"""CheckpointManager: retention, restart and resume, crashes, preemption, the lock, backends."""

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _manager_child import init_state, train, train_step

import pytree_ckpt as pc
from pytree_ckpt import _async, _lock, _steps

CHILD = pathlib.Path(__file__).with_name("_manager_child.py")
SRC = pathlib.Path(pc.__file__).parents[1]


def state_at(step):
    state = init_state()
    for _ in range(step):
        state = train_step(state)
    return state


def assert_same_state(a, b):
    a = a | {"key": jax.random.key_data(a["key"])}
    b = b | {"key": jax.random.key_data(b["key"])}
    jax.tree.map(np.testing.assert_array_equal, a, b)


def start_child(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.Popen([sys.executable, str(CHILD), *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_line(proc, prefix, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line
    proc.kill()
    raise AssertionError(f"child never printed {prefix!r}: {proc.communicate()[1][-3000:]}")


def save_steps(mgr, steps, score=None):
    for s in steps:
        mgr.save(s, {"x": np.full(3, s)}, metrics=None if score is None else {"m": score(s)})
    mgr.wait()


# ---- retention ----

@pytest.mark.parametrize("options, expected, best", [
    (dict(keep=3), [8, 9, 10], None),
    (dict(keep=None), list(range(1, 11)), None),
    (dict(keep=2, keep_every_n_steps=4), [4, 8, 9, 10], None),
    (dict(keep=1, best_fn=lambda m: m["m"]), [3, 10], 3),
    (dict(keep=1, best_fn=lambda m: m["m"], best_mode="min"), [1, 10], 1),
    (dict(keep=2, keep_every_n_steps=5, best_fn=lambda m: m["m"]), [3, 5, 9, 10], 3),
])
def test_retention_combinations_and_restart(tmp_path, options, expected, best):
    score = lambda s: {1: -9}.get(s, -abs(s - 3))  # noqa: E731  highest at 3, lowest at 1
    with pc.CheckpointManager(tmp_path, async_save=False, **options) as mgr:
        save_steps(mgr, range(1, 11), score)
        assert mgr.steps() == expected
        assert mgr.latest_step() == 10 and mgr.best_step() == best
    on_disk = {p.name for p in tmp_path.iterdir()}
    assert on_disk == ({str(s) for s in expected} | {f"{s}.metrics.msgpack" for s in expected}
                       | {"manager.lock", ".steps"})
    assert {p.name for p in (tmp_path / ".steps").iterdir()} == {*map(str, expected), "complete"}
    with pc.CheckpointManager(tmp_path, **options) as again:  # a restarted job sees the same
        assert again.steps() == expected and again.best_step() == best
        assert again.restore()[0]["x"].tolist() == [10] * 3
    assert pc.latest(tmp_path) == str(tmp_path / "10")


def test_best_survives_when_newer_steps_lack_metrics():
    with pc.CheckpointManager("memory://mgr/best", keep=1, async_save=False,
                              best_fn=lambda m: m["acc"]) as mgr:
        mgr.save(1, {"x": 1}, metrics={"acc": jnp.float32(0.9)})
        mgr.save(2, {"x": 2}, metrics={"acc": np.float64(0.5)})
        mgr.save(3, {"x": 3})
        mgr.save(4, {"x": 4}, metrics={"acc": float("nan")})
        assert mgr.steps() == [1, 4] and mgr.best_step() == 1
        with pytest.raises(TypeError, match=r"metrics\['acc'\] is a list"):
            mgr.save(5, {"x": 5}, metrics={"acc": [1]})
        assert mgr.steps() == [1, 4]


def test_interval_force_and_existing_steps():
    with pc.CheckpointManager("memory://mgr/interval", save_interval_steps=3, keep=None,
                              async_save=False) as mgr:
        assert [mgr.save(s, {"s": s}) for s in range(7)] == [True, False, False, True, False,
                                                           False, True]
        with pytest.raises(pc.CheckpointExistsError, match="step 4 is older than the latest"):
            mgr.save(4, {"s": 4}, force=True)  # steps only go up
        assert mgr.save(7, {"s": 7}, force=True)
        assert mgr.steps() == [0, 3, 6, 7]
        assert not mgr.save(6, {"s": "again"})  # a resumed loop saving its first step again
        with pytest.raises(pc.CheckpointExistsError, match="step 6 already has a committed"):
            mgr.save(6, {"s": "again"}, force=True)
        assert mgr.restore(6)[0] == {"s": 6}
        with pytest.raises(TypeError, match="step must be an int"):
            mgr.save(1.0, {})
        with pytest.raises(ValueError, match="step must be >= 0"):
            mgr.save(-1, {})


def test_async_retention_deletes_in_the_background(tmp_path, monkeypatch):
    # With async_save, the deletes of the steps retention drops run after the commit in a
    # thread of their own: the training loop does not wait for them; wait() does.
    entered, release = threading.Event(), threading.Event()
    real = _steps.delete_step

    def held(loc, kv, step):
        entered.set()
        assert release.wait(5), "the manager waited for retention's deletes"
        real(loc, kv, step)

    monkeypatch.setattr(_steps, "delete_step", held)
    with pc.CheckpointManager(tmp_path, keep=1) as mgr:
        assert mgr.save(1, {"x": np.ones(2)}) and mgr.save(2, {"x": np.full(2, 2.0)})
        while mgr.latest_step() != 2:  # step 2 commits, then step 1 is dropped
            time.sleep(0.01)
        assert entered.wait(5) and not release.is_set()
        assert mgr.steps() == [2] and (tmp_path / "1").exists()  # deleting, not yet deleted
        with pytest.raises(pc.CheckpointNotFoundError, match="committed steps: \\[2\\]"):
            mgr.restore(1)
        assert mgr.save(3, {"x": np.full(2, 3.0)})  # the next step starts meanwhile
        release.set()
        mgr.wait()
        assert mgr.steps() == [3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".steps", "3", "manager.lock"]


def test_deletion_waits_for_the_newer_commit(monkeypatch):
    gate = threading.Event()
    real_submit = _async.submit
    monkeypatch.setattr(_async, "submit",
                        lambda fn, path: real_submit(lambda: (gate.wait(10), fn())[1], path))
    with pc.CheckpointManager("memory://mgr/async", keep=1) as mgr:
        gate.set()
        assert mgr.save(1, {"x": np.ones(2)})
        mgr.wait()
        gate.clear()
        assert mgr.save(2, {"x": np.full(2, 2.0)})  # returns after the snapshot
        time.sleep(0.05)
        assert mgr.steps() == [1] and pc.latest("memory://mgr/async") == "memory://mgr/async/1"
        np.testing.assert_array_equal(mgr.restore()[0]["x"], np.ones(2))
        gate.set()
        mgr.wait()
        assert mgr.steps() == [2]
        with pytest.raises(pc.CheckpointNotFoundError, match=r"no committed checkpoint for step "
                                                             r"1 \(committed steps: \[2\]\)"):
            mgr.restore(1)
    with pytest.raises(pc.CheckpointNotFoundError):
        pc.restore("memory://mgr/async/1")


def test_restore_metadata_and_errors(tmp_path):
    state = {"params": {"w": jnp.ones((2, 2))}, "step": 5}
    with pc.CheckpointManager(tmp_path / "run") as mgr:
        with pytest.raises(pc.CheckpointNotFoundError, match="no committed checkpoint yet"):
            mgr.restore()
        assert mgr.latest_step() is None and mgr.best_step() is None
        mgr.save(5, state)
        params, status = mgr.restore(5, {"w": jnp.zeros((2, 2))}, at="params")  # waits for 5
        status.assert_consumed()
        np.testing.assert_array_equal(params["w"], np.ones((2, 2)))
        assert mgr.metadata().leaves["step"].value == 5
        assert mgr.directory == str(tmp_path / "run")
    assert "closed" in repr(mgr)
    with pytest.raises(ValueError, match="is closed"):
        mgr.save(6, state)
    mgr.close()  # twice is fine
    for bad, match in ((dict(keep=0), "keep must be a positive int or None"),
                       (dict(save_interval_steps=None), "save_interval_steps must be a positive"),
                       (dict(best_mode="best"), "best_mode must be 'max' or 'min'")):
        with pytest.raises(ValueError, match=match):
            pc.CheckpointManager(tmp_path / "bad", **bad)


def test_failed_save_leaves_no_step_and_no_metrics(tmp_path):
    with pc.CheckpointManager(tmp_path, best_fn=lambda m: m["m"]) as mgr:
        with pytest.raises(pc.UnsupportedLeafError):
            mgr.save(1, {"bad": object()}, metrics={"m": 1.0})
        assert mgr.steps() == [] and not (tmp_path / "1.metrics.msgpack").exists()
        mgr.save(1, {"good": 1}, metrics={"m": 1.0})
    assert pc.latest(tmp_path) == str(tmp_path / "1")


# ---- crashes, restarts, preemption: real child processes ----

def test_killed_between_steps_resumes_from_the_last_commit_with_identical_state(tmp_path):
    child = start_child("train", tmp_path, 10, 4)
    wait_for_line(child, "ready")  # step 4 is committed; the child holds the lock
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    assert pc.latest(tmp_path) == str(tmp_path / "4")
    with pc.CheckpointManager(tmp_path) as mgr:  # the dead child's lock is gone
        assert mgr.steps() == [3, 4]
        restored, status = mgr.restore(target=init_state())
        status.assert_consumed()
        assert_same_state(restored, state_at(4))
    final = train(str(tmp_path), 10)  # the same loop, resumed in a new process
    assert_same_state(final, state_at(10))
    assert pc.restore(pc.latest(tmp_path), init_state())[0]["step"] == 10


def test_crash_mid_save_leaves_an_incomplete_step_that_is_ignored_and_cleaned(tmp_path):
    child = start_child("crash", tmp_path)
    _, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, err[-3000:]
    names = {p.name for p in (tmp_path / "2").iterdir()}
    assert names and all(n.startswith("d-") for n in names)  # data, no commit file
    assert (tmp_path / "2.metrics.msgpack").exists()
    assert pc.latest(tmp_path) == str(tmp_path / "1")  # ignored without a manager
    with pytest.raises(pc.IncompleteCheckpointError):
        pc.restore(tmp_path / "2")
    with pc.CheckpointManager(tmp_path, best_fn=lambda m: -m["loss"]) as mgr:
        assert mgr.steps() == [1] and mgr.latest_step() == 1 and mgr.best_step() == 1
        assert not (tmp_path / "2").exists() and not (tmp_path / "2.metrics.msgpack").exists()
        assert_same_state(mgr.restore(target=init_state())[0], state_at(1))
        assert mgr.save(2, state_at(2), metrics={"loss": 0.5})
    assert pc.latest(tmp_path) == str(tmp_path / "2")


def test_sigterm_forces_a_last_save_and_a_clean_exit(tmp_path):
    child = start_child("preempt", tmp_path)
    wait_for_line(child, "step 3")
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err[-3000:]
    step = int(out.strip().splitlines()[-1].removeprefix("preempted "))
    assert step >= 3
    with pc.CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == [step]  # the interval (1000) saved nothing else
        assert_same_state(mgr.restore(target=init_state())[0], state_at(step))


def test_a_manager_left_open_is_closed_at_exit(tmp_path):
    child = start_child("unclosed", tmp_path)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 0 and not err, err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".steps", "3", "manager.lock"]  # retention ran
    assert pc.restore(pc.latest(tmp_path))[0]["x"].tolist() == [3] * 1000


def test_sigterm_in_process_and_handler_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pc.CheckpointManager("memory://mgr/sigterm", save_interval_steps=100,
                              handle_preemption=True) as mgr:
        assert not mgr.save(1, {"s": 1}) and not mgr.preempted
        os.kill(os.getpid(), signal.SIGTERM)
        assert mgr.save(2, {"s": 2}) and mgr.preempted
        assert mgr.steps() == [2]  # committed before `preempted` turned True
    assert signal.getsignal(signal.SIGTERM) is before
    errors = []

    def create_in_a_thread():
        try:
            pc.CheckpointManager("memory://mgr/thread", handle_preemption=True)
        except ValueError as e:
            errors.append(e)

    thread = threading.Thread(target=create_in_a_thread)
    thread.start()
    thread.join()
    with pytest.raises(ValueError, match="needs the manager to be created in the main thread"):
        raise errors[0]
    pc.CheckpointManager("memory://mgr/thread").close()  # the failed one released its lock


# ---- cleaning and the lock ----

def test_leftovers_are_cleaned_but_foreign_files_are_kept(tmp_path):
    with pc.CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save(3, {"a": 3})
    (tmp_path / "7" / "d-0123").mkdir(parents=True)
    (tmp_path / "7" / "d-0123" / "blob").write_bytes(b"partial")
    (tmp_path / "7" / "checkpoint.msgpack.__lock").write_bytes(b"")
    (tmp_path / "7.metrics.msgpack").write_bytes(b"\x80")
    (tmp_path / "3.metrics.msgpack.__lock").write_bytes(b"")
    (tmp_path / "8").mkdir()
    (tmp_path / "8" / "notes.txt").write_text("mine")
    (tmp_path / "README").write_text("mine too")
    with pc.CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == [3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".steps", "3", "8", "README",
                                                          "manager.lock"]
    assert sorted(p.name for p in (tmp_path / ".steps").iterdir()) == ["3", "complete"]
    assert (tmp_path / "8" / "notes.txt").read_text() == "mine"


def test_lock_on_local_directory(tmp_path):
    first = pc.CheckpointManager(tmp_path)
    with pytest.raises(pc.LockedError, match=rf"another CheckpointManager holds this directory "
                                             rf"\(host '.+', pid {os.getpid()}, last seen"):
        pc.CheckpointManager(tmp_path)
    assert issubclass(pc.LockedError, RuntimeError)
    first.close()
    pc.CheckpointManager(tmp_path).close()


def test_lock_on_object_store(monkeypatch):
    url = "memory://mgr/lock"
    first = pc.CheckpointManager(url)
    with pytest.raises(pc.LockedError, match="another CheckpointManager holds this directory"):
        pc.CheckpointManager(url)
    first.close()
    kv = pc._storage.open_kvstore(pc._storage.location(url))
    assert kv.read(_lock.LOCK_FILE).result().state == "missing"
    # A holder that died on another host without closing: taken over once its heartbeat is old.
    kv.write(_lock.LOCK_FILE, b'{"host": "elsewhere", "pid": 1, "token": "t", "time": 1.5}'
             ).result()
    monkeypatch.setenv("PYTREE_CKPT_LOCK_STALE_S", "0.05")  # heartbeats every 10 ms
    second = pc.CheckpointManager(url)
    assert _lock._token(kv.read(_lock.LOCK_FILE).result().value) == second._lock._token
    # ... and one that looked dead while alive (a stalled heartbeat) learns at its next save.
    kv.write(_lock.LOCK_FILE, b'{"host": "elsewhere", "pid": 1, "token": "u", "time": 1e10}'
             ).result()
    deadline = time.monotonic() + 10
    while not second._lock._lost and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(pc.LockedError, match="heartbeat went stale"):
        second.save(1, {"a": 1})
    second.close()


def test_object_store_lock_of_a_dead_process_on_this_host():
    url = "memory://mgr/deadpid"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    kv = pc._storage.open_kvstore(pc._storage.location(url))
    owner = f'{{"host": "{os.uname().nodename}", "pid": {dead}, "token": "t", "time": {time.time()}}}'
    kv.write(_lock.LOCK_FILE, owner.encode()).result()
    pc.CheckpointManager(url).close()


# ---- object stores ----

@pytest.fixture(params=["gcs", "s3"])
def bucket_dir(request, monkeypatch):
    name = request.node.name.replace("[", "_").replace("]", "")
    if request.param == "gcs":
        return f"{request.getfixturevalue('gcs_server').url}/{name}/run"
    server = request.getfixturevalue("s3_server")
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_REGION", server.region)
    return f"{server.url}/{name}/run"


def test_object_store_directory(bucket_dir):
    with pc.CheckpointManager(bucket_dir, keep=2, best_fn=lambda m: m["m"]) as mgr:
        save_steps(mgr, [1, 2, 3, 4], lambda s: -abs(s - 2))
        with pytest.raises(pc.LockedError):
            pc.CheckpointManager(bucket_dir)
    loc = pc._storage.location(bucket_dir)
    kv = pc._storage.open_kvstore(loc)
    pc.save({"x": 5}, f"{bucket_dir}/5")
    kv.delete_range(pc._storage.ts.KvStore.KeyRange("5/checkpoint.msgpack",
                                                    "5/checkpoint.msgpack\0")).result()
    assert pc.latest(bucket_dir) == f"{bucket_dir}/4"
    with pc.CheckpointManager(bucket_dir, keep=2, best_fn=lambda m: m["m"]) as mgr:
        assert mgr.steps() == [2, 3, 4] and mgr.best_step() == 2
        assert mgr.restore()[0]["x"].tolist() == [4] * 3
    assert not [k for k in kv.list().result() if k.startswith(b"5")]


# ---- read-only managers ----

def test_read_only_manager_reads_beside_a_writer_and_changes_nothing(tmp_path):
    writer = pc.CheckpointManager(tmp_path, async_save=False, keep=2)
    writer.save(1, {"w": jnp.ones(2)}, metrics={"loss": 0.5})
    (tmp_path / "9" / "d-0123").mkdir(parents=True)  # a crashed save's leftover
    reader = pc.CheckpointManager(tmp_path, read_only=True, best_fn=lambda m: -m["loss"])
    assert reader.steps() == [1] and reader.metrics(1) == {"loss": 0.5}
    writer.save(2, {"w": jnp.ones(2)})
    writer.save(3, {"w": jnp.ones(2)}, metrics={"loss": 0.25})
    # Steps the writer commits and deletes show at the next query; step 2 has no metrics.
    assert reader.steps() == [2, 3] and reader.latest_step() == 3
    assert reader.metrics(2) is None and reader.metrics() == {"loss": 0.25}
    assert reader.best_step() == 3
    np.testing.assert_array_equal(reader.restore(3, {"w": jnp.zeros(2)})[0]["w"], np.ones(2))
    with pytest.raises(pc.CheckpointNotFoundError, match=r"no committed checkpoint for step 1 "):
        reader.metrics(1)
    with pytest.raises(ValueError, match=r"is read-only: it cannot save"):
        reader.save(4, {"w": jnp.ones(2)})
    reader.close()
    writer.close()
    assert (tmp_path / "9" / "d-0123").is_dir()  # only the writer's start-up clean-up removes it
    with pytest.raises(ValueError, match=r"handle_preemption=True needs a manager that saves"):
        pc.CheckpointManager(tmp_path, read_only=True, handle_preemption=True)


def test_a_step_older_than_the_latest_is_refused_and_newer_steps_are_deleted_explicitly(
        tmp_path):
    # After a rollback to 100 of [100, 200, 300], saving 110 and 120 made the steps
    # [110, 200, 300] then [120, 200, 300]: retention deleted the new steps, and
    # latest_step() was the diverged 300.
    with pc.CheckpointManager(tmp_path, keep=3, async_save=False) as mgr:
        for step in (100, 200, 300):
            mgr.save(step, {"w": np.full(2, step)})
        state, _ = mgr.restore(100)
        with pytest.raises(pc.CheckpointExistsError, match=(
                r"step 110 is older than the latest step 300; retention keeps the newest "
                r"steps, so after a rollback it would delete the new ones and keep "
                r"\[200, 300\]\. Delete the newer steps first: mgr.delete\(s\) for s in "
                r"\[200, 300\]")):
            mgr.save(110, state)
        assert mgr.steps() == [100, 200, 300]
        mgr.delete(300)
        mgr.delete(200)
        assert mgr.save(110, state) and mgr.save(120, state)
        assert mgr.steps() == [100, 110, 120] and mgr.latest_step() == 120
        with pytest.raises(pc.CheckpointNotFoundError, match="no committed checkpoint for step 7"):
            mgr.delete(7)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        ".steps", "100", "110", "120"]
    assert sorted(p.name for p in (tmp_path / ".steps").iterdir()) == [
        "100", "110", "120", "complete"]
    assert pc.latest(tmp_path) == str(tmp_path / "120")
    with pc.CheckpointManager(tmp_path) as mgr:  # a restart sees the same
        assert mgr.steps() == [100, 110, 120]
        np.testing.assert_array_equal(mgr.restore(120)[0]["w"], np.full(2, 100))
