"""Object stores that fail: every request through a fault-injecting proxy (tests/_proxy.py)
in front of fake-gcs-server and moto's S3.

A fault of the store (403, 503 after retries, a dropped connection that keeps dropping) is a
:class:`pc.StorageError` naming the URL, never "not found" or "corrupt"; transient faults
are retried and survived; a persistent one ends within the storage deadline.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from _proxy import FaultProxy, classify

import pytree_ckpt as pc
from pytree_ckpt import _faults

TREE = {"w": jnp.arange(3 * 1024 * 1024, dtype=jnp.float32).reshape(12, -1),
        "b": jnp.ones(3), "step": 7}


def check(restored):
    np.testing.assert_array_equal(restored["w"], TREE["w"])
    np.testing.assert_array_equal(restored["b"], TREE["b"])
    assert restored["step"] == 7


# ---- the proxy itself ----

def test_proxy_classifies_both_protocols():
    assert classify("GET", "/b/run/ckpt/checkpoint.msgpack") == ("get", "run/ckpt/checkpoint.msgpack")
    assert classify("GET", "/b?list-type=2&prefix=run%2F") == ("list", "run/")
    assert classify("PUT", "/b/run/x") == ("put", "run/x")
    assert classify("HEAD", "/b/run/x") == ("head", "run/x")
    assert classify("POST", "/b?delete") == ("delete", "")
    assert classify("GET", "/storage/v1/b/b/o/run%2Fx?alt=media") == ("get", "run/x")
    assert classify("GET", "/storage/v1/b/b/o/run%2Fx") == ("head", "run/x")
    assert classify("GET", "/storage/v1/b/b/o?prefix=run%2F") == ("list", "run/")
    assert classify("POST", "/upload/storage/v1/b/b/o?uploadType=media&name=run%2Fx") == (
        "put", "run/x")
    assert classify("DELETE", "/storage/v1/b/b/o/run%2Fx") == ("delete", "run/x")
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("http://example.com:80")
    with FaultProxy("http://127.0.0.1:1") as proxy, pytest.raises(ValueError, match="exactly"):
        proxy.fail(status=503, drop=True)


def test_proxy_counts_and_injects(proxied):
    proxy, url = proxied
    assert pc.save(TREE, f"{url}/c") == f"{url}/c"
    assert proxy.counts()["put"] >= 3 and proxy.endpoint.startswith("http://127.0.0.1:")
    proxy.clear()
    rule = proxy.fail(kind="get", key="checkpoint.msgpack", status=503, count=2)
    check(pc.restore(f"{url}/c")[0])
    assert rule.hits == 2
    assert proxy.keys("get").count(f"{url.split('/', 3)[3]}/c/checkpoint.msgpack") == 3


def test_proxy_takes_a_burst_of_connections_at_once():
    # A store's client opens tens of connections at once. A listen backlog that drops some
    # makes the client's TCP retry them a second later: a pause that no real bucket has,
    # charged to whatever a test or benchmark measures through the proxy.
    import concurrent.futures
    import http.client

    def ask(proxy: FaultProxy) -> float:
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", int(proxy.endpoint.rsplit(":", 1)[1]),
                                          timeout=10)
        try:
            conn.request("GET", "/b/key")
            assert conn.getresponse().status == 503
        finally:
            conn.close()
        return time.perf_counter() - start

    with FaultProxy("http://127.0.0.1:1") as proxy:
        proxy.fail(status=503)
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            waits = list(pool.map(lambda _: ask(proxy), range(256)))
    assert max(waits) < 0.9, sorted(waits)[-5:]
    assert len(proxy.keys("get")) == 256


# ---- honest classes ----

def test_a_refused_listing_is_a_storage_error(proxied):
    proxy, url = proxied
    pc.save({"a": 1}, f"{url}/run/1")
    # Credentials that lost access: every request refused. (TensorStore reads a refused GCS
    # listing as an empty one; the library confirms an empty one with a read.)
    proxy.fail(status=403)
    with pytest.raises(pc.StorageError, match=f"^{url}/run(/.steps)?: the storage could not be read") as e:
        pc.latest(f"{url}/run")
    assert "PERMISSION_DENIED" in str(e.value) and e.value.__cause__ is not None
    assert not isinstance(e.value, FileNotFoundError | ValueError)
    with pytest.raises(pc.StorageError):
        pc.CheckpointManager(f"{url}/run", async_save=False)
    with pytest.raises(pc.StorageError):
        pc.save({"a": 1}, f"{url}/other")


def test_is_storage_fault_reads_tensorstores_codes():
    for text in ("PERMISSION_DENIED: Forbidden", "UNAUTHENTICATED: no token",
                 "UNAVAILABLE: Connection reset by peer", "DEADLINE_EXCEEDED: timed out",
                 "ABORTED: All 12 retry attempts failed: 503"):
        assert _faults.is_storage_fault(ValueError(text)), text
    for text in ("NOT_FOUND: x", "DATA_LOSS: checksum", "INVALID_ARGUMENT: y",
                 "ABORTED: generation mismatch"):
        assert not _faults.is_storage_fault(ValueError(text)), text
    assert _faults.is_storage_fault(PermissionError(13, "denied"))


# ---- retries, bounded ----

def test_retry_settings_fit_the_deadline():
    for deadline_s in (0, 0.5, 3, 30, 120, 3600):
        r = _faults.retry_settings(deadline_s)
        initial, most = _faults.RETRY_INITIAL_S, float(r["max_delay"][:-1])
        waits = [min(initial * 2**n + initial, most) for n in range(r["max_retries"])]
        assert sum(waits) <= deadline_s
        more = min(initial * 2**r["max_retries"] + initial, most)
        assert r["max_retries"] == 64 or sum(waits) + more > deadline_s
    assert _faults.retry_settings(120)["max_retries"] >= 10


def test_a_server_failing_every_request_ends_within_the_deadline(proxied, deadline):
    proxy, url = proxied
    pc.save(TREE, f"{url}/c")
    seconds = deadline(1.0)
    proxy.fail(status=503)
    for call in (lambda: pc.latest(url), lambda: pc.save({"a": 1}, f"{url}/d"),
                 lambda: pc.CheckpointManager(url)):
        start = time.monotonic()
        with pytest.raises(pc.StorageError, match="retry attempts failed.*503") as e:
            call()
        assert time.monotonic() - start < seconds + 3.0
        assert "storage_deadline_s=1 s" in str(e.value)


def test_transient_faults_are_survived(proxied):
    proxy, url = proxied
    proxy.fail(kind="put", status=503, count=2)
    proxy.fail(kind="put", drop=True, count=1)
    pc.save(TREE, f"{url}/c")
    proxy.fail(kind="get", status=503, count=2)
    proxy.fail(kind="get", status=429, count=1)
    proxy.fail(kind="get", drop=True, count=2)
    check(pc.restore(f"{url}/c")[0])
    assert pc.verify(f"{url}/c").ok
    assert all(rule.hits == rule.count for rule in proxy._rules)


def test_a_slow_server_is_waited_for(proxied):
    proxy, url = proxied
    pc.save({"w": jnp.arange(4.0)}, f"{url}/c")
    proxy.fail(kind="get", key="checkpoint.msgpack", delay=2.5, count=1)
    start = time.monotonic()
    np.testing.assert_array_equal(pc.restore(f"{url}/c")[0]["w"], np.arange(4.0))
    assert time.monotonic() - start >= 2.5


# ---- options ----

def test_configure_validates_and_names_the_option(monkeypatch):
    with pytest.raises(pc.ConfigurationError, match="storage_deadline_s.*'soon'"):
        pc.configure(storage_deadline_s="soon")
    with pytest.raises(pc.ConfigurationError, match="unknown option 'deadline'"):
        pc.configure(deadline=3)
    for bad in (-1, float("nan"), float("inf"), True):
        with pytest.raises(pc.ConfigurationError):
            pc.configure(storage_deadline_s=bad)
    monkeypatch.setenv("PYTREE_CKPT_STORAGE_DEADLINE_S", "12")
    assert pc.configure().storage_deadline_s == 12.0
    assert pc.configure(storage_deadline_s=5).storage_deadline_s == 5.0
    assert pc.configure(storage_deadline_s=None).storage_deadline_s == 12.0
    monkeypatch.setenv("PYTREE_CKPT_STORAGE_DEADLINE_S", "12s")
    with pytest.raises(pc.ConfigurationError, match="PYTREE_CKPT_STORAGE_DEADLINE_S.*'12s'"):
        pc.save({"a": 1}, "memory://faults/bad_env")


def test_bad_environment_values_never_break_import():
    env = dict(os.environ, PYTREE_CKPT_BARRIER_TIMEOUT_S="ten", PYTREE_CKPT_LIVENESS_TIMEOUT_S="",
               PYTREE_CKPT_LOCK_STALE_S="5m", PYTREE_CKPT_STORAGE_DEADLINE_S="-1",
               PYTREE_CKPT_CLEAN_AFTER_S="6h", PYTREE_CKPT_READ_WINDOW_BYTES="1 GiB")
    code = ("import pytree_ckpt as pc\n"
            "try:\n    pc.configure()\nexcept pc.ConfigurationError as e:\n    print(e)\n"
            "import os\nos.environ['PYTREE_CKPT_STORAGE_DEADLINE_S'] = '1'\n"
            "try:\n    pc.clean('memory://nothing')\nexcept pc.ConfigurationError as e:\n"
            "    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "environment variable PYTREE_CKPT_STORAGE_DEADLINE_S: '-1'" in done.stdout
    assert "environment variable PYTREE_CKPT_CLEAN_AFTER_S: '6h'" in done.stdout


# ---- after the commit: warnings, never errors ----

def test_a_failing_retention_delete_warns_and_never_raises_later(proxied, deadline):
    proxy, url = proxied
    deadline(1.0)
    proxy.fail(kind="delete", status=403)  # the credentials may write but not delete
    mgr = pc.CheckpointManager(f"{url}/run", keep=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2, 3):
            assert mgr.save(step, {"w": jnp.full(3, float(step))}, metrics={"loss": 1.0})
        mgr.wait()
        mgr.close()  # nothing raised by save, wait or close
    said = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert any(re.search(r"retention could not delete step 1 .*PERMISSION_DENIED", m)
               for m in said), said
    assert any("the lock stays" in m for m in said), said
    # Every step is committed and listed (none could go); the newest is the latest.
    assert pc.CheckpointManager(f"{url}/run", read_only=True).steps() == [1, 2, 3]
    proxy.clear()
    pc.configure(lock_stale_s=0.5)  # the lock left behind: taken over once stale
    try:
        time.sleep(0.6)
        with pc.CheckpointManager(f"{url}/run", keep=1, async_save=False) as mgr:
            mgr.save(4, {"w": jnp.full(3, 4.0)})  # the store allows deletes again: caught up
            assert mgr.steps() == [4]
    finally:
        pc.configure(lock_stale_s=None)
    np.testing.assert_array_equal(pc.restore(f"{url}/run/4")[0]["w"], np.full(3, 4.0))


# ---- big hosts: the read window is bytes, not cores ----

def test_the_read_window_is_bytes_whatever_the_cpu_count(monkeypatch, tmp_path):
    code = ("import os\nos.cpu_count = lambda: 208\nos.sched_getaffinity = lambda pid: "
            "set(range(208))\nfrom pytree_ckpt import _read\nprint(_read.window_bytes())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 256 << 20  # 4 slabs a core would be 6.5 GiB
    from pytree_ckpt import _read

    seen = []
    real = _read._ZarrReads.fill

    def fill(self):
        seen.append(self._window)
        return real(self)

    monkeypatch.setattr(_read._ZarrReads, "fill", fill)
    pc.save({"w": jnp.arange(1024.0)}, tmp_path / "c")
    try:
        assert pc.configure(read_window_bytes=8 << 20).read_window_bytes == 8 << 20
        np.testing.assert_array_equal(pc.restore(tmp_path / "c")[0]["w"], np.arange(1024.0))
        assert set(seen) == {8 << 20}
    finally:
        pc.configure(read_window_bytes=None)
    for bad in (1024, 2**20 + 0.5, "lots", True):  # under 1 MiB, not whole, not a number
        with pytest.raises(pc.ConfigurationError, match="read_window_bytes.*number of bytes"):
            pc.configure(read_window_bytes=bad)
    monkeypatch.setenv("PYTREE_CKPT_READ_WINDOW_BYTES", "64MiB")
    with pytest.raises(pc.ConfigurationError, match="PYTREE_CKPT_READ_WINDOW_BYTES"):
        pc.restore(tmp_path / "c")


# ---- save: a store that refuses or keeps failing a write ----

@pytest.mark.parametrize("key", ["/a/", "/p/", "checkpoint.msgpack$"],
                         ids=["chunks", "packed", "commit-file"])
def test_a_refused_write_is_a_save_error_caused_by_a_storage_error(proxied, deadline, key):
    proxy, url = proxied
    deadline(1.0)
    proxy.fail(kind="put", key=key, status=403)
    for save in (pc.save, lambda tree, path: pc.save_async(tree, path).result()):
        with pytest.raises(pc.SaveError, match="StorageError: .*PERMISSION_DENIED") as e:
            save(TREE, f"{url}/c")
        cause = e.value.__cause__
        assert isinstance(cause, pc.StorageError), type(cause)
        assert str(cause).startswith(f"{url}/c"), str(cause)
        assert "PERMISSION_DENIED" in str(cause.__cause__)
    proxy.clear()
    with pytest.raises(pc.CheckpointNotFoundError):  # nothing was committed
        pc.metadata(f"{url}/c")
    proxy.fail(kind="put", status=503, count=2)  # transient: survived
    pc.save(TREE, f"{url}/c")
    check(pc.restore(f"{url}/c")[0])


def test_the_cli_exits_3_when_convert_cannot_write(proxied, tmp_path, capsys):
    from pytree_ckpt import _cli

    proxy, url = proxied
    pc.save({"w": jnp.arange(4.0)}, tmp_path / "src")
    proxy.fail(kind="put", status=403)
    assert _cli.main(["convert", str(tmp_path / "src"), f"{url}/dst"]) == 3
    assert "PERMISSION_DENIED" in capsys.readouterr().err
