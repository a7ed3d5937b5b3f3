"""What a :class:`CheckpointManager` does when its process ends: a preemption notice (SIGTERM,
or JAX's preemption sync point in a multi-process job) that the next save answers, and the
managers nobody closed, closed at interpreter exit.
"""

from __future__ import annotations

import atexit
import signal
from typing import Any, Protocol


class Preemption:
    """A manager's preemption notice. In one process, a SIGTERM handler (installed by the
    constructor, main thread only; :meth:`restore` puts the previous handler back) that only
    sets a flag: the save happens at the next save() call, in the loop's own thread. In a
    multi-process job, JAX's preemption sync point, so every process saves the same step.

    **Raises:** ``ValueError`` outside the main thread (in one process)."""

    def __init__(self, multiprocess: bool) -> None:
        self._multiprocess = multiprocess
        self._sigterm = False
        self._previous_handler: Any = None
        if not multiprocess:
            try:
                self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            except ValueError as e:
                raise ValueError("handle_preemption=True needs the manager to be created in the "
                                 f"main thread, where Python runs signal handlers ({e})") from e

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._sigterm = True

    @property
    def signalled(self) -> bool:
        """Whether a SIGTERM came (in one process)."""
        return self._sigterm

    def reached(self, step: int) -> bool:
        """Whether step ``step`` must be saved because the process is being preempted."""
        if self._multiprocess:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._sigterm

    def restore(self) -> None:
        """Puts back the SIGTERM handler there was before; calling it again does nothing."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None


class _Closable(Protocol):
    def close(self) -> None: ...


# Managers not closed yet. Held strongly: an open manager holds its directory's lock and maybe
# a save in flight, like an open file its descriptor, until close() or interpreter exit.
_open: set[_Closable] = set()
_exit_handler_registered = False


def close_at_exit(mgr: _Closable) -> None:
    """Closes ``mgr`` at interpreter exit if nobody did, so that its last save is waited for,
    retention applied, and an object store's lock released instead of left to go stale."""
    global _exit_handler_registered
    if not _exit_handler_registered:
        atexit.register(_close_all)
        _exit_handler_registered = True
    _open.add(mgr)


def closed(mgr: _Closable) -> None:
    """Forgets ``mgr``, closed by its owner."""
    _open.discard(mgr)


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
