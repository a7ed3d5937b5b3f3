"""CheckpointManager: keep_best (the k best steps by best_fn), metrics given as NumPy and JAX
scalars, and a failed save's leftovers removed at once by the manager that made them."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pytree_ckpt as pc
from pytree_ckpt import _retention

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_keep_best_keeps_the_k_best_steps(tmp_path):
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 2.0, 5: 3.0, 6: None}
    with pc.CheckpointManager(tmp_path, keep=1, keep_best=2, async_save=False,
                              best_fn=lambda m: m["loss"], best_mode="min") as mgr:
        for step, loss in losses.items():
            mgr.save(step, {"x": np.full(2, step)},
                     metrics=None if loss is None else {"loss": loss})
        assert mgr.steps() == [2, 4, 6]  # the two lowest losses and the newest
        assert mgr.best_step() == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "4", "6"]
    with pc.CheckpointManager(tmp_path, keep=1, keep_best=2, best_fn=lambda m: m["loss"],
                              best_mode="min", async_save=False) as again:
        again.save(7, {"x": np.full(2, 7)}, metrics={"loss": 1.5})  # better than step 4
        assert again.steps() == [2, 7]


def test_keep_best_one_by_default_and_ties_to_the_newer():
    with pc.CheckpointManager("memory://best_k/default", keep=1, async_save=False,
                              best_fn=lambda m: m["acc"]) as mgr:
        for step, acc in ((1, 0.9), (2, 0.9), (3, 0.1)):
            mgr.save(step, {"x": step}, metrics={"acc": acc})
        assert mgr.steps() == [2, 3]
    pairs = [(1, {"a": 1.0}), (2, {"a": 3.0}), (3, {"a": 3.0}), (4, None), (5, {"a": 2.0})]
    assert _retention.best_steps(pairs, lambda m: m["a"], "max", 2) == [3, 2]
    assert _retention.best_steps(pairs, lambda m: m["a"], "min", 3) == [1, 5, 3]
    assert _retention.best_steps(pairs, None, "max", 2) == []
    assert _retention.expired([1, 2, 3, 4, 5], 1, None, [2, 3]) == [1, 4]


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, None])
def test_keep_best_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="keep_best must be a positive int"):
        pc.CheckpointManager("memory://best_k/bad", keep_best=bad)


def test_metrics_as_numpy_and_jax_scalars_are_python_numbers():
    given = {"loss": jnp.array(0.25), "lr": jnp.bfloat16(0.5), "acc": np.float32(0.75),
             "tokens": np.int64(7), "done": jnp.array(True), "steps": jnp.ones((), jnp.int32)}
    with pc.CheckpointManager("memory://best_k/scalars", async_save=False,
                              best_fn=lambda m: m["loss"]) as mgr:
        mgr.save(1, {"x": 1}, metrics=given)
        kept = pc.CheckpointManager("memory://best_k/scalars", read_only=True).metrics(1)
    assert kept == {"loss": 0.25, "lr": 0.5, "acc": 0.75, "tokens": 7, "done": True,
                    "steps": 1}
    assert [type(kept[k]) for k in ("loss", "lr", "tokens", "done")] == [float, float, int, bool]
    assert type(ml_dtypes.bfloat16(0.5).item()) is float


# A full disk, simulated with RLIMIT_FSIZE (SIGXFSZ ignored, so writes fail with EFBIG), in a
# child process: the limit is per process, and TensorStore's writer threads are subject to it.
CHILD = textwrap.dedent(r'''
    import json, os, resource, signal, sys
    import numpy as np
    import pytree_ckpt as pc

    root, how = sys.argv[1], sys.argv[2]
    errors = []
    with pc.CheckpointManager(root, keep=None, async_save=how == "async") as mgr:
        mgr.save(1, {"w": np.arange(100.0)}, metrics={"loss": 1.0})
        mgr.wait()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # no file above 1 MiB
        for step in (2, 3):
            try:
                mgr.save(step, {"w": np.ones((1024, 1024), np.float32)}, metrics={"loss": 0.5})
                mgr.wait()
            except pc.SaveError as e:
                errors.append(step)
        print(json.dumps({"errors": errors, "steps": mgr.steps(),
                          "listing": sorted(os.listdir(root)),
                          "index": sorted(os.listdir(os.path.join(root, ".steps")))}))
''')


@pytest.mark.parametrize("how", ["sync", "async"])
def test_a_failed_save_leaves_nothing_behind(tmp_path, how):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), how], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["errors"] == [2, 3] and out["steps"] == [1]
    # No empty step folders, metrics files or markers of the failed steps.
    assert out["listing"] == [".steps", "1", "1.metrics.msgpack", "manager.lock"]
    assert out["index"] == ["1", "complete"]
    listed = subprocess.run([sys.executable, "-m", "pytree_ckpt", "steps", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "saving?" not in listed.stdout and "incomplete" not in listed.stdout
    assert f"{tmp_path}: 1 committed steps, latest 1" in listed.stdout
