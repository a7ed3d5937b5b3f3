"""Shared reads: R processes restoring a replicated tree, with and without ``share_reads``.

    python benchmarks/shared_reads.py                 # R = 2 and 4, loopback S3 and local disk
    python benchmarks/shared_reads.py --processes 2 --mib 16 --rounds 1

A tree of one replicated float32 leaf of ``--mib`` MiB (chunks of 4 MiB) and a small one is
saved once per setting, then restored by a ``jax.distributed`` job of R processes (gloo CPU
collectives on loopback, one device each) onto a mesh that replicates it on every process:
``share_reads=True`` and ``False`` alternately, ``--rounds`` times each. From moto's S3
server, every request goes through a counting proxy; the bucket's GETs of chunk objects are
reported per restore (where a chunk's checksum trailer is read by a GET of its own, a chunk
read costs 2). Times are the slowest process's restore, median over rounds.

Reuses the test suite's loopback servers, proxy and multi-process harness (``tests/``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

JOB = r"""
import json, time
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import pytree_ckpt as pc

mesh = Mesh(np.array(jax.devices()), ("replica",))
rows = args["mib"] * (1 << 20) // (4 * 1024)
target = {"w": jax.ShapeDtypeStruct((rows, 1024), np.float32, sharding=NamedSharding(mesh, P())),
          "b": jax.ShapeDtypeStruct((1024,), np.float32, sharding=NamedSharding(mesh, P()))}
times = {"on": [], "off": []}
for _ in range(args["rounds"]):
    for mode in ("on", "off"):
        from pytree_ckpt import _distributed
        _distributed.report_and_check(f"bench/{mode}/{len(times[mode])}", None, 60)
        t = time.perf_counter()
        tree, _ = pc.restore(args[mode], target, share_reads=mode == "on")
        jax.block_until_ready(tree)
        times[mode].append(time.perf_counter() - t)
        del tree
print("TIMES", json.dumps(times))
"""


def _save(url: str, mib: int) -> None:
    import jax
    import numpy as np

    import pytree_ckpt as pc
    rows = mib * (1 << 20) // (4 * 1024)
    tree = {"w": jax.numpy.asarray(np.random.default_rng(0).standard_normal(
        (rows, 1024), dtype=np.float32)), "b": jax.numpy.ones(1024)}
    pc.save(tree, url)


def _job(processes: int, paths: dict, mib: int, rounds: int) -> dict[str, float]:
    from _multiprocess import assert_all_ok, run_multiprocess
    results = run_multiprocess(JOB, num_processes=processes, devices_per_process=1,
                               timeout_s=600, heartbeat_timeout_s=60,
                               args={**paths, "mib": mib, "rounds": rounds})
    assert_all_ok(results)
    per = [json.loads(r.stdout.split("TIMES ", 1)[1].splitlines()[0]) for r in results]
    return {mode: statistics.median(max(p[mode][i] for p in per) for i in range(rounds))
            for mode in ("on", "off")}


def _chunk_gets(keys: list[str], prefix: str) -> int:
    return sum(1 for k in keys if k.startswith(prefix) and re.search(r"/a/\d+/c/", k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--mib", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from _proxy import FaultProxy
    from _servers import moto_s3_server, patched_environ

    from pytree_ckpt import _storage
    rows = []
    with moto_s3_server() as server, patched_environ(server.env()), \
            FaultProxy(server.endpoint) as proxy, tempfile.TemporaryDirectory() as tmp:
        os.environ.update(AWS_ENDPOINT_URL=proxy.endpoint, AWS_REGION=server.region)
        _storage.forget_contexts()
        paths = {"s3": {m: f"{server.url}/bench/{m}" for m in ("on", "off")},
                 "disk": {m: f"{tmp}/{m}" for m in ("on", "off")}}
        for where in paths.values():
            for url in where.values():
                _save(url, a.mib)
        objects = _chunk_gets(proxy.keys("put"), "bench/on/")
        for r in a.processes:
            for where, at in paths.items():
                proxy.clear()
                times = _job(r, at, a.mib, a.rounds)
                keys = proxy.keys("get")
                gets = {m: _chunk_gets(keys, f"bench/{m}/") / a.rounds for m in ("on", "off")}
                rows.append((r, where, times, gets if where == "s3" else None))
    print(f"replicated tree: {a.mib} MiB in {objects} chunk objects; {a.rounds} rounds each")
    print(f"{'R':>2} {'where':5} {'shared s':>9} {'unshared s':>10} {'chunk GETs shared':>18}"
          f" {'unshared':>9}")
    for r, where, times, gets in rows:
        g = (f"{gets['on']:>18g} {gets['off']:>9g}" if gets else f"{'':>18} {'':>9}")
        print(f"{r:>2} {where:5} {times['on']:>9.2f} {times['off']:>10.2f} {g}")
    print(json.dumps({"objects": objects, "rows": [
        {"processes": r, "where": w, "seconds": t, "chunk_gets": g} for r, w, t, g in rows]}))


if __name__ == "__main__":
    main()
