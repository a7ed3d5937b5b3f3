"""Building restored leaves as the target asks, from their host data: shared by every reader
(our chunks and packed blobs, and the readers of other tools' files).

A reader reads each leaf's regions (:func:`region_keys`: each device's region of a
jax.Array, else the part asked for) into host buffers (:func:`aligned_empty`: 64-byte-aligned,
which the CPU backend adopts without a copy); :func:`build` turns them into the leaf that
:class:`Want` describes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
import tensorstore as ts
from jax.sharding import SingleDeviceSharding

from . import _leaves, _transfer
from ._format import LeafRecord

_ALIGN = 64  # the CPU backend adopts 64-byte-aligned host memory without a copy


class Want(NamedTuple):
    """What the target asks for at one path."""

    kind: str  # a _leaves origin: jax, numpy, npscalar, prngkey or py
    dtype: np.dtype | None  # None for Python leaves
    shape: tuple[int, ...]
    sharding: Any = None  # jax.sharding.Sharding for jax / prngkey
    pytype: type | None = None  # for py and npscalar
    impl: str | None = None  # for prngkey
    weak: bool = False  # for jax: a weakly typed jax.Array
    # For numpy: the part of the saved array to read, (start, stop) per axis; None for all.
    region: tuple[tuple[int, int], ...] | None = None


Job = tuple[str, LeafRecord, Want]  # (target path, saved leaf, what the target wants)


def default_device() -> jax.Device:  # an alias of a class  # pyright: ignore[reportInvalidTypeForm]
    """Where an unsharded leaf goes: the device ``jax.default_device`` sets, as for
    ``jax.device_put``, else this process's first device."""
    device = jax.config.jax_default_device  # set at run time  # pyright: ignore[reportAttributeAccessIssue]
    if device is None:
        return jax.local_devices()[0]
    if isinstance(device, str):  # a platform name
        return jax.local_devices(backend=device)[0]
    return device


class Layouts:
    """Per (sharding, shape): each addressable device with its index and region key.

    ``addressable_devices_indices_map`` costs tens of µs; a tree has few distinct layouts.
    """

    def __init__(self) -> None:
        self._cache: dict[Any, list[tuple[Any, tuple, tuple]]] = {}

    def __call__(self, sharding: Any, shape: tuple[int, ...]) -> list[tuple[Any, tuple, tuple]]:
        key = (id(sharding), shape)  # the wants keep every sharding alive meanwhile
        if key not in self._cache:
            if isinstance(sharding, SingleDeviceSharding):
                device = _transfer.device_of(sharding)
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


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized host array whose data starts on a 64-byte boundary."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    offset = (-raw.ctypes.data) % _ALIGN
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def region_keys(rec: LeafRecord, want: Want, layouts: Layouts) -> list[tuple]:
    """The regions of ``rec`` to read, as (start, stop) per axis: each device's for a
    jax.Array, ``want.region`` where one is asked for, else the whole array."""
    if want.kind == _leaves.JAX:
        return list(dict.fromkeys(key for _d, _index, key in layouts(want.sharding, rec.shape)))
    if want.region is not None:
        return [want.region]
    return [_region_key(tuple(slice(0, d) for d in rec.shape), rec.shape)]


def read_into(source: Any, buf: np.ndarray) -> Any:
    """Starts reading the TensorStore ``source`` into ``buf``; returns the write's future."""
    # Reading into a buffer we own is faster than read() returning a new array.
    return ts.array(buf, copy=False, write=True).write(source)


def _as_logical(host: np.ndarray, rec: LeafRecord) -> np.ndarray:
    dtype = _leaves.DTYPES[rec.dtype]
    return host if host.dtype == dtype else host.view(dtype)


def build(rec: LeafRecord, want: Want, regions: dict[tuple, np.ndarray], layouts: Layouts,
           *, whole: bool) -> Any:
    """The restored leaf from its host data: ``regions`` maps region keys to host arrays,
    or, with ``whole``, holds the whole array under ``()``."""
    if want.kind == _leaves.JAX:
        return _assemble(rec, want, regions, layouts, whole)
    host = _as_logical(next(iter(regions.values())), rec)
    if want.kind == _leaves.PY:
        assert want.pytype is not None  # set for py and npscalar
        return want.pytype(host.reshape(()).item())
    if want.kind == _leaves.NPSCALAR:
        assert want.pytype is not None
        return want.pytype(host.astype(want.dtype).reshape(())[()])
    if want.kind == _leaves.NUMPY:
        if whole and want.region is not None:
            # A copy of the part: the whole array (a blob's range, a decoded file) is not
            # kept alive by it.
            return host[tuple(slice(a, b) for a, b in want.region)].astype(want.dtype)
        return host.astype(want.dtype, copy=not host.flags.writeable)
    data = jax.device_put(host, default_device())  # PRNG key data: small, rewrapped
    key = jax.random.wrap_key_data(data, impl=want.impl)
    return jax.device_put(key, want.sharding) if want.sharding is not None else key


def _assemble(rec: LeafRecord, want: Want, regions: dict[tuple, np.ndarray], layouts: Layouts,
              whole: bool) -> jax.Array:
    # Packed leaves are views into a whole range of a blob: copy them (``copy=whole``), so
    # that no restored leaf keeps the range alive (that held the small-leaf tree twice).
    if type(want.sharding) is SingleDeviceSharding:
        # One device, one piece: no layout to look up (each target leaf has a sharding
        # object of its own, so Layouts' cache misses).
        (host,) = regions.values()
        host = _as_logical(host, rec)
        if host.dtype != want.dtype:
            host = host.astype(want.dtype)
        return _transfer.to_device(host, want.sharding, copy=whole, weak_type=want.weak)
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
    assert want.dtype is not None  # set for every kind but py
    return _transfer.assemble(rec.shape, want.dtype, want.sharding, pieces, devices, copy=whole,
                              weak_type=want.weak)


def py_to_want(value: Any, want: Want) -> Any:
    if want.kind == _leaves.PY:
        assert want.pytype is not None  # set for py and npscalar
        return value if want.pytype is type(value) else want.pytype(value)
    arr = np.asarray(value, dtype=want.dtype)
    if want.kind == _leaves.NPSCALAR:
        assert want.pytype is not None
        return want.pytype(arr[()])
    if want.kind == _leaves.NUMPY:
        return arr
    return _transfer.put(arr, want.sharding if want.sharding is not None else default_device(),
                         weak_type=want.weak)
