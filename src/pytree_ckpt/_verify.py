"""verify: read every byte of a checkpoint and check every checksum and every binding.

Restore checks what it reads: the commit file, each packed leaf's checksum, each chunk
against its own trailer (TensorStore's crc32c codec) and, from format 5, each chunk's
trailer against the commit file's record for that place (see _binding). Verify reads
everything, whatever a target would ask for, and checks more: every chunk's bytes against
its trailer, recomputed here; each array's ``zarr.json`` against the commit file (restore
takes the metadata from the commit file and never reads it); every Python leaf's value; the
tree the nodes and leaves form; and that no file in the checkpoint is a FIFO or device.
"""

from __future__ import annotations

import collections
import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from . import (
    _binding,
    _decode,
    _faults,
    _foreign,
    _format,
    _gc_pause,
    _progress,
    _refs,
    _source,
    _storage,
)
from ._errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NotACheckpointError,
)
from ._format import COMMIT_FILE, Commit, LeafRecord
from ._open import commit_file, load_commit

_IN_FLIGHT = 16  # chunks read at once (~64 MiB of chunks of the writer's size)
_MAX_ZARR_JSON = 1 << 16
_FOREIGN = {_source.ORBAX: "an Orbax checkpoint", _source.FLAX_MSGPACK: "a Flax msgpack file",
            _source.SAFETENSORS: "a safetensors file"}


class VerifyReport(NamedTuple):
    """What :func:`verify` found.

    - ``path``: the checkpoint, as a URL or local path.
    - ``format_version``: the format version of its commit file (as in
      :class:`CheckpointMetadata`).
    - ``leaf_count``: how many leaves were checked (every leaf of the checkpoint).
    - ``bytes_read``: the bytes read: the commit file, every chunk, ``zarr.json`` and blob.
    - ``problems``: what is wrong, by leaf path (``""`` for the checkpoint as a whole), in
      path order; empty if nothing is.
    """

    path: str
    format_version: int
    leaf_count: int
    bytes_read: int
    problems: Mapping[str, str]

    @property
    def ok(self) -> bool:
        """True if nothing is wrong."""
        return not self.problems


def verify(path: str | os.PathLike | dict, *, strict: bool = False,
           progress: bool = False) -> VerifyReport:
    """Reads every byte of the checkpoint at ``path`` and checks every checksum and binding.

    Restore already checks what it reads (see the README's "Reliability"); ``verify`` reads
    all of it, as a restore of every leaf would, and also checks what restore takes on
    trust: each chunk's bytes against its checksum (recomputed), each chunk's place (a chunk
    moved within a leaf, between leaves, or copied from another checkpoint or generation),
    each array's ``zarr.json``, every Python leaf's value, the tree's structure, and that no
    file is a FIFO or device. Checkpoints written before format 5 record no chunk's place.

    **Arguments:**

    - ``path``: a pytree_ckpt checkpoint (as for :func:`restore`).
    - ``strict``: raise :class:`CorruptCheckpointError` naming every bad leaf instead
      of returning a report with problems.
    - ``progress``: show a progress bar of the bytes of data read, every chunk and packed
      blob the commit file names (tqdm: a widget in a notebook, on stderr elsewhere). Off by
      default: verify prints nothing.

    **Returns:** a :class:`VerifyReport`.

    **Raises:** :class:`CheckpointNotFoundError` / :class:`IncompleteCheckpointError` if no
    committed pytree_ckpt checkpoint is there; :class:`CorruptCheckpointError` or
    :class:`FormatVersionError` for a commit file that cannot be read (nothing else can be
    checked then), and with ``strict=True`` for any problem;
    :class:`NotACheckpointError` for a FIFO or device in place of the commit file, and for
    another tool's checkpoint (Orbax, Flax msgpack, safetensors), whose files record no
    checksums to check (the reader's checks of its header still apply:
    :class:`CorruptCheckpointError` for one that does not fit the file).

    Example::

        >>> _ = pc.save({"w": jnp.ones((512, 512)), "b": jnp.zeros(3)}, "memory://doc/verify")
        >>> report = pc.verify("memory://doc/verify")
        >>> report.ok, report.leaf_count, report.bytes_read > 512 * 512 * 4
        (True, 2, True)
        >>> pc.verify("memory://doc/verify", progress=True).ok  # a bar on stderr meanwhile
        True
    """
    loc = _storage.location(path)
    kv = _storage.open_kvstore(loc)
    with _faults.faults(loc.url):  # a storage fault is no damage found
        commit = _load_ours(loc, kv)
        problems: dict[str, str] = {}
        read = _Checker(loc, kv, commit, problems, _refs.Stores(loc, kv, commit))
        read.add(_commit_bytes(kv, loc))
        for path in sorted(read.irregular)[:1]:
            problems[""] = read.refused(os.path.relpath(path, loc.local)) or path
        try:
            with _gc_pause.paused():  # a per-leaf loop, not a read: see _gc_pause
                _decode.tree_nodes(commit, commit_file(loc))
        except CorruptCheckpointError as e:
            problems[""] = str(e)
        with _gc_pause.paused():
            records = read.records()
        packed = [r for r in records if r.storage.kind == "p"]
        zarr = [r for r in records if r.storage.kind == "z"]
        with _progress.bar(_data_bytes(commit, packed, zarr), "verify", progress) as advance:
            read.advance = advance
            read.packed(packed)
            for rec in zarr:
                read.zarr(rec)
    report = VerifyReport(loc.url, commit.version, len(commit.leaves), read.bytes,
                          dict(sorted(problems.items())))
    if strict and problems:
        listed = "; ".join(f"{p!r:.200}: {m}" for p, m in report.problems.items())
        raise CorruptCheckpointError(
            f"{loc.url}: {len(problems)} bad leaf/leaves of {report.leaf_count}: {listed}")
    return report


def _load_ours(loc: _storage.Location, kv: Any) -> Commit:
    """The commit file; for another tool's checkpoint, a clear refusal naming its format."""
    try:
        return load_commit(loc, kv)
    except CheckpointNotFoundError:
        foreign = _foreign.detect(loc, kv)
        if foreign is None:
            raise
    raise NotACheckpointError(
        f"{loc.url}: {_FOREIGN[foreign.format]}, not a pytree_ckpt checkpoint: verify checks the "
        "checksums a pytree_ckpt checkpoint records, and this format records none (restore and "
        "metadata read it; pytree-ckpt convert makes a pytree_ckpt checkpoint of it)")


def _data_bytes(commit: Commit, packed: list[LeafRecord], zarr: list[LeafRecord]) -> int:
    """The bytes of every packed blob and chunk that ``commit`` says the leaves are in."""
    blobs = {r.storage.index for r in packed}
    return (sum(commit.blobs[b][2] for b in blobs)
            + sum(math.prod(_binding.grid(r)) * (_binding.chunk_bytes(r) + _binding.TRAILER)
                  for r in zarr))


def _commit_bytes(kv: Any, loc: _storage.Location) -> int:
    raw = _storage.read_key(kv, COMMIT_FILE, loc)
    return len(raw) if raw is not None else 0


def _irregular_files(directory: str) -> set[str]:
    """The paths below ``directory`` that :func:`_storage.check_regular` refuses."""
    out = set()
    for root, dirs, files in os.walk(directory):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            try:
                _storage.check_regular(os.path.join(root, name))
            except NotACheckpointError:
                out.add(os.path.join(root, name))
    return out


class _Checker:
    """Reads and checks leaves, counting the bytes read and recording the first problem of
    each leaf in ``problems``."""

    def __init__(self, loc: _storage.Location, kv: Any, commit: Commit,
                 problems: dict[str, str], stores: _refs.Stores):
        self.url, self.kv, self.commit, self.problems = loc.url, kv, commit, problems
        self.stores = stores  # where each zarr leaf's array is (a carried one's elsewhere)
        self.bytes = 0
        self.advance: _progress.Advance = lambda n: None  # a progress bar's, by data bytes
        # Locally, the files that are FIFOs, devices or sockets: never read (a read of one
        # blocks until a writer comes), each a problem of the leaf it holds.
        self.local = loc.local
        self.irregular = (_irregular_files(os.path.join(loc.local, commit.data))
                          if loc.local is not None else set())

    def refused(self, key: str) -> str | None:
        """Why ``key`` is not read, or None: it is a FIFO, device or socket."""
        if self.local is None or os.path.join(self.local, key) not in self.irregular:
            return None
        try:
            _storage.check_regular(os.path.join(self.local, key))
        except NotACheckpointError as e:
            return str(e)
        return None

    def add(self, n: int) -> None:
        self.bytes += n

    def fail(self, path: str, what: str) -> None:
        self.problems.setdefault(path, what)

    def records(self) -> list[LeafRecord]:
        """Every leaf's record; a Python leaf whose value does not decode is a problem."""
        leaves = self.commit.leaves
        try:
            return leaves.records(list(leaves))  # type: ignore[attr-defined]
        except CorruptCheckpointError:
            pass
        out = []
        for path in leaves:
            try:
                out.append(leaves[path])
            except CorruptCheckpointError as e:
                self.fail(path, str(e))
        return out

    def packed(self, records: list[LeafRecord]) -> None:
        """Reads each blob whole, once, and checks every packed leaf in it."""
        by_blob: dict[int, list[LeafRecord]] = collections.defaultdict(list)
        for rec in records:
            by_blob[rec.storage.index].append(rec)
        crc = _format.LEAF_CRC[self.commit.version]
        for blob, recs in sorted(by_blob.items()):
            key = self.commit.blob_key(blob)
            declared = self.commit.blobs[blob][2]
            refused = self.refused(key)
            if refused is not None:
                for rec in recs:
                    self.fail(rec.path, refused)
                continue
            result = self.kv.read(key).result()
            self.advance(declared)
            data = bytes(result.value) if result.state == "value" else None
            if data is None:
                for rec in recs:
                    self.fail(rec.path, f"packed blob {blob} ({key}) is missing")
                continue
            self.add(len(data))
            view = memoryview(data)
            for rec in recs:
                s = rec.storage
                if len(data) != declared:
                    self.fail(rec.path, f"packed blob {blob} ({key}) has {len(data)} bytes, "
                              f"the commit file says {declared}")
                elif crc(np.frombuffer(view[s.offset:s.offset + s.nbytes], np.uint8)) != s.crc:
                    self.fail(rec.path, f"checksum mismatch in packed blob {blob} ({key}, "
                              f"bytes {s.offset} to {s.offset + s.nbytes})")

    def zarr(self, rec: LeafRecord) -> None:
        """Checks a zarr leaf's ``zarr.json`` and every chunk: its length, its bytes against
        its trailer, and its trailer against the commit file's record (format 5 on)."""
        try:
            kv, data = self.stores(rec)
            self.stores.check([rec])
        except CheckpointError as e:
            self.fail(rec.path, str(e))
            return
        shown = self.stores.label(rec)
        self._zarr_json(rec, kv, data, shown)
        recorded = _decode.chunk_crcs(self.commit, rec.path)
        n = _binding.chunk_bytes(rec)
        for flat, (index, result) in enumerate(self._chunks(rec, kv, data)):
            key = shown + _binding.chunk_key(data, rec, index)
            self.advance(n + _binding.TRAILER)
            if isinstance(result, str):
                self.fail(rec.path, result)
                continue
            value = bytes(result.value) if result.state == "value" else None
            self.add(len(value or b""))
            fault = _binding.chunk_fault(value, n, None if recorded is None
                                         else int(recorded[flat]))
            if fault == "missing":
                self.fail(rec.path, f"chunk {index} ({key}) is missing")
            elif fault == "length":
                self.fail(rec.path, f"chunk {index} ({key}) has {len(value or b'')} bytes, "
                          f"not {n + _binding.TRAILER}")
            elif fault == "damaged":
                self.fail(rec.path, f"chunk {index} ({key}): checksum mismatch (the stored "
                          "bytes are damaged)")
            elif fault == "moved":
                self.fail(rec.path, f"chunk {index} ({key}) is not the chunk this checkpoint "
                          "wrote there (moved or copied from another leaf, position or "
                          "checkpoint)")

    def _chunks(self, rec: LeafRecord, kv: Any, data: str
                ) -> Iterator[tuple[tuple[int, ...], Any]]:
        """Every chunk of ``rec`` read whole, in C order, ``_IN_FLIGHT`` at a time; a chunk
        not read (:meth:`refused`) comes as the reason, a string (a carried leaf's folder
        was checked whole: see _refs.Stores.check)."""
        in_flight: collections.deque = collections.deque()
        for index in _binding.all_chunks(rec):
            key = _binding.chunk_key(data, rec, index)
            refused = None if rec.storage.ref else self.refused(key)
            in_flight.append((index, refused or kv.read(key)))
            if len(in_flight) >= _IN_FLIGHT:
                index, future = in_flight.popleft()
                yield index, future if isinstance(future, str) else future.result()
        while in_flight:
            index, future = in_flight.popleft()
            yield index, future if isinstance(future, str) else future.result()

    def _zarr_json(self, rec: LeafRecord, kv: Any, data: str, shown: str) -> None:
        key = f"{data}/a/{rec.storage.index}/zarr.json"
        refused = None if rec.storage.ref else self.refused(key)
        if refused is not None:
            self.fail(rec.path, refused)
            return
        result = kv.read(key).result()
        key = shown + key
        if result.state != "value":
            self.fail(rec.path, f"{key} is missing")
            return
        self.add(len(result.value))
        try:
            if len(result.value) > _MAX_ZARR_JSON:
                raise ValueError(f"{len(result.value)} bytes")
            meta = json.loads(bytes(result.value))
            found = (meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"],
                     meta["data_type"])
        except (ValueError, KeyError, TypeError) as e:
            self.fail(rec.path, f"{key} is not zarr3 metadata ({e!r:.100})")
            return
        expected = (list(rec.shape), list(rec.storage.chunks), rec.storage.stored_dtype)
        if found != expected:
            self.fail(rec.path, f"{key} describes shape, chunks and dtype {found!r:.200}; the "
                      f"commit file says {expected!r:.200}")
