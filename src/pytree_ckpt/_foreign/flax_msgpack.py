"""Flax msgpack files (``flax.serialization.to_bytes`` / ``msgpack_serialize``).

The file is one msgpack object: the tree's state dict, where every container is a map with
string keys (dicts by key, lists and tuples by ``"0"``, ``"1"``, ..., dataclasses and
NamedTuples by field), ``None`` is nil and an empty container or optax ``EmptyState`` is
an empty map. Leaves that msgpack cannot hold are extension types::

    1  ndarray         packb([shape, dtype name, C-order bytes in the writer's order])
    2  Python complex  packb([real, imag])
    3  NumPy scalar    as 1, with shape []

An array over 2**30 bytes is written as ``{"__msgpack_chunked_array__": true,
"shape": {"0": d0, ...}, "chunks": {"0": ext 1, ...}}``: 1-D slices of the flattened array,
in numeric key order.

Without a target a list cannot be told from a map with keys ``"0"``, ``"1"``: both come
back as dicts (a target's list matches either way, by path). The whole file is read and
decoded at once (the format has no index), once its values are counted (at most
``MAX_VALUES``) and with msgpack's sizes bounded by the file's own;
bytes are taken as little-endian, as every JAX host writes them. Dtype names come from a
closed list (``_leaves.DTYPES``); nothing else in the file is interpreted.
"""

from __future__ import annotations

import enum
import math
from typing import Any, NamedTuple

import msgpack
import numpy as np

from .. import _build, _gc_pause, _graph, _leaves, _source
from .._errors import CorruptCheckpointError
from .._format import LeafRecord, Storage
from .._unpack import count_values

MAP_MARKERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])  # fixmap, map 16, map 32
CHUNKED = "__msgpack_chunked_array__"
_PY_NAMES = {tp: name for name, tp in _leaves.PY_TYPES.items()}


class Ext(enum.IntEnum):
    """Flax's msgpack extension codes."""

    NDARRAY = 1
    COMPLEX = 2
    NPSCALAR = 3


def is_msgpack_map(head: bytes) -> bool:
    """Whether a file's first byte starts a msgpack map (a state dict)."""
    return bool(head) and head[0] in MAP_MARKERS


class _Array(NamedTuple):
    """A decoded ext 1 or 3, made an array where its entry's path is known (errors name it)."""

    shape: list
    dtype: str
    data: bytes
    scalar: bool  # ext 3: a NumPy scalar


# The most values (leaves, containers, map keys) a file may hold: counted before anything is
# unpacked (_unpack.count_values), so that a file of one-byte values (2 MB of nils took
# 19.5 s and 1.5 GB, ~750 bytes a leaf) is refused at little cost. A model's state dict
# holds thousands; this admits ~250,000 leaves in maps, at ~200 MB and a few seconds.
MAX_VALUES = 500_000


def _unpack(data: bytes, where: str, ext_hook: Any = None, most: int = MAX_VALUES) -> Any:
    count_values(data, most)
    return msgpack.unpackb(
        data, raw=False, strict_map_key=False, use_list=True, max_str_len=len(data),
        max_bin_len=len(data), max_array_len=most, max_map_len=most, max_ext_len=len(data),
        object_pairs_hook=_map, **({"ext_hook": ext_hook} if ext_hook else {}))


def _map(pairs: list[tuple[Any, Any]]) -> dict:
    """A msgpack map, refusing a key twice (a plain dict would keep the last silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice!r:.100} appears twice in one map")
    return out


def _ext(where: str) -> Any:
    def hook(code: int, data: bytes) -> Any:
        if code == Ext.COMPLEX:
            pair = _unpack(data, where, most=3)
            if not (isinstance(pair, list) and len(pair) == 2
                    and all(type(x) in (int, float) for x in pair)):
                raise ValueError(f"bad complex number {pair!r:.60}")
            return complex(*pair)
        if code not in (Ext.NDARRAY, Ext.NPSCALAR):
            raise ValueError(f"unknown extension type {code}")
        parts = _unpack(data, where, most=4 + _source.MAX_RANK)
        if not (isinstance(parts, list) and len(parts) == 3):
            raise ValueError("an array record is not [shape, dtype, bytes]")
        shape, name, buf = parts
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        if name not in _leaves.DTYPES:
            raise ValueError(f"unknown dtype {name!r:.40}")
        if not (isinstance(shape, list) and isinstance(buf, bytes)):
            raise ValueError("an array record is not [shape, dtype, bytes]")
        return _Array(shape, name, buf, code == Ext.NPSCALAR)

    return hook


def open_file(f: _source.File) -> _source.Source:
    """The Flax msgpack file ``f`` as a :class:`_source.Source`."""
    data = _source.read_file(f) or b""
    try:
        with _gc_pause.paused():
            tree = _unpack(data, f.url, _ext(f.url))
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise CorruptCheckpointError(f"{f.url}: not a valid Flax msgpack file ({e!s:.200})"
                                     ) from None
    recs: list[LeafRecord] = []
    kinds: dict[str, str] = {}
    try:
        _walk(f.url, tree, "", recs, kinds)
    except RecursionError:
        raise CorruptCheckpointError(f"{f.url}: nested too deep") from None
    leaves = _source.records(f.url, recs)
    nodes = _source.nodes_for(leaves, kinds)
    return _source.Source(
        format=_source.FLAX_MSGPACK, url=f.url, version=0, leaves=leaves, nodes=nodes,
        tree_nodes=_source.checked_nodes(f.url, nodes, leaves), read=read,
        writer={"library": "flax.serialization"})


def _walk(url: str, node: Any, path: str, recs: list[LeafRecord], kinds: dict[str, str]
          ) -> None:
    if isinstance(node, dict) and CHUNKED in node:
        recs.append(_array(path, _unchunk(url, path, node), _leaves.NUMPY))
    elif isinstance(node, dict | list):
        kinds[path] = _graph.DICT if isinstance(node, dict) else _graph.LIST
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            if type(key) is int:
                key = str(key)
            elif type(key) is not str:
                raise CorruptCheckpointError(
                    f"{url}: under {path or '<root>'!r:.200}: a key of type "
                    f"{type(key).__name__} (expected str)")
            _walk(url, child, _graph.child_path(path, key), recs, kinds)
    elif isinstance(node, _Array):
        recs.append(_array(path, _numpy(url, path, node),
                           _leaves.NPSCALAR if node.scalar else _leaves.NUMPY))
    else:  # None, bool, int, float, complex, str, bytes: msgpack gives nothing else
        recs.append(LeafRecord(path, _leaves.PY, _PY_NAMES[type(node)], (), None,
                               Storage("v", node), None))


def _array(path: str, arr: np.ndarray, origin: str) -> LeafRecord:
    return LeafRecord(path, origin, arr.dtype.name, arr.shape, None, Storage("m", arr), None)


def _numpy(url: str, path: str, a: _Array) -> np.ndarray:
    """The array of an ext 1 or 3, checked: a shape NumPy can describe, bytes that fit it."""
    dtype = _leaves.DTYPES[a.dtype]
    shape = _source.check_shape(url, path, a.shape, dtype.itemsize)
    if len(a.data) != math.prod(shape) * dtype.itemsize or (a.scalar and shape):
        raise CorruptCheckpointError(
            f"{url}: entry {path!r:.200}: {len(a.data)} bytes for "
            f"{'a NumPy scalar of ' if a.scalar else ''}shape {list(shape)} of {a.dtype}")
    return np.frombuffer(a.data, dtype).reshape(shape)


def _unchunk(url: str, path: str, node: dict) -> np.ndarray:
    """The array of a chunked entry, checked: chunks "0".."n-1" of one dtype, 1-D, adding
    up to the shape."""
    shape, chunks = node.get("shape"), node.get("chunks")

    def in_order(d: Any) -> list | None:
        if not (isinstance(d, dict) and set(d) == {str(i) for i in range(len(d))}):
            return None
        return [d[str(i)] for i in range(len(d))]

    dims, parts = in_order(shape), in_order(chunks)
    ok = (dims is not None and parts is not None and parts
          and all(isinstance(p, _Array) and not p.scalar and len(p.shape) == 1
                  and p.dtype == parts[0].dtype for p in parts))
    arrays: list[np.ndarray] = []
    if ok and parts is not None:
        arrays = [_numpy(url, path, p) for p in parts]
        dims = _source.check_shape(url, path, dims, arrays[0].dtype.itemsize)
        ok = sum(p.size for p in arrays) == math.prod(dims)
    if not ok:
        raise CorruptCheckpointError(
            f"{url}: entry {path!r:.200}: malformed chunked array (chunks must be 1-D "
            "arrays of one dtype adding up to its shape)")
    assert dims is not None  # checked in ok
    return np.concatenate(arrays).reshape(dims)


def read(jobs: list[_build.Job], share: bool | None = None) -> dict[str, Any]:
    """The restored leaves of ``jobs`` (their values are decoded already, so no read is
    there to share: ``share`` is restore's ``share_reads``, unused)."""
    layouts = _build.Layouts()
    out = {}
    for path, rec, want in jobs:
        if rec.storage.kind == "v":
            out[path] = _build.py_to_want(rec.storage.value, want)
        else:
            out[path] = _build.build(rec, want, {(): rec.storage.value}, layouts, whole=True)
    return out
