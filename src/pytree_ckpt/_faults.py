"""Storage faults: which TensorStore errors say the store failed, and how long to retry.

DESIGN's three next steps: a missing object is :class:`CheckpointNotFoundError`, wrong bytes
are :class:`CorruptCheckpointError`, and a store that could not be read or written
(permission denied, a server error after retries, a timeout, a reset, an unreachable
endpoint) is :class:`StorageError`, decided here, in one place, for every reader and writer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from . import _options
from ._errors import CheckpointError, CorruptCheckpointError, StorageError

# TensorStore retries a request that failed transiently (HTTP 429 and 5xx, a dropped
# connection) after min(initial_delay * 2**n + jitter, max_delay), n = 0, 1, ..., with a
# jitter below initial_delay; max_retries ends it. Its defaults (1 s, 32 s, 32 retries) keep a
# request failing with 503 going for over 15 minutes: the library derives max_retries from
# the storage deadline instead (see retry_settings).
RETRY_INITIAL_S = 0.25
RETRY_MAX_S = 16.0


def retry_settings(deadline_s: float) -> dict[str, Any]:
    """TensorStore's ``*_request_retries`` resource for a deadline: as many retries as fit
    in ``deadline_s`` of waiting, counting each wait at its longest (full jitter).

    >>> retry_settings(120)
    {'max_retries': 12, 'initial_delay': '0.25s', 'max_delay': '16.0s'}
    >>> retry_settings(0)["max_retries"]
    0
    """
    most = min(RETRY_MAX_S, max(deadline_s / 4, RETRY_INITIAL_S))
    waited, retries = 0.0, 0
    while retries < 64:
        wait = min(RETRY_INITIAL_S * 2**retries + RETRY_INITIAL_S, most)
        if waited + wait > deadline_s:
            break
        waited, retries = waited + wait, retries + 1
    return {"max_retries": retries, "initial_delay": f"{RETRY_INITIAL_S}s",
            "max_delay": f"{most}s"}


# TensorStore's status codes (the start of its errors' text) that say the store, not the
# checkpoint, failed. ABORTED is one only when retries ran out ("All N retry attempts
# failed: <the last error>"); elsewhere it means a conditional write lost a race.
_STORAGE_CODES = ("PERMISSION_DENIED", "UNAUTHENTICATED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                  "RESOURCE_EXHAUSTED")


def is_storage_fault(err: BaseException) -> bool:
    """Whether ``err`` (from TensorStore or the OS) says the store could not be reached or
    refused the request, as opposed to a missing or malformed object."""
    if isinstance(err, StorageError | PermissionError | ConnectionError | TimeoutError):
        return True
    text = str(err)
    code = text.split(":", 1)[0].strip()
    return code in _STORAGE_CODES or (code == "ABORTED" and "retry attempts failed" in text)


def storage_error(url: str, err: BaseException) -> StorageError:
    """The :class:`StorageError` for a fault ``err`` met at ``url`` (raise it ``from err``)."""
    if isinstance(err, StorageError):
        return err
    return StorageError(
        f"{url}: the storage could not be read or written ({err}); nothing is known about "
        "the checkpoint: check credentials and permissions, or retry later (transient "
        "faults were retried for up to storage_deadline_s="
        f"{_options.get('storage_deadline_s'):g} s, see pytree_ckpt.configure)")


def read_failed(url: str, err: BaseException, damaged: str) -> CheckpointError:
    """What a read that raised ``err`` is (raise it ``from err``): a storage fault is
    :func:`storage_error`'s :class:`StorageError` naming ``url``; anything else (a missing
    chunk, a range past the end, bytes TensorStore found bad) is a
    :class:`CorruptCheckpointError` saying ``damaged``."""
    if is_storage_fault(err):
        return storage_error(url, err)
    return CorruptCheckpointError(damaged)


@contextlib.contextmanager
def faults(url: str) -> Iterator[None]:
    """Turns a storage fault raised inside the block into :func:`storage_error`'s, chained;
    anything else passes unchanged."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        if is_storage_fault(e):
            raise storage_error(url, e) from e
        raise
