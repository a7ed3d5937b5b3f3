"""The commit protocol: all processes agree, every process writes, all report, then the
primary commits.

Before anything is written (:func:`agree`, in the caller's thread), every process publishes
the checkpoint's path and a digest of its tree, and the primary a save id; a failed snapshot
is reported there too. Any difference or failure fails the save on every process.

A save's background part (:func:`finish`): every process writes its data into a fresh
generation folder ``d-<save id>`` of the checkpoint; all processes report success (each
waited for as long as its heartbeat says it is alive); then the primary writes the commit
file (atomically: TensorStore's file driver writes through a rename and fsyncs; an object
store PUT is atomic) and only then deletes an overwritten checkpoint's old generation.

Until the commit file exists, nothing is restorable and earlier checkpoints are untouched.

Without ``overwrite``, the commit file is written only if there is still none (a conditional
write, as atomic as the store's): of two such saves racing to one path, the first to commit
wins and the other fails with :class:`SaveError`, instead of silently replacing a checkpoint
whose save had already returned. (With ``overwrite=True`` the last writer wins, as asked.)
A save that fails deletes its own uncommitted generation: a full disk is not left fuller.

The outcome is the commit file's: restore's own validation runs on it before it is written
(what restore would refuse is refused), and once it is written the save has succeeded, so
what fails afterwards is a warning.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import os
import time
import warnings
from typing import Any

import msgpack

from . import _binding, _clean, _decode, _distributed, _faults, _format, _options, _snapshot, _storage, _write
from ._errors import CorruptCheckpointError, SaveError, UnsupportedLeafError
from ._format import COMMIT_FILE, LeafRecord, Storage


def commit_stamp(kv: Any) -> bytes:
    """The commit file's storage generation now (TensorStore's "no value" one if absent)."""
    with _faults.faults(_storage.kv_url(kv, COMMIT_FILE)):
        return kv.read(COMMIT_FILE, byte_range=slice(0, 0)).result().stamp.generation


# The meetings of the last save agreed on: deleted once every process is in the next one.
_last_meetings: list[str] = []


def agree(meeting: str, url: str | None, snap: _snapshot.Snapshot | None,
          error: BaseException | None) -> tuple[str, set[str]]:
    """Every process of a multi-process job agrees on a save before any data is written:
    the same checkpoint, the same tree (structure and leaf specs), the save's id, which
    the primary chooses, and the leaves carried from the base step (those every process
    found unchanged, see _carry); returns ``(id, carried leaf paths)`` (the id names the
    save's data generation and its later meetings, so they cannot drift from one save to
    the next).

    A process whose preparation failed (``error``) reports it here rather than raising
    before it, so that the others fail this save with it and every process goes on to the
    next save together; that process then raises its own ``error``.

    **Raises:** ``error``; :class:`DistributedError` (a SaveError) naming the processes
    that failed or differ, and what differed, on every process."""
    if not _distributed.is_multiprocess():
        if error is not None:
            raise error
        return _clean.new_save_id(), set(snap.candidates)  # pyright: ignore[reportOptionalMemberAccess]  # snap unless error
    primary = _distributed.process_index() == 0
    mine = "" if error is not None else json.dumps(
        [url, _tree_digest(snap), _clean.new_save_id() if primary else None,  # pyright: ignore[reportArgumentType]  # snap unless error
         _candidates(snap)])  # pyright: ignore[reportArgumentType]
    try:
        values = _distributed.exchange(
            f"save/{meeting}/agree", mine,
            None if error is None else f"{type(error).__name__}: {error}",
            _options.get("barrier_timeout_s"))
    except _distributed.DistributedError as e:
        if error is not None:
            raise error from e
        raise _distributed.DistributedError(f"{url}: save failed before writing: {e}") from e
    # Every process reported here, so every one has left the previous save's meetings.
    agreed = [json.loads(v) for v in values]
    _distributed.forget(_last_meetings)
    _last_meetings[:] = [f"save/{meeting}/agree", f"save/{agreed[0][2]}"]
    for what, k in (("checkpoint path", 0), ("tree (its structure, or a leaf's path, kind, "
                                               "dtype, weak type, shape or sharding)", 1)):
        differ = [p for p, a in enumerate(agreed) if a[k] != agreed[0][k]]
        if differ:
            got = "; ".join(f"process {p}: {a[k]!r}" for p, a in enumerate(agreed)
                            if p in (0, *differ))
            raise _distributed.DistributedError(
                f"{url}: save refused on every process: process(es) "
                f"{', '.join(map(str, differ))} saved another {what} than process 0 ({got}); "
                "every process must save the same tree to the same path")
    return agreed[0][2], _carried(snap, [a[3] for a in agreed])  # pyright: ignore[reportArgumentType]  # snap unless error


def _candidates(snap: _snapshot.Snapshot) -> list:
    """What a process offers to carry: ``[base step and generation, leaf numbers]``."""
    if not snap.candidates or snap.base is None:  # candidates come with a base
        return [None, []]
    number = {r[0]: k for k, r in enumerate(snap.records)}
    return [list(snap.base), sorted(number[p] for p in snap.candidates)]


def _carried(snap: _snapshot.Snapshot, offers: list) -> set[str]:
    """The leaves every process offered to carry, from the same data: none unless every
    process's base refers to the same step folders and generations."""
    if any(o[0] != offers[0][0] or o[0] is None for o in offers):
        return set()
    common = set.intersection(*(set(o[1]) for o in offers))
    return {snap.records[k][0] for k in common} & set(snap.candidates)


def _tree_digest(snap: _snapshot.Snapshot) -> str:
    """A digest of what every process must agree on: the tree's nodes and each leaf's
    record (weak typing included) but a Python leaf's value (the primary's is saved)."""
    described = [(r[0], r[1], r[2], r[3], r[4], r[5].kind, r[5].chunks, r[5].stored_dtype,
                  r[6], r[7]) for r in snap.records]
    digest = hashlib.sha256(repr((snap.nodes, described)).encode()).hexdigest()
    return f"{len(described)} leaves, {len(snap.nodes)} nodes, digest {digest[:16]}"


def finish(loc: _storage.Location, kv: Any, snap: _snapshot.Snapshot, names: set[str],
           save_id: str, seen: bytes | None, progress: bool = False) -> bytes | None:
    """Writes and commits the snapshot (every process takes part), in the background; with
    ``progress``, the primary shows a bar of the bytes it writes. Returns the commit file
    the primary wrote (None on the other processes)."""
    try:
        with _distributed.alive(_options.get("liveness_timeout_s")):
            return _write_and_commit(loc, kv, snap, names, save_id, seen, progress)
    finally:
        # Every write has ended here, failed or not (_write.write_data waits for them).
        for k in range(len(snap.parts)):
            _write.release_part(snap, k)


def _write_and_commit(loc: _storage.Location, kv: Any, snap: _snapshot.Snapshot,
                      names: set[str], save_id: str, seen: bytes | None,
                      progress: bool) -> bytes | None:
    me = _distributed.process_index()
    primary = me == 0
    old = _replaced_generations(kv, names) if primary else []
    data, name = _format.generation_folder(save_id), f"save/{save_id}"
    error, cause, entries, crcs = None, None, [], {}
    try:
        entries, crcs = _write.write_data(kv, data, snap, me, primary, progress and primary)
        if loc.local is not None:
            # A tree of Python leaves only writes no data: the folder must exist to be synced
            # (and it makes the checkpoint's own directory exist, durably, before the commit).
            os.makedirs(os.path.join(loc.local, data), exist_ok=True)
            _storage.fsync_tree(os.path.join(loc.local, data))
    except Exception as e:
        cause = e
        if _faults.is_storage_fault(e):  # a write refused, or failing after retries
            cause = _faults.storage_error(f"{loc.url}/{data}", e)
            cause.__cause__ = e
        error = f"{type(cause).__name__}: {cause}"
    # Every process reports; any failure (or silence) anywhere means no commit anywhere.
    try:
        _check(f"{name}/written", error, f"{loc.url}: save failed, nothing was committed",
               cause)
    except SaveError:
        if primary:
            _discard(loc, kv, data)
        raise
    entries, sizes, crcs = _gather_written(name, entries, crcs, snap, me)
    error, refused, cause, written = None, None, None, None
    if primary:
        try:
            written = _write_commit(loc, kv, snap, data, entries, sizes, crcs, old, seen)
        except (_LostRace, UnsupportedLeafError) as e:
            _discard(loc, kv, data)
            error, refused = str(e), e if isinstance(e, UnsupportedLeafError) else None
        except Exception as e:
            error, cause = _commit_failure(loc, kv, data, e), e
    try:
        _check(f"{name}/committed", error, f"{loc.url}: writing the commit file failed", cause)
    except SaveError as e:
        if refused is not None:
            raise refused from e
        raise
    return written


def _commit_failure(loc: _storage.Location, kv: Any, data: str, e: Exception) -> str | None:
    """What to report when writing the commit file raised: None if it was written after all
    (a lost reply), else the error, saying so where the outcome is unknown."""
    try:
        raw = _storage.read_key(kv, COMMIT_FILE)
    except Exception as unreadable:
        return (f"{type(e).__name__}: {e}; whether the checkpoint was committed is unknown "
                f"(the commit file cannot be read back: {unreadable}): restore tells")
    if raw is not None and _decode.generation_of(raw) == data:
        warnings.warn(f"{loc.url}: the checkpoint was committed, though writing its commit "
                      f"file reported {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
        return None
    _discard(loc, kv, data)  # e.g. no space for the commit file
    return f"{type(e).__name__}: {e}"


def _check(name: str, error: str | None, what: str, cause: Exception | None = None) -> None:
    """Reports this process's ``error`` (None: fine) at meeting ``name`` and raises
    :class:`SaveError` if any process reported one. Errors cross processes as text; this
    process's own exception (``cause``), if it had one, is the SaveError's ``__cause__``,
    so that its class is kept where it happened (a :class:`StorageError` for a store that
    refused or kept failing a write)."""
    try:
        _distributed.report_and_check(name, error, _options.get("barrier_timeout_s"),
                                      _options.get("liveness_timeout_s"))
    except Exception as e:
        raise SaveError(f"{what}: {e}") from (cause if cause is not None else e)


class _LostRace(Exception):
    """Another save committed to this path after this one started."""


def _discard(loc: _storage.Location, kv: Any, data: str) -> None:
    """Deletes this failed save's own, uncommitted generation, if it can (its error is the one
    to report; a leftover is harmless and a CheckpointManager deletes it on start).

    A failed array write reports its first error while TensorStore may still be writing its
    other chunks (on a full disk some fit, and deleting a folder being written to can fail),
    so on a local disk it deletes until the folder has stayed away for a moment (2 s at most).
    """
    folder = os.path.join(loc.local, data) if loc.local is not None else None
    start = quiet_since = time.monotonic()
    while True:
        try:
            if folder is None or os.path.exists(folder):
                _storage.delete_prefix(loc, kv, data)
                quiet_since = time.monotonic()
        except Exception:
            pass
        now = time.monotonic()
        if folder is None or now - quiet_since >= 0.3 or now - start >= 2:
            return
        time.sleep(0.05)


def _write_commit(loc: _storage.Location, kv: Any, snap: _snapshot.Snapshot, data: str,
                  entries: list, sizes: list, crcs: list[_binding.ChunkCrcs], old: list[str],
                  seen: bytes | None) -> bytes:
    """Writes the commit file (atomically; if ``seen``, only if its storage generation is
    still that), then deletes the generations it replaces; returns the file written.

    The commit file is first read back as restore reads it: what restore would refuse is
    refused here (:class:`UnsupportedLeafError`), before it is written. Once it is written
    the save has succeeded: what fails after that (syncing the directory, deleting the
    replaced generation) is a warning, never an error that would say nothing was committed."""
    commit = _format.Commit(
        data=data, nodes=snap.nodes, arrays=snap.n_arrays,
        blobs=tuple(sorted(sizes)),
        leaves=_finish_records(snap, entries, sorted(sizes)),  # pyright: ignore[reportArgumentType]
        writer=dict(_format.writer_info(_distributed.process_count(), time.time())),
        version=_format.FORMAT_VERSION, refs=snap.refs,
    )
    encoded = _format.encode(commit, _chunk_crcs(crcs, snap, commit))
    _check_restorable(loc, encoded, commit)
    written = _storage.write_key(loc, kv, COMMIT_FILE, encoded, if_equal=seen)
    if not written.generation:  # TensorStore's answer to a failed condition
        raise _LostRace(
            f"another save committed a checkpoint to {loc.url} while this one was writing "
            "(with overwrite=False); this save was not committed and the other one is intact")
    try:
        if loc.local is not None:
            _storage.fsync_dir(os.path.dirname(loc.local.rstrip("/")))
        if old:
            # Re-read: never delete what the commit file now names (should another writer's
            # commit have landed after ours, it names its own generation, not one in ``old``).
            current = _committed_generation(kv)
            for generation in old:
                if generation not in (data, current):
                    _storage.delete_prefix(loc, kv, generation)
    except Exception as e:
        warnings.warn(f"{loc.url}: the checkpoint was committed, but cleaning up after it "
                      f"failed ({type(e).__name__}: {e}); an overwritten generation may be "
                      "left behind (pc.clean reclaims it)", RuntimeWarning, stacklevel=2)
    return encoded


def _chunk_crcs(crcs: list[_binding.ChunkCrcs], snap: _snapshot.Snapshot,
                commit: _format.Commit) -> list[int]:
    """Every zarr leaf's chunks' CRC-32C in commit order: those every process computed of
    the chunks it wrote (they bind them to this commit; nothing is read back), and for a
    carried leaf, those its writer recorded."""
    zarr = [r for r in commit.leaves.values() if r.storage.kind == "z"]
    written = iter(_binding.recorded_column([r for r in zarr if not r.storage.ref],
                                            crcs).tolist())
    out: list[int] = []
    for r in zarr:
        if r.storage.ref:
            out += snap.carried[r.path].tolist()
        else:
            out += itertools.islice(written, math.prod(_binding.grid(r)))
    return out


def _check_restorable(loc: _storage.Location, encoded: bytes, commit: _format.Commit) -> None:
    """Decodes ``encoded`` with restore's own validation; raises UnsupportedLeafError
    naming the leaf if restore would refuse it."""
    try:
        _decode.decode(encoded, f"{loc.url}/{COMMIT_FILE}")
    except CorruptCheckpointError as e:
        reason = str(e).split(f"{COMMIT_FILE}: ", 1)[-1]
        if len(encoded) > _format.MAX_COMMIT_BYTES:
            largest = max((r for r in commit.leaves.values() if r.storage.kind == "v"),
                          key=lambda r: len(r.storage.value)
                          if isinstance(r.storage.value, bytes | str) else 0, default=None)
            leaf = f" (its largest Python leaf is {largest.path!r})" if largest else ""
            reason = (f"its commit file would be {len(encoded):,} bytes, more than restore "
                      f"reads ({_format.MAX_COMMIT_BYTES:,}){leaf}; save large bytes or str "
                      "values as arrays")
        raise UnsupportedLeafError(
            f"{loc.url}: refusing to commit a checkpoint restore would refuse: {reason}"
        ) from None


def _replaced_generations(kv: Any, names: set[str]) -> list[str]:
    """The data generation the current commit file names, to delete after our commit.

    Only that one: a ``d-*`` folder no commit file names may be another process's save in
    progress (two writers overwriting one path), and deleting it would leave that writer's
    commit file naming deleted data. Leftovers of crashed saves therefore stay (a
    CheckpointManager deletes its incomplete steps on start).

    Read in the background, not while the caller waits (decoding a large commit file is
    per leaf): reading it later is the same as a caller whose snapshot took longer.
    ``names`` (listed before the snapshot) keeps a generation committed since then."""
    if COMMIT_FILE not in names:
        return []
    committed = _committed_generation(kv)
    return [committed] if committed is not None and committed in names else []


def _committed_generation(kv: Any) -> str | None:
    """The generation named by the commit file now there (None if none, or unreadable)."""
    try:
        raw = _storage.read_key(kv, COMMIT_FILE)
    except Exception:
        return None
    return None if raw is None else _decode.generation_of(raw)


def _gather_written(name: str, entries: list[tuple], crcs: _binding.ChunkCrcs,
                    snap: _snapshot.Snapshot, me: int
                    ) -> tuple[list[tuple], list[tuple[int, int, int]], list[_binding.ChunkCrcs]]:
    """Every process's packed leaves, blob sizes and chunk CRCs (on the primary; others
    get their own)."""
    sizes = [(me, k, n) for k, n in enumerate(snap.packing.part_sizes)]
    if not _distributed.is_multiprocess():
        return entries, sizes, [crcs]
    mine = base64.b64encode(msgpack.packb([entries, sizes, _binding.pack_crcs(crcs)])).decode()  # pyright: ignore[reportArgumentType]  # packb returns bytes
    gathered = _distributed.gather_str(f"{name}/packed", mine,
                                       _options.get("barrier_timeout_s"))
    entries, sizes, every = [], [], []
    for text in gathered or []:
        e, s, c = msgpack.unpackb(base64.b64decode(text))
        entries += [tuple(x) for x in e]
        sizes += [tuple(x) for x in s]
        every.append(_binding.unpack_crcs(c))
    return entries, sizes, every


def _finish_records(snap: _snapshot.Snapshot, entries: list[tuple], blobs: list[tuple]
                    ) -> dict[str, LeafRecord]:
    index = {(proc, part): i for i, (proc, part, _) in enumerate(blobs)}
    placed = {path: Storage("p", index=index[proc, part], offset=offset, nbytes=n, crc=crc)
              for path, proc, part, offset, n, crc in entries}
    missing = [f[0] for f in snap.records if f[5].kind == "p" and f[0] not in placed]
    if missing:
        raise SaveError(f"no process wrote the small leaves {missing[:5]}")
    # One record per leaf, a packed leaf's with the place its process wrote it to.
    return {f[0]: LeafRecord(*f[:5], placed.get(f[0], f[5]), *f[6:])  # pyright: ignore[reportCallIssue]  # f: a record's fields
            for f in snap.records}
