"""Declared transforms of a restore: ``transform=[(pattern, fn), ...]``.

A rule's ``pattern`` is a regular expression matched against whole target paths
(``re.fullmatch``, on the paths after ``at`` and ``rename``); the first rule whose pattern
matches a path applies to it. ``fn`` gets the saved array as NumPy, whole, in its saved shape
and dtype, and returns the array the target leaf takes. The result is checked against the
target leaf as a saved leaf would be (its shape, and the dtype rules of ``cast``), and only
then built as the target asks: a sharded target is placed after the transform.

A transformed leaf is therefore read whole on the host, whatever the target's sharding: no
region of the target corresponds to a region of the saved layout the function sees.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _leaves, _match
from ._build import Want
from ._errors import TransformError
from ._format import LeafRecord

Transform = Sequence[tuple["str | re.Pattern[str]", Callable[[np.ndarray], Any]]]


class Rules:
    """Compiled ``transform`` rules: calling one with a target path gives the function that
    applies to it, or None."""

    def __init__(self, transform: Transform) -> None:
        if isinstance(transform, (str, bytes)) or not isinstance(transform, Sequence):
            raise TypeError(f"transform={transform!r:.100}: expected a list of "
                            "(pattern, function) pairs")
        self._rules: list[tuple[re.Pattern[str], Callable[[np.ndarray], Any]]] = []
        for rule in transform:
            if not (isinstance(rule, tuple | list) and len(rule) == 2
                    and isinstance(rule[0], str | re.Pattern) and callable(rule[1])):
                raise TypeError(f"transform rule {rule!r:.100}: expected a (pattern, function) "
                                "pair, the pattern a string or re.Pattern")
            try:
                pattern = re.compile(rule[0])
            except re.error as e:
                raise ValueError(f"transform rule {rule[0]!r:.100}: not a regular expression "
                                 f"({e})") from None
            self._rules.append((pattern, rule[1]))

    def __call__(self, path: str) -> Callable[[np.ndarray], Any] | None:
        for pattern, fn in self._rules:
            if pattern.fullmatch(path):
                return fn
        return None


def host_want(url: str, path: str, rec: LeafRecord) -> Want:
    """What to read for a transformed leaf: the whole saved array, as NumPy, as saved."""
    if rec.origin not in (_leaves.JAX, _leaves.NUMPY, _leaves.NPSCALAR):
        kind = ("a PRNG key" if rec.origin == _leaves.PRNGKEY
                else f"a Python {rec.dtype}")
        raise TransformError(f"{url}: leaf {path!r}: a transform applies to arrays; the "
                             f"checkpoint holds {kind} there")
    return Want(_leaves.NUMPY, _leaves.DTYPES[rec.dtype], rec.shape)


def apply(url: str, path: str, fn: Callable[[np.ndarray], Any], saved: np.ndarray,
          rec: LeafRecord) -> tuple[np.ndarray, LeafRecord]:
    """``fn(saved)`` as a C-contiguous NumPy array of native byte order, with a record
    describing it (what the target is checked against and built from)."""
    what = f"{_leaves.DTYPES[rec.dtype].name}{list(rec.shape)}"
    try:
        out = fn(saved)
    except Exception as e:
        raise TransformError(f"{url}: leaf {path!r}: its transform raised on the saved "
                             f"{what}: {type(e).__name__}: {e}") from e
    try:
        out = np.asarray(out)
    except Exception as e:
        raise TransformError(f"{url}: leaf {path!r}: its transform returned "
                             f"{type(out).__name__}, not an array ({e})") from e
    if not out.dtype.isnative:
        out = out.astype(out.dtype.newbyteorder("="))
    if _leaves.DTYPES.get(out.dtype.name) != out.dtype:
        raise TransformError(f"{url}: leaf {path!r}: its transform returned an array of dtype "
                             f"{out.dtype}, which is not a numeric dtype a leaf can have")
    if not out.flags.c_contiguous:  # (np.ascontiguousarray would make a 0-d array 1-d)
        out = out.copy(order="C")
    return out, rec._replace(origin=_leaves.NUMPY, dtype=out.dtype.name, shape=out.shape,
                             impl=None, sharding=None)


def check(url: str, path: str, result: LeafRecord, saved: LeafRecord, want: Want) -> bool:
    """Whether the transformed leaf is converted to the target's dtype (as ``cast``);
    :class:`TransformError` if it does not fit the target at all."""
    verdict = _match.compare(result, want)
    if verdict is None:
        found = _match.mismatch(path, result, want)
        raise TransformError(
            f"{url}: leaf {path!r}: its transform turned the saved "
            f"{saved.dtype}{list(saved.shape)} into "
            f"{found.saved_dtype}{list(found.saved_shape)}; the target is "
            f"{found.target_dtype}{list(found.target_shape)}")
    return verdict
