"""Retention: which of a :class:`CheckpointManager`'s committed steps to delete, and which new
step to refuse. Pure functions of the steps, their metrics and the manager's options; the
manager does the deleting.

A step is kept if it is one of the newest ``keep``, a multiple of ``keep_every_n_steps``, or
one of the ``keep_best`` best by ``best_fn``; the others are deleted. Because the newest steps
are kept, steps only go up: a step older than the newest is refused (:func:`check_newest`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ._errors import CheckpointExistsError
from ._steps import Metrics


def expired(steps: list[int], keep: int | None, keep_every_n_steps: int | None,
            best: Iterable[int]) -> list[int]:
    """The steps to delete among the committed ``steps`` (ascending), in their order: those
    outside the newest ``keep`` (None: all kept), not a multiple of ``keep_every_n_steps`` and
    not among the ``best``."""
    kept = set(steps if keep is None else steps[-keep:])
    if keep_every_n_steps is not None:
        kept.update(s for s in steps if s % keep_every_n_steps == 0)
    kept.update(best)
    return [s for s in steps if s not in kept]


def best_steps(metrics: Iterable[tuple[int, Metrics | None]],
               best_fn: Callable[[Metrics], float] | None, best_mode: str, k: int) -> list[int]:
    """The ``k`` steps with the highest (``best_mode="max"``) or lowest (``"min"``)
    ``best_fn`` of their metrics, among ``(step, metrics)`` pairs, best first; ties go to the
    newer step, and a step without metrics, or scoring NaN, is never among the best. Empty
    without ``best_fn`` or a scored step."""
    if best_fn is None:
        return []
    scored = []
    for step, found in metrics:
        if found is not None:
            score = float(best_fn(found))
            if score == score:  # a NaN (a diverged run) is never the best
                scored.append((score if best_mode == "max" else -score, step))
    return [step for _, step in sorted(scored, reverse=True)[:k]]


def check_newest(where: str, step: int, steps: list[int], pending: int | None) -> None:
    """Refuses a step older than the newest committed (``steps``, ascending) or in flight
    (``pending``) one: retention keeps the highest steps, so after a rollback it would delete
    the new steps and keep the diverged ones (steps [100, 200, 300], restore 100, save 110:
    [110, 200, 300], and latest_step() the diverged 300)."""
    newest = max(steps[-1:] + ([] if pending is None else [pending]), default=None)
    if newest is not None and step < newest:
        newer = [s for s in steps if s > step]
        raise CheckpointExistsError(
            f"{where}: step {step} is older than the latest step {newest}; "
            "retention keeps the newest steps, so after a rollback it would delete the "
            f"new ones and keep {newer}. Delete the newer steps first: "
            f"mgr.delete(s) for s in {newer}")


def check_options(keep: int | None, keep_every_n_steps: int | None, save_interval_steps: int,
                  best_mode: str, handle_preemption: bool, read_only: bool,
                  keep_best: int = 1) -> None:
    """Refuses (``ValueError``) a :class:`CheckpointManager`'s options that make no policy."""
    for name, value, allow_none in (("keep", keep, True), ("keep_best", keep_best, False),
                                    ("keep_every_n_steps", keep_every_n_steps, True),
                                    ("save_interval_steps", save_interval_steps, False)):
        if not ((value is None and allow_none) or
                (isinstance(value, int) and not isinstance(value, bool) and value >= 1)):
            raise ValueError(f"{name} must be a positive int{' or None' * allow_none}, "
                             f"not {value!r}")
    if best_mode not in ("max", "min"):
        raise ValueError(f"best_mode must be 'max' or 'min', not {best_mode!r}")
    if read_only and handle_preemption:
        raise ValueError("handle_preemption=True needs a manager that saves, not read_only")
