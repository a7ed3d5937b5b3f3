"""Saves that run out of space, in a child process (used by test_out_of_space.py).

``python _out_of_space_child.py save DIR LIMIT`` makes saves that cannot fit: with ``LIMIT`` > 0
under ``RLIMIT_FSIZE`` = LIMIT bytes (writes past it fail with EFBIG; SIGXFSZ, which would
kill the process, is ignored), with ``LIMIT`` = 0 on whatever DIR is (a small tmpfs: ENOSPC).
``python _out_of_space_child.py verify DIR`` restores what should be there. Each prints one JSON
line. The trees are sized for a limit of 1 MiB or a filesystem of 8 MiB.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys

import numpy as np

import pytree_ckpt as pc

SMALL = {"w": np.arange(1000, dtype=np.float32), "step": 1}
AFTER = {"w": np.arange(1000, dtype=np.float32) * 2, "step": 2}
# Each too big in another part of the save: a zarr chunk, the commit file, a packed blob.
TOO_BIG = {
    "chunk": {"big": np.ones((4096, 1024), np.float32)},  # 16 MiB: 4 chunks of 4 MiB
    "commit": {"w": np.zeros(3), "text": "x" * (9 << 20)},  # a 9 MiB commit file
    "packed": {f"b{k}": np.full(60_000, k, np.float32) for k in range(40)},  # 9.6 MiB of blobs
}


def save(root: str, limit: int) -> dict:
    if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    a = os.path.join(root, "A")
    pc.save(SMALL, a)
    errors = []
    for name, tree in TOO_BIG.items():
        for how in ("new", "overwrite", "async"):
            path = a if how == "overwrite" else os.path.join(root, f"{name}-{how}")
            try:
                if how == "async":
                    pc.save_async(tree, path).result()
                else:
                    pc.save(tree, path, overwrite=how == "overwrite")
                errors.append([name, how, path, "no error", ""])
            except Exception as e:
                errors.append([name, how, path, type(e).__name__, str(e)])
    # The failed saves left the disk as they found it: a normal save still fits.
    pc.save(AFTER, a, overwrite=True)
    return {"errors": errors, "listing": _listing(root)}


def verify(root: str) -> dict:
    tree, status = pc.restore(os.path.join(root, "A"))
    status.assert_consumed()
    out = {"A": bool(np.array_equal(tree["w"], AFTER["w"]) and tree["step"] == 2), "others": {}}
    for name in sorted(os.listdir(root)):
        if name != "A":
            try:
                pc.restore(os.path.join(root, name))
                out["others"][name] = "restored"
            except pc.CheckpointError as e:
                out["others"][name] = type(e).__name__
    out["listing"] = _listing(root)
    return out


def _listing(root: str) -> dict[str, dict[str, int]]:
    """For each checkpoint path: its data generations, with the number of files in each."""
    out = {}
    for name in os.listdir(root):
        gens = [g for g in os.listdir(os.path.join(root, name)) if g.startswith("d-")]
        out[name] = {g: sum(len(files) for _, _, files in os.walk(os.path.join(root, name, g)))
                     for g in gens}
    return out


if __name__ == "__main__":
    command, root = sys.argv[1], sys.argv[2]
    result = save(root, int(sys.argv[3])) if command == "save" else verify(root)
    print(json.dumps(result), flush=True)
