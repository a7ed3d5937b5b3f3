"""A resume never continues from a partial state by accident: CheckpointManager.restore is strict
by default (PartialRestoreError naming every unmatched and mismatched path), strict=False gives
the tree and status as restore does, and pc.restore(..., strict=True) is the same check."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

import pytree_ckpt as pc


def model(width: int = 4, layers: int = 2) -> dict:
    params = {f"layer_{i}": {"kernel": jnp.full((4, width), float(i + 1)),
                             "bias": jnp.full((width,), float(i + 1))} for i in range(layers)}
    return {"params": params, "opt_state": {"mu": dict(params)}, "step": 3}


def grown_model() -> dict:
    """The saved model with layer_1's kernel reshaped and a layer_2 kernel added."""
    tree = model()
    for part in (tree["params"], tree["opt_state"]["mu"]):
        part["layer_1"] = dict(part["layer_1"], kernel=jnp.zeros((4, 6)))
    tree["params"]["layer_2"] = {"kernel": jnp.zeros((6, 1))}
    return tree


UNMATCHED = ("params/layer_2/kernel",)
MISMATCHED = ("opt_state/mu/layer_1/kernel", "params/layer_1/kernel")


@pytest.fixture
def run(tmp_path):
    with pc.CheckpointManager(tmp_path / "run", async_save=False) as mgr:
        mgr.save(3, model())
        yield mgr


def test_manager_resume_into_a_changed_model_raises_naming_exactly_those_paths(run):
    with pytest.raises(pc.PartialRestoreError, match=r"3 target leaves were not restored") as err:
        run.restore(run.latest_step(), target=grown_model())
    message = str(err.value)
    assert message.startswith(f"{run.directory}/3: ")
    listed = re.findall(r"^    (\S+?)(?::|$)", message, flags=re.M)
    assert sorted(listed) == sorted(UNMATCHED + MISMATCHED)
    assert ("    params/layer_1/kernel: saved float32[4, 4], target float32[4, 6]"
            in message.splitlines())
    assert message.splitlines()[-1] == ("To accept a partial restore, pass strict=False, and "
                                        "read the returned status.")
    assert err.value.status.unmatched == UNMATCHED
    assert tuple(m.path for m in err.value.status.mismatched) == MISMATCHED
    assert isinstance(err.value, AssertionError) and isinstance(err.value, pc.CheckpointError)


def test_strict_false_returns_the_tree_and_status_as_restore_does(run):
    target = grown_model()
    tree, status = run.restore(3, target=target, strict=False)
    plain_tree, plain_status = pc.restore(f"{run.directory}/3", target)
    assert status == plain_status
    assert status.unmatched == UNMATCHED
    assert tuple(m.path for m in status.mismatched) == MISMATCHED
    # Matched leaves hold the checkpoint's values, the others keep the target's.
    np.testing.assert_array_equal(tree["params"]["layer_0"]["kernel"], np.ones((4, 4)))
    np.testing.assert_array_equal(tree["params"]["layer_1"]["kernel"], np.zeros((4, 6)))
    np.testing.assert_array_equal(tree["params"]["layer_2"]["kernel"], np.zeros((6, 1)))
    np.testing.assert_array_equal(plain_tree["params"]["layer_1"]["bias"],
                                  tree["params"]["layer_1"]["bias"])


def test_unused_checkpoint_entries_are_allowed_by_default(run):
    params, status = run.restore(3, target=model()["params"], at="params")
    assert status.unused == () and len(status.matched) == 4
    tree, status = run.restore(3, target={"params": model()["params"]})
    assert len(status.unused) == 5 and not status.unmatched
    assert run.restore(3)[1].matched  # without a target there is nothing to miss


def test_restore_strict_true_is_the_same_check(run):
    path = f"{run.directory}/3"
    with pytest.raises(pc.PartialRestoreError, match=r"call restore without strict=True") as err:
        pc.restore(path, grown_model(), strict=True)
    assert err.value.status.unmatched == UNMATCHED
    assert str(err.value).startswith(f"{path}: 3 target leaves were not restored")
    # Default stays pure: the same restore returns its status.
    _, status = pc.restore(path, grown_model())
    assert status == err.value.status
    tree, status = pc.restore(path, {"params": model()["params"]}, strict=True)
    assert len(status.unused) == 5
    with pytest.raises(pc.PartialRestoreError, match=r"^memory://strict/x: 1 target leaves"):
        pc.save({"a": 1}, "memory://strict/x")
        pc.restore("memory://strict/x", {"a": 1, "b": 2}, strict=True)


def test_the_message_stays_readable_with_1000_unmatched_paths(tmp_path):
    pc.save({"params": {"embed": jnp.ones(2)}}, tmp_path / "c")
    target = {"params": {"embed": jnp.ones(2),
                         **{f"layer_{i}": {"kernel": 0.0} for i in range(1000)}},
              "extra": {f"e{i}": 0.0 for i in range(30)}}
    with pytest.raises(pc.PartialRestoreError, match=r"1030 target leaves") as err:
        pc.restore(tmp_path / "c", target, strict=True)
    message = str(err.value)
    assert len(message) < 3000, len(message)
    lines = message.splitlines()
    assert "  unmatched, in the target but not in the checkpoint (1030):" in lines
    assert "    params/... (1000 paths, e.g. params/layer_0/kernel)" in lines
    # extra/e0..e29 share one prefix: one line for all of them.
    assert "    extra/... (30 paths, e.g. extra/e0)" in lines
    assert len(lines) == 5


def test_grouping_goes_as_deep_as_stays_short_and_caps_the_groups(tmp_path):
    pc.save({"keep": 1}, tmp_path / "c")
    deep = {"a": {"b": {f"c{i:02d}": {"x": 0, "y": 0} for i in range(15)}}}
    with pytest.raises(pc.PartialRestoreError) as err:
        pc.restore(tmp_path / "c", deep, strict=True)
    lines = str(err.value).splitlines()
    assert [ln for ln in lines if ln.startswith("    ")] == [
        f"    a/b/c{i:02d}/... (2 paths, e.g. a/b/c{i:02d}/x)" for i in range(15)]
    flat = {f"k{i:04d}": 0 for i in range(1000)}
    with pytest.raises(pc.PartialRestoreError) as err:
        pc.restore(tmp_path / "c", flat, strict=True)
    lines = str(err.value).splitlines()
    assert lines[2:4] == ["    k0000", "    k0001"]
    assert "    ... and 980 more groups (980 paths)" in lines
    assert len(str(err.value)) < 2000


def test_the_managers_keyword_is_strict_and_partial_is_gone(run):
    with pytest.raises(pc.PartialRestoreError):
        run.restore(3, target=grown_model(), strict=True)
    _, status = run.restore(3, target=grown_model(), strict=False)
    assert status.unmatched == UNMATCHED
    with pytest.raises(TypeError, match="partial"):
        run.restore(3, target=grown_model(), partial=True)


@pytest.mark.parametrize("check, expected", [
    ("assert_consumed", "restore did not consume the checkpoint exactly:\n"
                        "  unmatched (in target, not in checkpoint) (1):\n    b\n"
                        "  unused (in checkpoint, not in target) (1):\n    step"),
    ("assert_existing_matched", "some target paths were not restored:\n"
                                "  unmatched (in target, not in checkpoint) (1):\n    b"),
])
def test_status_assertions_raise_partial_restore_error_with_the_status(check, expected):
    pc.save({"w": jnp.ones(3), "step": 1}, "memory://strict/assert", overwrite=True)
    _, status = pc.restore("memory://strict/assert", {"w": jnp.zeros(3), "b": 0.0})
    with pytest.raises(pc.PartialRestoreError) as err:
        getattr(status, check)()
    assert str(err.value) == expected and err.value.status is status
    assert isinstance(err.value, AssertionError)
    _, nothing = pc.restore("memory://strict/assert", {"x": 0.0})
    with pytest.raises(pc.PartialRestoreError, match="nothing was restored") as err:
        nothing.assert_nontrivial_match()
    assert err.value.status is nothing


def test_a_missing_at_prefix_gets_a_hint_everywhere_the_status_is_told(tmp_path):
    # An Orbax CheckpointManager step restored without at="default": nothing matches, and
    # every message says which at= to pass.
    import orbax.checkpoint as ocp

    tree = {"params": {"w": np.ones(2, np.float32)}, "b": np.ones(3, np.float32)}
    manager = ocp.CheckpointManager(str(tmp_path / "orbax"))
    manager.save(1, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()
    step = str(tmp_path / "orbax" / "1")
    target = {"params": {"w": np.zeros(2, np.float32)}, "b": np.zeros(3, np.float32)}
    _, status = pc.restore(step, target)
    hint = "hint: the checkpoint's paths are the target's under 'default': pass at='default'"
    assert hint in str(status) and hint in status._repr_html_().replace("&#x27;", "'")
    for check in (status.assert_existing_matched, status.assert_consumed,
                  status.assert_nontrivial_match):
        with pytest.raises(AssertionError, match=re.escape(hint)):
            check()
    with pytest.raises(pc.PartialRestoreError, match=re.escape(hint)):
        pc.restore(step, target, strict=True)
    restored, status = pc.restore(step, target, at="default")
    assert status.unmatched == () and "hint" not in str(status)


def test_the_reverse_hint_names_the_targets_subtree(tmp_path):
    pc.save({"w": np.ones(2), "b": np.ones(3)}, tmp_path / "c")
    _, status = pc.restore(tmp_path / "c", {"model": {"w": np.zeros(2), "b": np.zeros(3)}})
    assert ("hint: the target's paths are the checkpoint's under 'model': restore into the "
            "target's subtree at 'model' instead") in str(status)
    # Something matched, or no prefix explains it: no hint.
    _, status = pc.restore(tmp_path / "c", {"w": np.zeros(2), "x": np.zeros(3)})
    assert "hint" not in str(status)
    _, status = pc.restore(tmp_path / "c", {"v": np.zeros(2)})
    assert "hint" not in str(status)
