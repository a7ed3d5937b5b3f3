"""Orbax checkpoints: an item folder, or a ``CheckpointManager`` step folder of items.

An **item folder** (one pytree, as ``StandardCheckpointer`` / ``PyTreeCheckpointer`` or a
manager's item writes it) holds:

- ``_METADATA`` (JSON): ``tree_metadata`` maps each leaf to its ``key_metadata`` (the keys
  from the root, ``key_type`` 1 a sequence index, 2 a dict key or attribute; keys are
  strings) and ``value_metadata.value_type``: ``jax.Array`` / ``np.ndarray`` (a zarr
  array), ``scalar`` (a Python int or float, stored as a 0-d array), ``string`` (its value
  in ``_strings.json``), ``None`` or an empty ``Dict`` / ``List`` / ``Tuple`` (no data).
  ``use_ocdbt`` and ``use_zarr3`` say how arrays are stored.
- the arrays, each named ``".".join(keys)``: with OCDBT, keys of that prefix inside the
  database rooted at the folder (``manifest.ocdbt``; the merged one, whatever the number of
  writing processes); without, the folder ``<name>/``. Zarr v2 (``.zarray``) by default,
  zarr3 (``zarr.json``) where ``use_zarr3``; chunks are the writer's shards.
- ``array_metadatas/process_<N>`` (JSON): per array its ``ext_metadata``; a typed PRNG
  key's key data is stored as a uint32 array, and ``{"random_key_impl": name}`` here is the
  only sign that it was a key.
- ``_sharding`` (JSON): per base64 name, the saved sharding (NamedSharding's mesh shape,
  axis names and partition spec are used, as our own saved shardings are).

A **step folder** holds ``_CHECKPOINT_METADATA`` and one folder per item (``default``,
``state``, ...): each item is a top-level name (``at="state"`` restores one). An item
saved with ``JsonSave`` (a ``metadata`` file) gives Python leaves. A folder with
``.orbax-checkpoint-tmp`` in its name is a save that never finished.

Every file is untrusted: sizes are bounded, two leaves may not share a storage name
(Orbax lets ``{"a.b": x, "a": {"b": y}}`` collide into one array), an array's stored
shape and dtype come from its own zarr metadata and must be a dtype we know, and a missing
chunk is an error, never zeros (``fill_missing_data_reads`` off).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import tensorstore as ts

from .. import _decode, _graph, _leaves, _source, _storage
from .._errors import CorruptCheckpointError, IncompleteCheckpointError
from .._faults import faults, read_failed
from .._format import LeafRecord, Storage
from . import orbax_read

ITEM_METADATA = "_METADATA"
STEP_METADATA = "_CHECKPOINT_METADATA"
JSON_ITEM = "metadata"  # what JsonSave writes in its item folder
TMP_MARK = ".orbax-checkpoint-tmp"
MAX_JSON_BYTES = 1 << 30
# A small cache for the OCDBT database's B-tree nodes: every array's open looks its name
# up in the same few nodes (the library's own context caches nothing).
_CACHE_BYTES = 64 << 20

_ARRAY_TYPES = {"jax.Array": _leaves.JAX, "np.ndarray": _leaves.NUMPY}
_EMPTY_NODES = {"Dict": _graph.DICT, "List": _graph.LIST, "Tuple": _graph.TUPLE}


def check_not_temporary(loc: _storage.Location) -> None:
    if TMP_MARK in loc.url:
        raise IncompleteCheckpointError(
            f"{loc.url}: an Orbax save that did not finish ({TMP_MARK} in its name)")


def open_item(loc: _storage.Location, kv: ts.KvStore) -> _source.Source:
    """The Orbax item folder at ``loc`` as a :class:`_source.Source`."""
    check_not_temporary(loc)
    _check_files(loc)
    recs, kinds = _item(loc, kv, "", _context())
    return _make_source(loc, recs, kinds, {"library": "orbax"})


def open_step(loc: _storage.Location, kv: ts.KvStore) -> _source.Source:
    """The CheckpointManager step folder at ``loc``: its items are the top-level names."""
    check_not_temporary(loc)
    _check_files(loc)
    meta = _json(loc.url, STEP_METADATA, _storage.read_key(kv, STEP_METADATA))
    context = _context()
    recs: list[LeafRecord] = []
    kinds: dict[str, str] = {"": _graph.DICT}
    for name, inside in sorted(_storage.child_names(loc, kv).items()):
        if TMP_MARK in name or inside is None:  # unfinished, or not a folder
            continue
        if ITEM_METADATA in inside:
            item = loc.child(name)
            more, more_kinds = _item(item, _storage.open_kvstore(item), _graph.escape(name),
                                     context)
        elif JSON_ITEM in inside:
            item = loc.child(name)
            more, more_kinds = _json_item(item, _storage.open_kvstore(item),
                                          _graph.escape(name))
        else:
            continue
        recs += more
        kinds.update(more_kinds)
    metrics = meta.get("metrics") if isinstance(meta, dict) else None
    writer = {"library": "orbax", "metrics": metrics if isinstance(metrics, dict) else {}}
    committed = meta.get("commit_timestamp_nsecs") if isinstance(meta, dict) else None
    if isinstance(committed, int) and not isinstance(committed, bool):
        writer["time"] = committed / 1e9  # seconds, as our own commit files say
    return _make_source(loc, recs, kinds, writer)


def _check_files(loc: _storage.Location) -> None:
    """Locally, refuses a FIFO, device or socket anywhere in the folder (one ``stat`` per
    file): TensorStore (the zarr and OCDBT drivers included) would block reading one."""
    if loc.local is not None:
        _storage.check_regular_tree(loc.local)


def _make_source(loc: _storage.Location, recs: list[LeafRecord], kinds: dict[str, str],
                 writer: dict[str, Any]) -> _source.Source:
    leaves = _source.records(loc.url, recs)
    nodes = _source.nodes_for(leaves, kinds)
    return _source.Source(
        format=_source.ORBAX, url=loc.url, version=0, leaves=leaves, nodes=nodes,
        tree_nodes=_source.checked_nodes(loc.url, nodes, leaves),
        read=lambda jobs, share: orbax_read.read(loc.url, jobs, loc.remote, share),
        writer=writer)


def _context() -> ts.Context:
    return ts.Context({"cache_pool": {"total_bytes_limit": _CACHE_BYTES}},
                      parent=_storage.context())


def _json(url: str, name: str, data: bytes | None) -> Any:
    """A JSON file's value. A key twice in one object keeps its last value, as Orbax's own
    reader does; what matters here, two leaves with one path or storage name, is checked
    where the leaves are listed."""
    if data is None:
        raise CorruptCheckpointError(f"{url}/{name}: missing")
    if len(data) > MAX_JSON_BYTES:
        raise CorruptCheckpointError(f"{url}/{name}: {len(data)} bytes is too large")
    _source.check_json_cost(f"{url}/{name}", data)
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{url}/{name}: malformed JSON ({e!s:.200})") from None


class _Entry:
    """One leaf of ``_METADATA``: its keys, path, storage name and value type."""

    __slots__ = ("keys", "path", "name", "value_type")

    def __init__(self, keys: list[str], path: str, value_type: str):
        self.keys, self.path, self.value_type = keys, path, value_type
        self.name = ".".join(keys)


def _entries(url: str, meta: Any, prefix: str) -> tuple[list[_Entry], dict[str, str]]:
    """The leaves ``_METADATA`` lists, and the kinds of the nodes they imply."""
    where = f"{url}/{ITEM_METADATA}"
    tree = meta.get("tree_metadata") if isinstance(meta, dict) else None
    if not isinstance(tree, dict):
        raise CorruptCheckpointError(f"{where}: no 'tree_metadata' object")
    entries, kinds = [], {prefix: _graph.DICT}
    for value in tree.values():
        keys, types, value_type = _entry_fields(where, value)
        path = prefix
        for key, key_type in zip(keys, types, strict=True):
            kinds.setdefault(path, _graph.LIST if key_type == 1 else _graph.DICT)
            path = _graph.child_path(path, key)
        if value_type in _EMPTY_NODES:
            kinds[path] = _EMPTY_NODES[value_type]
        else:
            entries.append(_Entry(keys, path, value_type))
    names: dict[str, str] = {}
    for e in entries:
        if e.name in names:
            raise CorruptCheckpointError(
                f"{where}: entries {names[e.name]!r:.100} and {e.path!r:.100} share the "
                f"storage name {e.name!r:.100} (Orbax stores them as one array)")
        names[e.name] = e.path
    return entries, kinds


def _entry_fields(where: str, value: Any) -> tuple[list[str], list[int], str]:
    keys = value.get("key_metadata") if isinstance(value, dict) else None
    meta = value.get("value_metadata") if isinstance(value, dict) else None
    ok = (isinstance(keys, list) and len(keys) <= 1000 and all(
        isinstance(k, dict) and isinstance(k.get("key"), str) and k.get("key_type") in (1, 2)
        for k in keys) and isinstance(meta, dict) and isinstance(meta.get("value_type"), str))
    if not ok:
        raise CorruptCheckpointError(f"{where}: malformed entry {str(value)!r:.200}")
    assert isinstance(keys, list) and isinstance(meta, dict)  # checked in ok
    value_type = meta["value_type"]
    if value_type not in (*_ARRAY_TYPES, "scalar", "string", "None", *_EMPTY_NODES):
        path = "/".join(k["key"] for k in keys)
        raise CorruptCheckpointError(
            f"{where}: entry {path!r:.200}: value type {value_type!r:.60} is not one this "
            "library reads (arrays, scalars, strings, None, empty containers)")
    return [k["key"] for k in keys], [k["key_type"] for k in keys], value_type


def _item(loc: _storage.Location, kv: ts.KvStore, prefix: str, context: ts.Context
          ) -> tuple[list[LeafRecord], dict[str, str]]:
    """The records of one item folder (paths under ``prefix``) and its nodes' kinds."""
    meta = _json(loc.url, ITEM_METADATA, _storage.read_key(kv, ITEM_METADATA))
    entries, kinds = _entries(loc.url, meta, prefix)
    strings = _strings(loc, kv, entries)
    impls = _key_impls(loc, kv)
    shardings = _shardings(loc, kv)
    arrays = [e for e in entries if e.value_type in _ARRAY_TYPES or e.value_type == "scalar"]
    stores = _open_arrays(loc, kv, arrays, bool(meta.get("use_ocdbt", True)),
                          bool(meta.get("use_zarr3", False)), context)
    scalars = {e.path: stores[e.path] for e in arrays if e.value_type == "scalar"}
    values = _read_scalars(loc.url, scalars)
    recs = []
    for e in entries:
        if e.value_type == "None":
            recs.append(LeafRecord(e.path, _leaves.PY, "none", (), None, Storage("v"), None))
        elif e.value_type == "string":
            recs.append(LeafRecord(e.path, _leaves.PY, "str", (), None,
                                   Storage("v", strings[e.name]), None))
        elif e.value_type == "scalar":
            value = values[e.path]
            recs.append(LeafRecord(e.path, _leaves.PY, type(value).__name__, (), None,
                                   Storage("v", value), None))
        else:
            recs.append(_array_record(loc.url, e, stores[e.path], impls.get(e.name),
                                      shardings.get(e.name)))
    return recs, kinds


def _array_record(url: str, e: _Entry, store: ts.TensorStore, impl: str | None,
                  sharding: Any) -> LeafRecord:
    dtype = _dtype_name(url, e, store)
    shape = _source.check_shape(url, e.path, [int(d) for d in store.shape],
                                _leaves.DTYPES[dtype].itemsize)
    origin = _ARRAY_TYPES[e.value_type]
    if impl is not None:
        key_shape = _leaves.prng_key_shape(impl) if isinstance(impl, str) else None
        if key_shape is None or dtype != "uint32" or shape[len(shape) - len(key_shape):] != \
                key_shape:
            raise CorruptCheckpointError(
                f"{url}: entry {e.path!r:.200}: PRNG key implementation {impl!r:.60} does not "
                f"fit its key data ({dtype}{list(shape)})")
        origin = _leaves.PRNGKEY
    saved = None
    if sharding is not None and origin == _leaves.JAX:
        try:
            saved = _decode.validate_sharding(sharding, f"{url}: entry {e.path!r:.200}",
                                               len(shape))
        except CorruptCheckpointError:
            saved = None  # display only: a sharding JAX would refuse is dropped, not fatal
    return LeafRecord(e.path, origin, dtype, shape, impl, Storage("o", store), saved)


def _dtype_name(url: str, e: _Entry, store: ts.TensorStore) -> str:
    name = store.dtype.name  # TensorStore's names are NumPy's and ml_dtypes' names
    if name not in _leaves.DTYPES or store.rank > 64:
        raise CorruptCheckpointError(
            f"{url}: entry {e.path!r:.200}: array of dtype {name} and rank {store.rank} "
            "cannot be read")
    return name


def _strings(loc: _storage.Location, kv: ts.KvStore, entries: list[_Entry]) -> dict[str, str]:
    wanted = [e for e in entries if e.value_type == "string"]
    if not wanted:
        return {}
    table = _json(loc.url, "_strings.json", _storage.read_key(kv, "_strings.json"))
    for e in wanted:
        if not (isinstance(table, dict) and isinstance(table.get(e.name), str)):
            raise CorruptCheckpointError(
                f"{loc.url}/_strings.json: entry {e.path!r:.200}: no string value")
    return table


def _key_impls(loc: _storage.Location, kv: ts.KvStore) -> dict[str, Any]:
    """PRNG implementation names by storage name, from every ``array_metadatas`` file."""
    out: dict[str, Any] = {}
    with faults(f"{loc.url}/array_metadatas"):
        keys = kv.list(ts.KvStore.KeyRange("array_metadatas/", "array_metadatas0")).result()
    for key in sorted(keys):
        name = key.decode("utf-8", "replace")
        doc = _json(loc.url, name, _storage.read_key(kv, name))
        items = doc.get("array_metadatas") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            raise CorruptCheckpointError(f"{loc.url}/{name}: no 'array_metadatas' list")
        for item in items:
            meta = item.get("array_metadata") if isinstance(item, dict) else None
            ext = meta.get("ext_metadata") if isinstance(meta, dict) else None
            if isinstance(meta, dict) and isinstance(ext, dict) and "random_key_impl" in ext:
                out[str(meta.get("param_name"))] = ext["random_key_impl"]
    return out


def _shardings(loc: _storage.Location, kv: ts.KvStore) -> dict[str, list]:
    """Saved NamedShardings by storage name, as ``[mesh shape, axis names, spec]``."""
    data = _storage.read_key(kv, "_sharding")
    if data is None:
        return {}
    doc = _json(loc.url, "_sharding", data)
    out = {}
    for encoded, text in (doc.items() if isinstance(doc, dict) else ()):
        if not (isinstance(text, str) and "NamedSharding" in text):
            continue  # one device: nothing to show or reuse (and a decode per leaf)
        try:
            name = base64.urlsafe_b64decode(encoded).decode("utf-8")
        except (ValueError, TypeError):
            continue  # display only
        try:
            s = json.loads(text)
        except (ValueError, TypeError):
            continue  # display only
        except RecursionError:  # a value of its own, unlike a malformed one
            raise CorruptCheckpointError(
                f"{loc.url}/_sharding: entry {name!r:.200}: nested too deep") from None
        if isinstance(s, dict) and s.get("sharding_type") == "NamedSharding":
            out[name] = [s.get("shape"), s.get("axis_names"), s.get("partition_spec")]
    return out


def _open_arrays(loc: _storage.Location, kv: ts.KvStore, entries: list[_Entry], ocdbt: bool,
                 zarr3: bool, context: ts.Context) -> dict[str, ts.TensorStore]:
    """Opens every entry's array (reading its zarr metadata), all at once."""
    if not entries:
        return {}
    base = (ts.KvStore.open({"driver": "ocdbt", "base": loc.spec}, context=context).result()
            if ocdbt else kv)
    spec = ts.Spec({"driver": "zarr3" if zarr3 else "zarr", "recheck_cached_data": False,
                    "recheck_cached_metadata": False, "fill_missing_data_reads": False})
    opening = [(e, ts.open(spec, kvstore=base / f"{e.name}/", open=True, read=True,
                           context=context)) for e in entries]
    out = {}
    for e, future in opening:
        try:
            out[e.path] = future.result()
        except Exception as err:
            raise read_failed(
                f"{loc.url}/{e.name}", err,
                f"{loc.url}: entry {e.path!r:.200}: cannot open its array {e.name!r:.100} "
                f"({err})") from err
    return out


def _read_scalars(url: str, stores: dict[str, ts.TensorStore]) -> dict[str, Any]:
    """Each scalar entry's Python value (a 0-d int or float array)."""
    reads = {path: store.read() for path, store in stores.items() if store.rank == 0}
    out = {}
    for path, store in stores.items():
        if path not in reads or store.dtype.numpy_dtype.kind not in "biuf":
            raise CorruptCheckpointError(
                f"{url}: entry {path!r:.200}: a scalar stored as {store.dtype}"
                f"{list(store.shape)}")
        try:
            out[path] = reads[path].result().item()
        except Exception as e:
            raise read_failed(url, e, f"{url}: entry {path!r:.200}: cannot read its value ({e})"
                              ) from e
    return out


def _json_item(loc: _storage.Location, kv: ts.KvStore, prefix: str
               ) -> tuple[list[LeafRecord], dict[str, str]]:
    """A JsonSave item: its JSON value's leaves as Python leaves."""
    doc = _json(loc.url, JSON_ITEM, _storage.read_key(kv, JSON_ITEM))
    recs: list[LeafRecord] = []
    kinds: dict[str, str] = {}
    stack = [(prefix, doc)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict | list):
            kinds[path] = _graph.DICT if isinstance(value, dict) else _graph.LIST
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack += [(_graph.child_path(path, str(k)), v) for k, v in items]
        else:
            name = "none" if value is None else type(value).__name__
            recs.append(LeafRecord(path, _leaves.PY, name, (), None, Storage("v", value), None))
    return recs, kinds
