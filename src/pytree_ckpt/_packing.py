"""Packing: small leaves laid out in a few blobs per process, and the pool of their buffers.

Each process writes its small leaves (up to ``_snapshot.PACK_BYTES``) into parts of about
:data:`PART_BYTES`, each leaf 16-byte aligned, instead of a zarr array each: 10,000 small
arrays (87 MB) become about 20 writes rather than 10,000. :class:`Packing` is the layout,
:func:`pack` and :func:`fill` copy the leaves into it, and :data:`pool` keeps the last save's
parts for the next one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

PART_BYTES = 4 << 20  # packed leaves go in blobs of about this size, written a few at a time


_ALIGN = 16


class Packing:
    """Small leaves laid out in parts of about PART_BYTES, as parallel lists (one entry
    per leaf, no tuple each: a snapshot of 10,000 leaves waits for every object it keeps,
    and the cyclic collector then walks them).

    The leaves of part ``k`` are ``starts[k]:starts[k + 1]`` in the lists; ``values[i]``
    goes at ``offsets[i]`` of its part, ``sizes[i]`` bytes; ``buffer[i]``: it is a
    non-empty CPU jax.Array of a dtype in :data:`BUFFER_DTYPES`."""

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


def pack(packing: Packing) -> list[bytearray]:
    """Copies the small leaves into their parts (from :data:`pool` where it has one of
    the size). This copy is a save_async snapshot: the caller's arrays are free
    afterwards."""
    parts = pool.take(packing.part_sizes)
    return [fill(p, packing, k) for k, p in enumerate(parts)]


def fill(part: Any, packing: Packing, k: int) -> Any:
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
        # array. The buffer protocol is the faster per leaf; NumPy reads the
        # rest (ml_dtypes, other devices, host values, any layout).
        if buffer:
            view[offset:end] = memoryview(value).cast("B")
        else:
            array[offset:end] = np.asarray(value).ravel().view(np.uint8)
        if n % _ALIGN:
            view[end:end + _ALIGN - n % _ALIGN] = _PADS[_ALIGN - n % _ALIGN]
    del view, array
    return part


# The dtypes whose jax.Arrays the Python buffer protocol exports (not ml_dtypes: BufferError).
BUFFER_DTYPES = frozenset(
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64 "
    "complex64 complex128".split())


_PADS = [bytes(n) for n in range(_ALIGN)]


class PartPool:
    """Packing parts kept from one save for the next.

    Copying a snapshot into fresh memory costs page faults (many times the copy's own time
    on a virtual machine that faults new pages in from its host), into memory touched
    before it does not; the snapshot is what the caller of :func:`save_async` waits for. A training
    loop saves the same tree again and again, so the last save's parts are what the next
    one needs, size for size. The price is host memory: up to :data:`POOL_BYTES` of parts
    stay allocated between saves (the small leaves' bytes of the last save) rather than
    freed once written.
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
            if self._bytes + len(part) <= POOL_BYTES:
                self._free.setdefault(len(part), []).append(part)
                self._bytes += len(part)


POOL_BYTES = 256 << 20


pool = PartPool()
