"""A CheckpointManager's step index: which steps may exist, found without listing chunks.

Object stores list keys without a delimiter (TensorStore's ``KvStore.list``), so finding a
manager's steps by listing its directory costs a request per 1,000 keys of every chunk of
every kept step. The manager therefore keeps an index beside its steps::

    <directory>/.steps/<step>      an empty marker: step <step> may exist
    <directory>/.steps/complete    every step that may exist has its marker

The primary writes a step's marker before any of the step's data and removes it after the
step's folder is deleted, so every step folder of the manager's has a marker, and a marker
whose step has no commit file is a save that did not finish (or a step deleted by hand).
Whether marked steps are committed is one small listing of each commit file's key, all at
once: finding the steps costs one listing of the index plus one per marker, whatever the
chunks.

``complete`` is written by a writing manager's start-up once every committed step it found
by a full listing has its marker (a directory written before the index existed, or whose
``complete`` was deleted to have the index rebuilt). Without it, readers list everything.
A step folder copied in by hand is seen only with its marker (or once the index is rebuilt).

Local directories are listed cheaply, and their listing stays the truth; the index is kept
there too, so that a directory copied to a bucket keeps it.
"""

from __future__ import annotations

import os
from typing import Any

from . import _clean, _storage
from ._format import COMMIT_FILE

INDEX = ".steps"
COMPLETE = "complete"


def marked(loc: _storage.Location, kv: Any) -> list[int] | None:
    """The marked steps, ascending; None if the index is not complete (list everything)."""
    names = _storage.folder_names(loc, kv, INDEX) or set()
    return marked_in(names) if COMPLETE in names else None


def marked_in(names: set[str] | None) -> list[int]:
    """The steps among the names in the index folder, ascending."""
    return sorted(int(n) for n in names or () if _clean.is_step(n))


def committed(kv: Any, steps: list[int]) -> list[int]:
    """Those of ``steps`` that are committed (have a commit file), ascending; one listing of
    one key each, all in flight at once."""
    found = [(step, _storage.list_key(kv, f"{step}/{COMMIT_FILE}")) for step in steps]
    return sorted(step for step, keys in found if keys.result())


def latest(kv: Any, steps: list[int]) -> int | None:
    """The newest committed step among ``steps``: one listing each, from the newest down."""
    for step in sorted(steps, reverse=True):
        if committed(kv, [step]):
            return step
    return None


def mark(loc: _storage.Location, kv: Any, step: int | str) -> None:
    """Writes the marker of ``step`` (``complete`` too)."""
    if loc.local is not None:
        folder = os.path.join(loc.local, INDEX)
        if os.path.islink(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
            raise _storage.link_error(folder)
    _storage.write_key(loc, kv, f"{INDEX}/{step}", b"")


def unmark(loc: _storage.Location, kv: Any, step: int) -> None:
    """Removes the marker of ``step``, if there is one."""
    _storage.delete_file(loc, kv, f"{INDEX}/{step}")


def rebuild(loc: _storage.Location, kv: Any, steps: list[int], names: set[str] | None) -> None:
    """Marks exactly the committed ``steps`` (found by a full listing, after a start-up's
    clean-up), then the index complete; ``names``: what the index folder held then."""
    names = names or set()
    for step in steps:
        if str(step) not in names:
            mark(loc, kv, step)
    for step in set(marked_in(names)) - set(steps):
        unmark(loc, kv, step)
    if COMPLETE not in names:
        mark(loc, kv, COMPLETE)
