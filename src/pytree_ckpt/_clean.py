"""Reclaiming what interrupted saves left behind, without touching a save still writing.

Two kinds of leftovers, in a checkpoint or in each step of a manager's directory:

- an **incomplete save**: a folder with checkpoint data (``d-*`` generations, TensorStore's
  temporary ``checkpoint.msgpack.*`` files) and no commit file (a save that never
  committed);
- a **metrics file of a step that never committed** (a manager writes
  ``<step>.metrics.msgpack`` before the step's checkpoint), or a temporary file of a metrics
  write that never finished (``<step>.metrics.msgpack.*``): counted with the incomplete saves;
- an **orphaned generation**: a ``d-*`` folder of a committed checkpoint that its commit
  file does not name (an overwrite killed before it committed, or one whose deletion of the
  generation it replaced failed).

A save in progress looks exactly like either, so a leftover is reclaimed only once it is
older than :func:`live_save_s`: a save's generation is named by its start time (see
:func:`new_save_id`), and a generation named otherwise (by an older version of the
library) by its newest file's time on a local disk, and is kept on an object store. A
metrics file goes with its step's folder where that is an incomplete save, and otherwise by
its own time on a local disk (it is kept on an object store). A
:class:`CheckpointManager` holding its directory's lock is the only writer of its step
folders and never overwrites a step, so its start-up reclaims every leftover at once
(``live_s=None``).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any, NamedTuple

from . import _decode, _options, _steps, _storage
from ._foreign import orbax_run
from ._format import COMMIT_FILE, is_generation, is_ours, is_step_name
from ._steps import METRICS_FILE

_TIMED = "c"  # the 13th hex digit of a save id that starts with its time (uuid4's is "4")


def new_save_id() -> str:
    """A save's id (its generation is ``d-<id>``): 32 hex digits, the first 12 its start time
    in milliseconds, then ``c``, then 19 random ones."""
    return f"{int(time.time() * 1000):012x}{_TIMED}{uuid.uuid4().hex[:19]}"


class CleanReport(NamedTuple):
    """What :func:`clean` found (and, with ``deleted``, removed), as paths.

    - ``path``: the checkpoint or manager's directory looked in, as a URL or local path.
    - ``incomplete``: folders of saves that never committed, and metrics files of steps
      that never committed.
    - ``orphaned``: generations of committed checkpoints that no commit file names.
    - ``kept``: leftovers young enough to be a save still writing, left alone.
    - ``deleted``: whether ``incomplete`` and ``orphaned`` were deleted.
    """

    path: str
    incomplete: tuple[str, ...]
    orphaned: tuple[str, ...]
    kept: tuple[str, ...]
    deleted: bool

    def __str__(self) -> str:
        verb = "deleted" if self.deleted else "can be deleted"
        lines = [f"{self.path}: {len(self.incomplete)} incomplete saves and "
                 f"{len(self.orphaned)} orphaned generations {verb}; {len(self.kept)} "
                 "leftovers young enough to be a save in progress kept"]
        lines += [f"  incomplete {p}" for p in self.incomplete]
        lines += [f"  orphaned   {p}" for p in self.orphaned]
        lines += [f"  kept       {p}" for p in self.kept]
        return "\n".join(lines)


def live_save_s() -> float:
    """How young a leftover may be and still belong to a save writing in another process:
    the option ``clean_after_s`` (:func:`pytree_ckpt.configure`), read when used."""
    return _options.get("clean_after_s")


def clean(path: str | os.PathLike | dict, *, delete: bool = False) -> CleanReport:
    """Lists (and with ``delete``, deletes) what interrupted saves left in a checkpoint or a
    :class:`CheckpointManager`'s directory: incomplete saves, and generations of committed
    checkpoints that no commit file names (crashed overwrites), and metrics files of a
    manager's steps that never committed.

    Never what a save may still be writing, in this process or another: a leftover is
    reclaimed once it is older than 6 hours (``pc.configure(clean_after_s=...)`` or
    ``PYTREE_CKPT_CLEAN_AFTER_S``, read when ``clean`` runs), and younger ones are reported
    as kept. Committed checkpoints, their metrics files and anything that is
    not a leftover of a save are never deleted; nor is anything in an Orbax
    ``CheckpointManager``'s directory (its unfinished saves are Orbax's to remove).

    **Arguments:**

    - ``path``: a checkpoint or a manager's directory, as for :func:`save`.
    - ``delete``: delete what is found; by default only report it.

    **Returns:** a :class:`CleanReport`.

    **Raises:** :class:`CheckpointError` if the storage cannot be opened; ``ValueError`` for
    an unsupported URL scheme; ``OSError`` if a deletion fails.

    Example::

        >>> with pc.CheckpointManager("memory://doc/clean", async_save=False) as mgr:
        ...     mgr.save(1, {"w": jnp.ones(2)})
        True
        >>> report = pc.clean("memory://doc/clean")
        >>> report.incomplete, report.orphaned, report.deleted
        ((), (), False)
    """
    loc = _storage.location(path)
    kv = _storage.open_kvstore(loc)
    found = leftovers(loc, kv, _storage.child_names(loc, kv), live_save_s())
    if delete:
        remove(loc, kv, found)
    return found._replace(deleted=delete)


def leftovers(loc: _storage.Location, kv: Any, children: dict[str, set[str] | None],
              live_s: float | None) -> CleanReport:
    """What interrupted saves left at ``loc`` (``children``: its listing, as
    :func:`_storage.child_names` gives it). With ``live_s`` None, nothing counts as a live
    save's (the caller holds the manager's lock)."""
    incomplete: list[str] = []
    orphaned: list[str] = []
    kept: list[str] = []
    if orbax_run.is_run(children):  # Orbax's files, however they look, are not ours to judge
        return CleanReport(loc.url, (), (), (), False)
    if COMMIT_FILE in children or any(map(is_generation, children)):
        checkpoints = {"": set(children)}  # a checkpoint itself
    else:
        checkpoints = {n: inside for n, inside in children.items()
                       if is_step_name(n) and inside is not None}
    for name, inside in sorted(checkpoints.items()):
        where = loc.child(name) if name else loc
        generations = sorted(n for n in inside if is_generation(n))
        if COMMIT_FILE in inside:
            named = _named_generation(kv, f"{name}/{COMMIT_FILE}" if name else COMMIT_FILE)
            if named is None:
                continue  # an unreadable commit file: nothing here can be judged
            for g in generations:
                if g != named:
                    young = _young(where, g, live_s)
                    (kept if young else orphaned).append(_path(where, g))
        elif (inside or name) and all(map(is_ours, inside)):
            # An empty step folder has no age to go by: a save may have just made it.
            young = (any(_young(where, g, live_s) for g in generations)
                     or (not generations and live_s is not None))
            (kept if young else incomplete).append(where.url)
    if "" not in checkpoints:  # a manager's directory
        committed = {n for n, inside in checkpoints.items() if COMMIT_FILE in inside}
        for name in _orphan_metrics(children, committed):
            step_folder = loc.child(METRICS_FILE.fullmatch(name)[1]).url  # pyright: ignore[reportOptionalSubscript]  # _orphan_metrics gives only matching names
            young = (step_folder in kept if step_folder in kept + incomplete
                     else _young_file(loc, name, live_s))
            (kept if young else incomplete).append(_path(loc, name))
    return CleanReport(loc.url, tuple(sorted(incomplete)), tuple(sorted(orphaned)),
                       tuple(sorted(kept)), False)


def remove(loc: _storage.Location, kv: Any, found: CleanReport) -> None:
    """Deletes ``found``'s incomplete saves and orphaned generations."""
    base = loc.url.rstrip("/")
    for path in (*found.incomplete, *found.orphaned):
        relative = path[len(base):].strip("/")
        if not relative:  # the checkpoint itself is an incomplete save: its contents
            for name in _storage.top_level_names(loc, kv) or ():
                if is_ours(name):
                    _storage.delete_prefix(loc, kv, name)
        elif METRICS_FILE.fullmatch(relative):
            _storage.delete_file(loc, kv, relative)
        else:
            _storage.delete_prefix(loc, kv, relative)


def reclaim_step(loc: _storage.Location, kv: Any, step: int) -> None:
    """Deletes what is left of a marked step that is not committed (a save that did not
    finish, a step deleted by hand): the checkpoint data in its folder (nothing else, see
    :func:`leftovers`), its metrics file, then its marker. For a manager holding its lock."""
    name = str(step)
    inside = _storage.folder_names(loc, kv, name)
    if inside is not None:
        remove(loc, kv, leftovers(loc, kv, {name: inside}, None))
    _storage.delete_file(loc, kv, _steps.metrics_name(step))
    _steps.unmark(loc, kv, step)


def failed_save(loc: _storage.Location, kv: Any, step: int, whole: bool) -> None:
    """Removes what a manager's failed save of ``step`` left: with ``whole`` (the save has
    stopped and the manager's process was its only writer), its checkpoint data, metrics file
    and marker at once (:func:`reclaim_step`); otherwise only its metrics file, and the
    manager's next start reclaims the rest (in a multi-process job another process may still
    be writing)."""
    if whole:
        reclaim_step(loc, kv, step)
    else:
        _storage.delete_file(loc, kv, _steps.metrics_name(step))


def _orphan_metrics(children: dict[str, set[str] | None], committed: set[str]) -> list[str]:
    """A manager directory's metrics files of steps not committed, and temporary ones."""
    return [n for n, inside in sorted(children.items())
            if inside is None and (m := METRICS_FILE.fullmatch(n))
            and (m[2] or m[1] not in committed)]


def _named_generation(kv: Any, key: str) -> str | None:
    try:
        raw = _storage.read_key(kv, key)
    except Exception:
        return None
    return None if raw is None else _decode.generation_of(raw)


def _young(where: _storage.Location, generation: str, live_s: float | None) -> bool:
    """Whether ``generation`` may be a save still writing."""
    if live_s is None:
        return False
    started = _started(generation)
    if started is None:  # not named by its time: its newest file's, where there are files
        if where.local is None:
            return True
        started = _newest_mtime(os.path.join(where.local, generation))
    return time.time() - started < live_s


def _young_file(loc: _storage.Location, name: str, live_s: float | None) -> bool:
    """Whether the file ``name`` may be a save's still writing: by its time on a local disk;
    an object store's listing has no times, so there it may always be."""
    if live_s is None:
        return False
    if loc.local is None:
        return True
    try:
        return time.time() - os.lstat(os.path.join(loc.local, name)).st_mtime < live_s
    except FileNotFoundError:
        return False


def _started(generation: str) -> float | None:
    save_id = generation[2:]
    if len(save_id) != 32 or save_id[12] != _TIMED:
        return None
    return int(save_id[:12], 16) / 1000


def _newest_mtime(folder: str) -> float:
    newest = 0.0
    for root, _dirs, files in os.walk(folder):
        for n in (root, *(os.path.join(root, f) for f in files)):
            try:
                newest = max(newest, os.lstat(n).st_mtime)
            except OSError:
                pass
    return newest


def _path(where: _storage.Location, name: str) -> str:
    return f"{where.url.rstrip('/')}/{name}"
