"""The restore status: a frozen record of what matched, what did not, and why."""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Sequence
from typing import NamedTuple

from . import _graph
from ._errors import PartialRestoreError

# A partial restore's message lists at most this many lines per kind of problem (beyond it,
# paths are grouped by prefix), each at most _MAX_LINE characters: readable, and bounded with
# a million unmatched paths.
_MAX_LINES = 20
_MAX_LINE = 240


class Mismatch(NamedTuple):
    """A target path found in the checkpoint with another shape or an unsafe dtype.

    The restored tree keeps the target's value there.
    """

    path: str
    saved_shape: tuple[int, ...]
    saved_dtype: str
    target_shape: tuple[int, ...]
    target_dtype: str

    def __str__(self) -> str:
        return (f"{self.path}: saved {self.saved_dtype}{list(self.saved_shape)}, "
                f"target {self.target_dtype}{list(self.target_shape)}")


class Cast(NamedTuple):
    """A matched path whose value was converted to the target's dtype (e.g. float32 to
    bfloat16, or a Python int to an int32 array)."""

    path: str
    saved_dtype: str
    target_dtype: str

    def __str__(self) -> str:
        return f"{self.path}: {self.saved_dtype} -> {self.target_dtype}"


def _common_prefix(paths: Sequence[str], rest: set[str]) -> str | None:
    """The deepest prefix (whole names) that every one of ``paths`` lies under and whose
    removal turns one of them into a path in ``rest``; None if there is none."""
    names = [_graph.split_path(p) for p in paths]
    found = None
    for depth in range(1, min(map(len, names))):
        head = names[0][:depth]
        if any(n[:depth] != head for n in names):
            break
        if any("/".join(map(_graph.escape, n[depth:])) in rest for n in names):
            found = "/".join(map(_graph.escape, head))
    return found


def at_hint(status: RestoreStatus) -> str | None:
    """When nothing matched and a prefix explains it, what to do: the ``at=`` to pass (every
    unused checkpoint path lies under one prefix, below which they are the target's paths),
    or the target's subtree to restore into (the reverse)."""
    if status.matched or not status.unmatched or not status.unused:
        return None
    prefix = _common_prefix(status.unused, set(status.unmatched))
    if prefix is not None:
        return (f"hint: the checkpoint's paths are the target's under {prefix!r}: pass "
                f"at={prefix!r}")
    prefix = _common_prefix(status.unmatched, set(status.unused))
    if prefix is not None:
        return (f"hint: the target's paths are the checkpoint's under {prefix!r}: restore "
                f"into the target's subtree at {prefix!r} instead")
    return None


def _hint_lines(status: RestoreStatus) -> list[str]:
    hint = at_hint(status)
    return [f"  {hint}"] if hint else []


def _listing(title: str, items: tuple) -> list[str]:
    if not items:
        return []
    return [f"  {title} ({len(items)}):"] + [f"    {item}" for item in items]


@dataclasses.dataclass(frozen=True)
class RestoreStatus:
    """What a restore did, path by path. Frozen and hashable: equal restores, equal statuses.

    - ``matched``: target paths restored from the checkpoint (including ``cast`` ones).
    - ``unmatched``: target paths the checkpoint lacks; they keep the target's value.
    - ``unused``: checkpoint paths no target path asked for (under ``at`` when given).
    - ``mismatched``: :class:`Mismatch` records, name found but shape or dtype incompatible;
      they keep the target's value.
    - ``cast``: :class:`Cast` records for matched paths converted to the target's dtype.
    - ``transformed``: matched paths whose saved array went through a ``transform`` function
      of :func:`restore`.

    Example::

        >>> tree, status = pc.restore("memory://doc/save", {"w": jnp.zeros(3), "b": 0.0})
        >>> status.matched, status.unmatched, status.unused
        (('w',), ('b',), ('step',))
    """

    matched: tuple[str, ...] = ()
    unmatched: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()
    mismatched: tuple[Mismatch, ...] = ()
    cast: tuple[Cast, ...] = ()
    transformed: tuple[str, ...] = ()

    def assert_consumed(self) -> RestoreStatus:
        """Asserts every target path matched and every checkpoint entry was used.

        **Raises:** :class:`PartialRestoreError` (an ``AssertionError``) naming every unmatched,
        unused and mismatched path; its ``status`` is this status.
        """
        problems = (_listing("unmatched (in target, not in checkpoint)", self.unmatched)
                    + _listing("unused (in checkpoint, not in target)", self.unused)
                    + _listing("mismatched", self.mismatched))
        if problems:
            raise PartialRestoreError("restore did not consume the checkpoint exactly:\n"
                                      + "\n".join(_hint_lines(self) + problems), self)
        return self

    def assert_existing_matched(self) -> RestoreStatus:
        """Asserts every target path was found (and fit); unused checkpoint entries are fine.

        **Raises:** :class:`PartialRestoreError` (an ``AssertionError``) naming every unmatched
        and mismatched path; its ``status`` is this status.
        """
        problems = (_listing("unmatched (in target, not in checkpoint)", self.unmatched)
                    + _listing("mismatched", self.mismatched))
        if problems:
            raise PartialRestoreError("some target paths were not restored:\n"
                                      + "\n".join(_hint_lines(self) + problems), self)
        return self

    def assert_nontrivial_match(self) -> RestoreStatus:
        """Asserts at least one leaf was restored from the checkpoint.

        **Raises:** :class:`PartialRestoreError` (an ``AssertionError``) listing what the
        target asked for otherwise; its ``status`` is this status.
        """
        if not self.matched:
            raise PartialRestoreError(
                "nothing was restored from the checkpoint (wrong path, at= or rename?):\n"
                + "\n".join(_hint_lines(self) + _listing("unmatched", self.unmatched)
                            + _listing("mismatched", self.mismatched)
                            + _listing("unused", self.unused)), self)
        return self

    def __str__(self) -> str:
        lines = [f"RestoreStatus: {len(self.matched)} matched, {len(self.unmatched)} unmatched, "
                 f"{len(self.unused)} unused, {len(self.mismatched)} mismatched, "
                 f"{len(self.cast)} cast"
                 + (f", {len(self.transformed)} transformed" if self.transformed else "")]
        lines += _hint_lines(self)
        lines += _listing("unmatched", self.unmatched) + _listing("unused", self.unused)
        lines += _listing("mismatched", self.mismatched) + _listing("cast", self.cast)
        lines += _listing("transformed", self.transformed)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = [("matched", p, "") for p in self.matched]
        rows += [("unmatched", p, "kept the target's value") for p in self.unmatched]
        rows += [("unused", p, "in the checkpoint only") for p in self.unused]
        rows += [("mismatched", m.path, str(m).split(": ", 1)[1]) for m in self.mismatched]
        rows += [("cast", c.path, str(c).split(": ", 1)[1]) for c in self.cast]
        rows += [("transformed", p, "by a transform function") for p in self.transformed]
        colors = {"matched": "#2e7d32", "unmatched": "#c62828", "unused": "#ef6c00",
                  "mismatched": "#c62828", "cast": "#1565c0", "transformed": "#1565c0"}
        body = "".join(
            f"<tr><td style='color:{colors[k]}'>{k}</td><td><code>{html.escape(p)}</code></td>"
            f"<td>{html.escape(d)}</td></tr>" for k, p, d in rows)
        summary = html.escape(str(self).splitlines()[0])
        hint = at_hint(self)
        hint = f"<p>{html.escape(hint)}</p>" if hint else ""
        return (f"<details open><summary><b>{summary}</b></summary>{hint}<table>"
                f"<tr><th>status</th><th>path</th><th>detail</th></tr>{body}</table></details>")


def check_complete(status: RestoreStatus, where: str, accept: str) -> RestoreStatus:
    """Returns ``status`` if every target leaf was restored, else raises
    :class:`PartialRestoreError` naming the unmatched and mismatched paths (grouped by prefix
    when there are many) and saying how to accept a partial restore: ``accept``."""
    if not status.unmatched and not status.mismatched:
        return status
    lines = [f"{where}: {len(status.unmatched) + len(status.mismatched)} target leaves were not "
             f"restored and keep the target's value ({len(status.matched)} matched, "
             f"{len(status.unmatched)} unmatched, {len(status.mismatched)} mismatched):"]
    if status.unmatched:
        lines.append(f"  unmatched, in the target but not in the checkpoint "
                     f"({len(status.unmatched)}):")
        lines += _grouped(status.unmatched, status.unmatched)
    if status.mismatched:
        lines.append(f"  mismatched, found with another shape or an unsafe dtype "
                     f"({len(status.mismatched)}):")
        lines += _grouped([m.path for m in status.mismatched], status.mismatched)
    lines += _hint_lines(status)
    lines.append(f"To accept a partial restore, {accept}, and read the returned status.")
    raise PartialRestoreError("\n".join(lines), status)


def _grouped(paths: Sequence[str], items: Sequence[object]) -> list[str]:
    """One line per item if there are few; else one per group of paths sharing their first
    names, at the deepest level that gives at most _MAX_LINES groups."""
    if len(items) <= _MAX_LINES:
        return [_line(f"    {item}") for item in items]
    names = [_graph.split_path(p) for p in paths]
    depth = 1
    while (depth < max(map(len, names))
           and len({tuple(n[:depth + 1]) for n in names}) <= _MAX_LINES):
        depth += 1
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(tuple(n[:depth]), []).append(i)
    lines = []
    for prefix, members in list(groups.items())[:_MAX_LINES]:
        first = items[members[0]]
        if len(members) == 1:
            lines.append(_line(f"    {first}"))
        else:
            shown = _graph.join_path(*prefix)
            lines.append(_line(f"    {shown}/... ({len(members)} paths, e.g. {first})"))
    if len(groups) > _MAX_LINES:
        rest = sum(len(m) for m in list(groups.values())[_MAX_LINES:])
        lines.append(f"    ... and {len(groups) - _MAX_LINES} more groups ({rest} paths)")
    return lines


def _line(text: str) -> str:
    return text if len(text) <= _MAX_LINE else text[:_MAX_LINE - 3] + "..."
