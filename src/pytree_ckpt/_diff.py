"""The diff engine of ``pytree-ckpt diff``: how two checkpoints' metadata differ (paths only
in one, leaves of another kind, shape or dtype, Python values that differ), and how their
arrays differ, read in bounded memory.

The checkpoints are read through the public API, passed in as ``pc`` (``pc.restore``,
``pc.read_blocks``, ``pc.split_path``), as the command line reads them.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

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


def compare(a: Any, b: Any) -> Comparison:
    """How the metadata ``a`` and ``b`` of two checkpoints differ (see :class:`Comparison`)."""
    only_a = [p for p in a.leaves if p not in b.leaves]
    only_b = [p for p in b.leaves if p not in a.leaves]
    changed, same_py, same_arrays = [], [], []
    for path, la in a.leaves.items():
        lb = b.leaves.get(path)
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


def array_differences(pc: Any, path_a: str, path_b: str, leaves: list, atol: float,
                       rtol: float, block_bytes: int, *, bar: bool) -> list[dict]:
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
            values_a, values_b = _read(pc, path_a, batch), _read(pc, path_b, batch)
            for leaf in batch:
                tally = _Tally(atol, rtol)
                tally.add(values_a.pop(leaf.path), values_b.pop(leaf.path))
                found += tally.found(leaf.path)
                progress.update(leaf.nbytes)
        for leaf in large:
            tally = _Tally(atol, rtol)
            blocks_b = pc.read_blocks(path_b, leaf.path, block_bytes=block_bytes)
            for _index, block_a in pc.read_blocks(path_a, leaf.path, block_bytes=block_bytes):
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


def _read(pc: Any, path: str, leaves: list) -> dict[str, Any]:
    """The values of ``leaves`` (arrays) as NumPy arrays, by path, in one restore: the target
    is those paths as nested dicts of NumPy arrays (whose zero pages are never touched). A
    PRNG key restores only into a key: its key data is read by itself."""
    target: dict = {}
    values = {}
    for leaf in leaves:
        if leaf.kind == "prngkey":
            [(_index, values[leaf.path])] = pc.read_blocks(path, leaf.path, block_bytes=None)
            continue
        *parents, name = pc.split_path(leaf.path)
        node = target
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = np.zeros(leaf.shape, np.dtype(leaf.dtype))
    tree, _ = pc.restore(path, target, strict=True)
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
