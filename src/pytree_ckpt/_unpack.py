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

