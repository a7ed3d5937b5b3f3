"""What binds each zarr chunk to its commit, leaf and position: its CRC-32C in the commit file.

Each stored chunk ends with the CRC-32C of its bytes (the zarr3 ``crc32c`` codec, a 4-byte
little-endian trailer). That catches a flipped bit, but not a whole chunk in the wrong
place: a chunk copied from another checkpoint of the same shape, two chunks of a leaf
swapped, two leaves' arrays swapped, or another checkpoint's generation folder copied in
place of this one's all read back as valid chunks.

From format 5 the commit file therefore records every chunk's CRC-32C, leaf by leaf and in
C order of each leaf's chunk grid. Each process computes the CRCs of the chunks it writes
from the bytes in memory, an edge chunk padded with the fill value as zarr stores it
(:func:`shard_crcs`: the very value of the chunk's trailer), and sends them to the primary
with its report (:func:`pack_crcs`), which records them (:func:`recorded_column`): a save
reads nothing back. From an object store restore reads each chunk it needs whole, once (its
data and trailer in one request), and :func:`checked_chunk` compares its bytes with its
trailer and its trailer with the commit's record for that place. From a local disk it reads
through TensorStore's zarr driver and the trailers beside (:class:`Trailers`, 4-byte reads):
there a chunk read whole into a Python ``bytes`` costs a fresh buffer's page faults, about
twice the CPU of a restore. :func:`pytree_ckpt.verify` reads and checks every chunk whole.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from . import _format, _leaves
from ._errors import CorruptCheckpointError, SaveError
from ._faults import read_failed
from ._format import Commit, LeafRecord

TRAILER = 4  # bytes of the crc32c codec's checksum at the end of each chunk
_CRC32C = _format.LEAF_CRC[5]  # the zarr3 crc32c codec's checksum, of a C-contiguous array

# A process's chunk CRCs per array: ``{array index: (flat chunk indices, CRCs)}``.
ChunkCrcs = dict[int, tuple[np.ndarray, np.ndarray]]


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


def shard_crcs(host: np.ndarray, index: tuple[slice, ...], shape: Sequence[int],
               chunks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(flat indices, CRC-32C)`` of every chunk of the shard ``host``, the region
    ``index`` of an array of ``shape`` cut into ``chunks`` (its stored dtype, in memory): the
    trailers zarr3 writes for them. An edge chunk is padded with the fill value (zeros), as
    it is stored; a chunk that is a contiguous block of ``host`` is checksummed in place.

    Chunks never straddle a shard (see ``_storage.choose_chunks``): a shard that does not
    start on a chunk boundary, or ends inside the array off one, is a ``ValueError``.

    >>> crc = shard_crcs(np.arange(5, dtype="<u1"), (slice(None),), (5,), (4,))
    >>> crc[0].tolist(), crc[1].tolist() == [_CRC32C(np.arange(4, dtype="u1")),
    ...                                      _CRC32C(np.array([4, 0, 0, 0], "u1"))]
    ([0, 1], True)
    """
    box = [s.indices(d)[:2] for s, d in zip(index, shape, strict=True)]
    ranges = []
    for (a, b), c, d in zip(box, chunks, shape, strict=True):
        if a % c or (b % c and b != d):
            raise ValueError(f"a shard {tuple(index)} of an array {tuple(shape)} is not made "
                             f"of whole chunks {tuple(chunks)}")
        ranges.append(range(a // c, -(-b // c)))
    cgrid = [-(-d // c) for d, c in zip(shape, chunks, strict=True)]
    if host.dtype != _little(host.dtype):  # the bytes codec writes little-endian
        host = host.astype(_little(host.dtype))
    flats, crcs, pad = [], [], None
    for at in itertools.product(*ranges):
        part = host[tuple(slice(i * c - a, min((i + 1) * c, d) - a)
                          for i, c, d, (a, _) in zip(at, chunks, shape, box, strict=True))]
        if part.shape != tuple(chunks) or not part.flags.c_contiguous:
            if pad is None:
                pad = np.empty(tuple(chunks), host.dtype)
            pad[...] = 0
            pad[tuple(slice(0, n) for n in part.shape)] = part
            part = pad
        flats.append(int(np.ravel_multi_index(at, cgrid)) if at else 0)
        crcs.append(_CRC32C(part.reshape(-1).view(np.uint8)))  # bytes: any dtype
    return np.array(flats, np.int64), np.array(crcs, np.uint32)


def pack_crcs(crcs: ChunkCrcs) -> list:
    """``crcs`` as msgpack-ready values, compactly: per array, its flat indices as runs
    (``starts``, ``lengths``, int64 bytes) and its CRCs (uint32 bytes), in flat order."""
    out = []
    for array, (flat, crc) in sorted(crcs.items()):
        order = np.argsort(flat, kind="stable")
        flat, crc = flat[order], crc[order]
        cuts = np.flatnonzero(np.diff(flat) != 1) + 1
        starts = flat[np.concatenate([[0], cuts])] if len(flat) else flat
        lengths = np.diff(np.concatenate([[0], cuts, [len(flat)]])) if len(flat) else flat
        out.append([array, starts.astype("<i8").tobytes(), lengths.astype("<i8").tobytes(),
                    crc.astype("<u4").tobytes()])
    return out


def unpack_crcs(packed: Iterable) -> ChunkCrcs:
    """What :func:`pack_crcs` packed."""
    out: ChunkCrcs = {}
    for array, starts, lengths, crc in packed:
        starts, lengths = np.frombuffer(starts, "<i8"), np.frombuffer(lengths, "<i8")
        flat = (np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
                + np.arange(int(lengths.sum()), dtype=np.int64))
        out[int(array)] = (flat, np.frombuffer(crc, "<u4").astype(np.uint32))
    return out


def recorded_column(records: Iterable[LeafRecord], crcs: Sequence[ChunkCrcs]) -> np.ndarray:
    """The commit file's ``chunk_crc`` column: every chunk's CRC of the zarr leaves
    ``records`` (in commit order), from every process's :func:`shard_crcs` (``crcs``).

    Raises SaveError naming a leaf with a chunk no process, or two, reported."""
    by_array: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for process in crcs:
        for array, pair in process.items():
            by_array.setdefault(array, []).append(pair)
    columns = []
    for rec in records:
        n = math.prod(grid(rec))
        column, seen = np.zeros(n, np.uint32), np.zeros(n, np.int64)
        for flat, crc in by_array.get(rec.storage.index, ()):
            column[flat] = crc
            np.add.at(seen, flat, 1)
        if n and (seen != 1).any():
            k = int(np.flatnonzero(seen != 1)[0])
            raise SaveError(
                f"leaf {rec.path!r:.200}: chunk "
                f"{tuple(int(i) for i in np.unravel_index(k, grid(rec)))} was written "
                f"by {int(seen[k])} processes, not one")
        columns.append(column)
    return np.concatenate(columns) if columns else np.zeros(0, np.uint32)


def chunk_fault(value: bytes | None, n: int, recorded: int | None) -> str | None:
    """What is wrong with a chunk's whole stored ``value`` (``n`` bytes before its trailer):
    ``"missing"``, ``"length"`` (another length), ``"damaged"`` (its bytes do not match its
    trailer), ``"moved"`` (its trailer is not the commit file's ``recorded`` CRC for that
    place: another chunk's), or None. Restore's reads by key and verify both ask this."""
    if value is None:
        return "missing"
    if len(value) != n + TRAILER:
        return "length"
    trailer = int.from_bytes(value[n:], "little")
    if _CRC32C(np.frombuffer(value, np.uint8, n)) != trailer:
        return "damaged"
    if recorded is not None and trailer != recorded:
        return "moved"
    return None


def checked_chunk(url: str, data: str, rec: LeafRecord, index: tuple[int, ...],
                  result: Any, recorded: int) -> np.ndarray:
    """Chunk ``index`` of ``rec`` (shape: its chunk shape, its stored dtype) from ``result``,
    a read of its whole stored value, once its bytes match its trailer and its trailer is
    the commit file's ``recorded`` CRC for that place.

    Raises CorruptCheckpointError naming the leaf and chunk: missing, of another length,
    damaged (a checksum mismatch), or another chunk than the one this checkpoint wrote there."""
    n, key = chunk_bytes(rec), chunk_key(data, rec, index)
    value = result.value if result.state == "value" else None
    fault = chunk_fault(value, n, recorded)
    if fault == "moved":
        raise CorruptCheckpointError(
            f"{url}: leaf {rec.path!r:.200}: chunk {index} is not the chunk this "
            "checkpoint wrote there (its checksum is another chunk's: moved or copied "
            "from another leaf, position or checkpoint)")
    if fault is not None or value is None:
        problem = {"missing": f"chunk {index} ({key}) is missing",
                   "length": f"chunk {index} ({key}) has {len(value or b'')} bytes, not "
                             f"{n + TRAILER}",
                   "damaged": f"chunk {index} ({key}): checksum mismatch, the stored bytes "
                              "are damaged"}[fault or "missing"]
        raise CorruptCheckpointError(
            f"{url}: leaf {rec.path!r:.200}: cannot read its array data ({problem})")
    dtype = _little(_leaves.DTYPES[rec.storage.stored_dtype])
    return np.frombuffer(value, dtype, math.prod(rec.storage.chunks)).reshape(
        rec.storage.chunks)


def _little(dtype: np.dtype) -> np.dtype:
    """``dtype`` in little-endian byte order, the zarr3 bytes codec's."""
    native = dtype.byteorder == "|" or (dtype.isnative and sys.byteorder == "little")
    return dtype if native or dtype.byteorder == "<" else dtype.newbyteorder("<")


def chunk_copies(rec: LeafRecord, pieces: Iterable[tuple[tuple, tuple]]
                 ) -> list[tuple[tuple[int, ...], int, list[tuple[tuple, tuple, tuple]]]]:
    """The chunks that reading ``pieces`` of ``rec`` needs, in C order, as ``(chunk index,
    flat index, copies)``; a piece is ``(region, part of it to read)``, each (start, stop)
    per axis, and each copy ``(region, part of the chunk, part of the region)``, slices,
    copies that chunk's part of a region into it."""
    chunks, shape = rec.storage.chunks, grid(rec)
    out: dict[tuple[int, ...], list] = {}
    for region, part in pieces:
        ranges = [range(a // c, (b - 1) // c + 1) if b > a else range(0)
                  for (a, b), c in zip(part, chunks, strict=True)]
        for at in itertools.product(*ranges):
            lo = [max(a, i * c) for (a, _), i, c in zip(part, at, chunks, strict=True)]
            hi = [min(b, (i + 1) * c) for (_, b), i, c in zip(part, at, chunks, strict=True)]
            src = tuple(slice(x - i * c, y - i * c)
                        for x, y, i, c in zip(lo, hi, at, chunks, strict=True))
            dst = tuple(slice(x - a, y - a) for x, y, (a, _) in zip(lo, hi, region, strict=True))
            out.setdefault(at, []).append((region, src, dst))
    return [(at, int(np.ravel_multi_index(at, shape)) if at else 0, out[at])
            for at in sorted(out)]


class Trailers:
    """The trailers of the chunks a restore reads of one leaf through TensorStore's zarr
    driver (which checks each chunk against its own), read alongside (4 bytes each) and
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
            value = bytes(result.value) if result.state == "value" else b""
            if len(value) != TRAILER:
                raise CorruptCheckpointError(
                    f"{url}: leaf {self._rec.path!r:.200}: chunk {tuple(index)} "
                    f"({chunk_key(self._data, self._rec, index)}) is missing or shorter than "
                    "its shape says")
            assert self._recorded is not None  # chunks are read only where recorded
            if int.from_bytes(value, "little") != int(self._recorded[flat]):
                raise CorruptCheckpointError(
                    f"{url}: leaf {self._rec.path!r:.200}: chunk {index} is not the chunk "
                    "this checkpoint wrote there (its checksum is another chunk's: moved "
                    "or copied from another leaf, position or checkpoint)")
