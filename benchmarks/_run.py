"""One tree end to end: build it, time every side, measure peak RSS, judge the targets.

Imported only after `bench.py` has set `XLA_FLAGS` (this module imports jax).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import _report
import jax
from _rss import measure_rss
from _timing import recycle_memory, time_sides
from _trees import leaf_count, subtree_near, tree_bytes, tree_spec

CHECKPOINTERS = (_report.PC, _report.ORBAX)  # the sides whose peak RSS is measured


def benchmark_tree(
    name: str, sides: Sequence[str], *, repeats: int, smoke: bool, workdir: str, cold: bool
) -> dict[str, Any]:
    """Every number for one tree, as the JSON record of that tree."""
    spec = tree_spec(name, smoke)
    tree_dir = os.path.join(workdir, name)
    timings = time_sides(name, smoke, spec, sides, repeats, tree_dir, cold)
    rss = _measure_rss(name, sides, timings.last_checkpoints, smoke, tree_dir)
    shutil.rmtree(tree_dir)
    return _record(name, spec, timings.runs, rss, repeats, cold)


def _measure_rss(
    name: str, sides: Sequence[str], checkpoints: dict[str, str], smoke: bool, tree_dir: str
) -> dict[str, dict[str, dict]]:
    """Save and restore RSS per checkpointer, one worker process each.

    The workers run one at a time (each may hold a few GB), except for the tiny smoke
    trees, where they run side by side to keep the smoke run short.
    """
    jobs = {}
    for side in (s for s in sides if s in CHECKPOINTERS):
        fresh = os.path.join(tree_dir, f"rss-save-{side}")
        jobs[side, "save"] = (side, "save", name, fresh, smoke)
        jobs[side, "restore"] = (side, "restore", name, checkpoints[side], smoke)
    with ThreadPoolExecutor(max_workers=len(jobs) if smoke else 1) as pool:
        futures = {key: pool.submit(measure_rss, *job) for key, job in jobs.items()}
    rss: dict[str, dict[str, dict]] = {}
    for (side, op), future in futures.items():
        rss.setdefault(side, {})[op] = future.result()
    return rss


def _record(name: str, spec: Any, runs: dict, rss: dict, repeats: int, cold: bool) -> dict[str, Any]:
    subtree = subtree_near(spec)
    nbytes, leaves = tree_bytes(spec), leaf_count(spec)
    medians = _report.medians(runs)
    derived = _report.derived_numbers(medians, rss, nbytes, leaves)
    return {
        "tree": name,
        "leaves": leaves,
        "bytes": nbytes,
        "repeats": repeats,
        "page_cache": "cold" if cold else "warm",
        "subtree": subtree and {"path": subtree.path, "fraction": subtree.fraction},
        "seconds": {
            side: {op: {"median": medians[side][op], "runs": values} for op, values in ops.items()}
            for side, ops in runs.items()
        },
        "rss": rss,
        "derived": derived,
        "targets": _report.judge(_report.targets_for(name, subtree), derived),
    }


def environment(args: Any) -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "python": platform.python_version(),
        "versions": _versions(),
        "cpu_count": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()],
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "page_cache": "cold (dropped before every read)" if args.cold else "warm",
        "repeats": args.repeats,
        "smoke": args.smoke,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "virtio_balloon": os.path.exists("/sys/bus/virtio/drivers/virtio_balloon"),
        "first_touch_gib_s": _first_touch_gib_s(),
    }


def _first_touch_gib_s(nbytes: int = 256 * 2**20) -> float:
    """How fast fresh memory is faulted in (writing one byte per 4 KiB page).

    In a VM whose balloon reports free pages to the host, memory freed by any process is
    handed back within seconds and faulted in again from the host on its next use; that
    can be slower than the disk and weighs on every allocation of every side.
    """
    start = time.perf_counter()
    recycle_memory(nbytes)
    return nbytes / (time.perf_counter() - start) / 2**30


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import pytree_ckpt

    found = {"pytree_ckpt": f"{pytree_ckpt.__version__} ({os.path.dirname(pytree_ckpt.__file__)})"}
    for package in ("jax", "jaxlib", "orbax-checkpoint", "tensorstore", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
        ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or None
