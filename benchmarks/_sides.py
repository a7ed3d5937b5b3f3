"""The contenders, behind one small interface.

Each side saves a tree durably into a fresh path and restores it onto an abstract target
(a tree of `jax.ShapeDtypeStruct` with shardings); some also save asynchronously, read
metadata, or restore a subtree. `Side.ops` names the operations a side has.

- `pytree_ckpt`: `pc.save`, `pc.save_async`, `pc.restore(path, spec)`, `pc.metadata`,
  `pc.restore(path, subtree_spec, at=...)`.
- `orbax`: `ocp.StandardCheckpointer` (asynchronous in 0.12.8: `save` returns once the
  arrays are copied to host, `wait_until_finished` waits for the writes). TensorStore
  fsyncs Orbax's array data (its `file` kvstore syncs by default and Orbax does not turn
  `file_io_sync` off), but Orbax writes `_METADATA`, `_CHECKPOINT_METADATA` and
  `commit_success.txt` and renames its temporary directory without fsync. To compare
  durable against durable, every Orbax save here ends with `fsync_tree`, which fsyncs
  every file and directory of the checkpoint and its parent (a few ms; the files TensorStore
  already synced are clean, so their fsync is nearly free).
- `np.save`: one `.npy` file per leaf, each fsynced, then the directory; restore is
  `np.load` per leaf and one `jax.device_put` onto the target shardings.
- `disk`: the tree's bytes written sequentially to one file and fsynced (the durable
  sequential write bandwidth of this disk, for these bytes), and read back into one buffer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from _trees import Subtree

Tree = Any
Wait = Callable[[], None]


class Side:
    """One contender. Subclasses fill in the operations they have."""

    name = ""
    ops: tuple[str, ...] = ("save", "restore")

    def prepare(self, tree: Tree) -> None:
        """Per-tree setup, outside any timing."""

    def release(self) -> None:
        """Per-tree teardown, outside any timing."""

    def save(self, tree: Tree, path: str) -> None:
        raise NotImplementedError

    def restore(self, path: str, spec: Tree) -> Tree:
        raise NotImplementedError

    def save_async(self, tree: Tree, path: str) -> Wait:
        """Start a save; return once the caller may go on, with a function that waits."""
        raise NotImplementedError

    def metadata(self, path: str) -> Any:
        raise NotImplementedError

    def restore_at(self, path: str, subtree: Subtree) -> Tree:
        raise NotImplementedError

    def check(self, restored: Tree, expected: Tree) -> None:
        """Raise unless `restored` holds `expected`'s values on its shardings."""
        check_same(restored, expected, self.name)

    def close(self) -> None:
        """Release threads and files."""


class PytreeCkpt(Side):
    name = "pytree_ckpt"
    ops = ("save", "restore", "save_async", "metadata", "restore_at")

    def __init__(self) -> None:
        import pytree_ckpt

        self.pc = pytree_ckpt

    def save(self, tree: Tree, path: str) -> None:
        self.pc.save(tree, path)

    def save_async(self, tree: Tree, path: str) -> Wait:
        return self.pc.save_async(tree, path).result

    def restore(self, path: str, spec: Tree) -> Tree:
        tree, self.status = self.pc.restore(path, spec)
        return tree

    def metadata(self, path: str) -> Any:
        return self.pc.metadata(path)

    def restore_at(self, path: str, subtree: Subtree) -> Tree:
        tree, self.status = self.pc.restore(path, subtree.spec, at=subtree.path)
        return tree

    def check(self, restored: Tree, expected: Tree) -> None:
        self.status.assert_consumed()  # every leaf matched, both ways
        super().check(restored, expected)


class Orbax(Side):
    name = "orbax"
    ops = ("save", "restore", "save_async", "metadata")

    def __init__(self) -> None:
        import orbax.checkpoint as ocp

        self.checkpointer = ocp.StandardCheckpointer()

    def save(self, tree: Tree, path: str) -> None:
        self.save_async(tree, path)()

    def save_async(self, tree: Tree, path: str) -> Wait:
        self.checkpointer.save(path, tree)

        def wait() -> None:
            self.checkpointer.wait_until_finished()
            fsync_tree(path)

        return wait

    def restore(self, path: str, spec: Tree) -> Tree:
        return self.checkpointer.restore(path, spec)

    def metadata(self, path: str) -> Any:
        return self.checkpointer.metadata(path)

    def close(self) -> None:
        self.checkpointer.close()


class NpSave(Side):
    name = "np.save"

    def save(self, tree: Tree, path: str) -> None:
        os.makedirs(path)
        for i, leaf in enumerate(jax.tree_util.tree_leaves(tree)):
            with open(os.path.join(path, f"{i}.npy"), "wb") as f:
                np.save(f, np.asarray(leaf))
                _flush_and_sync(f)
        fsync_dir(path)
        fsync_dir(os.path.dirname(path))

    def restore(self, path: str, spec: Tree) -> Tree:
        leaves, treedef = jax.tree_util.tree_flatten(spec)
        arrays = [np.load(os.path.join(path, f"{i}.npy")) for i in range(len(leaves))]
        placed = jax.device_put(arrays, [leaf.sharding for leaf in leaves])
        return jax.tree_util.tree_unflatten(treedef, placed)


class Disk(Side):
    """Sequential durable write and read of the tree's bytes, as one file."""

    name = "disk"

    def __init__(self) -> None:
        self.buffers: list[np.ndarray] = []

    def prepare(self, tree: Tree) -> None:
        # Host copies made outside the timing, so this side measures the disk alone.
        self.buffers = [np.asarray(x).reshape(-1) for x in jax.tree_util.tree_leaves(tree)]

    def save(self, tree: Tree, path: str) -> None:
        with open(path, "wb") as f:
            for buffer in self.buffers:
                f.write(buffer.data)
            _flush_and_sync(f)
        fsync_dir(os.path.dirname(path))

    def restore(self, path: str, spec: Tree) -> Tree:
        out = np.empty(os.path.getsize(path), np.uint8)
        with open(path, "rb", buffering=0) as f:
            f.readinto(out.data)
        return out

    def check(self, restored: Tree, expected: Tree) -> None:
        offset = 0
        for buffer in self.buffers:
            chunk = restored[offset : offset + buffer.nbytes]
            if not np.array_equal(chunk, buffer.view(np.uint8)):
                raise AssertionError("disk: the bytes read back differ from those written")
            offset += buffer.nbytes

    def release(self) -> None:
        self.buffers = []


SIDES: dict[str, type[Side]] = {s.name: s for s in (PytreeCkpt, Orbax, NpSave, Disk)}


def make_side(name: str) -> Side:
    return SIDES[name]()


def check_same(restored: Tree, expected: Tree, side: str) -> None:
    """Same structure, same values, same shardings; an AssertionError naming the leaf if not."""
    got, got_def = jax.tree_util.tree_flatten_with_path(restored)
    want, want_def = jax.tree_util.tree_flatten_with_path(expected)
    if got_def != want_def:
        raise AssertionError(f"{side}: restored structure {got_def} != saved {want_def}")
    for (path, a), (_, b) in zip(got, want, strict=True):
        where = f"{side}: leaf {jax.tree_util.keystr(path)}"
        if not np.array_equal(np.asarray(a), np.asarray(b)):
            raise AssertionError(f"{where} restored with other values")
        if isinstance(b, jax.Array) and not a.sharding.is_equivalent_to(b.sharding, b.ndim):
            raise AssertionError(f"{where} restored on {a.sharding}, saved on {b.sharding}")


# ---------------------------------------------------------------------------------------
# Durability helpers


def _flush_and_sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and directory under `path`, then `path`'s parent directory."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)
    fsync_dir(os.path.dirname(path))
