"""The least a restore of the small tree can cost: the floor under issue 5's two misses.

Two of the benchmark's targets are missed on the small tree (10,000 leaves of 1-16 KiB):
the restore's overhead per leaf beyond reading its bytes (target 10 µs) and its peak RSS
(target 1.3x the tree's bytes). This script measures what any restore into 10,000
`jax.Array`s pays here, next to pytree_ckpt's own:

- **floor**: restore's own reading of packed leaves (`_read._packed_ranges`: the same
  byte ranges, as many in flight; `_read._checked`: each leaf's CRC-32C; the same batched
  transfer), then the tree rebuilt and waited for: with every path matched, every record
  decoded and every range grouped before the clock starts. What a restore does beyond this is flattening the
  target, matching paths, decoding the commit file and the status record.
- **restore**: `pytree_ckpt.restore` of the same checkpoint, the same abstract target.
- **disk read**: the tree's bytes read as one file (the benchmark's `disk` side), which
  the overhead per leaf is measured beyond: `(time - disk read) / leaves`.
- **peak RSS** in fresh processes (`_rss.py`): of the restore (as `bench.py` measures it),
  and of the 10,000 arrays alone, made by the same transfer from one host buffer and
  nothing else (`--op arrays`).

Timed calls alternate between floor and restore, each after `_timing.settle`; medians.

    python benchmarks/small_floor.py [--rounds 11] [--smoke] [--out FILE] [--workdir DIR]

It uses pytree_ckpt's internals (to plan the floor's reads); `make test` runs it with
`--smoke` so it keeps up with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def _plan(path: str, spec: Any) -> tuple:
    """Everything the floor decides before its clock starts: the commit file decoded, every
    target path matched to its record, the ranges grouped (restore's own helpers)."""
    from pytree_ckpt import _build, _graph, _match, _open, _read, _storage

    loc = _storage.location(path)
    kv = _storage.open_kvstore(loc)
    commit = _open.load_commit(loc, kv)
    flat = _graph.flatten(spec)
    records = commit.leaves.records(flat.paths)
    device = _build.default_device()
    jobs = [(p, r, _match.want_for(p, leaf, device))
            for p, r, leaf in zip(flat.paths, records, flat.leaves, strict=True)]
    if any(r.storage.kind != "p" for _p, r, _w in jobs):
        raise SystemExit("the floor reads packed leaves only: use the small tree")
    groups = list(_read._range_groups(jobs, _read._LOCAL_RANGES.most))
    return loc.url, kv, commit, flat, groups


def _floor(planned: tuple) -> Any:
    """Restore's own packed-leaf reading, checking and transfers, and the tree they make."""
    import jax

    from pytree_ckpt import _format, _gc_pause, _read, _transfer

    url, kv, commit, flat, groups = planned
    crc = _format.LEAF_CRC[commit.version]
    out = {}
    with _gc_pause.paused():  # as restore's own per-leaf loops
        for group, data, start, blob in _read._packed_ranges(
                url, kv, commit, groups, _read._LOCAL_RANGES.in_flight):
            for path, rec, want in group:
                host = _read._checked(url, data, start, rec, blob, crc)
                out[path] = _transfer.to_device(host, want.sharding, copy=True)
        tree = jax.tree_util.tree_unflatten(flat.treedef, list(map(out.__getitem__, flat.paths)))
    return jax.block_until_ready(tree)


def _time(args: argparse.Namespace, workdir: str) -> dict:
    import jax
    import numpy as np
    from _sides import Disk
    from _timing import settle
    from _trees import materialize, tree_bytes, tree_spec

    import pytree_ckpt as pc

    spec = tree_spec("small", args.smoke)
    tree, nbytes = materialize(spec), tree_bytes(spec)
    path = os.path.join(workdir, "ckpt")
    pc.save(tree, path)
    disk = Disk()
    disk.prepare(tree)
    disk.save(tree, os.path.join(workdir, "disk"))
    disk.release()
    del tree
    planned = _plan(path, spec)
    calls = {
        "floor": lambda: _floor(planned),
        "restore": lambda: jax.block_until_ready(pc.restore(path, spec)[0]),
        "disk_read": lambda: disk.restore(os.path.join(workdir, "disk"), spec),
    }
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    warm = {name: call() for name, call in calls.items()}  # warm-up, and a check:
    for ours, floors in zip(jax.tree_util.tree_leaves(warm["restore"]),
                            jax.tree_util.tree_leaves(warm["floor"]), strict=True):
        if not np.array_equal(ours, floors):  # the floor restores the same values
            raise RuntimeError("the floor's tree differs from restore's")
    del warm
    for round_ in range(args.rounds):
        for name in (list(calls) if round_ % 2 else list(calls)[::-1]):
            settle(False, 2 * nbytes, wait_idle=not args.smoke)
            start = time.perf_counter()
            result = calls[name]()
            seconds[name].append(time.perf_counter() - start)
            del result
    leaves = len(jax.tree_util.tree_leaves(spec))
    ms = {name: statistics.median(v) * 1e3 for name, v in seconds.items()}
    return {
        "leaves": leaves, "bytes": nbytes, "rounds": args.rounds, "ms": ms,
        "overhead_us_per_leaf": {
            name: (ms[name] - ms["disk_read"]) * 1e3 / leaves for name in ("floor", "restore")},
        "checkpoint": path,
    }


def _rss(checkpoint: str, smoke: bool) -> dict:
    from _rss import measure_rss

    return {"arrays_only": measure_rss("pytree_ckpt", "arrays", "small", checkpoint, smoke)["ratio"],
            "restore": measure_rss("pytree_ckpt", "restore", "small", checkpoint, smoke)["ratio"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--smoke", action="store_true", help="the tiny tree, 1 round")
    parser.add_argument("--out", help="write the JSON here too")
    parser.add_argument("--workdir", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    if args.smoke:
        args.rounds = 1
    os.makedirs(args.workdir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="floor-") as workdir:
        result = _time(args, workdir)
        result["peak_rss_x_tree_bytes"] = _rss(result.pop("checkpoint"), args.smoke)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
