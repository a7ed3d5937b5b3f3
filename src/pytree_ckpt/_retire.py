"""Retention that keeps what kept steps carry, and a manager's incremental bookkeeping.

The data a committed step refers to (see ``_carry``) is *needed*. Deleting a step whose data a
kept step needs *retires* it: ``<step>/retired`` is written, then the commit file deleted,
then everything but the needed arrays. A folder holding ``retired`` and no commit file is no
save's leftover (``_clean`` never deletes it); a manager's sweep deletes what no kept step
needs any more. The steps retention drops are deleted at once, or (a manager with
``async_save``) in a thread of the ledger's own while the next step is written.
"""

from __future__ import annotations

import concurrent.futures
import os
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from . import _carry, _decode, _steps, _storage
from ._faults import faults
from ._format import COMMIT_FILE, RETIRED, Commit, is_step_name


def needs(commit: Commit) -> dict[str, set[str]]:
    """What ``commit`` reads from other step folders: step -> keys below it
    (``<generation>/a/<id>``)."""
    out: dict[str, set[str]] = {}
    for rec in commit.leaves.values():
        s = rec.storage
        if s.kind == "z" and s.ref:
            step, generation = commit.refs[s.ref - 1]
            out.setdefault(step, set()).add(f"{generation}/a/{s.index}")
    return out


class Ledger:
    """A manager's incremental bookkeeping: its base (the step it last committed, as the
    next step may carry from it), what its kept steps need of other step folders (from their
    commit files, each read once: a manager never overwrites a step) and its retired
    folders. Only a writing manager's primary retires and sweeps."""

    def __init__(self, loc: _storage.Location, kv: Any, enabled: bool):
        self._loc, self._kv, self._enabled = loc, kv, enabled
        self._known: dict[int, dict[str, set[str]]] = {}
        self.base: _carry.Base | None = None
        self.retired: set[int] = set()
        # Retired step -> the keys it was last pruned to: while the kept steps need all of
        # them, nothing else is left in its folder and a sweep skips it (on an object store,
        # pruning lists every key of the folder).
        self._pruned: dict[int, set[str]] = {}
        # delete_steps' deletes, and the thread that runs them in the background.
        self._deleting: concurrent.futures.Future[list[tuple[int, Exception]]] | None = None
        self._deleter: concurrent.futures.ThreadPoolExecutor | None = None

    def committed(self, step: int, objects: Mapping[str, weakref.ref],
                  written: bytes | None = None) -> None:
        """Takes the commit file of ``step``, just committed, as the next step's base: the
        bytes this process wrote (``written``), else read back (every process decodes the
        same file, so all offer the same data). Where it cannot be read, the next step is
        written in full."""
        self.base = None
        if not (self._enabled and objects):
            return
        try:
            commit = self._commit(step, written)
        except Exception:
            return
        self._known[step] = needs(commit)
        self.base = _carry.Base(str(step), commit, objects)

    def _commit(self, step: int, raw: bytes | None = None) -> Commit:
        """Step ``step``'s commit file, decoded: ``raw``, else read."""
        key = f"{step}/{COMMIT_FILE}"
        if raw is None:
            raw = _storage.read_key(self._kv, key)
        return _decode.decode(raw or b"", f"{self._loc.url}/{key}")

    def dropped(self, step: int) -> None:
        """``step`` is no longer a committed step of the manager's."""
        self._known.pop(step, None)
        if self.base is not None and self.base.step == str(step):
            self.base = None

    def needed(self, kept: Iterable[int]) -> dict[str, set[str]] | None:
        """step -> the keys below it that ``kept`` steps need; None if a kept step's commit
        file cannot be read (then nothing may be judged unneeded)."""
        out: dict[str, set[str]] = {}
        for step in kept:
            if step not in self._known:
                try:
                    commit = self._commit(step)
                except Exception:
                    return None
                self._known[step] = needs(commit)
            for name, keys in self._known[step].items():
                out.setdefault(name, set()).update(keys)
        return out

    def delete(self, step: int, kept: Iterable[int], primary: bool) -> None:
        """Deletes committed ``step`` (see _steps.delete_step), or retires it if the ``kept``
        steps need its data (or that cannot be told), deleting its metrics file then; then
        sweeps. Only the ``primary`` deletes; every process forgets the step."""
        if not primary:
            self.dropped(step)
            return
        needed = self.needed(kept)
        self.dropped(step)
        if needed is not None and str(step) not in needed:
            _steps.delete_step(self._loc, self._kv, step)
        else:
            keys = None if needed is None else needed[str(step)]
            retire(self._loc, self._kv, step, keys)
            _storage.delete_file(self._loc, self._kv, _steps.metrics_name(step))
            self.retired.add(step)
            if keys is not None:
                self._pruned[step] = keys
        self.sweep(kept)

    def delete_steps(self, steps: list[int], kept: list[int], primary: bool,
                     background: bool) -> None:
        """:meth:`delete` of each of ``steps``, at once or, with ``background``, in a thread
        of the ledger's own; :meth:`finish` waits for them. Meanwhile only that thread uses
        the retired folders and needed sets; the base stays (the newest step is never
        deleted), so a save may start from it."""
        if not background:
            self._deleting = concurrent.futures.Future()
            self._deleting.set_result(self._delete_all(steps, kept, primary))
            return
        if self._deleter is None:
            self._deleter = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="pytree_ckpt-retention")
        self._deleting = self._deleter.submit(self._delete_all, steps, kept, primary)

    def _delete_all(self, steps: list[int], kept: list[int], primary: bool
                    ) -> list[tuple[int, Exception]]:
        failed = []
        for step in steps:
            try:
                self.delete(step, kept, primary)
            except Exception as e:
                failed.append((step, e))
        return failed

    def finish(self) -> list[tuple[int, Exception]]:
        """Waits for :meth:`delete_steps`; returns the steps it could not delete, with why."""
        deleting, self._deleting = self._deleting, None
        return [] if deleting is None else deleting.result()

    def close(self) -> None:
        if self._deleter is not None:
            self._deleter.shutdown()

    def find_retired(self, children: Mapping[str, set[str] | None], steps: list[int]) -> None:
        """Takes the retired folders among a manager directory's ``children`` (see
        _storage.child_names) and sweeps them (``steps``: the committed ones)."""
        self.retired = {int(n) for n, inside in children.items()
                        if is_step_name(n) and is_retired(inside)}
        self._pruned.clear()
        self.sweep(steps)

    def keep_if_retired(self, step: int) -> bool:
        """Whether the folder of ``step`` (marked, not committed) is retired: then it is
        taken, for :meth:`sweep`, and not reclaimed as a save's leftover."""
        if not is_retired(_storage.folder_names(self._loc, self._kv, str(step))):
            return False
        self.retired.add(step)
        return True

    def sweep(self, kept: Iterable[int]) -> None:
        """Deletes what no ``kept`` step needs of the retired folders: all of a folder once
        nothing of it is needed (``retired`` first, then the rest, then its index marker). A
        folder this ledger pruned to keys that are all still needed is left unread."""
        if not self.retired:
            return
        needed = self.needed(kept)
        if needed is None:
            return
        for step in sorted(self.retired):
            name = str(step)
            if name in needed:
                pruned = self._pruned.get(step)
                if pruned is None or not needed[name] >= pruned:
                    prune(self._loc, self._kv, name, needed[name])
                    self._pruned[step] = needed[name]
                continue
            _storage.delete_file(self._loc, self._kv, f"{name}/{RETIRED}")
            _storage.delete_prefix(self._loc, self._kv, name)
            _steps.unmark(self._loc, self._kv, step)
            self.retired.discard(step)
            self._pruned.pop(step, None)


def retire(loc: _storage.Location, kv: Any, step: int, needed: set[str] | None) -> None:
    """Retires committed ``step``, whose ``needed`` keys kept steps read: ``retired`` written,
    the commit file deleted, then every key outside ``needed`` (None: what is needed is not
    known, and every key stays for a later sweep). A kill between any two leaves a committed
    step or a retired folder holding at least what is needed."""
    name = str(step)
    _storage.write_key(loc, kv, f"{name}/{RETIRED}", b"")
    _storage.delete_file(loc, kv, f"{name}/{COMMIT_FILE}")
    if loc.local is not None:
        _storage.fsync_dir(os.path.join(loc.local, name))
    if needed is not None:
        prune(loc, kv, name, needed)


def prune(loc: _storage.Location, kv: Any, name: str, needed: set[str]) -> None:
    """Deletes every key below step folder ``name`` but ``retired`` and the arrays in
    ``needed`` (keys ``<generation>/a/<id>`` below it), each deletion of unneeded keys only.
    On an object store, one listing of the folder, then every unneeded key deleted at once;
    locally, the folders walked, and what is unneeded deleted a folder at a time."""
    if loc.local is None:
        prefix, arrays = f"{name}/".encode(), tuple(f"{k}/".encode() for k in needed)
        with faults(f"{loc.url}/{name}"):
            keys = _storage.listing(loc, kv, f"{loc.url}/{name}", f"{name}/")
            deletes = [kv.write(prefix + k, None) for k in keys
                       if k != RETIRED.encode() and not k.startswith(arrays)]
            for delete in deletes:
                delete.result()
        return
    for top in sorted(_storage.folder_names(loc, kv, name) or ()):
        if top == RETIRED:
            continue
        if not any(k.startswith(top + "/") for k in needed):
            _delete(loc, kv, f"{name}/{top}")
            continue
        for inner in sorted(_storage.folder_names(loc, kv, f"{name}/{top}") or ()):
            if inner != "a":
                _delete(loc, kv, f"{name}/{top}/{inner}")
        for array in sorted(_storage.folder_names(loc, kv, f"{name}/{top}/a") or ()):
            if f"{top}/a/{array}" not in needed:
                _delete(loc, kv, f"{name}/{top}/a/{array}")


def _delete(loc: _storage.Location, kv: Any, key: str) -> None:  # a local file or folder
    if os.path.isdir(os.path.join(str(loc.local), key)):
        _storage.delete_prefix(loc, kv, key)
    else:
        _storage.delete_file(loc, kv, key)


def is_retired(inside: set[str] | None) -> bool:
    """Whether a step folder holding ``inside`` is retired."""
    return inside is not None and RETIRED in inside and COMMIT_FILE not in inside
