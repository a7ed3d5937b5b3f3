"""A manager's start-up: finding its committed steps, and (the primary, holding the lock)
reclaiming what crashed saves left and sweeping retired steps."""

from __future__ import annotations

from typing import Any

from . import _clean, _retire, _steps, _storage


def committed_steps(loc: _storage.Location, kv: Any, primary: bool, carry: _retire.Ledger) -> list[int]:
    """Committed steps; the primary also deletes what a crash left behind. On an object store
    with a complete index, only the marked steps are looked at; otherwise (and locally, where
    listing is cheap) the whole directory is listed, and the primary brings the index up to
    date."""
    if loc.local is None:
        marked = _steps.marked(loc, kv)
        if marked is not None:
            return _marked_steps(loc, kv, primary, marked, carry)
    children = _storage.child_names(loc, kv)
    steps = _steps.committed_in(children)
    if not primary:
        return steps
    carry.find_retired(children, steps)
    # Holding the lock, it is the only writer of its steps: every leftover is reclaimed
    # (incomplete saves, and the metrics files of steps that never committed).
    _clean.remove(loc, kv, _clean.leftovers(loc, kv, children, None))
    _steps.rebuild_index(loc, kv, steps, children.get(_steps.INDEX))
    return steps


def _marked_steps(loc: _storage.Location, kv: Any, primary: bool, marked: list[int],
                 carry: _retire.Ledger) -> list[int]:
    """The committed steps among the marked ones; the primary reclaims the others (saves that
    did not finish, steps deleted by hand) but retired ones (swept once the steps are known)."""
    steps = _steps.committed_among(kv, marked)
    if primary:
        for step in sorted(set(marked) - set(steps)):
            if not carry.keep_if_retired(step):
                _clean.reclaim_step(loc, kv, step)
        carry.sweep(steps)
    return steps
