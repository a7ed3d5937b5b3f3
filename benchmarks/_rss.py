"""Peak resident memory of one save or one restore, each in a fresh process.

The parent calls `measure_rss`, which runs this file as a worker:

    python benchmarks/_rss.py --side pytree_ckpt --op save --tree small --path DIR [--smoke]

The worker imports everything, warms its side up on a tiny tree (thread pools, TensorStore
contexts), and, for `save`, builds the tree. Right before the operation it reads its
resident set size (**before**) and resets the kernel's high-water mark (`5` into
`/proc/self/clear_refs`); it runs the operation (a restore until every array is ready) and
reads `VmHWM`: the **peak**, and times the operation (once, in fresh memory). It prints
one JSON line.

Reported, as a multiple of the tree's array bytes:
- restore: `(peak - before) / bytes`: the restored tree is in it (1.0 is the result itself).
- arrays (`--side pytree_ckpt` only): the same for the tree's arrays made by pytree_ckpt's
  batched transfer from one host buffer and nothing else, the least any restore into them
  holds (`benchmarks/small_floor.py`).
- save: `1 + (peak - before) / bytes`: the tree counted as exactly its bytes, plus what the
  save adds. (Measuring from before the tree existed would also count what building the
  tree costs beyond its bytes: 10,000 `jax.Array` objects, allocator slack; ~0.6x for
  the small tree.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

KIB = 1024


def measure_rss(side: str, op: str, tree: str, path: str, smoke: bool) -> dict:
    """Run one worker; return its base, peak and `(peak - base) / tree_bytes`."""
    command = [sys.executable, __file__, "--side", side, "--op", op, "--tree", tree]
    command += ["--path", path] + (["--smoke"] if smoke else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"RSS worker {side} {op} {tree} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    added = (result["peak_rss"] - result["before_rss"]) / result["tree_bytes"]
    result["ratio"] = added + (1.0 if op == "save" else 0.0)
    return result


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * KIB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _warm_up(side, scratch: str) -> None:
    import jax.numpy as jnp

    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        tiny = {"w": jnp.ones(1024, jnp.float32)}
        side.save(tiny, os.path.join(tmp, "warm"))
        side.restore(os.path.join(tmp, "warm"), {"w": tiny["w"]})


def _run(args: argparse.Namespace) -> dict:
    import gc

    import jax
    import numpy as np
    from _sides import make_side
    from _trees import leaf_bytes, materialize, tree_bytes, tree_spec

    side = make_side(args.side)
    _warm_up(side, scratch=os.path.dirname(os.path.abspath(args.path)))
    spec = tree_spec(args.tree, args.smoke)
    gc.collect()
    base = _status_bytes("VmRSS")
    tree = materialize(spec) if args.op == "save" else None
    source = (np.ones(max(map(leaf_bytes, jax.tree_util.tree_leaves(spec))), np.uint8)
              if args.op == "arrays" else None)
    gc.collect()
    before = _status_bytes("VmRSS")
    reset = _reset_peak()
    start = time.perf_counter()
    if args.op == "save":
        side.save(tree, args.path)
    elif args.op == "arrays":
        jax.block_until_ready(_arrays_only(spec, source))
    else:
        jax.block_until_ready(side.restore(args.path, spec))
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    side.close()
    return {
        "base_rss": base,  # after imports and a warm-up, before the tree existed
        "before_rss": before,  # right before the operation
        "peak_rss": peak,
        "tree_bytes": tree_bytes(spec),
        "peak_reset": reset,  # False: the peak may include building the tree
        # One run in a fresh process: every buffer is new memory, which this project's VM
        # hands out slowly (page faults); within one process, an operation's speed also
        # depends on what memory the previous one freed.
        "seconds": seconds,
    }


def _arrays_only(spec: Any, source: Any) -> list:
    """Each array of ``spec``, made from the start of ``source`` by the batched transfer a
    restore uses."""
    import jax
    from _trees import leaf_bytes

    from pytree_ckpt import _transfer

    return [_transfer.to_device(source[:leaf_bytes(x)].view(x.dtype).reshape(x.shape), x.sharding,
                                copy=True) for x in jax.tree_util.tree_leaves(spec)]


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", required=True)
    parser.add_argument("--op", choices=("save", "restore", "arrays"), required=True)
    parser.add_argument("--tree", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--smoke", action="store_true")
    return parser.parse_args()


if __name__ == "__main__":
    print(json.dumps(_run(_parse())))
