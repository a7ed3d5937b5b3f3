"""A commit file body's leaves as one record per leaf, and back: for forging commit files.

The format stores leaves by column (see ``pytree_ckpt._format``); a forgery is easier to
write and to read as a change to one leaf's record::

    [path, origin, dtype, shape, impl, storage, sharding, weak]

with ``storage`` one of ``["v", value]``, ``["z", array, chunks, stored_dtype]`` or
``["p", blob, offset, crc]``. :func:`to_rows` reads a body's columns into such records;
:func:`from_rows` writes records back as columns. A forged value that a column cannot hold
(a string as a dimension, an offset past 64 bits, a deep list as a shape) becomes that whole
column instead, so the reader still receives it, where it can do the most harm.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from pytree_ckpt import _format

FIELDS = {"path": 0, "origin": 1, "dtype": 2, "shape": 3, "impl": 4, "storage": 5,
          "sharding": 6, "weak": 7}
_KINDS = ("v", "z", "p")


def _col(body: dict, key: str, fmt: str) -> list:
    return np.frombuffer(body[key], fmt).tolist()


def _runs(flat: list, lengths: list[int]) -> list[list]:
    out, at = [], 0
    for n in lengths:
        out.append(flat[at:at + n])
        at += n
    return out


def to_rows(body: dict) -> list[list]:
    """The body's leaves as ``[path, origin, dtype, shape, impl, storage, sharding, weak]``
    (``weak`` 0 in formats without the column)."""
    dtypes, impls, shardings = body["dtypes"], body["impls"], body["shardings"]
    ranks = _col(body, "rank", "u1")
    shapes = _runs(_col(body, "shape", "<i8"), ranks)
    kinds = _col(body, "storage", "u1")
    values = iter(body["values"])
    arrays, stored = iter(_col(body, "array", "<u4")), iter(_col(body, "stored", "u1"))
    z_ranks = [r for r, k in zip(ranks, kinds, strict=True) if k == 1]
    chunks = iter(_runs(_col(body, "chunks", "<i8"), z_ranks))
    blobs, offsets = iter(_col(body, "blob", "<u4")), iter(_col(body, "offset", "<i8"))
    crcs = iter(_col(body, "crc", "<u4"))
    origins, codes = _col(body, "origin", "u1"), _col(body, "dtype", "u1")
    impl_codes, sharding_codes = _col(body, "impl", "u1"), _col(body, "sharding", "<u4")
    weak = _col(body, "weak", "u1") if "weak" in body else [0] * len(body["paths"])
    rows = []
    for i, path in enumerate(body["paths"]):
        kind = _KINDS[kinds[i]]
        if kind == "v":
            storage = ["v", next(values)]
        elif kind == "z":
            storage = ["z", next(arrays), next(chunks), dtypes[next(stored)]]
        else:
            storage = ["p", next(blobs), next(offsets), next(crcs)]
        impl, sharding = impl_codes[i], sharding_codes[i]
        rows.append([path, _format.ORIGINS[origins[i]], dtypes[codes[i]], shapes[i],
                     impls[impl - 1] if impl else None, storage,
                     copy.deepcopy(shardings[sharding - 1]) if sharding else None, weak[i]])
    return rows


class _Table:
    """Distinct values (any msgpack value, hashable or not) and their indices."""

    def __init__(self) -> None:
        self.items: list = []

    def __call__(self, value: Any) -> int:
        for i, item in enumerate(self.items):
            if type(item) is type(value) and item == value:
                return i
        self.items.append(value)
        return len(self.items) - 1


def _column(values: list, fmt: str) -> Any:
    """Packed values, or the first value that does not fit (the forgery goes in whole)."""
    info = np.iinfo(np.dtype(fmt))
    for v in values:
        if type(v) is not int or not info.min <= v <= info.max:
            return v
    return np.asarray(values, dtype=fmt).tobytes()


def from_rows(body: dict, rows: list[list]) -> dict:
    """A copy of ``body`` whose leaves are ``rows``; other fields are kept as they are."""
    dtypes, impls, shardings = _Table(), _Table(), _Table()
    cols: dict[str, list] = {k: [] for k in (
        "paths", "origin", "dtype", "rank", "shape", "storage", "values", "array", "chunks",
        "stored", "blob", "offset", "crc", "impl", "sharding", "weak")}
    whole: dict[str, Any] = {}  # columns replaced by a forged value that no column holds
    for path, origin, dtype, shape, impl, storage, sharding, weak in rows:
        cols["paths"].append(path)
        cols["origin"].append(_format.ORIGINS.index(origin) if origin in _format.ORIGINS
                              else 200)
        cols["dtype"].append(dtypes(dtype))
        if type(shape) is list:
            cols["rank"].append(len(shape))
            cols["shape"] += shape
        else:
            cols["rank"].append(0)
            whole["shape"] = shape
        kind = storage[0] if type(storage) is list and storage else None
        cols["storage"].append(_KINDS.index(kind) if kind in _KINDS else 200)
        if kind == "v":
            cols["values"].append(storage[1] if len(storage) > 1 else None)
        elif kind == "z":
            cols["array"].append(storage[1])
            cols["chunks"] += storage[2] if type(storage[2]) is list else [storage[2]]
            cols["stored"].append(dtypes(storage[3]))
        elif kind == "p":
            cols["blob"].append(storage[1])
            cols["offset"].append(storage[2])
            cols["crc"].append(storage[3])
        cols["impl"].append(0 if impl is None else impls(impl) + 1)
        cols["sharding"].append(0 if sharding is None else shardings(sharding) + 1)
        cols["weak"].append(weak)
    out = copy.deepcopy(body)
    formats = {"origin": "u1", "dtype": "u1", "rank": "u1", "shape": "<i8", "storage": "u1",
               "array": "<u4", "chunks": "<i8", "stored": "u1", "blob": "<u4",
               "offset": "<i8", "crc": "<u4", "impl": "u1", "sharding": "<u4", "weak": "u1"}
    if "weak" not in body:  # a format without the column
        del cols["weak"]
    for key, values in cols.items():
        out[key] = _column(values, formats[key]) if key in formats else values
    out.update(whole)
    out["dtypes"], out["impls"], out["shardings"] = dtypes.items, impls.items, shardings.items
    return out


def set_field(body: dict, path: str, field: str, value: Any) -> dict:
    """A copy of ``body`` with one field of the leaf at ``path`` replaced."""
    rows = to_rows(body)
    (row,) = [r for r in rows if r[0] == path]
    row[FIELDS[field]] = value
    return from_rows(body, rows)
