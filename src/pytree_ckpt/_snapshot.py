"""The snapshot: what a save writes, taken from the caller's tree while it waits.

:func:`snapshot` flattens the tree, classifies every leaf (a Python value kept in the commit
file, a small leaf packed into this process's blobs, or a zarr3 array of the shards this
process owns), and, for ``save_async``, copies what this process writes to host memory, after
which the caller may donate, mutate or delete its arrays.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Collection
from typing import Any, NamedTuple

import jax
import numpy as np

from . import _carry, _distributed, _gc_pause, _graph, _leaves, _packing, _storage, _transfer
from ._format import SavedSharding, Storage

# Leaves up to this size are packed into a few blobs per process instead of a zarr array each:
# 10,000 small arrays (87 MB) become about 20 writes rather than 10,000.
PACK_BYTES = 256 << 10


class ArrayWrite(NamedTuple):
    index: int  # pyright: ignore[reportIncompatibleMethodOverride]  # a field, as tuple.index is never called
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    stored_dtype: str
    shards: list[tuple[tuple[slice, ...], Any]]  # (index, host copy: see _copy_shards)


class Snapshot(NamedTuple):
    nodes: tuple[_graph.Node, ...]
    # Per leaf, in tree order: LeafRecord fields (made records in the background).
    records: list[tuple]
    arrays: list[ArrayWrite]
    n_arrays: int
    packing: _packing.Packing
    parts: list[bytearray | None]  # with a copy, the packed parts (None once written)
    copied: bool  # without a copy, each part is packed from the leaves as it is written
    # Leaves the base step holds unchanged: path -> (their ArrayWrite's index, the leaf,
    # where the base has it); their shards are neither taken nor copied until :func:`settle`.
    candidates: dict[str, tuple[int, Any, _carry.Carried]]
    objects: dict[str, weakref.ref]  # every jax.Array saved as a zarr array, by path
    # After settle: the carried leaves' chunk CRC-32Cs, and the step folders they are in.
    carried: dict[str, Any]
    refs: tuple[tuple[str, str], ...]
    base: tuple[str, str] | None  # the base step's folder and generation, if any


def snapshot(tree: Any, copy: bool = True, base: _carry.Base | None = None) -> Snapshot:
    """What to write, taken from ``tree``: with ``copy``, host copies of what this process
    writes (the caller may donate its arrays at once); without, the leaves themselves, for a
    caller that waits for the write (:func:`save`): nothing is copied up front, and small
    leaves are packed a few parts at a time as they are written (peak memory: the tree and a
    few MiB, where the copy was a second tree).

    With a ``base``, a jax.Array that is the same live object as ``base`` saved, with the
    same record, is a candidate to carry: see :func:`settle`."""
    # Runs once per leaf while the caller waits, hence
    # the names bound once below, describe's common case inlined, what depends on a
    # sharding asked once per sharding object, and sizes from the shape (jax's .nbytes
    # is a Python property, per leaf).
    me = _distributed.process_index()
    records: list[tuple] = []
    arrays: list[ArrayWrite] = []
    candidates: dict[str, tuple[int, Any, _carry.Carried]] = {}
    objects: dict[str, weakref.ref] = {}
    packing = _packing.Packing()
    pack = packing.add
    describe, itemsizes, prod = _leaves.describe, _ITEMSIZES, math.prod
    kinds, jax_dtypes, JAX = _leaves.ARRAY_KINDS, _leaves.JAX_DTYPES, _leaves.JAX  # noqa: N806
    PY, PRNGKEY, NUMPY, NPSCALAR = (  # noqa: N806
        _leaves.PY, _leaves.PRNGKEY, _leaves.NUMPY, _leaves.NPSCALAR)
    # id(sharding), or the device of a one-device sharding -> (sharding, *_placement(...)):
    # holding the sharding keeps its id from being reused (a PRNG key's data is a new
    # array, and may be dropped at once). Arrays made one by one each have a sharding
    # object of their own: keyed by id alone, every leaf would miss.
    placement: dict[Any, tuple] = {}
    one_device, device_of = jax.sharding.SingleDeviceSharding, _transfer.device_of
    with _gc_pause.paused():
        flat = _graph.flatten(tree, treedef=False)
        _check_paths(flat)
        for path, leaf in zip(flat.paths, flat.leaves, strict=True):
            dtype = jax_dtypes.get(leaf.dtype) if kinds.get(type(leaf)) is JAX else None
            if dtype is not None:  # a jax.Array of a saved dtype, not a PRNG key
                origin, shape, impl, value = JAX, leaf.shape, None, leaf
            else:
                origin, dtype, shape, impl = describe(path, leaf)
                if origin is PY:
                    records.append((path, origin, dtype, (), None, Storage("v", leaf), None,
                                    False))
                    continue
                value: Any = jax.random.key_data(leaf) if origin is PRNGKEY else leaf
                if origin is NUMPY:
                    value = _leaves.little_endian(value)
            nbytes = prod(shape) * itemsizes[dtype]
            sharding = None if origin is NUMPY or origin is NPSCALAR else value.sharding
            key = device_of(sharding) if type(sharding) is one_device else id(sharding)
            where = placement.get(key)
            if where is None:
                where = placement[key] = (sharding, *_placement(sharding, me))
            _, whole, mine, on_cpu, described = where
            if nbytes <= PACK_BYTES and whole:
                host = value if mine else None
                if mine is None:  # replicated: where its replica 0 is, leaf by leaf
                    host, on_cpu = _replica_zero(value)
                elif mine and not on_cpu and sharding is not None:
                    value.copy_to_host_async()  # overlaps the transfers of all leaves
                if host is not None:  # this process writes it: packing copies it
                    pack(path, host, nbytes, on_cpu and nbytes > 0 and dtype in _packing.BUFFER_DTYPES)
                storage = _PACKED
            else:
                chunks = tuple(_storage.choose_chunks(_shard_shape(value), itemsizes[dtype],
                                                      shape))
                stored = _stored_dtype(dtype)
                index = len(arrays)
                storage = Storage("z", index=index, chunks=chunks, stored_dtype=stored)
                source = None
                if origin is JAX:
                    objects[path] = weakref.ref(leaf)
                    source = _carry.carried(base, path, leaf)
                if source is not None and _carry.same_record(source.record, (
                        path, origin, dtype, shape, impl, storage, described, leaf.weak_type)):
                    candidates[path] = (index, value, source)
                    arrays.append(ArrayWrite(index, shape, chunks, stored, []))
                else:
                    arrays.append(ArrayWrite(index, shape, chunks, stored,
                                             _owned_shards(value, me)))
            records.append((path, origin, dtype, shape, impl, storage, described,
                            origin is JAX and leaf.weak_type))
        parts: list[bytearray | None] = [None] * len(packing.part_sizes)
        if copy:
            _copy_shards(arrays)
            parts[:] = _packing.pack(packing)
            packing.values.clear()  # copied: hold none of the caller's arrays
    return Snapshot(tuple(flat.nodes), records, arrays, len(arrays), packing, parts, copy,
                    candidates, objects, {}, (),
                    None if base is None else (base.step, base.commit.data))


def settle(snap: Snapshot, carry: Collection[str]) -> Snapshot:
    """The snapshot once the processes agreed to carry the candidates ``carry``: those
    refer to the base's data (their records name it, with their writer's array id); the
    other candidates' shards are taken (and copied, for a snapshot that copies) now, and the
    arrays written are numbered again from 0."""
    if not snap.candidates:
        return snap
    me = _distributed.process_index()
    sources = {path: snap.candidates[path][2] for path in carry}
    refs = tuple(dict.fromkeys((c.step, c.generation) for c in sources.values()))
    ref_of = {r: k + 1 for k, r in enumerate(refs)}
    dropped = {snap.candidates[path][0] for path in sources}
    late = {index: value for path, (index, value, _) in snap.candidates.items()
            if path not in sources}
    arrays, number, taken = [], {}, []
    for w in snap.arrays:
        if w.index in dropped:
            continue
        number[w.index] = len(arrays)
        if w.index in late:
            w = w._replace(shards=_owned_shards(late[w.index], me))
            taken.append(w)
        arrays.append(w._replace(index=len(arrays)))
    if snap.copied:
        _copy_shards(taken)
    records = []
    for r in snap.records:
        s = r[5]
        if s.kind == "z":
            c = sources.get(r[0])
            if c is not None:
                s = c.record.storage._replace(ref=ref_of[c.step, c.generation])
            else:
                s = s._replace(index=number[s.index])
            r = (*r[:5], s, *r[6:])
        records.append(r)
    return snap._replace(records=records, arrays=arrays, n_arrays=len(arrays),
                         candidates={}, carried={p: c.chunk_crcs for p, c in sources.items()},
                         refs=refs)


_ITEMSIZES = {name: dtype.itemsize for name, dtype in _leaves.DTYPES.items()}


def _check_paths(flat: _graph.Flat) -> None:
    """Every path can be written to the commit file (msgpack writes UTF-8): checked here,
    while the caller waits, rather than when the commit file is written after the data.
    One encode of all paths joined, not one per path; path by path only to name one."""
    paths = [*flat.paths, *(n.path for n in flat.nodes)]
    try:
        "\n".join(paths).encode("utf-8")
    except UnicodeEncodeError:
        for path in paths:
            _leaves.check_text(path, path, "path")


def _placement(sharding: Any, me: int) -> tuple[bool, bool | None, bool, tuple | None]:
    """What a snapshot needs of a leaf's sharding (None: a host value), asked once per
    sharding object: ``(whole, mine, on_cpu, described)``.

    ``whole``: the array is whole on some device (packed if small). ``mine``: this process
    writes it when packed (None: a replicated array, asked leaf by leaf, see
    :func:`_replica_zero`). ``on_cpu``: its one device is a CPU. ``described``: the
    sharding as the commit file records it (None for one device)."""
    if sharding is None:
        return True, me == 0, False, None
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        device = _transfer.device_of(sharding)
        return True, device.process_index == me, device.platform == "cpu", None
    whole = sharding.is_fully_replicated or len(sharding.device_set) == 1
    return whole, None, False, _describe_sharding(sharding)


_PACKED = Storage("p")  # a packed leaf's storage until its blob and offset are known


def _describe_sharding(sharding: Any) -> SavedSharding | None:
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    mesh = sharding.mesh
    assert mesh.devices is not None  # a saved array's mesh is concrete
    spec = tuple(e if e is None or isinstance(e, str) else tuple(e) for e in sharding.spec)
    return SavedSharding(tuple(mesh.devices.shape), tuple(mesh.axis_names), spec,
                         tuple(t.name for t in mesh.axis_types),
                         tuple(d.id for d in mesh.devices.flat))


def _is_cpu(x: jax.Array) -> bool:
    return all(d.platform == "cpu" for d in x.sharding.device_set)


def _replica_zero(value: jax.Array) -> tuple[Any, bool]:
    """``(replica 0 of a replicated array, whether it is on a CPU)`` if this process holds
    it (and so writes it, by packing, which copies it), else ``(None, False)``."""
    for shard in value.addressable_shards:
        if shard.replica_id == 0:
            return shard.data, shard.device.platform == "cpu"
    return None, False


def _owned_shards(value: Any, me: int) -> list[tuple[tuple[slice, ...], Any]]:
    """(index, shard) of every shard this process writes: replica 0 of each region."""
    if not isinstance(value, jax.Array):
        return [(tuple(slice(None) for _ in np.shape(value)), value)] if me == 0 else []
    owned = [s for s in value.addressable_shards if s.replica_id == 0]
    for s in owned:
        if s.device.platform != "cpu":
            s.data.copy_to_host_async()  # overlaps the transfers of all shards
    return [(s.index, s.data) for s in owned]


def _copy_shards(arrays: list[ArrayWrite]) -> None:
    """Replaces every shard in ``arrays`` by a copy in host memory that shares nothing with it.

    On the CPU, device memory is host memory: the copies are XLA ops, dispatched
    asynchronously and in one batch (the caller does not wait for the copies to be made;
    one batch dispatches faster than one call per array), and read in the
    background as NumPy views of the copies' own buffers. ``np.asarray(x)`` itself would be
    a view of ``x``'s buffer: donating ``x`` would corrupt it (and holding it stops XLA
    from donating). From an accelerator, a device-to-host transfer; host values, a copy.
    """
    shards = [(owner, i, *owner[i]) for owner in (w.shards for w in arrays)
              for i in range(len(owner))]  # (its list, its place there, index, shard)
    on_cpu = [k for k, (*_, x) in enumerate(shards)
              if isinstance(x, jax.Array) and _is_cpu(x)]
    # device_put returns at once (a later computation that donates x waits for the copy);
    # jnp.array(x, copy=True) runs the copy before returning, on the caller's time (mostly
    # first touching memory).
    copies = dict(zip(on_cpu, jax.device_put([shards[k][3] for k in on_cpu], may_alias=False),
                      strict=True))
    for k, (owner, i, index, x) in enumerate(shards):
        if k in copies:
            owner[i] = (index, copies[k])
        elif isinstance(x, jax.Array):
            owner[i] = (index, np.asarray(x))
        else:
            owner[i] = (index, np.array(x, copy=True, order="C"))


def _shard_shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, jax.Array):
        return tuple(value.sharding.shard_shape(value.shape))
    return tuple(np.shape(value))


def _stored_dtype(name: str) -> str:
    # TensorStore's zarr3 lacks a few ml_dtypes; their bytes go in as same-width uints.
    return {"float8_e4m3": "uint8", "int2": "uint8", "uint2": "uint8", "uint4": "uint8"}.get(
        name, name)
