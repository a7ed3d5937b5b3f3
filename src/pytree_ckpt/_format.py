"""The commit file: its encoding, written down here beside the code, and its validation.

Layout of a checkpoint at ``<path>``::

    <path>/checkpoint.msgpack       the commit file, written LAST: its presence = committed
    <path>/d-<32 hex>/a/<id>/       one zarr3 array per large leaf (chunks with crc32c)
    <path>/d-<32 hex>/p/<proc>/<k>  packed small leaves: blobs of a few MiB per writing process

Storage keys are ids assigned by the writer (``a/17``, ``p/0/3``); no user string ever becomes
a storage key, so a dict key such as ``../../etc`` cannot leave the checkpoint directory. The
data lives in a generation folder ``d-<hex>`` named by the commit file, so an overwrite
writes a new generation next to the old one and replaces the commit file in one atomic
step; the old generation is deleted only after that.

The commit file is msgpack. Its outer value is a 4-element array::

    ["pytree_ckpt", FORMAT_VERSION, crc32(body), body]

where ``body`` (bytes) is itself msgpack of a map. Leaves are stored **by column**: one
entry per field, holding that field for every leaf, numbers as little-endian binary
(``u1`` uint8, ``u4`` uint32, ``i8`` int64). A 10,000-leaf commit file then decodes into
a few dozen objects instead of 100,000, and is validated with NumPy, not leaf by leaf.
With ``n`` leaves in save order::

    "version":   FORMAT_VERSION                 the outer version again, under the checksum
    "data":      "d-<hex>"                      generation folder holding arrays and blobs
    "nodes":     [[path, kind, type_name], ...] inner nodes, root first (_graph.NODE_KINDS)
    "paths":     [str] * n                      leaf paths (escaped, see _graph)
    "origin":    u1[n]                          index into ORIGINS: jax numpy npscalar prngkey py
    "dtype":     u1[n]                          index into "dtypes"
    "dtypes":    [str]                          dtype names (_leaves.DTYPES), or Python leaf
                                                types (_leaves.PY_TYPES) for py leaves
    "rank":      u1[n]
    "shape":     i8[sum(rank)]                  every leaf's dimensions, one after another
    "storage":   u1[n]                          0 value, 1 zarr array, 2 packed
    "values":    [value] per storage-0 leaf     a Python leaf's value (_leaves.encode_py):
                                                an int past 64 bits as bytes (two's
                                                complement, little-endian; from version 5)
                                                or decimal text (before), complex as a pair
    "array":     u4[z]  per storage-1 leaf      its zarr array a/<array>
    "chunks":    i8[sum(rank of those leaves)]  their chunk shapes, one after another
    "stored":    u1[z]                          index into "dtypes": the dtype stored
    "blob":      u4[p]  per storage-2 leaf      index into "blobs"
    "offset":    i8[p]                          bytes [offset, offset + nbytes) of that blob,
    "crc":       u4[p]                          with their CRC-32C; nbytes = shape x itemsize
    "impl":      u1[n]                          0, or 1 + index into "impls" (PRNG keys)
    "impls":     [str]                          PRNG implementation names
    "sharding":  u4[n]                          0, or 1 + index into "shardings"
    "shardings": [[mesh_shape, axis_names, partition_spec, axis_types, device_ids], ...]
    "weak":      u1[n]                          1 for a weakly typed jax.Array, else 0
    "blobs":     [[proc, k, nbytes], ...]       packed blob n is p/<proc>/<k>, nbytes long
    "arrays":    count                          zarr arrays are a/0 .. a/<count-1>
    "writer":    {"library": ..., "jax": ..., "tensorstore": ..., "processes": int, "time": float}
    "chunk_crc": u4[sum of chunk counts]        (from version 5) every zarr leaf's chunks'
                                                CRC-32C, as their crc32c trailers hold them,
                                                leaf after leaf, each leaf's in C order of
                                                its chunk grid: binds each chunk to this
                                                commit, leaf and position (see _binding)

A partition spec's entries are None, a name, or a list of names; the saved sharding is
recorded for display and as the default layout on restore. ``axis_types`` names each mesh
axis's ``jax.sharding.AxisType`` ("Auto", "Explicit" or "Manual"); ``device_ids`` are the
mesh's device ids in mesh order (``mesh.devices.flat``), so a restore onto the same devices
gets the same layout (a mesh of ``jax.make_mesh`` orders its devices by topology). The
``stored`` dtype differs from ``dtype`` only where TensorStore lacks the dtype; the bytes
are then stored as unsigned integers of the same width. Packed leaves carry CRC-32C, as the
zarr3 chunks do (their crc32c codec); the commit file's own checksum is zlib's CRC-32. The
reader treats every field as untrusted. The body repeats the version (from version 4): the
outer one, which says how to read the rest, is outside the checksum, and a flipped bit there
once read a version-3 file as version 2. Version 4 is this layout without ``chunk_crc``
(its chunks are bound to nothing: restore and verify check each chunk against its own
trailer only), without ``weak`` (no leaf weakly typed) and with sharding records of three
entries (no axis types: Auto; no device ids); version 3 that without the body's version,
version 2 that with zlib's CRC-32 for packed leaves (~5x slower to compute than CRC-32C);
all are still read, and a
body's version, where there is one, must match. Version 1 (one record per leaf)
was written by pre-release versions only; it is refused with a FormatVersionError.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import reprlib
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import google_crc32c
import msgpack
import numpy as np

from . import _gc, _graph, _leaves, _storage
from ._errors import CorruptCheckpointError, FormatVersionError

MAGIC = "pytree_ckpt"
FORMAT_VERSION = 5
READ_VERSIONS = (2, 3, 4, 5)
# google_crc32c's C extension reads any C-contiguous array's bytes, whatever its dtype (so
# restore checks a leaf in the array it returns, ~0.6 µs a leaf less than through a uint8
# view); its pure-Python fallback iterates items, so it is given bytes.
_CRC32C = (google_crc32c.value if google_crc32c.implementation == "c"
           else lambda data: google_crc32c.value(bytes(data)))
# A packed leaf's checksum per format version, of a C-contiguous NumPy array of its bytes
# (google_crc32c takes no memoryview).
LEAF_CRC = {2: zlib.crc32, 3: _CRC32C, 4: _CRC32C, 5: _CRC32C}
COMMIT_FILE = "checkpoint.msgpack"
# ~50 bytes a leaf: room for millions of leaves, and decoding a forged file of this size
# takes at most a few GB (see _body_limits).
MAX_COMMIT_BYTES = 256 << 20
_GEN_RE = re.compile(r"d-[0-9a-f]{32}")
_MAX_RANK = 64
_MAX_ELEMENTS = 1 << 62


class Storage(NamedTuple):
    """Where a leaf's value lives: inline (py), in a zarr array, or in a packed blob."""

    kind: str  # "v", "z" or "p"
    value: Any = None  # "v": the decoded Python value
    index: int = 0  # "z": array id; "p": blob number
    chunks: tuple[int, ...] = ()  # "z"
    stored_dtype: str = ""  # "z"
    offset: int = 0  # "p"
    nbytes: int = 0  # "p"
    crc: int = 0  # "p"


AXIS_TYPES = ("Auto", "Explicit", "Manual")  # jax.sharding.AxisType names


class SavedSharding(NamedTuple):
    """A leaf's saved ``NamedSharding``: its mesh and partition spec."""

    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    spec: tuple  # entries: None, an axis name, or a tuple of names
    axis_types: tuple[str, ...] | None = None  # AXIS_TYPES names; None before format 5
    device_ids: tuple[int, ...] | None = None  # in mesh order; None before format 5


class LeafRecord(NamedTuple):
    """One saved leaf, as described by the commit file."""

    path: str
    origin: str
    dtype: str
    shape: tuple[int, ...]
    impl: str | None
    storage: Storage
    sharding: SavedSharding | None
    weak: bool = False  # a weakly typed jax.Array (a jitted ``step + 1``)


_STORAGE = functools.partial(tuple.__new__, Storage)  # Storage(*fields), all of them
_RECORD = functools.partial(tuple.__new__, LeafRecord)


class Commit(NamedTuple):
    """A decoded, validated commit file."""

    data: str
    nodes: tuple[_graph.Node, ...]
    leaves: Mapping[str, LeafRecord]
    blobs: tuple[tuple[int, int, int], ...]  # (process, part, nbytes)
    arrays: int
    writer: dict[str, Any]
    version: int  # the format it is read as / written in

    def chunk_crcs(self, path: str) -> np.ndarray | None:
        """The recorded CRC-32C of each chunk of zarr leaf ``path`` (see _binding), in C order
        of its chunk grid; None before format 5, or for a commit not read from a file."""
        leaves = self.leaves
        return leaves.chunk_crcs(path) if isinstance(leaves, _Columns) else None

    def blob_key(self, blob: int) -> str:
        proc, part, _ = self.blobs[blob]
        return f"{self.data}/p/{proc}/{part}"

    def tree_nodes(self, where: str) -> tuple[_graph.Node, ...]:
        """``nodes``, once they and the leaves form one tree (``where`` names the file in
        errors; see :func:`_validate_tree`). Checked by what rebuilds the tree from them
        (metadata, restore without a target) rather than by :func:`decode`: matching a
        target's paths never walks the tree (~1.7 ms of a 10,000-leaf restore or at=)."""
        _validate_tree(self.nodes, self.leaves, where)
        return self.nodes


ORIGINS = (_leaves.JAX, _leaves.NUMPY, _leaves.NPSCALAR, _leaves.PRNGKEY, _leaves.PY)
_ORIGIN_CODE = {o: i for i, o in enumerate(ORIGINS)}
_ORIGINS = np.array(ORIGINS, object)  # codes to names as a whole column
_PY_CODE, _PRNG_CODE = _ORIGIN_CODE[_leaves.PY], _ORIGIN_CODE[_leaves.PRNGKEY]
_JAX_CODE = _ORIGIN_CODE[_leaves.JAX]
_KINDS = ("v", "z", "p")  # storage codes 0, 1, 2
_KIND_CODE = {k: i for i, k in enumerate(_KINDS)}
_VALUE, _ZARR, _PACKED = range(3)


def encode(commit: Commit, chunk_crc: Sequence[int] = ()) -> bytes:
    """The commit file's bytes for ``commit``; ``chunk_crc``: from format 5, every zarr
    leaf's chunks' CRC-32C, leaf after leaf in commit order (see _binding)."""
    dtypes: dict[str, int] = {}
    impls: dict[str, int] = {}
    shardings: dict[tuple, int] = {}
    paths, origin, dtype, rank, dims, kind, impl, sharding = [], [], [], [], [], [], [], []
    weak: list[bool] = []
    values, array, chunks, stored, blob, offset, crc = [], [], [], [], [], [], []
    for r in commit.leaves.values():
        s = r.storage
        paths.append(r.path)
        origin.append(_ORIGIN_CODE[r.origin])
        dtype.append(dtypes.setdefault(r.dtype, len(dtypes)))
        rank.append(len(r.shape))
        dims += r.shape
        kind.append(_KIND_CODE[s.kind])
        impl.append(0 if r.impl is None else impls.setdefault(r.impl, len(impls)) + 1)
        sharding.append(0 if r.sharding is None
                        else shardings.setdefault(r.sharding, len(shardings)) + 1)
        weak.append(r.weak)
        if s.kind == "v":
            values.append(_leaves.encode_py(s.value, commit.version))
        elif s.kind == "z":
            array.append(s.index)
            chunks += s.chunks
            stored.append(dtypes.setdefault(s.stored_dtype, len(dtypes)))
        else:
            blob.append(s.index)
            offset.append(s.offset)
            crc.append(s.crc)

    def column(x: list, fmt: str) -> bytes:
        return np.asarray(x, dtype=fmt).tobytes()

    body = msgpack.packb(
        {
            **({"version": commit.version} if commit.version >= 4 else {}),
            "data": commit.data,
            "nodes": [list(n) for n in commit.nodes],
            "paths": paths, "origin": column(origin, "u1"), "dtype": column(dtype, "u1"),
            "dtypes": list(dtypes), "rank": column(rank, "u1"), "shape": column(dims, "<i8"),
            "storage": column(kind, "u1"), "values": values,
            "array": column(array, "<u4"), "chunks": column(chunks, "<i8"),
            "stored": column(stored, "u1"),
            "blob": column(blob, "<u4"), "offset": column(offset, "<i8"),
            "crc": column(crc, "<u4"),
            "impl": column(impl, "u1"), "impls": list(impls),
            "sharding": column(sharding, "<u4"),
            "shardings": [_encode_sharding(x, commit.version) for x in shardings],
            **({"weak": column(weak, "u1")} if commit.version >= 5 else {}),
            "blobs": [list(b) for b in commit.blobs],
            "arrays": commit.arrays,
            "writer": commit.writer,
            **({"chunk_crc": column(list(chunk_crc), "<u4")} if commit.version >= 5 else {}),
        },
        use_bin_type=True,
    )
    return msgpack.packb([MAGIC, commit.version, zlib.crc32(body), body], use_bin_type=True)


def _encode_sharding(s: SavedSharding, version: int) -> list:
    head = [list(s.mesh_shape), list(s.axis_names), [list(e) if isinstance(e, tuple) else e
                                                     for e in s.spec]]
    if version < 5:
        return head
    return [*head, list(s.axis_types or ()), list(s.device_ids or ())]


class _Budget:
    """Counts what msgpack builds for containers, as ``list_hook`` and ``object_pairs_hook``,
    and stops the unpacking once that passes ``limit`` bytes.

    msgpack's ``max_*_len`` limits bound each container by the bytes there, but a one-byte
    empty array becomes a 56-byte list plus its slot in the parent: a file of empty arrays
    cost 71x its size before validation could refuse it. Containers are the only such
    amplification (a string costs its bytes plus ~50, as a path does in any commit file)."""

    def __init__(self, limit: int):
        self.left = limit

    def spend(self, size: int) -> None:
        self.left -= 64 + 8 * size  # the object and its slot, roughly
        if self.left < 0:
            raise ValueError("more containers than a commit file of this size can hold")

    def list(self, items: list) -> list:
        self.spend(len(items))
        return items

    def map(self, pairs: list) -> dict:
        self.spend(2 * len(pairs))
        return dict(pairs)


class _Limits(NamedTuple):
    """What unpacking one msgpack value may build: the longest array and map (msgpack
    allocates a container of the declared length before reading its items) and, in bytes,
    all containers together (see :class:`_Budget`)."""

    array: int
    map: int
    containers: int


def _unpack(data: bytes, where: str, limits: _Limits) -> Any:
    """``data`` unpacked within ``limits``, or a CorruptCheckpointError. Explicit limits: the
    commit file is untrusted, and msgpack would otherwise size its containers from declared
    lengths."""
    limit = len(data)
    budget = _Budget(limits.containers)
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_str_len=limit, max_bin_len=limit,
            max_array_len=limits.array, max_map_len=limits.map, max_ext_len=0,
            list_hook=budget.list, object_pairs_hook=budget.map,
        )
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise CorruptCheckpointError(f"{where}: not a valid commit file ({e})") from None


# The outer array: four scalars.
_OUTER = _Limits(array=4, map=0, containers=1 << 10)


def _body_limits(body: bytes) -> _Limits:
    """Limits a body the writer made stays within, whatever its tree: every leaf takes at
    least 8 bytes of the body (its path, codes and columns), so no list (paths, values,
    nodes) is longer than a 1/8 of it; the body's map and the writer's have a few dozen
    keys; and each container (a node record, a complex value, a blob or sharding record)
    comes with enough bytes of its own and its leaves' that all of them take less than 6x
    the body. A forged body of empty arrays is then refused at ~7x its size, where it took
    71x."""
    return _Limits(array=len(body) // 8 + 64, map=256, containers=6 * len(body) + (64 << 10))


def decode(data: bytes, where: str) -> Commit:
    """Decodes and validates commit file bytes; ``where`` names the file in errors.

    Raises :class:`CorruptCheckpointError` for anything malformed (with the leaf's path where
    it applies) and :class:`FormatVersionError` for a version this library cannot read.
    """
    if len(data) > MAX_COMMIT_BYTES:
        raise CorruptCheckpointError(f"{where}: commit file of {len(data)} bytes is too large")
    with _gc.paused():  # a file of a million empty arrays: 0.08 s, not 0.5 s
        outer = _unpack(data, where, _OUTER)
    if not (isinstance(outer, list) and len(outer) == 4 and outer[0] == MAGIC):
        raise CorruptCheckpointError(f"{where}: not a pytree_ckpt commit file")
    _, version, crc, body = outer
    if version not in READ_VERSIONS or type(version) is not int:
        advice = ("an older format, written by pre-release versions only: restore it with "
                  "one of those" if type(version) is int and
                  0 < version < READ_VERSIONS[0] else
                  "upgrade pytree_ckpt to read newer checkpoints")
        raise FormatVersionError(
            f"{where}: format version {_show(version)}; this pytree_ckpt reads versions "
            f"{READ_VERSIONS[0]} to {FORMAT_VERSION} ({advice})"
        )
    if not isinstance(body, bytes) or crc != zlib.crc32(body):
        raise CorruptCheckpointError(f"{where}: commit file checksum mismatch (a flipped bit?)")
    try:
        with _gc.paused():
            return _validate(_unpack(body, where, _body_limits(body)), where, version)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError,
            RecursionError) as e:
        if isinstance(e, CorruptCheckpointError):
            raise
        raise CorruptCheckpointError(f"{where}: malformed commit file ({e!r:.200})") from None


def generation_of(data: bytes) -> str | None:
    """The data generation a commit file names, or None if it is not a valid commit file.

    Cheap (no validation of the leaves): a save uses it to find the generation it replaces.
    """
    try:
        outer = _unpack(data, "", _OUTER)
        if not (isinstance(outer, list) and len(outer) == 4 and outer[0] == MAGIC
                and outer[1] in READ_VERSIONS and isinstance(outer[3], bytes)
                and outer[2] == zlib.crc32(outer[3])):
            return None
        gen = _unpack(outer[3], "", _body_limits(outer[3])).get("data")
    except (CorruptCheckpointError, AttributeError):
        return None
    return gen if isinstance(gen, str) and _GEN_RE.fullmatch(gen) else None


# Values from the commit file are shown in errors through this: bounded in size and depth,
# where repr() of a 1,000-deep list would raise RecursionError and of a huge one take memory.
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlong = 3, 60, 60, 40
_show = _repr.repr


def _fail(where: str, msg: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{where}: {msg}")


def _int(x: Any, lo: int, hi: int) -> bool:
    return type(x) is int and lo <= x <= hi


def _validate(f: Any, where: str, version: int) -> Commit:
    if not isinstance(f, dict):
        raise _fail(where, "body is not a map")
    inner = f.get("version")
    if ("version" in f or version >= 4) and not (type(inner) is int and inner == version):
        raise _fail(where, f"format version {version}, but {_show(inner)} in the body (a "
                    "flipped bit?)")
    data, nodes, blobs, arrays, writer = (f["data"], f["nodes"], f["blobs"], f["arrays"],
                                          f["writer"])
    if not (isinstance(data, str) and _GEN_RE.fullmatch(data)):
        raise _fail(where, f"bad data folder name {_show(data)}")
    if not (isinstance(blobs, list) and all(
            isinstance(b, list) and len(b) == 3 and _int(b[0], 0, 1 << 20)
            and _int(b[1], 0, 1 << 31) and _int(b[2], 0, 1 << 62) for b in blobs)):
        raise _fail(where, "bad blob records")
    if not _int(arrays, 0, 1 << 31):
        raise _fail(where, f"bad array count {_show(arrays)}")
    if not (isinstance(writer, dict) and all(
            type(v) in (str, int, float, bool, type(None)) for v in writer.values())):
        raise _fail(where, "bad writer record")
    if not isinstance(nodes, list):
        raise _fail(where, "nodes must be a list")
    node_list = tuple(_validate_node(n, where) for n in nodes)
    leaves = _Columns(f, where, [b[2] for b in blobs], arrays, version)
    return Commit(data, node_list, leaves, tuple(tuple(b) for b in blobs), arrays, writer,
                  version)


def _strings(f: dict, key: str, where: str, limit: int | None = None) -> list[str]:
    value = f[key]
    if not (type(value) is list and all(type(s) is str for s in value)
            and (limit is None or len(value) <= limit)):
        raise _fail(where, f"bad {key!r} list")
    return value


def _column(f: dict, key: str, fmt: str, count: int, where: str) -> np.ndarray:
    raw = f[key]
    dtype = np.dtype(fmt)
    if type(raw) is not bytes or len(raw) != count * dtype.itemsize:
        raise _fail(where, f"column {key!r} is not {count} values of {dtype.name}")
    return np.frombuffer(raw, dtype)


def _segments(lengths: np.ndarray) -> np.ndarray:
    """Start of each leaf's run in a concatenated column, given the runs' lengths."""
    starts = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


class _Leaves(NamedTuple):
    """The per-leaf columns, as NumPy arrays over the commit file's bytes, and their tables."""

    paths: list[str]
    dtypes: list[str]
    impls: list[str]
    origin: np.ndarray
    dtype: np.ndarray
    rank: np.ndarray
    kind: np.ndarray
    impl: np.ndarray
    sharding: np.ndarray
    dims: np.ndarray  # every leaf's dimensions, one after another
    starts: np.ndarray  # where each leaf's dimensions start in ``dims``


def _bad(where: str, paths: list[str], which: np.ndarray, what: str) -> CorruptCheckpointError:
    """The error naming the first offending leaf; ``which``: a mask or leaf indices."""
    first = int(np.flatnonzero(which)[0] if which.dtype == bool else which[0])
    return _bad_leaf(where, paths[first], what)


def _leaf_columns(f: dict, where: str) -> _Leaves:
    """Reads the columns every leaf has; codes lie within their tables, dimensions >= 0."""
    paths = _strings(f, "paths", where)
    n = len(paths)
    col = functools.partial(_column, f, where=where)
    dtypes, impls = _strings(f, "dtypes", where, 256), _strings(f, "impls", where, 256)
    origin, dtype, rank = col("origin", "u1", n), col("dtype", "u1", n), col("rank", "u1", n)
    kind, impl = col("storage", "u1", n), col("impl", "u1", n)
    bad = ((origin >= len(ORIGINS)) | (dtype >= len(dtypes)) | (rank > _MAX_RANK)
           | (kind >= len(_KINDS)) | (impl > len(impls)))
    if bad.any():
        raise _bad(where, paths, bad, "bad origin, dtype, rank, storage or PRNG code")
    dims = col("shape", "<i8", int(rank.sum()))
    bad_dims = (dims < 0) | (dims > _MAX_ELEMENTS)
    if bad_dims.any():
        raise _bad(where, paths, np.repeat(np.arange(n), rank)[bad_dims], "bad shape")
    return _Leaves(paths, dtypes, impls, origin, dtype, rank, kind, impl,
                   col("sharding", "<u4", n), dims, _segments(rank))


def _leaf_sizes(c: _Leaves, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(bytes of each leaf, item size of each dtype in the table)``, once each leaf's kind
    fits its dtype and storage: arrays of a known dtype, not stored as values; Python leaves
    of a Python type, 0-d, stored as values. Sizes are bounded in log2 first (no overflow;
    the dimensions of an empty array too, which NumPy could not describe either)."""
    is_py = c.origin == _PY_CODE
    itemsize = np.array([d.itemsize if d is not None else 0
                         for d in map(_leaves.DTYPES.get, c.dtypes)], np.int64)
    item = itemsize[c.dtype]
    py_type = np.array([name in _leaves.PY_TYPES for name in c.dtypes] or [False])[c.dtype]
    for bad, what in (
            (~is_py & (item == 0), "unknown dtype"),
            (is_py & ~(py_type & (c.rank == 0) & (c.kind == _VALUE)), "bad Python leaf"),
            (~is_py & (c.kind == _VALUE), "array stored as a value")):
        if bad.any():
            raise _bad(where, c.paths, bad, what)
    logs = np.concatenate([[0.0], np.cumsum(np.log2(np.maximum(c.dims, 1)))])
    log_bytes = logs[c.starts + c.rank] - logs[c.starts] + np.log2(np.maximum(item, 1))
    if (log_bytes > 61.9).any():
        raise _bad(where, c.paths, log_bytes > 61.9, "bad shape: too large")
    n = len(c.paths)
    elements = (np.multiply.reduceat(np.insert(c.dims, c.starts, 1), c.starts + np.arange(n))
                if n else np.zeros(0, np.int64))
    return elements * item, itemsize


def _zarr_columns(f: dict, c: _Leaves, where: str, z: np.ndarray, arrays: int,
                  itemsize: np.ndarray, nbytes: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(array ids, stored dtypes, chunk shapes, chunk counts)`` of the zarr leaves ``z``
    (a mask)."""
    nz, zrank = int(z.sum()), c.rank[z]
    array, stored = _column(f, "array", "<u4", nz, where), _column(f, "stored", "u1", nz, where)
    chunks = _column(f, "chunks", "<i8", int(zrank.sum()), where)
    leaves = np.flatnonzero(z)
    bad = (array >= arrays) | (stored >= len(c.dtypes))
    if bad.any():
        raise _bad(where, c.paths, leaves[bad], "bad array storage")
    room = np.maximum(c.dims[np.repeat(z, c.rank)], 1)
    bad_chunks = (chunks < 1) | (chunks > room)
    if bad_chunks.any():
        raise _bad(where, c.paths, leaves[np.repeat(np.arange(nz), zrank)[bad_chunks]],
                   "bad array storage: chunk shape")
    bad = itemsize[stored] != itemsize[c.dtype[z]]
    if bad.any():
        raise _bad(where, c.paths, leaves[bad], "bad stored dtype")
    counts = _check_chunk_counts(c, where, leaves, chunks, zrank, nbytes)
    _check_distinct(c, where, leaves, array, "bad array storage: an array another leaf uses")
    return array, stored, chunks, counts


def _check_chunk_counts(c: _Leaves, where: str, leaves: np.ndarray, chunks: np.ndarray,
                        zrank: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """Each zarr leaf has at most :func:`_storage.most_chunks` chunks for its bytes: each
    chunk costs a request and ~1 KiB of TensorStore's memory while read, so a forged record
    of a 16 MiB leaf in 4 million chunks of 4 bytes cost a minute and 4 GB."""
    z = np.zeros(len(c.paths), bool)
    z[leaves] = True
    dims = c.dims[np.repeat(z, c.rank)]
    per_axis = np.log2(np.maximum(-(-dims // chunks), 1))
    log_count = np.bincount(np.repeat(np.arange(len(leaves)), zrank), per_axis,
                            minlength=len(leaves))
    most = np.log2(np.array([_storage.most_chunks(n) for n in nbytes[leaves].tolist()],
                            np.float64))
    bad = log_count > most + 1e-9
    if bad.any():
        raise _bad(where, c.paths, leaves[bad], "bad array storage: too many chunks for its "
                   f"size (at most {_storage.most_chunks(0)} plus 2 per "
                   f"{_storage.MIN_CHUNK_BYTES} bytes)")
    # Exact counts, now that each fits in 64 bits.
    per_leaf = np.ones(len(leaves), np.int64)
    np.multiply.at(per_leaf, np.repeat(np.arange(len(leaves)), zrank), -(-dims // chunks))
    return per_leaf


def _check_distinct(c: _Leaves, where: str, leaves: np.ndarray, ids: np.ndarray,
                    what: str) -> None:
    """No two leaves name one array: the writer never does, and a file naming one 64 MiB
    array 24 times cost 24 reads of it."""
    order = np.argsort(ids, kind="stable")
    twice = order[1:][ids[order][1:] == ids[order][:-1]]
    if len(twice):
        raise _bad(where, c.paths, leaves[twice], what)


def _packed_columns(f: dict, c: _Leaves, where: str, p: np.ndarray, nbytes: np.ndarray,
                    blob_sizes: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(blobs, offsets, CRCs)`` of the packed leaves ``p`` (a mask), each range within its
    blob."""
    n = int(p.sum())
    blob, offset, crc = (_column(f, k, fmt, n, where)
                         for k, fmt in (("blob", "<u4"), ("offset", "<i8"), ("crc", "<u4")))
    sizes = np.array([*blob_sizes, 0], np.int64)
    known = blob < len(blob_sizes)
    room = sizes[np.where(known, blob, len(blob_sizes))] - nbytes[p]
    bad = ~known | (offset < 0) | (offset > room)
    if bad.any():
        raise _bad(where, c.paths, np.flatnonzero(p)[bad], "bad packed storage")
    _check_disjoint(c, where, np.flatnonzero(p), blob, offset, offset + nbytes[p])
    return blob, offset, crc


def _check_disjoint(c: _Leaves, where: str, leaves: np.ndarray, blob: np.ndarray,
                    start: np.ndarray, stop: np.ndarray) -> None:
    """No two packed leaves share a byte: the writer never overlaps them, and a file naming
    one 256 KiB range 4,000 times cost 1 GB to restore. The writer's order is checked as
    it is (~0.1 ms for 10,000 leaves); sorting only where it is not in blob order."""
    def clashes(b: np.ndarray, a: np.ndarray, z: np.ndarray) -> np.ndarray:
        return (b[1:] < b[:-1]) | ((b[1:] == b[:-1]) & (a[1:] < z[:-1]))

    if not clashes(blob, start, stop).any():
        return
    order = np.lexsort((stop, start, blob))
    bad = clashes(blob[order], start[order], stop[order])
    if bad.any():
        raise _bad(where, c.paths, leaves[order[1:][bad]],
                   "bad packed storage: bytes another leaf uses")


def _weak_column(f: dict, c: _Leaves, where: str, version: int) -> np.ndarray:
    """Which leaves are weakly typed jax.Arrays (none before format 5)."""
    n = len(c.paths)
    if version < 5:
        return np.zeros(n, bool)
    weak = _column(f, "weak", "u1", n, where)
    bad = (weak > 1) | ((weak == 1) & (c.origin != _JAX_CODE))
    if bad.any():
        raise _bad(where, c.paths, bad, "bad weak type: only a jax.Array is weakly typed")
    return weak.astype(bool)


def _check_prng(c: _Leaves, where: str, dims: list[int]) -> None:
    """PRNG keys, and only they, name an implementation known here that fits their data."""
    prng = c.origin == _PRNG_CODE
    if ((c.impl > 0) != prng).any():
        raise _bad(where, c.paths, (c.impl > 0) != prng, "bad PRNG implementation")
    for i in np.flatnonzero(prng).tolist():
        impl, dtype = c.impls[c.impl[i] - 1], c.dtypes[c.dtype[i]]
        shape = dims[c.starts[i]:c.starts[i] + c.rank[i]]
        if not _prng_fits(impl, dtype, shape):
            raise _bad_leaf(where, c.paths[i], (
                f"bad PRNG implementation {_show(impl)} for key data {_show(dtype)}"
                f"{_show(shape)} (unknown here, or key data of another shape)"))


def _sharding_table(f: dict, c: _Leaves, where: str, version: int
                    ) -> list[SavedSharding | None]:
    """The saved shardings (None first: code 0), each spec no longer than its leaves' rank."""
    table = f["shardings"]
    if type(table) is not list:
        raise _fail(where, "bad 'shardings' list")
    shardings = [_validate_sharding(s, where, _MAX_RANK, version) for s in table]
    spec_len = np.array([0] + [len(s[2]) for s in shardings], np.int64)
    bad = c.sharding > len(shardings)
    bad |= spec_len[np.where(bad, 0, c.sharding)] > c.rank
    if bad.any():
        raise _bad(where, c.paths, bad, "bad sharding record")
    return [None, *shardings]


class _Columns(Mapping):
    """Leaf records by path, from the commit file's columns, validated with NumPy as a whole
    (10,000 leaves: ~3 ms with the path index built; checked leaf by leaf, ~25 ms).

    Records are built when asked for, many at once (:meth:`records`: NumPy gathers each
    field for all of them); only a Python leaf's value is checked then, so a restore of a
    small subtree (``at=``) builds and decodes only what it uses.
    """

    def __init__(self, f: dict, where: str, blob_sizes: list[int], arrays: int, version: int):
        c = _leaf_columns(f, where)
        self.index = dict(zip(c.paths, range(len(c.paths)), strict=True))
        if len(self.index) != len(c.paths):
            raise _fail(where, "a leaf path appears twice")
        nbytes, itemsize = _leaf_sizes(c, where)
        masks = [c.kind == k for k in range(len(_KINDS))]
        subs = np.zeros(len(c.paths), np.int64)  # a leaf's place among those stored alike
        for m in masks:
            subs[m] = np.arange(int(m.sum()))
        values = f["values"]
        if type(values) is not list or len(values) != int(masks[_VALUE].sum()):
            raise _fail(where, "bad 'values' list")
        array, stored, chunks, counts = _zarr_columns(f, c, where, masks[_ZARR], arrays,
                                                      itemsize, nbytes)
        # Format 5: each zarr leaf's chunks' CRC-32C, leaf after leaf (see _binding).
        self._chunk_crc = (_column(f, "chunk_crc", "<u4", int(counts.sum()), where)
                           if version >= 5 else None)
        self._crc_start, self._crc_count = _segments(counts), counts
        blob, offset, crc = _packed_columns(f, c, where, masks[_PACKED], nbytes, blob_sizes)
        _check_prng(c, where, c.dims.tolist() if (c.origin == _PRNG_CODE).any() else [])
        shardings = _sharding_table(f, c, where, version)
        self._weak = _weak_column(f, c, where, version)

        self._where, self._columns, self._values = where, c, values
        self._sub, self._nbytes = subs, nbytes
        # Code tables as object arrays: a gather and one tolist() names every record's field.
        self._dtype_names = _objects(c.dtypes)
        self._impl_names = _objects([None, *c.impls])
        self._shardings = _objects(shardings)
        self._array, self._stored_names = array, self._dtype_names[stored]
        self._chunks, self._chunk_start = chunks, _segments(c.rank[masks[_ZARR]])
        self._blob, self._offset, self._crc = blob, offset, crc
        self._done: dict[str, LeafRecord] = {}

    def records(self, paths: Sequence[str]) -> list[LeafRecord]:
        """The records of ``paths`` (each a leaf here), in order: ~1 µs a record, where one
        by one NumPy's per-call costs would dominate."""
        i = np.fromiter(map(self.index.__getitem__, paths), np.int64, len(paths))
        c, n = self._columns, len(paths)
        kind, sub = c.kind[i], self._sub[i]
        storages: list[Storage | None] = [None] * n
        packed = np.flatnonzero(kind == _PACKED)
        if len(packed):
            j = sub[packed]
            for k, blob, offset, nbytes, crc in zip(
                    packed.tolist(), self._blob[j].tolist(), self._offset[j].tolist(),
                    self._nbytes[i[packed]].tolist(), self._crc[j].tolist(), strict=True):
                storages[k] = _STORAGE(("p", None, blob, (), "", offset, nbytes, crc))
        zarr = np.flatnonzero(kind == _ZARR)
        if len(zarr):
            j, rank = sub[zarr], c.rank[i[zarr]]
            for k, array, stored, chunks in zip(
                    zarr.tolist(), self._array[j].tolist(), self._stored_names[j].tolist(),
                    _runs(self._chunks, self._chunk_start[j], rank), strict=True):
                storages[k] = _STORAGE(("z", None, array, chunks, stored, 0, 0, 0))
        out = list(map(_RECORD, zip(
            paths, _ORIGINS[c.origin[i]].tolist(), self._dtype_names[c.dtype[i]].tolist(),
            _runs(c.dims, c.starts[i], c.rank[i]), self._impl_names[c.impl[i]].tolist(),
            storages, self._shardings[c.sharding[i]].tolist(), self._weak[i].tolist(),
            strict=True)))
        for k, j in zip(np.flatnonzero(kind == _VALUE).tolist(), sub[kind == _VALUE].tolist(),
                        strict=True):
            path, dtype = out[k].path, out[k].dtype
            value = _leaves.decode_py(dtype, self._values[j], f"{self._where}: leaf {path!r:.200}")
            out[k] = LeafRecord(path, out[k].origin, dtype, (), None, Storage("v", value), None)
        return out

    def chunk_crcs(self, path: str) -> np.ndarray | None:
        """The recorded CRC-32C of each chunk of zarr leaf ``path``, in C order of its chunk
        grid; None before format 5."""
        if self._chunk_crc is None:
            return None
        k = self._sub[self.index[path]]
        return self._chunk_crc[self._crc_start[k]:self._crc_start[k] + self._crc_count[k]]

    def __getitem__(self, path: str) -> LeafRecord:
        record = self._done.get(path)
        if record is None:
            (record,) = self.records([path])
            self._done[path] = record
        return record

    def summaries(self) -> tuple[list, ...]:
        """Columns ``(paths, origins, shapes, dtypes, nbytes, shardings, values)`` of every
        leaf in save order, without building records: all that :func:`metadata` lists.
        ``values`` holds Python leaves' values, None elsewhere."""
        c = self._columns
        values: list = [None] * len(c.paths)
        python = np.flatnonzero(c.kind == _VALUE).tolist()
        for k, record in zip(python, self.records([c.paths[k] for k in python]), strict=True):
            values[k] = record.storage.value
        return (c.paths, _ORIGINS[c.origin].tolist(), _runs(c.dims, c.starts, c.rank),
                self._dtype_names[c.dtype].tolist(), self._nbytes.tolist(),
                self._shardings[c.sharding].tolist(), values)

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns.paths)

    def __len__(self) -> int:
        return len(self._columns.paths)

    def __contains__(self, path: object) -> bool:
        return path in self.index


def _objects(items: Sequence[Any]) -> np.ndarray:
    """``items`` as a 1-d object array (NumPy would make tuples a second dimension)."""
    out = np.empty(len(items), object)
    for k, x in enumerate(items):
        out[k] = x
    return out


def _runs(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list[tuple[int, ...]]:
    """``tuple(flat[s:s + n])`` for each start and length, length by length: NumPy gathers
    each position, zip makes the tuples (a slice and a tuple per leaf took 2 ms of a
    10,000-leaf metadata())."""
    out: list[tuple[int, ...]] = [()] * len(starts)
    for n in np.unique(lengths).tolist():
        if n == 0:
            continue
        which = np.flatnonzero(lengths == n)
        runs = zip(*(flat[starts[which] + axis].tolist() for axis in range(n)), strict=True)
        if len(which) == len(out):
            return list(runs)
        for k, run in zip(which.tolist(), runs, strict=True):
            out[k] = run
    return out


_INDEX = re.compile(r"0|[1-9][0-9]{0,17}")  # the name of a list's or tuple's child


def _validate_tree(nodes: tuple[_graph.Node, ...], leaves: Mapping[str, Any],
                   where: str) -> None:
    """Nodes and leaves form one tree, as :func:`_graph.flatten` records it: the root node
    first (or a lone root leaf), every other path's parent a recorded node, list and tuple
    children named by their index, no path twice.

    Rebuilding a tree (restore without a target, metadata) then costs what the commit file
    holds: a path whose ancestors are not recorded would have rebuild invent each of them,
    quadratic in the path's length (a 40 KB commit file took 360 MB, then RecursionError),
    and a list child named ``x`` cannot be ordered. About 0.3 µs per path."""
    kinds = {n.path: n.kind for n in nodes}
    if len(kinds) != len(nodes) or not kinds.keys().isdisjoint(leaves):
        raise _fail(where, "a path appears twice among the nodes and leaves")
    if not nodes:
        if leaves.keys() - {""}:
            raise _fail(where, "leaves but no root node")
        return
    if nodes[0].path != "" or "" in leaves:
        raise _fail(where, "the first node is not the root, or a root leaf is beside nodes")
    get, split, sequences = kinds.get, _graph.parent_and_name, (_graph.LIST, _graph.TUPLE)
    for path in itertools.chain(itertools.islice(kinds, 1, None), leaves):
        if "\\" in path:
            parent, name = split(path)
        else:  # the common case, inlined: this runs for every path of every restore
            parent, _, name = path.rpartition("/")
        kind = get(parent)
        if kind is None:
            raise _fail(where, f"{path!r:.200}: its parent is not a recorded node")
        if kind in sequences and not _INDEX.fullmatch(name):
            raise _fail(where, f"{path!r:.200}: a child of a {kind} must be named by its index")


def _validate_node(n: Any, where: str) -> _graph.Node:
    if not (isinstance(n, list) and len(n) == 3 and all(isinstance(x, str) for x in n)):
        raise _fail(where, f"bad node record {_show(n)}")
    if n[1] not in _graph.NODE_KINDS:
        raise _fail(where, f"node {_show(n[0])} has unknown kind {_show(n[1])}")
    return _graph.Node(*n)


def _prng_fits(impl: Any, dtype: Any, shape: list[int]) -> bool:
    """``impl`` names a PRNG implementation known here whose key data is ``dtype``/``shape``
    (jax.random.wrap_key_data raises anything but a CheckpointError otherwise)."""
    if type(impl) is not str or len(impl) > 64 or dtype != "uint32":
        return False
    key_shape = _leaves.prng_key_shape(impl)
    return key_shape is not None and tuple(shape[len(shape) - len(key_shape):]) == key_shape


def _bad_leaf(where: str, path: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{where}: leaf {path!r:.200}: {what}")


def _validate_sharding(s: Any, at: str, rank: int, version: int = 4
                       ) -> SavedSharding | None:
    # ``version`` 4: three entries, as the shardings other formats record (Orbax's) have.
    # Strict enough that JAX accepts what passes: unique axis names, each used at most once
    # by the spec, no more spec entries than the array has dimensions; from format 5, a
    # known type per axis and one distinct device id per mesh position.
    if s is None:
        return None
    entries = 5 if version >= 5 else 3
    ok = (isinstance(s, list) and len(s) == entries and isinstance(s[0], list)
          and all(_int(d, 1, 1 << 20) for d in s[0]) and isinstance(s[1], list)
          and len(s[1]) == len(s[0]) and all(isinstance(n, str) for n in s[1])
          and len(set(s[1])) == len(s[1]) and isinstance(s[2], list) and len(s[2]) <= rank)
    if ok:
        used: list[str] = []
        for entry in s[2]:
            names = entry if isinstance(entry, list) else [entry]
            ok = ok and all(n is None or n in s[1] for n in names)
            used += [n for n in names if n is not None]
        ok = ok and len(set(used)) == len(used)
    types = ids = None
    if ok and entries == 5:
        types, ids = s[3], s[4]
        ok = (isinstance(types, list) and len(types) == len(s[0])
              and all(t in AXIS_TYPES for t in types) and isinstance(ids, list)
              and len(ids) == math.prod(s[0]) and all(_int(d, 0, 1 << 31) for d in ids)
              and len(set(ids)) == len(ids))
    if not ok:
        raise CorruptCheckpointError(f"{at}: bad sharding record {_show(s)}")
    spec = tuple(tuple(e) if isinstance(e, list) else e for e in s[2])
    return SavedSharding(tuple(s[0]), tuple(s[1]), spec,
                         None if types is None else tuple(types),
                         None if ids is None else tuple(ids))


def writer_info(processes: int, time: float) -> Mapping[str, Any]:
    from importlib.metadata import version

    import jax

    from . import __version__

    return {
        "library": f"pytree_ckpt {__version__}", "jax": jax.__version__,
        "tensorstore": version("tensorstore"), "processes": processes, "time": time,
    }
