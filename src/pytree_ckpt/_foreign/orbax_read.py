"""Reading Orbax arrays (zarr or zarr3, OCDBT or not, opened by orbax.py) region by region.

Each device's region is read from its TensorStore array into an aligned buffer (a small one
with ``read()``), at most ~_BYTES_IN_FLIGHT issued and not yet waited for. In a
multi-process restore, a region that several processes hold is split among them by the
array's chunk rows (the writer's shards) and completed over an all-gather (_share).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterator
from typing import Any

from jax.sharding import SingleDeviceSharding

from .. import _build, _gc_pause, _leaves, _share, _source, _transfer
from .._faults import read_failed
from .._format import LeafRecord

_BYTES_IN_FLIGHT = 256 << 20
_SMALL_BYTES = 1 << 20


def read(url: str, jobs: list[_build.Job], remote: bool, share: bool | None
         ) -> dict[str, Any]:
    """The restored leaves of ``jobs``: each region read from its zarr array into an aligned
    buffer, at most ~_BYTES_IN_FLIGHT of them issued and not yet waited for. A region
    several processes hold is split among them by chunk rows and all-gathered (``share``:
    restore's ``share_reads``; ``remote``: from an object store; see _share)."""
    layouts = _build.Layouts()
    out: dict[str, Any] = {}
    arrays = []
    for path, rec, want in jobs:
        if rec.storage.kind == "v":
            out[path] = _build.py_to_want(rec.storage.value, want)
        else:
            arrays.append((path, rec, want))
    sharing = _share.plan_reads(arrays, _grid, remote, share)
    with sharing.guard():
        for path, rec, want, regions in sharing.complete(
                _arrays(url, arrays, layouts, sharing.parts)):
            with _gc_pause.paused():  # building, not the reads: see _gc_pause
                host = next(iter(regions.values())) if type(want.sharding) is SingleDeviceSharding \
                    else None  # one device: one region
                if host is not None and want.kind == _leaves.JAX and host.dtype == want.dtype \
                        and host.nbytes < _SMALL_BYTES:
                    # The common small leaf, read with read(): TensorStore's array is not
                    # aligned, so JAX copies it either way; asked to, it copies at once, the
                    # cheaper way per leaf.
                    out[path] = _transfer.to_device(host, want.sharding, copy=True,
                                                    weak_type=want.weak)
                else:
                    out[path] = _build.build(rec, want, regions, layouts, whole=False)
    return out


def _grid(rec: LeafRecord) -> tuple[tuple[int, ...], int]:
    """The zarr array's chunks (the writer's shards) and itemsize: a _share.Grid."""
    chunks = rec.storage.value.chunk_layout.read_chunk.shape
    return (tuple(int(c) if c else max(d, 1) for c, d in zip(chunks, rec.shape, strict=True)),
            _leaves.DTYPES[rec.dtype].itemsize)


def _arrays(url: str, jobs: list[_build.Job], layouts: _build.Layouts,
            parts: Callable[[int, tuple], list[tuple]]
            ) -> Iterator[tuple[str, LeafRecord, _build.Want, dict[tuple, Any]]]:
    """``(path, rec, want, regions)`` per job, in job order, once its reads are done: what
    ``parts`` says this process reads of each region (see _share.Sharing.parts)."""
    in_flight: collections.deque = collections.deque()
    waiting = 0
    for item in _region_reads(url, jobs, layouts, parts):
        in_flight.append(item)
        waiting += item[4]
        while waiting > _BYTES_IN_FLIGHT or (in_flight and in_flight[0][3] is None):
            first = in_flight.popleft()
            waiting -= first[4]
            done = _finish(url, first)
            if done is not None:
                yield done
    while in_flight:
        done = _finish(url, in_flight.popleft())
        if done is not None:
            yield done


def _region_reads(url: str, jobs: list[_build.Job], layouts: _build.Layouts,
                  parts: Callable[[int, tuple], list[tuple]]
                  ) -> Iterator[tuple[list, tuple, Any, Any, int]]:
    """``(leaf, region key, buffer or None, read future or None, bytes)`` per part read;
    ``leaf`` is ``[job, regions, parts not yet read]``; a leaf with nothing to read here
    gives one item without a future.

    A large region, or a part of a shared one, is read into an aligned buffer of the region
    that the device adopts; a small region read whole with ``read()``, which returns an
    array of its own (for arrays of a few KiB, faster than writing into a given buffer)."""
    for job, (path, rec, want) in enumerate(jobs):
        store, dtype = rec.storage.value, _leaves.DTYPES[rec.dtype]
        regions: dict[tuple, Any] = {}
        todo = []
        for key in _build.region_keys(rec, want, layouts):
            mine = parts(job, key)
            todo += [(key, part) for part in mine]
            shape = tuple(b - a for a, b in key)
            if math.prod(shape) * dtype.itemsize >= _SMALL_BYTES or mine != [key]:
                regions[key] = _source.host_buffer(url, rec, shape)
        leaf = [(path, rec, want), regions, len(todo) or 1]
        if not todo:
            yield leaf, (), None, None, 0
        for key, part in todo:
            shape = tuple(b - a for a, b in part)
            # Indexing a TensorStore is costly per call: not for a region that is all of it.
            source = store if shape == rec.shape else store[tuple(slice(a, b) for a, b in part)]
            nbytes = math.prod(shape) * dtype.itemsize
            buf = regions.get(key)
            if buf is None:
                yield leaf, key, None, source.read(), nbytes
            else:
                view = buf[_share.local(part, key)] if part != key else buf
                yield leaf, key, view, _build.read_into(source, view), nbytes


def _finish(url: str, item: tuple) -> tuple | None:
    """Waits for one read; the leaf's ``(path, rec, want, regions)`` once it was its last."""
    leaf, key, buf, future, _nbytes = item
    (path, rec, want), regions, _count = leaf
    if future is not None:
        try:
            result = future.result()
        except Exception as e:  # a missing chunk (fill_missing_data_reads off), bad bytes
            raise read_failed(url, e, f"{url}: entry {rec.path!r:.200}: cannot read its array "
                              f"data ({e})") from e
        if buf is None:
            regions[key] = result
    leaf[2] -= 1
    return (path, rec, want, regions) if leaf[2] == 0 else None
