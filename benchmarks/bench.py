"""Benchmark pytree_ckpt against Orbax, plain np.save and the disk itself, in one run.

Run it (not part of `make test`):

    make bench                                   # python benchmarks/bench.py: every tree
    python benchmarks/bench.py --trees small --repeats 3 --out benchmarks/results/small.json
    python benchmarks/bench.py --smoke           # tiny trees, 1 repeat, < 60 s (the test's run)
    python benchmarks/bench.py --no-orbax        # pytree_ckpt, np.save and the disk only

It benchmarks the `pytree_ckpt` of this checkout (`src/` goes first on `sys.path`) and
sets `XLA_FLAGS=--xla_force_host_platform_device_count=8` before jax is imported, so the
`sharded` tree has 8 CPU devices; the other trees live on device 0.

Trees (`benchmarks/_trees.py`): `small` (10,000 float32 leaves of 1-16 KiB, nested dicts),
`big` (16 float32 arrays of 4096x4096, 1 GiB), `train` (a 12-block, width-768 transformer's
params with optax Adam mu/nu and a step, 1.3 GB), `sharded` (`train` on a 4x2 mesh).

Sides (`benchmarks/_sides.py`), all durable (fsynced) on the same disk:
`pytree_ckpt`, `orbax` (`StandardCheckpointer`), `np.save` (one fsynced `.npy` per leaf),
`disk` (the same bytes as one sequential fsynced file, read back into one buffer).

Protocol (`benchmarks/_timing.py`): per tree, Orbax runs in a worker process of its own
and the other sides in another (`benchmarks/_side_process.py`: after an Orbax save and
restore, any Python in the same process ran ~1.3x slower), each building the tree with the
same seed; each side runs each operation once as a warm-up, then `--repeats` rounds; in a
round each operation runs for every side back to back, the side order reversed every other
round; fresh directories for every save; `gc.collect()`, `os.sync()` and a wait until the
machine is idle (background threads of the previous call done) before each timed call, and
before each save and restore twice the tree's bytes of memory touched and freed (so that
every such call finds the same freed memory to reuse, see Memory below).
Reads hit a warm page cache (each side reads what it just wrote) unless `--cold`, which
drops the page cache before every read (needs root; `echo 3 > /proc/sys/vm/drop_caches`).
Reported numbers are medians.

What each number means (seconds are wall-clock medians):
- save: `save(tree, fresh_path)` until durable and committed. Orbax: `save` then
  `wait_until_finished`, then fsync of the metadata files Orbax leaves unsynced.
- restore: restore onto an abstract target (`jax.ShapeDtypeStruct` with shardings), until
  every array is ready. disk: reading the one file.
- save_async blocks for: time until `save_async` (Orbax: `StandardCheckpointer.save`)
  returns; save_async until durable: until `fut.result()` / `wait_until_finished` returns.
- metadata(): `pc.metadata(path)` / `StandardCheckpointer.metadata(path)`.
- restore at=: `pc.restore(path, subtree_spec, at=...)` of the dict subtree holding closest
  to 1% of the bytes; the target compares it with the full restore.
- orbax/pc: Orbax's median over pytree_ckpt's (above 1: pytree_ckpt is faster).
- save bandwidth / disk bandwidth: disk's save time over pytree_ckpt's save time.
- restore overhead per leaf: (pytree_ckpt restore - disk read of the same bytes) / leaves.
- peak RSS / tree bytes: in a fresh process per operation, the peak RSS during the
  operation minus the RSS right before it, over the tree's bytes; a save adds 1 for
  the tree it holds, a restore's result is in its peak (`benchmarks/_rss.py`).
- save / restore in a fresh process: the same workers' operation, timed once: every
  buffer is new memory there (see Memory below), where within one process an operation
  may reuse what the previous one freed.

Memory: in a VM with a free-page-reporting balloon (as on the machine this was written
on), freed memory goes back to the host within seconds and costs a host page fault when
touched again (`first_touch_gib_s` in the JSON: ~0.4 GiB/s there, slower than the disk).
It weighs on every allocation of every side alike, per byte allocated; a restore that
allocates its result once pays it once. Within one process, a call is fast when the call
before it freed as much memory as it allocates: hence the memory recycled before every
timed save and restore (without it, the side that restored first in a round was up to 2x
slower), and the fresh-process timings, where every side allocates everything new.
Short calls (metadata, at=) get no recycling: it made them stall now and then.

Output: a table per tree with PASS/FAIL per target, a summary, and a JSON file
(`--out`, default `benchmarks/results/<name>.json`; the results directory is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
TREE_NAMES = ("small", "big", "train", "sharded")
DEVICE_FLAG = "--xla_force_host_platform_device_count=8"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _configure_environment()
    if args.cold:
        _require_drop_caches()
    from _run import environment

    record = {"environment": environment(args), "trees": _benchmark(args)}
    out = _write(record, args)
    print(f"\nwrote {out}")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="pytree_ckpt vs Orbax vs np.save vs disk.")
    parser.add_argument(
        "--trees",
        default=",".join(TREE_NAMES),
        type=_tree_list,
        help="comma-separated subset of small,big,train,sharded",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--smoke", action="store_true", help="tiny trees, 1 repeat")
    parser.add_argument("--out", type=Path, help="JSON path (default results/<name>.json)")
    parser.add_argument("--name", help="result name (default: trees and a timestamp)")
    parser.add_argument("--no-orbax", action="store_true", help="leave Orbax out")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before reads")
    parser.add_argument("--workdir", type=Path, help="where checkpoints go (default: results/)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats = 1
    return args


def _tree_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = sorted(set(names) - set(TREE_NAMES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown trees {unknown}; choose from {TREE_NAMES}")
    return names


def _configure_environment() -> None:
    """Must run before jax is imported: 8 CPU devices; this checkout's pytree_ckpt first."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_FLAG}".strip()
    src = REPO / "src"
    if (src / "pytree_ckpt" / "__init__.py").exists():
        sys.path.insert(0, str(src))
        # The RSS workers are fresh interpreters: they find the same package.
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH")) if p)


def _require_drop_caches() -> None:
    from _timing import can_drop_page_cache

    if not can_drop_page_cache():
        sys.exit("--cold needs write access to /proc/sys/vm/drop_caches (root)")


def _benchmark(args: argparse.Namespace) -> dict[str, dict]:
    import _report
    from _run import benchmark_tree

    names = [_report.PC] + ([] if args.no_orbax else [_report.ORBAX])
    sides = names + [_report.NPSAVE, _report.DISK]
    results = {}
    RESULTS.mkdir(exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="work-", dir=args.workdir or RESULTS)
    try:
        for tree in args.trees:
            results[tree] = benchmark_tree(
                tree,
                sides,
                repeats=args.repeats,
                smoke=args.smoke,
                workdir=workdir,
                cold=args.cold,
            )
            print("\n" + _report.format_table(results[tree]), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + _report.format_summary(results))
    return results


def _write(record: dict, args: argparse.Namespace) -> Path:
    name = args.name or "-".join(
        ["smoke" if args.smoke else "-".join(args.trees), time.strftime("%Y%m%d-%H%M%S")]
    )
    out = args.out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main())
