"""Progress bars, drawn only when asked (``restore(..., progress=True)``); the library prints
nothing otherwise.

``tqdm.auto`` draws a widget in a Jupyter notebook (where ipywidgets is installed) and a text
bar on stderr elsewhere. A restore hands its reader every leaf in one call; with a bar it
calls the reader once per batch of leaves instead (about _BATCH_BYTES, at most _BATCH_LEAVES
leaves) and advances the bar by each batch's bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from . import _leaves

_BATCH_BYTES = 64 << 20
_BATCH_LEAVES = 2000


def read_with_bar(read: Callable[[list], dict[str, Any]], jobs: list, what: str
                  ) -> dict[str, Any]:
    """``read(jobs)``, batch by batch under a bar titled ``what``."""
    from tqdm.auto import tqdm

    sizes = [_nbytes(rec) for _, rec, _ in jobs]
    out: dict[str, Any] = {}
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, unit_divisor=1024, desc=what,
              leave=False) as bar:
        for batch, nbytes in _batches(jobs, sizes):
            out.update(read(batch))
            bar.update(nbytes)
    return out


def _batches(jobs: list, sizes: list[int]) -> Iterator[tuple[list, int]]:
    batch: list = []
    total = 0
    for job, size in zip(jobs, sizes, strict=True):
        if batch and (total + size > _BATCH_BYTES or len(batch) >= _BATCH_LEAVES):
            yield batch, total
            batch, total = [], 0
        batch.append(job)
        total += size
    if batch:
        yield batch, total


def _nbytes(rec: Any) -> int:
    if rec.origin == _leaves.PY:
        return 0
    return math.prod(rec.shape) * _leaves.DTYPES[rec.dtype].itemsize
