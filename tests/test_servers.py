"""TensorStore against the loopback gs:// and s3:// servers of tests/_servers.py.

These pin the behaviour the checkpointer relies on (and the quirks it must work around),
so a TensorStore or server upgrade that changes any of it fails here first.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import tensorstore as ts
from _servers import (
    GcsServer,
    S3Server,
    ServerStartError,
    _serving,
    fake_gcs_server,
    moto_s3_server,
    patched_environ,
)

Server = GcsServer | S3Server


@pytest.fixture(params=["gcs", "s3"])
def server(request: pytest.FixtureRequest) -> Server:
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A directory of the shared bucket that no other test writes to."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name) + "/"


def open_kvstore(server: Server, path: str) -> ts.KvStore:
    return ts.KvStore.open(server.spec(path)).result()


def test_write_then_read_round_trips(server: Server, prefix: str) -> None:
    kv = open_kvstore(server, prefix)
    kv.write("blob", b"\x00hello\xff").result()
    result = kv.read("blob").result()
    assert result.state == "value"
    assert result.value == b"\x00hello\xff"
    assert kv.read("blob", byte_range=slice(1, 6)).result().value == b"hello"


def test_missing_key_reads_as_missing_not_an_error(server: Server, prefix: str) -> None:
    kv = open_kvstore(server, prefix)
    result = kv.read("no-commit-file").result()
    assert result.state == "missing"
    assert result.value == b""


def test_overwrite_replaces_the_value(server: Server, prefix: str) -> None:
    kv = open_kvstore(server, prefix)
    kv.write("k", b"first").result()
    kv.write("k", b"second").result()
    assert kv.read("k").result().value == b"second"


@pytest.mark.parametrize(
    "server",
    [
        pytest.param(
            "gcs",
            marks=pytest.mark.xfail(
                strict=True,
                raises=AssertionError,
                reason="fake-gcs-server ignores ifGenerationMatch (real GCS does not)",
            ),
        ),
        "s3",
    ],
    indirect=True,
)
def test_conditional_writes_fail_quietly_on_a_generation_mismatch(
    server: Server, prefix: str
) -> None:
    kv = open_kvstore(server, prefix)
    missing = kv.read("commit").result().stamp.generation  # the "no value" generation
    assert kv.write("commit", b"first", if_equal=missing).result().generation != b""
    # A failed condition is not an error: the returned generation is empty.
    first = kv.read("commit").result()
    assert first.value == b"first"
    assert kv.write("commit", b"second", if_equal=missing).result().generation == b""
    assert kv.write("commit", b"third", if_equal=first.stamp.generation).result().generation
    assert kv.write("commit", b"fourth", if_equal=first.stamp.generation).result().generation == b""
    assert kv.read("commit").result().value == b"third"


def test_list_gives_keys_relative_to_the_kvstore_path(server: Server, prefix: str) -> None:
    root = open_kvstore(server, "")
    for key in ("a/1", "a/2/x", "ab", "b"):
        root.write(prefix + key, b"v").result()
    # The order of list() is unspecified: sort before comparing.
    assert sorted(open_kvstore(server, prefix).list().result()) == [b"a/1", b"a/2/x", b"ab", b"b"]
    # Listing is flat (no directories) and a range is on raw bytes: "a/" to "a0" is the
    # "a/" prefix, and it does not catch the sibling "ab".
    under_a = open_kvstore(server, prefix).list(ts.KvStore.KeyRange(b"a/", b"a0")).result()
    assert sorted(under_a) == [b"a/1", b"a/2/x"]
    assert sorted(open_kvstore(server, prefix + "a/").list().result()) == [b"1", b"2/x"]
    # A path without its trailing "/" is a raw byte prefix: it catches "ab" too.
    assert sorted(open_kvstore(server, prefix + "a").list().result()) == [b"/1", b"/2/x", b"b"]


def test_path_without_trailing_slash_is_prepended_literally(server: Server, prefix: str) -> None:
    open_kvstore(server, prefix + "ckpt").write("x", b"v").result()
    assert open_kvstore(server, prefix).list().result() == [b"ckptx"]


def test_delete_range_removes_one_prefix_only(server: Server, prefix: str) -> None:
    kv = open_kvstore(server, prefix)
    for key in ("d/a", "d/sub/b", "dz", "e"):
        kv.write(key, b"v").result()
    kv.delete_range(ts.KvStore.KeyRange(b"d/", b"d0")).result()
    assert sorted(kv.list().result()) == [b"dz", b"e"]
    # Deleting everything under a directory: open it, delete the whole (empty) range.
    open_kvstore(server, prefix).delete_range(ts.KvStore.KeyRange()).result()
    assert kv.list().result() == []
    # Deleting what is not there is not an error.
    kv.delete_range(ts.KvStore.KeyRange(b"nothing/", b"nothing0")).result()


def test_zarr3_array_round_trips(server: Server, prefix: str) -> None:
    data = np.arange(24, dtype=np.float32).reshape(4, 6)
    spec = {
        "driver": "zarr3",
        "kvstore": server.spec(prefix + "arr/"),
        "metadata": {
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 3]}},
            "codecs": [{"name": "bytes"}, {"name": "crc32c"}],
        },
        "store_data_equal_to_fill_value": True,
        "fill_missing_data_reads": False,
    }
    store = ts.open(spec, create=True, dtype=ts.float32, shape=data.shape).result()
    store.write(data).result()
    reopened = ts.open(spec, open=True).result()
    np.testing.assert_array_equal(reopened.read().result(), data)
    np.testing.assert_array_equal(reopened[1:3, 2:5].read().result(), data[1:3, 2:5])
    keys = sorted(open_kvstore(server, prefix + "arr/").list().result())
    assert keys == [b"c/0/0", b"c/0/1", b"c/1/0", b"c/1/1", b"zarr.json"]


def test_zarr3_missing_chunk_is_an_error_not_zeros(server: Server, prefix: str) -> None:
    spec = {
        "driver": "zarr3",
        "kvstore": server.spec(prefix + "arr/"),
        "metadata": {
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2]}},
        },
        "fill_missing_data_reads": False,
    }
    store = ts.open(spec, create=True, dtype=ts.int32, shape=[4]).result()
    store.write(np.array([1, 2, 3, 4], dtype=np.int32)).result()
    open_kvstore(server, prefix + "arr/").delete_range(ts.KvStore.KeyRange(b"c/1", b"c/2")).result()
    with pytest.raises(ValueError, match="missing"):
        ts.open(spec, open=True).result().read().result()


def test_gs_url_reaches_the_fake_server(gcs_server: GcsServer, prefix: str) -> None:
    via_url = ts.KvStore.open(f"{gcs_server.url}/{prefix}").result()
    via_url.write("k", b"from-url").result()
    assert open_kvstore(gcs_server, prefix).read("k").result().value == b"from-url"
    assert via_url.spec().to_json()["path"] == prefix
    assert ts.KvStore.Spec(gcs_server.spec(prefix)).url == f"{gcs_server.url}/{prefix}"


def test_gcs_url_variable_is_read_when_a_context_opens_the_driver(
    gcs_server: GcsServer, prefix: str
) -> None:
    context = ts.Context()
    kv = ts.KvStore.open(gcs_server.spec(prefix), context=context).result()
    kv.write("k", b"session server").result()
    with fake_gcs_server(gcs_server.bucket) as other, patched_environ(other.env()):
        # Already-open drivers keep their endpoint, also when reopened in the same Context...
        same_context = ts.KvStore.open(gcs_server.spec(prefix), context=context).result()
        assert same_context.read("k").result().value == b"session server"
        # ...while a new Context (as each plain ts.KvStore.open has) reads the variable again.
        assert open_kvstore(gcs_server, prefix).read("k").result().state == "missing"


def test_s3_spec_with_an_endpoint_has_no_url(s3_server: S3Server) -> None:
    # So s3 checkpoints under test are named by spec dicts, never by "s3://..." strings.
    with pytest.raises(NotImplementedError, match="explicit endpoint"):
        _ = ts.KvStore.Spec(s3_server.spec("x/")).url


@pytest.mark.parametrize("start", [fake_gcs_server, moto_s3_server], ids=["gcs", "s3"])
def test_server_stops_when_the_block_raises(start) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with start("other-bucket") as server:
            endpoint = server.endpoint
            assert endpoint.startswith("http://127.0.0.1:")
            raise RuntimeError("boom")
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(endpoint, timeout=1.0)


def test_a_server_that_exits_is_retried_then_reported() -> None:
    def argv(port: int) -> list[str]:
        return [sys.executable, "-c", "import sys; print('cannot bind'); sys.exit(3)"]

    with pytest.raises(ServerStartError, match=r"exited with code 3 \(3 attempt\(s\)\)"):
        with _serving(argv, "/", timeout=10.0):
            pytest.fail("unreachable")


def test_a_server_that_never_answers_is_stopped_at_the_deadline() -> None:
    def argv(port: int) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(60)"]

    with pytest.raises(ServerStartError, match=r"did not answer in time \(1 attempt\(s\)\)"):
        with _serving(argv, "/", timeout=0.3):
            pytest.fail("unreachable")


def test_patched_environ_restores_set_and_unset_variables(monkeypatch) -> None:
    monkeypatch.setenv("PYTREE_CKPT_SET", "before")
    monkeypatch.delenv("PYTREE_CKPT_UNSET", raising=False)
    with patched_environ({"PYTREE_CKPT_SET": "during", "PYTREE_CKPT_UNSET": "during"}):
        assert os.environ["PYTREE_CKPT_SET"] == os.environ["PYTREE_CKPT_UNSET"] == "during"
    assert os.environ["PYTREE_CKPT_SET"] == "before"
    assert "PYTREE_CKPT_UNSET" not in os.environ
