"""The saving side of test_crash.py (which also imports it for ``tree``).

    python _crash_child.py zygote
        import JAX and pytree_ckpt once, then for each line ``MODE ROOT FIRST_STEP LOG`` read
        from stdin fork a child that runs ``save_loop`` and print its pid; for a line
        ``reap PID`` wait until that (SIGKILLed) child is entirely gone and print ``reaped``
        (a killed process shows as a zombie while its other threads still hold its files). The children are
        SIGKILLed by the test; forking from a warm process keeps each kill cycle short (the
        zygote never touches a device or TensorStore, so the children start clean).

A child saves step after step and, after each save has *returned* (``save``), completed
(``save_async(...).result()``) or been waited for (``CheckpointManager.wait``), appends
``STEP PATH`` to LOG and fsyncs it: a line in LOG is a promise that the checkpoint is durable.
"""

from __future__ import annotations

import os
import sys

import numpy as np

SMALL_LEAVES = 1500


def tree(step: int) -> dict:
    """The tree saved at ``step``: every leaf depends on the step, so a mix of two
    generations cannot pass for either (~10 MB in 3 zarr arrays, 1500 packed leaves)."""
    small = np.arange(16, dtype=np.int32)
    return {
        "step": step,
        "big": {"a": (np.arange(1024 * 1536, dtype=np.float32) + step).reshape(1024, 1536),
                "b": np.full((512, 1024), step, np.int64)},
        "small": [small + (step * 100_000 + i) for i in range(SMALL_LEAVES)],
        "name": f"step {step}",
    }


def frozen() -> np.ndarray:
    """The frozen base of mode "incremental": the same jax.Array at every step, written by
    the child's first step and carried by the later ones (4 MiB)."""
    return np.arange(1 << 20, dtype=np.float32) * 3


def _ack(log: int, step: int, path: str) -> None:
    os.write(log, f"{step} {path}\n".encode())
    os.fsync(log)


def save_loop(mode: str, root: str, first: int, log_path: str) -> None:
    import jax.numpy as jnp

    import pytree_ckpt as pc

    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    if mode in ("manager", "incremental"):
        mgr = pc.CheckpointManager(root, keep=2, async_save=True)
        base = jnp.asarray(frozen())
        latest = mgr.latest_step()
        start = first if latest is None else max(first, latest + 1)
    step = first
    while True:
        t = tree(step)
        t["big"]["a"] = jnp.asarray(t["big"]["a"])  # a jax.Array too
        if mode == "sync":
            path = f"{root}/{step}"
            pc.save(t, path)
        elif mode == "async":
            path = f"{root}/{step}"
            pc.save_async(t, path).result()
        elif mode == "overwrite":
            path = root
            pc.save(t, path, overwrite=True)
        elif mode in ("manager", "incremental"):
            if mode == "incremental":
                t["frozen"] = base
            step = max(step, start)
            path = f"{root}/{step}"
            mgr.save(step, t)
            mgr.wait()
        else:
            raise ValueError(mode)
        _ack(log, step, path)
        step += 1


def zygote() -> None:
    import jax  # noqa: F401  (imported before fork; no backend is created here)

    import pytree_ckpt  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        if line.startswith("reap "):
            os.waitpid(int(line.split()[1]), 0)
            print("reaped", flush=True)
            continue
        mode, root, first, log = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                save_loop(mode, root, int(first), log)
            finally:
                os._exit(1)
        print(pid, flush=True)


if __name__ == "__main__":
    zygote()
