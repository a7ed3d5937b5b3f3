"""Reading safetensors tensors, or regions of them, as byte ranges of their files.

A region whose bytes lie close together (from its first element to its last at most twice
its own bytes, or at most one piece) is read as that one span, in pieces of ~_PIECE_BYTES.
A sparse one (a column of a row-major matrix) is cut along its leading axes into parts
whose spans are each at most a piece and whose holes average at most _GAP_BYTES per run of
contiguous elements, down to single rows: each part is read as one range into a scratch
buffer and its elements copied into the region's buffer as it arrives, so a column reads
its rows (rows closer than _GAP_BYTES together) and holds at most _SCRATCH_IN_FLIGHT
beyond the region, never the whole tensor.

In a multi-process restore, a region that several processes hold is split among them by
rows of its leading axis (_share): each reads its rows into the region's buffer (straight
in where they are contiguous in the file, else as a sparse part), and the rest arrives over
an all-gather.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .. import _build, _gc_pause, _leaves, _share, _source
from .._errors import CorruptCheckpointError
from .._faults import read_failed
from .._format import LeafRecord

_PIECE_BYTES = 8 << 20  # a tensor's bytes are read as ranges of about this size, concurrently
_BYTES_IN_FLIGHT = 256 << 20  # ranges issued and not yet copied out
_GAP_BYTES = 8 << 10  # a sparse region's rows this close together are read as one range
_SCRATCH_IN_FLIGHT = 4 << 20  # a sparse region's ranges issued and not yet copied out

Key = tuple[tuple[int, int], ...]  # (start, stop) per axis


def read(files: list[_source.File], jobs: list[_build.Job], share: bool | None
         ) -> dict[str, Any]:
    """The restored leaves of ``jobs`` by target path: each region read as one range of
    bytes (:func:`_span`), or a sparse one as several (:func:`_parts`), in pieces of
    ~_PIECE_BYTES, at most ~_BYTES_IN_FLIGHT of them in flight. A region several processes
    hold is split among them by rows of its leading axis and all-gathered (``share``:
    restore's ``share_reads``; see _share)."""
    layouts = _build.Layouts()
    out: dict[str, Any] = {}
    sharing = _share.plan_reads(jobs, _grid, any(f.remote for f in files), share)
    with sharing.guard():
        for path, rec, want, regions in sharing.complete(
                _read_leaves(files, jobs, layouts, sharing.parts)):
            with _gc_pause.paused():  # building, not the reads: see _gc_pause
                out[path] = _build.build(rec, want, regions, layouts, whole=False)
    return out


def _grid(rec: LeafRecord) -> tuple[tuple[int, ...], int]:
    """A tensor has no chunks: its rows along the leading axis (each a byte range) are what
    processes split (a _share.Grid, with the itemsize)."""
    return (tuple(max(d, 1) for d in (1, *rec.shape[1:])) if rec.shape else (),
            _leaves.DTYPES[rec.dtype].itemsize)


def _read_leaves(files: list[_source.File], jobs: list[_build.Job], layouts: _build.Layouts,
                 parts: Callable[[int, Key], list[Key]]
                 ) -> Iterator[tuple[str, LeafRecord, _build.Want, dict[Key, np.ndarray]]]:
    """``(path, rec, want, regions)`` per job, in job order, once its pieces are read: what
    ``parts`` says this process reads of each region (see _share.Sharing.parts)."""
    in_flight: collections.deque = collections.deque()
    waiting = scratch = 0
    for item in _pieces(files, jobs, layouts, parts):
        in_flight.append(item)
        buf, part = item[1]
        waiting += len(buf)
        scratch += len(buf) if part is not None else 0
        while (waiting > _BYTES_IN_FLIGHT or scratch > _SCRATCH_IN_FLIGHT
               or (in_flight and in_flight[0][3] is None)):
            done, was_scratch, leaf = _finish(files, in_flight.popleft())
            waiting -= done
            scratch -= done if was_scratch else 0
            if leaf is not None:
                yield leaf
    while in_flight:
        leaf = _finish(files, in_flight.popleft())[2]
        if leaf is not None:
            yield leaf


def _pieces(files: list[_source.File], jobs: list[_build.Job], layouts: _build.Layouts,
            parts: Callable[[int, Key], list[Key]] = _share.ALONE.parts
            ) -> Iterator[tuple[list, tuple[np.ndarray, list | None], tuple[int, int], Any]]:
    """``(leaf, (bytes of a buffer, its part), (start, stop) in the file, read future)``
    for every piece; ``leaf`` is ``[job, regions, pieces not yet read]``, ``part``
    ``[scratch, where its elements go, pieces not yet read]`` for a piece of a sparse
    region, else None. A leaf with no bytes to read here gives one item with no future."""
    for job, (path, rec, want) in enumerate(jobs):
        f, offset = files[rec.storage.index], rec.storage.offset
        dtype = _leaves.DTYPES[rec.dtype]
        regions: dict[Key, tuple[np.ndarray, bool]] = {}
        leaf = [(path, rec, want), regions, 0]
        todo: list[tuple[np.ndarray, list | None, int]] = []
        for key in _build.region_keys(rec, want, layouts):
            mine = parts(job, key)
            first, stop = _span(key, rec.shape)
            shape = tuple(b - a for a, b in key)
            size = math.prod(shape) * dtype.itemsize
            span = (stop - first) * dtype.itemsize
            if mine == [key] and (span <= 2 * size or span <= _PIECE_BYTES):
                buf = _source.host_buffer(f.url, rec, (stop - first,))  # read as one span
                regions[key] = buf, False
                todo.append((buf.view(np.uint8), None, offset + first * dtype.itemsize))
                continue
            region = _source.host_buffer(f.url, rec, shape)
            regions[key] = region, True
            for part in mine:  # the whole region, or this process's rows of a shared one
                dst = region[_share.local(part, key)]
                lo, hi = _span(part, rec.shape)
                if part != key and (hi - lo) == dst.size and dst.flags.c_contiguous:
                    # Rows of the region: contiguous in the file and in the buffer.
                    todo.append((dst.reshape(-1).view(np.uint8), None,
                                 offset + lo * dtype.itemsize))
                    continue
                for sub in _parts(part, rec.shape, dtype.itemsize):
                    lo, hi = _span(sub, rec.shape)
                    scratch = np.empty((hi - lo) * dtype.itemsize, np.uint8)
                    todo.append((scratch, [scratch, (sub, region[_share.local(sub, key)]), 0],
                                 offset + lo * dtype.itemsize))
        items = []
        for flat, part, start in todo:
            for lo in range(0, len(flat), _PIECE_BYTES):
                hi = min(lo + _PIECE_BYTES, len(flat))
                items.append((flat[lo:hi], part, (start + lo, start + hi)))
                if part is not None:
                    part[2] += 1
        leaf[2] = len(items)
        if not items:
            yield leaf, (np.empty(0, np.uint8), None), (0, 0), None
        for buf, part, (lo, hi) in items:
            yield leaf, (buf, part), (lo, hi), f.kv.read(f.key, byte_range=slice(lo, hi))


def _parts(key: Key, shape: tuple[int, ...], itemsize: int) -> Iterator[Key]:
    """The sparse region ``key`` cut along its leading axes into parts each read as one
    range: a part's span is at most _PIECE_BYTES and its holes average at most _GAP_BYTES
    per run of contiguous elements, or it is one row along every axis but its last."""
    first, stop = _span(key, shape)
    sizes = [b - a for a, b in key]
    size, span = math.prod(sizes) * itemsize, (stop - first) * itemsize
    full = len(key)  # the axes from here on are whole
    while full > 0 and key[full - 1] == (0, shape[full - 1]):
        full -= 1
    runs = math.prod(sizes[:full - 1]) if full > 0 else 1
    if span <= _PIECE_BYTES and span - size <= _GAP_BYTES * max(runs - 1, 0):
        yield key
        return
    axis = next((i for i, n in enumerate(sizes[:full - 1]) if n > 1), None)
    if axis is None:  # a run of contiguous elements
        yield key
        return
    a, b = key[axis]
    step = max(1, _PIECE_BYTES // (_strides(shape)[axis] * itemsize))
    if step >= b - a:
        step = 1
    for i in range(a, b, step):
        yield from _parts((*key[:axis], (i, min(i + step, b)), *key[axis + 1:]), shape, itemsize)


def _finish(files: list[_source.File], item: tuple
            ) -> tuple[int, bool, tuple[str, LeafRecord, _build.Want, dict] | None]:
    """Waits for one piece and copies it out; returns its bytes, whether they were a
    sparse region's scratch, and the leaf's ``(path, rec, want, regions)`` if it was its
    last."""
    leaf, (buf, part), (lo, hi), future = item
    (path, rec, want), regions, _count = leaf
    if future is not None:
        try:
            result = future.result()
            data = result.value if result.state == "value" else b""
        except Exception as e:
            url = files[rec.storage.index].url
            raise read_failed(url, e, f"{url}: entry {rec.path!r:.200}: cannot read bytes "
                              f"{lo}-{hi} ({e})") from e
        if len(data) != hi - lo:
            raise CorruptCheckpointError(
                f"{files[rec.storage.index].url}: entry {rec.path!r:.200}: bytes {lo}-{hi} lie "
                "past the end of the file")
        buf[:] = np.frombuffer(data, np.uint8)
    if part is not None:
        part[2] -= 1
        if part[2] <= 0:  # the part's elements into the region; its scratch is let go
            (key, dst), scratch = part[1], part[0]
            dst[...] = _strided(scratch.view(dst.dtype), key, rec.shape)
            part[0] = part[1] = None
    leaf[2] -= 1
    done = (path, rec, want, _regions(rec, regions)) if leaf[2] <= 0 else None
    return len(buf), part is not None, done


def _span(key: Key, shape: tuple[int, ...]) -> tuple[int, int]:
    """The elements ``[first, stop)`` of the C-order tensor ``shape`` from the first element
    of the region ``key`` ((start, stop) per axis) to its last: the bytes to read for it."""
    if any(b <= a for a, b in key):
        return 0, 0
    first = last = 0
    for (a, b), stride in zip(key, _strides(shape), strict=True):
        first += a * stride
        last += (b - 1) * stride
    return first, last + 1


def _strides(shape: tuple[int, ...]) -> list[int]:
    """C-order strides of ``shape``, in elements."""
    out, step = [], 1
    for d in reversed(shape):
        out.append(step)
        step *= d
    return out[::-1]


def _strided(span: np.ndarray, key: Key, shape: tuple[int, ...]) -> np.ndarray:
    """The region ``key`` of the tensor ``shape`` as a read-only view of its span."""
    strides = [s * span.itemsize for s in _strides(shape)]
    return np.lib.stride_tricks.as_strided(span, tuple(b - a for a, b in key), strides,
                                           writeable=False)


def _regions(rec: LeafRecord, spans: dict[Key, tuple[np.ndarray, bool]]
             ) -> dict[Key, np.ndarray]:
    """Each region's array: a sparse one's as filled, else from the span read for it
    (:func:`_span`): the span itself where the region is contiguous, else a copy of its
    elements (a host piece must be contiguous)."""
    out = {}
    for key, (span, filled) in spans.items():
        shape = tuple(b - a for a, b in key)
        if filled or span.size == math.prod(shape):
            out[key] = span.reshape(shape)
        else:
            out[key] = np.ascontiguousarray(_strided(span, key, rec.shape))
    return out
