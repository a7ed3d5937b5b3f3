"""Writing a snapshot's data: this process's zarr3 chunks and packed blobs.

Every chunk is written concurrently, and checksummed from the bytes in memory meanwhile
(:func:`_binding.shard_crcs`: the commit file records each chunk's CRC-32C, and nothing is
read back); the packed parts a few at a time, each released (to
:data:`_packing.pool`) once written. With a progress bar, it advances by each packed part as
it is written, then by each chunk as the chunks' writes are waited for, in the order they
were issued (on the writing thread: tqdm's counter is not safe to advance from TensorStore's).
"""

from __future__ import annotations

import collections
import json
from typing import Any

import numpy as np

from . import _binding, _format, _leaves, _packing, _progress, _snapshot, _storage
from ._snapshot import ArrayWrite

_PARTS_IN_FLIGHT = 2


def write_data(kv: Any, data: str, snap: _snapshot.Snapshot, me: int, primary: bool,
               progress: bool = False) -> tuple[list[tuple], _binding.ChunkCrcs]:
    """Writes this process's chunks and packed parts; returns its packed leaves as
    ``(path, process, part, offset, nbytes, checksum)`` and the CRC-32C of the chunks it
    wrote (see _binding). With ``progress``, under a bar of the bytes this process writes."""
    total = (sum(host.nbytes for w in snap.arrays for _, host in w.shards)
             + sum(snap.packing.part_sizes))
    with _progress.bar(total, "save", progress) as advance:
        return _write_data(kv, data, snap, me, primary, advance)


def _write_data(kv: Any, data: str, snap: _snapshot.Snapshot, me: int, primary: bool,
                advance: _progress.Advance) -> tuple[list[tuple], _binding.ChunkCrcs]:
    opens = []
    for w in snap.arrays:
        spec = _storage.array_spec(w.shape, w.chunks, w.stored_dtype)
        if primary or w.shards:
            # Opened on the commit file's metadata: the primary writes zarr.json itself
            # (a create would read it first, one GET per array of a fresh folder).
            opens.append((w, _storage.open_array(kv, f"{data}/a/{w.index}", spec,
                                                 create=False)))
    futures: list = []
    entries = []
    written: list[tuple[ArrayWrite, tuple, np.ndarray]] = []
    crc = _format.LEAF_CRC[_format.FORMAT_VERSION]
    in_flight: collections.deque[tuple[int, Any, bytearray | None]] = collections.deque()
    try:
        for w, opening in opens:
            store = opening.result()
            if primary:
                futures.append((0, kv.write(f"{data}/a/{w.index}/zarr.json",
                                            _zarr_json(store))))
            for index, host in w.shards:
                host = np.asarray(host)  # a CPU snapshot copy is a jax.Array: waits, no copy
                if host.dtype.name != w.stored_dtype:
                    host = host.view(_leaves.DTYPES[w.stored_dtype])
                futures.append((host.nbytes, store[index].write(
                    host, can_reference_source_data_indefinitely=True)))
                written.append((w, index, host))
        crcs = _chunk_crcs(written)  # while TensorStore writes them
        spare: list[bytearray] = []  # without a snapshot copy: buffers of written parts
        for k, size in enumerate(snap.packing.part_sizes):
            part, buffer = snap.parts[k], None
            if not snap.copied:
                buffer = _resized(spare.pop(), size) if spare else bytearray(size)
                part = _packing.fill(buffer, snap.packing, k)
            assert part is not None  # a copied part, or one just packed
            view = np.frombuffer(part, np.uint8)
            entries += [(path, me, k, off, n, crc(view[off:off + n]))
                        for path, off, n in snap.packing.placed(k)]
            del view  # a part with a view cannot be resized for the next save
            in_flight.append((k, kv.write(f"{data}/p/{me}/{k}", part), buffer))
            if len(in_flight) >= _PARTS_IN_FLIGHT:
                _finish_part(snap, spare, *in_flight.popleft(), advance)
        while in_flight:
            _finish_part(snap, spare, *in_flight.popleft(), advance)
        for nbytes, f in futures:
            f.result()
            advance(nbytes)
    except BaseException:
        # Let every write end before reporting the failure: the generation is deleted then,
        # and a write still in flight would put files back into it.
        for f in [*(o for _, o in opens), *(f for _, f in futures),
                  *(f for _, f, _ in in_flight)]:
            f.exception()
        raise
    return entries, crcs


def _chunk_crcs(written: list[tuple[ArrayWrite, tuple, np.ndarray]]) -> _binding.ChunkCrcs:
    """The CRC-32C of every chunk of the shards ``written``, by array (see _binding)."""
    parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = collections.defaultdict(list)
    for w, index, host in written:
        parts[w.index].append(_binding.shard_crcs(host, index, w.shape, w.chunks))
    return {k: (np.concatenate([f for f, _ in v]), np.concatenate([c for _, c in v]))
            for k, v in parts.items()}


def _resized(buffer: bytearray, size: int) -> bytearray:
    # In place (TensorStore takes bytes or a bytearray, not a view): CPython keeps a
    # bytearray's memory when it shrinks a little or grows within its allocation.
    if len(buffer) > size:
        del buffer[size:]
    else:
        buffer.extend(bytes(size - len(buffer)))
    return buffer


def _finish_part(snap: _snapshot.Snapshot, spare: list[bytearray], k: int, future: Any,
                 buffer: bytearray | None, advance: _progress.Advance) -> None:
    # A few parts in flight at a time, each released once written: TensorStore copies what
    # it is given, so writing every part at once would hold the small leaves three times.
    future.result()
    advance(snap.packing.part_sizes[k])
    if buffer is not None:
        spare.append(buffer)  # packed in place of the snapshot's part: reused for the next
    else:
        release_part(snap, k)


def release_part(snap: _snapshot.Snapshot, k: int) -> None:
    part = snap.parts[k]
    if part is not None:
        snap.parts[k] = None
        _packing.pool.give(part)


def _zarr_json(store: Any) -> bytes:
    """The ``zarr.json`` of an array opened with its metadata assumed (as TensorStore writes
    it on create: compact, keys sorted), for a writer that writes it itself rather than
    have a create read it first (one request less per array)."""
    meta = store.spec(retain_context=False).to_json()["metadata"]
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
