"""Multi-process plumbing: who we are, and how processes agree with each other.

This is the only module that touches JAX's private coordination-service client
(``jax._src.distributed.global_state.client``). Everything else in the library asks
for what it needs through the functions here, so when JAX moves that client only
this file changes.

Why the coordination service and not a collective: a checkpoint is written and
committed on a background thread, while the main thread may be running jitted
steps with collectives of their own. The service's barriers and key-value store are
plain RPCs to process 0; they release the GIL, are safe from any thread, and cannot
interleave with (or deadlock against) the program's collectives.

Verified on jax 0.10.2 (``jaxlib._jax.DistributedRuntimeClient``)::

    wait_at_barrier(barrier_id: str, timeout_in_ms: int, process_ids: Sequence[int] | None = None)
    key_value_set(key: str, value: str, allow_overwrite: bool = False)
    blocking_key_value_get(key: str, timeout_in_ms: int) -> str
    key_value_try_get(key: str) -> str            # raises NOT_FOUND
    key_value_dir_get(key: str) -> list[tuple[str, str]]

Failures come back as ``jax.errors.JaxRuntimeError`` whose message starts with the
gRPC status, e.g. ``DEADLINE_EXCEEDED: Barrier timed out ...``.

Facts that shape the functions below (measured on jax 0.10.2, CPU, loopback):

- A process that dies is only noticed by the service after
  ``heartbeat_timeout_seconds`` (``jax.distributed.initialize``, 100 s by default);
  then JAX *terminates every other process* (a fatal log in the client, not an
  exception), whatever we do. A timeout given here turns a dead process into a
  `DistributedError` on the survivors only if it is shorter than that; a process that
  hangs (alive, heartbeating) is caught by our timeout alone.
- There is no non-blocking liveness probe: ``get_live_nodes`` is itself a barrier
  over the live processes and, with one dead, waits out the heartbeat timeout.
- A timed-out barrier or get does not poison the service: later calls work.
- Barrier and key names are global to the job. Every name used here is put under
  ``pytree_ckpt/`` and must be unique per operation: a save's first meeting is named by
  a counter that every call advances on every process (a failed call meets too), and its
  later ones by the save id the primary chose there (e.g. ``f"save/{id}/written"``).
- A process taking part in a save publishes a heartbeat (:func:`alive`), so the others
  wait for one that is slow and alive, and give up promptly on one that died.
- Keys are never deleted (no process can tell when the last reader is done): each
  `exchange` leaves one short key per process in the service's memory, each
  `broadcast_str` one key; the heartbeat is one key per process, overwritten.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax

from ._errors import DistributedError

__all__ = [
    "DistributedError",
    "alive",
    "broadcast_str",
    "exchange",
    "gather_str",
    "is_multiprocess",
    "process_count",
    "process_index",
    "report_and_check",
]

# Everything this module puts in the service lives under this prefix, so it cannot
# collide with JAX's own keys or another library's (Orbax uses its own prefixes).
_PREFIX = "pytree_ckpt/"

# Report values published by `report_and_check`.
_OK = "ok"
_FAILED = "failed:"


def process_index() -> int:
    """This process's index, ``0 <= process_index() < process_count()``.

    ``jax.process_index()``: 0 without ``jax.distributed``. Like every JAX call it
    starts the backend, after which ``jax.distributed.initialize`` can no longer run.
    """
    return jax.process_index()


def process_count() -> int:
    """How many processes share the job (1 without ``jax.distributed``)."""
    return jax.process_count()


def is_multiprocess() -> bool:
    """Whether other processes take part: the functions below then talk to them."""
    return process_count() > 1


def broadcast_str(name: str, value: str | None, timeout_s: float) -> str:
    """Return process 0's `value` on every process.

    **Arguments:**

    - `name`: unique per broadcast, the same on every process.
    - `value`: what to publish; required on process 0, ignored elsewhere.
    - `timeout_s`: how long the other processes wait for process 0 to publish.

    **Returns:** process 0's `value`.

    **Raises:**

    - `ValueError`: `value` is None on process 0.
    - `DistributedError`: process 0 did not publish within `timeout_s`, or the
      service failed.
    """
    client, me, count = _job()
    key = f"{_PREFIX}{name}/value"
    if me == 0:
        if value is None:
            raise ValueError("broadcast_str: process 0 must pass a value to broadcast, got None.")
        if count > 1:
            try:
                client.key_value_set(key, value)
            except jax.errors.JaxRuntimeError as e:
                raise _service_error(f"broadcast {name!r}", me, e) from e
        return value
    try:
        return client.blocking_key_value_get(key, _to_ms(timeout_s))
    except jax.errors.JaxRuntimeError as e:
        if _is_timeout(e):
            raise DistributedError(
                f"Broadcast {name!r}: process 0 did not publish a value within "
                f"{timeout_s:g} s (process {me} waited); it may have failed or crashed."
            ) from e
        raise _service_error(f"broadcast {name!r}", me, e) from e


def gather_str(name: str, value: str, timeout_s: float) -> list[str] | None:
    """Every process's ``value``, in process order, on process 0; None elsewhere.

    The primary uses it to collect what only the writers know (the checksums and offsets
    of each process's packed leaves) before it writes the commit file.

    **Raises:** `DistributedError`: a process did not publish within `timeout_s`.
    """
    client, me, count = _job()
    if count == 1:
        return [value]
    prefix = f"{_PREFIX}{name}/gather/"
    try:
        client.key_value_set(prefix + str(me), value)
    except jax.errors.JaxRuntimeError as e:
        raise _service_error(f"gather {name!r}", me, e) from e
    if me != 0:
        return None
    values, deadline = [], time.monotonic() + timeout_s
    for other in range(count):
        try:
            values.append(value if other == me else client.blocking_key_value_get(
                prefix + str(other), _to_ms(max(deadline - time.monotonic(), 0.001))))
        except jax.errors.JaxRuntimeError as e:
            raise DistributedError(
                f"Gather {name!r}: process {other} did not publish within {timeout_s:g} s "
                f"(process 0 waited); it may have failed or crashed. Service said: {e}"
            ) from e
    return values


def forget(names: list[str]) -> None:
    """Deletes every key of the meetings ``names`` (each with all the keys below it), on
    process 0 only; call it once every process is known to have left those meetings (a
    later meeting they all reported in). The coordination service keeps every key until
    the job ends: a save's meetings would otherwise grow process 0's memory for the whole
    job. Best effort: a key left behind costs memory, not correctness."""
    client, me, count = _job()
    if count == 1 or me != 0:
        return
    for name in names:
        try:
            client.key_value_delete(f"{_PREFIX}{name}")
        except jax.errors.JaxRuntimeError:
            pass


def report_and_check(name: str, error: str | None, timeout_s: float,
                     liveness_s: float | None = None) -> None:
    """Publish whether this process's part succeeded, then check everyone's.

    Every process must call this, whether its part failed or not: a process that
    raises instead of reporting makes every other process wait for it. It returns only
    once all processes have reported success, so it is also a barrier. (It is
    :func:`exchange` with nothing to exchange.)

    A save uses it twice, so that every process learns the outcome of the commit::

        error = None
        try:
            write_my_shards()
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        report_and_check(f"save/{n}/written", error, timeout_s)  # raises everywhere
        error = None
        if process_index() == 0:
            try:
                write_commit_file()
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        report_and_check(f"save/{n}/committed", error, timeout_s)

    **Arguments and raises:** as :func:`exchange`.
    """
    exchange(name, "", error, timeout_s, liveness_s)


def exchange(name: str, value: str, error: str | None, timeout_s: float,
             liveness_s: float | None = None) -> list[str]:
    """Publish this process's ``value`` (or that its part failed), then read everyone's.

    On giving up waiting, this process overwrites its own report with a failure before
    raising, so a process that reports late sees the failure instead of going on alone.

    **Arguments:**

    - `name`: unique per meeting, the same on every process.
    - `value`: what the others get from this process (a short string).
    - `error`: None if this process's part succeeded, else a message saying what failed
      (cut to its first 4000 characters, to keep the RPC small).
    - `timeout_s`: how long to wait for the other processes' reports; keep it below
      ``jax.distributed``'s heartbeat timeout (see the module docstring).
    - `liveness_s`: instead of `timeout_s`, wait for each process as long as it shows
      signs of life (:func:`alive`), and count it gone once it has shown none for this
      long: a slow but healthy process is waited for, a dead one noticed promptly.

    **Returns:** every process's `value`, in process order.

    **Raises:**

    - `DistributedError`: some process reported an error, or was given up on; the
      message names each such process and its message. Raised on every process,
      including the one that failed.
    """
    client, me, count = _job()
    own = _OK + value if error is None else _FAILED + _shorten(error)
    if count == 1:
        _raise_if_failed(name, me, {me: own}, missing=(), why="")
        return [value]
    prefix = f"{_PREFIX}{name}/report/"
    try:
        client.key_value_set(prefix + str(me), own)
    except jax.errors.JaxRuntimeError as e:
        raise _service_error(f"report {name!r}", me, e) from e

    reports = {me: own}
    deadline = time.monotonic() + timeout_s
    for other in range(count):
        if other == me:
            continue
        got = _wait_for(client, prefix + str(other), other, deadline, liveness_s)
        if got is None:
            break
        reports[other] = got
    if len(reports) < count:
        # Gave up on one process: read all reports present now, so the error names
        # every missing process, not just the first one waited for.
        try:
            for key, report in client.key_value_dir_get(prefix):
                reports.setdefault(int(key.rsplit("/", 1)[1]), report)
        except jax.errors.JaxRuntimeError as e:
            raise _service_error(f"report {name!r}", me, e) from e
    missing = tuple(p for p in range(count) if p not in reports)
    waited = (f"showed no sign of life for {liveness_s:g} s" if liveness_s is not None
              else f"did not report within {timeout_s:g} s")
    if missing and error is None:
        # Best effort, for a process that is late rather than dead: it must not read
        # "ok" from us and carry on (e.g. write a commit file) after we gave up.
        gave_up = (f"gave up waiting for process(es) {_join(missing)}, which "
                   f"{waited}" if liveness_s is not None else
                   f"gave up waiting for process(es) {_join(missing)} after {timeout_s:g} s")
        try:
            client.key_value_set(prefix + str(me), _FAILED + gave_up, allow_overwrite=True)
        except jax.errors.JaxRuntimeError:
            pass  # we raise below anyway; the service's own failure is not the story
    _raise_if_failed(name, me, reports, missing=missing,
                     why=f"{waited} (crashed, hung, or too slow)")
    return [reports[p][len(_OK):] for p in range(count)]


def _wait_for(client: Any, key: str, process: int, deadline: float,
              liveness_s: float | None) -> str | None:
    """``key``'s value once ``process`` publishes it; None once given up on (past
    ``deadline``, or, with ``liveness_s``, that long without a new heartbeat)."""
    beat, since = None, time.monotonic()
    while True:
        step = (deadline - time.monotonic() if liveness_s is None
                else min(1.0, liveness_s / 4))
        if step <= 0:
            return None
        try:
            return client.blocking_key_value_get(key, _to_ms(step))
        except jax.errors.JaxRuntimeError as e:
            if not _is_timeout(e):
                raise _service_error(f"waiting for {key!r}", process, e) from e
        if liveness_s is not None:
            now = _heartbeat(client, process)
            if now != beat:
                beat, since = now, time.monotonic()
            elif time.monotonic() - since > liveness_s:
                return None


def _heartbeat(client: Any, process: int) -> str | None:
    try:
        return client.key_value_try_get(f"{_PREFIX}alive/{process}")
    except jax.errors.JaxRuntimeError:
        return None  # not published yet


_beats = itertools.count()  # every beat's value differs from the last, across saves


@contextlib.contextmanager
def alive(liveness_s: float) -> Iterator[None]:
    """While the block runs, shows the other processes that this one is alive: a beat
    every ``liveness_s / 5`` from a thread of its own (whatever the block is waiting
    for), which :func:`exchange` with ``liveness_s`` watches. A no-op in one process."""
    client, me, count = _job()
    if count == 1:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                client.key_value_set(f"{_PREFIX}alive/{me}", str(next(_beats)),
                                     allow_overwrite=True)
            except jax.errors.JaxRuntimeError:
                pass  # the service's trouble shows in the exchange itself
            if stop.wait(liveness_s / 5):
                return

    thread = threading.Thread(target=beat, name="pytree_ckpt heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _raise_if_failed(
    name: str, me: int, reports: dict[int, str], *, missing: tuple[int, ...], why: str
) -> None:
    failed = {p: v[len(_FAILED) :] for p, v in sorted(reports.items()) if v.startswith(_FAILED)}
    if not failed and not missing:
        return
    problems = [f"process {p} failed: {msg}" for p, msg in failed.items()]
    if missing:
        problems.append(f"process(es) {_join(missing)} {why}")
    bad = sorted([*failed, *missing])
    raise DistributedError(
        f"{name!r} failed on process(es) {_join(bad)} (seen from process {me}): "
        + "; ".join(problems)
    )


def _job() -> tuple[Any, int, int]:
    """(client, this process's id, process count), as the coordination service knows them.

    Read from ``jax.distributed``'s state rather than ``jax.process_index()``: that
    would initialize the backend, which itself waits for every process to join, so a
    process that died before its first JAX call would hang the others there instead of
    letting our timeouts fire. (The two numberings agree: JAX derives the backend's
    process index from this id.)
    """
    # Imported here, not at module level: it is private and may move; failing only when
    # a job needs it keeps importing this module cheap and safe.
    from jax._src.distributed import global_state

    client = global_state.client
    if client is None:
        # Without the service there is nothing to synchronize through; that is only
        # right if this really is the only process (checked, so that a multi-host job
        # set up some other way cannot silently act as N independent primaries).
        if jax.process_count() > 1:
            raise DistributedError(
                f"JAX reports {jax.process_count()} processes but jax.distributed is not "
                "initialized, so there is no coordination service to synchronize "
                "through. Call jax.distributed.initialize() first."
            )
        return None, 0, 1
    return client, global_state.process_id, global_state.num_processes


def _to_ms(timeout_s: float) -> int:
    # The client takes whole milliseconds; round up so a positive timeout never
    # becomes 0.
    return max(1, math.ceil(timeout_s * 1000))


def _shorten(message: str, limit: int = 4000) -> str:
    # A report travels in one RPC; an exception with a huge repr must not make the
    # report itself fail (the others would then see a timeout instead of the cause).
    return message if len(message) <= limit else message[:limit] + " ...(truncated)"


def _is_timeout(e: jax.errors.JaxRuntimeError) -> bool:  # pyright: ignore[reportInvalidTypeForm]  # an alias of a class
    return str(e).startswith("DEADLINE_EXCEEDED")


def _service_error(what: str, me: int, e: jax.errors.JaxRuntimeError) -> DistributedError:  # pyright: ignore[reportInvalidTypeForm]
    return DistributedError(
        f"The JAX coordination service failed during {what} on process {me}: {e}"
    )


def _join(processes: tuple[int, ...] | list[int]) -> str:
    return ", ".join(map(str, processes))
