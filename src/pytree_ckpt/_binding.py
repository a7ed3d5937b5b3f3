"""What binds each zarr chunk to its commit, leaf and position: its CRC-32C in the commit file.

Each stored chunk ends with the CRC-32C of its bytes (the zarr3 ``crc32c`` codec, a 4-byte
little-endian trailer), which TensorStore checks on every read. That catches a flipped bit,
but not a whole chunk in the wrong place: a chunk copied from another checkpoint of the same
shape, two chunks of a leaf swapped, two leaves' arrays swapped, or another checkpoint's
generation folder copied in place of this one's all read back as valid chunks.

From format 5 the commit file therefore records every chunk's trailer, leaf by leaf and in
C order of each leaf's chunk grid. The primary reads the trailers back once every process
has written its chunks, just before the commit (a 4-byte read per chunk: reading back what
is there, rather than recomputing it, records exactly what restore will find). Restore reads
the trailers of the chunks it reads, alongside them, and compares (~1% of a restore of
64 MiB arrays); :func:`pytree_ckpt.verify` also reads every chunk whole and recomputes it.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from . import _leaves
from ._errors import CorruptCheckpointError
from ._faults import read_failed
from ._format import Commit, LeafRecord

TRAILER = 4  # bytes of the crc32c codec's checksum at the end of each chunk
_IN_FLIGHT = 256  # trailer reads issued at once by the writer


def grid(rec: LeafRecord) -> tuple[int, ...]:
    """How many chunks a zarr leaf has along each axis."""
    return tuple(-(-d // c) for d, c in zip(rec.shape, rec.storage.chunks, strict=True))


def chunk_bytes(rec: LeafRecord) -> int:
    """The bytes of one stored chunk before its trailer (edge chunks are stored whole)."""
    return math.prod(rec.storage.chunks) * _leaves.DTYPES[rec.storage.stored_dtype].itemsize


def chunk_key(data: str, rec: LeafRecord, index: Sequence[int]) -> str:
    """The key of chunk ``index`` (zarr3's default chunk key encoding)."""
    return f"{data}/a/{rec.storage.index}/c" + "".join(f"/{i}" for i in index)


def all_chunks(rec: LeafRecord) -> Iterator[tuple[int, ...]]:
    """Every chunk index of a zarr leaf, in C order (the order of its recorded CRCs)."""
    return itertools.product(*map(range, grid(rec)))


def chunks_touched(rec: LeafRecord, regions: Iterable[tuple[tuple[int, int], ...]]
                   ) -> list[tuple[int, ...]]:
    """The chunk indices, in C order, that reading ``regions`` ((start, stop) per axis) reads."""
    chunks = rec.storage.chunks
    touched: set[tuple[int, ...]] = set()
    for region in regions:
        ranges = [range(a // c, (b - 1) // c + 1) if b > a else range(0)
                  for (a, b), c in zip(region, chunks, strict=True)]
        touched.update(itertools.product(*ranges))
    return sorted(touched)


def read_trailers(kv: Any, data: str, records: Iterable[LeafRecord]) -> list[int]:
    """The trailers of every chunk of ``records`` (zarr leaves, in commit order), read from
    the stored chunks, ``_IN_FLIGHT`` reads at a time: the writer's ``chunk_crc`` column.

    Raises ``OSError`` naming a chunk that is missing or shorter than its shape says."""
    reads = ((rec, index) for rec in records for index in all_chunks(rec))
    out: list[int] = []
    in_flight: collections.deque = collections.deque()

    def finish() -> None:
        rec, index, future = in_flight.popleft()
        crc = _trailer(future.result())
        if crc is None:
            raise OSError(_missing(data, rec, index))
        out.append(crc)

    for rec, index in reads:
        n = chunk_bytes(rec)
        in_flight.append((rec, index, kv.read(chunk_key(data, rec, index),
                                              byte_range=slice(n, n + TRAILER))))
        if len(in_flight) >= _IN_FLIGHT:
            finish()
    while in_flight:
        finish()
    return out


def _trailer(result: Any) -> int | None:
    """The trailer a 4-byte read found, or None for a missing or truncated chunk."""
    value = bytes(result.value) if result.state == "value" else b""
    return int.from_bytes(value, "little") if len(value) == TRAILER else None


def _missing(data: str, rec: LeafRecord, index: Sequence[int]) -> str:
    return (f"leaf {rec.path!r:.200}: chunk {tuple(index)} ({chunk_key(data, rec, index)}) "
            "is missing or shorter than its shape says")


class Trailers:
    """The trailers of the chunks a restore reads of one leaf, read alongside its data and
    compared with the commit file's (format 5 on; older commits record none)."""

    def __init__(self, kv: Any, data: str, commit: Commit, rec: LeafRecord,
                 regions: Iterable[tuple[tuple[int, int], ...]]):
        """``kv`` and ``data``: the store and generation holding ``rec``'s array (another
        checkpoint's, for a carried leaf)."""
        self._rec, self._data = rec, data
        self._recorded = commit.leaves.chunk_crcs(rec.path)
        self._reads: list = []
        if self._recorded is not None:
            n, shape = chunk_bytes(rec), grid(rec)
            for index in chunks_touched(rec, regions):
                future = kv.read(chunk_key(data, rec, index),
                                 byte_range=slice(n, n + TRAILER))
                self._reads.append((index, int(np.ravel_multi_index(index, shape))
                                    if index else 0, future))

    def check(self, url: str) -> None:
        """Raises CorruptCheckpointError naming the leaf and the first chunk whose trailer
        is not the one the commit recorded for that place."""
        for index, flat, future in self._reads:
            try:
                result = future.result()
            except Exception as e:
                raise read_failed(url, e, f"{url}: leaf {self._rec.path!r:.200}: cannot "
                                  f"read chunk {index}'s checksum ({e})") from e
            found = _trailer(result)
            if found is None:
                raise CorruptCheckpointError(f"{url}: {_missing(self._data, self._rec, index)}")
            assert self._recorded is not None  # chunks are read only where recorded
            if found != int(self._recorded[flat]):
                raise CorruptCheckpointError(
                    f"{url}: leaf {self._rec.path!r:.200}: chunk {index} is not the chunk "
                    "this checkpoint wrote there (its checksum is another chunk's: moved "
                    "or copied from another leaf, position or checkpoint)")
