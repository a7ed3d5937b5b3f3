"""read_blocks: one leaf's data as NumPy blocks, each read by itself, never the whole leaf.

Each block is a region of the leaf handed to the checkpoint's reader, which reads only what
the region needs: the zarr chunks it touches (ours, Orbax), its byte ranges (safetensors:
from its first element to its last, or row by row for a sparse region such as a column).
A Flax msgpack file has no index: it is read whole when opened, as :func:`restore` reads it.

Blocks are contiguous in C order, and their bounds depend only on the region's shape, the
dtype's size and ``block_bytes``: two checkpoints holding a leaf of one shape and dtype give
the same blocks, so they can be compared block by block (``pytree-ckpt diff --values``).
"""

from __future__ import annotations

import itertools
import math
import operator
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import _leaves, _source, _storage
from ._build import Want
from ._errors import PathNotFoundError, RegionError, UnsupportedLeafError
from ._format import LeafRecord
from ._open import open_source

BLOCK_BYTES = 64 << 20

Region = tuple[tuple[int, int], ...]  # (start, stop) per axis
Index = tuple[slice, ...]


def read_blocks(path: str | os.PathLike | dict, leaf: str, *, index: Any = None,
                block_bytes: int | None = BLOCK_BYTES) -> Iterator[tuple[Index, np.ndarray]]:
    """Reads one array leaf, or a region of it, block by block, holding one block at a time.

    For a leaf too large to restore whole (a 10 GB embedding table on a laptop), or to read
    a few rows of it. Only what each block needs is read: the stored chunks it touches
    (ours, Orbax) or its byte ranges (safetensors). A Flax msgpack file is read whole when
    opened, as :func:`restore` reads it; an Orbax array stored as one chunk is read whole
    for each block.

    **Arguments:**

    - ``path``: a checkpoint of any format :func:`restore` reads.
    - ``leaf``: the leaf's path, as :func:`metadata` lists it (``"params/embed"``).
    - ``index``: the region to read: a slice or a tuple of slices, one per leading axis
      (``np.s_[1000:2000]``, ``np.s_[:, 0:64]``); a negative bound counts from the end of
      its axis. Omitted axes are read whole; None reads the whole leaf.
    - ``block_bytes``: the most bytes a block holds (one element, if that is larger);
      None reads the region as one block.

    **Returns:** an iterator of ``(index, block)``: ``index`` a tuple of slices, one per
    axis, saying where the block lies in the leaf, ``block`` a new NumPy array of the
    leaf's saved dtype (a PRNG key's key data). Blocks are contiguous runs of the region in
    C order, along its first axis where a row fits in ``block_bytes``; their bounds depend
    only on the region, the dtype and ``block_bytes``. Each block is read when the iterator
    is advanced to it.

    **Raises** (at the call, before any block is read): as :func:`restore` does for a
    missing, incomplete or corrupt checkpoint; :class:`PathNotFoundError` if ``leaf`` is no
    leaf of the checkpoint; :class:`UnsupportedLeafError` for a Python leaf (its value is in
    :func:`metadata`); :class:`RegionError` for an ``index`` outside the leaf's shape, with
    a step, or not made of slices; ``ValueError`` for a ``block_bytes`` below 1. While
    iterating: :class:`CorruptCheckpointError` naming the leaf whose bytes fail their
    checksum, or saying that the checkpoint was overwritten or deleted meanwhile (the rest
    of the leaf would be another save's).

    Example::

        >>> _ = pc.save({"embed": jnp.arange(12.0).reshape(6, 2)}, "memory://doc/blocks")
        >>> for index, block in pc.read_blocks("memory://doc/blocks", "embed",
        ...                                    block_bytes=16):
        ...     print(index[0], block.tolist())
        slice(0, 2, None) [[0.0, 1.0], [2.0, 3.0]]
        slice(2, 4, None) [[4.0, 5.0], [6.0, 7.0]]
        slice(4, 6, None) [[8.0, 9.0], [10.0, 11.0]]
        >>> [(_, rows)] = pc.read_blocks("memory://doc/blocks", "embed",
        ...                              index=(slice(-2, None), slice(1, 2)))
        >>> rows.tolist()
        [[9.0], [11.0]]
    """
    if block_bytes is not None and operator.index(block_bytes) < 1:
        raise ValueError(f"block_bytes must be at least 1, not {block_bytes}")
    loc = _storage.location(path)
    ckpt = open_source(loc)  # decoding pauses the collector itself, not the read
    rec = _record(ckpt, leaf, loc.url)
    region = _region(index, rec, loc.url)
    itemsize = _leaves.DTYPES[rec.dtype].itemsize
    return _reads(ckpt, rec, blocks(region, itemsize, block_bytes))


def _reads(ckpt: _source.Source, rec: LeafRecord, regions: Iterator[Region]
           ) -> Iterator[tuple[Index, np.ndarray]]:
    dtype = _leaves.DTYPES[rec.dtype]
    for region in regions:
        want = Want(_leaves.NUMPY, dtype, tuple(b - a for a, b in region), region=region)
        # Yielded straight from the read: this frame keeps no block while the next is read.
        # Not shared: each process reads its blocks alone (share_reads=False).
        yield tuple(slice(a, b) for a, b in region), ckpt.read([(rec.path, rec, want)],
                                                               False)[rec.path]


def blocks(region: Region, itemsize: int, most: int | None) -> Iterator[Region]:
    """``region`` cut into blocks of at most ``most`` bytes (one element, if larger), each
    a contiguous run of it in C order: ranges along the first axis whose rows fit, each
    single index of the axes before it."""
    sizes = [b - a for a, b in region]
    if most is None or not sizes or 0 in sizes or math.prod(sizes) * itemsize <= most:
        yield region
        return
    axis = 0  # the first axis along which one step (the rest of the region) fits
    while axis + 1 < len(sizes) and itemsize * math.prod(sizes[axis + 1:]) > most:
        axis += 1
    step = max(1, most // (itemsize * math.prod(sizes[axis + 1:])))
    start, stop = region[axis]
    for outer in itertools.product(*(range(a, b) for a, b in region[:axis])):
        for a in range(start, stop, step):
            yield (*((i, i + 1) for i in outer), (a, min(a + step, stop)), *region[axis + 1:])


def _record(ckpt: _source.Source, leaf: str, url: str) -> LeafRecord:
    if not isinstance(leaf, str):
        raise TypeError(f"leaf must be a path string such as 'params/embed', not {leaf!r:.100}")
    if leaf not in ckpt.leaves:
        below = [p for p in ckpt.leaves if p.startswith(leaf + "/")] if leaf else list(ckpt.leaves)
        hint = (f"it is a subtree of {len(below)} leaves, e.g. {below[0]!r:.200}" if below
                else "pytree-ckpt ls or pc.metadata(path).leaves lists the leaves")
        raise PathNotFoundError(f"{url}: leaf {leaf!r:.200} is not in the checkpoint ({hint})")
    (rec,) = ckpt.leaves.records([leaf])
    if rec.origin == _leaves.PY:
        raise UnsupportedLeafError(
            f"{url}: leaf {leaf!r:.200} is a Python {rec.dtype}, not an array; its value is "
            "in pc.metadata(path).leaves[leaf].value")
    return rec


def _region(index: Any, rec: LeafRecord, url: str) -> Region:
    """``index`` as (start, stop) per axis of the leaf, or RegionError."""
    shape = rec.shape
    if index is None:
        return tuple((0, d) for d in shape)
    parts = index if isinstance(index, tuple) else (index,)

    def bad(why: str) -> RegionError:
        return RegionError(f"{url}: leaf {rec.path!r:.200} of shape {shape}: index "
                           f"{index!r:.200} {why}")

    if len(parts) > len(shape):
        raise bad(f"has {len(parts)} entries for {len(shape)} axes")
    region = []
    parts = (*parts, *(slice(None),) * (len(shape) - len(parts)))
    for axis, (part, d) in enumerate(zip(parts, shape, strict=True)):
        if not isinstance(part, slice):
            raise bad(f"has {part!r:.60} for axis {axis}: give slices, e.g. "
                      "np.s_[3:4] for one row")
        if part.step not in (None, 1):
            raise bad(f"has step {part.step!r:.60} on axis {axis}: blocks are contiguous")
        try:
            start = 0 if part.start is None else operator.index(part.start)
            stop = d if part.stop is None else operator.index(part.stop)
        except TypeError:
            raise bad(f"has a bound on axis {axis} that is not an integer") from None
        start, stop = start + d if start < 0 else start, stop + d if stop < 0 else stop
        if not 0 <= start <= stop <= d:
            raise bad(f"reaches outside axis {axis} of length {d} "
                      f"(from {start} to {stop})")
        region.append((start, stop))
    return tuple(region)
