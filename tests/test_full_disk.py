"""A full disk (simulated with RLIMIT_FSIZE, SIGXFSZ ignored, so writes fail with EFBIG):
the save raises SaveError naming the path, nothing is committed, earlier checkpoints in the
same directory stay restorable. Runs in a child process (the limit is per process, and
TensorStore's writer threads are subject to it too)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np

import pytree_ckpt as pc
from pytree_ckpt import _format

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(r'''
    import resource, signal, sys
    import numpy as np, jax.numpy as jnp
    import pytree_ckpt as pc

    root = sys.argv[1]
    pc.save({"w": np.arange(1000.0), "small": np.ones(4)}, root + "/earlier")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # no file above 1 MiB
    for name, tree in [("big_array", {"w": jnp.ones((1024, 1024), jnp.float32)}),
                       ("many_small", {str(i): np.full(30000, i, np.float64)
                                       for i in range(40)})]:
        for how in ("sync", "async"):
            path = f"{root}/{name}_{how}"
            try:
                if how == "sync":
                    pc.save(tree, path)
                else:
                    pc.save_async(tree, path).result()
            except pc.SaveError as e:
                print(f"SaveError {path}: {e}")
            else:
                print(f"NO ERROR {path}")
    print("done")
''')


def test_full_disk_raises_save_error_and_commits_nothing(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.endswith("done\n"), proc.stderr[-3000:]
    lines = proc.stdout.splitlines()[:-1]
    assert len(lines) == 4, lines
    for line in lines:
        assert line.startswith("SaveError "), line
        path, message = line[len("SaveError "):].split(": ", 1)
        assert message.startswith(path + ": save failed, nothing was committed"), message
        # The cause is said plainly (errno EFBIG / "File too large"), not just "failed".
        assert "File too large" in message or "EFBIG" in message or "No space" in message, \
            message
        assert not (pathlib.Path(path) / _format.COMMIT_FILE).exists()
        try:
            pc.restore(path)
        except (pc.IncompleteCheckpointError, pc.CheckpointNotFoundError):
            pass
        else:
            raise AssertionError(f"{path} restored")
    restored, status = pc.restore(tmp_path / "earlier")
    status.assert_consumed()
    np.testing.assert_array_equal(restored["w"], np.arange(1000.0))
    # Once space is back, the same paths can be saved.
    pc.save({"w": np.ones(3)}, lines[0].split()[1].rstrip(":"), overwrite=True)
