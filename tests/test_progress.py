"""restore(progress=True) draws a bar of the bytes read and restores what restore does;
without it the library prints nothing."""

import jax
import jax.numpy as jnp
import numpy as np

import pytree_ckpt as pc
from pytree_ckpt import _progress

TREE = {"w": jnp.arange(4096.0).reshape(64, 64), "small": [np.full(10, i) for i in range(5)],
        "step": 3}


def test_progress_bar_only_when_asked_and_the_same_tree(tmp_path, capfd, monkeypatch):
    pc.save(TREE, tmp_path / "c")
    capfd.readouterr()
    plain, plain_status = pc.restore(tmp_path / "c", TREE)
    saved, _ = pc.restore(tmp_path / "c")
    assert capfd.readouterr() == ("", "")  # restore prints nothing by default

    monkeypatch.setattr(_progress, "_BATCH_BYTES", 100)  # an array a batch (step joins one)
    reads = []
    real = _progress.read_with_bar

    def counting(read, jobs, what):
        return real(lambda batch: reads.append(len(batch)) or read(batch), jobs, what)

    monkeypatch.setattr(_progress, "read_with_bar", counting)
    tree, status = pc.restore(tmp_path / "c", TREE, progress=True)
    err = capfd.readouterr().err
    # The bar is drawn (and cleared when done: leave=False) over all 16.4 KiB of arrays.
    assert err.startswith("\rrestore:   0%|") and "/16.4k [" in err, err
    assert reads == [1, 1, 1, 1, 2, 1] and status == plain_status
    jax.tree.map(np.testing.assert_array_equal, tree, plain)
    with pc.CheckpointManager(tmp_path / "run", async_save=False) as mgr:
        mgr.save(1, TREE)
        capfd.readouterr()
        again, _ = mgr.restore(1, progress=True)
    assert "restore:   0%|" in capfd.readouterr().err
    jax.tree.map(np.testing.assert_array_equal, again, saved)
