"""Process-wide options: one documented object (:func:`configure`), read when used.

Each option's default may be given by an environment variable, read (and validated) each
time the option is used, never at import: a bad value raises :class:`ConfigurationError`
naming the variable from the call that needs it, and ``import pytree_ckpt`` always works.
A value given to :func:`configure` takes precedence over the variable.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from typing import Any

from ._errors import ConfigurationError


@dataclasses.dataclass(frozen=True)
class Options:
    """The options in force (see :func:`configure` for each one's meaning)."""

    storage_deadline_s: float
    barrier_timeout_s: float
    liveness_timeout_s: float
    clean_after_s: float
    lock_stale_s: float
    read_window_bytes: int


# name: (environment variable, default, smallest value allowed); a name ending in _bytes
# is a whole number of bytes, every other one a number of seconds.
_SPEC: dict[str, tuple[str, float, float]] = {
    "storage_deadline_s": ("PYTREE_CKPT_STORAGE_DEADLINE_S", 120.0, 0.0),
    "barrier_timeout_s": ("PYTREE_CKPT_BARRIER_TIMEOUT_S", 600.0, 0.0),
    "liveness_timeout_s": ("PYTREE_CKPT_LIVENESS_TIMEOUT_S", 30.0, 0.0),
    "clean_after_s": ("PYTREE_CKPT_CLEAN_AFTER_S", 6 * 3600.0, 0.0),
    "lock_stale_s": ("PYTREE_CKPT_LOCK_STALE_S", 300.0, 0.0),
    "read_window_bytes": ("PYTREE_CKPT_READ_WINDOW_BYTES", 256 << 20, 1 << 20),
}
_set: dict[str, float] = {}
_lock = threading.Lock()


def _valid(name: str, value: Any, where: str) -> float:
    low = _SPEC[name][2]
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if name.endswith("_bytes"):
        if isinstance(value, bool) or not math.isfinite(number) or number < low or \
                number != int(number):
            raise ConfigurationError(
                f"{where}: {value!r} is not a number of bytes (a whole number >= {low:g})")
        return int(number)
    if isinstance(value, bool) or not math.isfinite(number) or number < low:
        raise ConfigurationError(
            f"{where}: {value!r} is not a number of seconds (a finite number >= {low:g})")
    return number


def get(name: str) -> float:
    """The value of option ``name`` now: :func:`configure`'s, else its environment
    variable's (validated), else its default."""
    with _lock:
        if name in _set:
            return _set[name]
    var, default, _low = _SPEC[name]
    raw = os.environ.get(var)
    return default if raw is None else _valid(name, raw, f"environment variable {var}")


def options() -> Options:
    """Every option's value now."""
    return Options(**{name: get(name) for name in _SPEC})  # pyright: ignore[reportArgumentType]  # bytes options are validated as ints


def configure(**changes: float | None) -> Options:
    """Sets process-wide options and returns every option's value now.

    **Options** (seconds, or bytes for ``read_window_bytes``; ``None`` goes back to the
    environment variable, else the default):

    - ``storage_deadline_s`` (``PYTREE_CKPT_STORAGE_DEADLINE_S``, 120): how long one
      storage request keeps retrying transient faults (HTTP 429 and 5xx, dropped
      connections) with exponential backoff before the operation fails with
      :class:`StorageError` naming the URL and the last fault. Applies to stores opened
      after the call.
    - ``barrier_timeout_s`` (``PYTREE_CKPT_BARRIER_TIMEOUT_S``, 600): in a multi-process
      job, how long after the first process every process must reach a save.
    - ``liveness_timeout_s`` (``PYTREE_CKPT_LIVENESS_TIMEOUT_S``, 30): in a multi-process
      job, how long a process may give no sign of life during a save before it fails.
    - ``clean_after_s`` (``PYTREE_CKPT_CLEAN_AFTER_S``, 21600): how old an uncommitted
      generation must be before :func:`clean` takes it for a dead save's leftovers.
    - ``lock_stale_s`` (``PYTREE_CKPT_LOCK_STALE_S``, 300): how long a
      :class:`CheckpointManager`'s lock may go without a heartbeat before it is taken over.
    - ``read_window_bytes`` (``PYTREE_CKPT_READ_WINDOW_BYTES``, 268435456 = 256 MiB, at
      least 1 MiB): how many bytes of array reads :func:`restore` and :func:`read_blocks`
      keep issued and not yet copied into place, whatever the host's CPU count (each holds
      a buffer of its size meanwhile). More can read faster from fast storage on a host
      with many cores; less holds less memory.

    **Raises:** :class:`ConfigurationError` naming the option for an unknown name or a value
    that is not a finite number of seconds, or a whole number of bytes (nothing is changed
    then).

    Example::

        >>> pc.configure(storage_deadline_s=30).storage_deadline_s
        30.0
        >>> pc.configure(storage_deadline_s=None).storage_deadline_s  # back to the default
        120.0
    """
    checked: dict[str, float | None] = {}
    for name, value in changes.items():
        if name not in _SPEC:
            raise ConfigurationError(f"configure: unknown option {name!r} (options: "
                                     f"{', '.join(_SPEC)})")
        checked[name] = None if value is None else _valid(name, value, f"configure({name}=...)")
    with _lock:
        for name, value in checked.items():
            if value is None:
                _set.pop(name, None)
            else:
                _set[name] = value
    return options()
