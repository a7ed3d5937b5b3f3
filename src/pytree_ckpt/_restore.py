"""restore: match the target's paths against the checkpoint, read what matched, build a new tree.

Restore is pure: it never mutates the target and never prints. Every target path ends up in
exactly one of ``matched``, ``unmatched`` or ``mismatched``; every checkpoint path (under
``at``) no target path asked for is ``unused``. Unmatched and mismatched leaves keep the
target's value; a leaf is never filled with data of another shape.
"""

from __future__ import annotations

import os
import zlib
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from . import _graph, _leaves, _storage
from ._errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    PathCollisionError,
    PathNotFoundError,
    UnsupportedLeafError,
)
from ._format import COMMIT_FILE, Commit, LeafRecord, decode
from ._status import Cast, Mismatch, RestoreStatus

# Packed ranges closer than this are read as one range: fewer requests beat a few spare bytes.
_COALESCE_GAP = 256 << 10
_ALIGN = 64  # jax.device_put may alias 64-byte-aligned host memory on the CPU (no copy)


class Want(NamedTuple):
    """What the target asks for at one path."""

    kind: str  # a _leaves origin: jax, numpy, npscalar, prngkey or py
    dtype: np.dtype | None  # None for Python leaves
    shape: tuple[int, ...]
    sharding: Any = None  # jax.sharding.Sharding for jax / prngkey
    pytype: type | None = None  # for py and npscalar
    impl: str | None = None  # for prngkey


def load_commit(loc: _storage.Location, kv: Any) -> Commit:
    """Reads and validates the commit file, or says precisely why there is none."""
    try:
        data = _storage.read_key(kv, COMMIT_FILE)
    except Exception as e:
        raise CheckpointNotFoundError(f"{loc.url}: cannot read the commit file ({e})") from e
    if data is None:
        names = _storage.top_level_names(loc, kv)
        if not names:
            raise CheckpointNotFoundError(f"{loc.url}: no checkpoint there (nothing exists)")
        if any(n.startswith("d-") for n in names):
            raise IncompleteCheckpointError(
                f"{loc.url}: incomplete checkpoint (data but no {COMMIT_FILE}): a save did not "
                "finish, so nothing here is restorable")
        raise CheckpointNotFoundError(
            f"{loc.url}: not a checkpoint (no {COMMIT_FILE}; it holds "
            f"{', '.join(sorted(map(repr, names))[:5])})")
    return decode(data, f"{loc.url}/{COMMIT_FILE}")


def restore(path: str | os.PathLike | dict, target: Any = None, *, at: str | None = None,
            rename: Mapping[str, str] | Callable[[str], str] | None = None,
            ) -> tuple[Any, RestoreStatus]:
    """Restores a checkpoint into a new tree shaped like ``target``; returns it and the status.

    **Arguments:**

    - ``path``: where the checkpoint is (as for :func:`save`).
    - ``target``: a tree whose leaves say what to restore: concrete arrays or values (their
      shape, dtype, sharding and kind), ``jax.ShapeDtypeStruct`` (with ``.sharding``, or the
      default device), or None to rebuild the saved tree as nested dicts/lists/tuples with
      every leaf of the kind it was saved as.
    - ``at``: a checkpoint path; restore that subtree (e.g. ``"params"``) into ``target``.
    - ``rename``: ``{old_prefix: new_prefix}`` or a function mapping checkpoint paths to
      target paths, to follow renamed modules.

    Matching is by path. Leaves found with another shape, or a dtype that would lose
    information (int <-> float, narrowing ints), are ``mismatched`` and keep the target's
    value; float <-> float and widening int conversions are done and listed in ``cast``.

    **Returns:** ``(tree, status)``, a new tree and a :class:`RestoreStatus`.

    **Raises:** :class:`CheckpointNotFoundError`, :class:`IncompleteCheckpointError`,
    :class:`CorruptCheckpointError` (naming the leaf whose bytes fail their checksum),
    :class:`FormatVersionError`, :class:`PathNotFoundError` if ``at`` names nothing,
    :class:`UnsupportedLeafError` for a target leaf of an unknown type.

    Example::

        >>> state = {"params": {"w": jnp.ones(3)}, "step": 7}
        >>> _ = pc.save(state, "memory://doc/restore")
        >>> params, status = pc.restore("memory://doc/restore", {"w": jnp.zeros(3)},
        ...                             at="params")
        >>> status.matched, status.unused
        (('w',), ())
    """
    loc = _storage.location(path)
    kv = _storage.open_kvstore(loc)
    commit = load_commit(loc, kv)
    rename_fn = _graph.renamer(rename)
    entries = _select(commit, at, rename_fn, loc.url)
    if target is None:
        return _restore_saved(loc, kv, commit, entries, at, rename_fn)
    flat = _graph.flatten(target)
    wants = [_want(p, leaf) for p, leaf in zip(flat.paths, flat.leaves, strict=True)]
    matched, unmatched, mismatched, casts, jobs = [], [], [], [], []
    for path, want in zip(flat.paths, wants, strict=True):
        hit = entries.get(path)
        if hit is None:
            unmatched.append(path)
            continue
        verdict = _compare(hit[1], want)
        if verdict is None:
            mismatched.append(_mismatch(path, hit[1], want))
            continue
        matched.append(path)
        if verdict:
            casts.append(Cast(path, _dtype_str(hit[1]), _want_dtype_str(want)))
        jobs.append((path, hit[1], want))
    used = {entries[p][0] for p in matched} | {entries[m.path][0] for m in mismatched}
    values = _read_all(loc, kv, commit, jobs)
    leaves = [values.get(p, leaf) for p, leaf in zip(flat.paths, flat.leaves, strict=True)]
    status = RestoreStatus(
        matched=tuple(matched), unmatched=tuple(unmatched),
        unused=tuple(src for src, _ in entries.values() if src not in used),
        mismatched=tuple(mismatched), cast=tuple(casts))
    return jax.tree_util.tree_unflatten(flat.treedef, leaves), status


def _select(commit: Commit, at: str | None, rename_fn: Callable[[str], str], url: str
            ) -> dict[str, tuple[str, LeafRecord]]:
    """Checkpoint entries by target path (after ``at`` and ``rename``), with their own path."""
    out: dict[str, tuple[str, LeafRecord]] = {}
    for path, record in commit.leaves.items():
        rel = _graph.relative_to(path, at) if at is not None else path
        if rel is None:
            continue
        new = rename_fn(rel)
        if new in out:
            raise PathCollisionError(
                f"{url}: checkpoint paths {out[new][0]!r} and {path!r} both map to {new!r} "
                "after at=/rename")
        out[new] = (path, record)
    if at is not None and not out and not any(
            _graph.relative_to(n.path, at) is not None for n in commit.nodes):
        tops = sorted({_graph.split_path(p)[0] for p in commit.leaves if p})
        raise PathNotFoundError(
            f"{url}: at={at!r} names nothing in the checkpoint; its top-level names are "
            f"{tops[:20]}")
    return out


def _want(path: str, leaf: Any) -> Want:
    if isinstance(leaf, (jax.ShapeDtypeStruct, jax.Array)):
        sharding = getattr(leaf, "sharding", None) or jax.sharding.SingleDeviceSharding(
            _default_device())
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            # jax.random.key_impl takes arrays only; an abstract key's dtype knows its impl.
            impl = (str(jax.random.key_impl(leaf)) if isinstance(leaf, jax.Array)
                    else leaf.dtype._impl.name)
            data = jax.eval_shape(jax.random.key_data, leaf)
            return Want(_leaves.PRNGKEY, np.dtype(data.dtype), tuple(data.shape), sharding,
                        impl=impl)
        return Want(_leaves.JAX, np.dtype(leaf.dtype), tuple(leaf.shape), sharding)
    if isinstance(leaf, np.ndarray):
        return Want(_leaves.NUMPY, leaf.dtype, leaf.shape)
    if isinstance(leaf, np.generic):
        return Want(_leaves.NPSCALAR, leaf.dtype, (), pytype=type(leaf))
    if type(leaf) in _leaves.PY_TYPES.values():
        return Want(_leaves.PY, None, (), pytype=type(leaf))
    raise UnsupportedLeafError(
        f"target leaf {path or '<root>'!r} has type {type(leaf).__module__}."
        f"{type(leaf).__qualname__}; a target leaf must be an array, a "
        "jax.ShapeDtypeStruct, a NumPy scalar or None/bool/int/float/complex/str/bytes")


_PY_KIND = {bool: "b", int: "i", float: "f", complex: "c"}


def _compare(rec: LeafRecord, want: Want) -> bool | None:
    """None: mismatched; False: restored as saved; True: restored with a dtype conversion."""
    if want.kind == _leaves.PRNGKEY or rec.origin == _leaves.PRNGKEY:
        same = (want.kind == rec.origin and want.impl == rec.impl and want.shape == rec.shape
                and want.dtype == _leaves.DTYPES[rec.dtype])
        return False if same else None
    if want.kind == _leaves.PY:
        if rec.origin == _leaves.PY:
            saved = _leaves.PY_TYPES[rec.dtype]
            if saved is want.pytype:
                return False
            return True if (saved, want.pytype) == (int, float) else None
        if rec.shape != ():
            return None
        return True if _kind_fits(_leaves.item_kind(_leaves.DTYPES[rec.dtype]),
                                  _PY_KIND.get(want.pytype)) else None
    if rec.origin == _leaves.PY:
        saved = _leaves.PY_TYPES[rec.dtype]
        if want.shape != () or saved not in _PY_KIND:
            return None
        value = rec.storage.value
        fits = _kind_fits(_PY_KIND[saved], _leaves.item_kind(want.dtype))
        return True if fits and _value_fits(value, want.dtype) else None
    if rec.shape != want.shape:
        return None
    saved = _leaves.DTYPES[rec.dtype]
    if saved == want.dtype:
        return False
    return True if _castable(saved, want.dtype) else None


def _kind_fits(saved: str | None, target: str | None) -> bool:
    return saved is not None and (saved == target or (saved, target) in {("u", "i"), ("i", "u")})


def _value_fits(value: Any, dtype: np.dtype) -> bool:
    if isinstance(value, bool) or _leaves.item_kind(dtype) not in "iu":
        return True
    info = np.iinfo(dtype)
    return info.min <= value <= info.max


def _castable(saved: np.dtype, target: np.dtype) -> bool:
    s, t = _leaves.item_kind(saved), _leaves.item_kind(target)
    if s == t and s in "fc":
        return True  # float <-> float (and complex) conversions are asked for by the target
    if s in "iu" and t in "iu":
        return bool(np.can_cast(saved, target, "safe"))
    return False


def _dtype_str(rec: LeafRecord) -> str:
    return rec.dtype if rec.origin != _leaves.PY else rec.dtype


def _want_dtype_str(want: Want) -> str:
    if want.kind == _leaves.PY:
        return want.pytype.__name__ if want.pytype is not type(None) else "none"
    return want.dtype.name


def _mismatch(path: str, rec: LeafRecord, want: Want) -> Mismatch:
    saved = rec.dtype if rec.origin != _leaves.PRNGKEY else f"key<{rec.impl}>"
    target = _want_dtype_str(want) if want.kind != _leaves.PRNGKEY else f"key<{want.impl}>"
    return Mismatch(path, rec.shape, saved, want.shape, target)


def _saved_want(rec: LeafRecord) -> Want:
    """What restoring without a target gives back for ``rec``: the kind it was saved as."""
    dtype = _leaves.DTYPES.get(rec.dtype)
    if rec.origin == _leaves.PY:
        return Want(_leaves.PY, None, (), pytype=_leaves.PY_TYPES[rec.dtype])
    if rec.origin == _leaves.NPSCALAR:
        return Want(_leaves.NPSCALAR, dtype, (), pytype=dtype.type)
    if rec.origin == _leaves.NUMPY:
        return Want(_leaves.NUMPY, dtype, rec.shape)
    sharding = _saved_sharding(rec)
    return Want(rec.origin, dtype, rec.shape, sharding, impl=rec.impl)


def _saved_sharding(rec: LeafRecord) -> jax.sharding.Sharding:
    """The saved NamedSharding if this process's devices can hold it, else the default device."""
    if rec.sharding is not None and rec.origin == _leaves.JAX:
        mesh_shape, names, spec = rec.sharding
        devices = jax.devices()
        if int(np.prod(mesh_shape)) == len(devices):
            mesh = jax.sharding.Mesh(np.array(devices).reshape(mesh_shape), names)
            return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _restore_saved(loc: _storage.Location, kv: Any, commit: Commit,
                   entries: dict[str, tuple[str, LeafRecord]], at: str | None,
                   rename_fn: Callable[[str], str]) -> tuple[Any, RestoreStatus]:
    jobs = [(path, rec, _saved_want(rec)) for path, (_, rec) in entries.items()]
    values = _read_all(loc, kv, commit, jobs)
    # Inner nodes follow their leaves: re-rooted at ``at`` and renamed the same way.
    nodes = []
    for node in commit.nodes:
        rel = _graph.relative_to(node.path, at) if at is not None else node.path
        if rel is not None:
            nodes.append(node._replace(path=rename_fn(rel)))
    return _graph.rebuild(nodes, values), RestoreStatus(matched=tuple(entries))


# --- reading -------------------------------------------------------------------------------


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    offset = (-raw.ctypes.data) % _ALIGN
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _region_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((s.start or 0, d if s.stop is None else s.stop)
                 for s, d in zip(index, shape, strict=True)) if index else ()


def _read_all(loc: _storage.Location, kv: Any, commit: Commit,
              jobs: list[tuple[str, LeafRecord, Want]]) -> dict[str, Any]:
    """Reads every job's bytes concurrently, then builds each restored leaf."""
    hosts: dict[str, Any] = {}
    zarr_jobs = [j for j in jobs if j[1].storage.kind == "z"]
    packed_jobs = [j for j in jobs if j[1].storage.kind == "p"]
    pending = _start_zarr_reads(kv, commit, zarr_jobs)
    hosts.update(_read_packed(loc, kv, commit, packed_jobs))
    for path, (regions, futures, rec) in pending.items():
        for f in futures:
            try:
                f.result()
            except Exception as e:
                raise CorruptCheckpointError(
                    f"{loc.url}: leaf {rec.path!r}: cannot read its array data ({e})") from e
        hosts[path] = regions
    for path, rec, want in packed_jobs:
        if want.kind == _leaves.JAX:
            whole = hosts[path]
            hosts[path] = {key: whole[index] if index else whole
                           for key, index in _regions(rec, want).items()}
    out: dict[str, Any] = {}
    puts: list[tuple[str, Any, list]] = []  # leaves needing a device transfer
    for path, rec, want in jobs:
        if rec.origin == _leaves.PY:
            out[path] = _py_to_want(rec.storage.value, want)
        elif want.kind == _leaves.JAX and isinstance(hosts[path], dict):
            puts.append((path, rec, want))
        else:
            whole = hosts[path] if not isinstance(hosts[path], dict) else next(
                iter(hosts[path].values()))
            out[path] = _host_to_want(whole, rec, want)
    out.update(_to_devices(puts, hosts))
    return out


def _start_zarr_reads(kv: Any, commit: Commit, jobs: list[tuple[str, LeafRecord, Want]]
                      ) -> dict[str, tuple[dict, list, LeafRecord]]:
    opens = []
    for path, rec, want in jobs:
        s = rec.storage
        spec = _storage.array_spec(rec.shape, s.chunks, s.stored_dtype)
        opens.append((path, rec, want, _storage.open_array(
            kv, f"{commit.data}/a/{s.index}", spec, create=False)))
    pending = {}
    for path, rec, want, opening in opens:
        store = opening.result()
        stored = _leaves.DTYPES[rec.storage.stored_dtype]
        regions: dict[tuple, np.ndarray] = {}
        futures = []
        for key, index in _regions(rec, want).items():
            buf = _aligned_empty(tuple(b - a for a, b in key), stored)
            regions[key] = buf
            futures.append(_read_into(store, index, buf))
        pending[path] = (regions, futures, rec)
    return pending


def _regions(rec: LeafRecord, want: Want) -> dict[tuple, tuple[slice, ...]]:
    """The distinct regions to read: one per distinct device shard for a jax target."""
    shape = rec.shape
    if want.kind == _leaves.JAX:
        indices = want.sharding.addressable_devices_indices_map(shape)
        out = {}
        for index in indices.values():
            index = tuple(index) if index is not None else tuple(slice(None) for _ in shape)
            out.setdefault(_region_key(index, shape), index)
        return out
    whole = tuple(slice(0, d) for d in shape)
    return {_region_key(whole, shape): whole}


def _read_into(store: Any, index: tuple[slice, ...], buf: np.ndarray) -> Any:
    import tensorstore as ts

    # Reading into a buffer we own is ~2x faster than read() returning a new array, and the
    # buffer is 64-byte aligned so the CPU backend can adopt it without a copy.
    target = ts.array(buf, copy=False, write=True)
    return target.write(store[index] if index else store)


def _read_packed(loc: _storage.Location, kv: Any, commit: Commit,
                 jobs: list[tuple[str, LeafRecord, Want]]) -> dict[str, np.ndarray]:
    by_blob: dict[int, list[tuple[str, LeafRecord]]] = defaultdict(list)
    for path, rec, _ in jobs:
        by_blob[rec.storage.index].append((path, rec))
    reads = []
    for blob, items in by_blob.items():
        items.sort(key=lambda pr: pr[1].storage.offset)
        group: list[tuple[str, LeafRecord]] = []
        for item in items:
            s = item[1].storage
            if group and s.offset - _end(group[-1][1]) > _COALESCE_GAP:
                reads.append(_start_range(kv, commit, blob, group))
                group = []
            group.append(item)
        if group:
            reads.append(_start_range(kv, commit, blob, group))
    out = {}
    for start, future, group, blob in reads:
        result = future.result()
        data = result.value if result.state == "value" else b""
        view = memoryview(data)
        for path, rec in group:
            s = rec.storage
            chunk = view[s.offset - start:s.offset - start + s.nbytes]
            if len(chunk) != s.nbytes or zlib.crc32(chunk) != s.crc:
                raise CorruptCheckpointError(
                    f"{loc.url}: leaf {rec.path!r}: checksum mismatch in packed blob p/{blob} "
                    "(the stored bytes are damaged)")
            dtype = _leaves.DTYPES[rec.dtype]
            out[path] = np.frombuffer(chunk, dtype=dtype).reshape(rec.shape)
    return out


def _end(rec: LeafRecord) -> int:
    return rec.storage.offset + rec.storage.nbytes


def _start_range(kv: Any, commit: Commit, blob: int, group: list) -> tuple:
    start, stop = group[0][1].storage.offset, _end(group[-1][1])
    key = f"{commit.data}/p/{blob}"
    return start, kv.read(key, byte_range=slice(start, max(stop, start))), list(group), blob


def _as_logical(host: np.ndarray, rec: LeafRecord) -> np.ndarray:
    dtype = _leaves.DTYPES[rec.dtype]
    return host if host.dtype == dtype else host.view(dtype)


def _host_to_want(host: np.ndarray, rec: LeafRecord, want: Want) -> Any:
    host = _as_logical(host, rec)
    if want.kind == _leaves.PY:
        return want.pytype(host.reshape(()).item())
    if want.kind == _leaves.NPSCALAR:
        return want.pytype(host.astype(want.dtype).reshape(())[()])
    if want.kind == _leaves.NUMPY:
        return host.astype(want.dtype, copy=not host.flags.writeable)
    if want.kind == _leaves.PRNGKEY:
        data = jax.device_put(host, _default_device())
        key = jax.random.wrap_key_data(data, impl=want.impl)
        return jax.device_put(key, want.sharding) if want.sharding is not None else key
    sharding = want.sharding if want.sharding is not None else _default_device()
    return jax.device_put(host.astype(want.dtype, copy=False), sharding)


def _py_to_want(value: Any, want: Want) -> Any:
    if want.kind == _leaves.PY:
        return value if want.pytype is type(value) else want.pytype(value)
    arr = np.asarray(value, dtype=want.dtype)
    if want.kind == _leaves.NPSCALAR:
        return want.pytype(arr[()])
    if want.kind == _leaves.NUMPY:
        return arr
    sharding = want.sharding if want.sharding is not None else _default_device()
    return jax.device_put(arr, sharding)


def _default_device() -> jax.Device:
    return jax.devices()[0]


def _to_devices(puts: list[tuple[str, LeafRecord, Want]], hosts: dict[str, Any]
                ) -> dict[str, jax.Array]:
    """Moves every region to its devices in one batched transfer, then assembles arrays."""
    xs, devices, owners = [], [], []
    for path, rec, want in puts:
        regions = hosts[path]
        indices = want.sharding.addressable_devices_indices_map(rec.shape)
        for device, index in indices.items():
            index = tuple(index) if index is not None else tuple(slice(None) for _ in rec.shape)
            host = _as_logical(regions[_region_key(index, rec.shape)], rec)
            xs.append(host.astype(want.dtype, copy=False))
            devices.append(device)
            owners.append(path)
    placed = jax.device_put(xs, devices, may_alias=True) if xs else []
    shards: dict[str, list] = defaultdict(list)
    for path, arr in zip(owners, placed, strict=True):
        shards[path].append(arr)
    return {path: jax.make_array_from_single_device_arrays(rec.shape, want.sharding,
                                                          shards[path])
            for path, rec, want in puts}
