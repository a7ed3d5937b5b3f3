"""From raw timings to medians, ratios, targets, a printed table and a JSON record."""

from __future__ import annotations

import statistics
from typing import Any, NamedTuple

from _timing import Runs
from _trees import Subtree

PC, ORBAX, NPSAVE, DISK = "pytree_ckpt", "orbax", "np.save", "disk"

# Rows of the table: (operation key, label). RSS rows are added separately.
ROWS = (
    ("save", "save (durable)"),
    ("restore", "restore (abstract target)"),
    ("save_async_block", "save_async: blocks for"),
    ("save_async_total", "save_async: until durable"),
    ("metadata", "metadata()"),
    ("restore_at", "restore at= subtree"),
)


class Target(NamedTuple):
    """A promise from DESIGN.md: `measured <op> bound`."""

    name: str
    key: str  # into the tree's `derived` numbers
    op: str  # ">=" or "<="
    bound: float
    unit: str


_RATIO_TARGETS = {
    "small": (("save", 30), ("restore", 40), ("save_async_block", 30)),
    "big": (("save", 1.3), ("restore", 1.5)),
    "train": (("save", 2), ("restore", 2.5)),
    "sharded": (("save", 2), ("restore", 2)),
}
_AT_FRACTION_RANGE = (0.005, 0.02)  # the at= target applies where the subtree is ~1%


def targets_for(tree: str, subtree: Subtree | None) -> list[Target]:
    """The targets that apply to the named tree."""
    found = [
        Target(f"{op}: orbax / pytree_ckpt", f"ratio_{op}", ">=", bound, "x")
        for op, bound in _RATIO_TARGETS.get(tree, ())
    ]
    if tree == "big":
        found.append(Target("save bandwidth / disk bandwidth", "save_disk_fraction", ">=", 0.8, ""))
    if tree == "small":
        found.append(Target("restore overhead per leaf", "overhead_per_leaf_us", "<=", 10, "µs"))
        found.append(Target("metadata()", "metadata_ms", "<=", 20, "ms"))
    low, high = _AT_FRACTION_RANGE
    if subtree is not None and low <= subtree.fraction <= high:
        found.append(Target("restore at= / full restore", "at_fraction", "<=", 0.05, ""))
    found.append(Target("peak RSS save / tree bytes", "rss_save", "<=", 2.2, "x"))
    found.append(Target("peak RSS restore / tree bytes", "rss_restore", "<=", 1.3, "x"))
    return found


# ---------------------------------------------------------------------------------------
# Numbers


def medians(runs: Runs) -> dict[str, dict[str, float]]:
    return {side: {op: statistics.median(v) for op, v in ops.items()} for side, ops in runs.items()}


def derived_numbers(
    med: dict[str, dict[str, float]], rss: dict, nbytes: int, leaves: int
) -> dict[str, float | None]:
    """Ratios and the other numbers the targets are stated in (None where a side is off)."""
    pc, orbax, disk = med.get(PC, {}), med.get(ORBAX, {}), med.get(DISK, {})
    numbers: dict[str, float | None] = {
        f"ratio_{op}": _ratio(orbax.get(op), pc.get(op))
        for op in ("save", "restore", "save_async_block", "save_async_total", "metadata")
    }
    numbers["ratio_np_save_save"] = _ratio(med.get(NPSAVE, {}).get("save"), pc.get("save"))
    numbers["ratio_np_save_restore"] = _ratio(med.get(NPSAVE, {}).get("restore"), pc.get("restore"))
    numbers["disk_write_gib_s"] = _per_second(nbytes, disk.get("save"))
    numbers["disk_read_gib_s"] = _per_second(nbytes, disk.get("restore"))
    numbers["save_gib_s"] = _per_second(nbytes, pc.get("save"))
    numbers["restore_gib_s"] = _per_second(nbytes, pc.get("restore"))
    numbers["save_disk_fraction"] = _ratio(disk.get("save"), pc.get("save"))
    numbers["overhead_per_leaf_us"] = _overhead_per_leaf(pc.get("restore"), disk.get("restore"), leaves)
    numbers["metadata_ms"] = None if pc.get("metadata") is None else pc["metadata"] * 1e3
    numbers["at_fraction"] = _ratio(pc.get("restore_at"), pc.get("restore"))
    numbers["rss_save"] = rss.get(PC, {}).get("save", {}).get("ratio")
    numbers["rss_restore"] = rss.get(PC, {}).get("restore", {}).get("ratio")
    return numbers


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _per_second(nbytes: int, seconds: float | None) -> float | None:
    return None if not seconds else nbytes / seconds / 2**30


def _overhead_per_leaf(restore: float | None, read: float | None, leaves: int) -> float | None:
    """Restore time beyond reading the same bytes from one file, per leaf, in µs."""
    if restore is None or read is None:
        return None
    return (restore - read) / leaves * 1e6


def judge(targets: list[Target], numbers: dict[str, float | None]) -> list[dict[str, Any]]:
    """Each target with its measured value and pass (True/False), or None if not measured."""
    judged = []
    for t in targets:
        value = numbers.get(t.key)
        passed = None if value is None else (value >= t.bound if t.op == ">=" else value <= t.bound)
        judged.append({**t._asdict(), "measured": value, "pass": passed})
    return judged


# ---------------------------------------------------------------------------------------
# Printing


def format_table(result: dict[str, Any]) -> str:
    """The per-tree table: medians per side, orbax/pytree_ckpt ratios, targets."""
    sides = list(result["seconds"])
    header = f"{'':30}" + "".join(f"{s:>13}" for s in sides) + f"{'orbax/pc':>11}"
    lines = [_title(result), header]
    for op, label in ROWS:
        if op == "restore_at" and result["subtree"]:
            label = f"restore at= ({result['subtree']['fraction']:.1%} of bytes)"
        cells = [_seconds(result["seconds"][s].get(op, {}).get("median")) for s in sides]
        ratio = result["derived"].get(f"ratio_{op}")
        lines.append(f"{label:30}" + "".join(f"{c:>13}" for c in cells) + f"{_x(ratio):>11}")
    lines += _rss_lines(result, sides)
    lines.append(_bandwidth_line(result["derived"]))
    lines += [_target_line(t) for t in result["targets"]]
    return "\n".join(lines)


def _title(result: dict[str, Any]) -> str:
    return (
        f"== {result['tree']}: {result['leaves']:,} leaves, {result['bytes'] / 1e6:,.1f} MB; "
        f"medians of {result['repeats']}; page cache {result['page_cache']}; "
        f"at= {(result['subtree'] or {}).get('path', '-')} =="
    )


def _rss_lines(result: dict[str, Any], sides: list[str]) -> list[str]:
    lines = []
    for op in ("save", "restore"):
        cells = [result["rss"].get(s, {}).get(op, {}).get("ratio") for s in sides]
        text = ["-" if c is None else f"{c:.2f}x" for c in cells]
        lines.append(f"{'peak RSS ' + op + ' / tree bytes':30}" + "".join(f"{c:>13}" for c in text))
    for op in ("save", "restore"):
        cells = [result["rss"].get(s, {}).get(op, {}).get("seconds") for s in sides]
        text = [_seconds(c) for c in cells]
        lines.append(f"{op + ' in a fresh process':30}" + "".join(f"{c:>13}" for c in text))
    return lines


def _bandwidth_line(d: dict[str, Any]) -> str:
    return (
        f"GiB/s: pytree_ckpt save {_num(d['save_gib_s'])}, restore {_num(d['restore_gib_s'])}; "
        f"disk durable write {_num(d['disk_write_gib_s'])}, read {_num(d['disk_read_gib_s'])}"
    )


def _target_line(t: dict[str, Any]) -> str:
    verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
    value = _num(t["measured"]) + t["unit"]
    return f"  {verdict}  {t['name']}: {value} (target {t['op']} {t['bound']:g}{t['unit']})"


def format_summary(results: dict[str, dict[str, Any]]) -> str:
    """One line per target over all trees."""
    lines = ["== targets =="]
    for name, result in results.items():
        lines += [f"{name:8}" + _target_line(t) for t in result["targets"]]
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e6:.0f} µs"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}"
