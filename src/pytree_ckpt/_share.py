"""Shared reads: in a multi-process restore, a region that several processes hold is read from
storage once, split among its holders, and completed over a JAX all-gather.

A replicated leaf (or one sharded along one mesh axis and replicated along another) puts the
same region on devices of several processes. Read naively, the store serves that region once
per holder. Here (:func:`plan`, pure, the same on every process: it sees every device's region
through ``devices_indices_map`` and each device's process) the chunk rows of such a region,
along its first axis that spans two chunk rows or more, are split among its holders as evenly
as whole rows allow; a region of one chunk goes whole to one holder. Each process reads its
parts through its format's usual reader (a part is a smaller region: our own ``_read``,
Orbax's zarr arrays by their chunks, safetensors tensors by rows of the leading axis), then
:meth:`Sharing.complete` fills in the rest of each region from the others' parts, in rounds of
at most about :data:`ROUND_BYTES` gathered, so host memory stays within a restore without
sharing plus one round.

Before each round's collective every process reports through the coordination service
(:func:`_distributed.exchange`, waiting on a process as long as it shows signs of life) that
its reads so far succeeded and that its plan is the others' (a digest). A process whose read
failed reports that and raises its own error; the others raise a ``DistributedError`` naming
it, rather than wait in a collective that would never complete.

Bytes travel as bytes (``uint8``): bool, sub-byte and 16-bit floats arrive bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from . import _distributed, _leaves, _options
from ._build import Job, aligned_empty
from ._format import LeafRecord

Key = tuple[tuple[int, int], ...]  # a region: (start, stop) per axis

# The bytes one round gathers, from all processes together; each process sends up to
# ROUND_BYTES // processes (at least _MIN_SEND) in it. A large leaf then takes several
# smaller all-gathers, which took less time in all than one large one (see README,
# Performance, "Shared reads").
ROUND_BYTES = 16 << 20
_MIN_SEND = 256 << 10

_restores = itertools.count()  # names each sharing read's meetings; advances on every process


class Piece(NamedTuple):
    """A part of a shared region that one process reads and sends to the region's other
    holders."""

    job: int  # the leaf, by its place among the jobs
    key: Key  # the region
    part: Key  # what ``reader`` reads of it
    reader: int
    holders: tuple[int, ...]  # the processes that hold the region, ``reader`` among them
    nbytes: int


class Leaf(NamedTuple):
    """What :func:`plan` needs of one leaf."""

    holders: dict[Key, tuple[int, ...]]  # region -> the processes holding it
    chunks: tuple[int, ...]
    itemsize: int


class Plan(NamedTuple):
    """Which parts this process reads, and the rounds that complete the shared regions."""

    reads: dict[tuple[int, Key], list[Key]]  # (job, region) -> this process's parts
    rounds: list[list[tuple[Piece, int]]]  # each piece with its offset in its reader's send
    width: list[int]  # per round: the bytes each process sends (the largest need)


def holders(sharding: Any, shape: tuple[int, ...],
            process_of: Callable[[Any], int] = lambda d: d.process_index
            ) -> dict[Key, tuple[int, ...]]:
    """Each region of ``sharding`` over ``shape`` (every device's, not only this process's)
    with the processes that hold it, in ascending order."""
    found: dict[Key, set[int]] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        index = tuple(index) if index is not None else tuple(slice(None) for _ in shape)
        key = tuple((s.start or 0, d if s.stop is None else s.stop)
                    for s, d in zip(index, shape, strict=True))
        found.setdefault(key, set()).add(process_of(device))
    return {key: tuple(sorted(procs)) for key, procs in sorted(found.items())}


def plan(leaves: Sequence[Leaf], me: int, send_most: int) -> Plan:
    """The plan, identical on every process: ``leaves`` in job order, ``me`` this process,
    ``send_most`` the bytes a process sends per round (a piece of one chunk row larger than
    that is the only one its reader sends in its round; other readers' pieces go beside it,
    as the round's gather is that wide anyway)."""
    reads: dict[tuple[int, Key], list[Key]] = {}
    pieces: list[Piece] = []
    for job, leaf in enumerate(leaves):
        for salt, (key, procs) in enumerate(leaf.holders.items()):
            nbytes = leaf.itemsize * math.prod(b - a for a, b in key)
            if len(procs) < 2 or nbytes == 0:
                continue  # held once (read as it is), or nothing to read
            per_holder = [
                [Piece(job, key, sub, proc, procs, leaf.itemsize * math.prod(b - a for a, b in sub))
                 for sub in _cut(part, leaf.chunks, leaf.itemsize, send_most)]
                for proc, part in _shares(key, leaf.chunks, procs, job + salt)]
            # Interleaved by holder, so that a round carries every holder's share at once.
            for piece in itertools.chain.from_iterable(itertools.zip_longest(*per_holder)):
                if piece is not None:
                    pieces.append(piece)
            if me in procs:
                reads[(job, key)] = [p.part for ps in per_holder for p in ps if p.reader == me]
    rounds: list[list[tuple[Piece, int]]] = []
    width: list[int] = []
    loads: dict[int, int] = {}
    for piece in pieces:
        offset = loads.get(piece.reader, 0)
        if not rounds or (offset and offset + piece.nbytes > send_most):
            rounds.append([])
            width.append(0)
            loads, offset = {}, 0
        rounds[-1].append((piece, offset))
        loads[piece.reader] = offset + piece.nbytes
        width[-1] = max(width[-1], loads[piece.reader])
    return Plan(reads, rounds, width)


def _rows(a: int, b: int, c: int) -> list[int]:
    """The chunk-row boundaries of [a, b) on a grid of ``c``: a, the multiples of c inside, b."""
    return [a, *range((a // c + 1) * c, b, c), b] if b > a else [a, b]


def _shares(key: Key, chunks: tuple[int, ...], procs: tuple[int, ...], salt: int
            ) -> list[tuple[int, Key]]:
    """``key``'s chunk rows split among ``procs`` along its first axis of two rows or more,
    in runs that differ by at most one row (the later holders get the longer ones); a
    region of one chunk row goes whole to one holder, chosen by ``salt``."""
    for axis, ((a, b), c) in enumerate(zip(key, chunks, strict=True)):
        cuts = _rows(a, b, c)
        n = len(cuts) - 1
        if n >= 2:
            out = []
            for i, proc in enumerate(procs):
                lo, hi = i * n // len(procs), (i + 1) * n // len(procs)
                if lo < hi:
                    out.append((proc, (*key[:axis], (cuts[lo], cuts[hi]), *key[axis + 1:])))
            return out
    return [(procs[salt % len(procs)], key)]


def _cut(part: Key, chunks: tuple[int, ...], itemsize: int, most: int) -> list[Key]:
    """``part`` cut into pieces of whole chunk rows of at most ``most`` bytes where one row
    fits (else one row each), along its first axis of two rows or more."""
    for axis, ((a, b), c) in enumerate(zip(part, chunks, strict=True)):
        cuts = _rows(a, b, c)
        if len(cuts) - 1 >= 2:
            other = itemsize * math.prod(y - x for i, (x, y) in enumerate(part) if i != axis)
            out, lo = [], 0
            while lo < len(cuts) - 1:
                hi = lo + 1
                while hi < len(cuts) - 1 and (cuts[hi + 1] - cuts[lo]) * other <= most:
                    hi += 1
                out.append((*part[:axis], (cuts[lo], cuts[hi]), *part[axis + 1:]))
                lo = hi
            return out
    return [part]


def local(part: Key, key: Key) -> tuple[slice, ...]:
    """Where ``part`` lies in the buffer of its region ``key``."""
    return tuple(slice(x - a, y - a) for (x, y), (a, _b) in zip(part, key, strict=True))


Grid = Callable[[LeafRecord], tuple[tuple[int, ...], int]]


def zarr_grid(rec: LeafRecord) -> tuple[tuple[int, ...], int]:
    """A :data:`Grid` for our own format's zarr leaves: their chunks and stored itemsize."""
    return rec.storage.chunks, _leaves.DTYPES[rec.storage.stored_dtype].itemsize


def plan_reads(jobs: list[Job], grid: Grid, remote: bool, share: bool | None,
               send_most: int | None = None) -> Sharing | Alone:
    """How ``jobs`` (every one read from storage) are read: a :class:`Sharing`, or
    :data:`ALONE` where restore does not share: ``share`` (restore's ``share_reads``) False,
    or None and not ``remote`` (from a local disk the all-gather over gloo cost more than
    the reads it saved: see README); one process; or no region held by two processes.

    ``grid`` gives each leaf's chunk shape (its rows are what holders split; a format
    without chunks names the rows it can read alone) and the itemsize of the buffers its
    reader fills (the bytes gathered)."""
    if not (remote if share is None else share) or not _distributed.is_multiprocess():
        return ALONE
    count = _distributed.process_count()
    if send_most is None:
        send_most = max(ROUND_BYTES // count, _MIN_SEND)
    cache: dict[Any, dict[Key, tuple[int, ...]]] = {}
    leaves = []
    for _path, rec, want in jobs:
        found: dict[Key, tuple[int, ...]] | None = {}
        if want.kind == _leaves.JAX and not isinstance(want.sharding,
                                                      jax.sharding.SingleDeviceSharding):
            try:
                found = cache.get((want.sharding, rec.shape))
                if found is None:
                    found = cache[(want.sharding, rec.shape)] = holders(want.sharding, rec.shape)
            except TypeError:  # an unhashable sharding
                found = holders(want.sharding, rec.shape)
        leaves.append(Leaf(found or {}, *grid(rec)))
    the_plan = plan(leaves, _distributed.process_index(), send_most)
    if not the_plan.rounds:
        return ALONE
    return Sharing(the_plan, _distributed.process_index(), count)


class Alone:
    """Reads not shared: :class:`Sharing`'s interface, where each region is read whole by
    every process that holds it."""

    def parts(self, job: int, key: Key) -> list[Key]:
        return [key]

    def guard(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def complete(self, leaves: Iterable[tuple]) -> Iterator[tuple]:
        return iter(leaves)


ALONE = Alone()


class Sharing:
    """One restore's shared reads: :attr:`parts` for the reader, :meth:`complete` around its
    leaves, all inside :meth:`guard`."""

    def __init__(self, the_plan: Plan, me: int, count: int) -> None:
        self._plan, self._me, self._count = the_plan, me, count
        self._name = f"restore/{next(_restores)}"
        self._next = 0  # the next round to run
        self._digest = hashlib.sha256(repr(the_plan.rounds).encode()).hexdigest()[:16]
        self._liveness = _options.get("liveness_timeout_s")

    def parts(self, job: int, key: Key) -> list[Key]:
        """What this process reads of region ``key`` of job ``job``."""
        return self._plan.reads.get((job, key), [key])

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Shows the others that this process is alive; on an error, reports it at the next
        round (so that the others raise instead of waiting) and lets it through."""
        with _distributed.alive(self._liveness):
            try:
                yield
            except BaseException as e:
                if self._next < len(self._plan.rounds):
                    with contextlib.suppress(_distributed.DistributedError):
                        self._agree(f"{type(e).__name__}: {e}")
                raise

    def _agree(self, error: str | None) -> None:
        values = _distributed.exchange(f"{self._name}/{self._next}", self._digest, error,
                                       self._liveness, liveness_s=self._liveness)
        if len(set(values)) > 1:
            others = [p for p, v in enumerate(values) if v != self._digest]
            raise _distributed.DistributedError(
                f"restore: process(es) {', '.join(map(str, others))} planned other shared "
                f"reads than process {self._me}: every process must restore the same target "
                "(paths, shapes, shardings)")

    def complete(self, leaves: Iterable[tuple]) -> Iterator[tuple]:
        """``leaves`` (``(path, rec, want, regions)`` per job, in job order; ``regions``
        maps each region to its C-contiguous buffer, this process's parts read) with every
        shared region filled in, each yielded once its last round has run."""
        rounds = self._plan.rounds
        need = [max(p.job for p, _o in r) for r in rounds]  # read up to this job first
        last: dict[int, int] = {}  # job -> the last round it takes part in here
        for i, r in enumerate(rounds):
            for piece, _o in r:
                if self._me in piece.holders:
                    last[piece.job] = i
        held: dict[int, tuple] = {}
        for job, leaf in enumerate(leaves):
            held[job] = leaf
            while self._next < len(rounds) and need[self._next] <= job:
                self._round(held)
            for j in [j for j in held if last.get(j, -1) < self._next]:
                yield held.pop(j)
        while self._next < len(rounds):  # rounds past the last leaf: none in a sound plan
            self._round(held)
        yield from held.values()

    def _round(self, held: dict[int, tuple]) -> None:
        i = self._next
        self._agree(None)
        pieces, width = self._plan.rounds[i], self._plan.width[i]
        send = aligned_empty((width,), np.dtype(np.uint8))
        for piece, offset in pieces:
            if piece.reader == self._me:
                buf = held[piece.job][3][piece.key]
                send[offset:offset + piece.nbytes] = _bytes(buf[(*local(piece.part, piece.key), ...)])
        got = _all_gather(send, self._count)
        for piece, offset in pieces:
            if piece.reader != self._me and self._me in piece.holders:
                buf = held[piece.job][3][piece.key]
                target = buf[(*local(piece.part, piece.key), ...)]
                _bytes_view(target)[...] = got[piece.reader, offset:offset + piece.nbytes
                                                ].reshape(_bytes_view(target).shape)
        self._next += 1


def _bytes(a: np.ndarray) -> np.ndarray:
    """``a``'s bytes, flat, in C order."""
    return np.ascontiguousarray(a).view(np.uint8).reshape(-1)


def _bytes_view(a: np.ndarray) -> np.ndarray:
    """``a`` (a part of a C-contiguous buffer) seen as bytes: its last axis times itemsize."""
    if a.ndim == 0:
        return a.reshape(1).view(np.uint8)
    return a.view(np.uint8)


@functools.cache
def _gather_fn(count: int) -> tuple[Any, Any, Any]:
    """The first device of each process, a sharding putting one row on each, and a jitted
    identity whose replicated output is the all-gather."""
    firsts: dict[int, Any] = {}
    for device in jax.devices():
        firsts.setdefault(device.process_index, device)
    mesh = jax.sharding.Mesh(np.array([firsts[p] for p in range(count)]), ("p",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("p"))
    everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return firsts[jax.process_index()], rows, jax.jit(lambda x: x, out_shardings=everywhere)


def _all_gather(send: np.ndarray, count: int) -> np.ndarray:
    """Every process's ``send`` (all of one width), as rows ``(count, width)``."""
    device, rows, gather = _gather_fn(count)
    mine = jax.device_put(send[None], device)
    whole = jax.make_array_from_single_device_arrays((count, send.size), rows, [mine])
    return np.asarray(gather(whole).addressable_data(0))
