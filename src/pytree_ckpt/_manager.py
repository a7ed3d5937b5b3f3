"""CheckpointManager: numbered checkpoints in one directory, the latest found again after a
restart, old ones deleted, a lock against a second writer, and a last save on preemption.

A manager's directory holds its step folders, metrics files, step index and lock; see
_steps.py for that layout and the order a step is written and deleted in, _retention.py for
which steps are kept, and _shutdown.py for preemption and closing at interpreter exit.

On start the manager deletes, holding its lock, what a crash left behind: step folders
without a commit file that hold only checkpoint data (``d-*`` generations, TensorStore's
temporary ``checkpoint.msgpack.*`` files), and orphan or temporary metrics files (see
_clean.py). Anything else in the directory is left alone and ignored. On an object store with
a complete step index, only marked steps are looked at.

In a multi-process job every process creates a manager and calls save() with the same steps
(save is collective); every process lists the steps, and only the primary (process 0) holds
the lock, cleans, writes metrics files and deletes old steps.
"""

from __future__ import annotations

import bisect
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import _async, _clean, _distributed, _lock, _retention, _retire, _scan, _shutdown, _steps, _storage
from ._errors import CheckpointExistsError, CheckpointNotFoundError
from ._foreign import orbax_run
from ._metadata import CheckpointMetadata
from ._metadata import metadata as _metadata
from ._restore import restore as _restore
from ._save import Step, start_step
from ._status import RestoreStatus, check_complete
from ._steps import Metrics, check_step


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
    - ``best_fn``, ``best_mode``, ``keep_best``: also keep the ``keep_best`` steps (1 by
      default) whose metrics have the highest (``"max"``) or lowest (``"min"``)
      ``best_fn(metrics)``; ties go to the newer step, and
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
      show), and refuse :meth:`save`. It reads an Orbax manager's directory too (see README).
    - ``incremental``: write only the ``jax.Array`` leaves that are not the same objects as
      in the step last committed, referring to the others (README, "Incremental steps").

    Retention runs after each save commits (never before): steps outside the newest ``keep``,
    the multiples of ``keep_every_n_steps`` and the best are deleted (with ``async_save``, in
    the background while the next step is written, as Orbax's async manager deletes; the save
    after it, :meth:`wait`, :meth:`delete` and :meth:`close` wait). Steps only go up: a step
    older than the latest committed one is refused (after a rollback, retention would
    otherwise delete the new steps and keep the diverged ones); delete the newer steps first
    with :meth:`delete`, as Orbax asks. Only committed steps count: :meth:`steps`,
    :meth:`latest_step` and :meth:`restore` never see a save that did not finish. One manager
    at a time may hold a directory (:class:`LockedError` otherwise); a manager is meant for
    one thread. Close it (or use ``with``) to wait for the last save, apply retention and
    release the lock.

    **Raises:** :class:`LockedError` if another manager holds the directory (never with
    ``read_only``); :class:`NotACheckpointError` if ``manager.lock`` is a symbolic link or
    not a file, or the directory is an Orbax manager's (unless ``read_only``); ``OSError`` if
    it cannot be created (read-only media: use ``read_only``); ``ValueError`` for a bad
    option, or ``handle_preemption=True`` outside the main thread or with ``read_only``.

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
                 read_only: bool = False, incremental: bool = True, keep_best: int = 1):
        _retention.check_options(keep, keep_every_n_steps, save_interval_steps, best_mode,
                                 handle_preemption, read_only, keep_best)
        self._keep, self._keep_every, self._interval = keep, keep_every_n_steps, save_interval_steps
        self._async, self._best_fn, self._best_mode, self._keep_best = (
            async_save, best_fn, best_mode, keep_best)
        self._as_spec = isinstance(directory, dict)
        self._loc = _storage.location(directory)
        self._kv = _storage.open_kvstore(self._loc)
        self._read_only = read_only
        # The primary writes: it cleans, writes metrics and deletes. A read-only manager never.
        self._primary = _distributed.process_index() == 0 and not read_only
        indexed = self._loc.local is None and _steps.marked(self._loc, self._kv) is not None
        self._orbax = None if indexed else orbax_run.OrbaxRun.find(self._loc, self._kv, read_only)
        self._multiprocess = _distributed.is_multiprocess()
        self._pending: tuple[int, Step, Metrics | None] | None = None
        self._carry = _retire.Ledger(self._loc, self._kv, incremental)
        self._metrics: dict[int, Metrics | None] = {}
        self._preempted = self._closed = False
        self._preemption: _shutdown.Preemption | None = None
        self._lock = _lock.DirectoryLock(self._loc, self._kv) if self._primary else None
        _shutdown.close_at_exit(self)
        try:
            _async.wait_all()  # an unclosed manager's save in flight is not a crash's leftover
            self._steps = self._list()
            if handle_preemption:
                self._preemption = _shutdown.Preemption(self._multiprocess)
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
        return next(iter(self._best(1)), None)

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
        step = check_step(step)
        preempt = self._preemption is not None and self._preemption.reached(step)
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
        encoded = _steps.encode_metrics(metrics)
        _steps.check_folder(self._loc, step)
        _retention.check_newest(self._loc.url, step, self._steps,
                                None if self._pending is None else self._pending[0])
        self._finish_pending()
        if self._primary:
            _steps.mark(self._loc, self._kv, step)  # before any of the step's data
            _steps.write_metrics(self._loc, self._kv, step, encoded)
        try:
            started = start_step(tree, self._path(step), self._carry.base, progress)
        except BaseException as e:  # nothing was written in the background yet
            self._drop_failed(step, stopped=isinstance(e, Exception))
            raise
        self._pending = (step, started,
                         None if encoded is None else _steps.decode_metrics(encoded, ""))
        if not self._async or preempt or self._sigterm():
            self._finish_pending()
            if preempt or self._sigterm():
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
        self._finish_deleting()
        if self._lock is not None:
            self._lock.check()
        self._carry.delete(step, [s for s in self._steps if s != step], self._primary)
        self._steps.remove(step)
        self._metrics.pop(step, None)

    def wait(self) -> None:
        """Waits for the save in flight to commit, then for retention and its deletes.

        **Raises:** :class:`SaveError` if that save failed. What fails after the commit
        (retention's deletes, releasing the lock at close) is a ``RuntimeWarning``."""
        self._check_open()
        self._finish_pending()
        self._finish_deleting()

    def close(self) -> None:
        """Waits for the save in flight, applies retention, restores the SIGTERM handler and
        releases the lock. Calling it again does nothing.

        **Raises:** :class:`SaveError` if the last save failed (the lock is released anyway).
        """
        if self._closed:
            return
        self._closed = True
        _shutdown.closed(self)
        try:
            self._finish_pending()
        finally:
            self._finish_deleting()
            self._carry.close()
            if self._preemption is not None:
                self._preemption.restore()
            try:
                if self._lock is not None:
                    self._lock.release()
            except Exception as e:  # it goes stale after lock_stale_s: the next start takes it
                _after_commit(f"{self._loc.url}: the lock stays: {e!r}")

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
                transform: Sequence[tuple[Any, Callable]] | None = None,
                strict: bool = True, progress: bool = False, share_reads: bool | None = None
                ) -> tuple[Any, RestoreStatus]:
        """Restores committed step ``step`` (the latest if None); see :func:`restore` for
        ``target``, ``at``, ``rename``, ``transform``, ``progress`` and ``share_reads`` (in a
        multi-process job, a region several processes hold is read from storage once and
        all-gathered: by default from an object store, not from a local path).

        Strict by default (``strict=True``, unlike :func:`restore`): a resume that would leave
        target leaves unmatched or mismatched (a layer renamed, a width changed, another run's
        checkpoint) raises instead of letting training go on from freshly initialised values.
        Checkpoint entries the target does not ask for are fine (loading the params of a
        training checkpoint).

        **Returns:** ``(tree, status)``.

        **Raises:** :class:`PartialRestoreError` naming every unmatched and mismatched path,
        unless ``strict=False``; :class:`CheckpointNotFoundError` if there is no such committed
        step; what :func:`restore` raises.
        """
        path = self._path(self._resolve(step))
        tree, status = _restore(path, target, at=at, rename=rename, transform=transform,
                                progress=progress, share_reads=share_reads)
        if strict:
            check_complete(status, _storage.location(path).url, "pass strict=False")
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
        child = self._loc.child(str(step) if self._orbax is None else self._orbax.folders[step])
        return child.spec if self._as_spec else child.url

    def _list(self) -> list[int]:
        if self._orbax is not None:
            return self._orbax.steps()
        return _scan.committed_steps(self._loc, self._kv, self._primary, self._carry)

    def _resolve(self, step: int | None) -> int:
        self._check_open()
        self._poll()
        if step is None:
            if not self._steps:
                raise CheckpointNotFoundError(f"{self._loc.url}: no committed checkpoint yet")
            return self._steps[-1]
        step = check_step(step)
        if self._pending is not None and self._pending[0] == step:
            self._finish_pending()
        if step not in self._steps:
            raise CheckpointNotFoundError(
                f"{self._loc.url}: no committed checkpoint for step {step} "
                f"(committed steps: {self._steps})")
        return step

    def _sigterm(self) -> bool:
        return self._preemption is not None and self._preemption.signalled

    def _poll(self) -> None:
        """Takes in a background save that has committed; a failed one stays pending, for
        save(), wait() or close() to raise. A read-only manager lists the steps again."""
        if self._read_only:
            self._steps = self._list()
            return
        if (self._pending is not None and self._pending[1].future.done()
                and self._pending[1].future.exception() is None):
            self._finish_pending()

    def _finish_pending(self) -> None:
        if self._pending is None:
            return
        step, started, metrics = self._pending
        self._pending = None
        try:
            started.future.result()
        except BaseException as e:  # an interrupted wait leaves the save running
            self._drop_failed(step, stopped=isinstance(e, Exception))
            raise
        self._finish_deleting()
        bisect.insort(self._steps, step)
        self._metrics[step] = metrics
        self._carry.committed(step, started.objects, next(iter(started.written), None))
        self._apply_retention()

    def _apply_retention(self) -> None:
        """Drops the steps retention no longer keeps and deletes them (in the background with
        ``async_save``). A save has committed: a failure here (a delete refused, an unreadable
        metrics file, ``best_fn`` raising) is a warning, never raised by a later call; an
        undeleted step is a step again, for the next retention."""
        try:
            best = self._best()
        except Exception as e:
            return _after_commit(f"{self._loc.url}: retention deleted nothing: {e!r}")
        expired = _retention.expired(self._steps, self._keep, self._keep_every, best)
        if not expired:
            return
        kept = [s for s in self._steps if s not in expired]
        for step in expired:
            self._steps.remove(step)
            self._metrics.pop(step, None)
        background = self._async and not self._closed  # close may run at interpreter exit
        self._carry.delete_steps(expired, kept, self._primary, background)
        if not background:
            self._finish_deleting()

    def _finish_deleting(self) -> None:
        """Waits for retention's deletes; a step that could not be deleted is listed again."""
        for step, e in self._carry.finish():
            bisect.insort(self._steps, step)
            _after_commit(f"{self._loc.url}: retention could not delete step {step} "
                          f"(tried again after the next save): {e!r}")

    def _best(self, k: int | None = None) -> list[int]:  # the keep_best best by default
        return _retention.best_steps(((s, self._load_metrics(s)) for s in self._steps),
                                     self._best_fn, self._best_mode, k or self._keep_best)

    def _drop_failed(self, step: int, stopped: bool) -> None:
        try:  # the failed save's error is the one raised; what stays, the next start reclaims
            if self._primary:  # all of it where the save stopped, failing, and had no other writer
                _clean.failed_save(self._loc, self._kv, step, stopped and not self._multiprocess)
        except Exception as e:
            _after_commit(f"{self._loc.url}: what failed step {step} left stays: {e!r}")

    def _load_metrics(self, step: int) -> Metrics | None:
        if step not in self._metrics:
            self._metrics[step] = (_steps.read_metrics(self._loc, self._kv, step)
                                   if self._orbax is None else self._orbax.metrics(step))
        return self._metrics[step]


def _after_commit(message: str) -> None:  # bookkeeping no save depends on failed
    warnings.warn(message, RuntimeWarning, stacklevel=3)
