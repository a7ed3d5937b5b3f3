"""Hand-picked forgeries of the commit file, beyond test_fuzz_commit.py's random ones: each is
re-encoded with a correct checksum and must end in a ``pc.CheckpointError`` (from
``_decode.decode``, or end to end from ``pc.restore`` with and without a target and
``pc.metadata``), or in a result that says what it restored, within seconds and in
bounded memory. Anything else escaping is a bug.

The cases that found bugs: PRNG implementations unknown here, or key data of another dtype
(a ValueError/TypeError from jax.random.wrap_key_data); values nested 1,000 deep in a record
(RecursionError from repr() in the error message); list children not named by an index
(ValueError from int() when rebuilding); a leaf path whose ancestors are not recorded (rebuild
invented every ancestor: quadratic, 360 MB for a 40 KB file, then RecursionError); and a
legitimate tree 600 deep, which saved but could not be restored without a target.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
import tracemalloc
import zlib

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from _commit_body import set_field

import pytree_ckpt as pc
from pytree_ckpt import _decode, _format

WHERE = "forged/checkpoint.msgpack"
# What a decode may take, in CPU seconds of this process (time.process_time: every thread's,
# so TensorStore's work counts and other processes' load does not): milliseconds, seconds
# under tracemalloc; a size- or count-driven blowup (what this guards against) takes minutes.
_SECONDS = 5.0


def _tree():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    return {
        "big": np.arange(300 * 300, dtype=np.float32).reshape(300, 300),
        "sharded": jax.device_put(jnp.arange(64.0).reshape(8, 8), sharded),
        "small": [np.arange(5), (np.float32(2.5), jnp.ones(3, jnp.bfloat16))],
        "key": jax.random.key(1),
        "py": {"i": 3, "s": "hi", "b": b"x", "n": None, "c": 1 + 2j, "big": 2**80},
    }


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    path = tmp_path_factory.mktemp("forged") / "c"
    pc.save(_tree(), path)
    raw = (path / _format.COMMIT_FILE).read_bytes()
    return path, raw, msgpack.unpackb(msgpack.unpackb(raw)[3])


def encode_body(body) -> bytes:
    packed = body if isinstance(body, bytes) else msgpack.packb(body, use_bin_type=True)
    return msgpack.packb([_format.MAGIC, _format.FORMAT_VERSION, zlib.crc32(packed), packed],
                         use_bin_type=True)


def decode_is_typed(data: bytes):
    start = time.process_time()
    try:
        return _decode.decode(data, WHERE)
    except pc.CheckpointError:
        return None
    finally:
        assert time.process_time() - start < _SECONDS


def all_records_are_typed(commit) -> None:
    """Leaf records are validated when first used: use them all."""
    try:
        list(commit.leaves.values())
    except pc.CheckpointError:
        pass


def end_to_end_is_typed(real, data: bytes, tmp_path) -> None:
    path = tmp_path / "c"
    shutil.copytree(real[0], path)
    (path / _format.COMMIT_FILE).write_bytes(data)
    for call in (lambda: pc.metadata(path), lambda: pc.restore(path),
                 lambda: pc.restore(path, _tree())):
        start = time.process_time()
        try:
            call()
        except pc.CheckpointError:
            pass
        finally:
            assert time.process_time() - start < _SECONDS


HOSTILE_RECORDS = [
    ("negative offset", "small/0", "storage", ["p", 0, -16, 0]),
    ("offset past the blob", "small/0", "storage", ["p", 0, 10**9, 0]),
    ("offset overflowing 64 bits", "small/0", "storage", ["p", 0, 2**64 - 8, 0]),
    ("no such blob", "small/0", "storage", ["p", 7, 0, 0]),
    ("crc out of range", "small/0", "storage", ["p", 0, 16, 2**32]),
    ("packed leaf ending past the blob", "small/0", "shape", [10**6]),
    ("unknown storage kind", "small/0", "storage", ["q", 0]),
    ("array stored as a value", "small/0", "storage", ["v", 1]),
    ("Python leaf with a shape", "py/i", "shape", [1]),
    ("Python leaf of an array dtype", "py/i", "dtype", "float32"),
    ("unknown origin", "big", "origin", "module"),
    ("huge shape, packed", "small/0", "shape", [2**31, 2**31]),
    ("huge shape, zarr", "big", "shape", [2**31, 2**31]),
    ("huge shape and one chunk", "big", "storage", ["z", 0, [2**31, 2**31], "float32"]),
    ("a billion tiny chunks", "big", "shape", [2**30, 300]),
    ("negative dimension", "big", "shape", [-300, 300]),
    ("empty, but too large to describe", "small/0", "shape", [0, 2**62, 2**62]),
    ("empty zarr array, too large to describe", "big", "shape", [0, 2**62, 2**62]),
    ("rank 65", "big", "shape", [1] * 65),
    ("zero chunk", "big", "storage", ["z", 0, [0, 300], "float32"]),
    ("no such array", "big", "storage", ["z", 5, [300, 300], "float32"]),
    ("stored dtype of another width", "big", "storage", ["z", 0, [300, 300], "float64"]),
    ("object dtype", "big", "dtype", "object"),
    ("unknown PRNG implementation", "key", "impl", "nonsense"),
    ("PRNG implementation that looks like a module", "key", "impl", "os.system"),
    ("PRNG key data of the wrong shape", "key", "shape", [3]),
    ("PRNG key data of the wrong dtype", "key", "dtype", "float32"),
    ("mesh bigger than a million devices", "sharded", "sharding",
     [[2**20, 2**20], ["a", "b"], ["a"]]),
    ("duplicate mesh axis names", "sharded", "sharding", [[2, 4], ["d", "d"], ["d"]]),
    ("one axis sharding two dimensions", "sharded", "sharding", [[8], ["d"], ["d", "d"]]),
    ("spec longer than the array's rank", "sharded", "sharding",
     [[8], ["d"], [None, None, "d"]]),
    ("unknown axis in the spec", "sharded", "sharding", [[8], ["d"], ["x"]]),
    ("uneven sharding", "sharded", "sharding", [[8], ["d"], ["d"]], [12, 8]),
    ("Python int as 5000 digits", "py/i", "storage", ["v", "9" * 5000]),
    ("deep Python value", "py/s", "storage", "deep"),
    ("deep shape", "big", "shape", "deep"),
    ("deep dtype", "big", "dtype", "deep"),
    ("path that is also a node", "py/s", "path", "py"),
    ("path whose parent is a leaf", "py/s", "path", "py/i/x"),
    ("path whose parent is missing", "py/s", "path", "nowhere/x"),
    ("list index that is not a number", "small/0", "path", "small/x"),
    ("list index of 5000 digits", "small/0", "path", "small/" + "9" * 5000),
    ("list index in unicode digits", "small/0", "path", "small/\u0663"),
    ("root leaf beside nodes", "py/s", "path", ""),
]
_TOP_LEVEL = [
    ("data folder outside", "data", "../../etc"),
    ("deep version", "version", "deep"),
    ("deep writer value", "writer", "deep"),
    ("node of unknown kind", "nodes", [["", "module", "os.system"]]),
    ("nodes without the root", "nodes", [["py", "dict", "builtins.dict"]]),
    ("duplicate node", "nodes", "duplicate"),
    ("list node with named children", "nodes", "py is a list"),
    ("deep node", "nodes", "deep"),
    ("a column as a list", "rank", [1, 2]),
    ("a truncated column", "offset", "truncate"),
    ("a column one byte longer", "storage", "extend"),
    ("codes past their table", "dtypes", []),
    ("a sharding table entry of another shape", "shardings", [["x"]]),
    ("Python values as a map", "values", {"a": 1}),
    ("paths that are not strings", "paths", "not strings"),
    ("a path twice", "paths", "duplicate"),
]


def _deep(n: int):
    value: list = []
    for _ in range(n):
        value = [value]
    return value


def _hostile_body(body, case):
    body = copy.deepcopy(body)
    if len(case) == 3:
        what, field, value = case
        if value == "duplicate":
            body[field] = body[field] + body[field][-1:]
        elif value == "py is a list":
            body[field] = [[p, "list" if p == "py" else k, t] for p, k, t in body[field]]
        elif value == "deep" and field == "writer":
            body[field] = dict(body[field], library=_deep(1000))
        elif value == "deep" and field == "nodes":
            body[field] = body[field] + [_deep(1000)]
        elif value == "truncate":
            body[field] = body[field][:-1]
        elif value == "extend":
            body[field] = body[field] + b"\x00"
        elif value == "not strings":
            body[field] = [p.encode() for p in body[field]]
        elif field == "version":
            return "version"
        else:
            body[field] = value
        return body
    what, leaf, field, value, *shape = case
    if value == "deep":
        value = ["v", _deep(1000)] if field == "storage" else _deep(1000)
    body = set_field(body, leaf, field, value)
    return set_field(body, leaf, "shape", shape[0]) if shape else body


@pytest.mark.parametrize("case", HOSTILE_RECORDS + _TOP_LEVEL, ids=lambda c: c[0])
def test_hostile_records(real, case, tmp_path):
    body = _hostile_body(real[2], case)
    if body == "version":
        raw = msgpack.unpackb(real[1])
        encoded = msgpack.packb([raw[0], _deep(1000), raw[2], raw[3]], use_bin_type=True)
    else:
        encoded = encode_body(body)
    commit = decode_is_typed(encoded)
    if commit is not None:
        all_records_are_typed(commit)
        end_to_end_is_typed(real, encoded, tmp_path)


_DECLARED = {
    "array32 of 2**32-1 items": b"\xdd\xff\xff\xff\xff",
    "map32 of 2**32-1 pairs": b"\xdf\xff\xff\xff\xff",
    "str32 of 4 GiB": b"\xdb\xff\xff\xff\xff",
    "bin32 of 4 GiB": b"\xc6\xff\xff\xff\xff",
    "100,000-deep arrays": b"\x91" * 100_000 + b"\xc0",
    "100,000-deep maps": b"\x81\xa1a" * 100_000 + b"\xc0",
    "a million empty arrays": b"\xdd\x00\x0f\x42\x40" + b"\x90" * 1_000_000,
}


@pytest.mark.parametrize("name", list(_DECLARED))
@pytest.mark.parametrize("where", ["file", "body", "leaf values"])
def test_huge_declared_sizes_and_deep_nesting(real, name, where):
    payload = _DECLARED[name]
    if where == "file":
        data = payload
    elif where == "body":
        data = encode_body(payload)
    else:
        body = msgpack.packb(real[2], use_bin_type=True)
        values = msgpack.packb(real[2]["values"], use_bin_type=True)
        assert body.count(values) == 1
        data = encode_body(body.replace(values, payload, 1))
    tracemalloc.start()
    try:
        commit = decode_is_typed(data)
        if commit is not None:  # what was spliced into a leaf record fails on first use
            with pytest.raises(pc.CorruptCheckpointError):
                list(commit.leaves.values())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Memory in proportion to the bytes there (~65 bytes per one-byte msgpack container),
    # never to the sizes or counts they declare.
    assert peak < 100 * len(data) + (1 << 20), (peak, len(data))


_RSS_CHILD = """
import json, resource, sys, time, zlib
import msgpack
import pytree_ckpt as pc
path, body_hex = sys.argv[1], sys.argv[2]
body = bytes.fromhex(body_hex)
raw = msgpack.packb(["pytree_ckpt", int(sys.argv[3]), zlib.crc32(body), body],
                    use_bin_type=True)
open(path + "/checkpoint.msgpack", "wb").write(raw)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.process_time()  # every thread's CPU time: what the work costs, whatever the load
out = {}
for name, call in (("metadata", lambda: pc.metadata(path)), ("restore", lambda: pc.restore(path))):
    try:
        call()
        out[name] = "returned"
    except pc.CheckpointError as e:
        out[name] = type(e).__name__
    except BaseException as e:
        out[name] = "UNTYPED " + type(e).__name__ + ": " + str(e)[:200]
out["seconds"] = time.process_time() - start
out["rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(out))
"""


@pytest.mark.parametrize("case", [c for c in HOSTILE_RECORDS if c[0] in (
    "huge shape, zarr", "huge shape and one chunk", "a billion tiny chunks")], ids=lambda c: c[0])
def test_huge_declared_shapes_end_to_end_in_bounded_memory(zygote, real, case, tmp_path):
    """In a fresh process (forked from a warm one): restore and metadata end in a typed error
    within seconds of CPU time, and peak RSS grows by less than 200 MB, though the declared
    arrays are terabytes."""
    path = tmp_path / "c"
    shutil.copytree(real[0], path)
    body = msgpack.packb(_hostile_body(real[2], case), use_bin_type=True)
    done = zygote.run(_RSS_CHILD, [path, body.hex(), _format.FORMAT_VERSION], timeout=120)
    assert done.returncode == 0, done
    result = json.loads(done.stdout)
    assert not any(str(v).startswith("UNTYPED") for v in result.values()), result
    assert result["restore"] != "returned", result
    assert result["seconds"] < 10 and result["rss_growth_mb"] < 200, result


@pytest.mark.parametrize("depth", [1_000, 20_000])
def test_a_path_without_recorded_ancestors_costs_nothing(real, depth):
    """A leaf ``a/a/.../x`` whose ancestors are not nodes: refused before anything rebuilds
    the tree (that would invent every ancestor: quadratic in the path's length)."""
    body = copy.deepcopy(real[2])
    body["paths"][0] = "a/" * depth + "x"
    data = encode_body(body)
    tracemalloc.start()
    try:
        with pytest.raises(pc.CorruptCheckpointError, match="its parent is not a recorded node"):
            _decode.tree_nodes(_decode.decode(data, WHERE), WHERE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100 * len(data) + (1 << 20), (peak, len(data))


def test_a_malformed_tree_is_refused_where_it_is_rebuilt_and_reported_where_matched(
        real, tmp_path):
    """A leaf whose parent is not a recorded node: metadata() and a restore without a target
    (which rebuild the tree) refuse it; a restore into a target, which only matches paths,
    lists the forged path as unused and the leaf it replaced as unmatched."""
    path = tmp_path / "c"
    shutil.copytree(real[0], path)
    (path / _format.COMMIT_FILE).write_bytes(
        encode_body(set_field(real[2], "py/s", "path", "nowhere/x")))
    for call in (pc.metadata, pc.restore):
        with pytest.raises(pc.CorruptCheckpointError, match="'nowhere/x': its parent is not"):
            call(path)
    target = _tree()
    restored, status = pc.restore(path, target)
    assert status.unused == ("nowhere/x",) and status.unmatched == ("py/s",)
    assert restored["py"]["s"] == "hi" and restored["py"]["i"] == 3
    np.testing.assert_array_equal(restored["big"], target["big"])


def test_a_packed_range_past_the_end_of_its_file_names_the_leaf(real, tmp_path):
    """A commit file claiming a blob longer than its file, and a leaf past the file's end
    (within the claimed size, so it decodes): TensorStore refuses the range read (a
    ValueError, OUT_OF_RANGE); the restore says which leaf could not be read."""
    path = tmp_path / "c"
    shutil.copytree(real[0], path)
    body = set_field(real[2], "small/0", "storage", ["p", 0, 2**31, 0])
    body["blobs"][0][2] = 2**40
    (path / _format.COMMIT_FILE).write_bytes(encode_body(body))
    for call in (pc.restore, lambda p: pc.restore(p, _tree())):
        with pytest.raises(pc.CorruptCheckpointError,
                           match=r"leaf 'small/0': cannot read its bytes from packed blob 0"):
            call(path)


def test_deep_trees_restore_without_a_target(tmp_path):
    """A tree as deep as save can flatten (~900 levels) restores without a target and has
    metadata (rebuilding it used to recurse twice per level: RecursionError past ~490)."""
    tree = 1
    for _ in range(900):
        tree = {"a": tree}
    pc.save(tree, tmp_path / "c")
    restored, _ = pc.restore(tmp_path / "c")
    assert restored == tree
    assert pc.metadata(tmp_path / "c").leaves["/".join(["a"] * 900)].value == 1


def test_a_tree_too_deep_to_flatten_is_a_typed_error_and_loses_nothing(tmp_path):
    pc.save({"w": 1}, tmp_path / "c")
    tree = 1
    for _ in range(5_000):  # JAX's own flatten fails here too
        tree = {"a": tree}
    with pytest.raises(pc.UnsupportedLeafError, match="nested too deep to flatten"):
        pc.save(tree, tmp_path / "c", overwrite=True)
    with pytest.raises(pc.UnsupportedLeafError, match="nested too deep to flatten"):
        pc.restore(tmp_path / "c", tree)
    assert pc.restore(tmp_path / "c")[0] == {"w": 1}


def test_a_null_in_the_shardings_table_is_named(real):
    # Code 0 is "no sharding"; a null entry in the table was a TypeError from its spec's length.
    body = copy.deepcopy(real[2])
    body["shardings"] = [*body["shardings"], None]
    with pytest.raises(pc.CorruptCheckpointError, match=r"bad 'shardings' list \(a null entry\)"):
        _decode.decode(encode_body(body), WHERE)
