"""Reading what a step carries: each zarr leaf's store and generation, its own or a sibling
step folder's (format 6 ``refs``, see ``_format`` and ``_carry``), and the typed error for a
step copied without the step folders it refers to.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from . import _faults, _storage
from ._columns import Columns
from ._errors import CheckpointNotFoundError
from ._format import Commit, LeafRecord


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
