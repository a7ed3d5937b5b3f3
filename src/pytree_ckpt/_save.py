"""save and save_async: snapshot in the caller's thread, write and commit in the background.

A save has three phases:

1. **Snapshot** (the only part ``save_async`` waits for): flatten the tree, classify every
   leaf, and copy the shards this process owns to host memory (see ``_copy_shards``). Small
   leaves are copied straight into this process's packed blobs. After this the caller may
   donate, mutate or delete its arrays.
2. **Write** (background): every zarr3 chunk concurrently, and the packed blobs a few at a
   time, through TensorStore, into a fresh generation folder ``d-<hex>`` of the checkpoint.
3. **Commit** (background): all processes report success; then the primary writes the commit
   file (atomically: TensorStore's file driver writes through a rename and fsyncs; an object
   store PUT is atomic) and only then deletes an overwritten checkpoint's old generation.

Until the commit file exists, nothing is restorable and earlier checkpoints are untouched.

Without ``overwrite``, the commit file is written only if there is still none (a conditional
write, as atomic as the store's): of two such saves racing to one path, the first to commit
wins and the other fails with :class:`SaveError`, instead of silently replacing a checkpoint
whose save had already returned. (With ``overwrite=True`` the last writer wins, as asked.)
A save that fails deletes its own uncommitted generation: a full disk is not left fuller.
"""

from __future__ import annotations

import base64
import collections
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import msgpack
import numpy as np

from . import _async, _distributed, _format, _gc, _graph, _leaves, _storage, _transfer
from ._errors import (
    CheckpointExistsError,
    NotACheckpointError,
    SaveError,
)
from ._format import COMMIT_FILE, LeafRecord, Storage

# Leaves up to this size are packed into a few blobs per process instead of a zarr array each:
# 10,000 small arrays (87 MB) become about 20 writes rather than 10,000.
PACK_BYTES = 256 << 10
PART_BYTES = 4 << 20  # packed leaves go in blobs of about this size, written a few at a time
_PARTS_IN_FLIGHT = 2
_ALIGN = 16
_BARRIER_TIMEOUT_S = float(os.environ.get("PYTREE_CKPT_BARRIER_TIMEOUT_S", 600))
_save_counter = 0


class _ArrayWrite(NamedTuple):
    index: int
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    stored_dtype: str
    shards: list[tuple[tuple[slice, ...], Any]]  # (index, host copy: see _copy_shards)


class _Packing:
    """Small leaves laid out in parts of about PART_BYTES, as parallel lists (one entry
    per leaf, no tuple each: a snapshot of 10,000 leaves waits for every object it keeps,
    and the cyclic collector then walks them).

    The leaves of part ``k`` are ``starts[k]:starts[k + 1]`` in the lists; ``values[i]``
    goes at ``offsets[i]`` of its part, ``sizes[i]`` bytes; ``buffer[i]``: it is a
    non-empty CPU jax.Array of a dtype in :data:`_BUFFER_DTYPES`."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.values: list[Any] = []
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        self.buffer: list[bool] = []
        self.starts: list[int] = []
        self.part_sizes: list[int] = []

    def add(self, path: str, value: Any, nbytes: int, buffer: bool) -> None:
        size = self.part_sizes[-1] if self.part_sizes else 0
        if not self.part_sizes or (size and size + nbytes > PART_BYTES):
            self.starts.append(len(self.paths))
            self.part_sizes.append(0)
            size = 0
        self.paths.append(path)
        self.values.append(value)
        self.offsets.append(size)
        self.sizes.append(nbytes)
        self.buffer.append(buffer)
        self.part_sizes[-1] = size + -(-nbytes // _ALIGN) * _ALIGN

    def part(self, k: int) -> slice:
        """Where part ``k``'s leaves are in the lists."""
        return slice(self.starts[k], self.starts[k + 1] if k + 1 < len(self.starts) else None)

    def placed(self, k: int) -> Iterator[tuple[str, int, int]]:
        """``(path, offset, nbytes)`` of part ``k``'s leaves."""
        at = self.part(k)
        return zip(self.paths[at], self.offsets[at], self.sizes[at], strict=True)


class _Snapshot(NamedTuple):
    nodes: tuple[_graph.Node, ...]
    # Per leaf, in tree order: LeafRecord fields (made records in the background).
    records: list[tuple]
    arrays: list[_ArrayWrite]
    n_arrays: int
    packing: _Packing
    parts: list[bytearray | None]  # with a copy, the packed parts (None once written)
    copied: bool  # without a copy, each part is packed from the leaves as it is written


def save(tree: Any, path: str | os.PathLike | dict, *, overwrite: bool = False) -> str:
    """Saves ``tree`` to ``path``; committed and durable when it returns.

    **Arguments:**

    - ``tree``: any pytree of ``jax.Array``, NumPy arrays and scalars, typed PRNG keys and
      Python ``None``/``bool``/``int``/``float``/``complex``/``str``/``bytes`` leaves.
    - ``path``: a local directory, or ``file://``, ``memory://``, ``gs://bucket/dir``,
      ``s3://bucket/dir``, or a TensorStore kvstore spec dict.
    - ``overwrite``: replace an existing checkpoint at ``path``. The old one stays intact and
      restorable until the new one is committed.

    Nothing is copied up front (the caller waits, so its arrays are the snapshot): peak
    memory is the tree and a few MiB. :func:`save_async` copies first, so that the caller
    may go on.

    **Returns:** the checkpoint's path, as a string.

    **Raises:** :class:`CheckpointExistsError` if a checkpoint is there and ``overwrite`` is
    False; :class:`NotACheckpointError` if ``path`` holds anything else (it is never
    deleted); :class:`UnsupportedLeafError` or :class:`PathCollisionError` naming the leaf;
    :class:`SaveError` if a write fails (nothing is committed).

    Example::

        >>> import jax.numpy as jnp, pytree_ckpt as pc
        >>> pc.save({"w": jnp.ones(3), "step": 7}, "memory://doc/save")
        'memory://doc/save'
    """
    # The caller waits: its leaves are the snapshot (no copy; see _snapshot).
    return _start(tree, path, overwrite, copy=False).result()


def save_async(tree: Any, path: str | os.PathLike | dict, *, overwrite: bool = False
               ) -> _async.SaveFuture:
    """Starts saving ``tree`` to ``path``; returns once the tree is snapshotted.

    The snapshot copies the shards this process owns to host memory (on the CPU backend,
    large arrays are copied by XLA asynchronously, ordered before any later computation, so
    the call does not wait for the bytes to move), so the caller may
    donate or overwrite its arrays at once (e.g. the next jitted step with
    ``donate_argnums``). Writing and committing continue in the background. A save started
    while another is in flight first waits for it.

    Small leaves are copied into packing buffers that are kept for the next save (touching
    fresh memory is what a snapshot mostly waited for): up to 256 MiB of host memory, the
    last save's small leaves, stays allocated between saves.

    **Arguments:** as :func:`save`.

    **Returns:** a :class:`SaveFuture`; ``result()`` returns the path once committed and
    re-raises any background error.

    **Raises:** at once, what :func:`save` raises before writing (existing checkpoint,
    foreign directory, unsupported leaf); later, from ``result()``, :class:`SaveError`.

    Example::

        >>> fut = pc.save_async({"w": jnp.zeros(2)}, "memory://doc/async")
        >>> fut.result()
        'memory://doc/async'
    """
    return _start(tree, path, overwrite, copy=True)


def _start(tree: Any, path: str | os.PathLike | dict, overwrite: bool, copy: bool
           ) -> _async.SaveFuture:
    _async.wait_all()
    loc = _storage.location(path)
    kv = _storage.open_kvstore(loc)
    # Read before the check: a commit landing after it makes ours fail, not replace it.
    seen = None if overwrite else _commit_stamp(kv)
    names = _check_destination(loc, kv, overwrite)
    snap = _snapshot(tree, copy=copy)
    global _save_counter
    _save_counter += 1
    name = f"pytree_ckpt/save/{_save_counter}"
    return _async.submit(
        lambda: _in_background(loc, kv, snap, names, name, seen), loc.url)


def _commit_stamp(kv: Any) -> bytes:
    """The commit file's storage generation now (TensorStore's "no value" one if absent)."""
    return kv.read(COMMIT_FILE, byte_range=slice(0, 0)).result().stamp.generation


def _check_destination(loc: _storage.Location, kv: Any, overwrite: bool) -> set[str]:
    """Refuses foreign or (without overwrite) committed destinations; returns the names
    found there (see :func:`_replaced_generations`)."""
    names = _storage.top_level_names(loc, kv)
    if not names:
        return set()
    foreign = sorted(n for n in names if n != COMMIT_FILE and not _is_ours(n))
    if foreign:
        raise NotACheckpointError(
            f"{loc.url}: refusing to write into a directory that is not a previous checkpoint "
            f"(it holds {', '.join(map(repr, foreign[:5]))}); choose an empty or new path"
        )
    if COMMIT_FILE in names and not overwrite:
        raise CheckpointExistsError(
            f"{loc.url}: a checkpoint already exists; pass overwrite=True to replace it"
        )
    return names


def _replaced_generations(kv: Any, names: set[str]) -> list[str]:
    """The data generation the current commit file names, to delete after our commit.

    Only that one: a ``d-*`` folder no commit file names may be another process's save in
    progress (two writers overwriting one path), and deleting it would leave that writer's
    commit file naming deleted data. Leftovers of crashed saves therefore stay (a
    CheckpointManager deletes its incomplete steps on start).

    Read in the background, not while the caller waits (decoding a 10,000-leaf commit file
    takes ~10-25 ms): reading it later is the same as a caller whose snapshot took longer.
    ``names`` (listed before the snapshot) keeps a generation committed since then."""
    if COMMIT_FILE not in names:
        return []
    committed = _committed_generation(kv)
    return [committed] if committed is not None and committed in names else []


def _committed_generation(kv: Any) -> str | None:
    """The generation named by the commit file now there (None if none, or unreadable)."""
    try:
        raw = _storage.read_key(kv, COMMIT_FILE)
    except Exception:
        return None
    return None if raw is None else _format.generation_of(raw)


def _is_ours(name: str) -> bool:
    # Data generations, and TensorStore's own temporary files of an interrupted commit.
    return name.startswith("d-") or name.startswith(COMMIT_FILE + ".")


def _snapshot(tree: Any, copy: bool = True) -> _Snapshot:
    """What to write, taken from ``tree``: with ``copy``, host copies of what this process
    writes (the caller may donate its arrays at once); without, the leaves themselves, for a
    caller that waits for the write (:func:`save`): nothing is copied up front, and small
    leaves are packed a few parts at a time as they are written (peak memory: the tree and a
    few MiB, where the copy was a second tree)."""
    # Runs once per leaf while the caller waits (10,000 leaves: each µs is 10 ms), hence
    # the names bound once below, describe's common case inlined, what depends on a
    # sharding asked once per sharding object, and sizes from the shape (jax's .nbytes
    # costs ~1 µs).
    me = _distributed.process_index()
    records: list[tuple] = []
    arrays: list[_ArrayWrite] = []
    packing = _Packing()
    pack = packing.add
    describe, itemsizes, prod = _leaves.describe, _ITEMSIZES, math.prod
    kinds, jax_dtypes, JAX = _leaves.ARRAY_KINDS, _leaves.JAX_DTYPES, _leaves.JAX  # noqa: N806
    PY, PRNGKEY, NUMPY, NPSCALAR = (  # noqa: N806
        _leaves.PY, _leaves.PRNGKEY, _leaves.NUMPY, _leaves.NPSCALAR)
    # id(sharding), or the device of a one-device sharding -> (sharding, *_placement(...)):
    # holding the sharding keeps its id from being reused (a PRNG key's data is a new
    # array, and may be dropped at once). Arrays made one by one each have a sharding
    # object of their own: keyed by id alone, every leaf would miss (~0.5 µs each).
    placement: dict[Any, tuple] = {}
    one_device, device_of = jax.sharding.SingleDeviceSharding, _transfer.device_of
    with _gc.paused():
        flat = _graph.flatten(tree, treedef=False)
        for path, leaf in zip(flat.paths, flat.leaves, strict=True):
            dtype = jax_dtypes.get(leaf.dtype) if kinds.get(type(leaf)) is JAX else None
            if dtype is not None:  # a jax.Array of a saved dtype, not a PRNG key
                origin, shape, impl, value = JAX, leaf.shape, None, leaf
            else:
                origin, dtype, shape, impl = describe(path, leaf)
                if origin is PY:
                    records.append((path, origin, dtype, (), None, Storage("v", leaf), None))
                    continue
                value = jax.random.key_data(leaf) if origin is PRNGKEY else leaf
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
                    pack(path, host, nbytes, on_cpu and nbytes > 0 and dtype in _BUFFER_DTYPES)
                storage = _PACKED
            else:
                chunks = tuple(_storage.choose_chunks(_shard_shape(value), itemsizes[dtype],
                                                      shape))
                stored = _stored_dtype(dtype)
                index = len(arrays)
                arrays.append(_ArrayWrite(index, shape, chunks, stored,
                                          _owned_shards(value, me)))
                storage = Storage("z", index=index, chunks=chunks, stored_dtype=stored)
            records.append((path, origin, dtype, shape, impl, storage, described))
        parts = [None] * len(packing.part_sizes)
        if copy:
            _copy_shards(arrays)
            parts = _pack(packing)
            packing.values.clear()  # copied: hold none of the caller's arrays
    return _Snapshot(tuple(flat.nodes), records, arrays, len(arrays), packing, parts, copy)


_ITEMSIZES = {name: dtype.itemsize for name, dtype in _leaves.DTYPES.items()}


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


def _describe_sharding(sharding: Any) -> tuple | None:
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    mesh = sharding.mesh
    spec = tuple(e if e is None or isinstance(e, str) else tuple(e) for e in sharding.spec)
    return (tuple(mesh.devices.shape), tuple(mesh.axis_names), spec)


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


def _copy_shards(arrays: list[_ArrayWrite]) -> None:
    """Replaces every shard in ``arrays`` by a copy in host memory that shares nothing with it.

    On the CPU, device memory is host memory: the copies are XLA ops, dispatched
    asynchronously and in one batch (the caller does not wait for 1 GiB to be copied; the
    150 arrays of a training state take ~4 ms, one by one ~10 ms), and read in the
    background as NumPy views of the copies' own buffers. ``np.asarray(x)`` itself would be
    a view of ``x``'s buffer: donating ``x`` would corrupt it (and holding it stops XLA
    from donating). From an accelerator, a device-to-host transfer; host values, a copy.
    """
    shards = [(owner, i, *owner[i]) for owner in (w.shards for w in arrays)
              for i in range(len(owner))]  # (its list, its place there, index, shard)
    on_cpu = [k for k, (*_, x) in enumerate(shards)
              if isinstance(x, jax.Array) and _is_cpu(x)]
    # device_put returns at once (a later computation that donates x waits for the copy);
    # jnp.array(x, copy=True) ran the copy before returning (16 arrays of 64 MiB: ~0.5 s
    # of the caller's time, mostly first touching memory).
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
    return {"float8_e4m3": "uint8", "int2": "uint8", "uint2": "uint8"}.get(name, name)


def _fill(part: Any, packing: _Packing, k: int) -> Any:
    """Copies part ``k``'s leaves into ``part`` (writable, its size); returns it.

    Every byte is written (leaves and the zeros between them), so a reused part carries
    nothing of the save it served before."""
    view, array = memoryview(part), np.frombuffer(part, np.uint8)
    at = packing.part(k)
    for value, offset, n, buffer in zip(packing.values[at], packing.offsets[at],
                                        packing.sizes[at], packing.buffer[at], strict=True):
        end = offset + n
        # Both read the device buffer in place (on the CPU, a view of it), and neither
        # view outlives the copy: one held would make XLA silently skip donating the
        # array. The buffer protocol is the faster (~1 µs a leaf); NumPy reads the
        # rest (ml_dtypes, other devices, host values, any layout).
        if buffer:
            view[offset:end] = memoryview(value).cast("B")
        else:
            array[offset:end] = np.asarray(value).ravel().view(np.uint8)
        if n % _ALIGN:
            view[end:end + _ALIGN - n % _ALIGN] = _PADS[_ALIGN - n % _ALIGN]
    del view, array
    return part


def _pack(packing: _Packing) -> list[bytearray]:
    """Copies the small leaves into their parts (from :data:`_pool` where it has one of
    the size). This copy is a save_async snapshot: the caller's arrays are free
    afterwards."""
    parts = _pool.take(packing.part_sizes)
    return [_fill(p, packing, k) for k, p in enumerate(parts)]


# The dtypes whose jax.Arrays the Python buffer protocol exports (not ml_dtypes: BufferError).
_BUFFER_DTYPES = frozenset(
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64 "
    "complex64 complex128".split())
_PADS = [bytes(n) for n in range(_ALIGN)]


class _PartPool:
    """Packing parts kept from one save for the next.

    Copying an 87 MB snapshot into fresh memory can cost 100-200 ms of page faults on a
    virtual machine that faults new pages in from its host, into memory touched before ~8 ms; the snapshot is what the caller of
    :func:`save_async` waits for. A training loop saves the same tree again and again, so
    the last save's parts are what the next one needs, size for size. The price is host
    memory: up to :data:`_POOL_BYTES` of parts stay allocated between saves (the small
    leaves' bytes of the last save), where they used to be freed once written.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, list[bytearray]] = {}
        self._bytes = 0

    def take(self, sizes: list[int]) -> list[bytearray]:
        """Parts of exactly these sizes, reused where the pool has one (contents stale).

        What the pool holds and this save does not use is dropped: the pool keeps only the
        last save's parts (a tree of other sizes would otherwise pin memory forever)."""
        with self._lock:
            free, self._free, self._bytes = self._free, {}, 0
        return [free[n].pop() if free.get(n) else bytearray(n) for n in sizes]

    def give(self, part: bytearray) -> None:
        """Returns a part whose write has ended (TensorStore copies what it is given)."""
        with self._lock:
            if self._bytes + len(part) <= _POOL_BYTES:
                self._free.setdefault(len(part), []).append(part)
                self._bytes += len(part)


_POOL_BYTES = 256 << 20
_pool = _PartPool()


def _in_background(loc: _storage.Location, kv: Any, snap: _Snapshot, names: set[str],
                   name: str, seen: bytes | None) -> str:
    try:
        return _write_and_commit(loc, kv, snap, names, name, seen)
    finally:
        # Every write has ended here, failed or not (_write_data waits for them).
        for k in range(len(snap.parts)):
            _release_part(snap, k)


def _write_and_commit(loc: _storage.Location, kv: Any, snap: _Snapshot, names: set[str],
                      name: str, seen: bytes | None) -> str:
    me = _distributed.process_index()
    primary = me == 0
    old = _replaced_generations(kv, names) if primary else []
    data = _distributed.broadcast_str(f"{name}/data", f"d-{uuid.uuid4().hex}" if primary
                                      else None, _BARRIER_TIMEOUT_S)
    error, entries = None, []
    try:
        entries = _write_data(kv, data, snap, me, primary)
        if loc.local is not None:
            # A tree of Python leaves only writes no data: the folder must exist to be synced
            # (and it makes the checkpoint's own directory exist, durably, before the commit).
            os.makedirs(os.path.join(loc.local, data), exist_ok=True)
            _storage.fsync_tree(os.path.join(loc.local, data))
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    # Every process reports; any failure (or silence) anywhere means no commit anywhere.
    try:
        _check(f"{name}/written", error, f"{loc.url}: save failed, nothing was committed")
    except SaveError:
        if primary:
            _discard(loc, kv, data)
        raise
    entries, sizes = _gather_packed(name, entries, snap, me)
    error = None
    if primary:
        try:
            _commit(loc, kv, snap, data, entries, sizes, old, seen)
        except _LostRace as e:
            _discard(loc, kv, data)
            error = str(e)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            if not _may_be_committed(kv, data):  # e.g. no space for the commit file
                _discard(loc, kv, data)
    _check(f"{name}/committed", error, f"{loc.url}: writing the commit file failed")
    return loc.url


def _check(name: str, error: str | None, what: str) -> None:
    try:
        _distributed.report_and_check(name, error, _BARRIER_TIMEOUT_S)
    except Exception as e:
        raise SaveError(f"{what}: {e}") from e


def _may_be_committed(kv: Any, data: str) -> bool:
    """Whether the commit file names ``data``, or cannot be read (a write that raised may
    still have landed: a lost reply from an object store)."""
    try:
        raw = _storage.read_key(kv, COMMIT_FILE)
    except Exception:
        return True
    return raw is not None and _format.generation_of(raw) == data


class _LostRace(Exception):
    """Another save committed to this path after this one started."""


def _discard(loc: _storage.Location, kv: Any, data: str) -> None:
    """Deletes this failed save's own, uncommitted generation, if it can (its error is the one
    to report; a leftover is harmless and a CheckpointManager deletes it on start).

    A failed array write reports its first error while TensorStore may still be writing its
    other chunks (on a full disk some fit, and deleting a folder being written to can fail),
    so on a local disk it deletes until the folder has stayed away for a moment (2 s at most).
    """
    folder = os.path.join(loc.local, data) if loc.local is not None else None
    start = quiet_since = time.monotonic()
    while True:
        try:
            if folder is None or os.path.exists(folder):
                _storage.delete_prefix(loc, kv, data)
                quiet_since = time.monotonic()
        except Exception:
            pass
        now = time.monotonic()
        if folder is None or now - quiet_since >= 0.3 or now - start >= 2:
            return
        time.sleep(0.05)


def _commit(loc: _storage.Location, kv: Any, snap: _Snapshot, data: str, entries: list,
            sizes: list, old: list[str], seen: bytes | None) -> None:
    """Writes the commit file (atomically; if ``seen``, only if its storage generation is
    still that), then deletes the generations it replaces."""
    commit = _format.Commit(
        data=data, nodes=snap.nodes, arrays=snap.n_arrays,
        blobs=tuple(sorted(sizes)), leaves=_finish_records(snap, entries, sorted(sizes)),
        writer=dict(_format.writer_info(_distributed.process_count(), time.time())),
        version=_format.FORMAT_VERSION,
    )
    written = _storage.write_key(loc, kv, COMMIT_FILE, _format.encode(commit), if_equal=seen)
    if not written.generation:  # TensorStore's answer to a failed condition
        raise _LostRace(
            f"another save committed a checkpoint to {loc.url} while this one was writing "
            "(with overwrite=False); this save was not committed and the other one is intact")
    if loc.local is not None:
        _storage.fsync_dir(os.path.dirname(loc.local.rstrip("/")))
    # Re-read: never delete what the commit file now names (should another writer's commit
    # have landed after ours, it names its own generation, which is not in ``old``).
    current = _committed_generation(kv)
    for generation in old:
        if generation not in (data, current):
            _storage.delete_prefix(loc, kv, generation)


def _write_data(kv: Any, data: str, snap: _Snapshot, me: int, primary: bool) -> list[tuple]:
    """Writes this process's chunks and packed parts; returns its packed leaves as
    ``(path, process, part, offset, nbytes, checksum)``."""
    opens = []
    for w in snap.arrays:
        spec = _storage.array_spec(w.shape, w.chunks, w.stored_dtype)
        if primary or w.shards:
            opens.append((w, _storage.open_array(kv, f"{data}/a/{w.index}", spec,
                                                 create=primary)))
    futures: list = []
    entries = []
    crc = _format.LEAF_CRC[_format.FORMAT_VERSION]
    in_flight: collections.deque = collections.deque()
    try:
        for w, opening in opens:
            store = opening.result()
            for index, host in w.shards:
                host = np.asarray(host)  # a CPU snapshot copy is a jax.Array: waits, no copy
                if host.dtype.name != w.stored_dtype:
                    host = host.view(_leaves.DTYPES[w.stored_dtype])
                futures.append(store[index].write(
                    host, can_reference_source_data_indefinitely=True))
        spare: list[bytearray] = []  # without a snapshot copy: buffers of written parts
        for k, size in enumerate(snap.packing.part_sizes):
            part, buffer = snap.parts[k], None
            if not snap.copied:
                buffer = _resized(spare.pop(), size) if spare else bytearray(size)
                part = _fill(buffer, snap.packing, k)
            view = np.frombuffer(part, np.uint8)
            entries += [(path, me, k, off, n, crc(view[off:off + n]))
                        for path, off, n in snap.packing.placed(k)]
            del view  # a part with a view cannot be resized for the next save
            in_flight.append((k, kv.write(f"{data}/p/{me}/{k}", part), buffer))
            if len(in_flight) >= _PARTS_IN_FLIGHT:
                _finish_part(snap, spare, *in_flight.popleft())
        while in_flight:
            _finish_part(snap, spare, *in_flight.popleft())
        for f in futures:
            f.result()
    except BaseException:
        # Let every write end before reporting the failure: the generation is deleted then,
        # and a write still in flight would put files back into it.
        for f in [*(o for _, o in opens), *futures, *(f for _, f, _ in in_flight)]:
            f.exception()
        raise
    return entries


def _resized(buffer: bytearray, size: int) -> bytearray:
    # In place (TensorStore takes bytes or a bytearray, not a view): CPython keeps a
    # bytearray's memory when it shrinks a little or grows within its allocation.
    if len(buffer) > size:
        del buffer[size:]
    else:
        buffer.extend(bytes(size - len(buffer)))
    return buffer


def _finish_part(snap: _Snapshot, spare: list[bytearray], k: int, future: Any,
                 buffer: bytearray | None) -> None:
    # A few parts in flight at a time, each released once written: TensorStore copies what
    # it is given, so writing every part at once would hold the small leaves three times.
    future.result()
    if buffer is not None:
        spare.append(buffer)  # packed in place of the snapshot's part: reused for the next
    else:
        _release_part(snap, k)


def _release_part(snap: _Snapshot, k: int) -> None:
    part = snap.parts[k]
    if part is not None:
        snap.parts[k] = None
        _pool.give(part)


def _gather_packed(name: str, entries: list[tuple], snap: _Snapshot, me: int
                   ) -> tuple[list[tuple], list[tuple[int, int, int]]]:
    """Every process's packed leaves and blob sizes (on the primary; others get theirs)."""
    sizes = [(me, k, n) for k, n in enumerate(snap.packing.part_sizes)]
    if _distributed.is_multiprocess():
        mine = base64.b64encode(msgpack.packb([entries, sizes])).decode()
        gathered = _distributed.gather_str(f"{name}/packed", mine, _BARRIER_TIMEOUT_S)
        entries, sizes = [], []
        for text in gathered or []:
            e, s = msgpack.unpackb(base64.b64decode(text))
            entries += [tuple(x) for x in e]
            sizes += [tuple(x) for x in s]
    return entries, sizes


def _finish_records(snap: _Snapshot, entries: list[tuple], blobs: list[tuple]
                    ) -> dict[str, LeafRecord]:
    index = {(proc, part): i for i, (proc, part, _) in enumerate(blobs)}
    placed = {path: Storage("p", index=index[proc, part], offset=offset, nbytes=n, crc=crc)
              for path, proc, part, offset, n, crc in entries}
    missing = [f[0] for f in snap.records if f[5].kind == "p" and f[0] not in placed]
    if missing:
        raise SaveError(f"no process wrote the small leaves {missing[:5]}")
    # One record per leaf, a packed leaf's with the place its process wrote it to.
    return {f[0]: LeafRecord(*f[:5], placed.get(f[0], f[5]), f[6]) for f in snap.records}
