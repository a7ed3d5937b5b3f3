"""save and save_async: snapshot in the caller's thread, write and commit in the background.

A save has three phases:

1. **Snapshot** (``_snapshot``; the only part ``save_async`` waits for): flatten the tree,
   classify every leaf, and copy the shards this process owns to host memory. Small leaves
   are copied straight into this process's packed blobs (``_packing``). After this the
   caller may donate, mutate or delete its arrays.
2. **Write** (``_write``, in the background): every zarr3 chunk concurrently, and the packed
   blobs a few at a time, through TensorStore, into a fresh generation folder ``d-<hex>`` of
   the checkpoint.
3. **Commit** (``_commit``, in the background): all processes report success; then the
   primary writes the commit file and only then deletes an overwritten checkpoint's old
   generation.

Until the commit file exists, nothing is restorable and earlier checkpoints are untouched.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from . import _async, _carry, _commit, _snapshot, _storage
from ._errors import CheckpointExistsError, NotACheckpointError
from ._format import COMMIT_FILE, is_ours

_save_counter = 0


def save(tree: Any, path: str | os.PathLike | dict, *, overwrite: bool = False,
         progress: bool = False) -> str:
    """Saves ``tree`` to ``path``; committed and durable when it returns.

    **Arguments:**

    - ``tree``: any pytree of ``jax.Array``, NumPy arrays and scalars, typed PRNG keys and
      Python ``None``/``bool``/``int``/``float``/``complex``/``str``/``bytes`` leaves.
    - ``path``: a local directory, or ``file://``, ``memory://``, ``gs://bucket/dir``,
      ``s3://bucket/dir``, or a TensorStore kvstore spec dict.
    - ``overwrite``: replace an existing checkpoint at ``path``. The old one stays intact and
      restorable until the new one is committed.
    - ``progress``: show a progress bar of the bytes written (tqdm: a widget in a notebook,
      on stderr elsewhere), cleared when the writing ends, failed or not. In a multi-process
      job only process 0 shows it, counting the bytes it writes itself. Off by default: save
      prints nothing.

    Nothing is copied up front (the caller waits, so its arrays are the snapshot): peak
    memory is the tree and a few MiB. :func:`save_async` copies first, so that the caller
    may go on.

    **Returns:** the checkpoint's path, as a string.

    **Raises:** :class:`CheckpointExistsError` if a checkpoint is there and ``overwrite`` is
    False; :class:`NotACheckpointError` if ``path`` holds anything else (it is never
    deleted); :class:`UnsupportedLeafError` or :class:`PathCollisionError` naming the leaf
    (also for a leaf restore would refuse, such as a ``bytes`` leaf too large for the commit
    file); :class:`SaveError` if a write fails, or in a multi-process job if the processes'
    paths or trees differ or one of them failed (nothing is committed). A failure after the
    commit (syncing the directory, deleting an overwritten generation) is a
    ``RuntimeWarning``: the checkpoint is committed.

    Example::

        >>> import jax.numpy as jnp, pytree_ckpt as pc
        >>> pc.save({"w": jnp.ones(3), "step": 7}, "memory://doc/save")
        'memory://doc/save'
        >>> pc.save({"w": jnp.ones(3)}, "memory://doc/save_bar", progress=True)  # a bar on stderr
        'memory://doc/save_bar'
    """
    # The caller waits: its leaves are the snapshot (no copy; see _snapshot.snapshot).
    return _start(tree, path, overwrite, progress, copy=False).result()


def save_async(tree: Any, path: str | os.PathLike | dict, *, overwrite: bool = False,
               progress: bool = False) -> _async.SaveFuture:
    """Starts saving ``tree`` to ``path``; returns once the tree is snapshotted.

    The snapshot copies the shards this process owns to host memory (on the CPU backend,
    large arrays are copied by XLA asynchronously, ordered before any later computation, so
    the call does not wait for the bytes to move), so the caller may
    donate or overwrite its arrays at once (e.g. the next jitted step with
    ``donate_argnums``). Writing and committing continue in the background. A save started
    while another is in flight first waits for it.

    Small leaves are copied into packing buffers that are kept for the next save (touching
    fresh memory is what a snapshot mostly waited for): up to 256 MiB of host memory, the
    last save's small leaves, stays allocated between saves.

    **Arguments:** as :func:`save`. With ``progress``, the bar is drawn while the background
    writes run, and cleared when they end.

    **Returns:** a :class:`SaveFuture`; ``result()`` returns the path once committed and
    re-raises any background error.

    **Raises:** at once, what :func:`save` raises before writing (existing checkpoint,
    foreign directory, unsupported leaf, processes that differ); later, from ``result()``,
    :class:`SaveError`, or :class:`UnsupportedLeafError` for a leaf restore would refuse.

    Example::

        >>> fut = pc.save_async({"w": jnp.zeros(2)}, "memory://doc/async")
        >>> fut.result()
        'memory://doc/async'
    """
    return _start(tree, path, overwrite, progress, copy=True)


class Step(NamedTuple):
    """A manager's step in flight (:func:`start_step`)."""

    future: _async.SaveFuture
    objects: dict[str, Any]  # weak references to the tree's zarr jax.Arrays, by path
    written: list[bytes]  # once committed, on the primary: the commit file it wrote


def start_step(tree: Any, path: str | os.PathLike | dict, base: _carry.Base | None,
               progress: bool) -> Step:
    """:func:`save_async` of a manager's step, carrying what ``base`` holds unchanged (see
    _carry); what it returns besides the future makes the next step's base without
    reading the commit file back where it was written."""
    objects: dict[str, Any] = {}
    written: list[bytes] = []
    future = _start(tree, path, False, progress, copy=True, base=base, objects=objects,
                    written=written)
    return Step(future, objects, written)


def _start(tree: Any, path: str | os.PathLike | dict, overwrite: bool, progress: bool,
           copy: bool, base: _carry.Base | None = None,
           objects: dict[str, Any] | None = None,
           written: list[bytes] | None = None) -> _async.SaveFuture:
    global _save_counter
    _save_counter += 1  # every call takes part in its meeting, failed or not: no drift
    loc: _storage.Location | None = None
    try:
        _async.wait_all()
        loc = _storage.location(path)
        kv = _storage.open_kvstore(loc)
        # Read before the check: a commit landing after it makes ours fail, not replace it.
        seen = None if overwrite else _commit.commit_stamp(kv)
        names = _check_destination(loc, kv, overwrite)
        snap = _snapshot.snapshot(tree, copy=copy, base=base)
        if objects is not None:
            objects.update(snap.objects)
    except Exception as e:
        _commit.agree(str(_save_counter), None if loc is None else loc.url, None, e)
        raise  # agree raises e; kept for readers and type checkers
    save_id, carry = _commit.agree(str(_save_counter), loc.url, snap, None)
    snap = _snapshot.settle(snap, carry)
    url = loc.url

    def write() -> str:
        commit_file = _commit.finish(loc, kv, snap, names, save_id, seen, progress)
        if written is not None and commit_file is not None:
            written.append(commit_file)
        return url

    return _async.submit(write, url)


def _check_destination(loc: _storage.Location, kv: Any, overwrite: bool) -> set[str]:
    """Refuses foreign or (without overwrite) committed destinations; returns the names
    found there (see :func:`_commit._replaced_generations`)."""
    names = _storage.top_level_names(loc, kv)
    if not names:
        return set()
    foreign = sorted(n for n in names if n != COMMIT_FILE and not is_ours(n))
    if foreign:
        raise NotACheckpointError(
            f"{loc.url}: refusing to write into a directory that is not a previous checkpoint "
            f"(it holds {', '.join(map(repr, foreign[:5]))}); choose an empty or new path"
        )
    if COMMIT_FILE in names and not overwrite:
        raise CheckpointExistsError(
            f"{loc.url}: a checkpoint already exists; pass overwrite=True to replace it"
        )
    return names
