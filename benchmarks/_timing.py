"""The timing protocol for one tree.

Orbax runs in a worker process of its own and the other sides in another, for this tree only
(`_side_process`: what Orbax leaves in a process slows any Python there afterwards); this
module drives the workers from the benchmark's process and, inside a worker, times one call.
Every side runs every operation once as a warm-up (not recorded, and checked: each
restore must give back the saved values on the target's shardings, so no side is timed
doing less than the others), then `repeats` times. A smoke run (tiny trees, timings
that mean nothing) makes its one round the checked warm-up, and skips the wait for idle
CPUs below.
Within a repeat each operation is timed for all sides back to back, the side order
reversed on every other repeat, so no side always goes first (or last) after the disk
has been busy. Every save goes into a fresh directory; every checkpoint is deleted when
its repeat is done (outside the timing), except the last one of each side, which the
RSS workers restore.

Before each timed call: `gc.collect()`, `os.sync()` (so no earlier writeback or
deletion is still in flight) and a wait until the machine's CPUs are idle, and with
`cold=True` before each read, the page cache is dropped
(`echo 3 > /proc/sys/vm/drop_caches`). Without `cold`, reads come from a warm
page cache for every side alike: each side reads the checkpoint it has just written.
Before the operations that allocate about the tree's size (save, restore, save_async),
twice the tree's bytes of memory are touched and freed (`recycle_memory`), so that every
such call finds the same recently freed memory to reuse, whatever ran before it. Not
before `metadata()` and `restore_at`, which allocate little: on the VM this was written
on, touching and freeing gigabytes made the next few-millisecond call stall for ~100 ms
now and then (an at= restore of the train tree, 12 calls each way: 1-2 over 40 ms with
the recycling, 0 without), whichever side it was.

A restore is timed until every restored array is ready (`jax.block_until_ready`).
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from _side_process import SideHandle, Worker
from _sides import Side
from _trees import Subtree, subtree_near, subtree_of, tree_bytes

DROP_CACHES = "/proc/sys/vm/drop_caches"

# Operations in the order they run within a repeat; async saves report two numbers.
TIMED_OPS = ("save", "restore", "metadata", "restore_at", "save_async")
RECYCLED_OPS = ("save", "restore", "save_async")  # those that allocate about the tree's size
ISOLATED = ("orbax",)  # timed in a worker of its own (see _side_process)
ASYNC_PARTS = ("save_async_block", "save_async_total")

Runs = dict[str, dict[str, list[float]]]  # side -> operation -> seconds per repeat
Timer = Callable[[Side], dict[str, float]]  # times one operation on a side: {key: seconds}


class TreeCase(NamedTuple):
    """What every side is timed on."""

    tree: Any
    spec: Any
    subtree: Subtree | None  # restore_at is skipped without one


class Timings(NamedTuple):
    runs: Runs
    last_checkpoints: dict[str, str]  # side -> path of its last saved checkpoint


def time_sides(tree: str, smoke: bool, spec: Any, side_names: Sequence[str], repeats: int,
               workdir: str, cold: bool) -> Timings:
    """Warm up every side once, then time `repeats` alternating rounds: Orbax in a worker
    process of its own, the other sides in another (see `_side_process`); `spec` is
    `tree_spec(tree, smoke)`, which the workers build again."""
    has_subtree = subtree_near(spec) is not None
    runs: Runs = defaultdict(lambda: defaultdict(list))
    groups = [[n for n in side_names if n in ISOLATED],
              [n for n in side_names if n not in ISOLATED]]
    workers = [Worker(names, tree, smoke) for names in groups if names]  # they start together
    try:
        handles = {h.name: h for w in workers for h in w.ready()}
        sides = [handles[name] for name in side_names]
        recycle = 2 * tree_bytes(spec)
        previous_root = None
        # A smoke run's one round is its warm-up too: checked, and recorded.
        for repeat in range(0 if smoke else -1, repeats):
            print(
                f"  {workdir}: {'warm-up' if repeat < 0 else f'round {repeat + 1}/{repeats}'}",
                file=sys.stderr,
                flush=True,
            )
            order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
            root = f"{workdir}/round{repeat + 1}"
            checkpoints = _one_round(order, has_subtree, root, cold, runs, recycle,
                                     record=repeat >= 0, check=repeat < 0 or smoke)
            if previous_root:
                _remove(previous_root)
            previous_root = root
    finally:
        for worker in workers:
            worker.close()
    return Timings({k: dict(v) for k, v in runs.items()}, checkpoints)


def _one_round(
    order: list[SideHandle], has_subtree: bool, root: str, cold: bool, runs: Runs,
    recycle: int, record: bool, check: bool,
) -> dict[str, str]:
    os.makedirs(root)
    paths = {side.name: os.path.join(root, side.name) for side in order}
    for op in TIMED_OPS:
        for side in order:
            if op not in side.ops or (op == "restore_at" and not has_subtree):
                continue
            seconds = side.run(op, paths[side.name], check=check,
                               drop_cache=cold and op not in ("save", "save_async"),
                               recycle=recycle if op in RECYCLED_OPS else 0)
            for key, value in seconds.items():
                if record:
                    runs[side.name][key].append(value)
    for side in order:
        _remove(paths[side.name] + "-async")
    return paths


def run_op(side: Side, case: TreeCase, op: str, path: str, *, check: bool, recycle: int,
           drop_cache: bool, wait_idle: bool) -> dict[str, float]:
    """In a side's worker: settles, then times `op` (checking a restore's values if
    `check`); `{key: seconds}`."""
    settle(drop_cache, recycle, wait_idle)
    return _timers(case, path, check)[op](side)


def _timers(case: TreeCase, path: str, check: bool) -> dict[str, Timer]:
    """For each operation, a function timing it on one side (checking restores if `check`)."""
    subtree = case.subtree and subtree_of(case.tree, case.subtree.path)

    def checker(side: Side, expected: Any) -> Callable[[Any], None] | None:
        return (lambda restored: side.check(restored, expected)) if check else None

    return {
        "save": lambda s: {"save": _timed(s.save, case.tree, path)},
        "restore": lambda s: {
            "restore": _timed(s.restore, path, case.spec, check=checker(s, case.tree))
        },
        "metadata": lambda s: {"metadata": _timed(s.metadata, path)},
        "restore_at": lambda s: {
            "restore_at": _timed(s.restore_at, path, case.subtree, check=checker(s, subtree))
        },
        "save_async": lambda s: _timed_async(s, case.tree, path + "-async"),
    }


def _timed(fn: Callable[..., Any], *args: Any, check: Callable | None = None) -> float:
    """Seconds until `fn(*args)` is ready; `check` then sees the result, untimed."""
    start = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    seconds = time.perf_counter() - start
    if check is not None:
        check(out)
    del out  # freed outside the timing
    return seconds


def _timed_async(side: Side, tree: Any, path: str) -> dict[str, float]:
    start = time.perf_counter()
    wait = side.save_async(tree, path)
    blocked = time.perf_counter() - start
    wait()
    return {"save_async_block": blocked, "save_async_total": time.perf_counter() - start}


def settle(drop_cache: bool, recycle: int, wait_idle: bool = True) -> None:
    """What every timed call starts from (see the module's docstring). ``wait_idle=False``
    (smoke runs, whose timings mean nothing) skips the wait for idle CPUs: beside another
    busy process, as in the test suite, each wait would last its full 3 s."""
    gc.collect()
    os.sync()
    if drop_cache:
        drop_page_cache()
    recycle_memory(recycle)
    if wait_idle:
        _wait_until_idle()


def recycle_memory(nbytes: int) -> None:
    """Touches `nbytes` of memory (a byte per 4 KiB page) and frees it.

    Where touching fresh memory is slow (in a VM whose balloon hands freed pages back to
    the host: ~0.5 GiB/s, slower than the disk), a call that allocates its result is fast
    when the call before it freed as much, and slow when it did not. Measured on the big
    tree: a restore first in its round took 1.8 s, the same restore after another side's
    restore had freed its result 0.8 s; with the side order alternating, which side went
    first decided the medians. After this, every call finds the same freed memory."""
    if nbytes > 0:
        block = np.empty(nbytes, np.uint8)
        block[::4096] = 1
        del block


def _wait_until_idle(window: float = 0.1, most: float = 3.0) -> None:
    """Waits (up to `most` seconds) until the machine's CPUs are under a tenth busy over
    `window`: a side's background threads (thread pools finishing, asyncio loops winding
    down), in its worker or another, otherwise take the cores from the next timed call."""
    deadline = time.perf_counter() + most
    while time.perf_counter() < deadline:
        busy, total = _cpu_jiffies()
        time.sleep(window)
        busy2, total2 = _cpu_jiffies()
        if busy2 - busy <= (total2 - total) / 10:
            return


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def drop_page_cache() -> None:
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")


def can_drop_page_cache() -> bool:
    try:
        drop_page_cache()
    except OSError:
        return False
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
