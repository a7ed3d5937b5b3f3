"""Decoding a commit file (its encoding: _format): its untrusted bytes are unpacked within
limits (_unpack), then every field is validated, before anything is built from them.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import reprlib
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _format, _gc_pause, _graph, _leaves, _storage
from ._columns import Columns, Leaves, segments
from ._errors import CorruptCheckpointError, FormatVersionError
from ._format import (
    AXIS_TYPES,
    GENERATION_RE,
    KINDS,
    MAGIC,
    ORIGIN_CODE,
    ORIGINS,
    PACKED,
    READ_VERSIONS,
    VALUE,
    ZARR,
    Commit,
    SavedSharding,
)
from ._unpack import Limits, unpack

_MAX_RANK = 64
_MAX_ELEMENTS = 1 << 62
_PY_CODE, _PRNG_CODE = ORIGIN_CODE[_leaves.PY], ORIGIN_CODE[_leaves.PRNGKEY]
_JAX_CODE = ORIGIN_CODE[_leaves.JAX]

# The outer array: four scalars.
_OUTER = Limits(array=4, map=0, containers=1 << 10)


def _body_limits(body: bytes) -> Limits:
    """Limits a body the writer made stays within, whatever its tree: every leaf takes at
    least 8 bytes of the body (its path, codes and columns), so no list (paths, values,
    nodes) is longer than a 1/8 of it; the body's map and the writer's have a few dozen
    keys; and each container (a node record, a complex value, a blob or sharding record)
    comes with enough bytes of its own and its leaves' that all of them take less than 6x
    the body. A forged body of empty arrays is then refused at a small multiple of its
    size."""
    return Limits(array=len(body) // 8 + 64, map=256, containers=6 * len(body) + (64 << 10))


def decode(data: bytes, where: str) -> Commit:
    """Decodes and validates commit file bytes; ``where`` names the file in errors.

    Raises :class:`CorruptCheckpointError` for anything malformed (with the leaf's path where
    it applies) and :class:`FormatVersionError` for a version this library cannot read.
    """
    if len(data) > _format.MAX_COMMIT_BYTES:
        raise CorruptCheckpointError(f"{where}: commit file of {len(data)} bytes is too large")
    with _gc_pause.paused():  # a file of a million empty arrays: see _gc_pause
        outer = unpack(data, where, _OUTER)
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
            f"{READ_VERSIONS[0]} to {_format.FORMAT_VERSION} ({advice})"
        )
    if not isinstance(body, bytes) or crc != zlib.crc32(body):
        raise CorruptCheckpointError(f"{where}: commit file checksum mismatch (a flipped bit?)")
    try:
        with _gc_pause.paused():
            return _validate(unpack(body, where, _body_limits(body)), where, version)
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
        outer = unpack(data, "", _OUTER)
        if not (isinstance(outer, list) and len(outer) == 4 and outer[0] == MAGIC
                and outer[1] in READ_VERSIONS and isinstance(outer[3], bytes)
                and outer[2] == zlib.crc32(outer[3])):
            return None
        gen = unpack(outer[3], "", _body_limits(outer[3])).get("data")
    except (CorruptCheckpointError, AttributeError):
        return None
    return gen if isinstance(gen, str) and GENERATION_RE.fullmatch(gen) else None


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
    if not (isinstance(data, str) and GENERATION_RE.fullmatch(data)):
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
    refs = f["refs"] if version >= 6 else []  # step folders beside this one, by name only
    if not (type(refs) is list and all(
            type(r) is list and len(r) == 2 and type(r[0]) is str and _format.is_step_name(r[0])
            and type(r[1]) is str and GENERATION_RE.fullmatch(r[1]) for r in refs)
            and len({tuple(r) for r in refs}) == len(refs)):
        raise _fail(where, f"bad 'refs' list {_show(refs)}")
    leaves = _leaf_view(f, where, [b[2] for b in blobs], arrays, version, len(refs))
    return Commit(data, node_list, leaves, tuple(tuple(b) for b in blobs), arrays, writer,
                  version, tuple((r[0], r[1]) for r in refs))


def _strings(f: dict, key: str, where: str, limit: int | None = None) -> list[str]:
    value = f[key]
    if not (type(value) is list and set(map(type, value)) <= {str}
            and (limit is None or len(value) <= limit)):
        raise _fail(where, f"bad {key!r} list")
    return value


def _column(f: dict, key: str, fmt: str, count: int, where: str) -> np.ndarray:
    raw = f[key]
    dtype = np.dtype(fmt)
    if type(raw) is not bytes or len(raw) != count * dtype.itemsize:
        raise _fail(where, f"column {key!r} is not {count} values of {dtype.name}")
    return np.frombuffer(raw, dtype)


def _bad(where: str, paths: list[str], which: np.ndarray, what: str) -> CorruptCheckpointError:
    """The error naming the first offending leaf; ``which``: a mask or leaf indices."""
    first = int(np.flatnonzero(which)[0] if which.dtype == bool else which[0])
    return _bad_leaf(where, paths[first], what)


def _leaf_columns(f: dict, where: str) -> Leaves:
    """Reads the columns every leaf has; codes lie within their tables, dimensions >= 0."""
    paths = _strings(f, "paths", where)
    n = len(paths)
    col = functools.partial(_column, f, where=where)
    dtypes, impls = _strings(f, "dtypes", where, 256), _strings(f, "impls", where, 256)
    origin, dtype, rank = col("origin", "u1", n), col("dtype", "u1", n), col("rank", "u1", n)
    kind, impl = col("storage", "u1", n), col("impl", "u1", n)
    bad = ((origin >= len(ORIGINS)) | (dtype >= len(dtypes)) | (rank > _MAX_RANK)
           | (kind >= len(KINDS)) | (impl > len(impls)))
    if bad.any():
        raise _bad(where, paths, bad, "bad origin, dtype, rank, storage or PRNG code")
    dims = col("shape", "<i8", int(rank.sum()))
    bad_dims = (dims < 0) | (dims > _MAX_ELEMENTS)
    if bad_dims.any():
        raise _bad(where, paths, np.repeat(np.arange(n), rank)[bad_dims], "bad shape")
    return Leaves(paths, dtypes, impls, origin, dtype, rank, kind, impl,
                   col("sharding", "<u4", n), dims, segments(rank))


def _leaf_sizes(c: Leaves, where: str) -> tuple[np.ndarray, np.ndarray]:
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
            (is_py & ~(py_type & (c.rank == 0) & (c.kind == VALUE)), "bad Python leaf"),
            (~is_py & (c.kind == VALUE), "array stored as a value")):
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


def _zarr_columns(f: dict, c: Leaves, where: str, z: np.ndarray, arrays: int,
                  itemsize: np.ndarray, nbytes: np.ndarray, version: int, refs: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(array ids, stored dtypes, chunk shapes, chunk counts, refs)`` of the zarr leaves
    ``z`` (a mask); a carried leaf's array id is its writer's, not below ``arrays``."""
    nz, zrank = int(z.sum()), c.rank[z]
    array, stored = _column(f, "array", "<u4", nz, where), _column(f, "stored", "u1", nz, where)
    ref = _column(f, "ref", "<u4", nz, where) if version >= 6 else np.zeros(nz, np.uint32)
    chunks = _column(f, "chunks", "<i8", int(zrank.sum()), where)
    leaves = np.flatnonzero(z)
    bad = (ref > refs) | ((ref == 0) & (array >= arrays)) | (stored >= len(c.dtypes))
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
    _check_distinct(c, where, leaves, (ref.astype(np.int64) << 32) | array,
                    "bad array storage: an array another leaf uses")
    return array, stored, chunks, counts, ref


def _check_chunk_counts(c: Leaves, where: str, leaves: np.ndarray, chunks: np.ndarray,
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


def _check_distinct(c: Leaves, where: str, leaves: np.ndarray, ids: np.ndarray,
                    what: str) -> None:
    """No two leaves name one array: the writer never does, and a file naming one 64 MiB
    array 24 times cost 24 reads of it."""
    order = np.argsort(ids, kind="stable")
    twice = order[1:][ids[order][1:] == ids[order][:-1]]
    if len(twice):
        raise _bad(where, c.paths, leaves[twice], what)


def _packed_columns(f: dict, c: Leaves, where: str, p: np.ndarray, nbytes: np.ndarray,
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


def _check_disjoint(c: Leaves, where: str, leaves: np.ndarray, blob: np.ndarray,
                    start: np.ndarray, stop: np.ndarray) -> None:
    """No two packed leaves share a byte: the writer never overlaps them, and a file naming
    one 256 KiB range 4,000 times would cost 1 GB to restore. The writer's order is checked
    as it is, with NumPy; sorting only where it is not in blob order."""
    def clashes(b: np.ndarray, a: np.ndarray, z: np.ndarray) -> np.ndarray:
        return (b[1:] < b[:-1]) | ((b[1:] == b[:-1]) & (a[1:] < z[:-1]))

    if not clashes(blob, start, stop).any():
        return
    order = np.lexsort((stop, start, blob))
    bad = clashes(blob[order], start[order], stop[order])
    if bad.any():
        raise _bad(where, c.paths, leaves[order[1:][bad]],
                   "bad packed storage: bytes another leaf uses")


def _weak_column(f: dict, c: Leaves, where: str, version: int) -> np.ndarray:
    """Which leaves are weakly typed jax.Arrays (none before format 5)."""
    n = len(c.paths)
    if version < 5:
        return np.zeros(n, bool)
    weak = _column(f, "weak", "u1", n, where)
    bad = (weak > 1) | ((weak == 1) & (c.origin != _JAX_CODE))
    if bad.any():
        raise _bad(where, c.paths, bad, "bad weak type: only a jax.Array is weakly typed")
    return weak.astype(bool)


def _check_prng(c: Leaves, where: str, dims: list[int]) -> None:
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


def _sharding_table(f: dict, c: Leaves, where: str, version: int
                    ) -> list[SavedSharding | None]:
    """The saved shardings (None first: code 0), each spec no longer than its leaves' rank."""
    table = f["shardings"]
    if type(table) is not list:
        raise _fail(where, "bad 'shardings' list")
    shardings: list[SavedSharding] = []
    for s in table:
        saved = validate_sharding(s, where, _MAX_RANK, version)
        if saved is None:  # code 0 is the only "no sharding"
            raise _fail(where, "bad 'shardings' list (a null entry)")
        shardings.append(saved)
    spec_len = np.array([0] + [len(s[2]) for s in shardings], np.int64)
    bad = c.sharding > len(shardings)
    bad |= spec_len[np.where(bad, 0, c.sharding)] > c.rank
    if bad.any():
        raise _bad(where, c.paths, bad, "bad sharding record")
    return [None, *shardings]


def _leaf_view(f: dict, where: str, blob_sizes: list[int], arrays: int, version: int,
               refs: int) -> Columns:
    """Leaf records by path, from the commit file's columns, validated with NumPy as a whole
    (not leaf by leaf: a Python step per leaf would dominate)."""
    c = _leaf_columns(f, where)
    index = dict(zip(c.paths, range(len(c.paths)), strict=True))
    if len(index) != len(c.paths):
        raise _fail(where, "a leaf path appears twice")
    nbytes, itemsize = _leaf_sizes(c, where)
    masks = [c.kind == k for k in range(len(KINDS))]
    values = f["values"]
    if type(values) is not list or len(values) != int(masks[VALUE].sum()):
        raise _fail(where, "bad 'values' list")
    zarr = _zarr_columns(f, c, where, masks[ZARR], arrays, itemsize, nbytes, version, refs)
    # Format 5: each zarr leaf's chunks' CRC-32C, leaf after leaf (see _binding).
    chunk_crc = (_column(f, "chunk_crc", "<u4", int(zarr[3].sum()), where)
                 if version >= 5 else None)
    packed = _packed_columns(f, c, where, masks[PACKED], nbytes, blob_sizes)
    _check_prng(c, where, c.dims.tolist() if (c.origin == _PRNG_CODE).any() else [])
    shardings = _sharding_table(f, c, where, version)
    weak = _weak_column(f, c, where, version)
    return Columns(where, c, index, values, nbytes, zarr, chunk_crc, packed, shardings, weak)


_INDEX = re.compile(r"0|[1-9][0-9]{0,17}")  # the name of a list's or tuple's child


def validate_tree(nodes: tuple[_graph.Node, ...], leaves: Mapping[str, Any],
                   where: str) -> None:
    """Nodes and leaves form one tree, as :func:`_graph.flatten` records it: the root node
    first (or a lone root leaf), every other path's parent a recorded node, list and tuple
    children named by their index, no path twice.

    Rebuilding a tree (restore without a target, metadata) then costs what the commit file
    holds: a path whose ancestors are not recorded would have rebuild invent each of them,
    quadratic in the path's length (a 40 KB commit file would take 360 MB, then
    RecursionError), and a list child named ``x`` cannot be ordered. One dict look-up per
    path."""
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


def validate_sharding(s: Any, at: str, rank: int, version: int = 4
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


def tree_nodes(commit: Commit, where: str) -> tuple[_graph.Node, ...]:
    """``commit.nodes``, once they and the leaves form one tree (``where`` names the file in
    errors; see :func:`validate_tree`). Checked by what rebuilds the tree from them
    (metadata, restore without a target) rather than by :func:`decode`: matching a
    target's paths never walks the tree (a restore with a target, or at=, skips it)."""
    validate_tree(commit.nodes, commit.leaves, where)
    return commit.nodes


def chunk_crcs(commit: Commit, path: str) -> np.ndarray | None:
    """The recorded CRC-32C of each chunk of zarr leaf ``path`` (see _binding), in C order
    of its chunk grid; None before format 5, or for a commit not read from a file."""
    leaves = commit.leaves
    return leaves.chunk_crcs(path) if isinstance(leaves, Columns) else None
