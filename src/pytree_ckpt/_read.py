"""Reading matched leaves and building them as the target asks: the I/O half of restore.

Zarr arrays are read region by region, each device's region straight into a 64-byte-aligned
buffer that the CPU backend adopts without a copy; every read is issued before any is
waited for. Packed small leaves are read as byte ranges of their blobs (nearby ranges
coalesced), a few ranges in flight at a time, each checked against its CRC-32 and turned
into leaves before its bytes are dropped, so a restore holds little beyond the tree itself.
"""

from __future__ import annotations

import collections
import math
import zlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
import tensorstore as ts

from . import _gc, _leaves, _storage, _transfer
from ._errors import CheckpointError, CorruptCheckpointError
from ._format import Commit, LeafRecord

_COALESCE_GAP = 256 << 10  # nearby packed ranges are read as one: fewer requests
_RANGE_BYTES = 4 << 20  # ...up to about this size each
_RANGES_IN_FLIGHT = 4
_SLAB_BYTES = 8 << 20  # large regions are read as slabs of about this size, concurrently
_ALIGN = 64  # the CPU backend adopts 64-byte-aligned host memory without a copy


class Want(NamedTuple):
    """What the target asks for at one path."""

    kind: str  # a _leaves origin: jax, numpy, npscalar, prngkey or py
    dtype: np.dtype | None  # None for Python leaves
    shape: tuple[int, ...]
    sharding: Any = None  # jax.sharding.Sharding for jax / prngkey
    pytype: type | None = None  # for py and npscalar
    impl: str | None = None  # for prngkey


Job = tuple[str, LeafRecord, Want]  # (target path, saved leaf, what the target wants)


def default_device() -> jax.Device:
    return jax.local_devices()[0]


def read_leaves(url: str, kv: Any, commit: Commit, jobs: list[Job]) -> dict[str, Any]:
    """Reads every job's data and returns the restored leaves by target path."""
    out: dict[str, Any] = {}
    layouts = _Layouts()
    with _gc.paused():
        zarr = _start_zarr_reads(kv, commit, [j for j in jobs if j[1].storage.kind == "z"],
                                 layouts, url)
        for path, rec, want, host in _read_packed(url, kv, commit,
                                                  [j for j in jobs if j[1].storage.kind == "p"]):
            out[path] = _build(rec, want, {(): host}, layouts, whole=True)
        for path, rec, want, regions, futures in zarr:
            for f in futures:
                try:
                    f.result()
                except Exception as e:
                    raise CorruptCheckpointError(
                        f"{url}: leaf {rec.path!r}: cannot read its array data ({e})") from e
            out[path] = _build(rec, want, regions, layouts, whole=False)
        for path, rec, want in jobs:
            if rec.storage.kind == "v":
                out[path] = _py_to_want(rec.storage.value, want)
    return out


class _Layouts:
    """Per (sharding, shape): each addressable device with its index and region key.

    ``addressable_devices_indices_map`` costs tens of µs; a tree has few distinct layouts.
    """

    def __init__(self) -> None:
        self._cache: dict[Any, list[tuple[Any, tuple, tuple]]] = {}

    def __call__(self, sharding: Any, shape: tuple[int, ...]) -> list[tuple[Any, tuple, tuple]]:
        key = (id(sharding), shape)  # the wants keep every sharding alive meanwhile
        if key not in self._cache:
            if isinstance(sharding, jax.sharding.SingleDeviceSharding):
                (device,) = sharding.device_set
                whole = tuple(slice(0, d) for d in shape)
                self._cache[key] = [(device, whole, _region_key(whole, shape))]
            else:
                entries = []
                for device, index in sharding.addressable_devices_indices_map(shape).items():
                    index = tuple(index) if index is not None else tuple(
                        slice(None) for _ in shape)
                    entries.append((device, index, _region_key(index, shape)))
                self._cache[key] = entries
        return self._cache[key]


def _region_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((s.start or 0, d if s.stop is None else s.stop)
                 for s, d in zip(index, shape, strict=True))


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    offset = (-raw.ctypes.data) % _ALIGN
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _start_zarr_reads(kv: Any, commit: Commit, jobs: list[Job], layouts: _Layouts,
                      url: str = "") -> list:
    opens = []
    for path, rec, want in jobs:
        s = rec.storage
        spec = _storage.array_spec(rec.shape, s.chunks, s.stored_dtype)
        opens.append((path, rec, want, _storage.open_array(
            kv, f"{commit.data}/a/{s.index}", spec, create=False)))
    pending = []
    for path, rec, want, opening in opens:
        store = opening.result()
        stored = _leaves.DTYPES[rec.storage.stored_dtype]
        if want.kind == _leaves.JAX:
            regions = {key: index for _d, index, key in layouts(want.sharding, rec.shape)}
        else:
            whole = tuple(slice(0, d) for d in rec.shape)
            regions = {_region_key(whole, rec.shape): whole}
        buffers, futures = {}, []
        for key in regions:
            try:
                buf = _aligned_empty(tuple(b - a for a, b in key), stored)
            except MemoryError:
                # Sizes come from the (checksummed but untrusted) commit file: say which
                # leaf, rather than a bare MemoryError from deep inside.
                raise CheckpointError(
                    f"{url}: leaf {rec.path!r:.200}: cannot allocate host memory for "
                    f"its shape {rec.shape} ({rec.dtype}); too little memory, or a forged "
                    "commit file") from None
            buffers[key] = buf
            for rows, sub in _slabs(key, rec.storage.chunks, stored.itemsize):
                futures.append(_read_into(store, sub, buf[rows] if rows else buf))
        pending.append((path, rec, want, buffers, futures))
    return pending


def _slabs(key: tuple, chunks: tuple[int, ...], itemsize: int
           ) -> Iterator[tuple[slice | None, tuple[slice, ...]]]:
    """Splits a region into slabs of whole chunk rows, ~_SLAB_BYTES each, read concurrently.

    TensorStore copies one read's chunks into the target one after another; a region read
    as several slabs decodes on every core (5x faster for a 100 MB single-device array).
    Yields ``(rows of the region's buffer, index into the stored array)``.
    """
    index = tuple(slice(a, b) for a, b in key)
    if not key or key[0][1] - key[0][0] <= chunks[0]:
        yield None, index
        return
    (start, stop), rest = key[0], index[1:]
    row_bytes = itemsize * math.prod(b - a for a, b in key[1:])
    step = chunks[0] * max(1, _SLAB_BYTES // max(chunks[0] * row_bytes, 1))
    for a in range(start, stop, step):
        b = min(a + step, stop)
        yield slice(a - start, b - start), (slice(a, b), *rest)


def _read_into(store: Any, index: tuple[slice, ...], buf: np.ndarray) -> Any:
    # Reading into a buffer we own is ~2x faster than read() returning a new array.
    return ts.array(buf, copy=False, write=True).write(store[index] if index else store)


def _read_packed(url: str, kv: Any, commit: Commit, jobs: list[Job]
                 ) -> Iterator[tuple[str, LeafRecord, Want, np.ndarray]]:
    """Yields ``(path, record, want, host array)`` for packed leaves, checksums verified."""
    groups = list(_range_groups(jobs))
    in_flight: collections.deque = collections.deque()
    for group in groups:
        in_flight.append(_start_range(kv, commit, group))
        if len(in_flight) >= _RANGES_IN_FLIGHT:
            yield from _finish_range(url, *in_flight.popleft())
    while in_flight:
        yield from _finish_range(url, *in_flight.popleft())


def _range_groups(jobs: list[Job]) -> Iterator[list[Job]]:
    by_blob: dict[int, list[Job]] = defaultdict(list)
    for job in jobs:
        by_blob[job[1].storage.index].append(job)
    for items in by_blob.values():
        items.sort(key=lambda j: j[1].storage.offset)
        group: list[Job] = []
        end = 0  # the group's end: with overlapping (forged) ranges, not its last job's
        for job in items:
            s = job[1].storage
            if group and (s.offset - end > _COALESCE_GAP
                          or _end(job) - group[0][1].storage.offset > _RANGE_BYTES):
                yield group
                group = []
            group.append(job)
            end = max(end, _end(job)) if len(group) > 1 else _end(job)
        if group:
            yield group


def _end(job: Job) -> int:
    return job[1].storage.offset + job[1].storage.nbytes


def _start_range(kv: Any, commit: Commit, group: list[Job]) -> tuple:
    blob = group[0][1].storage.index
    start, stop = group[0][1].storage.offset, max(_end(j) for j in group)
    future = kv.read(commit.blob_key(blob), byte_range=slice(start, max(stop, start)))
    return start, future, group, blob


def _finish_range(url: str, start: int, future: Any, group: list[Job], blob: int
                  ) -> Iterator[tuple[str, LeafRecord, Want, np.ndarray]]:
    result = future.result()
    view = memoryview(result.value if result.state == "value" else b"")
    for path, rec, want in group:
        s = rec.storage
        chunk = view[s.offset - start:s.offset - start + s.nbytes]
        if len(chunk) != s.nbytes or zlib.crc32(chunk) != s.crc:
            raise CorruptCheckpointError(
                f"{url}: leaf {rec.path!r}: checksum mismatch in packed blob {blob} "
                "(the stored bytes are damaged or missing)")
        host = np.frombuffer(chunk, dtype=_leaves.DTYPES[rec.dtype]).reshape(rec.shape)
        yield path, rec, want, host


def _as_logical(host: np.ndarray, rec: LeafRecord) -> np.ndarray:
    dtype = _leaves.DTYPES[rec.dtype]
    return host if host.dtype == dtype else host.view(dtype)


def _build(rec: LeafRecord, want: Want, regions: dict[tuple, np.ndarray], layouts: _Layouts,
           *, whole: bool) -> Any:
    """The restored leaf from its host data: ``regions`` maps region keys to host arrays,
    or, with ``whole``, holds the whole array under ``()``."""
    if want.kind == _leaves.JAX:
        return _assemble(rec, want, regions, layouts, whole)
    host = _as_logical(next(iter(regions.values())), rec)
    if want.kind == _leaves.PY:
        return want.pytype(host.reshape(()).item())
    if want.kind == _leaves.NPSCALAR:
        return want.pytype(host.astype(want.dtype).reshape(())[()])
    if want.kind == _leaves.NUMPY:
        return host.astype(want.dtype, copy=not host.flags.writeable)
    data = jax.device_put(host, default_device())  # PRNG key data: small, rewrapped
    key = jax.random.wrap_key_data(data, impl=want.impl)
    return jax.device_put(key, want.sharding) if want.sharding is not None else key


def _assemble(rec: LeafRecord, want: Want, regions: dict[tuple, np.ndarray], layouts: _Layouts,
              whole: bool) -> jax.Array:
    pieces, devices, given = [], [], set()
    for device, index, key in layouts(want.sharding, rec.shape):
        host = (regions[()][index] if index else regions[()]) if whole else regions[key]
        host = _as_logical(host, rec).astype(want.dtype, copy=False)
        if key in given:
            # Two devices must not adopt one host buffer: donating one would clobber both.
            host = host.copy()
        given.add(key)
        pieces.append(host)
        devices.append(device)
    # Packed leaves are views into a whole range of a blob: copy them, so that no restored
    # leaf keeps the range alive (that held the small-leaf tree in memory twice).
    return _transfer.assemble(rec.shape, want.dtype, want.sharding, pieces, devices, copy=whole)


def _py_to_want(value: Any, want: Want) -> Any:
    if want.kind == _leaves.PY:
        return value if want.pytype is type(value) else want.pytype(value)
    arr = np.asarray(value, dtype=want.dtype)
    if want.kind == _leaves.NPSCALAR:
        return want.pytype(arr[()])
    if want.kind == _leaves.NUMPY:
        return arr
    return jax.device_put(arr, want.sharding if want.sharding is not None else default_device())
