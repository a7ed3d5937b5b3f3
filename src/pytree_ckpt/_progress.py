"""Progress bars of bytes, drawn only when asked (``progress=True`` on save, restore and
verify); the library prints nothing otherwise, and does not even import tqdm.

``tqdm.auto`` draws a widget in a Jupyter notebook (where ipywidgets is installed) and a text
bar on stderr elsewhere. Each bar is cleared when its work ends (``leave=False``), failed or
not. A restore hands its reader every leaf in one call; with a bar it calls the reader once
per batch of leaves instead (about _BATCH_BYTES, at most _BATCH_LEAVES leaves) and advances
the bar by each batch's bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from . import _leaves

_BATCH_BYTES = 64 << 20
_BATCH_LEAVES = 2000

Advance = Callable[[int], Any]  # called with the bytes just done


@contextlib.contextmanager
def bar(total: int, what: str, shown: bool) -> Iterator[Advance]:
    """A bar of ``total`` bytes titled ``what`` while the block runs, advanced by calling
    what it yields, and closed when the block ends (also by an error); if not ``shown``, a
    function that does nothing."""
    if not shown:
        yield _nothing
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
              leave=False) as drawn:
        yield drawn.update


def _nothing(n: int) -> None:
    pass


def read_with_bar(read: Callable[[list], dict[str, Any]], jobs: list, what: str
                  ) -> dict[str, Any]:
    """``read(jobs)``, batch by batch under a bar titled ``what``."""
    sizes = [_leaves.nbytes(rec.origin, rec.shape, rec.dtype) for _, rec, _ in jobs]
    out: dict[str, Any] = {}
    with bar(sum(sizes), what, True) as advance:
        for batch, nbytes in _batches(jobs, sizes):
            out.update(read(batch))
            advance(nbytes)
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
