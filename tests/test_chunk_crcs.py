"""The chunk CRCs a save records are computed from the bytes in memory (_binding.shard_crcs),
never read back: they must be exactly the crc32c trailers zarr3 writes, edge chunks padded
with the fill value, for every stored dtype and for sharded arrays."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pytree_ckpt as pc
from pytree_ckpt import _binding, _decode, _format, _leaves, _open, _snapshot, _storage


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of at most 256 bytes and nothing packed: small arrays of many chunks."""
    monkeypatch.setattr(_storage, "CHUNK_BYTES", 256)
    monkeypatch.setattr(_storage, "MIN_CHUNK_BYTES", 16)
    monkeypatch.setattr(_snapshot, "PACK_BYTES", 0)


def _values(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(len(dtype) + sum(shape))
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype in ("int4", "int2"):  # negative values too: how their bytes are stored matters
        lo = -8 if dtype == "int4" else -2
        return rng.integers(lo, -lo, shape).astype(getattr(ml_dtypes, dtype))
    if dtype in ("uint4",):
        return rng.integers(0, 16, shape).astype(ml_dtypes.uint4)
    return (rng.standard_normal(shape) * 7).astype(_leaves.DTYPES[dtype])


def _trailers_on_disk(ckpt: str, commit: _format.Commit, rec) -> list[int]:
    """What the old save read back: the last 4 bytes of each chunk file, in C order."""
    out = []
    for index in _binding.all_chunks(rec):
        with open(os.path.join(ckpt, _binding.chunk_key(commit.data, rec, index)), "rb") as f:
            raw = f.read()
        assert len(raw) == _binding.chunk_bytes(rec) + _binding.TRAILER
        out.append(int.from_bytes(raw[-4:], "little"))
    return out


DTYPES = ["bool", "int8", "uint16", "int32", "float16", "float32", "float64", "complex64",
          "bfloat16", "int4", "uint4", "int2", "float8_e4m3fn", "float8_e4m3", "float8_e5m2"]
# Shape -> chunks: uneven edges along one, two and three axes; chunks that are contiguous
# blocks of the array (whole rows) and chunks that are not.
CHUNKS = {(37, 29): (8, 6), (1001,): (100,), (5, 7, 11): (2, 3, 4), (50, 33): (16, 33),
          (64, 33): (16, 33)}


@pytest.mark.parametrize("dtype", DTYPES)
def test_recorded_crcs_are_the_trailers_on_disk(tmp_path, small_chunks, monkeypatch, dtype):
    monkeypatch.setattr(_storage, "choose_chunks", lambda shard, *_a, **_k: CHUNKS[shard])
    tree = {f"x{k}": _values(dtype, shape) for k, shape in enumerate(CHUNKS)}
    ckpt = pc.save(tree, tmp_path / "c")
    commit = _open.load_commit(_storage.location(ckpt), _storage.open_kvstore(
        _storage.location(ckpt)))
    for path, value in tree.items():
        rec = commit.leaves[path]
        assert rec.storage.kind == "z" and rec.storage.chunks == CHUNKS[value.shape]
        recorded = _decode.chunk_crcs(commit, path).tolist()
        assert recorded == _trailers_on_disk(ckpt, commit, rec), (dtype, path)
        host = value if value.dtype.name == rec.storage.stored_dtype else value.view(
            _leaves.DTYPES[rec.storage.stored_dtype])
        flat, crc = _binding.shard_crcs(host, tuple(slice(None) for _ in value.shape),
                                        value.shape, rec.storage.chunks)
        assert flat.tolist() == list(range(len(recorded))) and crc.tolist() == recorded
    restored, status = pc.restore(ckpt)
    for path, value in tree.items():
        np.testing.assert_array_equal(np.asarray(restored[path]), value)
    assert pc.verify(ckpt).ok


def test_sharded_crcs_are_the_trailers_on_disk(tmp_path, small_chunks):
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    tree = {
        # Sharded along both axes, a dimension unsharded with an uneven edge, replicated.
        "both": jax.device_put(jnp.arange(64 * 48, dtype=jnp.float32).reshape(64, 48),
                               NamedSharding(mesh, P("x", "y"))),
        "rows": jax.device_put(jnp.arange(8 * 1001, dtype=jnp.bfloat16).reshape(8, 1001),
                               NamedSharding(mesh, P("x"))),
        "cols": jax.device_put(jnp.arange(999 * 4, dtype=jnp.int16).reshape(999, 4),
                               NamedSharding(mesh, P(None, "y"))),
        "repl": jax.device_put(jnp.arange(3000, dtype=jnp.int8), NamedSharding(mesh, P())),
    }
    ckpt = pc.save(tree, tmp_path / "c")
    loc = _storage.location(ckpt)
    commit = _open.load_commit(loc, _storage.open_kvstore(loc))
    for path in tree:
        rec = commit.leaves[path]
        assert len(list(_binding.all_chunks(rec))) > 1, path
        assert _decode.chunk_crcs(commit, path).tolist() == _trailers_on_disk(ckpt, commit, rec)
    restored, _ = pc.restore(ckpt)
    for path, value in tree.items():
        np.testing.assert_array_equal(np.asarray(restored[path]), np.asarray(value))


def test_shard_crcs_refuses_a_shard_that_cuts_a_chunk():
    with pytest.raises(ValueError, match="not made of whole chunks"):
        _binding.shard_crcs(np.zeros(6, np.uint8), (slice(2, 8),), (16,), (4,))
    with pytest.raises(ValueError, match="not made of whole chunks"):
        _binding.shard_crcs(np.zeros(6, np.uint8), (slice(0, 6),), (16,), (4,))
    # An edge shard may end off a chunk boundary: the array ends there.
    flat, _ = _binding.shard_crcs(np.zeros(6, np.uint8), (slice(12, 18),), (18,), (4,))
    assert flat.tolist() == [3, 4]


def test_crcs_travel_compactly_and_come_back_exactly():
    rng = np.random.default_rng(0)
    flat = np.concatenate([np.arange(10, 500), np.arange(700, 702), [5, 900]])
    crc = rng.integers(0, 2**32, len(flat), dtype=np.uint32)
    packed = _binding.pack_crcs({3: (flat, crc), 0: (np.zeros(0, np.int64),
                                                      np.zeros(0, np.uint32))})
    assert len(packed[1][1]) == 8 * 4  # four runs, not 494 indices
    back = _binding.unpack_crcs(packed)
    order = np.argsort(flat)
    assert back[3][0].tolist() == flat[order].tolist()
    assert back[3][1].tolist() == crc[order].tolist()
    assert back[0][0].tolist() == []


def test_a_chunk_no_process_reported_fails_the_save_naming_the_leaf(tmp_path, small_chunks):
    ckpt = pc.save({"w": np.arange(4096, dtype=np.float32)}, tmp_path / "c")
    loc = _storage.location(ckpt)
    rec = _open.load_commit(loc, _storage.open_kvstore(loc)).leaves["w"]
    flat, crc = _binding.shard_crcs(np.arange(4096, dtype=np.float32), (slice(None),),
                                    (4096,), rec.storage.chunks)
    assert _binding.recorded_column([rec], [{0: (flat, crc)}]).tolist() == crc.tolist()
    with pytest.raises(pc.SaveError, match=r"leaf 'w': chunk \(1,\) was written by 0 processes"):
        _binding.recorded_column([rec], [{0: (flat[[0, 2, 3]], crc[[0, 2, 3]])}])
    with pytest.raises(pc.SaveError, match=r"leaf 'w': chunk \(0,\) was written by 2 processes"):
        _binding.recorded_column([rec], [{0: (flat, crc)}, {0: (flat[:1], crc[:1])}])


def test_no_trailer_is_read_back_by_a_save(tmp_path, small_chunks, monkeypatch):
    """A save reads nothing of the chunks it wrote: a reading kvstore would fail it."""
    tree = {"w": np.arange(5000, dtype=np.float32), "b": np.arange(3.0)}
    reads: list[str] = []
    real = _storage.open_kvstore

    class Watched:
        def __init__(self, kv):
            self._kv = kv

        def __getattr__(self, name):
            return getattr(self._kv, name)

        def __truediv__(self, other):
            return self._kv / other

        def read(self, key, *args, **kwargs):
            reads.append(key)
            return self._kv.read(key, *args, **kwargs)

    monkeypatch.setattr(_storage, "open_kvstore", lambda loc: Watched(real(loc)))
    pc.save(tree, tmp_path / "c")
    assert [k for k in reads if "/a/" in k] == []
