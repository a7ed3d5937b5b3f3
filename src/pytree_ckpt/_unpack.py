"""Unpacking untrusted msgpack bytes (a commit file's) within explicit limits on what it
builds, so that a small forged file cannot make the unpacker allocate far more than its size.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from ._errors import CorruptCheckpointError


class _Budget:
    """Counts what msgpack builds for containers, as ``list_hook`` and ``object_pairs_hook``,
    and stops the unpacking once that passes ``limit`` bytes.

    msgpack's ``max_*_len`` limits bound each container by the bytes there, but a one-byte
    empty array becomes a 56-byte list plus its slot in the parent: a file of empty arrays
    would cost many times its size before validation could refuse it. Containers are the only such
    amplification (a string costs its bytes plus ~50, as a path does in any commit file)."""

    def __init__(self, limit: int):
        self.left = limit

    def spend(self, size: int) -> None:
        self.left -= 64 + 8 * size  # the object and its slot, roughly
        if self.left < 0:
            raise ValueError("more containers than a commit file of this size can hold")

    def list(self, items: list) -> list:
        self.spend(len(items))
        return items

    def map(self, pairs: list) -> dict:
        self.spend(2 * len(pairs))
        return dict(pairs)


class Limits(NamedTuple):
    """What unpacking one msgpack value may build: the longest array and map (msgpack
    allocates a container of the declared length before reading its items) and, in bytes,
    all containers together (see :class:`_Budget`)."""

    array: int
    map: int
    containers: int


def unpack(data: bytes, where: str, limits: Limits) -> Any:
    """``data`` unpacked within ``limits``, or a CorruptCheckpointError. Explicit limits: the
    commit file is untrusted, and msgpack would otherwise size its containers from declared
    lengths."""
    limit = len(data)
    budget = _Budget(limits.containers)
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_str_len=limit, max_bin_len=limit,
            max_array_len=limits.array, max_map_len=limits.map, max_ext_len=0,
            list_hook=budget.list, object_pairs_hook=budget.map,
        )
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise CorruptCheckpointError(f"{where}: not a valid commit file ({e})") from None


# msgpack type bytes -> (bytes of length field, fixed bytes after it) for strings, binaries,
# extension types and numbers (containers and single-byte values are handled apart).
_SIZED = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),
          0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}
_FIXED = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4,
          0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}


def count_values(data: bytes, limit: int) -> int:
    """How many values the first msgpack value of ``data`` holds (itself, every container's
    items, a map's keys), without building any: ValueError once there are more than
    ``limit``, or for bytes that are not msgpack. Strings, binaries and extension types are
    skipped by their length, so the cost is that of the values counted, at most ``limit``:
    a file of one-byte values is refused before any Python object is made for it."""
    pos, left, count, end = 0, 1, 0, len(data)
    while left:
        if pos >= end:
            raise ValueError("truncated msgpack data")
        b = data[pos]
        pos += 1
        left -= 1
        count += 1
        if count > limit:
            raise ValueError(f"more than {limit} values")
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            continue
        if 0x80 <= b <= 0x9F:  # fixmap, fixarray
            left += (b & 0x0F) * (2 if b <= 0x8F else 1)
        elif 0xA0 <= b <= 0xBF:  # fixstr
            pos += b & 0x1F
        elif b in _FIXED:
            pos += _FIXED[b]
        elif b in _SIZED:
            width, extra = _SIZED[b]
            pos += width + extra + int.from_bytes(data[pos:pos + width], "big")
        elif b in _CONTAINERS:
            width, per_item = _CONTAINERS[b]
            left += per_item * int.from_bytes(data[pos:pos + width], "big")
            pos += width
        else:
            raise ValueError(f"byte 0x{b:02x} starts no msgpack value")
    return count
