"""The ``pytree-ckpt`` command line (also ``python -m pytree_ckpt``): one command per question
people ask of a checkpoint::

    pytree-ckpt ls PATH [PATTERN]            the leaves: kind, dtype, shape, bytes, sharding, value
    pytree-ckpt diff A B [--values]          paths only in A / only in B / of another shape or dtype;
                                             with --values, which leaves differ and by how much
                                             (read block by block: --block-bytes)
    pytree-ckpt verify PATH                  every byte read, every checksum and binding checked
    pytree-ckpt steps DIR [--best METRIC]    a manager's steps: time, size, metrics, the best
    pytree-ckpt convert SRC DST [--at P]     Orbax, Flax msgpack or safetensors to ours; ours to
                                             safetensors (DST *.safetensors); --only/--exclude
    pytree-ckpt clean DIR [--yes]            incomplete saves and orphaned generations: listed,
                                             deleted with --yes (pytree_ckpt.clean)

Every command takes ``--json`` (one JSON document on stdout instead of a table). Exit status:
0 fine; 1 differences (``diff``) or a corrupt checkpoint found; 2 bad usage, or nothing there
(no checkpoint, an incomplete save, an empty directory); 3 the storage could not be read or
written (:class:`StorageError`: permission denied, a server error after retries, an
unreachable endpoint; nothing is known about the checkpoint, retry later or fix
credentials). An error is one line on stderr,
never a traceback. Progress bars (``verify``, and ``convert``'s read and write) go to
stderr, and only when it is a terminal and ``--json`` is not given.

Each command reads and writes checkpoints only through what ``import pytree_ckpt`` offers
(``metadata``, ``restore``, ``read_blocks``, ``verify``, ``save``, ``save_safetensors``,
``clean``, ``latest``, ``split_path``, a read-only :class:`CheckpointManager`), so it reads
every location and format they read. Two private modules are its own: _diff.py, the diff
engine (which reads arrays through the same ``pc``, and the checksums two of our commit
files record), and _cli_text.py, how it prints. This module
parses the arguments and runs the commands.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from . import _cli_args, _cli_text
from ._cli_text import emit, iso, jsonable, number, section, shape, short, show, size, table, written
from ._convert import convert
from ._diff import array_differences, checksum_verdicts, compare, under

EXIT_OK, EXIT_FOUND, EXIT_USAGE, EXIT_STORAGE = 0, 1, 2, 3


class _Nothing(Exception):
    """Nothing to show (a pattern that matches no leaf, a directory without steps): exit 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = _cli_args.parser({"ls": _ls, "diff": _diff, "verify": _verify, "steps": _steps,
                                "convert": _convert, "clean": _clean})
    args = parser.parse_args(argv)
    try:
        import pytree_ckpt as pc  # inside the try: a failure to import is one line too

        return args.run(pc, args)
    except KeyboardInterrupt:
        print("pytree-ckpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (| head): stop quietly, as ls and grep do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:  # one line, never a traceback: see the module docstring
        return _fail(e, args)


def _fail(error: Exception, args: argparse.Namespace) -> int:
    import pytree_ckpt as pc

    storage = isinstance(error, pc.StorageError) or (  # convert's write refused
        isinstance(error, pc.SaveError) and isinstance(error.__cause__, pc.StorageError))
    status = (EXIT_FOUND if isinstance(error, pc.CorruptCheckpointError) else
              EXIT_STORAGE if storage else EXIT_USAGE)
    text = " ".join(str(error).split()) or type(error).__name__
    if "overwrite" in args:  # the library's messages name its arguments; here they are flags
        text = text.replace("overwrite=True", "--overwrite")
    if getattr(args, "at", None) is not None:
        text = text.replace(f"at={args.at!r}", f"--at {args.at}")
    if not isinstance(error, pc.CheckpointError | _Nothing | OSError | ValueError | KeyError):
        text = f"{type(error).__name__}: {text}"  # not an error of the input: say what it is
    if len(text) > 1000:
        text = text[:997] + "..."
    if args.json:
        emit({"error": text, "exit_status": status})
    print(f"pytree-ckpt: error: {text}", file=sys.stderr)
    return status


# ---- ls ----

def _ls(pc: ModuleType, args: argparse.Namespace) -> int:
    info = _metadata(pc, args.path)
    leaves = [leaf for leaf in info.leaves.values() if _matches(leaf.path, args.pattern)]
    if args.pattern is not None and not leaves:
        raise _Nothing(f"{info.path}: no leaf matches {args.pattern!r} "
                       f"(of {len(info.leaves)} leaves)")
    total = sum(leaf.nbytes for leaf in leaves)
    if args.json:
        emit({"path": info.path, "format": info.format, "format_version": info.format_version,
              "writer": jsonable(dict(info.writer)),
              "leaves": [_leaf_json(leaf) for leaf in leaves],
              "total": {"leaf_count": len(leaves), "nbytes": total}, "carried": dict(info.carried)})
        return EXIT_OK
    print(f"{info.path}: {info.format} checkpoint, format {info.format_version}"
          f"{written(info.writer)}{_cli_text.carried_note(info)}")
    rows = [(leaf.path, leaf.kind, leaf.dtype, shape(leaf.shape), size(leaf.nbytes),
             _detail(leaf)) for leaf in leaves]
    table(("path", "kind", "dtype", "shape", "bytes", "sharding / value"), rows, right={4})
    print(f"{len(leaves)} leaves, {size(total)}"
          + (f" (of {len(info.leaves)} leaves, {size(info.nbytes)})"
             if len(leaves) < len(info.leaves) else ""))
    return EXIT_OK


def _matches(path: str, pattern: str | None) -> bool:
    if pattern is None:
        return True
    pattern = pattern.rstrip("/")
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern + "/*")


def _leaf_json(leaf: Any) -> dict:
    return {"path": leaf.path, "kind": leaf.kind, "dtype": leaf.dtype, "shape": list(leaf.shape),
            "nbytes": leaf.nbytes, "sharding": leaf.sharding,
            "value": jsonable(leaf.value) if leaf.kind == "py" else None}


def _detail(leaf: Any) -> str:
    if leaf.kind == "py":
        return short(show(leaf.value))
    return leaf.sharding or ""


# ---- diff ----

def _diff(pc: ModuleType, args: argparse.Namespace) -> int:
    a, b = _metadata(pc, args.a), _metadata(pc, args.b)
    leaves_a = under(a, args.at_a)
    only_a, only_b, changed, same_py, same_arrays, py_differ = compare(
        leaves_a, under(b, args.at_b))
    differ = [{"path": d["path"], "a": jsonable(d["a"]), "b": jsonable(d["b"])}
              for d in py_differ]
    checksums: dict[str, bool] = {}
    if args.values:
        differ += array_differences(pc, a.path, b.path, same_arrays, args.atol, args.rtol,
                                    args.block_bytes, bar=_bars(args), at_a=args.at_a,
                                    at_b=args.at_b)
    else:
        checksums = checksum_verdicts(a.path, b.path, same_arrays, args.at_a, args.at_b)
        differ += [{"path": p, "checksums": "differ"} for p, same in checksums.items()
                   if not same]
    order = {p: i for i, p in enumerate(leaves_a)}
    differ.sort(key=lambda d: order[d["path"]])
    unread = [] if args.values else [leaf.path for leaf in same_arrays
                                     if leaf.path not in checksums]
    compared = len(same_py) + len(same_arrays) - len(unread)
    found = bool(only_a or only_b or changed or differ)
    if args.json:
        emit({"a": a.path, "b": b.path, "at_a": args.at_a, "at_b": args.at_b,
              "only_in_a": only_a, "only_in_b": only_b,
              "changed": [{"path": la.path, "a": _spec_json(la), "b": _spec_json(lb)}
                          for la, lb in changed],
              "values_differ": differ, "values_compared": compared,
              "arrays_compared": args.values,
              "checksums": {p: "equal" if same else "differ" for p, same in checksums.items()},
              "values_not_compared": unread, "differ": found})
        return EXIT_FOUND if found else EXIT_OK
    print(f"A = {a.path}{f' under {args.at_a}' if args.at_a else ''}\n"
          f"B = {b.path}{f' under {args.at_b}' if args.at_b else ''}")
    section(f"only in A ({len(only_a)})", [(p,) for p in only_a])
    section(f"only in B ({len(only_b)})", [(p,) for p in only_b])
    section(f"kind, dtype or shape differ ({len(changed)})",
            [(la.path, f"A {_spec(la)}", f"B {_spec(lb)}") for la, lb in changed])
    section(f"values differ ({len(differ)})", [_difference_row(d) for d in differ])
    equal = [p for p, same in checksums.items() if same]
    section(f"same stored checksums ({len(equal)})", _cli_text.capped(equal))
    section(f"values not compared ({len(unread)})", _cli_text.capped(unread))
    print(_cli_text.diff_verdict(found, len(unread), len(checksums),
                       f"{len(only_a)} only in A, {len(only_b)} only in B, {len(changed)} "
                       f"changed, {len(differ)} of {compared} values differ"))
    return EXIT_FOUND if found else EXIT_OK


def _difference_row(d: dict) -> tuple[str, ...]:
    if "checksums" in d:
        return (d["path"], "stored bytes differ (their checksums do)")
    if "elements" not in d:
        return (d["path"], f"A {short(repr(d['a']), 30)}", f"B {short(repr(d['b']), 30)}")
    return (d["path"], f"{d['differing']:,} of {d['elements']:,} elements",
            f"max abs {d['max_abs']:.4g}", f"max rel {d['max_rel']:.4g}")


def _spec(leaf: Any) -> str:
    return f"{leaf.kind} {leaf.dtype}{list(leaf.shape)}"


def _spec_json(leaf: Any) -> dict:
    return {"kind": leaf.kind, "dtype": leaf.dtype, "shape": list(leaf.shape)}


# ---- verify ----

def _verify(pc: ModuleType, args: argparse.Namespace) -> int:
    report = pc.verify(args.path, progress=_bars(args))
    if args.json:
        emit({"path": report.path, "format_version": report.format_version,
              "leaf_count": report.leaf_count,
              "bytes_read": report.bytes_read, "ok": report.ok,
              "problems": dict(report.problems)})
        return EXIT_OK if report.ok else EXIT_FOUND
    if report.ok:
        print(f"{report.path}: ok: {report.leaf_count} leaves, {size(report.bytes_read)} read, "
              "every checksum and binding checked")
        return EXIT_OK
    count = len(report.problems)
    print(f"{report.path}: {count} problem{'s' * (count != 1)} in {report.leaf_count} leaves "
          f"({size(report.bytes_read)} read):")
    for path, problem in report.problems.items():
        print(f"  {path or '<checkpoint>'}: {problem}")
    return EXIT_FOUND


# ---- steps ----

def _steps(pc: ModuleType, args: argparse.Namespace) -> int:
    if args.min and not args.best:
        raise ValueError("--min needs --best METRIC")
    best_fn: Callable[[Any], float] | None = None
    if args.best:
        metric = args.best

        def by_metric(metrics: Any) -> float:
            value = metrics.get(metric)
            return float(value) if isinstance(value, int | float) else math.nan

        best_fn = by_metric

    with pc.CheckpointManager(args.directory, read_only=True, best_fn=best_fn,
                              best_mode="min" if args.min else "max") as mgr:
        steps = mgr.steps()
        directory = mgr.directory
        rows = []
        # A carried leaf's data stays in the step folder that wrote it, under the same path;
        # where that step was deleted, its folder is retired and keeps only that data.
        carriers: dict[int, list[int]] = {}
        kept: dict[int, dict[str, int]] = {}
        for step in steps:
            info = mgr.metadata(step)
            rows.append({"step": step, "state": "committed",
                         "time": iso(info.writer.get("time")), **_cli_text.byte_counts(info),
                         "leaf_count": len(info.leaves),
                         "metrics": jsonable(dict(mgr.metrics(step) or {}))})
            for path, source in info.carried.items():
                carriers.setdefault(int(source), []).append(step)
                kept.setdefault(int(source), {})[path] = info.leaves[path].nbytes
        best = mgr.best_step()
    for step in sorted(set(carriers) - set(steps)):
        rows.append({"step": step, "state": "retired", "time": None,
                     "nbytes": sum(kept[step].values()), "written_bytes": None,
                     "carried_bytes": None, "leaf_count": len(kept[step]), "metrics": {},
                     "carried_by": sorted(set(carriers[step]))})
    # What clean would remove (incomplete saves, orphaned generations, metrics files of steps
    # that never committed), and what it keeps as young enough to be a save still writing.
    leftovers = pc.clean(args.directory)
    listed = set(steps) | set(carriers)
    for state, paths in (("incomplete", leftovers.incomplete), ("saving?", leftovers.kept)):
        for path in paths:
            step = _step_of(path, directory)
            if step is not None and step not in listed:
                listed.add(step)
                rows.append({"step": step, "state": state, "time": None, **_cli_text.byte_counts(None),
                             "leaf_count": None, "metrics": {}})
    if not rows:
        raise _Nothing(_no_steps(pc, args.directory, directory))
    rows.sort(key=lambda r: r["step"])
    for row in rows:
        row["best"] = row["step"] == best
    orphaned = list(leftovers.orphaned) + [p for p in leftovers.kept
                                           if _step_of(p, directory) is None]
    latest = steps[-1] if steps else None
    if args.json:
        emit({"directory": directory, "steps": rows, "best": best, "latest": latest,
              "orphaned": orphaned})
        return EXIT_OK
    print(f"{directory}: {len(steps)} committed steps"
          + (f", latest {latest}" if steps else "")
          + (f", best {best} ({'lowest' if args.min else 'highest'} {args.best})"
             if best is not None else ""))
    table(("step", "state", "time (UTC)", "bytes", "written", "carried", "leaves", "metrics", ""),
          [(str(r["step"]), r["state"], r["time"] or "",
            *("" if r[k] is None else size(r[k]) for k in ("nbytes", "written_bytes", "carried_bytes")),
            "" if r["leaf_count"] is None else str(r["leaf_count"]),
            short(", ".join(f"{k}={number(v)}" for k, v in r["metrics"].items())),
            "best" if r["best"] else
            "carried by " + ", ".join(map(str, r["carried_by"])) if "carried_by" in r
            else "") for r in rows], right={0, 3, 4, 5, 6})
    if any(r["state"] == "saving?" for r in rows):
        print("saving?: incomplete, and recent enough to be a save still writing")
    if any(r["state"] == "retired" for r in rows):
        print("retired: a deleted step's folder, keeping only the data (bytes, leaves) that "
              "later steps carry; the manager deletes it once no kept step does")
    section(f"orphaned generations ({len(orphaned)})", [(p,) for p in orphaned])
    if any(r["state"] in ("incomplete", "saving?") for r in rows) or orphaned:
        print("pytree-ckpt clean DIR --yes removes what is incomplete or orphaned and not recent")
    return EXIT_OK


def _step_of(path: str, directory: str) -> int | None:
    """The step whose folder or metrics file ``path`` is, inside the manager's ``directory``,
    or None."""
    name = path[len(directory.rstrip("/")) + 1:] if path.startswith(directory) else ""
    name = name.split(".metrics.msgpack", 1)[0]
    return int(name) if name.isdigit() and (name == "0" or not name.startswith("0")) else None


def _no_steps(pc: ModuleType, given: str, url: str) -> str:
    try:
        pc.metadata(given)
    except pc.StorageError:
        raise  # nothing is known: not "no steps"
    except pc.CheckpointError:
        return f"{url}: no committed steps there"
    return f"{url}: a checkpoint, not a CheckpointManager's directory (try: pytree-ckpt ls)"


# ---- convert ----

def _convert(pc: ModuleType, args: argparse.Namespace) -> int:
    report = convert(args.src, args.dst, at=args.at, to=args.to, only=args.only,
                     exclude=args.exclude, overwrite=args.overwrite, progress=_bars(args))
    if args.json:
        emit(report)
    else:
        part = f" at {args.at!r}" if args.at else ""
        left_out = len(report["left_out"])
        print(f"{report['source']} ({report['source_format']}{part}, {report['leaf_count']} "
              f"leaves, {size(report['nbytes'])}) -> {report['destination']} "
              f"({report['format']})" + (f"; {left_out} leaves left out" if left_out else ""))
    if report["metadata_dropped"]:  # ours has no place for it: say so
        print(f"pytree-ckpt: note: the safetensors __metadata__ "
              f"({', '.join(report['metadata_dropped'])}) is not in {report['destination']}: "
              "a pytree_ckpt checkpoint has no place for it", file=sys.stderr)
    return EXIT_OK


# ---- clean ----

def _clean(pc: ModuleType, args: argparse.Namespace) -> int:
    report = pc.clean(args.directory, delete=args.yes)
    found = (*report.incomplete, *report.orphaned)
    if not found and not report.kept and not _anything_there(pc, args.directory):
        raise _Nothing(f"{report.path}: no checkpoint or CheckpointManager directory there")
    if args.json:
        emit({"path": report.path, "incomplete": list(report.incomplete),
              "orphaned": list(report.orphaned), "kept": list(report.kept),
              "deleted": report.deleted})
        return EXIT_OK
    rows = ([("incomplete", p) for p in report.incomplete]
            + [("orphaned", p) for p in report.orphaned]
            + [("kept", p) for p in report.kept])
    section("leftovers of interrupted saves", rows)
    if report.kept:
        print(f"kept: {len(report.kept)} young enough to be a save still writing")
    if not found:
        print(f"{report.path}: nothing to clean")
    elif report.deleted:
        print(f"{report.path}: deleted {len(found)}")
    else:
        print(f"{report.path}: {len(found)} can be deleted: run again with --yes")
    return EXIT_OK


def _anything_there(pc: ModuleType, path: str) -> bool:
    """Whether ``path`` holds a checkpoint (of any format) or a manager's committed steps."""
    try:
        pc.metadata(path)
        return True
    except pc.StorageError:
        raise
    except pc.CheckpointError:
        return pc.latest(path) is not None


# ---- shared ----

def _bars(args: argparse.Namespace) -> bool:
    """Whether to draw progress bars (on stderr): only on a terminal, and never with --json."""
    return sys.stderr.isatty() and not args.json


def _metadata(pc: ModuleType, path: str) -> Any:
    """pc.metadata(path), with a hint when the path is a manager's directory."""
    try:
        return pc.metadata(path)
    except pc.CheckpointNotFoundError as e:
        try:
            newest = pc.latest(path)
        except Exception:
            newest = None
        if newest is None:
            raise
        raise pc.CheckpointNotFoundError(
            f"{e} -- a CheckpointManager's directory: name a step, e.g. {newest}, or run "
            "pytree-ckpt steps") from None
