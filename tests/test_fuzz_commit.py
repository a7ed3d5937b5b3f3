"""The commit file is untrusted input: fuzz its decoder and validator, and restore through it.

Every case must end in a ``pc.CheckpointError`` (any other exception escaping
``_decode.decode``, ``pc.restore`` or ``pc.metadata`` is a bug), or decode and restore
without returning wrong data, within a bounded time (each example's CPU time, which the load of
other processes does not stretch; pytest-timeout as the backstop).

- random bytes and random msgpack values;
- truncations and bit flips of a real commit file (arrays, packed leaves, Python leaves,
  nested nodes, a sharded array, a PRNG key);
- structured mutations *with a correct checksum*, so the validator itself is exercised:
  the real body is unpacked, one field is replaced (huge or negative sizes and offsets,
  wrong types, hostile paths, unknown kinds and dtypes, 100,000-deep msgpack nesting) and
  the file is re-packed with ``zlib.crc32(body)``; those that decode are restored end to
  end (``pc.restore`` with and without a target, ``pc.metadata``) from a real directory.

A packed leaf whose offset, size or checksum was changed must never come back with other
bytes: it raises. Set ``PYTREE_CKPT_FUZZ_EXAMPLES`` (default 150) to run more examples per
test, e.g. ``PYTREE_CKPT_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz_commit.py``.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import shutil
import time
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from _commit_body import from_rows, to_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pytree_ckpt as pc
from pytree_ckpt import _decode, _format, _graph

EXAMPLES = int(os.environ.get("PYTREE_CKPT_FUZZ_EXAMPLES", "150"))
# No wall-clock deadline: each example is bounded by its CPU time instead (cpu_bounded).
FAST = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=max(EXAMPLES // 3, 10), deadline=None,
                database=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.data_too_large])


def cpu_bounded(seconds: float):
    """Fails an example that takes more than ``seconds`` of this process's CPU time (every
    thread's: TensorStore's work counts, other processes' does not)."""

    def wrap(test):
        @functools.wraps(test)
        def bounded(*args, **kwargs):
            start = time.process_time()
            try:
                return test(*args, **kwargs)
            finally:
                used = time.process_time() - start
                assert used < seconds, f"{used:.1f} s of CPU time, more than {seconds} s"

        return bounded

    return wrap


class Pair(NamedTuple):
    x: Any
    y: Any


def make_tree():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    sharded = jax.device_put(jnp.arange(64 * 1024, dtype=jnp.float32).reshape(64, 1024) + 0.5,
                             jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    return {
        "params": {
            "big": jnp.arange(300 * 300, dtype=jnp.float32).reshape(300, 300) * 3 + 1,
            "sharded": sharded,
            "layers": [{"w": np.arange(16, dtype=np.float32) * (i + 1) + 7,
                        "b": np.arange(4, dtype=np.int64) - i} for i in range(4)],
        },
        "opt": (np.arange(30, dtype=np.float64) * 1.25 + 2, Pair(np.int32(7), jnp.ones(3))),
        "key": jax.random.key(3),
        "py": {"none": None, "t": True, "i": 2**70 + 3, "f": 0.5, "c": 1 + 2j, "s": "héllo",
               "b": b"\x00\xff"},
    }


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A real checkpoint: its directory, commit bytes, decoded outer and body, and the tree."""
    root = tmp_path_factory.mktemp("fuzz")
    tree = make_tree()
    pc.save(tree, root / "c")
    raw = (root / "c" / _format.COMMIT_FILE).read_bytes()
    magic, version, crc, body = msgpack.unpackb(raw)
    assert zlib.crc32(body) == crc
    return Real(root / "c", raw, msgpack.unpackb(body), tree)


class Real(NamedTuple):
    path: Any
    raw: bytes
    body: dict
    tree: Any


def repack(body: Any, body_bytes: bytes | None = None) -> bytes:
    if body_bytes is None:
        body_bytes = msgpack.packb(body, use_bin_type=True)
    return msgpack.packb([_format.MAGIC, _format.FORMAT_VERSION, zlib.crc32(body_bytes),
                          body_bytes], use_bin_type=True)


def decode_or_error(data: bytes) -> _format.Commit | None:
    """The decoded commit, or None when decode raised a CheckpointError (nothing else may)."""
    try:
        return _decode.decode(data, "x")
    except pc.CheckpointError as e:
        assert str(e).startswith("x"), e  # errors name the file
        return None


# ---- (a) random input ----

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=6)
    | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=30)


@FAST
@given(st.binary(max_size=4096))
@cpu_bounded(5)
def test_random_bytes(data):
    assert decode_or_error(data) is None


@FAST
@given(msgpack_values, st.booleans())
@cpu_bounded(5)
def test_random_msgpack_as_file_and_as_body(value, as_body):
    packed = msgpack.packb(value, use_bin_type=True)
    assert decode_or_error(repack(None, packed) if as_body else packed) is None


# ---- (b) truncations and bit flips of a real commit file ----

def test_every_truncation_is_refused(real):
    # Exhaustive, not sampled: a few thousand prefixes decode in well under a second.
    for n in range(len(real.raw)):
        assert decode_or_error(real.raw[:n]) is None, n
    assert decode_or_error(real.raw + b"\x00") is None  # trailing bytes


def test_every_single_bit_flip_is_refused(real):
    # Exhaustive too (~0.1 s): sampling found the one that got through once in many runs,
    # the outer format version 3 flipped to 2 (outside the checksum until format 4).
    for bit in range(8 * len(real.raw)):
        raw = bytearray(real.raw)
        raw[bit // 8] ^= 1 << (bit % 8)
        assert decode_or_error(bytes(raw)) is None, bit


@FAST
@given(st.data())
@cpu_bounded(5)
def test_bit_flips_are_refused(real, data):
    raw = bytearray(real.raw)
    bits = data.draw(st.lists(st.integers(0, 8 * len(raw) - 1), min_size=1, max_size=8,
                              unique=True))
    for b in bits:
        raw[b // 8] ^= 1 << (b % 8)
    assert decode_or_error(bytes(raw)) is None


# ---- (c) structured mutations with a correct checksum ----

DEEP = b"\x91" * 100_000 + b"\xc0"  # a list nested 100,000 deep
SENTINEL = "\x00deep-nesting-goes-here\x00"
HUGE = [2**62, 2**63 - 1, 2**64 - 1, -(2**63), -1, 2**31, 2**32, 2**62 + 1]
HOSTILE = ["", "..", "../..", "/abs", "a\x00b", "\\", "a\\", "\\x", "object", "O", "<U10",
           "|O", "V8", "S3", "float32", "int64", "uint8", "bool", "z", "p", "v", "py",
           "jax", "numpy", "dict", "list", "tuple", "none", "builtins.eval", "os.system",
           "d-" + "0" * 32, "d-" + "f" * 31, "d-../../etc"]
weird = (st.sampled_from(HUGE) | st.sampled_from(HOSTILE) | st.integers(-5, 70)
         | st.sampled_from([None, True, False, 0.5, math.nan, math.inf, [], {}, b"", [[]],
                            [2**62, 2**62], [2**31] * 3, [-1], [0, 2**62, 2**62],
                            [1] * 65, [1.0], ["a"], [None], {"a": 1}, SENTINEL])
         | msgpack_values)


def positions(value: Any, out: list | None = None) -> list[tuple[Any, Any]]:
    """Every (container, key) of ``value``'s nested lists and dicts."""
    out = [] if out is None else out
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for k, v in list(items):
        out.append((value, k))
        if isinstance(v, (list, dict)):
            positions(v, out)
    return out


def leaf_index(rows: list, path: str) -> int:
    return next(i for i, r in enumerate(rows) if r[0] == path)


def packed_paths(rows: list) -> list[str]:
    return [r[0] for r in rows if r[5][0] == "p"]


COLUMNS = ("origin", "dtype", "rank", "shape", "storage", "array", "chunks", "stored", "blob",
           "offset", "crc", "impl", "sharding")


def targeted(body: dict, data: st.DataObject) -> dict:
    """A mutation aimed at a field the validator must bound: of one leaf's record (written
    back as columns), of a column's bytes, or of the body."""
    rows = to_rows(body)
    what = data.draw(st.sampled_from([
        "shape", "dim", "offset", "crc", "blob", "path", "origin", "dtype", "stored",
        "chunks", "array_id", "node_kind", "node_path", "node_type", "arrays", "blob_size",
        "blob_count", "data", "sharding", "impl", "py_value", "extra_leaf", "dup_leaf",
        "drop_key", "deep", "column_byte", "column_length"]))
    i = data.draw(st.integers(0, len(rows) - 1))
    rec = rows[i]
    value = copy.deepcopy(data.draw(weird))  # sampled_from shares its objects
    if what == "shape":
        rec[3] = value
    elif what == "dim" and rec[3]:
        rec[3][data.draw(st.integers(0, len(rec[3]) - 1))] = value
    elif what in ("offset", "crc", "blob") and rec[5][0] == "p":
        rec[5][{"blob": 1, "offset": 2, "crc": 3}[what]] = value
    elif what == "path":
        rec[0] = value
    elif what == "origin":
        rec[1] = value
    elif what == "dtype":
        rec[2] = value
    elif what in ("stored", "chunks", "array_id") and rec[5][0] == "z":
        rec[5][{"array_id": 1, "chunks": 2, "stored": 3}[what]] = value
    elif what == "sharding":
        rec[6] = value
    elif what == "impl":
        rec[4] = value
    elif what == "py_value" and rec[1] == "py":
        rec[5][1] = value
    elif what == "extra_leaf":
        rows.append(copy.deepcopy(rec))
        rows[-1][0] = value
    elif what == "dup_leaf":
        rows.append(copy.deepcopy(rec))
    body = from_rows(body, rows)
    if what.startswith("node_"):
        node = body["nodes"][data.draw(st.integers(0, len(body["nodes"]) - 1))]
        node[{"node_path": 0, "node_kind": 1, "node_type": 2}[what]] = value
    elif what == "arrays":
        body["arrays"] = value
    elif what == "blob_size":
        body["blobs"][0][2] = value
    elif what == "blob_count":
        body["blobs"] = [[0, 0, 2**62]] * 1000
    elif what == "data":
        body["data"] = value
    elif what == "drop_key":
        del body[data.draw(st.sampled_from(sorted(body)))]
    elif what == "deep":
        body[data.draw(st.sampled_from(sorted(body)))] = SENTINEL
    elif what == "column_byte":
        key = data.draw(st.sampled_from(COLUMNS))
        if body[key]:
            raw = bytearray(body[key])
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(
                st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
            body[key] = bytes(raw)
    elif what == "column_length":
        key = data.draw(st.sampled_from(COLUMNS))
        body[key] = body[key][:-1] if data.draw(st.booleans()) else body[key] + b"\x01"
    return body


def mutate(real: Real, data: st.DataObject) -> bytes:
    body = copy.deepcopy(real.body)
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):
            try:
                body = targeted(body, data)
            except (TypeError, IndexError, KeyError, AttributeError, StopIteration,
                    ValueError):
                pass  # an earlier mutation changed the shape this one aims at
        else:  # anywhere at all
            where = positions(body)
            if where:
                container, key = where[data.draw(st.integers(0, len(where) - 1))]
                container[key] = copy.deepcopy(data.draw(weird))
    body_bytes = msgpack.packb(body, use_bin_type=True)
    sentinel = msgpack.packb(SENTINEL, use_bin_type=True)
    return repack(None, body_bytes.replace(sentinel, DEEP))


@FAST
@given(st.data())
@cpu_bounded(5)
def test_structured_mutations_decode_or_raise(real, data):
    decode_or_error(mutate(real, data))


@pytest.fixture(scope="module")
def scratch(real, tmp_path_factory):
    """A copy of the real checkpoint whose commit file the tests replace."""
    path = tmp_path_factory.mktemp("scratch") / "c"
    shutil.copytree(real.path, path)
    return path


def fingerprint(rec: _format.LeafRecord) -> tuple:
    """What a leaf is, apart from where its packed bytes lie (checked by their CRC)."""
    s = rec.storage
    loc = ((s.kind, s.index, s.chunks, s.stored_dtype) if s.kind == "z"
           else (s.kind, type(s.value), repr(s.value)) if s.kind == "v" else (s.kind,))
    return (rec.path, rec.origin, rec.dtype, rec.shape, rec.impl, loc)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
    if isinstance(a, (jax.Array, np.ndarray, np.generic)):
        return (type(a) is type(b) and np.asarray(a).dtype == np.asarray(b).dtype
                and np.asarray(a).tobytes() == np.asarray(b).tobytes()
                and np.shape(a) == np.shape(b))
    return type(a) is type(b) and a == b


def restore_checked(real: Real, scratch, raw: bytes) -> None:
    """Restores a commit file that decoded: errors must be CheckpointErrors, and every
    leaf whose description is unchanged (a packed leaf's location aside) must be exact."""
    (scratch / _format.COMMIT_FILE).write_bytes(raw)
    commit = _decode.decode(raw, "x")
    original = _decode.decode(real.raw, "x").leaves
    try:
        pc.metadata(scratch)
    except pc.CheckpointError:
        pass
    try:
        pc.restore(scratch)
    except pc.CheckpointError:
        pass
    try:
        restored, status = pc.restore(scratch, real.tree)
    except pc.CheckpointError:
        return
    flat = dict(zip(_graph.flatten(real.tree).paths, _graph.flatten(restored).leaves,
                    strict=True))
    want = dict(zip(_graph.flatten(real.tree).paths, _graph.flatten(real.tree).leaves,
                    strict=True))
    for path in status.matched:
        rec = commit.leaves.get(path)
        if rec is not None and path in original and fingerprint(rec) == fingerprint(
                original[path]):
            assert same(flat[path], want[path]), f"wrong data for {path!r}"


@SLOW
@given(st.data())
@cpu_bounded(20)
def test_structured_mutations_restore_end_to_end(real, scratch, data):
    raw = mutate(real, data)
    if decode_or_error(raw) is not None:
        restore_checked(real, scratch, raw)


@SLOW
@given(st.data())
@cpu_bounded(20)
def test_packed_leaf_location_mutations_never_return_wrong_data(real, scratch, data):
    rows = to_rows(real.body)
    path = data.draw(st.sampled_from(packed_paths(rows)))
    storage = rows[leaf_index(rows, path)][5]
    field = data.draw(st.sampled_from([2, 3]))  # offset, crc
    old = storage[field]
    storage[field] = data.draw(st.integers(0, 2**32 - 1).filter(lambda v: v != old)
                               | st.sampled_from([old + 1, old - 1, old + 16, old - 16, 0]))
    if storage[field] == old:
        return
    raw = repack(from_rows(real.body, rows))
    if decode_or_error(raw) is None:
        return  # refused by the validator (e.g. past the blob's end)
    (scratch / _format.COMMIT_FILE).write_bytes(raw)
    try:
        restored, status = pc.restore(scratch, real.tree)
    except pc.CorruptCheckpointError as e:
        assert f"leaf {path!r}" in str(e), e  # the error names the damaged leaf
        return
    # Only possible when the other bytes are the same bytes (e.g. the same values elsewhere).
    got = dict(zip(_graph.flatten(restored).paths, _graph.flatten(restored).leaves, strict=True))
    want = dict(zip(_graph.flatten(real.tree).paths, _graph.flatten(real.tree).leaves,
                    strict=True))
    assert same(got[path], want[path]), f"wrong data for {path!r}"


def _with_leaf(body: dict, path: str, field: int, value: Any) -> dict:
    rows = to_rows(body)
    rows[leaf_index(rows, path)][field] = value
    return from_rows(body, rows)


def _with_packed(body: dict, field: int, value: Any) -> dict:
    rows = to_rows(body)
    rows[leaf_index(rows, packed_paths(rows)[0])][5][field] = value
    return from_rows(body, rows)


def test_hand_picked_forgeries_end_to_end(real, scratch):
    """A few named cases through restore and metadata, on a real directory."""
    body = real.body
    cases = {
        "huge shape": _with_leaf(body, "params/big", 3, [2**62, 2**62]),
        "object dtype": _with_leaf(body, "params/big", 2, "O"),
        "dotdot data": dict(body, data="../../etc"),
        "unknown node kind": dict(body, nodes=[["", "os.system", "x"], *body["nodes"][1:]]),
        "offset past blob": _with_packed(body, 2, body["blobs"][0][2]),
        "negative offset": _with_packed(body, 2, -16),
        "huge array count": dict(body, arrays=2**40),
    }
    for bad_sharding in ([[2, 4], ["d", "d"], ["d"]], [[8], ["d"], ["d", "d"]],
                         [[8], ["d"], [None, ["d", "d"]]], [[8], ["d"], ["d", None, None]]):
        cases[f"sharding {bad_sharding}"] = _with_leaf(body, "params/sharded", 6, bad_sharding)
    raws = {name: repack(b) for name, b in cases.items()}
    raws["deep body"] = repack(None, DEEP)
    for _name, raw in raws.items():
        (scratch / _format.COMMIT_FILE).write_bytes(raw)
        for call in (pc.restore, pc.metadata, lambda p: pc.restore(p, real.tree)):
            with pytest.raises(pc.CheckpointError, match=r"."):
                call(scratch)


def test_hostile_leaf_paths_stay_names(real, scratch):
    # A path is only a name to match by (never a storage key): a forged name such as
    # "/etc/passwd" or ".." comes back as a name in the tree, and nothing outside the
    # checkpoint is touched. (Names are escaped: "\\/" is a "/" inside one name.)
    for hostile in ("py/\\/etc\\/passwd", "py/..", "py/a\x00b", "py/\\\\"):
        (scratch / _format.COMMIT_FILE).write_bytes(repack(_with_leaf(real.body, "py/s", 0,
                                                                       hostile)))
        before = sorted(os.listdir(scratch.parent))
        tree, status = pc.restore(scratch)
        assert hostile in status.matched
        assert _graph.split_path(hostile)[1] in tree["py"]
        assert sorted(os.listdir(scratch.parent)) == before
        assert pc.metadata(scratch).leaves[hostile].value == "héllo"
    # Unescaped, such a path names ancestors that are not recorded nodes: corrupt.
    for hostile in ("/etc/passwd", "../../x"):
        (scratch / _format.COMMIT_FILE).write_bytes(repack(_with_leaf(real.body, "py/s", 0,
                                                                       hostile)))
        with pytest.raises(pc.CorruptCheckpointError, match="its parent is not a recorded node"):
            pc.restore(scratch)


def test_unmutated_round_trip_of_the_scratch_copy(real, scratch):
    (scratch / _format.COMMIT_FILE).write_bytes(real.raw)
    restored, status = pc.restore(scratch, real.tree)
    status.assert_consumed()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(real.tree), strict=True):
        assert same(a, b)
