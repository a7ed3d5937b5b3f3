"""Opening a checkpoint: its commit file (ours), or another tool's files.

:func:`open_source` (:func:`open_path` from a user's path) gives a :class:`~._source.Source`
for any format: our commit file, validated as untrusted input (:func:`load_commit`), or, where
there is none, what ``_foreign.detect`` recognizes. Reading our leaves goes through :func:`_read.read_leaves`,
guarded against an overwrite that lands while they are read (:class:`OverwrittenError`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from . import _foreign, _refs, _source, _storage
from ._decode import decode, generation_of, tree_nodes
from ._errors import (
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    OverwrittenError,
    StorageError,
)
from ._format import COMMIT_FILE, RETIRED, Commit, is_ours
from ._read import read_leaves


def commit_file(loc: _storage.Location) -> str:
    """The commit file of the checkpoint at ``loc``, as errors about it name it."""
    return f"{loc.url}/{COMMIT_FILE}"


def load_commit(loc: _storage.Location, kv: Any) -> Commit:
    """Reads and validates the commit file, or says precisely why there is none.

    A store that refuses the read or keeps failing (a 403, a 503 after retries) is a
    :class:`StorageError`, never "not found": nothing is known about the checkpoint then,
    and a caller that starts fresh on ``FileNotFoundError`` must not."""
    if loc.local is not None:  # a FIFO there would block the read forever
        _storage.check_regular(os.path.join(loc.local, COMMIT_FILE))
    try:
        data = _storage.read_key(kv, COMMIT_FILE)  # a storage fault: StorageError
    except StorageError:
        raise
    except Exception as e:  # e.g. the path is a file (another tool's checkpoint, maybe)
        raise CheckpointNotFoundError(f"{loc.url}: cannot read the commit file ({e})") from e
    if data is None:
        names = _storage.top_level_names(loc, kv)
        if not names:
            raise CheckpointNotFoundError(f"{loc.url}: no checkpoint there (nothing exists)")
        if RETIRED in names:  # see _retire
            step = loc.url.rstrip("/").rpartition("/")[2]
            raise CheckpointNotFoundError(
                f"{loc.url}: step {step} was deleted; its folder keeps only data that later "
                "steps carry, so nothing here is restorable (restore those steps)")
        if any(map(is_ours, names)):
            raise IncompleteCheckpointError(
                f"{loc.url}: incomplete checkpoint (data but no {COMMIT_FILE}): a save did not "
                "finish, so nothing here is restorable")
        raise CheckpointNotFoundError(
            f"{loc.url}: not a checkpoint (no {COMMIT_FILE}; it holds "
            f"{', '.join(sorted(map(repr, names))[:5])})")
    return decode(data, commit_file(loc))


def open_path(path: str | os.PathLike | dict) -> tuple[_storage.Location, _source.Source]:
    """The location a user's ``path`` names (as for ``save``), and the checkpoint there."""
    loc = _storage.location(path)
    return loc, open_source(loc)


def open_source(loc: _storage.Location) -> _source.Source:
    """The checkpoint at ``loc``: ours (its commit file), or another tool's files."""
    kv = _storage.open_kvstore(loc)
    try:
        commit = load_commit(loc, kv)
    except CheckpointNotFoundError:
        foreign = _foreign.detect(loc, kv)
        if foreign is None:
            raise
        return foreign
    return _source.Source(
        format=_source.PYTREE_CKPT, url=loc.url, version=commit.version, leaves=commit.leaves,
        nodes=commit.nodes, tree_nodes=lambda: tree_nodes(commit, commit_file(loc)),
        read=functools.partial(_read_checked, loc, kv, commit),
        writer=commit.writer, carried=_refs.carried_from(commit))


def _read_checked(loc: _storage.Location, kv: Any, commit: Commit, jobs: list,
                  share: bool | None) -> dict[str, Any]:
    """:func:`read_leaves` (``share``: restore's ``share_reads``), once nothing in a local
    generation folder is a FIFO, device or socket (TensorStore's read of one would block
    forever): one ``stat`` per file. A failure while the commit file no longer names
    ``commit``'s generation is :class:`OverwrittenError`; one of a step whose carried leaves'
    step folders are not there, the :class:`CheckpointNotFoundError` naming them (locally
    checked before reading, with the FIFOs; on an object store only once a read failed,
    rather than a request before every read)."""
    try:
        if loc.local is not None:
            _storage.check_regular_tree(os.path.join(loc.local, commit.data))
        stores = None
        if commit.refs:  # carried leaves: read from the step folders that wrote them
            stores = _refs.Stores(loc, kv, commit)
            if loc.local is not None:
                stores.check(rec for _path, rec, _want in jobs)
        try:
            return read_leaves(loc.url, kv, commit, jobs, remote=loc.remote, share=share,
                               stores=stores)
        except Exception:
            if stores is not None and loc.local is None:
                stores.check(rec for _path, rec, _want in jobs)
            raise
    except Exception as e:
        if isinstance(e, StorageError):
            raise  # the store failed: whether it was overwritten meanwhile is not known
        try:
            raw = _storage.read_key(kv, COMMIT_FILE)
        except Exception:
            raise e from None  # the commit file cannot tell: the first error stands
        if raw is not None and generation_of(raw) == commit.data:
            raise
        raise OverwrittenError(
            f"{loc.url}: overwritten or deleted while it was read: its commit file now names "
            f"another generation than {commit.data}, whose files the overwrite deleted") from e
