"""Incremental steps against full saves, side by side in one run, on a frozen-base fine-tune.

The tree: a frozen base (``--base-mib``, in 16 arrays: the same jax.Arrays at every step)
plus trained leaves (``--trained-mib``, in 8 arrays) and their Adam moments (``mu`` and
``nu``, as large), all new arrays at every step. Two CheckpointManagers save the same steps
into two directories of the same store, one with ``incremental=False``, both with ``keep=2``
and the default ``async_save``. Step 1 is a full save on both sides; every later step is
timed from ``save()`` until it is committed (``latest_step()`` says so: polled every
millisecond), and its bytes counted twice, *written* and *stored*; then ``wait()`` is timed
apart: what is left of retention's deletes of the step two before, which run in the
background after the commit (*later step + deletes* is the sum, what a save with
``async_save=False`` takes). Then each side's last step is restored into an abstract target
(until every array is ready), alternating sides. Every timed call follows ``os.sync()`` and
a wait for idle CPUs (``_timing.settle``); medians are printed.

``--where`` picks the stores, each measured in turn (both by default):

- ``local``: a temporary directory (``--workdir``). Written: ``wchar`` (the bytes this
  process passed to ``write``, TensorStore's threads included); stored: the bytes of the
  step's folder on disk.
- ``s3``: moto's S3 server on loopback (the test suite's, ``tests/_servers.py``), every
  request through the counting proxy ``tests/_proxy.py`` (both sides pay the same hop).
  Written: the bodies of the step's PUT requests as the proxy saw them (with their count);
  stored: the sizes of the objects below the step's prefix, listed from the server.

The issue's tree is a 1 GiB base and 16 MiB trained: ``--base-mib 1024``. The default,
256 MiB, is kinder to a small shared machine; the ratios are what the targets bound (a later
step: at most 5% of a full save's bytes and 10% of its time; a carried step's restore within
1.1x of a full one's).

    python benchmarks/incremental.py [--where local s3] [--base-mib 256] [--trained-mib 16]
                                     [--steps 5] [--restores 5] [--workdir DIR] [--json]
                                     [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
SIDES = {"full": False, "incremental": True}  # name -> the manager's `incremental`


def wchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar")).split()[1])


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _dirs, files in os.walk(path) for f in files)


def arrays(mib: int, count: int, seed: int) -> list:
    import jax.numpy as jnp
    import numpy as np

    n = max(mib * (1 << 20) // 4 // count, 1)
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(n, dtype=np.float32)) for _ in range(count)]


class Local:
    """A temporary directory; written: ``wchar``, stored: the step folder's bytes on disk."""

    def __init__(self, stack: contextlib.ExitStack, workdir: str | None):
        self.root = tempfile.mkdtemp(prefix="incremental-", dir=workdir)
        stack.callback(shutil.rmtree, self.root, True)

    def start(self) -> None:
        self._before = wchar()

    def counted(self, directory: str, step: int) -> dict:
        return {"written": wchar() - self._before,
                "stored": folder_bytes(os.path.join(directory, str(step)))}


class S3:
    """moto's S3 server on loopback behind the counting proxy; written: the PUT bodies the
    proxy forwarded, stored: the objects' sizes below the step's prefix."""

    def __init__(self, stack: contextlib.ExitStack):
        sys.path.insert(0, TESTS)
        import boto3
        from _proxy import FaultProxy
        from _servers import moto_s3_server, patched_environ

        from pytree_ckpt import _storage

        server = stack.enter_context(moto_s3_server())
        stack.enter_context(patched_environ(server.env()))
        self.proxy = stack.enter_context(FaultProxy(server.endpoint))
        stack.enter_context(patched_environ({"AWS_ENDPOINT_URL": self.proxy.endpoint,
                                             "AWS_REGION": server.region}))
        _storage.forget_contexts()
        stack.callback(_storage.forget_contexts)
        self.root, self._bucket = f"{server.url}/incremental", server.bucket
        self._objects = boto3.client(
            "s3", endpoint_url=server.endpoint, region_name=server.region,
            aws_access_key_id=server.access_key_id,
            aws_secret_access_key=server.secret_access_key).get_paginator("list_objects_v2")

    def start(self) -> None:
        self.proxy.clear()

    def counted(self, directory: str, step: int) -> dict:
        prefix = f"{directory.split('/', 3)[3]}/{step}/"
        stored = sum(o["Size"] for page in self._objects.paginate(Bucket=self._bucket,
                                                                  Prefix=prefix)
                     for o in page.get("Contents", ()))
        return {"written": self.proxy.sent("put"), "puts": len(self.proxy.keys("put")),
                "stored": stored}


def measure(store, args, base: list, trained: list, settle) -> dict:
    """Both sides' saves and restores in ``store`` (a :class:`Local` or :class:`S3`)."""
    import jax

    import pytree_ckpt as pc

    managers = {name: pc.CheckpointManager(f"{store.root}/{name}", keep=2, incremental=flag)
                for name, flag in SIDES.items()}
    results: dict = {name: {"time": [], "deletes": [], "counts": [], "restore": []}
                     for name in SIDES}
    try:
        for step in range(1, args.steps + 2):
            new = [x + step for x in trained]  # new arrays at every step, as training makes
            state = {"base": base, "params": new, "mu": [x * 0.1 for x in new],
                     "nu": [x * x for x in new], "step": step}
            jax.block_until_ready(state)
            for name in (list(SIDES) if step % 2 else list(reversed(SIDES))):
                settle()
                store.start()
                start = time.perf_counter()
                managers[name].save(step, state)
                while managers[name].latest_step() != step:
                    time.sleep(0.001)
                seconds = time.perf_counter() - start
                start = time.perf_counter()
                managers[name].wait()
                deletes = time.perf_counter() - start
                counts = store.counted(f"{store.root}/{name}", step)
                if step == 1:
                    results[name]["first"] = {"time": seconds, **counts}
                else:
                    results[name]["time"].append(seconds)
                    results[name]["deletes"].append(deletes)
                    results[name]["counts"].append(counts)
        last = args.steps + 1
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                              sharding=x.sharding)
                              if isinstance(x, jax.Array) else x, state)
        for k in range(args.restores):
            for name in (list(SIDES) if k % 2 else list(reversed(SIDES))):
                settle()
                store.start()
                start = time.perf_counter()
                tree, _ = managers[name].restore(last, target)
                jax.block_until_ready(tree)
                results[name]["restore"].append(time.perf_counter() - start)
                del tree
    finally:
        for mgr in managers.values():
            mgr.close()
    report: dict = {}
    for name, r in results.items():
        report[name] = {"later_step_s": statistics.median(r["time"]),
                        "with_deletes_s": statistics.median(
                            t + d for t, d in zip(r["time"], r["deletes"], strict=True)),
                        "restore_s": statistics.median(r["restore"]), "first": r["first"]}
        for key in r["counts"][0]:
            report[name][f"later_step_{key}"] = statistics.median(c[key] for c in r["counts"])
    full, inc = report["full"], report["incremental"]
    report["ratios"] = {
        "bytes (written)": inc["later_step_written"] / full["later_step_written"],
        "bytes (stored)": inc["later_step_stored"] / full["later_step_stored"],
        "time": inc["later_step_s"] / full["later_step_s"],
        "time with deletes": inc["with_deletes_s"] / full["with_deletes_s"],
        "restore": inc["restore_s"] / full["restore_s"],
    }
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--where", nargs="+", choices=("local", "s3"), default=["local", "s3"])
    parser.add_argument("--base-mib", type=int, default=256)
    parser.add_argument("--trained-mib", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="steps saved after the first")
    parser.add_argument("--restores", type=int, default=5, help="restores of each side")
    parser.add_argument("--workdir", default=None, help="where the local directories go")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny tree, one restore each, no waiting for idle CPUs (a test)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.base_mib, args.trained_mib, args.steps, args.restores = 8, 1, 1, 1
    sys.path.insert(0, HERE)
    import jax
    from _timing import settle as settle_for_timing

    def settle() -> None:
        if not args.smoke:
            settle_for_timing(False, 0)

    base = arrays(args.base_mib, 16, 0)
    trained = arrays(args.trained_mib, 8, 1)
    report: dict = {}
    for where in args.where:
        with contextlib.ExitStack() as stack:
            store = Local(stack, args.workdir) if where == "local" else S3(stack)
            report[where] = measure(store, args, base, trained, settle)
    report["tree"] = {"base_mib": args.base_mib, "trained_mib": args.trained_mib,
                      "steps": args.steps, "restores": args.restores,
                      "device": str(jax.devices()[0].platform)}
    if args.json:
        print(json.dumps(report))
        return report
    mib = 1 << 20
    print(f"frozen base {args.base_mib} MiB + trained {args.trained_mib} MiB (+ mu, nu), "
          f"{args.steps} later steps, {args.restores} restores, medians")
    for where in args.where:
        print(f"\n{where}: written = {'wchar' if where == 'local' else 'PUT bodies'}, "
              f"stored = {'on disk' if where == 'local' else 'objects below the step'}")
        print(f"{'':12} {'later step':>11} {'+ deletes':>10} {'written':>12} {'stored':>12} "
              f"{'restore':>9}")
        for name in SIDES:
            r = report[where][name]
            puts = f" ({r['later_step_puts']:.0f} PUTs)" if "later_step_puts" in r else ""
            print(f"{name:12} {r['later_step_s']:10.3f}s {r['with_deletes_s']:9.3f}s "
                  f"{r['later_step_written'] / mib:8.1f} MiB"
                  f" {r['later_step_stored'] / mib:8.1f} MiB {r['restore_s']:8.3f}s{puts}")
        print("incremental / full: " + ", ".join(
            f"{k} {v:.3f}" for k, v in report[where]["ratios"].items()))
    return report


if __name__ == "__main__":
    main()
