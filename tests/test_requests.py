"""Requests on an object store, counted by the proxy in front of moto's S3 and
fake-gcs-server (tests/_proxy.py): restore makes one GET per object it reads, plus a
constant; a save reads back nothing it wrote (the chunks' CRCs come from memory)."""

from __future__ import annotations

import collections
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pytree_ckpt as pc
from pytree_ckpt import _build, _leaves, _open, _read, _storage

CHUNKS = re.compile(r"/d-[0-9a-f]+/a/\d+/c/")  # a zarr chunk's key
BLOBS = re.compile(r"/d-[0-9a-f]+/p/")  # a packed blob's key


@pytest.fixture
def tree(monkeypatch):
    """12 + 8 chunks of 64 KiB (one leaf sharded over 8 devices), two packed leaves, a
    Python leaf."""
    monkeypatch.setattr(_storage, "CHUNK_BYTES", 64 << 10)
    mesh = jax.make_mesh((8,), ("x",))
    return {"w": jnp.arange(12 * 16384, dtype=jnp.float32).reshape(12, 16384),
            "s": jax.device_put(jnp.arange(8 * 16384, dtype=jnp.int32).reshape(8, 16384),
                                NamedSharding(mesh, P("x"))),
            "b": jnp.arange(3.0), "c": np.ones(5, np.int8), "step": 7}


def _gets(proxy) -> tuple[collections.Counter, list[str]]:
    """GETs of chunks by key, and every other GET's key."""
    keys = proxy.keys("get")
    return (collections.Counter(k for k in keys if CHUNKS.search(k)),
            [k for k in keys if not CHUNKS.search(k)])


def test_restore_gets_each_chunk_once(proxied, tree):
    proxy, url = proxied
    pc.save(tree, f"{url}/c")
    proxy.clear()
    restored, _ = pc.restore(f"{url}/c")
    for path in ("w", "s", "b", "c"):
        np.testing.assert_array_equal(np.asarray(restored[path]), np.asarray(tree[path]))
    chunks, others = _gets(proxy)
    # Each of the 20 chunks once, whole (data and checksum in one GET): no trailer GETs.
    assert len(chunks) == 20 and set(chunks.values()) == {1}, chunks
    # Beside them: the commit file and the one packed blob, each once.
    assert sorted(re.sub(r"d-[0-9a-f]+", "d-*", k.split("/c/", 1)[1]) for k in others) == [
        "checkpoint.msgpack", "d-*/p/0/0"], others
    assert proxy.counts()["get"] == 22


def test_a_partial_restore_gets_only_the_chunks_it_needs(proxied, tree):
    proxy, url = proxied
    pc.save(tree, f"{url}/c")
    proxy.clear()
    # A target of one leaf, "w", sharded over 4 devices: 4 regions of 3 rows, 12 chunks.
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
    want = jax.ShapeDtypeStruct((12, 16384), jnp.float32,
                                sharding=NamedSharding(mesh, P("x")))
    restored, _ = pc.restore(f"{url}/c", {"w": want})
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(tree["w"]))
    chunks, others = _gets(proxy)
    assert len(chunks) == 12 and set(chunks.values()) == {1}, chunks
    assert len({k.split("/a/")[1].split("/")[0] for k in chunks}) == 1, chunks  # none of "s"
    assert [k.rsplit("/", 1)[-1] for k in others] == ["checkpoint.msgpack"], others


def test_a_save_reads_back_no_chunk(proxied, tree):
    proxy, url = proxied
    pc.save(tree, f"{url}/c")
    chunks, others = _gets(proxy)
    assert not chunks, chunks
    counts = proxy.counts()
    # One PUT per chunk, per array's zarr.json, per packed blob, and the commit file.
    assert counts["put"] == 20 + 2 + 1 + 1, counts
    # Besides, requests of the commit file only (its generation: the overwrite guard's
    # condition, before and as it is written; S3 asks with HEADs; nothing is read back
    # after, where no earlier generation is to be deleted) and, on GCS, the read that
    # confirms an empty listing of the folder (see _storage.listing); no zarr.json is read
    # (the primary writes it, where a create read it first).
    asked = [k.rsplit("/", 1)[-1] for k in others + proxy.keys("head")]
    assert set(asked) <= {"checkpoint.msgpack", ".pytree-ckpt-probe"}, asked
    assert asked.count("checkpoint.msgpack") <= 2 and counts["list"] == 1, (asked, counts)


# ---- reading chunks by key (as from an object store) catches what the zarr driver did ----

def _by_key(ckpt, path="w"):
    """Restores leaf ``path`` of ``ckpt`` by key, as from an object store."""
    loc = _storage.location(ckpt)
    kv = _storage.open_kvstore(loc)
    commit = _open.load_commit(loc, kv)
    rec = commit.leaves[path]
    want = _build.Want("numpy", _leaves.DTYPES[rec.dtype], rec.shape)
    ((*_, regions),) = _read._ZarrReads(str(ckpt), commit, [(path, rec, want)],
                                        _build.Layouts(), lambda rec: (kv, commit.data),
                                        by_key=True)
    return commit, regions[tuple((0, d) for d in rec.shape)]


def _chunk_file(ckpt, commit, *index, array=0):
    return os.path.join(ckpt, commit.data, "a", str(array), "c", *map(str, index))


@pytest.fixture
def saved(tmp_path, monkeypatch):
    monkeypatch.setattr(_storage, "CHUNK_BYTES", 64 << 10)
    value = np.arange(12 * 16384, dtype=np.float32).reshape(12, 16384)
    return pc.save({"w": value, "v": value + 1}, tmp_path / "c"), value


def test_by_key_reads_exactly(saved):
    ckpt, value = saved
    _, got = _by_key(ckpt)
    np.testing.assert_array_equal(got, value)


def test_by_key_a_swapped_chunk_is_not_the_chunk(saved):
    ckpt, _ = saved
    commit, _ = _by_key(ckpt)
    a, b = _chunk_file(ckpt, commit, 0, 0, array=1), _chunk_file(ckpt, commit, 1, 0, array=1)
    os.rename(a, a + ".x"), os.rename(b, a), os.rename(a + ".x", b)
    with pytest.raises(pc.CorruptCheckpointError,
                       match=r"leaf 'w': chunk \(0, 0\) is not the chunk this checkpoint wrote"):
        _by_key(ckpt)


def test_by_key_a_flipped_byte_and_a_missing_chunk_name_the_leaf(saved):
    ckpt, _ = saved
    commit, _ = _by_key(ckpt)
    chunk = _chunk_file(ckpt, commit, 3, 0, array=1)
    raw = bytearray(pathlib.Path(chunk).read_bytes())
    raw[100] ^= 1
    pathlib.Path(chunk).write_bytes(bytes(raw))
    with pytest.raises(pc.CorruptCheckpointError,
                       match=r"leaf 'w': cannot read its array data \(chunk \(3, 0\) .*checksum "
                             r"mismatch"):
        _by_key(ckpt)
    pathlib.Path(chunk).write_bytes(bytes(raw[:-9]))
    with pytest.raises(pc.CorruptCheckpointError, match=r"chunk \(3, 0\) .* has 65531 bytes"):
        _by_key(ckpt)
    os.remove(chunk)
    with pytest.raises(pc.CorruptCheckpointError,
                       match=r"leaf 'w': cannot read its array data \(chunk \(3, 0\) .*is missing"):
        _by_key(ckpt)
