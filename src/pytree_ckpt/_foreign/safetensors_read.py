"""Reading safetensors tensors, or regions of them, as byte ranges of their files.

A region whose bytes lie close together (from its first element to its last at most twice
its own bytes, or at most one piece) is read as that one span, in pieces of ~_PIECE_BYTES.
A sparse one (a column of a row-major matrix) is cut along its leading axes into parts
whose spans are each at most a piece and whose holes average at most _GAP_BYTES per run of
contiguous elements, down to single rows: each part is read as one range into a scratch
buffer and its elements copied into the region's buffer as it arrives, so a column reads
its rows (rows closer than _GAP_BYTES together) and holds at most _SCRATCH_IN_FLIGHT
beyond the region, never the whole tensor.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import _build, _gc_pause, _leaves, _source
from .._errors import CorruptCheckpointError
from .._faults import read_failed
from .._format import LeafRecord

_PIECE_BYTES = 8 << 20  # a tensor's bytes are read as ranges of about this size, concurrently
_BYTES_IN_FLIGHT = 256 << 20  # ranges issued and not yet copied out
_GAP_BYTES = 8 << 10  # a sparse region's rows this close together are read as one range
_SCRATCH_IN_FLIGHT = 4 << 20  # a sparse region's ranges issued and not yet copied out

Key = tuple[tuple[int, int], ...]  # (start, stop) per axis


def read(files: list[_source.File], jobs: list[_build.Job]) -> dict[str, Any]:
    """The restored leaves of ``jobs`` by target path: each region read as one range of
    bytes (:func:`_span`), or a sparse one as several (:func:`_parts`), in pieces of
    ~_PIECE_BYTES, at most ~_BYTES_IN_FLIGHT of them in flight."""
    layouts = _build.Layouts()
    out: dict[str, Any] = {}
    in_flight: collections.deque = collections.deque()
    waiting = scratch = 0
    for item in _pieces(files, jobs, layouts):
        in_flight.append(item)
        buf, part = item[1]
        waiting += len(buf)
        scratch += len(buf) if part is not None else 0
        while (waiting > _BYTES_IN_FLIGHT or scratch > _SCRATCH_IN_FLIGHT
               or (in_flight and in_flight[0][3] is None)):
            done, was_scratch = _finish(files, in_flight.popleft(), layouts, out)
            waiting -= done
            scratch -= done if was_scratch else 0
    while in_flight:
        _finish(files, in_flight.popleft(), layouts, out)
    return out


def _pieces(files: list[_source.File], jobs: list[_build.Job], layouts: _build.Layouts
            ) -> Iterator[tuple[list, tuple[np.ndarray, list | None], tuple[int, int], Any]]:
    """``(leaf, (bytes of a buffer, its part), (start, stop) in the file, read future)``
    for every piece; ``leaf`` is ``[job, regions, pieces not yet read]``, ``part``
    ``[scratch, where its elements go, pieces not yet read]`` for a piece of a sparse
    region, else None. A leaf with no bytes gives one item with no future."""
    for path, rec, want in jobs:
        f, offset = files[rec.storage.index], rec.storage.offset
        dtype = _leaves.DTYPES[rec.dtype]
        regions: dict[Key, tuple[np.ndarray, bool]] = {}
        leaf = [(path, rec, want), regions, 0]
        todo: list[tuple[np.ndarray, list | None, int]] = []
        for key in _build.region_keys(rec, want, layouts):
            first, stop = _span(key, rec.shape)
            shape = tuple(b - a for a, b in key)
            size = math.prod(shape) * dtype.itemsize
            span = (stop - first) * dtype.itemsize
            if span <= 2 * size or span <= _PIECE_BYTES:  # read as one span
                buf = _source.host_buffer(f.url, rec, (stop - first,))
                regions[key] = buf, False
                todo.append((buf.view(np.uint8), None, offset + first * dtype.itemsize))
                continue
            region = _source.host_buffer(f.url, rec, shape)
            regions[key] = region, True
            for part in _parts(key, rec.shape, dtype.itemsize):
                lo, hi = _span(part, rec.shape)
                scratch = np.empty((hi - lo) * dtype.itemsize, np.uint8)
                dst = region[tuple(slice(a - k, b - k) for (a, b), (k, _) in zip(part, key,
                                                                                 strict=True))]
                todo.append((scratch, [scratch, (part, dst), 0], offset + lo * dtype.itemsize))
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


def _finish(files: list[_source.File], item: tuple, layouts: _build.Layouts,
            out: dict[str, Any]) -> tuple[int, bool]:
    """Waits for one piece and copies it out; returns its bytes and whether they were a
    sparse region's scratch."""
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
    if leaf[2] <= 0:
        with _gc_pause.paused():  # building, not the wait above: see _gc_pause
            out[path] = _build.build(rec, want, _regions(rec, regions), layouts, whole=False)
    return len(buf), part is not None


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
