"""A save's outcome is what its commit file says: committed means it returned (clean-up
failures after the commit are warnings), and what restore would refuse is never committed."""

import numpy as np
import pytest

import pytree_ckpt as pc
from pytree_ckpt import _format, _storage
from pytree_ckpt._format import COMMIT_FILE


def _failing_for(directory, real, error):
    def fsync_dir(path):
        if str(path).rstrip("/") == str(directory):
            raise error
        return real(path)
    return fsync_dir


def test_a_failing_directory_sync_after_the_commit_is_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(_storage, "fsync_dir", _failing_for(
        tmp_path, _storage.fsync_dir, OSError(5, "Input/output error")))
    with pytest.warns(RuntimeWarning, match=r"the checkpoint was committed, but cleaning up "
                      r"after it failed \(OSError: \[Errno 5\] Input/output error\)"):
        assert pc.save({"w": np.arange(4)}, tmp_path / "c") == str(tmp_path / "c")
    tree, _ = pc.restore(tmp_path / "c")
    np.testing.assert_array_equal(tree["w"], np.arange(4))


def test_a_failing_deletion_of_the_overwritten_generation_is_a_warning(tmp_path, monkeypatch):
    pc.save({"w": np.arange(3)}, tmp_path / "c")
    (old,) = [n for n in (tmp_path / "c").iterdir() if n.name.startswith("d-")]

    def delete_prefix(loc, kv, prefix):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_storage, "delete_prefix", delete_prefix)
    with pytest.warns(RuntimeWarning, match=r"committed, but cleaning up after it failed "
                      r"\(PermissionError: .*an overwritten generation may be left behind"):
        pc.save({"w": np.arange(5)}, tmp_path / "c", overwrite=True)
    tree, _ = pc.restore(tmp_path / "c")
    np.testing.assert_array_equal(tree["w"], np.arange(5))
    assert old.exists()  # left behind, as the warning says


def test_a_commit_write_that_raises_after_landing_is_a_success(tmp_path, monkeypatch):
    # An object store's reply lost after the PUT landed: the commit file is there.
    real = _storage.write_key

    def write_key(loc, kv, key, value, **options):
        out = real(loc, kv, key, value, **options)
        if key == COMMIT_FILE:
            raise TimeoutError("no reply")
        return out

    monkeypatch.setattr(_storage, "write_key", write_key)
    with pytest.warns(RuntimeWarning, match=r"the checkpoint was committed, though writing "
                      r"its commit file reported TimeoutError: no reply"):
        pc.save({"w": np.arange(2)}, tmp_path / "c")
    tree, _ = pc.restore(tmp_path / "c")
    np.testing.assert_array_equal(tree["w"], np.arange(2))


def test_the_manager_counts_a_step_whose_clean_up_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(_storage, "fsync_dir", _failing_for(
        tmp_path / "run", _storage.fsync_dir, OSError(28, "No space left on device")))
    with pc.CheckpointManager(tmp_path / "run", async_save=False) as mgr:
        with pytest.warns(RuntimeWarning, match="the checkpoint was committed"):
            assert mgr.save(1, {"w": np.arange(3)})
        assert mgr.steps() == [1] and mgr.latest_step() == 1
        assert pc.latest(tmp_path / "run") == str(tmp_path / "run" / "1")


def test_save_refuses_a_commit_file_restore_would_refuse(tmp_path, monkeypatch):
    # Restore reads commit files of at most MAX_COMMIT_BYTES (256 MiB); 1 MiB here, so that a
    # 2 MiB bytes leaf stands for a 1.1 GB one without allocating it.
    monkeypatch.setattr(_format, "MAX_COMMIT_BYTES", 1 << 20)
    pc.save({"w": np.arange(3), "blob": b"small"}, tmp_path / "c")
    with pytest.raises(pc.UnsupportedLeafError, match=(
            r"refusing to commit a checkpoint restore would refuse: its commit file would be "
            r"2,09\d,\d+ bytes, more than restore reads \(1,048,576\) \(its largest Python "
            r"leaf is 'blob'\)")):
        pc.save({"w": np.arange(5), "blob": bytes(2 << 20)}, tmp_path / "c", overwrite=True)
    tree, _ = pc.restore(tmp_path / "c")  # the earlier checkpoint is intact
    assert tree["blob"] == b"small"
    assert len([n for n in (tmp_path / "c").iterdir() if n.name.startswith("d-")]) == 1


def test_save_refuses_a_leaf_restore_would_refuse(tmp_path, monkeypatch):
    # Restore's validation of a leaf record runs on the body before it is written: a leaf it
    # would refuse (here a PRNG implementation restore does not know) is named.
    import jax

    real = _format.encode

    def encode(commit, *rest):
        leaves = dict(commit.leaves)
        leaves["k"] = leaves["k"]._replace(impl="no_such_impl")
        return real(commit._replace(leaves=leaves), *rest)

    monkeypatch.setattr(_format, "encode", encode)
    with pytest.raises(pc.UnsupportedLeafError, match=(
            r"refusing to commit a checkpoint restore would refuse: leaf 'k': bad PRNG "
            r"implementation 'no_such_impl'")):
        pc.save({"k": jax.random.key(0)}, tmp_path / "c")
    with pytest.raises(pc.CheckpointNotFoundError, match="no checkpoint there"):
        pc.restore(tmp_path / "c")  # its data deleted, nothing committed
