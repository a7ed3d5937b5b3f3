"""Reading Orbax arrays (zarr or zarr3, OCDBT or not, opened by orbax.py) region by region.

Each device's region is read from its TensorStore array into an aligned buffer (a small one
with ``read()``), at most ~_BYTES_IN_FLIGHT issued and not yet waited for.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from typing import Any

import jax

from .. import _build, _gc_pause, _leaves, _source, _transfer
from .._faults import read_failed

_BYTES_IN_FLIGHT = 256 << 20
_SMALL_BYTES = 1 << 20
_ONE_DEVICE = jax.sharding.SingleDeviceSharding  # regions read with read(), see _region_reads


def read(url: str, jobs: list[_build.Job]) -> dict[str, Any]:
    """The restored leaves of ``jobs``: each region read from its zarr array into an aligned
    buffer, at most ~_BYTES_IN_FLIGHT of them issued and not yet waited for."""
    layouts = _build.Layouts()
    out: dict[str, Any] = {}
    in_flight: collections.deque = collections.deque()
    waiting = 0
    for item in _region_reads(url, jobs, layouts, out):
        in_flight.append(item)
        waiting += item[4]
        while waiting > _BYTES_IN_FLIGHT:
            waiting -= _finish(url, in_flight.popleft(), layouts, out)
    while in_flight:
        _finish(url, in_flight.popleft(), layouts, out)
    return out


def _region_reads(url: str, jobs: list[_build.Job], layouts: _build.Layouts,
                  out: dict[str, Any]) -> Iterator[tuple[list, tuple, Any, Any, int]]:
    """``(leaf, region key, buffer or None, read future, bytes)`` per region; ``leaf`` is
    ``[job, regions, regions not yet read]``. Python leaves are built at once into ``out``.

    A large region is read into an aligned buffer the device adopts; a small one with
    ``read()``, which returns an array of its own (for arrays of a few KiB, faster than
    writing into a given buffer)."""
    for path, rec, want in jobs:
        if rec.storage.kind == "v":
            out[path] = _build.py_to_want(rec.storage.value, want)
            continue
        store, dtype = rec.storage.value, _leaves.DTYPES[rec.dtype]
        keys = _build.region_keys(rec, want, layouts)
        leaf = [(path, rec, want), {}, len(keys)]
        for key in keys:
            shape = tuple(b - a for a, b in key)
            # Indexing a TensorStore is costly per call: not for a region that is all of it.
            source = store if shape == rec.shape else store[tuple(slice(a, b) for a, b in key)]
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes < _SMALL_BYTES:
                yield leaf, key, None, source.read(), nbytes
            else:
                buf = _source.host_buffer(url, rec, shape)
                yield leaf, key, buf, _build.read_into(source, buf), nbytes


def _finish(url: str, item: tuple, layouts: _build.Layouts, out: dict[str, Any]) -> int:
    leaf, key, buf, future, nbytes = item
    (path, rec, want), regions, _count = leaf
    try:
        result = future.result()
    except Exception as e:  # a missing chunk (fill_missing_data_reads off), bad bytes
        raise read_failed(url, e, f"{url}: entry {rec.path!r:.200}: cannot read its array "
                          f"data ({e})") from e
    leaf[2] -= 1
    with _gc_pause.paused():  # building, not the wait above: see _gc_pause
        if buf is None and leaf[2] == 0 and type(want.sharding) is _ONE_DEVICE and \
                want.kind == _leaves.JAX and result.dtype == want.dtype:
            # The common small leaf: TensorStore's array is not aligned, so JAX copies it
            # either way; asked to, it copies at once, the cheaper way per leaf.
            out[path] = _transfer.to_device(result, want.sharding, copy=True)
            return nbytes
        regions[key] = result if buf is None else buf
        if leaf[2] == 0:
            out[path] = _build.build(rec, want, regions, layouts, whole=False)
    return nbytes
