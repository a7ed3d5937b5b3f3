"""A CheckpointManager's step index: on object stores, finding the steps costs requests per
step, never per chunk; crashes, hand deletions and older directories are handled.

The request counts come from moto's own request recorder (``/moto-api/recorder/``), in a
moto server of this module's own whose recording goes to a temporary file.
"""

from __future__ import annotations

import json
import signal
import urllib.parse
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from _servers import S3Server, moto_s3_server, patched_environ
from _upload import upload
from test_manager import start_child

import pytree_ckpt as pc
from pytree_ckpt import _storage

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def recorded_s3(tmp_path_factory, s3_server) -> Iterator[S3Server]:
    # After the session's server (s3_server, which this module's other tests use): its
    # credentials are then in the environment this fixture restores at its end. Started
    # in this fixture's time instead, they would be undone with ours, and every later test
    # on the session's server would be refused (403).
    recording = tmp_path_factory.mktemp("moto") / "recording.jsonl"
    with (patched_environ({"MOTO_RECORDER_FILEPATH": str(recording)}), moto_s3_server() as server,
          patched_environ(server.env())):
        yield server


class _Recorder:
    """What the server was asked, between :meth:`start` and :meth:`stop`."""

    def __init__(self, server: S3Server):
        self.server = server

    def _call(self, method: str, action: str) -> str:
        request = urllib.request.Request(f"{self.server.endpoint}/moto-api/recorder/{action}",
                                         method=method, data=b"" if method == "POST" else None)
        with _OPENER.open(request, timeout=30) as response:
            return response.read().decode()

    def start(self) -> None:
        self._call("POST", "reset-recording")
        self._call("POST", "start-recording")

    def stop(self) -> list[dict]:
        self._call("POST", "stop-recording")
        return [json.loads(line) for line in self._call("GET", "download-recording").splitlines()
                if line.strip()]


def _listings(requests: list[dict]) -> list[str]:
    """The prefix of every list request (S3 ListObjectsV2) among ``requests``."""
    prefixes = []
    for r in requests:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(r["url"]).query,
                                      keep_blank_values=True)
        if r["method"] == "GET" and "list-type" in query:
            prefixes.append(query.get("prefix", [""])[0])
    return prefixes


def _save_steps(spec: dict, steps: list[int], n: int) -> None:
    with pc.CheckpointManager(spec, keep=None, async_save=False) as mgr:
        for step in steps:
            mgr.save(step, {"w": np.full(n, step, np.float32)})


def _measure(server: S3Server, path: str, chunks: int, monkeypatch) -> dict[str, list[str]]:
    """Saves 4 steps of one array in ``chunks`` chunks each, then records the listings of a
    manager's start-up, pc.latest and one more save."""
    n = 65_600  # float32: just above the packing limit (256 KiB), so a zarr array
    monkeypatch.setattr(_storage, "CHUNK_BYTES", 4 * n // chunks)
    spec = server.spec(path)
    _save_steps(spec, [1, 2, 3, 4], n)
    recorder = _Recorder(server)
    seen = {}
    recorder.start()
    mgr = pc.CheckpointManager(spec, keep=None, async_save=False)
    seen["start-up"] = _listings(recorder.stop())
    try:
        assert mgr.steps() == [1, 2, 3, 4]
        recorder.start()
        assert mgr.save(5, {"w": np.full(n, 5, np.float32)})
        seen["save"] = _listings(recorder.stop())
    finally:
        mgr.close()
    recorder.start()
    assert pc.latest(spec) == _storage.location(spec).child("5").url
    seen["latest"] = _listings(recorder.stop())
    keys = _storage.open_kvstore(_storage.location(spec)).list().result()
    assert len(keys) > 5 * chunks  # every chunk is a key of its own
    return seen


@pytest.mark.slow
def test_finding_steps_costs_requests_per_step_not_per_chunk(recorded_s3, monkeypatch):
    few = _measure(recorded_s3, "few/run/", 1, monkeypatch)
    many = _measure(recorded_s3, "many/run/", 250, monkeypatch)
    # The same requests, whether each step has 1 chunk or 250 (1,250 keys in all: more than
    # the 1,000 keys of one S3 listing page, so a listing of the directory would show).
    assert {k: len(v) for k, v in many.items()} == {k: len(v) for k, v in few.items()}
    # Never a listing of a step's folder, nor of the whole directory.
    for what, prefixes in many.items():
        for prefix in prefixes:
            assert prefix.startswith("many/run/"), (what, prefix)
            inside = prefix.removeprefix("many/run/")
            assert inside == ".steps/" or inside.endswith("/checkpoint.msgpack") or (
                what == "save" and inside == "5/"), (what, prefix)


# ---- what the index holds after crashes, hand deletions and older versions ----

@pytest.fixture
def s3_dir(s3_server, request, monkeypatch) -> str:
    """A fresh manager directory on moto's S3, as a URL (a child process can use it too)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_REGION", s3_server.region)
    return f"{s3_server.url}/{request.node.name}/run"


def _keys(url: str) -> set[str]:
    loc = _storage.location(url)
    return {k.decode() for k in _storage.open_kvstore(loc).list().result()}


def _index(url: str) -> set[str]:
    return {k.removeprefix(".steps/") for k in _keys(url) if k.startswith(".steps/")}


def _delete(url: str, folder: str) -> None:
    """Deletes a folder by hand, as a user with the bucket's own tools would."""
    loc = _storage.location(url)
    _storage.open_kvstore(loc).delete_range(_storage.prefix_range(folder + "/")).result()


def test_a_save_killed_between_its_marker_and_its_commit_is_cleaned_at_start_up(s3_dir):
    child = start_child("crash", s3_dir)  # commits step 1, killed in step 2 before its commit
    _, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, err[-3000:]
    keys = _keys(s3_dir)
    assert _index(s3_dir) == {"1", "2", "complete"}
    assert "2/checkpoint.msgpack" not in keys and any(k.startswith("2/d-") for k in keys)
    assert "2.metrics.msgpack" in keys
    assert pc.latest(s3_dir) == f"{s3_dir}/1"
    with pc.CheckpointManager(s3_dir, read_only=True) as reader:
        assert reader.steps() == [1]
    assert _keys(s3_dir) == keys  # reading wrote and deleted nothing
    with pc.CheckpointManager(s3_dir, async_save=False) as mgr:  # the dead child's lock: taken
        assert mgr.steps() == [1]
        assert not [k for k in _keys(s3_dir) if k.startswith("2")]  # folder and metrics
        assert _index(s3_dir) == {"1", "complete"}
        assert mgr.save(2, {"w": np.ones(2)})
    assert pc.latest(s3_dir) == f"{s3_dir}/2" and _index(s3_dir) == {"1", "2", "complete"}


def test_a_step_deleted_by_hand_is_skipped_and_its_marker_removed(s3_dir):
    with pc.CheckpointManager(s3_dir, keep=None, async_save=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": np.full(2, step)}, metrics={"loss": 1 / step})
    _delete(s3_dir, "3")
    assert pc.latest(s3_dir) == f"{s3_dir}/2"  # the newest marker's step is gone: the next
    with pc.CheckpointManager(s3_dir, keep=None) as mgr:
        assert mgr.steps() == [1, 2]
        assert _index(s3_dir) == {"1", "2", "complete"}
        assert "3.metrics.msgpack" not in _keys(s3_dir)  # an orphan now, deleted too


def test_a_directory_without_an_index_is_listed_then_indexed(s3_dir):
    # Steps as an older version wrote them: no index.
    for step in (1, 2):
        pc.save({"w": np.full(2, step)}, f"{s3_dir}/{step}")
    assert pc.latest(s3_dir) == f"{s3_dir}/2" and _index(s3_dir) == set()
    with pc.CheckpointManager(s3_dir, read_only=True) as reader:
        assert reader.steps() == [1, 2]
    assert _index(s3_dir) == set()  # a reader writes no index
    with pc.CheckpointManager(s3_dir, keep=None) as mgr:
        assert mgr.steps() == [1, 2]
    assert _index(s3_dir) == {"1", "2", "complete"}
    # Once indexed, a step folder copied in by hand counts only with its marker, or once the
    # index is rebuilt: delete .steps/complete and a writing manager lists everything again.
    pc.save({"w": np.full(2, 3)}, f"{s3_dir}/3")
    assert pc.latest(s3_dir) == f"{s3_dir}/2"
    _delete(s3_dir, ".steps")
    assert pc.latest(s3_dir) == f"{s3_dir}/3"
    with pc.CheckpointManager(s3_dir, keep=None) as mgr:
        assert mgr.steps() == [1, 2, 3]
    assert _index(s3_dir) == {"1", "2", "3", "complete"}


def test_retention_deletes_the_folder_before_the_marker(s3_dir, monkeypatch):
    with pc.CheckpointManager(s3_dir, keep=1, async_save=False) as mgr:
        mgr.save(1, {"w": np.ones(2)})
        mgr.save(2, {"w": np.ones(2)})
        assert _index(s3_dir) == {"2", "complete"}
        assert not [k for k in _keys(s3_dir) if k.startswith("1")]

        def fail(loc, kv, prefix):
            raise OSError(f"deleting {prefix} failed")

        # A failure after the commit is a warning (step 3 is saved), never an error.
        with monkeypatch.context() as patch, pytest.warns(RuntimeWarning,
                                                          match="deleting 2 failed"):
            patch.setattr(_storage, "delete_prefix", fail)
            mgr.save(3, {"w": np.ones(2)})
        # The commit file went first, the folder stayed: so did the marker.
        assert _index(s3_dir) == {"2", "3", "complete"}
        assert "2/checkpoint.msgpack" not in _keys(s3_dir)
    with pc.CheckpointManager(s3_dir, keep=1) as mgr:
        assert mgr.steps() == [3]
        assert not [k for k in _keys(s3_dir) if k.startswith("2")]
        assert _index(s3_dir) == {"3", "complete"}


def test_a_local_directory_keeps_its_index_when_copied_to_a_bucket(tmp_path, s3_dir):
    with pc.CheckpointManager(tmp_path, keep=2, async_save=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": np.full(2, step)})
    assert sorted(p.name for p in (tmp_path / ".steps").iterdir()) == ["2", "3", "complete"]
    upload(str(tmp_path), s3_dir)
    assert pc.latest(s3_dir) == f"{s3_dir}/3"
    with pc.CheckpointManager(s3_dir, read_only=True) as reader:
        assert reader.steps() == [2, 3]
