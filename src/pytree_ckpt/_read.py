"""Reading matched leaves of our own format, its chunks and packed blobs: the I/O half of
restore (:mod:`._build` turns what is read into leaves as the target asks).

Zarr arrays are read region by region, each device's region into a 64-byte-aligned buffer
that the CPU backend adopts without a copy: from an object store (format 5) each chunk whole,
by key, once (one request per chunk), else through TensorStore's zarr driver; a window of
reads in flight at a time (see :class:`_ZarrReads`). Packed small leaves are read as byte
ranges of their blobs (nearby ranges coalesced), a few ranges in flight at a time, each leaf
checked against its checksum and turned into leaves before its bytes are dropped, so a
restore holds little beyond the tree itself.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
from jax.sharding import SingleDeviceSharding

from . import (
    _binding,
    _build,
    _decode,
    _faults,
    _format,
    _gc_pause,
    _leaves,
    _options,
    _share,
    _storage,
    _transfer,
)
from ._build import Job, Layouts, Want
from ._errors import CheckpointError, CorruptCheckpointError
from ._format import Commit, LeafRecord

_COALESCE_GAP = 256 << 10  # nearby packed ranges are read as one: fewer requests


class _Ranges(NamedTuple):
    """How packed leaves are read: ranges of up to ``most`` bytes, ``in_flight`` at a time
    (each is held until its leaves are built)."""

    most: int
    in_flight: int


# From a local disk, reading is cheap and new memory may not be (on a virtual machine each new
# page can fault in from the host): glibc serves ranges of 256 KiB from memory it reuses, where
# ranges of 1 MiB came from fresh pages every time (~24,000 page faults per restore of the
# 10,000-leaf benchmark tree with 1 MiB ranges, ~0 with these). An object store answers each
# request after a round trip, so there fewer, larger ranges go, more at once.
_LOCAL_RANGES = _Ranges(most=256 << 10, in_flight=8)
_REMOTE_RANGES = _Ranges(most=1 << 20, in_flight=16)
_SLAB_BYTES = 8 << 20  # large regions are read as slabs of about this size, concurrently
# Zarr slabs issued and not yet waited for (see _ZarrReads) are bounded in bytes by the
# option read_window_bytes (pytree_ckpt.configure; 256 MiB by default), never by the CPU
# count: 4 slabs a core would hold 6.5 GiB on a 208-core host.
# What a chunk in flight costs at least, counted in the window: TensorStore's state for each
# chunk it reads (a slab of 65,536 chunks of a few bytes is otherwise "a few bytes").
_CHUNK_COST = 4 << 10


def read_leaves(url: str, kv: Any, commit: Commit, jobs: list[Job], *, remote: bool = False,
                share: bool | None = None,
                stores: Callable[[LeafRecord], tuple[Any, str]] | None = None
                ) -> dict[str, Any]:
    """Reads every job's data and returns the restored leaves by target path (``remote``:
    from an object store, see :data:`_REMOTE_RANGES`; ``share``: restore's ``share_reads``,
    see :func:`_share.plan_reads`; ``stores``: the kvstore and generation of each zarr leaf,
    see _refs.Stores; by default ``kv`` and the commit's own)."""
    out: dict[str, Any] = {}
    layouts = Layouts()
    by_kind: dict[str, list[Job]] = {"z": [], "p": [], "v": []}  # one pass over the jobs
    for job in jobs:
        by_kind[job[1].storage.kind].append(job)
    # Regions held by several processes: read once, split among them (see _share).
    sharing = _share.plan_reads(by_kind["z"], _share.zarr_grid, remote, share)
    with sharing.guard():
        # The per-leaf loops run with the collector paused; the waits for reads between
        # them (in _packed_ranges and the zarr iterator) never do: see _gc_pause.
        with _gc_pause.paused():
            zarr = _ZarrReads(url, commit, by_kind["z"], layouts,
                              stores or (lambda rec: (kv, commit.data)),
                              sharing.parts, by_key=remote)
            zarr.fill()  # the first arrays' reads run while the packed leaves are read
        policy = _REMOTE_RANGES if remote else _LOCAL_RANGES
        groups = _range_groups(by_kind["p"], policy.most)
        crc = _format.LEAF_CRC[commit.version]
        for group, data, start, blob in _packed_ranges(url, kv, commit, groups,
                                                       policy.in_flight):
            with _gc_pause.paused():
                for path, rec, want in group:
                    host = _checked(url, data, start, rec, blob, crc)
                    if (want.kind == _leaves.JAX and type(want.sharding) is SingleDeviceSharding
                            and host.dtype == want.dtype):
                        # The common case, without build's dispatch (per leaf).
                        out[path] = _transfer.to_device(host, want.sharding, copy=True,
                                                        weak_type=want.weak)
                    else:
                        out[path] = _build.build(rec, want, {(): host}, layouts, whole=True)
        for path, rec, want, regions in sharing.complete(zarr):
            out[path] = _build.build(rec, want, regions, layouts, whole=False)
    with _gc_pause.paused():
        for path, rec, want in by_kind["v"]:
            out[path] = _build.py_to_want(rec.storage.value, want)
    return out


class _ZarrReads:
    """Reads zarr leaves region by region, slab by slab, with at most ~``read_window_bytes``
    (see :func:`window_bytes`) of slabs issued and not yet waited for; iterating yields
    ``(path, rec, want, regions)`` per leaf, in job order, once all its slabs are read.

    TensorStore reads each chunk into a buffer of its own before copying it into ours.
    Issued all at once, the reads would let the file threads run far ahead of the copying,
    and those chunk buffers would pile up (a large part of the tree, kept by malloc after).
    Through the window they cost about the window, whatever the tree's size.

    With ``by_key`` (an object store) and from format 5 (chunks' CRCs recorded), each chunk
    a region needs is read whole, once, by key (:class:`_Chunk`): its data and trailer in one
    request, checked against each other and against the commit file
    (:func:`_binding.checked_chunk`), then its part of each region copied in. Otherwise
    TensorStore's zarr driver reads the slabs, and the chunks' trailers are read beside
    (:class:`_binding.Trailers`): from a local disk that is faster (a chunk read whole into
    Python ``bytes`` costs a fresh buffer's page faults, about twice a restore's CPU).
    """

    def __init__(self, url: str, commit: Commit, jobs: list[Job], layouts: Layouts,
                 stores: Callable[[LeafRecord], tuple[Any, str]],
                 parts: Callable[[int, tuple], list[tuple]] | None = None,
                 by_key: bool = False) -> None:
        self._url, self._commit, self._stores = url, commit, stores
        self._layouts = layouts
        # What to read of a job's region (its index, the region): its parts this process
        # reads where several share it (_share), else all of it.
        self._parts = parts or (lambda _job, key: [key])
        self._opening = collections.deque(
            (job, path, rec, want, *_recorded_or_opened(stores, commit, rec, by_key))
            for job, (path, rec, want) in enumerate(jobs))
        self._slabs: Iterator[tuple] = self._all_slabs()
        self._in_flight: collections.deque = collections.deque()
        self._bytes = 0
        self._window = window_bytes()

    def _all_slabs(self) -> Iterator[tuple]:
        """``(leaf, source, buffer, chunks)`` for every slab, where ``leaf`` is
        ``[job, regions, slabs not yet read, trailers]`` and ``chunks`` how many chunks the slab
        touches; ``source`` is None for a leaf with none."""
        while self._opening:
            job, path, rec, want, recorded, opening = self._opening.popleft()
            stored = _leaves.DTYPES[rec.storage.stored_dtype]
            if opening is None:  # by key
                yield from self._chunks(job, path, rec, want, recorded, stored)
                continue
            store = opening.result()
            regions, slabs, parts = {}, [], []
            for key in _build.region_keys(rec, want, self._layouts):
                buf = regions[key] = _allocate(key, stored, rec, self._url)
                for part in self._parts(job, key):
                    parts.append(part)
                    slabs += [(store[sub] if sub else store, buf[local] if local else buf,
                               _chunks_in(sub, rec.storage.chunks))
                              for local, sub in _slabs(key, rec.storage.chunks,
                                                       stored.itemsize, part)]
            # The chunks' trailers, read alongside: what binds them to this commit.
            trailers = _binding.Trailers(*self._stores(rec), self._commit, rec, parts)
            leaf = [(path, rec, want), regions, len(slabs), trailers]
            for source, buf, chunks in slabs or [(None, None, 0)]:
                yield leaf, source, buf, chunks

    def _chunks(self, job: int, path: str, rec: LeafRecord, want: Want,
                recorded: np.ndarray, stored: np.dtype) -> Iterator[tuple]:
        """The slabs of a leaf read chunk by chunk, by key: ``(leaf, chunk, None, 1)``."""
        regions = {key: _allocate(key, stored, rec, self._url)
                   for key in _build.region_keys(rec, want, self._layouts)}
        pieces = [(key, part) for key in regions for part in self._parts(job, key)]
        kv, data = self._stores(rec)
        cost = max(_binding.chunk_bytes(rec) + _binding.TRAILER, _CHUNK_COST)
        reads = [_Chunk(kv, data, index, int(recorded[flat]), copies, cost)
                 for index, flat, copies in _binding.chunk_copies(rec, pieces)]
        leaf = [(path, rec, want), regions, len(reads), None]
        for chunk in reads or [None]:
            yield leaf, chunk, None, 1

    def fill(self) -> None:
        while self._bytes < self._window:
            slab = next(self._slabs, None)
            if slab is None:
                return
            leaf, source, buf, chunks = slab
            if type(source) is _Chunk:
                future = source.kv.read(_binding.chunk_key(source.data, leaf[0][1],
                                                           source.index))
                nbytes = source.nbytes
            else:
                future = _build.read_into(source, buf) if source is not None else None
                # A slab of many tiny chunks costs TensorStore more than its bytes.
                nbytes = max(buf.nbytes, chunks * _CHUNK_COST) if buf is not None else 0
            self._in_flight.append((leaf, source, future, nbytes))
            self._bytes += nbytes

    def __iter__(self) -> Iterator[tuple[str, LeafRecord, Want, dict[tuple, np.ndarray]]]:
        while True:
            self.fill()
            if not self._in_flight:
                return
            leaf, source, future, nbytes = self._in_flight.popleft()
            (path, rec, want), regions, _count, trailers = leaf
            if future is not None:
                try:
                    result = future.result()
                except Exception as e:
                    raise _faults.read_failed(
                        self._url, e,
                        f"{self._url}: leaf {rec.path!r}: cannot read its array data ({e})"
                    ) from e
                if type(source) is _Chunk:
                    chunk = _binding.checked_chunk(self._url, source.data, rec, source.index,
                                                   result, source.recorded)
                    for key, src, dst in source.copies:
                        regions[key][dst] = chunk[src]
                    del result, chunk
            self._bytes -= nbytes
            leaf[2] -= 1
            if leaf[2] <= 0:
                if trailers is not None:
                    trailers.check(self._url)
                yield path, rec, want, regions


def window_bytes() -> int:
    """The read window in force: the option ``read_window_bytes``, read when a read starts."""
    return int(_options.get("read_window_bytes"))


class _Chunk(NamedTuple):
    """A chunk read whole, by key, from ``kv``'s generation ``data``: its ``copies`` into
    the regions (see _binding.chunk_copies) once it matches the ``recorded`` CRC."""

    kv: Any
    data: str
    index: tuple[int, ...]  # pyright: ignore[reportIncompatibleMethodOverride]  # a field
    recorded: int
    copies: list
    nbytes: int


def _recorded_or_opened(stores: Callable[[LeafRecord], tuple[Any, str]], commit: Commit,
                        rec: LeafRecord, by_key: bool) -> tuple[Any, Any]:
    """``(recorded CRCs, None)`` for a leaf read by key (``by_key`` and format 5 on), else
    ``(None, the zarr array opening)``."""
    recorded = _decode.chunk_crcs(commit, rec.path) if by_key else None
    if recorded is not None:
        return recorded, None
    return None, _open(stores, rec)


def _open(stores: Callable[[LeafRecord], tuple[Any, str]], rec: LeafRecord) -> Any:
    kv, data = stores(rec)
    return _storage.open_array(
        kv, f"{data}/a/{rec.storage.index}",
        _storage.array_spec(rec.shape, rec.storage.chunks, rec.storage.stored_dtype),
        create=False)


def _allocate(key: tuple, dtype: np.dtype, rec: LeafRecord, url: str) -> np.ndarray:
    try:
        return _build.aligned_empty(tuple(b - a for a, b in key), dtype)
    except MemoryError:
        # Sizes come from the (checksummed but untrusted) commit file: say which leaf,
        # rather than a bare MemoryError from deep inside.
        raise CheckpointError(
            f"{url}: leaf {rec.path!r:.200}: cannot allocate host memory for its shape "
            f"{rec.shape} ({rec.dtype}); too little memory, or a forged commit file") from None


def _slabs(key: tuple, chunks: tuple[int, ...], itemsize: int, part: tuple | None = None
           ) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """Splits a region into slabs of whole chunks, ~_SLAB_BYTES each, read concurrently.

    TensorStore copies one read's chunks into the target one after another; a region read
    as several slabs decodes on every core (one large single-device array included).
    A slab spans whole chunk rows where one row fits in ~_SLAB_BYTES (a contiguous block of
    the buffer); where it does not, as in (layers, d, d) or (1, n) arrays, the row is split
    along the next axis, so that the read window bounds what a read holds.
    Only ``part`` of the region ``key`` is read, where given (reads shared by processes).
    Yields ``(index into the region's buffer, index into the stored array)``.
    """
    if not key:
        yield (), ()
        return
    for sub in _split(key if part is None else part, chunks, itemsize, 0):
        yield tuple(slice(s.start - a, s.stop - a)
                    for (a, _b), s in zip(key, sub, strict=True)), sub


def _split(box: tuple[tuple[int, int], ...], chunks: tuple[int, ...], itemsize: int,
           axis: int) -> Iterator[tuple[slice, ...]]:
    # ``box``: (start, stop) per axis; the axes before ``axis`` are already cut to chunk rows.
    (start, stop), last = box[axis], axis + 1 == len(box)
    unit = itemsize * math.prod(b - a for i, (a, b) in enumerate(box) if i != axis)
    row = min(chunks[axis], stop - start) * unit  # the bytes of one chunk row along this axis
    step = chunks[axis] if row > _SLAB_BYTES and not last else (
        chunks[axis] * max(1, _SLAB_BYTES // max(row, 1)))
    for a in range(start, stop, step):
        cut = (*box[:axis], (a, min(a + step, stop)), *box[axis + 1:])
        if row > _SLAB_BYTES and not last:
            yield from _split(cut, chunks, itemsize, axis + 1)
        else:
            yield tuple(slice(a, b) for a, b in cut)


def _chunks_in(index: tuple[slice, ...], chunks: tuple[int, ...]) -> int:
    """How many chunks of the grid ``chunks`` the region ``index`` touches."""
    return math.prod((s.stop - 1) // c - s.start // c + 1 if s.stop > s.start else 0
                     for s, c in zip(index, chunks, strict=True))


def _packed_ranges(url: str, kv: Any, commit: Commit,
                   groups: Iterable[tuple[list[Job], int, int]], most_in_flight: int
                   ) -> Iterator[tuple[list[Job], memoryview, int, int]]:
    """Reads the ranges of ``groups`` (see :func:`_range_groups`), ``most_in_flight`` at a
    time; yields each as ``(jobs, bytes, offset of the bytes in the blob, blob)``, in order."""
    in_flight: collections.deque = collections.deque()
    for group, start, stop in groups:
        blob = group[0][1].storage.index
        future = kv.read(commit.blob_key(blob), byte_range=slice(start, stop))
        in_flight.append((group, future, start, blob))
        if len(in_flight) >= most_in_flight:
            yield _range_read(url, *in_flight.popleft())
    while in_flight:
        yield _range_read(url, *in_flight.popleft())


def _range_read(url: str, group: list[Job], future: Any, start: int, blob: int
                ) -> tuple[list[Job], memoryview, int, int]:
    try:
        result = future.result()
    except Exception as e:  # e.g. a (forged) range past the blob's end: OUT_OF_RANGE
        raise _faults.read_failed(
            url, e,
            f"{url}: leaf {group[0][1].path!r}: cannot read its bytes from packed blob {blob} "
            f"({e})") from e
    return group, memoryview(result.value if result.state == "value" else b""), start, blob


def _range_groups(jobs: list[Job], most: int) -> Iterator[tuple[list[Job], int, int]]:
    """Jobs grouped into ranges of one blob read at once, as ``(jobs, start, stop)``:
    sorted by (blob, offset), a group ending where the next leaf starts over
    _COALESCE_GAP past the previous one's end or would take the group past ``most`` bytes.

    The breaks are found with NumPy, one Python step per group rather than per leaf."""
    if not jobs:
        return
    storages = [j[1].storage for j in jobs]
    blob = np.array([s.index for s in storages], np.int64)
    start = np.array([s.offset for s in storages], np.int64)
    stop = start + np.array([s.nbytes for s in storages], np.int64)
    order = np.lexsort((start, blob))
    jobs = list(map(jobs.__getitem__, order.tolist()))
    blob, start, stop = blob[order], start[order], stop[order]
    # Runs of one blob without a gap; within a run, size decides.
    cuts = np.flatnonzero((blob[1:] != blob[:-1]) | (start[1:] - stop[:-1] > _COALESCE_GAP)) + 1
    for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(jobs)], strict=True):
        # The furthest any leaf so far reaches, not the last one's (forged ranges overlap).
        reach = np.maximum.accumulate(stop[lo:hi])
        i = lo
        while i < hi:
            first = int(start[i])
            k = max(i + 1, lo + int(np.searchsorted(reach, first + most, side="right")))
            yield jobs[i:k], first, int(stop[i:k].max())
            i = k


def _checked(url: str, data: memoryview, start: int, rec: LeafRecord, blob: int,
             crc: Callable[[np.ndarray], int]) -> np.ndarray:
    """A packed leaf's host array (a view of ``data``, the range read from ``start`` of
    its blob), once its bytes match their checksum (``crc``: see _format.LEAF_CRC)."""
    s = rec.storage
    try:  # one constructor, not slice + frombuffer + view + reshape: per leaf
        host = np.ndarray(rec.shape, _leaves.DTYPES[rec.dtype], data, s.offset - start)
    except (TypeError, ValueError):  # "buffer is too small": the range came back short
        host = None
    if host is None or crc(host) != s.crc:
        raise CorruptCheckpointError(
            f"{url}: leaf {rec.path!r}: checksum mismatch in packed blob {blob} "
            "(the stored bytes are damaged or missing)")
    return host
