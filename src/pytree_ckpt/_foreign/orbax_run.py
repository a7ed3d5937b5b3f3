"""Orbax run directories: the folder an Orbax ``CheckpointManager`` writes its steps into.

Such a directory holds one folder per step, named ``<step>`` or ``<prefix>_<step>``, the step
maybe zero-padded (``step_prefix``, ``step_format_fixed_length``): ``7``, ``ckpt_00007``.
A committed step folder holds ``_CHECKPOINT_METADATA`` and one folder per item (see
orbax.py). A folder with ``.orbax-checkpoint-tmp`` in its name is a save that never
finished; so is a step folder without ``_CHECKPOINT_METADATA``.

Orbax keeps a step's metrics in its ``metrics`` item (a JSON file ``metrics/metrics``, written
when the manager has a ``best_fn``) and, in some versions, under ``"metrics"`` in
``_CHECKPOINT_METADATA``. A :class:`CheckpointManager` reads such a directory with
``read_only=True`` and refuses to write into it. Every file is untrusted.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .. import _storage
from .._errors import NotACheckpointError
from .orbax import STEP_METADATA, TMP_MARK

METRICS_ITEM = "metrics"  # Orbax's reserved item name for a step's metrics
_STEP_FOLDER = re.compile(r"(?:(.+)_)?([0-9]+)")


def step_of(name: str) -> int | None:
    """The step an Orbax step folder's name gives (``ckpt_00007``: 7), or None."""
    match = _STEP_FOLDER.fullmatch(name)
    return int(match[2]) if match and name.isascii() else None


def steps_in(where: str, children: dict[str, set[str] | None]) -> dict[int, str]:
    """The committed Orbax steps among a directory's children (see
    :func:`_storage.child_names`), each with its folder's name, in step order.

    **Raises:** :class:`NotACheckpointError` if two folders name one step (``7`` and
    ``ckpt_7``): which one Orbax would read is not known.
    """
    found: dict[int, str] = {}
    for name, inside in sorted(children.items()):
        step = step_of(name)
        if step is None or inside is None or STEP_METADATA not in inside:
            continue
        if step in found:
            raise NotACheckpointError(
                f"{where}: two Orbax step folders for step {step}: {found[step]!r} and "
                f"{name!r}; move one away")
        found[step] = name
    return dict(sorted(found.items()))


def is_run(children: dict[str, set[str] | None]) -> bool:
    """Whether a directory's children are an Orbax run's: a committed Orbax step folder, or
    one of Orbax's unfinished saves."""
    return any(inside is not None and (TMP_MARK in name or (
        step_of(name) is not None and STEP_METADATA in inside))
        for name, inside in children.items())


class OrbaxRun:
    """An Orbax run directory as a read-only :class:`CheckpointManager` reads it: its
    committed steps, each step's folder and metrics."""

    def __init__(self, loc: _storage.Location, kv: Any, folders: dict[int, str]):
        self._loc, self._kv = loc, kv
        self.folders = folders  # step -> its folder's name, in step order

    @classmethod
    def find(cls, loc: _storage.Location, kv: Any, read_only: bool) -> OrbaxRun | None:
        """The Orbax run directory at ``loc``, or None if it is not one. A manager that would
        write gets :func:`refusal`'s error, before it writes anything there."""
        children = _storage.child_names(loc, kv)
        if not is_run(children):
            return None
        folders = steps_in(loc.url, children)
        if not read_only:
            raise refusal(loc.url, folders)
        return cls(loc, kv, folders)

    def steps(self) -> list[int]:
        """The committed steps, ascending, listed afresh."""
        self.folders = steps_in(self._loc.url, _storage.child_names(self._loc, self._kv))
        return [*self.folders]

    def metrics(self, step: int) -> dict[str, Any] | None:
        """The metrics Orbax kept for ``step``, or None if it kept none."""
        return metrics(self._loc, self._kv, self.folders[step])


def metrics(loc: _storage.Location, kv: Any, folder: str) -> dict[str, Any] | None:
    """The metrics Orbax kept for the step in ``folder``, or None if it kept none."""
    for key, pick in ((f"{folder}/{METRICS_ITEM}/{METRICS_ITEM}", lambda doc: doc),
                      (f"{folder}/{STEP_METADATA}", lambda doc: doc.get("metrics"))):
        raw = _storage.read_key(kv, key, loc)
        if raw is None:
            continue
        try:
            found = pick(json.loads(raw))
        except (ValueError, AttributeError):
            continue  # not a JSON map: no metrics from this file
        if isinstance(found, dict) and found and all(isinstance(k, str) for k in found):
            return found
    return None


def refusal(url: str, steps: dict[int, str]) -> NotACheckpointError:
    """The error of a writable :class:`CheckpointManager` opened on an Orbax run directory."""
    listed = ", ".join(f"{s} ({n})" for s, n in list(steps.items())[:10])
    more = f" and {len(steps) - 10} more" if len(steps) > 10 else ""
    return NotACheckpointError(
        f"{url}: an Orbax CheckpointManager's directory (Orbax steps: {listed or 'none committed'}"
        f"{more}); a pytree_ckpt CheckpointManager does not write into it. To migrate, read it "
        f"with pc.CheckpointManager({url!r}, read_only=True), restore a step "
        "(mgr.restore(step, target, at='default')) and save it with a CheckpointManager on a "
        "new directory")
