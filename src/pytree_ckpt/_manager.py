"""CheckpointManager: numbered checkpoints in one directory, the latest found again after a
restart, old ones deleted, a lock against a second writer, and a last save on preemption.

Layout of a manager's directory::

    <directory>/
      <step>/                   one checkpoint, exactly as save() writes it; <step> is the step
                                in plain decimal without padding: 0/, 7/, 1000/
      <step>.metrics.msgpack    the metrics given to save(step, ..., metrics=...): a msgpack
                                map of str to int, float, bool, str or None
      manager.lock              the lock of the manager writing here (see _lock.py)
      .steps/                   the step index (see _index.py): a marker per step that may
                                exist, so object stores find the steps without listing chunks

A step counts only if ``<step>/checkpoint.msgpack`` exists (it is committed). Its marker in
the index, then its metrics file, are written *before* the checkpoint, so a committed step
that was given metrics always has them; a metrics file whose step is not committed is an
orphan of a failed save. On start the manager deletes, holding its lock, what a crash left
behind: step folders without a commit file that hold only checkpoint data (``d-*``
generations, TensorStore's temporary ``checkpoint.msgpack.*`` files), and orphan or temporary
metrics files. Anything else in the directory is left alone and ignored. On an object store
with a complete index, only marked steps are looked at (see _index.py).

Deleting a step removes its commit file first, then its folder, then its marker, so a crash
half-way leaves an incomplete folder (cleaned at the next start), never a committed checkpoint
with missing data, nor a step folder without a marker.

In a multi-process job every process creates a manager and calls save() with the same steps
(save is collective); every process lists the steps, and only the primary (process 0) holds
the lock, cleans, writes metrics files and deletes old steps.
"""

from __future__ import annotations

import atexit
import bisect
import os
import signal
from collections.abc import Callable, Mapping
from typing import Any

import jax
import msgpack
import numpy as np

from . import _async, _clean, _distributed, _index, _lock, _storage
from ._async import SaveFuture
from ._errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NotACheckpointError,
)
from ._format import COMMIT_FILE
from ._metadata import CheckpointMetadata
from ._metadata import metadata as _metadata
from ._restore import restore as _restore
from ._save import save_async
from ._status import RestoreStatus, check_complete

Metrics = Mapping[str, Any]
_MAX_METRICS_BYTES = 1 << 20


class CheckpointManager:
    """Numbered checkpoints of a training run in one directory.

    **Arguments:**

    - ``directory``: a local directory, ``file://``, ``memory://``, ``gs://`` or ``s3://`` URL
      or a kvstore spec dict, as for :func:`save`; step ``s`` goes to ``<directory>/<s>``.
    - ``keep``: how many of the newest (highest-numbered) committed steps to keep; None keeps
      all.
    - ``keep_every_n_steps``: also keep every step that is a multiple of this.
    - ``save_interval_steps``: :meth:`save` writes only steps that are a multiple of this
      (unless forced); the others return False at once.
    - ``async_save``: :meth:`save` returns once the tree is snapshotted and writes in the
      background (False: once it is committed).
    - ``best_fn``, ``best_mode``: also keep the one step whose metrics have the highest
      (``"max"``) or lowest (``"min"``) ``best_fn(metrics)``; ties go to the newer step, and
      a step saved without metrics, or scoring NaN, is never the best.
    - ``handle_preemption``: install a SIGTERM handler (main thread only; any previous handler
      is restored by :meth:`close`) that makes the next :meth:`save` a forced, committed one
      and then sets :attr:`preempted`, for the loop to exit cleanly. In a multi-process job it
      asks JAX's preemption sync point instead (``multihost_utils.
      reached_preemption_sync_point``, with the ``jax_enable_preemption_service`` default), so
      every process saves the same step; then :meth:`save` must be called at every step.
    - ``read_only``: only read the directory, as an evaluator or ``pytree-ckpt steps`` does:
      take no lock, delete nothing (a crash's leftovers stay, see the module docstring),
      list the steps afresh at every query (so steps another manager commits or deletes
      show), and refuse :meth:`save`.

    Retention runs after each save commits (never before): steps outside the newest ``keep``,
    the multiples of ``keep_every_n_steps`` and the best are deleted. Steps only go up: a
    step older than the latest committed one is refused (after a rollback, retention would
    otherwise delete the new steps and keep the diverged ones); delete the newer steps
    first with :meth:`delete`, as Orbax asks. Only committed steps
    count: :meth:`steps`, :meth:`latest_step` and :meth:`restore` never see a save that did
    not finish. One manager at a time may hold a directory (:class:`LockedError` otherwise);
    a manager is meant for one thread. Close it (or use ``with``) to wait for the last save,
    apply retention and release the lock.

    **Raises:** :class:`LockedError` if another manager holds the directory (never with
    ``read_only``); :class:`NotACheckpointError` if ``manager.lock`` is a symbolic link or
    not a file; ``OSError`` if it cannot be created (read-only media: use ``read_only``);
    ``ValueError`` for a bad option, or ``handle_preemption=True`` outside the main thread or
    with ``read_only``.

    Example, a training loop that resumes where it stopped and saves once more on SIGTERM::

        with pc.CheckpointManager("/ckpt/run1", keep=3, save_interval_steps=1000,
                                  handle_preemption=True) as mgr:
            start = mgr.latest_step()
            if start is None:
                state, start = init_state(), 0
            else:
                state, _ = mgr.restore(start, target=abstract_state)
            for step in range(start + 1, num_steps + 1):
                state, loss = train_step(state, next(batches))
                mgr.save(step, state, metrics={"loss": loss})
                if mgr.preempted:   # SIGTERM came: this step was just saved and committed
                    break
        # leaving `with` waits for the last save; the process then exits with status 0
    """

    def __init__(self, directory: str | os.PathLike | dict, *, keep: int | None = 3,
                 keep_every_n_steps: int | None = None, save_interval_steps: int = 1,
                 async_save: bool = True, best_fn: Callable[[Metrics], float] | None = None,
                 best_mode: str = "max", handle_preemption: bool = False,
                 read_only: bool = False):
        for name, value, allow_none in (("keep", keep, True),
                                        ("keep_every_n_steps", keep_every_n_steps, True),
                                        ("save_interval_steps", save_interval_steps, False)):
            if not ((value is None and allow_none) or
                    (isinstance(value, int) and not isinstance(value, bool) and value >= 1)):
                raise ValueError(f"{name} must be a positive int{' or None' * allow_none}, "
                                 f"not {value!r}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', not {best_mode!r}")
        if read_only and handle_preemption:
            raise ValueError("handle_preemption=True needs a manager that saves, not read_only")
        self._keep, self._keep_every, self._interval = keep, keep_every_n_steps, save_interval_steps
        self._async, self._best_fn, self._best_mode = async_save, best_fn, best_mode
        self._as_spec = isinstance(directory, dict)
        self._loc = _storage.location(directory)
        self._kv = _storage.open_kvstore(self._loc)
        self._read_only = read_only
        # The primary writes: it cleans, writes metrics and deletes. A read-only manager never.
        self._primary = _distributed.process_index() == 0 and not read_only
        self._multiprocess = _distributed.is_multiprocess()
        self._pending: tuple[int, SaveFuture, Metrics | None] | None = None
        self._metrics: dict[int, Metrics | None] = {}
        self._sigterm = self._preempted = self._closed = False
        self._handle_preemption = handle_preemption
        self._previous_handler: Any = None
        self._lock = _lock.DirectoryLock(self._loc, self._kv) if self._primary else None
        _close_at_exit(self)
        try:
            _async.wait_all()  # an unclosed manager's save in flight is not a crash's leftover
            self._steps = self._scan()
            if handle_preemption and not self._multiprocess:
                self._install_sigterm_handler()
        except BaseException:
            self.close()
            raise

    # ---- queries ----

    @property
    def directory(self) -> str:
        """The manager's directory, as a URL or local path."""
        return self._loc.url

    @property
    def preempted(self) -> bool:
        """True once a preemption notice has been answered by a committed save: exit the loop."""
        return self._preempted

    def steps(self) -> list[int]:
        """The committed steps, ascending.

        Example::

            >>> with pc.CheckpointManager("memory://doc/steps", async_save=False) as mgr:
            ...     mgr.save(1, {"w": jnp.ones(2)}, metrics={"loss": 0.5})
            True
            >>> pc.CheckpointManager("memory://doc/steps", read_only=True).steps()
            [1]
        """
        self._poll()
        return list(self._steps)

    def latest_step(self) -> int | None:
        """The newest committed step, or None if there is none."""
        self._poll()
        return self._steps[-1] if self._steps else None

    def best_step(self) -> int | None:
        """The committed step with the best ``best_fn(metrics)``, or None (no ``best_fn``, or no
        committed step has metrics).

        **Raises:** what ``best_fn`` raises; :class:`CorruptCheckpointError` for an unreadable
        metrics file.
        """
        self._poll()
        return self._best()

    # ---- saving ----

    def save(self, step: int, tree: Any, *, metrics: Metrics | None = None,
             force: bool = False, progress: bool = False) -> bool:
        """Saves ``tree`` as checkpoint ``step`` if the interval (or ``force``, or a preemption
        notice) says so.

        **Arguments:**

        - ``step``: a non-negative int, the checkpoint's number.
        - ``tree``: the pytree to save (see :func:`save`).
        - ``metrics``: a mapping of str to numbers (scalar arrays included), bools, strs or
          None, kept beside the checkpoint for ``best_fn``.
        - ``force``: save even if ``step`` is not a multiple of ``save_interval_steps``.
        - ``progress``: show a bar of the bytes written, as :func:`save` does; off by default.

        With ``async_save`` the call returns once the tree is snapshotted; the previous save is
        first waited for, and retention applied. A preemption-forced save is always waited for
        before :attr:`preempted` turns True.

        **Returns:** True if a save was started; False if the interval skipped the step, or the
        step already has a committed checkpoint (as when a restarted loop saves the step it
        resumed from: steps are never overwritten).

        **Raises:** :class:`CheckpointExistsError` if ``force`` is set and the step exists,
        or if ``step`` is older than the latest committed step (delete the newer ones first,
        :meth:`delete`);
        :class:`SaveError` from the previous background save if it failed; :class:`LockedError`
        if another manager took the directory over; :class:`NotACheckpointError` for a
        symbolic link or a file named like the step, or a link where the step's metrics file
        goes; what :func:`save` raises; ``TypeError`` for unsupported metrics.

        Example::

            >>> with pc.CheckpointManager("memory://doc/mgr_save", async_save=False) as mgr:
            ...     mgr.save(1, {"w": jnp.ones(2)}, metrics={"loss": 0.5}, progress=True)
            True
        """
        self._check_open()
        if self._read_only:
            raise ValueError(f"{self!r} is read-only: it cannot save")
        step = _check_step(step)
        preempt = self._preemption_reached(step)
        self._poll()
        if step in self._steps or (self._pending is not None and self._pending[0] == step):
            if force and not preempt:
                raise CheckpointExistsError(
                    f"{self._loc.url}: step {step} already has a committed checkpoint; a "
                    "manager never overwrites a step")
            if preempt:
                self._finish_pending()
                self._preempted = True
            return False
        if not (force or preempt or step % self._interval == 0):
            return False
        if self._lock is not None:
            self._lock.check()
        encoded = _encode_metrics(metrics)
        self._check_step_folder(step)
        self._check_newest(step)
        self._finish_pending()
        if self._primary:
            _index.mark(self._loc, self._kv, step)  # before any of the step's data
            self._write_metrics(step, encoded)
        try:
            fut = save_async(tree, self._path(step), progress=progress)
        except BaseException:
            # The marker stays: the next start deletes what a failed save left (only
            # checkpoint data), then the marker.
            self._drop_metrics(step)
            raise
        self._pending = (step, fut, None if encoded is None else _decode_metrics(encoded, ""))
        if not self._async or preempt or self._sigterm:
            self._finish_pending()
            if preempt or self._sigterm:
                self._preempted = True
        return True

    def delete(self, step: int) -> None:
        """Deletes committed step ``step`` and its metrics (the commit file first: a crash
        half-way leaves an incomplete folder, which the next start cleans up).

        For a rollback: after restoring an older step, delete the newer ones before saving
        new steps (:meth:`save` refuses a step older than the latest committed one). In a
        multi-process job every process calls it, as it calls :meth:`save`.

        **Raises:** :class:`CheckpointNotFoundError` if ``step`` has no committed checkpoint;
        :class:`SaveError` from a save in flight, which is waited for first;
        :class:`LockedError` if another manager took the directory over; ``ValueError`` if
        the manager is read-only or closed.

        Example, a rollback to step 100::

            >>> with pc.CheckpointManager("memory://doc/rollback", keep=None,
            ...                           async_save=False) as mgr:
            ...     for step in (100, 200, 300):
            ...         _ = mgr.save(step, {"w": jnp.full(2, step)})
            ...     state, _ = mgr.restore(100)
            ...     for newer in (300, 200):
            ...         mgr.delete(newer)
            ...     mgr.save(110, state)
            ...     mgr.steps()
            True
            [100, 110]
        """
        self._check_open()
        if self._read_only:
            raise ValueError(f"{self!r} is read-only: it cannot delete")
        step = self._resolve(step)
        if self._lock is not None:
            self._lock.check()
        if self._primary:
            self._delete_step(step)
        self._steps.remove(step)
        self._metrics.pop(step, None)

    def wait(self) -> None:
        """Waits for the save in flight to commit, then applies retention.

        **Raises:** :class:`SaveError` if that save failed.
        """
        self._check_open()
        self._finish_pending()

    def close(self) -> None:
        """Waits for the save in flight, applies retention, restores the SIGTERM handler and
        releases the lock. Calling it again does nothing.

        **Raises:** :class:`SaveError` if the last save failed (the lock is released anyway).
        """
        if self._closed:
            return
        self._closed = True
        _open.discard(self)
        try:
            self._finish_pending()
        finally:
            if self._previous_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_handler)
                self._previous_handler = None
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"steps={self._steps}"
        return f"CheckpointManager({self._loc.url!r}, {state})"

    # ---- reading ----

    def restore(self, step: int | None = None, target: Any = None, *, at: str | None = None,
                rename: Mapping[str, str] | Callable[[str], str] | None = None,
                partial: bool = False, progress: bool = False) -> tuple[Any, RestoreStatus]:
        """Restores committed step ``step`` (the latest if None); see :func:`restore` for
        ``target``, ``at``, ``rename`` and ``progress``.

        Strict unless ``partial=True``: a resume that would leave target leaves unmatched or
        mismatched (a layer renamed, a width changed, another run's checkpoint) raises instead
        of letting training go on from freshly initialised values. Checkpoint entries the
        target does not ask for are fine (loading the params of a training checkpoint).

        **Returns:** ``(tree, status)``.

        **Raises:** :class:`PartialRestoreError` naming every unmatched and mismatched path,
        unless ``partial=True``; :class:`CheckpointNotFoundError` if there is no such committed
        step; what :func:`restore` raises.
        """
        path = self._path(self._resolve(step))
        tree, status = _restore(path, target, at=at, rename=rename, progress=progress)
        if not partial:
            check_complete(status, _storage.location(path).url, "pass partial=True")
        return tree, status

    def metrics(self, step: int | None = None) -> Metrics | None:
        """The metrics given to :meth:`save` for committed step ``step`` (the latest if None),
        or None if it was saved without.

        **Raises:** as :meth:`restore`; :class:`CorruptCheckpointError` for an unreadable
        metrics file.

        Example::

            >>> with pc.CheckpointManager("memory://doc/metrics", async_save=False) as mgr:
            ...     mgr.save(4, {"w": jnp.ones(2)}, metrics={"loss": 0.5})
            True
            >>> pc.CheckpointManager("memory://doc/metrics", read_only=True).metrics(4)
            {'loss': 0.5}
        """
        return self._load_metrics(self._resolve(step))

    def metadata(self, step: int | None = None) -> CheckpointMetadata:
        """The :func:`metadata` of committed step ``step`` (the latest if None).

        **Raises:** as :meth:`restore`.
        """
        return _metadata(self._path(self._resolve(step)))

    # ---- internals ----

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self!r} is closed")

    def _path(self, step: int) -> str | dict:
        child = self._loc.child(str(step))
        return child.spec if self._as_spec else child.url

    def _resolve(self, step: int | None) -> int:
        self._check_open()
        self._poll()
        if step is None:
            if not self._steps:
                raise CheckpointNotFoundError(f"{self._loc.url}: no committed checkpoint yet")
            return self._steps[-1]
        step = _check_step(step)
        if self._pending is not None and self._pending[0] == step:
            self._finish_pending()
        if step not in self._steps:
            raise CheckpointNotFoundError(
                f"{self._loc.url}: no committed checkpoint for step {step} "
                f"(committed steps: {self._steps})")
        return step

    def _install_sigterm_handler(self) -> None:
        try:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError as e:
            raise ValueError("handle_preemption=True needs the manager to be created in the "
                             f"main thread, where Python runs signal handlers ({e})") from e

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # Only set a flag: the save happens at the next save() call, in the loop's own thread.
        self._sigterm = True

    def _preemption_reached(self, step: int) -> bool:
        if not self._handle_preemption:
            return False
        if self._multiprocess:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._sigterm

    def _poll(self) -> None:
        """Takes in a background save that has committed; a failed one stays pending, for
        save(), wait() or close() to raise. A read-only manager lists the steps again."""
        if self._read_only:
            self._steps = self._scan()
            return
        if (self._pending is not None and self._pending[1].done()
                and self._pending[1].exception() is None):
            self._finish_pending()

    def _finish_pending(self) -> None:
        if self._pending is None:
            return
        step, fut, metrics = self._pending
        self._pending = None
        try:
            fut.result()
        except BaseException:
            self._drop_metrics(step)
            raise
        bisect.insort(self._steps, step)
        self._metrics[step] = metrics
        self._apply_retention()

    def _scan(self) -> list[int]:
        """Committed steps; the primary also deletes what a crash left behind. On an object
        store with a complete index, only the marked steps are looked at; otherwise (and
        locally, where listing is cheap) the whole directory is listed, and the primary
        brings the index up to date."""
        if self._loc.local is None:
            marked = _index.marked(self._loc, self._kv)
            if marked is not None:
                return self._scan_marked(marked)
        children = _storage.child_names(self._loc, self._kv)
        steps = _committed(children)
        if not self._primary:
            return steps
        # Holding the lock, it is the only writer of its steps: every leftover is reclaimed
        # (incomplete saves, and the metrics files of steps that never committed).
        _clean.remove(self._loc, self._kv, _clean.leftovers(self._loc, self._kv, children, None))
        _index.rebuild(self._loc, self._kv, steps, children.get(_index.INDEX))
        return steps

    def _scan_marked(self, marked: list[int]) -> list[int]:
        """The committed steps among the marked ones; the primary reclaims the others (saves
        that did not finish, steps deleted by hand): folder, metrics file, then marker."""
        steps = _index.committed(self._kv, marked)
        if self._primary:
            for step in sorted(set(marked) - set(steps)):
                name = str(step)
                inside = _storage.folder_names(self._loc, self._kv, name)
                if inside is not None:  # only checkpoint data is deleted (see _clean)
                    _clean.remove(self._loc, self._kv, _clean.leftovers(
                        self._loc, self._kv, {name: inside}, None))
                self._delete_file(f"{name}.metrics.msgpack")
                _index.unmark(self._loc, self._kv, step)
        return steps

    def _apply_retention(self) -> None:
        kept = set(self._steps if self._keep is None else self._steps[-self._keep:])
        if self._keep_every is not None:
            kept.update(s for s in self._steps if s % self._keep_every == 0)
        best = self._best()
        if best is not None:
            kept.add(best)
        for step in [s for s in self._steps if s not in kept]:
            if self._primary:
                self._delete_step(step)
            self._steps.remove(step)
            self._metrics.pop(step, None)

    def _best(self) -> int | None:
        if self._best_fn is None:
            return None
        scored = []
        for step in self._steps:
            metrics = self._load_metrics(step)
            if metrics is not None:
                score = float(self._best_fn(metrics))
                if score == score:  # a NaN (a diverged run) is never the best
                    scored.append((score if self._best_mode == "max" else -score, step))
        return max(scored)[1] if scored else None

    def _check_newest(self, step: int) -> None:
        """Refuses a step older than the newest committed (or in flight) one: retention keeps
        the highest steps, so after a rollback it would delete the new steps and keep the
        diverged ones (steps [100, 200, 300], restore 100, save 110: [110, 200, 300], and
        latest_step() the diverged 300)."""
        newest = max([*self._steps[-1:], *(p[0] for p in [self._pending] if p is not None)],
                     default=None)
        if newest is not None and step < newest:
            newer = [s for s in self._steps if s > step]
            raise CheckpointExistsError(
                f"{self._loc.url}: step {step} is older than the latest step {newest}; "
                "retention keeps the newest steps, so after a rollback it would delete the "
                f"new ones and keep {newer}. Delete the newer steps first: "
                f"mgr.delete(s) for s in {newer}")

    def _delete_step(self, step: int) -> None:
        name = str(step)
        # The commit file goes first: from then on the folder is merely incomplete.
        self._delete_file(f"{name}/{COMMIT_FILE}")
        if self._loc.local is not None:
            _storage.fsync_dir(os.path.join(self._loc.local, name))
        _storage.delete_prefix(self._loc, self._kv, name)
        self._drop_metrics(step)
        _index.unmark(self._loc, self._kv, step)  # last: every step folder has its marker

    def _check_step_folder(self, step: int) -> None:
        """Refuses to save into a link or a file named like the step: not the manager's own
        (a link to an archived checkpoint's folder would be written into)."""
        if self._loc.local is None:
            return
        folder = os.path.join(self._loc.local, str(step))
        if os.path.islink(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
            raise NotACheckpointError(
                f"{folder}: {'a symbolic link' if os.path.islink(folder) else 'a file'} named "
                f"like step {step}; a CheckpointManager saves only into folders of its own "
                "(remove or rename it)")

    def _delete_file(self, key: str) -> None:
        _storage.delete_file(self._loc, self._kv, key)

    def _write_metrics(self, step: int, encoded: bytes | None) -> None:
        if encoded is None:
            self._delete_file(f"{step}.metrics.msgpack")  # a failed earlier save's
        else:
            _storage.write_key(self._loc, self._kv, f"{step}.metrics.msgpack", encoded)

    def _drop_metrics(self, step: int) -> None:
        if self._primary:
            self._delete_file(f"{step}.metrics.msgpack")

    def _load_metrics(self, step: int) -> Metrics | None:
        if step not in self._metrics:
            key = f"{step}.metrics.msgpack"
            raw = _storage.read_key(self._kv, key, self._loc)
            self._metrics[step] = (None if raw is None
                                   else _decode_metrics(raw, f"{self._loc.url}/{key}"))
        return self._metrics[step]


# Managers not closed yet. Held strongly: an open manager holds its directory's lock and maybe
# a save in flight, like an open file its descriptor, until close() or interpreter exit.
_open: set[CheckpointManager] = set()
_exit_handler_registered = False


def _close_at_exit(mgr: CheckpointManager) -> None:
    """Closes ``mgr`` at interpreter exit if nobody did, so that its last save is waited for,
    retention applied, and an object store's lock released instead of left to go stale."""
    global _exit_handler_registered
    if not _exit_handler_registered:
        atexit.register(_close_all)
        _exit_handler_registered = True
    _open.add(mgr)


def _close_all() -> None:
    errors = []
    for mgr in list(_open):
        try:
            mgr.close()
        except Exception as e:
            errors.append(e)
    _open.clear()
    if errors:
        raise errors[0]


def latest(directory: str | os.PathLike | dict) -> str | None:
    """The path of the newest committed checkpoint in a :class:`CheckpointManager`'s directory,
    or None if it has none; for code that has no manager (an evaluator, a notebook).

    It takes no lock and deletes nothing; the manager writing the directory may delete that
    checkpoint later under its retention rules, so restore it soon after asking. On an object
    store it reads the manager's step index (a few small requests, however many chunks the
    steps have); a step folder copied in by hand needs its marker there (see the README).

    **Raises:** :class:`CheckpointError` if the storage cannot be opened; ``ValueError`` for
    an unsupported URL scheme.

    Example::

        >>> with pc.CheckpointManager("memory://doc/run", async_save=False) as mgr:
        ...     mgr.save(5, {"w": jnp.ones(2)})
        True
        >>> pc.latest("memory://doc/run")
        'memory://doc/run/5'
    """
    loc = _storage.location(directory)
    kv = _storage.open_kvstore(loc)
    marked = _index.marked(loc, kv) if loc.local is None else None
    if marked is not None:  # an object store's step index: one listing per step tried
        step = _index.latest(kv, marked)
    else:
        step = max(_committed(_storage.child_names(loc, kv)), default=None)
    return None if step is None else loc.child(str(step)).url


def _committed(children: dict[str, set[str] | None]) -> list[int]:
    """The committed steps among a manager directory's children (see
    :func:`_storage.child_names`), ascending: folders named by a step, holding a commit file.
    A file, or a link, named like a step is not one of the manager's and is left alone."""
    return sorted(int(n) for n, inside in children.items()
                  if inside is not None and _clean.is_step(n) and COMMIT_FILE in inside)


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int | np.integer):
        raise TypeError(f"step must be an int, not {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be >= 0, not {step}")
    return int(step)


def _encode_metrics(metrics: Metrics | None) -> bytes | None:
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of str to numbers, not {type(metrics).__name__}")
    plain: dict[str, Any] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metrics keys must be str, not {key!r}")
        if isinstance(value, np.ndarray | np.generic | jax.Array) and np.ndim(value) == 0:
            value = np.asarray(value).item()
        if not (value is None or isinstance(value, bool | int | float | str)):
            raise TypeError(f"metrics[{key!r}] is a {type(value).__name__}; use a number, a "
                            "scalar array, a bool, a str or None")
        plain[key] = value
    return msgpack.packb(plain, use_bin_type=True)


def _decode_metrics(raw: bytes, where: str) -> Metrics:
    # Untrusted input: bounded, and no container may declare more entries than it has bytes.
    limit = len(raw)
    try:
        if limit > _MAX_METRICS_BYTES:
            raise ValueError(f"{limit} bytes, more than {_MAX_METRICS_BYTES}")
        value = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_str_len=limit,
                                max_bin_len=limit, max_array_len=limit, max_map_len=limit,
                                max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise CorruptCheckpointError(f"{where}: unreadable metrics file ({e})") from None
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{where}: metrics file holds a {type(value).__name__}, "
                                     "not a map")
    return value
