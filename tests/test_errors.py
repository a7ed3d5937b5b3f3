"""Bad input gets a clear, typed error naming the path and the leaf, and loses nothing."""

import os
import pathlib
import zlib

import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pytree_ckpt as pc
from pytree_ckpt import _format


def data_files(root, kind):
    (gen,) = [p for p in pathlib.Path(root).iterdir() if p.name.startswith("d-")]
    base = gen / kind
    return sorted(p for p in base.rglob("*") if p.is_file() and p.name != "zarr.json")


def flip_byte(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


def test_missing_directory(tmp_path):
    with pytest.raises(pc.CheckpointNotFoundError, match=r"nope: no checkpoint there"):
        pc.restore(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        pc.metadata(tmp_path / "nope")


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(pc.CheckpointNotFoundError, match=r"photos: not a checkpoint.*'cat.jpg'"):
        pc.restore(tmp_path / "photos")
    for overwrite in (False, True):
        with pytest.raises(pc.NotACheckpointError, match="refusing to write into a directory"):
            pc.save({"a": 1}, tmp_path / "photos", overwrite=overwrite)
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"meow"


def test_existing_checkpoint_needs_overwrite_and_is_replaced_only_on_commit(tmp_path):
    path = tmp_path / "c"
    pc.save({"a": np.ones(3)}, path)
    with pytest.raises(pc.CheckpointExistsError, match="pass overwrite=True"):
        pc.save({"a": np.zeros(3)}, path)
    with pytest.raises(pc.UnsupportedLeafError):
        pc.save({"a": object()}, path, overwrite=True)
    np.testing.assert_array_equal(pc.restore(path)[0]["a"], np.ones(3))
    pc.save({"a": np.full(3, 2.0), "big": np.ones((512, 512))}, path, overwrite=True)
    np.testing.assert_array_equal(pc.restore(path)[0]["a"], np.full(3, 2.0))
    assert len([p for p in path.iterdir() if p.name.startswith("d-")]) == 1


def test_empty_existing_directory_is_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    pc.save({"a": 1}, tmp_path / "empty")
    assert pc.restore(tmp_path / "empty")[0] == {"a": 1}


def test_uncommitted_checkpoint_is_refused(tmp_path):
    path = tmp_path / "c"
    pc.save({"a": jnp.ones((300, 300))}, path)
    os.remove(path / _format.COMMIT_FILE)
    with pytest.raises(pc.IncompleteCheckpointError, match=r"c: incomplete checkpoint"):
        pc.restore(path)
    pc.save({"a": 2}, path, overwrite=True)  # an incomplete save can be replaced
    assert pc.restore(path)[0] == {"a": 2}


def test_truncated_commit_file(tmp_path):
    path = tmp_path / "c"
    pc.save({"a": 1, "b": np.ones(4)}, path)
    commit = path / _format.COMMIT_FILE
    commit.write_bytes(commit.read_bytes()[:-7])
    with pytest.raises(pc.CorruptCheckpointError, match=r"checkpoint.msgpack: not a valid commit file"):
        pc.restore(path)


def test_flipped_bit_in_a_python_leaf_is_caught_by_the_commit_checksum(tmp_path):
    path = tmp_path / "c"
    pc.save({"lr": 12345}, path)
    commit = path / _format.COMMIT_FILE
    raw = commit.read_bytes()
    flip_byte(commit, raw.rindex((12345).to_bytes(2, "big")))
    with pytest.raises(pc.CorruptCheckpointError, match="checksum mismatch"):
        pc.restore(path)


@pytest.mark.parametrize("version, advice", [(99, "upgrade pytree_ckpt"),
                                              (1, "written by pre-release versions only")])
def test_other_format_versions_are_refused(tmp_path, version, advice):
    import msgpack

    path = tmp_path / "c"
    pc.save({"a": 1}, path)
    commit = path / _format.COMMIT_FILE
    magic, _, crc, body = msgpack.unpackb(commit.read_bytes())
    commit.write_bytes(msgpack.packb([magic, version, crc, body]))
    with pytest.raises(pc.FormatVersionError, match=(
            f"format version {version}; this pytree_ckpt reads versions 2 to 6 .*{advice}")):
        pc.restore(path)


def test_flipped_byte_in_an_array_chunk_names_the_leaf(tmp_path):
    path = tmp_path / "c"
    pc.save({"params": {"w": jnp.arange(300 * 300, dtype=jnp.float32).reshape(300, 300)}}, path)
    chunk = data_files(path, "a")[0]
    flip_byte(chunk, 100)
    with pytest.raises(pc.CorruptCheckpointError, match=r"leaf 'params/w'.*cannot read"):
        pc.restore(path)


def test_flipped_byte_in_a_packed_leaf_names_the_leaf(tmp_path):
    path = tmp_path / "c"
    pc.save({"a": np.arange(8.0), "b": np.arange(8.0) * 2}, path)
    (blob,) = data_files(path, "p")
    flip_byte(blob, 80)  # inside "b", the second leaf (16-byte aligned offsets)
    with pytest.raises(pc.CorruptCheckpointError, match=r"leaf 'b': checksum mismatch in packed blob"):
        pc.restore(path)
    # A restore that does not need the damaged leaf still works.
    tree, status = pc.restore(path, {"a": np.zeros(8)})
    np.testing.assert_array_equal(tree["a"], np.arange(8.0))


def test_format_2_checkpoints_restore_with_their_crc32_checked(tmp_path, monkeypatch):
    # Format 2 is format 4 (format 5 without its chunks' CRCs, weak types, mesh axis types
    # and devices) with zlib's CRC-32 for packed leaves (and no version in the body, as in
    # format 3): written here by the current writer told to write format 2, read by the
    # current reader as it is.
    import msgpack

    tree = {"a": np.arange(8.0), "b": jnp.arange(8.0) * 2, "w": jnp.ones((300, 300)), "n": 7}
    old, new = tmp_path / "old", tmp_path / "new"
    with monkeypatch.context() as m:
        m.setattr(_format, "FORMAT_VERSION", 2)
        pc.save(tree, old)
    pc.save(tree, new)
    versions = [msgpack.unpackb((p / _format.COMMIT_FILE).read_bytes())[1] for p in (old, new)]
    assert versions == [2, 6]
    assert pc.metadata(old).format_version == 2 and pc.metadata(new).format_version == 6
    # The packed bytes are the same; their checksums are of two kinds.
    assert data_files(old, "p")[0].read_bytes() == data_files(new, "p")[0].read_bytes()
    crcs = [_commit_crcs(p) for p in (old, new)]
    blob = data_files(new, "p")[0].read_bytes()
    assert crcs[0][0] == zlib.crc32(blob[:64]) and crcs[1][0] == google_crc32c.value(blob[:64])
    for path in (old, new):
        restored, status = pc.restore(path, tree)
        status.assert_consumed()
        jax.tree.map(np.testing.assert_array_equal, restored, tree)
    flip_byte(data_files(old, "p")[0], 80)
    with pytest.raises(pc.CorruptCheckpointError, match=r"leaf 'b': checksum mismatch"):
        pc.restore(old)
    # Overwriting a format-2 checkpoint replaces its data generation, as any other.
    (gen,) = [p.name for p in old.iterdir() if p.name.startswith("d-")]
    pc.save(tree, old, overwrite=True)
    assert gen not in [p.name for p in old.iterdir()]
    assert pc.metadata(old).format_version == 6


def test_a_flipped_format_version_is_refused(tmp_path):
    """The outer version is outside the commit file's checksum; the body repeats it. A
    format-6 file read as 2 or 3 would check its CRC-32C leaves as another kind (or none),
    read as 4 it would not check its chunks' places, and would drop its weak types and
    meshes, read as 5 it would read carried leaves from its own folder."""
    import msgpack

    path = tmp_path / "c"
    pc.save({"a": np.arange(8.0), "n": 7}, path)
    raw = (path / _format.COMMIT_FILE).read_bytes()
    magic, version, crc, body = msgpack.unpackb(raw)
    assert version == 6 and msgpack.unpackb(body)["version"] == 6
    for forged in (2, 3, 4, 5):
        (path / _format.COMMIT_FILE).write_bytes(msgpack.packb([magic, forged, crc, body]))
        for call in (pc.metadata, pc.restore):
            with pytest.raises(pc.CorruptCheckpointError,
                               match=rf"format version {forged}, but 6 in the body"):
                call(path)
    (path / _format.COMMIT_FILE).write_bytes(raw)
    assert pc.restore(path)[0]["n"] == 7


def _commit_crcs(path):
    import msgpack

    body = msgpack.unpackb(msgpack.unpackb((path / _format.COMMIT_FILE).read_bytes())[3])
    return np.frombuffer(body["crc"], "<u4").tolist()


def test_missing_array_chunk_is_an_error_not_zeros(tmp_path):
    path = tmp_path / "c"
    pc.save({"w": np.zeros((1024, 1024))}, path)  # all zeros: equal to the fill value
    chunks = data_files(path, "a")
    assert len(chunks) > 1
    os.remove(chunks[-1])
    with pytest.raises(pc.CorruptCheckpointError, match="leaf 'w'"):
        pc.restore(path)


def test_missing_packed_blob_names_the_leaf_and_spares_other_checkpoints(tmp_path):
    # A blob read as missing comes back empty: each of its leaves fails its checksum, the
    # first one named, instead of an array built from too few bytes.
    pc.save({"a": np.arange(8.0), "b": np.arange(8.0) * 2}, tmp_path / "c")
    pc.save({"a": np.arange(8.0)}, tmp_path / "other")
    (blob,) = data_files(tmp_path / "c", "p")
    os.remove(blob)
    with pytest.raises(pc.CorruptCheckpointError,
                       match=r"leaf 'a': checksum mismatch in packed blob 0 .*missing"):
        pc.restore(tmp_path / "c")
    tree, _ = pc.restore(tmp_path / "other")
    np.testing.assert_array_equal(tree["a"], np.arange(8.0))


HOSTILE_KEYS = ["../../etc", "/abs", "a/b", "..", "nul\x00byte", "ünï😀", "\\", "", "c\\/d"]


def test_hostile_keys_round_trip_and_never_leave_the_directory(tmp_path):
    tree = {k: {k: np.full(70000, i, np.float32)} for i, k in enumerate(HOSTILE_KEYS)}
    path = tmp_path / "inner" / "c"
    pc.save(tree, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inner"]
    assert sorted(p.name for p in (tmp_path / "inner").iterdir()) == ["c"]
    restored, status = pc.restore(path)
    status.assert_consumed()
    assert restored.keys() == tree.keys()
    for i, k in enumerate(HOSTILE_KEYS):
        np.testing.assert_array_equal(restored[k][k], np.full(70000, i, np.float32))
    restored, status = pc.restore(path, tree)
    status.assert_consumed()
    for name in (p.name for p in path.rglob("*")):
        assert name in {"checkpoint.msgpack", "zarr.json", "a", "p", "c"} or name.isdigit() \
            or name.startswith("d-"), name


def test_a_masked_array_is_refused_not_saved_without_its_mask(tmp_path):
    masked = np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False])
    with pytest.raises(pc.UnsupportedLeafError,
                       match=r"leaf 'x/m' is a numpy.ma.MaskedArray, whose mask would be lost"):
        pc.save({"x": {"m": masked}}, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    with pytest.raises(pc.UnsupportedLeafError, match="MaskedArray"):
        pc.save_async({"m": masked}, tmp_path / "c")
