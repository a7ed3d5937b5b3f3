"""A checkpoint as restore and metadata see it, whatever wrote it.

A :class:`Source` is a checkpoint's leaf records by path, its inner nodes, and a function
that reads matched leaves as the target wants them. Our own commit file gives one
(:func:`_open.open_source`); so do the readers of other tools' files (``_foreign``:
safetensors, Flax msgpack, Orbax), which describe their leaves with the same
:class:`~._format.LeafRecord` and build them with the same code (``_build.build``), so
matching, the status and the target's kinds, dtypes and shardings behave the same for
every format.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import tensorstore as ts

from . import _build, _decode, _graph, _leaves, _storage
from ._columns import Columns
from ._errors import CorruptCheckpointError
from ._faults import faults, is_storage_fault, read_failed, storage_error
from ._format import LeafRecord

# CheckpointMetadata.format values.
PYTREE_CKPT, ORBAX, FLAX_MSGPACK, SAFETENSORS = "pytree_ckpt", "orbax", "flax_msgpack", "safetensors"


class Source(NamedTuple):
    """A readable checkpoint of any format."""

    format: str  # one of the names above
    url: str
    version: int  # our format version; 0 for other formats
    leaves: Records | Columns  # by path, with records(paths) and summaries()
    nodes: tuple[_graph.Node, ...]  # inner nodes, root first
    tree_nodes: Callable[[], tuple[_graph.Node, ...]]  # nodes, checked to form one tree
    # (jobs (_build.Job), restore's share_reads) -> restored leaves by path
    read: Callable[[list, bool | None], dict[str, Any]]
    writer: Mapping[str, Any]
    carried: Mapping[str, str] = {}  # carried leaf path -> step folder (ours, format 6)


class Records(dict):
    """Leaf records by path, built in full by a reader (the interface of _columns.Columns)."""

    def records(self, paths: Sequence[str]) -> list[LeafRecord]:
        return [self[p] for p in paths]

    def summaries(self) -> tuple[list, ...]:
        """``(paths, origins, shapes, dtypes, nbytes, shardings, values)``, as Columns'."""
        recs = list(self.values())
        return ([r.path for r in recs], [r.origin for r in recs], [r.shape for r in recs],
                [r.dtype for r in recs], [_leaves.nbytes(r.origin, r.shape, r.dtype) for r in recs],
                [r.sharding for r in recs],
                [r.storage.value if r.origin == _leaves.PY else None for r in recs])


def records(where: str, items: Iterable[LeafRecord]) -> Records:
    """``items`` by path, refusing a path twice (other tools let names collide, e.g. Orbax's
    ``{"a.b": x, "a": {"b": y}}``, silently losing one value)."""
    out = Records()
    for rec in items:
        if rec.path in out:
            raise CorruptCheckpointError(
                f"{where}: entry {rec.path!r:.200} appears twice (two names that map to one "
                "path); refusing to guess which one is meant")
        out[rec.path] = rec
    return out


def nodes_for(leaves: Iterable[str], kinds: Mapping[str, str] | None = None
              ) -> tuple[_graph.Node, ...]:
    """Inner nodes for leaf paths whose containers were not recorded as such: every
    ancestor of a leaf and every path in ``kinds``, parents first, each a dict unless
    ``kinds`` (node path -> _graph kind) says otherwise. A path that is both a leaf and a
    node is refused later, by :func:`checked_nodes`."""
    kinds = dict(kinds or {})
    found: dict[str, str] = {"": kinds.get("", _graph.DICT)}
    for path in [*leaves, *kinds]:
        while path:
            path, _name = _graph.parent_and_name(path)
            if path in found:
                break
            found[path] = kinds.get(path, _graph.DICT)
    for path, kind in kinds.items():
        found.setdefault(path, kind)
    names = {_graph.DICT: "builtins.dict", _graph.LIST: "builtins.list",
             _graph.TUPLE: "builtins.tuple"}
    order = sorted(found, key=lambda p: (p.count("/") if p else -1, p))
    return tuple(_graph.Node(p, found[p], names[found[p]]) for p in order)


def checked_nodes(where: str, nodes: tuple[_graph.Node, ...], leaves: Mapping[str, Any]
                  ) -> Callable[[], tuple[_graph.Node, ...]]:
    """A ``Source.tree_nodes`` for nodes made by :func:`nodes_for`: refuses a path that is
    both a leaf and a node (``{"a": x, "a.b": y}`` in a safetensors file), and anything else
    our own commit file's tree may not hold (a list child not named by its index)."""

    def check() -> tuple[_graph.Node, ...]:
        for node in nodes:
            if node.path in leaves:
                raise CorruptCheckpointError(
                    f"{where}: entry {node.path!r:.200} is both a value and a container of "
                    "other entries")
        _decode.validate_tree(nodes, leaves, where)
        return nodes

    return check


class File(NamedTuple):
    """One file in a kvstore: the store of its folder and its key there, its path on a
    local disk (None elsewhere), and whether it is in an object store (see
    :attr:`_storage.Location.remote`)."""

    url: str
    kv: ts.KvStore
    key: str
    local: str | None = None
    remote: bool = False


MAX_RANK = 64
_MAX_LOG2_BYTES = 61.9  # as our own commit file's leaves: NumPy can describe the array


def check_shape(where: str, entry: str, shape: Any, itemsize: int) -> tuple[int, ...]:
    """``shape`` as a tuple, once it is a list or tuple of at most :data:`MAX_RANK` integers
    >= 0 whose array (its empty axes counted as 1) has fewer than ~2**62 bytes: what NumPy
    can describe. Otherwise :class:`CorruptCheckpointError` naming ``where`` and ``entry``
    (``[2**61, 2**61, 0]`` holds no bytes, and NumPy still refuses it as too big)."""
    ok = (isinstance(shape, list | tuple) and len(shape) <= MAX_RANK
          and all(type(d) is int and d >= 0 for d in shape))
    if ok and sum(math.log2(max(d, 1)) for d in shape) + math.log2(max(itemsize, 1)) \
            > _MAX_LOG2_BYTES:
        raise CorruptCheckpointError(
            f"{where}: entry {entry!r:.200}: bad shape {str(shape):.100}: too large")
    if not ok:
        raise CorruptCheckpointError(f"{where}: entry {entry!r:.200}: bad shape "
                                     f"{str(shape):.100}")
    return tuple(shape)


def host_buffer(where: str, rec: LeafRecord, shape: tuple[int, ...]) -> Any:
    """``_build.aligned_empty`` for a region of ``rec``; a size the host cannot allocate is
    a :class:`CorruptCheckpointError` naming the entry (another tool's files declare their
    arrays' shapes, and a damaged one can declare petabytes)."""
    dtype = _leaves.DTYPES[rec.dtype]
    try:
        return _build.aligned_empty(shape, dtype)
    except MemoryError:
        raise CorruptCheckpointError(
            f"{where}: entry {rec.path!r:.200}: {math.prod(shape) * dtype.itemsize} bytes "
            f"for a region of its declared shape {list(rec.shape)} cannot be allocated (a "
            "damaged shape, or a leaf larger than this host's memory)") from None


# What parsing a JSON file of another tool may cost, in bytes of Python objects as
# estimated by json_cost: ~11-15x a safetensors header or an Orbax _METADATA (a 90 MB
# header took 2.5 GB). Headers of ~8 MB (~145,000 tensors) and _METADATA files of ~11 MB
# (~70,000 leaves) are read, each then restored in under 10 s; no file makes the parser
# take more than this.
JSON_BUDGET = 128 << 20


def json_cost(data: bytes) -> int:
    """An upper estimate of the memory ``json.loads(data)`` takes, from byte counts (no
    parsing): a container ~100 bytes, a string ~50 (two quotes), a value or entry's slot
    ~40 (a comma or colon; a number is one of those values), plus the text itself."""
    return (len(data) + 100 * (data.count(b"{") + data.count(b"["))
            + 25 * data.count(b'"') + 40 * (data.count(b",") + data.count(b":")))


def check_json_cost(where: str, data: bytes) -> None:
    """:class:`CorruptCheckpointError` for JSON whose parsing :func:`json_cost` puts above
    :data:`JSON_BUDGET`: refused before any object is made for it."""
    cost = json_cost(data)
    if cost > JSON_BUDGET:
        raise CorruptCheckpointError(
            f"{where}: {len(data)} bytes of JSON would take ~{cost >> 20} MiB to parse, more "
            f"than the {JSON_BUDGET >> 20} MiB a reader allows (no real header or metadata "
            "file holds that many values)")


def check_file(f: File) -> None:
    """Refuses a local ``f`` that is a FIFO, device or socket (:class:`NotACheckpointError`):
    TensorStore's read of one would block until a writer came, maybe forever."""
    if f.local is not None:
        _storage.check_regular(f.local)


def read_file(f: File) -> bytes | None:
    """All of ``f``, or None if there is no such file; :func:`check_file` first. A fault of
    the store is a :class:`StorageError`."""
    check_file(f)
    return _whole(f)


def read_head(f: File, n: int) -> bytes | None:
    """The first ``n`` bytes of ``f`` (all of a shorter file), or None if it is not a file
    (a folder, or a name the store cannot read); :func:`check_file` first. A fault of the
    store is a :class:`StorageError`, never "no file there"."""
    check_file(f)
    try:
        result = f.kv.read(f.key, byte_range=slice(0, n)).result()
    except Exception as e:
        if is_storage_fault(e):  # refused or failing: not "no file there"
            raise storage_error(f.url, e) from e
        if "OUT_OF_RANGE" not in str(e):  # a folder, or a name the store cannot read
            return None
        return _whole(f)  # shorter than n
    return bytes(result.value) if result.state == "value" else None


def _whole(f: File) -> bytes | None:
    with faults(f.url):
        result = f.kv.read(f.key).result()
    return bytes(result.value) if result.state == "value" else None


def file_at(loc: _storage.Location) -> File | None:
    """The location taken as a file (a safetensors or msgpack file), or None if its path
    cannot name one (the root of a bucket)."""
    path = loc.spec.get("path", "").rstrip("/")
    if not path:
        return None
    parent, _, name = path.rpartition("/")
    spec = dict(loc.spec, path=parent + "/" if parent else "")
    if loc.spec.get("driver") == "file" and not parent:
        spec["path"] = "/"
    kv = ts.KvStore.open(spec, context=_storage.context()).result()
    local = loc.local.rstrip("/") if loc.local is not None else None
    return File(loc.url.rstrip("/"), kv, name, local, loc.remote)


def sibling(f: File, name: str) -> File:
    """The file ``name`` in ``f``'s folder (a shard named by an index file)."""
    parent = f.url.rstrip("/").rpartition("/")[0]
    local = os.path.join(os.path.dirname(f.local), name) if f.local is not None else None
    return File(f"{parent}/{name}", f.kv, name, local, f.remote)


def read_range(f: File, start: int, stop: int, what: str) -> bytes:
    """Bytes ``[start, stop)`` of ``f``, all of them, or :class:`CorruptCheckpointError`
    naming ``what`` (a range past the end of the file); :func:`check_file` first."""
    check_file(f)
    try:
        result = f.kv.read(f.key, byte_range=slice(start, stop)).result()
    except Exception as e:
        if "OUT_OF_RANGE" in str(e):  # TensorStore's answer to a range past the end
            raise CorruptCheckpointError(
                f"{f.url}: {what}: bytes {start}-{stop} lie past the end of the file") from None
        raise read_failed(f.url, e, f"{f.url}: {what}: cannot read bytes {start}-{stop} ({e})"
                          ) from e
    data = result.value if result.state == "value" else b""
    if len(data) != stop - start:
        raise CorruptCheckpointError(
            f"{f.url}: {what}: bytes {start}-{stop} lie past the end of the file")
    return bytes(data)
