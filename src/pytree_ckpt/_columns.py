"""The leaf records of a decoded commit file, as a lazy view of its columns.

The commit file stores leaves by column (see _format); :mod:`._decode` validates the columns
as a whole, then wraps them in :class:`Columns`, which builds records only when asked.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from . import _leaves
from ._format import KINDS, ORIGINS, PACKED, VALUE, ZARR, LeafRecord, Storage

_STORAGE = functools.partial(tuple.__new__, Storage)  # Storage(*fields), all of them
_RECORD = functools.partial(tuple.__new__, LeafRecord)
_ORIGINS = np.array(ORIGINS, object)  # codes to names as a whole column


def segments(lengths: np.ndarray) -> np.ndarray:
    """Start of each leaf's run in a concatenated column, given the runs' lengths."""
    starts = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


class Leaves(NamedTuple):
    """The per-leaf columns, as NumPy arrays over the commit file's bytes, and their tables."""

    paths: list[str]
    dtypes: list[str]
    impls: list[str]
    origin: np.ndarray
    dtype: np.ndarray
    rank: np.ndarray
    kind: np.ndarray
    impl: np.ndarray
    sharding: np.ndarray
    dims: np.ndarray  # every leaf's dimensions, one after another
    starts: np.ndarray  # where each leaf's dimensions start in ``dims``


class Columns(Mapping):
    """Leaf records by path, from the commit file's columns once :func:`._decode.decode` has
    validated them as a whole.

    Records are built when asked for, many at once (:meth:`records`: NumPy gathers each
    field for all of them); only a Python leaf's value is checked then, so a restore of a
    small subtree (``at=``) builds and decodes only what it uses.
    """

    def __init__(self, where: str, c: Leaves, index: dict[str, int], values: list,
                 nbytes: np.ndarray, zarr: tuple[np.ndarray, ...], chunk_crc: np.ndarray | None,
                 packed: tuple[np.ndarray, ...], shardings: list, weak: np.ndarray):
        """``zarr``: the zarr leaves' ``(array ids, stored dtypes, chunk shapes, chunk
        counts, refs)``; ``chunk_crc``: from format 5, each zarr leaf's chunks' CRC-32C, leaf after
        leaf (see _binding); ``packed``: the packed leaves' ``(blobs, offsets, CRCs)``;
        ``shardings``: the sharding table, None first (code 0)."""
        self.index = index
        masks = [c.kind == k for k in range(len(KINDS))]
        subs = np.zeros(len(c.paths), np.int64)  # a leaf's place among those stored alike
        for m in masks:
            subs[m] = np.arange(int(m.sum()))
        array, stored, chunks, counts, self._ref = zarr
        self._chunk_crc = chunk_crc
        self._crc_start, self._crc_count = segments(counts), counts
        self._weak = weak

        self._where, self._columns, self._values = where, c, values
        self._sub, self._nbytes = subs, nbytes
        # Code tables as object arrays: a gather and one tolist() names every record's field.
        self._dtype_names = _objects(c.dtypes)
        self._impl_names = _objects([None, *c.impls])
        self._shardings = _objects(shardings)
        self._array, self._stored_names = array, self._dtype_names[stored]
        self._chunks, self._chunk_start = chunks, segments(c.rank[masks[ZARR]])
        self._blob, self._offset, self._crc = packed
        self._done: dict[str, LeafRecord] = {}


    def records(self, paths: Sequence[str]) -> list[LeafRecord]:
        """The records of ``paths`` (each a leaf here), in order: gathered column by column,
        since one by one NumPy's per-call costs would dominate."""
        i = np.fromiter(map(self.index.__getitem__, paths), np.int64, len(paths))
        c, n = self._columns, len(paths)
        kind, sub = c.kind[i], self._sub[i]
        storages: list[Storage | None] = [None] * n
        packed = np.flatnonzero(kind == PACKED)
        if len(packed):
            j = sub[packed]
            for k, blob, offset, nbytes, crc in zip(
                    packed.tolist(), self._blob[j].tolist(), self._offset[j].tolist(),
                    self._nbytes[i[packed]].tolist(), self._crc[j].tolist(), strict=True):
                storages[k] = _STORAGE(("p", None, blob, (), "", offset, nbytes, crc, 0))
        zarr = np.flatnonzero(kind == ZARR)
        if len(zarr):
            j, rank = sub[zarr], c.rank[i[zarr]]
            for k, array, stored, chunks, ref in zip(
                    zarr.tolist(), self._array[j].tolist(), self._stored_names[j].tolist(),
                    _runs(self._chunks, self._chunk_start[j], rank), self._ref[j].tolist(),
                    strict=True):
                storages[k] = _STORAGE(("z", None, array, chunks, stored, 0, 0, 0, ref))
        out = list(map(_RECORD, zip(
            paths, _ORIGINS[c.origin[i]].tolist(), self._dtype_names[c.dtype[i]].tolist(),
            _runs(c.dims, c.starts[i], c.rank[i]), self._impl_names[c.impl[i]].tolist(),
            storages, self._shardings[c.sharding[i]].tolist(), self._weak[i].tolist(),
            strict=True)))
        for k, j in zip(np.flatnonzero(kind == VALUE).tolist(), sub[kind == VALUE].tolist(),
                        strict=True):
            path, dtype = out[k].path, out[k].dtype
            value = _leaves.decode_py(dtype, self._values[j], f"{self._where}: leaf {path!r:.200}")
            out[k] = LeafRecord(path, out[k].origin, dtype, (), None, Storage("v", value), None)
        return out

    def carried(self) -> dict[str, int]:
        """The carried leaves (format 6): path -> 1 + index into the commit's refs."""
        zarr = np.flatnonzero(self._columns.kind == ZARR)
        which = np.flatnonzero(self._ref)
        paths = self._columns.paths
        return dict(zip([paths[k] for k in zarr[which].tolist()], self._ref[which].tolist(),
                        strict=True))

    def chunk_crcs(self, path: str) -> np.ndarray | None:
        """The recorded CRC-32C of each chunk of zarr leaf ``path``, in C order of its chunk
        grid; None before format 5."""
        if self._chunk_crc is None:
            return None
        k = self._sub[self.index[path]]
        return self._chunk_crc[self._crc_start[k]:self._crc_start[k] + self._crc_count[k]]

    def __getitem__(self, path: str) -> LeafRecord:
        record = self._done.get(path)
        if record is None:
            (record,) = self.records([path])
            self._done[path] = record
        return record

    def summaries(self) -> tuple[list, ...]:
        """Columns ``(paths, origins, shapes, dtypes, nbytes, shardings, values)`` of every
        leaf in save order, without building records: all that :func:`metadata` lists.
        ``values`` holds Python leaves' values, None elsewhere."""
        c = self._columns
        values: list = [None] * len(c.paths)
        python = np.flatnonzero(c.kind == VALUE).tolist()
        if python:  # records() gathers every column, even for no paths
            for k, record in zip(python, self.records([c.paths[k] for k in python]), strict=True):
                values[k] = record.storage.value
        return (c.paths, _ORIGINS[c.origin].tolist(), _runs(c.dims, c.starts, c.rank),
                self._dtype_names[c.dtype].tolist(), self._nbytes.tolist(),
                self._shardings[c.sharding].tolist(), values)

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns.paths)

    def __len__(self) -> int:
        return len(self._columns.paths)

    def __contains__(self, path: object) -> bool:
        return path in self.index


def _objects(items: Sequence[Any]) -> np.ndarray:
    """``items`` as a 1-d object array (NumPy would make tuples a second dimension)."""
    out = np.empty(len(items), object)
    for k, x in enumerate(items):
        out[k] = x
    return out


def _runs(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list[tuple[int, ...]]:
    """``tuple(flat[s:s + n])`` for each start and length, length by length: NumPy gathers
    each position, zip makes the tuples (rather than a slice and a tuple per leaf, a NumPy
    call per leaf of metadata())."""
    out: list[tuple[int, ...]] = [()] * len(starts)
    for n in np.unique(lengths).tolist():
        if n == 0:
            continue
        which = np.flatnonzero(lengths == n)
        runs = zip(*(flat[starts[which] + axis].tolist() for axis in range(n)), strict=True)
        if len(which) == len(out):
            return list(runs)
        for k, run in zip(which.tolist(), runs, strict=True):
            out[k] = run
    return out
