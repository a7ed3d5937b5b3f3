"""Single-process placeholder; replaced by the multi-process implementation."""

from __future__ import annotations

import jax


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_multiprocess() -> bool:
    return process_count() > 1


def barrier(name: str, timeout_s: float) -> None:
    del name, timeout_s


def broadcast_str(name: str, value: str | None, timeout_s: float) -> str:
    assert value is not None
    return value


def report_and_check(name: str, error: str | None, timeout_s: float) -> None:
    if error is not None:
        raise RuntimeError(error)
