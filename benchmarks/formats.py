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

Trees are those of bench.py (``benchmarks/_trees.py``), built from the same seed. Files
are written once per comparison, in a temporary folder (``--workdir``), and read from a
warm page cache. Each reader runs in a worker process of its own, as in bench.py (after an
Orbax restore, any Python in the same process runs slower); each round times one restore
of each, their order reversed every other round, after one untimed warm-up each, with
``gc.collect()`` before each timed call. Medians are reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
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


def _reader(case: str, side: str, path: Path, smoke: bool):
    """The function a worker times: one restore of ``path`` by ``side``."""
    spec = _trees.tree_spec("big" if case == "safetensors-big" else case.split("-")[1], smoke)
    if side == "ours":
        def ours():
            tree, status = pc.restore(path, spec)
            # Orbax records optax's EmptyState as None: an entry no target leaf asks for.
            assert not status.unmatched and not status.mismatched, status
            return tree
        return ours
    if case == "safetensors-big":
        from safetensors.numpy import load_file

        device = jax.local_devices()[0]
        return lambda: jax.device_put(load_file(str(path)), device)
    import orbax.checkpoint as ocp

    return lambda: ocp.StandardCheckpointer().restore(path, spec)


def _worker(case: str, side: str, path: Path, smoke: bool) -> int:
    """Times one restore per line read from stdin; prints ``TIME <seconds>`` for each."""
    fn = _reader(case, side, path, smoke)
    for _line in sys.stdin:
        print(f"TIME {_timed(fn)!r}", flush=True)
    return 0


def _compare(case: str, path: Path, smoke: bool, repeats: int) -> dict:
    """Each side in a worker process of its own (an Orbax restore slows later Python in its
    process), one warm-up each, then rounds alternating which side goes first."""
    workers = {side: subprocess.Popen(
        [sys.executable, __file__, "--worker", case, side, str(path)] + (["--smoke"] * smoke),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for side in ("theirs", "ours")}

    def run(side: str) -> float:
        worker = workers[side]
        worker.stdin.write("go\n")
        worker.stdin.flush()
        for line in worker.stdout:
            if line.startswith("TIME "):
                return float(line.split()[1])
        raise RuntimeError(f"the {side} worker of {case} ended early")

    try:
        run("theirs"), run("ours")  # warm-up
        times: dict[str, list[float]] = {"theirs": [], "ours": []}
        for r in range(repeats):
            for side in ("theirs", "ours") if r % 2 == 0 else ("ours", "theirs"):
                times[side].append(run(side))
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    medians = {side: statistics.median(runs) for side, runs in times.items()}
    return {"runs": times, "median": medians, "ratio": medians["theirs"] / medians["ours"]}


def write_orbax(tree_name: str, smoke: bool, workdir: Path) -> Path:
    import orbax.checkpoint as ocp

    path = workdir / f"orbax-{tree_name}"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, _trees.materialize(_trees.tree_spec(tree_name, smoke)))
    checkpointer.wait_until_finished()
    return path


def write_safetensors(smoke: bool, workdir: Path) -> Path:
    from safetensors.numpy import save_file

    tree = _trees.materialize(_trees.tree_spec("big", smoke))
    path = workdir / "big.safetensors"
    save_file({name: np.asarray(x) for name, x in tree.items()}, str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny trees, 1 round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "formats.json")
    parser.add_argument("--worker", nargs=3, metavar=("CASE", "SIDE", "PATH"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", choices=sorted(TARGETS), default=sorted(TARGETS),
                        help="run only these comparisons")
    args = parser.parse_args(argv)
    if args.worker:
        case, side, path = args.worker
        return _worker(case, side, Path(path), args.smoke)
    repeats = 1 if args.smoke else args.repeats
    workdir = Path(tempfile.mkdtemp(prefix="formats-", dir=args.workdir))
    results = {}
    try:
        for case in sorted(args.only, key=list(TARGETS).index):
            if case == "safetensors-big":
                path = write_safetensors(args.smoke, workdir)
            else:
                path = write_orbax(case.split("-")[1], args.smoke, workdir)
            gc.collect()
            results[case] = _compare(case, path, args.smoke, repeats)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            _report(case, results[case], args.smoke)
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
