"""pc.verify reads every byte and checks every checksum and binding; restore checks the
binding of every chunk it reads. The four ways a whole chunk can be in the wrong place (each
restored silently wrong values before format 5): a chunk copied from another checkpoint of
the same shape, two chunks of one leaf swapped, two leaves' arrays swapped, and another
checkpoint's generation folder copied in place of this one's."""

from __future__ import annotations

import json
import os
import shutil
import zlib

import msgpack
import numpy as np
import pytest

import pytree_ckpt as pc
from pytree_ckpt import _format


def _tree(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        # 8 MB each: two chunks of 4 MB, rows 0-999 and 1000-1999
        "a": rng.standard_normal((2000, 1000)).astype(np.float32),
        "b": rng.standard_normal((2000, 1000)).astype(np.float32),
        "small": {"bias": np.arange(10.0) + seed, "n": 3, "name": "x"},
    }


@pytest.fixture
def two(tmp_path):
    """Two checkpoints of one shape and different values."""
    paths = tmp_path / "one", tmp_path / "two"
    for seed, path in enumerate(paths):
        pc.save(_tree(seed), path)
    return paths


def _generation(path) -> str:
    (gen,) = [p for p in os.listdir(path) if p.startswith("d-")]
    return os.path.join(path, gen)


def _chunk(path, array: int, row: int) -> str:
    return os.path.join(_generation(path), "a", str(array), "c", str(row), "0")


def _swap(x: str, y: str) -> None:
    os.rename(x, x + ".swap")
    os.rename(y, x)
    os.rename(x + ".swap", y)


def _chunk_from_another_checkpoint(one, two):
    shutil.copyfile(_chunk(two, 0, 1), _chunk(one, 0, 1))
    return ["a"]


def _chunks_of_a_leaf_swapped(one, two):
    _swap(_chunk(one, 0, 0), _chunk(one, 0, 1))
    return ["a"]


def _arrays_of_two_leaves_swapped(one, two):
    gen = _generation(one)
    _swap(os.path.join(gen, "a", "0"), os.path.join(gen, "a", "1"))
    return ["a", "b"]


def _generation_of_another_checkpoint(one, two):
    gen = _generation(one)
    shutil.rmtree(gen)
    shutil.copytree(_generation(two), gen)
    # The packed leaves of the other checkpoint fail their checksums in the commit file.
    return ["a", "b", "small/bias"]


CASES = {
    "a chunk copied from another checkpoint": _chunk_from_another_checkpoint,
    "two chunks of one leaf swapped": _chunks_of_a_leaf_swapped,
    "two leaves' arrays swapped": _arrays_of_two_leaves_swapped,
    "another checkpoint's generation in place of this one's": _generation_of_another_checkpoint,
}


def test_an_intact_checkpoint_verifies(two):
    report = pc.verify(two[0])
    assert report.ok and report.problems == {}
    assert report.path == str(two[0]) and report.format_version == _format.FORMAT_VERSION
    assert report.leaf_count == 5
    assert report._fields == ("path", "format_version", "leaf_count", "bytes_read", "problems")
    data = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(two[0]) for f in fs)
    assert report.bytes_read == data  # every file, each once
    assert pc.verify(two[0], strict=True) == report
    with pytest.raises(TypeError, match="raise_on_error"):
        pc.verify(two[0], raise_on_error=True)


@pytest.mark.parametrize("case", list(CASES))
def test_verify_finds_every_chunk_out_of_place(two, case):
    bad = CASES[case](*two)
    report = pc.verify(two[0])
    assert sorted(report.problems) == sorted(bad), report.problems
    for path in bad:
        if path != "small/bias":
            assert "is not the chunk this checkpoint wrote there" in report.problems[path]
    names = "; ".join(f"'{p}': " for p in sorted(bad))
    with pytest.raises(pc.CorruptCheckpointError,
                       match=rf"{len(bad)} bad leaf/leaves of 5: '{sorted(bad)[0]}': "):
        pc.verify(two[0], strict=True)
    try:
        pc.verify(two[0], strict=True)
    except pc.CorruptCheckpointError as e:
        assert all(n in str(e) for n in names.split("; ")), str(e)


@pytest.mark.parametrize("case", list(CASES))
def test_restore_finds_every_chunk_out_of_place(two, case):
    CASES[case](*two)
    with pytest.raises(pc.CorruptCheckpointError,
                       match=r"leaf '(a|b|small/bias)': (chunk \(\d, 0\) is not the chunk this "
                             r"checkpoint wrote there|checksum mismatch)"):
        pc.restore(two[0])
    with pytest.raises(pc.CorruptCheckpointError,
                       match=r"leaf '(a|b)': chunk \(\d, 0\) is not the chunk this checkpoint"):
        pc.restore(two[0], {"a": np.zeros((2000, 1000), np.float32),
                            "b": np.zeros((2000, 1000), np.float32)})


def test_restore_checks_only_the_chunks_it_reads(two):
    """A resharded or partial read checks the trailers of the chunks it reads: a swap in
    leaf 'a' does not stop a restore of 'b' alone."""
    _chunks_of_a_leaf_swapped(*two)
    tree, status = pc.restore(two[0], {"b": np.zeros((2000, 1000), np.float32)})
    np.testing.assert_array_equal(tree["b"], _tree(0)["b"])


def test_verify_finds_damaged_bytes_and_a_zarr_json_that_disagrees(two):
    one = two[0]
    with open(_chunk(one, 1, 1), "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    meta_path = os.path.join(_generation(one), "a", "0", "zarr.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["shape"] = [1000, 2000]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    (blob,) = [os.path.join(r, f) for r, _, fs in os.walk(_generation(one)) if "/p/" in r + "/"
               for f in fs]
    with open(blob, "r+b") as f:
        f.write(b"\xff")
    report = pc.verify(one)
    assert report.problems == {
        "a": f"{os.path.relpath(meta_path, one)} describes shape, chunks and dtype "
             "([1000, 2000], [1000, 1000], 'float32'); the commit file says ([2000, 1000], "
             "[1000, 1000], 'float32')",
        "b": f"chunk (1, 0) ({os.path.relpath(_chunk(one, 1, 1), one)}): checksum mismatch "
             "(the stored bytes are damaged)",
        "small/bias": f"checksum mismatch in packed blob 0 ({os.path.relpath(blob, one)}, "
                      "bytes 0 to 80)",
    }
    # Restore takes shapes from the commit file, never zarr.json: "a" restores.
    tree, _ = pc.restore(one, {"a": np.zeros((2000, 1000), np.float32)})
    np.testing.assert_array_equal(tree["a"], _tree(0)["a"])


def test_a_format_4_checkpoint_restores_and_verifies_without_bindings(two):
    """Format 4 recorded no chunk's place: it still restores and verifies (each chunk
    against its own checksum), and a swap inside a leaf goes unseen, as it did."""
    one = two[0]
    raw = (one / _format.COMMIT_FILE).read_bytes()
    magic, _, _, body = msgpack.unpackb(raw)
    fields = msgpack.unpackb(body)
    fields["version"] = 4
    del fields["chunk_crc"]
    body = msgpack.packb(fields, use_bin_type=True)
    (one / _format.COMMIT_FILE).write_bytes(
        msgpack.packb([magic, 4, zlib.crc32(body), body], use_bin_type=True))
    tree, status = pc.restore(one)
    np.testing.assert_array_equal(tree["a"], _tree(0)["a"])
    report = pc.verify(one)
    assert report.ok and report.format_version == 4
    _chunks_of_a_leaf_swapped(*two)
    assert pc.verify(one).ok
    tree, _ = pc.restore(one)
    assert not np.array_equal(tree["a"], _tree(0)["a"])


def test_verify_refuses_another_tools_checkpoint_naming_its_format(tmp_path):
    import flax.serialization
    import orbax.checkpoint as ocp
    from safetensors.numpy import save_file

    tree = {"w": np.arange(6.0).reshape(2, 3), "b": np.ones(3)}
    save_file({k: v.astype(np.float32) for k, v in tree.items()}, str(tmp_path / "m.safetensors"))
    (tmp_path / "state.msgpack").write_bytes(flax.serialization.to_bytes(tree))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "orbax", tree)
    checkpointer.wait_until_finished()
    for name, what in [("m.safetensors", "a safetensors file"),
                       ("state.msgpack", "a Flax msgpack file"), ("orbax", "an Orbax checkpoint")]:
        path = tmp_path / name
        with pytest.raises(pc.NotACheckpointError, match=(
                f"^{path}: {what}, not a pytree_ckpt checkpoint: verify checks the checksums "
                "a pytree_ckpt checkpoint records, and this format records none")):
            pc.verify(path)
    # A safetensors header that does not fit its file: corrupt, not merely foreign.
    damaged = (tmp_path / "m.safetensors").read_bytes()[:-8]
    (tmp_path / "short.safetensors").write_bytes(damaged)
    with pytest.raises(pc.CorruptCheckpointError, match="short.safetensors"):
        pc.verify(tmp_path / "short.safetensors")
    with pytest.raises(pc.CheckpointNotFoundError, match="not a checkpoint"):
        pc.verify(tmp_path)
