"""Background saves: one writer thread, a future per save, and waiting at exit.

Saves run one after another on a single background thread (created on first use, not at
import): TensorStore already writes every chunk concurrently on its own threads, so the
Python thread only issues writes and waits. A new save first waits for the previous one,
which bounds host memory to one snapshot at a time.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import threading
from collections.abc import Callable

_lock = threading.Lock()
_executor: concurrent.futures.ThreadPoolExecutor | None = None
_pending: list[SaveFuture] = []


class SaveFuture:
    """The handle of a save running in the background.

    ``result()`` waits for the save to be committed and returns the checkpoint's path, or
    re-raises the error that stopped it (nothing is committed then). ``done()`` says whether
    it has finished.

    Example::

        fut = pc.save_async(state, "/ckpt/step_100")
        ...                     # keep training: the snapshot is already taken
        fut.result()            # committed and durable here
    """

    def __init__(self, future: concurrent.futures.Future, path: str):
        self._future = future
        self.path = path

    def result(self, timeout: float | None = None) -> str:
        """Waits for the commit; returns the path or raises the background error."""
        return self._future.result(timeout)

    def done(self) -> bool:
        """True once the save has committed or failed."""
        return self._future.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The error that stopped the save, or None."""
        return self._future.exception(timeout)

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"SaveFuture({self.path!r}, {state})"


def submit(fn: Callable[[], str], path: str) -> SaveFuture:
    """Runs ``fn`` on the writer thread."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(1, "pytree_ckpt-save")
            atexit.register(wait_all)
        fut = SaveFuture(_executor.submit(fn), path)
        _pending.append(fut)
        _pending[:] = [f for f in _pending if not f.done()]
        return fut


def wait_all() -> None:
    """Waits for every save in flight (errors stay with their futures)."""
    with _lock:
        pending = list(_pending)
    for fut in pending:
        fut.exception()
    with _lock:
        _pending[:] = [f for f in _pending if not f.done()]
