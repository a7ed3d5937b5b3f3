"""The diff engine of ``pytree-ckpt diff``: how two checkpoints' metadata differ (paths only
in one, leaves of another kind, shape or dtype, Python values that differ), and how their
arrays differ, read in bounded memory.

The checkpoints' arrays are read through the public API, passed in as ``pc``
(``pc.restore``, ``pc.read_blocks``, ``pc.split_path``), as the command line reads them.
Without reading them, :func:`checksum_verdicts` compares the checksums two of our commit files
record, where they cover the same bytes.

``at`` (per side): a path prefix; only the leaves under it are compared, by their paths
relative to it (an Orbax step's ``default`` item against our checkpoint's root).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from . import _format, _open, _source, _storage
from ._columns import Columns
from ._errors import PathNotFoundError
from ._graph import relative_to, split_path

_CHUNK_ELEMENTS = 1 << 20  # arrays are compared this many elements at a time


class Comparison(NamedTuple):
    """How two checkpoints' metadata (:class:`CheckpointMetadata`) differ, without reading
    their arrays.

    - ``only_a``, ``only_b``: the paths only in A, only in B (in each one's order).
    - ``changed``: ``(leaf of A, leaf of B)`` of the same path, of another kind, dtype or shape.
    - ``same_py``: ``(leaf of A, leaf of B)`` of Python values, of the same kind.
    - ``same_arrays``: A's leaves of arrays whose kind, dtype and shape B's leaf shares.
    - ``py_differ``: ``{"path", "a", "b"}`` for each of ``same_py`` whose values differ (NaN
      equals NaN; a value equals only one of its own type).
    """

    only_a: list[str]
    only_b: list[str]
    changed: list[tuple[Any, Any]]
    same_py: list[tuple[Any, Any]]
    same_arrays: list[Any]
    py_differ: list[dict]


def under(meta: Any, at: str | None) -> dict[str, Any]:
    """The leaves of the metadata ``meta`` by path, those under ``at`` only, their paths made
    relative to it; :class:`PathNotFoundError` if there is none."""
    if not at:
        return dict(meta.leaves)
    out = {}
    for path, leaf in meta.leaves.items():
        rel = relative_to(path, at)
        if rel is not None:
            out[rel] = leaf._replace(path=rel)
    if not out:
        tops = sorted({split_path(p)[0] for p in meta.leaves if p})
        raise PathNotFoundError(f"{meta.path}: no leaf under {at!r}; its top-level names are "
                                f"{tops[:20]}")
    return out


def compare(a: dict[str, Any], b: dict[str, Any]) -> Comparison:
    """How the leaves ``a`` and ``b`` (by path, see :func:`under`) of two checkpoints differ
    (see :class:`Comparison`)."""
    only_a = [p for p in a if p not in b]
    only_b = [p for p in b if p not in a]
    changed, same_py, same_arrays = [], [], []
    for path, la in a.items():
        lb = b.get(path)
        if lb is None:
            continue
        if (la.kind, la.dtype, la.shape) != (lb.kind, lb.dtype, lb.shape):
            changed.append((la, lb))
        elif la.kind == "py":
            same_py.append((la, lb))
        else:
            same_arrays.append(la)
    differ = [_py_difference(la, lb) for la, lb in same_py if not _same_value(la.value, lb.value)]
    return Comparison(only_a, only_b, changed, same_py, same_arrays, differ)


def _same_value(x: Any, y: Any) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return type(x) is type(y) and x == y


def _py_difference(la: Any, lb: Any) -> dict:
    return {"path": la.path, "a": la.value, "b": lb.value}


def checksum_verdicts(path_a: str, path_b: str, leaves: list, at_a: str | None = None,
                      at_b: str | None = None) -> dict[str, bool]:
    """Whether each leaf of ``leaves`` (arrays of one kind, dtype and shape on both sides)
    has the same stored bytes on both sides, by the checksums the two commit files record:
    for the leaves where both are ours and the checksums cover the same bytes (packed leaves
    with checksums of one kind; zarr leaves of one chunking and stored dtype, both of format
    5 or later, whose chunks' CRC-32C are recorded). Other leaves are left out.

    Equal checksums are equal bytes but for a CRC collision; equal values may have other
    bytes (0.0 and -0.0, NaNs of other payloads).
    """
    sides = []
    for path, at in ((path_a, at_a), (path_b, at_b)):
        source = _open.open_source(_storage.location(path))
        if source.format != _source.PYTREE_CKPT:
            return {}
        sides.append((source, source.leaves.records([_join(at, leaf.path) for leaf in leaves])))
    (src_a, recs_a), (src_b, recs_b) = sides
    same_crc = _format.LEAF_CRC[src_a.version] is _format.LEAF_CRC[src_b.version]
    out = {}
    for leaf, ra, rb in zip(leaves, recs_a, recs_b, strict=True):
        sa, sb = ra.storage, rb.storage
        if sa.kind == sb.kind == "p" and same_crc:
            out[leaf.path] = sa.crc == sb.crc
        elif (sa.kind == sb.kind == "z" and sa.chunks == sb.chunks
              and sa.stored_dtype == sb.stored_dtype):
            ca, cb = _chunk_crcs(src_a, ra.path), _chunk_crcs(src_b, rb.path)
            if ca is not None and cb is not None:
                out[leaf.path] = bool(np.array_equal(ca, cb))
    return out


def _chunk_crcs(source: _source.Source, path: str) -> np.ndarray | None:
    leaves = source.leaves
    return leaves.chunk_crcs(path) if isinstance(leaves, Columns) else None


def array_differences(pc: Any, path_a: str, path_b: str, leaves: list, atol: float,
                       rtol: float, block_bytes: int, *, bar: bool, at_a: str | None = None,
                       at_b: str | None = None) -> list[dict]:
    """How the arrays of ``leaves`` differ between the checkpoints, holding about two blocks
    of ``block_bytes`` at a time, whatever the leaves' sizes: a leaf larger than a block is
    read from both block by block (``pc.read_blocks``: blocks of one shape and dtype line
    up), smaller leaves in batches of about a block a side, one restore per batch; ``bar``:
    a progress bar of the bytes compared, advanced per batch and per block."""
    found = []
    small = [leaf for leaf in leaves if leaf.nbytes <= block_bytes]
    large = [leaf for leaf in leaves if leaf.nbytes > block_bytes]
    with tqdm(total=sum(leaf.nbytes for leaf in leaves), unit="B", unit_scale=True,
              desc="comparing", file=sys.stderr, disable=not bar, leave=False) as progress:
        for batch in _batches(small, block_bytes):
            values_a, values_b = _read(pc, path_a, batch, at_a), _read(pc, path_b, batch, at_b)
            for leaf in batch:
                tally = _Tally(atol, rtol)
                tally.add(values_a.pop(leaf.path), values_b.pop(leaf.path))
                found += tally.found(leaf.path)
                progress.update(leaf.nbytes)
        for leaf in large:
            tally = _Tally(atol, rtol)
            blocks_b = pc.read_blocks(path_b, _join(at_b, leaf.path), block_bytes=block_bytes)
            for _index, block_a in pc.read_blocks(path_a, _join(at_a, leaf.path),
                                                  block_bytes=block_bytes):
                _index, block_b = next(blocks_b)
                tally.add(block_a, block_b)
                progress.update(block_a.nbytes)
                del block_a, block_b  # not held while the next two are read
            found += tally.found(leaf.path)
    return found


def _batches(leaves: list, most: int) -> Iterator[list]:
    batch, size = [], 0
    for leaf in leaves:
        if batch and size + leaf.nbytes > most:
            yield batch
            batch, size = [], 0
        batch.append(leaf)
        size += leaf.nbytes
    if batch:
        yield batch


def _join(at: str | None, path: str) -> str:
    return (f"{at}/{path}" if path else at) if at else path


def _read(pc: Any, path: str, leaves: list, at: str | None = None) -> dict[str, Any]:
    """The values of ``leaves`` (arrays) as NumPy arrays, by path, in one restore: the target
    is those paths as nested dicts of NumPy arrays (whose zero pages are never touched). A
    PRNG key restores only into a key: its key data is read by itself."""
    target: dict = {}
    values = {}
    for leaf in leaves:
        if leaf.kind == "prngkey":
            [(_index, values[leaf.path])] = pc.read_blocks(path, _join(at, leaf.path),
                                                           block_bytes=None)
            continue
        *parents, name = pc.split_path(leaf.path)
        node = target
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = np.zeros(leaf.shape, np.dtype(leaf.dtype))
    tree, _ = pc.restore(path, target, at=at or None, strict=True)
    for leaf in leaves:
        if leaf.kind != "prngkey":
            node = tree
            for name in pc.split_path(leaf.path):
                node = node[name]
            values[leaf.path] = node
    return values


class _Tally:
    """How two arrays of one shape and dtype differ, told a block at a time: the elements
    that differ (NaN equals NaN; beyond ``atol + rtol * |b|`` when given), the largest
    absolute difference and the largest relative one (of ``|b|``, where it is not 0)."""

    def __init__(self, atol: float, rtol: float) -> None:
        self.atol, self.rtol = atol, rtol
        self.elements = self.differing = 0
        self.max_abs = self.max_rel = 0.0

    def add(self, a: Any, b: Any) -> None:
        """Counts the blocks ``a`` (of A) and ``b`` (of B), _CHUNK_ELEMENTS at a time."""
        flat_a, flat_b = a.reshape(-1), b.reshape(-1)
        wide = np.complex128 if np.issubdtype(a.dtype, np.complexfloating) else np.float64
        self.elements += flat_a.size
        for start in range(0, flat_a.size, _CHUNK_ELEMENTS):
            x = flat_a[start:start + _CHUNK_ELEMENTS]
            y = flat_b[start:start + _CHUNK_ELEMENTS]
            if a.dtype == np.bool_:
                self.differing += int(np.count_nonzero(x != y))
                self.max_abs = max(self.max_abs, float(np.any(x != y)))
                continue
            xw, yw = x.astype(wide), y.astype(wide)
            both_nan = np.isnan(xw) & np.isnan(yw)
            if self.atol or self.rtol:
                differ = ~(np.isclose(xw, yw, rtol=self.rtol, atol=self.atol) | both_nan)
            else:
                differ = (x != y) & ~both_nan
            n = int(np.count_nonzero(differ))
            if not n:
                continue
            self.differing += n
            gap = np.abs(xw[differ] - yw[differ])
            base = np.abs(yw[differ])
            self.max_abs = max(self.max_abs, float(np.nanmax(gap, initial=0.0)))
            rel = np.divide(gap, base, out=np.full(gap.shape, np.nan), where=base != 0)
            if np.any(rel == rel):
                self.max_rel = max(self.max_rel, float(np.nanmax(rel)))

    def found(self, path: str) -> list[dict]:
        """``[difference]`` for the leaf at ``path``, or ``[]`` if nothing differs."""
        if not self.differing:
            return []
        return [{"path": path, "elements": self.elements, "differing": self.differing,
                 "max_abs": self.max_abs, "max_rel": self.max_rel}]
