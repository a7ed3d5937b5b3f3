"""Steps on disk: a :class:`CheckpointManager` directory's step folders, its step index and its
metrics files; what counts as a committed step, and the order a step is deleted in.

Layout of a manager's directory::

    <directory>/
      <step>/                   one checkpoint, exactly as save() writes it; <step> is the step
                                in plain decimal without padding: 0/, 7/, 1000/
      <step>.metrics.msgpack    the metrics given to save(step, ..., metrics=...): a msgpack
                                map of str to int, float, bool, str or None
      manager.lock              the lock of the manager writing here (see _lock.py)
      .steps/<step>             the step index: an empty marker, step <step> may exist
      .steps/complete           every step that may exist has its marker

A step counts only if ``<step>/checkpoint.msgpack`` exists (it is committed). Its marker in
the index, then its metrics file, are written *before* the checkpoint, so a committed step
that was given metrics always has them; a metrics file whose step is not committed is an
orphan of a failed save.

Deleting a step removes its commit file first, then its folder, then its metrics file, then
its marker, so a crash half-way leaves an incomplete folder (cleaned at the next start),
never a committed checkpoint with missing data, nor a step folder without a marker.

**The step index.** Object stores list keys without a delimiter (TensorStore's
``KvStore.list``), so finding a manager's steps by listing its directory costs a request per
1,000 keys of every chunk of every kept step. The primary writes a step's marker before any
of the step's data and removes it after the step's folder is deleted, so every step folder of
the manager's has a marker, and a marker whose step has no commit file is a save that did not
finish (or a step deleted by hand). Whether marked steps are committed is one small listing of
each commit file's key, all at once: finding the steps costs one listing of the index plus one
per marker, whatever the chunks.

``complete`` is written by a writing manager's start-up once every committed step it found
by a full listing has its marker (a directory written before the index existed, or whose
``complete`` was deleted to have the index rebuilt). Without it, readers list everything.
A step folder copied in by hand is seen only with its marker (or once the index is rebuilt).

Local directories are listed cheaply, and their listing stays the truth; the index is kept
there too, so that a directory copied to a bucket keeps it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import msgpack
import numpy as np

from . import _storage
from ._errors import CorruptCheckpointError, NotACheckpointError
from ._faults import faults
from ._foreign import orbax_run
from ._format import COMMIT_FILE, is_step_name

Metrics = Mapping[str, Any]
INDEX = ".steps"
COMPLETE = "complete"
# A manager's metrics file of a step, or a temporary file of its write (TensorStore's).
METRICS_FILE = re.compile(r"(0|[1-9][0-9]*)\.metrics\.msgpack(\..+)?")
_MAX_METRICS_BYTES = 1 << 20


def check_step(step: Any) -> int:
    """``step`` as an int: a non-negative int (NumPy's included)."""
    if isinstance(step, bool) or not isinstance(step, int | np.integer):
        raise TypeError(f"step must be an int, not {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be >= 0, not {step}")
    return int(step)


def metrics_name(step: int | str) -> str:
    """The name of step ``step``'s metrics file in the manager's directory."""
    return f"{step}.metrics.msgpack"


# ---- finding committed steps ----

def committed_in(children: dict[str, set[str] | None]) -> list[int]:
    """The committed steps among a manager directory's children (see
    :func:`_storage.child_names`), ascending: folders named by a step, holding a commit file.
    A file, or a link, named like a step is not one of the manager's and is left alone."""
    return sorted(int(n) for n, inside in children.items()
                  if inside is not None and is_step_name(n) and COMMIT_FILE in inside)


def committed_among(kv: Any, steps: list[int]) -> list[int]:
    """Those of ``steps`` that are committed (have a commit file), ascending; one listing of
    one key each, all in flight at once."""
    found = [(step, _storage.list_key(kv, f"{step}/{COMMIT_FILE}")) for step in steps]
    with faults(_storage.kv_url(kv)):
        return sorted(step for step, keys in found if keys.result())


def latest_marked(kv: Any, steps: list[int]) -> int | None:
    """The newest committed step among ``steps``: one listing each, from the newest down."""
    for step in sorted(steps, reverse=True):
        if committed_among(kv, [step]):
            return step
    return None


def latest(directory: str | os.PathLike | dict) -> str | None:
    """The path of the newest committed checkpoint in a :class:`CheckpointManager`'s directory,
    or None if it has none; for code that has no manager (an evaluator, a notebook). In an
    Orbax ``CheckpointManager``'s directory, the newest committed Orbax step's folder.

    It takes no lock and deletes nothing; the manager writing the directory may delete that
    checkpoint later under its retention rules, so restore it soon after asking. On an object
    store it reads the manager's step index (a few small requests, however many chunks the
    steps have); a step folder copied in by hand needs its marker there (see the README).

    **Raises:** :class:`CheckpointError` if the storage cannot be opened; ``ValueError`` for
    an unsupported URL scheme.

    Example::

        >>> with pc.CheckpointManager("memory://doc/run", async_save=False) as mgr:
        ...     mgr.save(5, {"w": jnp.ones(2)})
        True
        >>> pc.latest("memory://doc/run")
        'memory://doc/run/5'
    """
    loc = _storage.location(directory)
    kv = _storage.open_kvstore(loc)
    found = marked(loc, kv) if loc.local is None else None
    if found is not None:  # an object store's step index: one listing per step tried
        step = latest_marked(kv, found)
        return None if step is None else loc.child(str(step)).url
    children = _storage.child_names(loc, kv)
    step = max(committed_in(children), default=None)
    if step is None:  # an Orbax CheckpointManager's directory?
        orbax = orbax_run.steps_in(loc.url, children)
        return loc.child(orbax[max(orbax)]).url if orbax else None
    return loc.child(str(step)).url


# ---- the step index ----

def marked(loc: _storage.Location, kv: Any) -> list[int] | None:
    """The marked steps, ascending; None if the index is not complete (list everything)."""
    names = _storage.folder_names(loc, kv, INDEX) or set()
    return marked_in(names) if COMPLETE in names else None


def marked_in(names: set[str] | None) -> list[int]:
    """The steps among the names in the index folder, ascending."""
    return sorted(int(n) for n in names or () if is_step_name(n))


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


def rebuild_index(loc: _storage.Location, kv: Any, steps: list[int],
                  names: set[str] | None) -> None:
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


# ---- step folders ----

def check_folder(loc: _storage.Location, step: int) -> None:
    """Refuses to save into a link or a file named like the step: not the manager's own
    (a link to an archived checkpoint's folder would be written into)."""
    if loc.local is None:
        return
    folder = os.path.join(loc.local, str(step))
    if os.path.islink(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
        raise NotACheckpointError(
            f"{folder}: {'a symbolic link' if os.path.islink(folder) else 'a file'} named "
            f"like step {step}; a CheckpointManager saves only into folders of its own "
            "(remove or rename it)")


def delete_step(loc: _storage.Location, kv: Any, step: int) -> None:
    """Deletes committed step ``step``: commit file, folder, metrics file, then marker."""
    name = str(step)
    # The commit file goes first: from then on the folder is merely incomplete.
    _storage.delete_file(loc, kv, f"{name}/{COMMIT_FILE}")
    if loc.local is not None:
        _storage.fsync_dir(os.path.join(loc.local, name))
    _storage.delete_prefix(loc, kv, name)
    _storage.delete_file(loc, kv, metrics_name(step))
    unmark(loc, kv, step)  # last: every step folder has its marker


# ---- metrics files ----

def write_metrics(loc: _storage.Location, kv: Any, step: int, encoded: bytes | None) -> None:
    """Writes step ``step``'s metrics file (``encoded`` by :func:`encode_metrics`); with None,
    deletes the one a failed earlier save of the step may have left."""
    if encoded is None:
        _storage.delete_file(loc, kv, metrics_name(step))
    else:
        _storage.write_key(loc, kv, metrics_name(step), encoded)


def read_metrics(loc: _storage.Location, kv: Any, step: int) -> Metrics | None:
    """Step ``step``'s metrics, or None if it has no metrics file."""
    key = metrics_name(step)
    raw = _storage.read_key(kv, key, loc)
    return None if raw is None else decode_metrics(raw, f"{loc.url}/{key}")


def encode_metrics(metrics: Metrics | None) -> bytes | None:
    """``metrics`` as a metrics file's bytes (None for None); ``TypeError`` for what a
    metrics file cannot hold."""
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of str to numbers, not {type(metrics).__name__}")
    plain: dict[str, Any] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metrics keys must be str, not {key!r}")
        if isinstance(value, np.ndarray | np.generic | jax.Array) and np.ndim(value) == 0:
            value = np.asarray(value).item()
        if not (value is None or isinstance(value, bool | int | float | str)):
            raise TypeError(f"metrics[{key!r}] is a {type(value).__name__}; use a number, a "
                            "scalar array, a bool, a str or None")
        plain[key] = value
    return msgpack.packb(plain, use_bin_type=True)


def decode_metrics(raw: bytes, where: str) -> Metrics:
    """A metrics file's bytes as a dict; :class:`CorruptCheckpointError` naming ``where`` if
    they are not a bounded msgpack map."""
    # Untrusted input: bounded, and no container may declare more entries than it has bytes.
    limit = len(raw)
    try:
        if limit > _MAX_METRICS_BYTES:
            raise ValueError(f"{limit} bytes, more than {_MAX_METRICS_BYTES}")
        value = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_str_len=limit,
                                max_bin_len=limit, max_array_len=limit, max_map_len=limit,
                                max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise CorruptCheckpointError(f"{where}: unreadable metrics file ({e})") from None
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{where}: metrics file holds a {type(value).__name__}, "
                                     "not a map")
    return value
