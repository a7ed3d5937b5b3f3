"""Background saves: one writer thread, a future per save, and waiting at exit.

Saves run one after another on a single background thread (created on first use, not at
import): TensorStore already writes every chunk concurrently on its own threads, so the
Python thread only issues writes and waits. A new save first waits for the previous one,
which bounds host memory to one snapshot at a time.

At interpreter exit, pending saves finish first (the writer thread is joined before
``atexit`` handlers run), and a save that failed without anyone asking for its result is
reported on stderr, so an error is never lost silently.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import sys
import threading
from collections.abc import Callable

_lock = threading.Lock()
_executor: concurrent.futures.ThreadPoolExecutor | None = None
_pending: list[SaveFuture] = []
_unobserved: list[SaveFuture] = []  # failed saves whose error nobody has retrieved yet


class SaveFuture:
    """The handle of a save running in the background.

    ``result()`` waits for the save to be committed and returns the checkpoint's path, or
    re-raises the error that stopped it (nothing is committed then). ``done()`` says whether
    it has finished. A failed save whose error is never retrieved (by ``result()`` or
    ``exception()``) is reported on stderr at interpreter exit.

    Example::

        fut = pc.save_async(state, "/ckpt/step_100")
        ...                     # keep training: the snapshot is already taken
        fut.result()            # committed and durable here
    """

    def __init__(self, future: concurrent.futures.Future, path: str):
        self._future = future
        self._observed = False
        self.path = path
        future.add_done_callback(self._on_done)

    def result(self, timeout: float | None = None) -> str:
        """Waits for the commit; returns the path or raises the background error."""
        try:
            return self._future.result(timeout)
        finally:
            self._mark_observed()

    def done(self) -> bool:
        """True once the save has committed or failed."""
        return self._future.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The error that stopped the save, or None."""
        try:
            return self._future.exception(timeout)
        finally:
            self._mark_observed()

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"SaveFuture({self.path!r}, {state})"

    def _mark_observed(self) -> None:
        if not self._future.done():
            return  # a timeout: the error, if any, is still to come
        with _lock:
            self._observed = True
            if self in _unobserved:
                _unobserved.remove(self)

    def _on_done(self, future: concurrent.futures.Future) -> None:
        if future.cancelled() or future.exception() is None:
            return
        with _lock:
            if not self._observed:
                _unobserved.append(self)


def submit(fn: Callable[[], str], path: str) -> SaveFuture:
    """Runs ``fn`` on the writer thread (or at once, once the interpreter is shutting down
    and no new thread may start, e.g. a save from an ``atexit`` handler)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(1, "pytree_ckpt-save")
            atexit.register(_at_exit)
        try:
            inner = _executor.submit(fn)
        except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
            inner = None
    if inner is None:
        inner = concurrent.futures.Future()
        try:
            inner.set_result(fn())
        except BaseException as e:
            inner.set_exception(e)
    fut = SaveFuture(inner, path)
    with _lock:
        _pending[:] = [f for f in _pending if not f.done()] + [fut]
    return fut


def wait_all() -> None:
    """Waits for every save in flight (errors stay with their futures, unretrieved)."""
    with _lock:
        pending = list(_pending)
    concurrent.futures.wait([f._future for f in pending])
    with _lock:
        _pending[:] = [f for f in _pending if not f.done()]


def _at_exit() -> None:
    wait_all()
    with _lock:
        failed = list(_unobserved)
        _unobserved.clear()
    for fut in failed:
        error = fut._future.exception()
        print(f"pytree_ckpt: the background save to {fut.path} failed and nothing was "
              f"committed; its error was never retrieved (call .result() on the SaveFuture "
              f"returned by save_async): {type(error).__name__}: {error}", file=sys.stderr)
