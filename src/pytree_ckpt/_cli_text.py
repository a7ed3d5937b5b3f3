"""How the command line prints: tables, sections, sizes, shapes, times, and strict JSON."""

from __future__ import annotations

import datetime
import json
import math
import sys
from collections.abc import Sequence, Set
from typing import Any

VALUE_WIDTH = 60  # a value's text is cut to this width in tables


def emit(document: Any) -> None:
    json.dump(document, sys.stdout, allow_nan=False)
    sys.stdout.write("\n")


def show(value: Any) -> str:
    from ._leaves import show_py  # ints too long for Python's text shown by their size

    return show_py(value)


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON: containers kept, NaN/inf floats, bytes, complex and other
    values as their repr."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):  # JSON writes ints as text: Python's limit applies
        shown = show(value)
        return value if shown[0] != "<" else shown
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return repr(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Set[int] = frozenset()
           ) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    print(line(headers))
    for row in rows:
        print(line(row))


def section(title: str, rows: list[tuple[str, ...]]) -> None:
    if not rows:
        return
    print(f"{title}:")
    columns = max(map(len, rows))
    rows = [tuple(r) + ("",) * (columns - len(r)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(columns)]
    for row in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    scaled = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        scaled /= 1024
        if scaled < 1024 or unit == "TiB":
            return f"{scaled:.1f} {unit}"
    raise AssertionError("unreachable")


def shape(shape: tuple) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def short(text: str, width: int = VALUE_WIDTH) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def iso(seconds: Any) -> str | None:
    if not isinstance(seconds, int | float) or not math.isfinite(seconds):
        return None
    try:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def written(writer: Any) -> str:
    by = f", written by {writer['library']}" if writer.get("library") else ""
    when = iso(writer.get("time"))
    return by + (f" at {when}" if when else "")


def capped(paths: list[str], most: int = 20) -> list[tuple[str, ...]]:
    """Rows for :func:`section`: the first ``most`` paths, then how many more there are."""
    rows = [(p,) for p in paths[:most]]
    return rows + [(f"... and {len(paths) - most} more",)] if len(paths) > most else rows


def diff_verdict(found: bool, unread: int, by_checksum: int, counts: str) -> str:
    """diff's last line: "the same" only when every value was compared (read, or by the
    checksums both sides record)."""
    if found:
        verdict = "A and B differ"
    elif unread:
        verdict = "No difference found"
    else:
        verdict = "A and B are the same"
    by_crc = f" ({by_checksum} arrays by their stored checksums)" if by_checksum else ""
    rest = f"; {unread} arrays' values not compared (add --values)" if unread else ""
    return f"{verdict}: {counts}{by_crc}{rest}"


def carried_note(info: Any) -> str:
    """What ``ls`` adds, on a line of its own, for a step that carries leaves (else "")."""
    if not info.carried:
        return ""
    steps = sorted(set(info.carried.values()), key=int)
    return (f"\ncarries {size(info.carried_nbytes)} from step(s) {', '.join(steps)} "
            f"({len(info.carried)} leaves)")


def byte_counts(info: Any) -> dict[str, int | None]:
    """A step's bytes as ``steps`` lists them: all, written, carried (None: no metadata)."""
    if info is None:
        return {"nbytes": None, "written_bytes": None, "carried_bytes": None}
    return {"nbytes": info.nbytes, "written_bytes": info.nbytes - info.carried_nbytes,
            "carried_bytes": info.carried_nbytes}
