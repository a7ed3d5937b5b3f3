"""Reading from object stores that fail: restore, metadata, verify, read_blocks, latest, a
manager's start-up and the command line, every request through the fault-injecting proxy
(tests/_proxy.py) in front of fake-gcs-server and moto's S3.

DESIGN's three next steps: a refused or failing store is :class:`pc.StorageError` (never a
``FileNotFoundError``, on which a resume pattern starts training afresh, nor "corrupt", on
which users delete checkpoints); missing or wrong bytes of a committed checkpoint are
:class:`pc.CorruptCheckpointError`; transient faults are retried and survived exactly.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
import pytest

import pytree_ckpt as pc
from pytree_ckpt import _cli

# A zarr leaf of 12 chunks, a packed leaf, a Python leaf.
TREE = {"w": jnp.arange(3 * 1024 * 1024, dtype=jnp.float32).reshape(12, -1),
        "b": jnp.arange(3.0), "step": 7}
COMMIT = "checkpoint.msgpack$"
DATA = "/d-[0-9a-f]+/"  # a generation folder: chunks and packed blobs


def check(restored):
    np.testing.assert_array_equal(restored["w"], TREE["w"])
    np.testing.assert_array_equal(restored["b"], TREE["b"])
    assert restored["step"] == 7


def whole_w(url):
    return np.concatenate([block for _index, block in pc.read_blocks(url, "w")])


@pytest.fixture
def saved(proxied):
    """``(proxy, url)`` of a committed checkpoint of TREE behind the proxy, no rule yet."""
    proxy, url = proxied
    pc.save(TREE, f"{url}/c")
    proxy.clear()
    return proxy, f"{url}/c"


READERS = {
    "restore": lambda url: pc.restore(url),
    "metadata": lambda url: pc.metadata(url),
    "verify": lambda url: pc.verify(url),
    "read_blocks": whole_w,
}


def storage_fault(call, url, where):
    """Asserts that ``call(url)`` raises StorageError naming ``where``, chained, and neither
    not-found nor corrupt."""
    with pytest.raises(pc.StorageError) as e:
        call(url)
    assert not isinstance(e.value, FileNotFoundError | pc.CorruptCheckpointError)
    assert str(e.value).startswith(where), str(e.value)
    assert "could not be read or written" in str(e.value)
    assert e.value.__cause__ is not None
    return e.value


# ---- the commit file refused or failing: never "not found" ----

@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_refused_commit_file_is_a_storage_error(saved, reader):
    proxy, url = saved
    proxy.fail(kind="get", key=COMMIT, status=403)
    error = storage_fault(READERS[reader], url, f"{url}/checkpoint.msgpack: ")
    assert "PERMISSION_DENIED" in str(error)


def test_a_commit_file_failing_past_the_deadline_is_a_storage_error(saved, deadline):
    proxy, url = saved
    seconds = deadline(1.0)
    proxy.fail(kind="get", key=COMMIT, status=503)
    for reader in sorted(READERS):
        start = time.monotonic()
        error = storage_fault(READERS[reader], url, f"{url}/checkpoint.msgpack: ")
        assert time.monotonic() - start < seconds + 3.0, reader
        assert "retry attempts failed" in str(error) and "503" in str(error)


def test_the_resume_pattern_does_not_start_afresh_on_a_refusal(saved):
    proxy, url = saved
    proxy.fail(status=403)
    started_afresh = False
    with pytest.raises(pc.StorageError):
        try:
            pc.restore(url)
        except FileNotFoundError:
            started_afresh = True
    assert not started_afresh


# ---- the data refused or failing: never "corrupt" ----

@pytest.mark.parametrize("key", [DATA + "a/", DATA + "p"], ids=["chunks", "packed"])
@pytest.mark.parametrize("status", [403, 503])
def test_refused_or_failing_data_is_a_storage_error(saved, deadline, key, status):
    proxy, url = saved
    deadline(1.0)
    proxy.fail(kind="get", key=key, status=status)
    readers = ["restore", "verify"] + (["read_blocks"] if key.endswith("a/") else [])
    for reader in readers:
        storage_fault(READERS[reader], url, f"{url}")
    # The commit file alone is readable: metadata needs nothing else.
    assert pc.metadata(url).leaves["w"].shape == (12, 262144)


def test_missing_data_is_corrupt_and_missing_checkpoints_are_not_found(saved):
    proxy, url = saved
    proxy.fail(kind="get", key=DATA, status=404)  # the objects are gone
    for reader in ("restore", "read_blocks"):
        with pytest.raises(pc.CorruptCheckpointError, match="missing") as e:
            READERS[reader](url)
        assert not isinstance(e.value, pc.StorageError)
    report = pc.verify(url)
    assert not report.ok and set(report.problems) == {"w", "b"}
    proxy.clear()
    with pytest.raises(pc.CheckpointNotFoundError):
        pc.restore(f"{url}-never-saved")


# ---- transient faults and a slow server: survived, values exact ----

def test_transient_faults_on_every_reader_are_survived(saved):
    proxy, url = saved
    for reader in sorted(READERS):
        proxy.clear()
        proxy.fail(kind="get", key=COMMIT, status=503, count=1)
        proxy.fail(kind="get", key=DATA + "a/", status=503, count=2)
        proxy.fail(kind="get", key=DATA + "a/", drop=True, count=1)
        proxy.fail(kind="get", key=DATA + "p", status=429, count=1)
        out = READERS[reader](url)
        if reader == "restore":
            check(out[0])
        elif reader == "read_blocks":
            np.testing.assert_array_equal(out, TREE["w"])
        elif reader == "verify":
            assert out.ok
        assert proxy._rules[0].hits == 1, reader
        assert proxy._rules[1].hits == (0 if reader == "metadata" else 2), reader


def test_a_slow_server_is_waited_for_within_the_deadline(saved, deadline):
    proxy, url = saved
    deadline(1.0)  # bounds retries of failures, not how long an answer takes
    proxy.fail(kind="get", key=DATA + "a/", delay=2.5, count=1)
    start = time.monotonic()
    check(pc.restore(url)[0])
    assert time.monotonic() - start >= 2.5


# ---- latest, a manager's start-up ----

def test_a_manager_directory_under_faults(proxied, deadline):
    proxy, url = proxied
    with pc.CheckpointManager(f"{url}/run", async_save=False) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": jnp.full(4, float(step))})
    proxy.clear()
    proxy.fail(kind="list", status=503, count=2)
    assert pc.latest(f"{url}/run") == f"{url}/run/2"
    proxy.fail(kind="get", key=COMMIT, status=503, count=1)
    with pc.CheckpointManager(f"{url}/run", read_only=True) as mgr:
        np.testing.assert_array_equal(mgr.restore()[0]["w"], np.full(4, 2.0))
    proxy.clear()
    proxy.fail(kind="get", key=COMMIT, status=403)
    with pc.CheckpointManager(f"{url}/run", read_only=True) as mgr, \
            pytest.raises(pc.StorageError, match="checkpoint.msgpack: the storage"):
        mgr.restore()
    proxy.clear()
    deadline(1.0)
    proxy.fail(status=503)
    with pytest.raises(pc.StorageError, match="retry attempts failed"):
        pc.CheckpointManager(f"{url}/run", read_only=True)


# ---- another tool's file on a failing store ----

def test_a_refused_safetensors_file_is_a_storage_error(proxied):
    proxy, url = proxied
    pc.save_safetensors({"w": jnp.arange(6.0)}, f"{url}/model.safetensors")
    proxy.clear()
    proxy.fail(kind="get", key="model.safetensors$", status=403)
    for reader in ("restore", "metadata"):
        with pytest.raises(pc.StorageError) as e:
            READERS[reader](f"{url}/model.safetensors")
        assert not isinstance(e.value, FileNotFoundError), reader
    proxy.clear()
    proxy.fail(kind="get", key="model.safetensors$", status=503, count=2)
    np.testing.assert_array_equal(pc.restore(f"{url}/model.safetensors")[0]["w"], np.arange(6.0))


# ---- the command line: exit 3 ----

def test_the_cli_exits_3_on_a_storage_fault(saved, capsys):
    proxy, url = saved
    proxy.fail(kind="get", key=COMMIT, status=403)
    for argv in (["ls", url], ["verify", url], ["steps", url]):
        assert _cli.main(argv) == _cli.EXIT_STORAGE == 3, argv
        err = capsys.readouterr().err
        assert err.startswith("pytree-ckpt: error: ") and "could not be read" in err, err
    proxy.clear()
    proxy.fail(kind="get", key=DATA, status=403)
    assert _cli.main(["verify", url]) == 3
    proxy.clear()
    proxy.fail(kind="get", key=DATA, status=404)  # missing data: damage, exit 1
    assert _cli.main(["verify", url]) == 1
    proxy.clear()
    assert _cli.main(["verify", url]) == 0
    capsys.readouterr()
