"""Pausing Python's cyclic garbage collector around per-leaf loops.

Flattening a tree, decoding a commit file and building restored leaves allocate a few
containers per leaf; with the collector on, every few hundred allocations trigger a pass
over every live object, a training state's arrays included. At 10,000 leaves those passes
cost more than the work itself, so these loops run with the collector paused.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Disables the cyclic collector inside the block (restoring its previous state)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
