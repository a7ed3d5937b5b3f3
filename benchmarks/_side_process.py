"""Orbax in a process of its own, timed there, driven from the benchmark's process.

Why: what Orbax leaves behind in a process slows any Python that runs there afterwards.
After one Orbax save and restore of the small tree, a pure-Python loop (100,000 dict
inserts, garbage collector off) took 40 ms instead of 30, and pytree_ckpt's `metadata()`
19-22 ms instead of 14-16 (three processes each way; the same amount of pytree_ckpt work
first: no change). No hook, tracer or busy thread explains it; Orbax leaves ~100,000
objects and many threads behind. A user's program runs one checkpointer, so Orbax is timed
in a worker of its own and pytree_ckpt, `np.save` and `disk` in another (a worker per side
held four copies of the 1.3 GB trees, each with what its library keeps: out of memory
on a 24 GiB machine).

The parent starts one worker per group of sides and tree (`python _side_process.py`, JSON
lines on its stdin and stdout). The worker builds the tree from its spec with the same
seed (the same values in every worker) and, for each command, settles
(`_timing.settle`) and times one operation of one side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback


class Worker:
    """The parent's handle on one worker process for one tree, running ``sides``."""

    def __init__(self, sides: list[str], tree: str, smoke: bool) -> None:
        self.names = sides
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self._send({"sides": sides, "tree": tree, "smoke": smoke})

    def ready(self) -> list[SideHandle]:
        """Waits until the worker has built its tree; a handle per side, in order."""
        ops = self._receive()["ops"]
        return [SideHandle(name, tuple(ops[name]), self) for name in self.names]

    def run(self, side: str, op: str, path: str, *, check: bool, recycle: int,
            drop_cache: bool) -> dict[str, float]:
        self._send({"side": side, "op": op, "path": path, "check": check, "recycle": recycle,
                    "drop_cache": drop_cache})
        return self._receive()["seconds"]

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._send({"op": "close"})
            except BrokenPipeError:
                pass
            self._proc.wait(timeout=120)

    def _send(self, message: dict) -> None:
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()

    def _receive(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker for {self.names} died (exit {self._proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker for {self.names}:\n{reply['error']}")
        return reply


class SideHandle:
    """One side, as the timing loop sees it: its name, its operations, and `run`."""

    def __init__(self, name: str, ops: tuple[str, ...], worker: Worker) -> None:
        self.name, self.ops, self._worker = name, ops, worker

    def run(self, op: str, path: str, *, check: bool, recycle: int, drop_cache: bool
            ) -> dict[str, float]:
        """Settles, times `op` on the worker's tree at `path`; `{key: seconds}`."""
        return self._worker.run(self.name, op, path, check=check, recycle=recycle,
                                drop_cache=drop_cache)


def _serve() -> None:
    # stdout carries the replies: whatever the libraries print goes to stderr.
    replies, sys.stdout = sys.stdout, sys.stderr
    hello = json.loads(sys.stdin.readline())
    from _sides import make_side
    from _timing import TreeCase, run_op
    from _trees import materialize, subtree_near, tree_spec

    spec = tree_spec(hello["tree"], hello["smoke"])
    case = TreeCase(materialize(spec), spec, subtree_near(spec))
    sides = {name: make_side(name) for name in hello["sides"]}
    for side in sides.values():
        side.prepare(case.tree)

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    reply({"ops": {name: side.ops for name, side in sides.items()}})
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "close":
            break
        try:
            seconds = run_op(sides[command["side"]], case, command["op"], command["path"],
                             check=command["check"], recycle=command["recycle"],
                             drop_cache=command["drop_cache"], wait_idle=not hello["smoke"])
        except Exception:
            reply({"error": traceback.format_exc()})
            break
        reply({"seconds": seconds})
    for side in sides.values():
        side.release()
        side.close()


if __name__ == "__main__":
    _serve()
