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

where ``body`` (bytes) is itself msgpack of a map::

    "data":   "d-<hex>"                         generation folder holding the arrays and blobs
    "nodes":  [[path, kind, type_name], ...]    inner nodes, root first; kind in _graph.NODE_KINDS
    "leaves": [[path, origin, dtype, shape, impl, storage, sharding], ...]
    "blobs":  [[proc, k, nbytes], ...]          packed blob n is p/<proc>/<k>, nbytes long
    "arrays": count                             zarr arrays are a/0 .. a/<count-1>
    "writer": {"library": ..., "jax": ..., "tensorstore": ..., "processes": int, "time": float}

and each leaf's ``storage`` is one of::

    ["v", value]                                a Python leaf's value (_leaves.encode_py)
    ["z", array_id, chunk_shape, stored_dtype]  zarr3 array a/<array_id>
    ["p", blob, offset, nbytes, crc32]          bytes [offset, offset+nbytes) of blobs[blob]

``sharding`` is None or ``[mesh_shape, axis_names, partition_spec]`` (spec entries None, a
name, or a list of names), recorded for display and as the default layout on restore.
``stored_dtype`` differs from ``dtype`` only where TensorStore lacks the dtype; the bytes are
then stored as unsigned integers of the same width. All checksums are zlib's CRC-32; the zarr3
chunks carry the crc32c codec. The reader treats every field as untrusted.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import reprlib
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import msgpack

from . import _gc, _graph, _leaves
from ._errors import CorruptCheckpointError, FormatVersionError

MAGIC = "pytree_ckpt"
FORMAT_VERSION = 1
COMMIT_FILE = "checkpoint.msgpack"
MAX_COMMIT_BYTES = 1 << 30
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


class LeafRecord(NamedTuple):
    """One saved leaf, as described by the commit file."""

    path: str
    origin: str
    dtype: str
    shape: tuple[int, ...]
    impl: str | None
    storage: Storage
    sharding: tuple | None

    @property
    def nbytes(self) -> int:
        if self.origin == _leaves.PY:
            return 0
        return math.prod(self.shape) * _leaves.DTYPES[self.dtype].itemsize


class Commit(NamedTuple):
    """A decoded, validated commit file."""

    data: str
    nodes: tuple[_graph.Node, ...]
    leaves: Mapping[str, LeafRecord]
    blobs: tuple[tuple[int, int, int], ...]  # (process, part, nbytes)
    arrays: int
    writer: dict[str, Any]

    def blob_key(self, blob: int) -> str:
        proc, part, _ = self.blobs[blob]
        return f"{self.data}/p/{proc}/{part}"


def encode(commit: Commit) -> bytes:
    """The commit file's bytes for ``commit``."""
    body = msgpack.packb(
        {
            "data": commit.data,
            "nodes": [list(n) for n in commit.nodes],
            "leaves": [_encode_leaf(r) for r in commit.leaves.values()],
            "blobs": [list(b) for b in commit.blobs],
            "arrays": commit.arrays,
            "writer": commit.writer,
        },
        use_bin_type=True,
    )
    return msgpack.packb([MAGIC, FORMAT_VERSION, zlib.crc32(body), body], use_bin_type=True)


def _encode_leaf(r: LeafRecord) -> list:
    s = r.storage
    if s.kind == "v":
        storage = ["v", _leaves.encode_py(s.value)]
    elif s.kind == "z":
        storage = ["z", s.index, list(s.chunks), s.stored_dtype]
    else:
        storage = ["p", s.index, s.offset, s.nbytes, s.crc]
    return [r.path, r.origin, r.dtype, list(r.shape), r.impl, storage, r.sharding]


def _unpack(data: bytes, where: str) -> Any:
    # Explicit limits: the commit file is untrusted, and msgpack would otherwise size its
    # containers from declared lengths.
    limit = len(data)
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_str_len=limit, max_bin_len=limit,
            max_array_len=limit, max_map_len=limit, max_ext_len=0,
        )
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise CorruptCheckpointError(f"{where}: not a valid commit file ({e})") from None


def decode(data: bytes, where: str) -> Commit:
    """Decodes and validates commit file bytes; ``where`` names the file in errors.

    Raises :class:`CorruptCheckpointError` for anything malformed (with the leaf's path where
    it applies) and :class:`FormatVersionError` for a version this library cannot read.
    """
    if len(data) > MAX_COMMIT_BYTES:
        raise CorruptCheckpointError(f"{where}: commit file of {len(data)} bytes is too large")
    outer = _unpack(data, where)
    if not (isinstance(outer, list) and len(outer) == 4 and outer[0] == MAGIC):
        raise CorruptCheckpointError(f"{where}: not a pytree_ckpt commit file")
    _, version, crc, body = outer
    if version != FORMAT_VERSION:
        raise FormatVersionError(
            f"{where}: format version {_show(version)}; this pytree_ckpt reads version "
            f"{FORMAT_VERSION} (upgrade pytree_ckpt to read newer checkpoints)"
        )
    if not isinstance(body, bytes) or crc != zlib.crc32(body):
        raise CorruptCheckpointError(f"{where}: commit file checksum mismatch (a flipped bit?)")
    try:
        with _gc.paused():
            return _validate(_unpack(body, where), where)
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
        outer = _unpack(data, "")
        if not (isinstance(outer, list) and len(outer) == 4 and outer[0] == MAGIC
                and outer[1] == FORMAT_VERSION and isinstance(outer[3], bytes)
                and outer[2] == zlib.crc32(outer[3])):
            return None
        gen = _unpack(outer[3], "").get("data")
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


def _validate(f: Any, where: str) -> Commit:
    if not isinstance(f, dict):
        raise _fail(where, "body is not a map")
    data, nodes, leaves = f["data"], f["nodes"], f["leaves"]
    blobs, arrays, writer = f["blobs"], f["arrays"], f["writer"]
    if not (isinstance(data, str) and _GEN_RE.fullmatch(data)):
        raise _fail(where, f"bad data folder name {_show(data)}")
    if not (isinstance(blobs, list) and all(
            isinstance(b, list) and len(b) == 3 and _int(b[0], 0, 1 << 20)
            and _int(b[1], 0, 1 << 31) and _int(b[2], 0, 1 << 62) for b in blobs)):
        raise _fail(where, "bad blob records")
    sizes = [b[2] for b in blobs]
    if not _int(arrays, 0, 1 << 31):
        raise _fail(where, f"bad array count {_show(arrays)}")
    if not (isinstance(writer, dict) and all(
            type(v) in (str, int, float, bool, type(None)) for v in writer.values())):
        raise _fail(where, "bad writer record")
    if not isinstance(nodes, list) or not isinstance(leaves, list):
        raise _fail(where, "nodes and leaves must be lists")
    node_list = tuple(_validate_node(n, where) for n in nodes)
    if not all(type(raw) is list and raw and type(raw[0]) is str for raw in leaves):
        raise _fail(where, "bad leaf records")
    by_path = {raw[0]: raw for raw in leaves}
    if len(by_path) != len(leaves):
        raise _fail(where, "a leaf path appears twice")
    _validate_tree(node_list, by_path, where)
    records = _Records(by_path, where, sizes, arrays)
    return Commit(data, node_list, records, tuple(tuple(b) for b in blobs), arrays, writer)


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


class _Records(Mapping):
    """Leaf records by path, each validated when first looked up.

    Nothing unvalidated is ever handed out, and a restore of a small subtree (``at=``)
    validates only the records it uses: on a 10,000-leaf checkpoint that is most of its
    cost. Iterating yields paths only; ``items()``/``values()`` validate everything.
    """

    def __init__(self, raw: dict[str, list], where: str, sizes: list[int], arrays: int):
        self._raw, self._where, self._sizes, self._arrays = raw, where, sizes, arrays
        self._done: dict[str, LeafRecord] = {}

    def __getitem__(self, path: str) -> LeafRecord:
        record = self._done.get(path)
        if record is None:
            try:
                record = _validate_leaf(self._raw[path], self._where, self._sizes, self._arrays)
            except (TypeError, ValueError, IndexError, AttributeError, OverflowError,
                    RecursionError) as e:
                if isinstance(e, CorruptCheckpointError):
                    raise
                raise _bad_leaf(self._where, path, f"malformed record ({e!r:.200})") from None
            self._done[path] = record
        return record

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __contains__(self, path: object) -> bool:
        return path in self._raw


def _validate_node(n: Any, where: str) -> _graph.Node:
    if not (isinstance(n, list) and len(n) == 3 and all(isinstance(x, str) for x in n)):
        raise _fail(where, f"bad node record {_show(n)}")
    if n[1] not in _graph.NODE_KINDS:
        raise _fail(where, f"node {_show(n[0])} has unknown kind {_show(n[1])}")
    return _graph.Node(*n)


def _validate_leaf(raw: Any, where: str, blobs: list[int], arrays: int) -> LeafRecord:
    # Written for speed as well as strictness: it runs once per leaf of every restore.
    if not (type(raw) is list and len(raw) == 7 and type(raw[0]) is str):
        raise _fail(where, f"bad leaf record {_show(raw)}")
    path, origin, dtype, shape, impl, storage, sharding = raw
    bad = functools.partial(_bad_leaf, where, path)

    if type(shape) is not list or len(shape) > _MAX_RANK:
        raise bad(f"bad shape {_show(shape)}")
    elements = 1
    for d in shape:
        if type(d) is not int or not 0 <= d <= _MAX_ELEMENTS:
            raise bad(f"bad shape {_show(shape)}")
        elements *= d
    if elements > _MAX_ELEMENTS:
        raise bad(f"bad shape {_show(shape)}")
    if (impl is not None) != (origin == _leaves.PRNGKEY) or not (
            impl is None or _prng_fits(impl, dtype, shape)):
        raise bad(f"bad PRNG implementation {_show(impl)} for key data {_show(dtype)}"
                  f"{_show(shape)} (unknown here, or key data of another shape)")
    if type(storage) is not list or not storage:
        raise bad("bad storage record")
    if origin == _leaves.PY:
        if storage[0] != "v" or len(storage) != 2 or shape:
            raise bad("bad Python leaf record")
        value = _leaves.decode_py(dtype, storage[1], f"{where}: leaf {path!r:.200}")
        return LeafRecord(path, origin, dtype, (), None, Storage("v", value), None)
    if origin not in _leaves.ARRAY_ORIGINS:
        raise bad(f"unknown leaf kind {_show(origin)}")
    dt = _leaves.DTYPES.get(dtype) if type(dtype) is str else None
    if dt is None:
        raise bad(f"unknown dtype {_show(dtype)}")
    nbytes = elements * dt.itemsize
    if nbytes > _MAX_ELEMENTS:  # NumPy could not even describe such an array
        raise bad(f"bad shape {_show(shape)}: {nbytes} bytes")
    kind = storage[0]
    if kind == "p" and len(storage) == 5:
        _, blob, offset, size, crc = storage
        if not (type(blob) is int and 0 <= blob < len(blobs) and type(offset) is int
                and offset >= 0 and size == nbytes and offset + size <= blobs[blob]
                and type(crc) is int and 0 <= crc <= 0xFFFFFFFF):
            raise bad(f"bad packed storage {_show(storage)}")
        st = Storage("p", None, blob, (), "", offset, size, crc)
    elif kind == "z" and len(storage) == 4:
        _, index, chunks, stored = storage
        if not (_int(index, 0, arrays - 1) and type(chunks) is list
                and len(chunks) == len(shape)
                and all(_int(c, 1, max(d, 1)) for c, d in zip(chunks, shape, strict=True))):
            raise bad(f"bad array storage {_show(storage)}")
        stored_dt = _leaves.DTYPES.get(stored) if type(stored) is str else None
        if stored_dt is None or stored_dt.itemsize != dt.itemsize:
            raise bad(f"bad stored dtype {_show(stored)}")
        st = Storage("z", index=index, chunks=tuple(chunks), stored_dtype=stored)
    else:
        raise bad(f"bad storage record {_show(storage)}")
    if sharding is not None:
        sharding = _validate_sharding(sharding, f"{where}: leaf {path!r:.200}", len(shape))
    return LeafRecord(path, origin, dtype, tuple(shape), impl, st, sharding)


def _prng_fits(impl: Any, dtype: Any, shape: list[int]) -> bool:
    """``impl`` names a PRNG implementation known here whose key data is ``dtype``/``shape``
    (jax.random.wrap_key_data raises anything but a CheckpointError otherwise)."""
    if type(impl) is not str or len(impl) > 64 or dtype != "uint32":
        return False
    key_shape = _leaves.prng_key_shape(impl)
    return key_shape is not None and tuple(shape[len(shape) - len(key_shape):]) == key_shape


def _bad_leaf(where: str, path: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{where}: leaf {path!r:.200}: {what}")


def _validate_sharding(s: Any, at: str, rank: int) -> tuple | None:
    # Strict enough that JAX accepts what passes: unique axis names, each used at most once
    # by the spec, no more spec entries than the array has dimensions.
    if s is None:
        return None
    ok = (isinstance(s, list) and len(s) == 3 and isinstance(s[0], list)
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
    if not ok:
        raise CorruptCheckpointError(f"{at}: bad sharding record {_show(s)}")
    spec = tuple(tuple(e) if isinstance(e, list) else e for e in s[2])
    return (tuple(s[0]), tuple(s[1]), spec)


def writer_info(processes: int, time: float) -> Mapping[str, Any]:
    from importlib.metadata import version

    import jax

    from . import __version__

    return {
        "library": f"pytree_ckpt {__version__}", "jax": jax.__version__,
        "tensorstore": version("tensorstore"), "processes": processes, "time": time,
    }
