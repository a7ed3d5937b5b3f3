"""Reading other tools' checkpoints: pytree_ckpt against the tools' own readers, in one run.

    python benchmarks/formats.py                  # every comparison, 3 rounds
    python benchmarks/formats.py --smoke          # tiny trees, 1 round (the test's run)
    python benchmarks/formats.py --only orbax-small safetensors-big

Comparisons (ratios of medians, theirs over ours: above 1, pytree_ckpt is faster):

- orbax-<tree>: an Orbax checkpoint of the tree (``StandardCheckpointer``, its defaults:
  OCDBT, zarr v2) restored onto the tree's abstract target (``jax.ShapeDtypeStruct`` with
  shardings) by ``StandardCheckpointer().restore(path, target)`` and by
  ``pc.restore(path, target)``, every array ready. Targets: >= 10x on ``small`` (10,000
  leaves), >= 1x on ``big`` and ``train``.
- safetensors-big: a safetensors file of the big tree (written by the ``safetensors``
  package) read by ``safetensors.numpy.load_file`` followed by ``jax.device_put`` onto the
  target's devices, and by ``pc.restore(path, target)``. Target: pytree_ckpt within 1.2x
  (ratio >= 1/1.2).

Trees are those of bench.py (``benchmarks/_trees.py``), built from the same seed. Each
round runs both readers back to back, their order reversed every other round, after one
untimed warm-up each; ``gc.collect()`` before each timed call. Files are written once per
tree, in a temporary folder (``--workdir``), and read from a warm page cache. Both
readers run in this one process; Orbax's threads and caches stay alive after its calls,
which if anything slows the pytree_ckpt calls that follow them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import _trees  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import pytree_ckpt as pc  # noqa: E402

TARGETS = {"orbax-small": 10.0, "orbax-big": 1.0, "orbax-train": 1.0,
           "safetensors-big": 1 / 1.2}


def _timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    jax.block_until_ready(jax.tree_util.tree_leaves(fn()))
    return time.perf_counter() - start


def _compare(theirs, ours, repeats: int) -> dict:
    _timed(theirs), _timed(ours)  # warm-up
    times: dict[str, list[float]] = {"theirs": [], "ours": []}
    for r in range(repeats):
        pair = [("theirs", theirs), ("ours", ours)]
        for side, fn in pair if r % 2 == 0 else pair[::-1]:
            times[side].append(_timed(fn))
    medians = {side: statistics.median(runs) for side, runs in times.items()}
    return {"runs": times, "median": medians, "ratio": medians["theirs"] / medians["ours"]}


def orbax_case(tree_name: str, smoke: bool, workdir: Path, repeats: int) -> dict:
    import orbax.checkpoint as ocp

    spec = _trees.tree_spec(tree_name, smoke)
    path = workdir / f"orbax-{tree_name}"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, _trees.materialize(spec))
    checkpointer.wait_until_finished()
    gc.collect()

    def ours():
        tree, status = pc.restore(path, spec)
        # Orbax records optax's EmptyState as None: the one checkpoint entry nobody asks for.
        assert not status.unmatched and not status.mismatched, status
        return tree

    return _compare(lambda: ocp.StandardCheckpointer().restore(path, spec), ours, repeats)


def safetensors_case(smoke: bool, workdir: Path, repeats: int) -> dict:
    from safetensors.numpy import load_file, save_file

    spec = _trees.tree_spec("big", smoke)
    tree = _trees.materialize(spec)
    path = workdir / "big.safetensors"
    save_file({name: np.asarray(x) for name, x in tree.items()}, str(path))
    del tree
    gc.collect()
    device = jax.local_devices()[0]

    def theirs():
        return jax.device_put(load_file(str(path)), device)

    def ours():
        tree, status = pc.restore(path, spec)
        status.assert_consumed()
        return tree

    return _compare(theirs, ours, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny trees, 1 round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "formats.json")
    parser.add_argument("--only", nargs="*", choices=sorted(TARGETS), default=sorted(TARGETS),
                        help="run only these comparisons")
    args = parser.parse_args(argv)
    repeats = 1 if args.smoke else args.repeats
    workdir = Path(tempfile.mkdtemp(prefix="formats-", dir=args.workdir))
    results = {}
    try:
        for tree_name in ("small", "big", "train"):
            if f"orbax-{tree_name}" not in args.only:
                continue
            results[f"orbax-{tree_name}"] = orbax_case(tree_name, args.smoke, workdir, repeats)
            shutil.rmtree(workdir / f"orbax-{tree_name}")
            _report(f"orbax-{tree_name}", results[f"orbax-{tree_name}"], args.smoke)
        if "safetensors-big" in args.only:
            results["safetensors-big"] = safetensors_case(args.smoke, workdir, repeats)
            _report("safetensors-big", results["safetensors-big"], args.smoke)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for name, result in results.items():
        result["target"] = TARGETS[name]
        result["pass"] = result["ratio"] >= TARGETS[name]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"smoke": args.smoke, "repeats": repeats,
                                    "comparisons": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


def _report(name: str, result: dict, smoke: bool) -> None:
    target = TARGETS[name]
    verdict = "" if smoke else (" PASS" if result["ratio"] >= target else " FAIL")
    print(f"{name:16s} theirs {result['median']['theirs']:8.3f} s   ours "
          f"{result['median']['ours']:8.3f} s   theirs/ours {result['ratio']:6.2f}x "
          f"(target >= {target:.2f}x){verdict}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
