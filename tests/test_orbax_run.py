"""Orbax CheckpointManager run directories, written by orbax-checkpoint itself: a manager that
would write refuses them untouched; a read-only one, pc.latest and the command line read them."""

import hashlib
import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import pytree_ckpt as pc
from pytree_ckpt._cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Orbax's own


def _state(step):
    return {"params": {"w": jnp.arange(6.0).reshape(2, 3) * step, "b": jnp.ones(3) * step},
            "step": np.int32(step)}


def _orbax_run(path, steps=(100, 200, 300), **options):
    """An Orbax run: StandardSave of _state(step) as item ``default``, metrics kept (best_fn)."""
    opts = ocp.CheckpointManagerOptions(max_to_keep=None, best_fn=lambda m: m["loss"],
                                        best_mode="min", **options)
    manager = ocp.CheckpointManager(str(path), options=opts)
    for step in steps:
        manager.save(step, args=ocp.args.StandardSave(_state(step)),
                     metrics={"loss": 1.0 / step})
    manager.wait_until_finished()
    manager.close()
    return str(path)


def _snapshot(root):
    """Every folder and every file's bytes and mode under ``root``."""
    out = {}
    for folder, _dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        out[rel + "/"] = os.stat(folder).st_mode
        for name in files:
            data = pathlib.Path(folder, name).read_bytes()
            out[os.path.join(rel, name)] = hashlib.sha256(data).hexdigest()
    return out


def _equal(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_writable_manager_refuses_an_orbax_run_and_writes_nothing(tmp_path):
    run = _orbax_run(tmp_path / "run", step_prefix="ckpt", step_format_fixed_length=6)
    before = _snapshot(run)
    with pytest.raises(pc.NotACheckpointError) as caught:
        pc.CheckpointManager(run)
    message = str(caught.value)
    assert "Orbax" in message and "100 (ckpt_000100)" in message and "300 (ckpt_000300)" in message
    assert "read_only=True" in message and "new directory" in message  # how to migrate
    assert _snapshot(run) == before  # no manager.lock, no .steps/, nothing else
    # Even an Orbax run whose only save never finished is Orbax's folder.
    lone = tmp_path / "lone"
    (lone / "5.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
    with pytest.raises(pc.NotACheckpointError, match="Orbax steps: none committed"):
        pc.CheckpointManager(lone, keep=2)
    assert os.listdir(lone) == ["5.orbax-checkpoint-tmp-1700000000"]


def test_a_read_only_manager_lists_and_restores_orbax_steps(tmp_path):
    run = _orbax_run(tmp_path / "run", step_prefix="ckpt", step_format_fixed_length=6)
    # An unfinished save, and a step folder Orbax never finished, are not steps.
    (tmp_path / "run" / "ckpt_000400.orbax-checkpoint-tmp-1700000000").mkdir()
    (tmp_path / "run" / "ckpt_000500").mkdir()
    before = _snapshot(run)
    with pc.CheckpointManager(run, read_only=True, best_fn=lambda m: m["loss"],
                              best_mode="max") as mgr:
        assert mgr.steps() == [100, 200, 300] and mgr.latest_step() == 300
        assert mgr.metrics(200) == {"loss": 0.005}
        assert mgr.best_step() == 100  # the highest loss, as asked
        target = _state(0)
        state, status = mgr.restore(200, target, at="default")
        status.assert_consumed()
        _equal(state["params"]["w"], _state(200)["params"]["w"])
        assert int(state["step"]) == 200
        latest, _ = mgr.restore(target=target, at="default")
        _equal(latest["params"]["b"], _state(300)["params"]["b"])
        assert mgr.metadata(100).format == "orbax"
        with pytest.raises(pc.CheckpointNotFoundError, match="400"):
            mgr.restore(400)
        with pytest.raises(ValueError, match="read-only"):
            mgr.save(400, target)
    assert pc.latest(run) == str(tmp_path / "run" / "ckpt_000300")
    assert _snapshot(run) == before


def test_metrics_kept_in_checkpoint_metadata(tmp_path):
    manager = ocp.CheckpointManager(str(tmp_path / "run"))  # no best_fn: no metrics item
    manager.save(3, args=ocp.args.StandardSave(_state(3)))
    manager.wait_until_finished()
    manager.close()
    meta_file = tmp_path / "run" / "3" / "_CHECKPOINT_METADATA"
    meta = json.loads(meta_file.read_text())
    assert meta["metrics"] == {}  # Orbax leaves them out here: none read
    assert pc.CheckpointManager(tmp_path / "run", read_only=True).metrics(3) is None
    meta["metrics"] = {"accuracy": 0.75}
    meta_file.write_text(json.dumps(meta))
    assert pc.CheckpointManager(tmp_path / "run", read_only=True).metrics(3) == {"accuracy": 0.75}


def test_the_migration_the_readme_shows(tmp_path):
    old = _orbax_run(tmp_path / "orbax_run")
    new = str(tmp_path / "new_run")
    with pc.CheckpointManager(old, read_only=True) as orbax_mgr:
        step = orbax_mgr.latest_step()
        state, _ = orbax_mgr.restore(step, target=_state(0), at="default")
    with pc.CheckpointManager(new, async_save=False) as mgr:
        mgr.save(step, state)
        mgr.save(step + 1, state)
    assert pc.CheckpointManager(new, read_only=True).steps() == [300, 301]
    resumed, status = pc.restore(pc.latest(new), _state(0))
    status.assert_consumed()
    _equal(resumed["params"]["w"], _state(300)["params"]["w"])


def test_the_command_line_on_an_orbax_run(tmp_path, capsys):
    run = _orbax_run(tmp_path / "run", steps=(1, 2))
    (tmp_path / "run" / "3.orbax-checkpoint-tmp-1700000000").mkdir()  # unfinished
    before = _snapshot(run)
    assert main(["steps", run, "--best", "loss", "--min"]) == 0
    out = capsys.readouterr().out
    assert f"{run}: 2 committed steps, latest 2, best 2 (lowest loss)" in out
    assert "loss=0.5" in out and "incomplete" not in out
    assert main(["--json", "steps", run]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in listed["steps"]] == [1, 2] and listed["latest"] == 2
    assert listed["steps"][0]["time"] is not None  # Orbax's commit time
    assert main(["ls", f"{run}/2"]) == 0
    assert "default/params/w" in capsys.readouterr().out
    assert main(["ls", run]) == 2  # a run directory: the hint names its newest step
    assert f"name a step, e.g. {run}/2" in capsys.readouterr().err
    assert main(["clean", run, "--yes"]) == 0
    assert "nothing to clean" in capsys.readouterr().out
    assert pc.clean(run, delete=True).incomplete == ()
    assert _snapshot(run) == before
