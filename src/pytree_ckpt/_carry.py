"""Which leaves a manager's step carries over from the step it last committed (see the
README, "Incremental steps").

A ``jax.Array`` never changes, so a leaf that is the same live object as in the step a
manager last committed (its :class:`Base`) is unchanged: the new step's commit file refers to
the bytes where they were written (format 6: ``refs`` and ``ref``, see ``_format``) instead
of writing them again. A reference names the step folder that wrote the bytes, beside this
one, and its generation; always that step, never one that carried them in turn. Reading
them: ``_refs``; keeping them through retention: ``_retire``.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from . import _decode
from ._format import Commit, LeafRecord


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
