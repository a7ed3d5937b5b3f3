"""Pausing Python's cyclic garbage collector around per-leaf loops.

Flattening a tree, decoding a commit file and building restored leaves allocate a few
containers per leaf; with the collector on, every few hundred allocations trigger a pass
over every live object, a training state's arrays included. At 10,000 leaves those passes
cost more than the work itself, so these loops run with the collector paused.

Only CPU loops are paused, never a wait for storage: a training thread allocating while a
restore waits for its reads keeps its collector. Pauses nest and overlap across threads:
the first to start records whether the collector was on, and the last to end switches it
back on only then, so a collector the user disabled stays disabled, and one pausing thread
never switches it on while another is still in its loop.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_active = 0  # pauses in progress, in every thread
_was_enabled = False  # the collector's state when the first of them started


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Disables the cyclic collector inside the block; the last block to end restores the
    state the first found."""
    global _active, _was_enabled
    with _lock:
        if _active == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0 and _was_enabled:
                gc.enable()
