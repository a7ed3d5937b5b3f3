"""Incremental steps: what a step carries over from the step a manager last committed, where
carried data is read from, and which data kept steps need (see the README, "Incremental
steps").

A ``jax.Array`` never changes, so a leaf that is the same live object as in the step a
manager last committed (its :class:`Base`) is unchanged: the new step's commit file refers to
the bytes where they were written (format 6: ``refs`` and ``ref``, see ``_format``) instead
of writing them again. A reference names the step folder that wrote the bytes, beside this
one, and its generation; always that step, never one that carried them in turn.

Deleting a step whose data a kept step needs *retires* it: ``<step>/retired`` is written,
then the commit file deleted, then everything but the needed arrays. A folder holding
``retired`` and no commit file is no save's leftover (``_clean`` never deletes it); a
manager's sweep deletes what no kept step needs any more.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from . import _decode, _faults, _leaves, _steps, _storage
from ._columns import Columns
from ._errors import CheckpointNotFoundError
from ._format import COMMIT_FILE, Commit, LeafRecord

RETIRED = "retired"


class Base(NamedTuple):
    """The step a manager last committed, as the next step may carry from it."""

    step: str  # its folder's name
    commit: Commit  # its commit file, read back
    objects: Mapping[str, weakref.ref]  # zarr leaf path -> the jax.Array it saved


class Carried(NamedTuple):
    """Where a carried leaf's bytes are: a step folder, its generation, and the record and
    chunk CRC-32Cs its writer committed."""

    step: str
    generation: str
    record: LeafRecord
    chunk_crcs: np.ndarray


def carried(base: Base | None, path: str, leaf: Any) -> Carried | None:
    """Where ``leaf`` (at ``path``) is in ``base``, if it is the same live jax.Array that
    ``base`` saved there, as a zarr array; else None (it is written)."""
    if base is None:
        return None
    ref = base.objects.get(path)
    if ref is None or ref() is not leaf or leaf.is_deleted():
        return None
    rec = base.commit.leaves.get(path)
    crcs = _decode.chunk_crcs(base.commit, path)
    if rec is None or rec.storage.kind != "z" or crcs is None:
        return None
    s = rec.storage
    step, generation = ((base.step, base.commit.data) if s.ref == 0
                        else base.commit.refs[s.ref - 1])
    return Carried(step, generation, rec, crcs)


def same_record(rec: LeafRecord, fields: tuple) -> bool:
    """Whether a snapshot's record ``fields`` (see _snapshot) describe ``rec``'s array."""
    path, origin, dtype, shape, impl, storage, sharding, weak = fields
    s = rec.storage
    return (rec.origin == origin and rec.dtype == dtype and tuple(rec.shape) == tuple(shape)
            and rec.impl == impl and tuple(s.chunks) == tuple(storage.chunks)
            and s.stored_dtype == storage.stored_dtype and rec.sharding == sharding
            and rec.weak == weak)


# ---- reading ----

def sibling(loc: _storage.Location, name: str) -> _storage.Location:
    """The location of folder ``name`` beside ``loc`` (a step name: never ``..``)."""
    path = loc.spec.get("path", "").rstrip("/")
    parent = path.rpartition("/")[0]
    spec = dict(loc.spec, path=f"{parent}/{name}/" if parent else f"{name}/")
    if loc.spec.get("driver") == "file" and path.startswith("/") and not parent:
        spec["path"] = f"/{name}/"
    local = (os.path.join(os.path.dirname(loc.local.rstrip("/")), name)
             if loc.local is not None else None)
    return _storage.Location(f"{loc.url.rstrip('/').rpartition('/')[0]}/{name}", spec, local)


class Stores:
    """Where each zarr leaf of a checkpoint is read from: ``(kvstore, generation)``, its
    own or a referenced sibling's (each opened once)."""

    def __init__(self, loc: _storage.Location, kv: Any, commit: Commit):
        self._loc, self._commit = loc, commit
        self._opened: dict[int, tuple[Any, str]] = {0: (kv, commit.data)}
        self._checked: set[int] = set()

    def __call__(self, rec: LeafRecord) -> tuple[Any, str]:
        ref = rec.storage.ref
        if ref not in self._opened:
            step, generation = self._commit.refs[ref - 1]
            self._opened[ref] = (_storage.open_kvstore(sibling(self._loc, step)), generation)
        return self._opened[ref]

    def label(self, rec: LeafRecord) -> str:
        """What keys of ``rec``'s array are shown after, relative to the checkpoint: "" for
        its own, ``../<step>/`` for a carried leaf's."""
        ref = rec.storage.ref
        return f"../{self._commit.refs[ref - 1][0]}/" if ref else ""

    def check(self, records: Iterable[LeafRecord]) -> None:
        """Raises :class:`CheckpointNotFoundError` naming a leaf and the step folder it is
        carried from, where that folder's generation is not there (a step copied alone);
        one small read per referenced generation. Locally, also refuses FIFOs and devices
        among the referenced arrays' files."""
        first: dict[int, LeafRecord] = {}
        for rec in records:
            if rec.storage.kind == "z" and rec.storage.ref not in self._checked:
                first.setdefault(rec.storage.ref, rec)
        first.pop(0, None)
        for ref, rec in sorted(first.items()):
            kv, generation = self(rec)
            step = self._commit.refs[ref - 1][0]
            folder = sibling(self._loc, step)
            with _faults.faults(folder.url):  # a store that fails is no missing folder
                found = _storage.read_key(kv, f"{generation}/a/{rec.storage.index}/zarr.json")
            if found is None:
                raise CheckpointNotFoundError(
                    f"{self._loc.url}: leaf {rec.path!r:.200} is carried from step {step} "
                    f"({folder.url}/{generation}), which is not there: this step was copied or "
                    f"moved without the step folders it refers to ({missing(self._commit)}); "
                    "copy them beside it, or write a self-contained copy with "
                    "`pytree-ckpt convert`")
            if folder.local is not None:
                _storage.check_regular_tree(os.path.join(folder.local, generation))
            self._checked.add(ref)


def carried_from(commit: Commit) -> dict[str, str]:
    """Each carried leaf's path -> the step folder, beside this checkpoint, holding its data."""
    leaves = commit.leaves
    if not commit.refs or not isinstance(leaves, Columns):
        return {}
    return {path: commit.refs[ref - 1][0] for path, ref in leaves.carried().items()}


def missing(commit: Commit) -> str:
    return "steps " + ", ".join(sorted({s for s, _ in commit.refs}, key=int))


def carried_bytes(commit: Commit) -> int:
    """The bytes of the leaves ``commit`` carries (its other leaves' it wrote)."""
    leaves = commit.leaves
    refs = [p for p in leaves if leaves[p].storage.kind == "z" and leaves[p].storage.ref]
    return sum(int(np.prod(r.shape, dtype=np.int64)) * _leaves.DTYPES[r.dtype].itemsize
               for r in map(leaves.__getitem__, refs))


# ---- retention ----

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
        self.base: Base | None = None
        self.retired: set[int] = set()

    def committed(self, step: int, objects: Mapping[str, weakref.ref]) -> None:
        """Reads back the commit file of ``step``, just committed: the next step's base
        (every process reads the same file, so all offer the same data). Where it cannot be
        read, the next step is written in full."""
        self.base = None
        if not (self._enabled and objects):
            return
        key = f"{step}/{COMMIT_FILE}"
        try:
            commit = _decode.decode(_storage.read_key(self._kv, key) or b"",
                                    f"{self._loc.url}/{key}")
        except Exception:
            return
        self._known[step] = needs(commit)
        self.base = Base(str(step), commit, objects)

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
                key = f"{step}/{COMMIT_FILE}"
                try:
                    commit = _decode.decode(_storage.read_key(self._kv, key) or b"",
                                            f"{self._loc.url}/{key}")
                except Exception:
                    return None
                self._known[step] = needs(commit)
            for name, keys in self._known[step].items():
                out.setdefault(name, set()).update(keys)
        return out

    def delete(self, step: int, kept: Iterable[int], primary: bool) -> None:
        """Deletes committed ``step`` (see _steps.delete_step), or retires it if the ``kept``
        steps need its data (or that cannot be told), deleting its metrics file then. Only
        the ``primary`` deletes; every process forgets the step."""
        if not primary:
            self.dropped(step)
            return
        needed = self.needed(kept)
        self.dropped(step)
        if needed is not None and str(step) not in needed:
            _steps.delete_step(self._loc, self._kv, step)
            return
        retire(self._loc, self._kv, step, None if needed is None else needed[str(step)])
        _storage.delete_file(self._loc, self._kv, _steps.metrics_name(step))
        self.retired.add(step)

    def find_retired(self, children: Mapping[str, set[str] | None], steps: list[int]) -> None:
        """Takes the retired folders among a manager directory's ``children`` (see
        _storage.child_names) and sweeps them (``steps``: the committed ones)."""
        self.retired = {int(n) for n, inside in children.items()
                        if _steps.is_step(n) and is_retired(inside)}
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
        nothing of it is needed (``retired`` first, then the rest, then its index marker)."""
        if not self.retired:
            return
        needed = self.needed(kept)
        if needed is None:
            return
        for step in sorted(self.retired):
            name = str(step)
            if name in needed:
                prune(self._loc, self._kv, name, needed[name])
                continue
            _storage.delete_file(self._loc, self._kv, f"{name}/{RETIRED}")
            _storage.delete_prefix(self._loc, self._kv, name)
            _steps.unmark(self._loc, self._kv, step)
            self.retired.discard(step)


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
    ``needed`` (keys ``<generation>/a/<id>`` below it), each deletion of unneeded keys only."""
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


def _delete(loc: _storage.Location, kv: Any, key: str) -> None:
    if loc.local is not None and not os.path.isdir(os.path.join(loc.local, key)):
        _storage.delete_file(loc, kv, key)
    elif loc.local is not None:
        _storage.delete_prefix(loc, kv, key)
    else:  # an object store: the key itself, and everything below it
        kv.write(key, None).result()
        _storage.delete_prefix(loc, kv, key)


def is_retired(inside: set[str] | None) -> bool:
    """Whether a step folder holding ``inside`` is retired."""
    return inside is not None and RETIRED in inside and COMMIT_FILE not in inside
