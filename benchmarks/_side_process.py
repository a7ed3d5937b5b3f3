"""Each side in a process of its own, timed there, driven from the benchmark's process.

Why: what one library leaves behind in a process slows the next one's Python there. After
one Orbax save and restore of the small tree, a pure-Python loop (100,000 dict inserts,
garbage collector off) took 40 ms instead of 30, and pytree_ckpt's `metadata()` 19-22 ms
instead of 14-16 (three processes each way; the same amount of pytree_ckpt work first:
no change). No hook, tracer or busy thread explains it; Orbax leaves ~100,000 objects
and many threads behind. A user's program runs one checkpointer, so each side is timed
in a process that runs only that side.

The parent starts one worker per side and tree (`python _side_process.py`, JSON lines on
its stdin and stdout). The worker builds the tree from its spec with the same seed (the
same values in every worker), warms up with the parent's commands like any round, and
for each command settles (`_timing.settle`) and times one operation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback


class SideProcess:
    """The parent's handle on one side's worker for one tree."""

    def __init__(self, side: str, tree: str, smoke: bool) -> None:
        self.name = side
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self._send({"side": side, "tree": tree, "smoke": smoke})

    def ready(self) -> None:
        """Waits until the worker has built its tree; learns which operations it has."""
        self.ops = tuple(self._receive()["ops"])

    def run(self, op: str, path: str, *, check: bool, recycle: int, drop_cache: bool
            ) -> dict[str, float]:
        """Settles, times `op` on the worker's tree at `path`; `{key: seconds}`."""
        self._send({"op": op, "path": path, "check": check, "recycle": recycle,
                    "drop_cache": drop_cache})
        return self._receive()["seconds"]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._send({"op": "close"})
            self._proc.wait(timeout=120)

    def _send(self, message: dict) -> None:
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()

    def _receive(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker died (exit {self._proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name} worker:\n{reply['error']}")
        return reply


def _serve() -> None:
    # stdout carries the replies: whatever the libraries print goes to stderr.
    replies, sys.stdout = sys.stdout, sys.stderr
    hello = json.loads(sys.stdin.readline())
    from _sides import make_side
    from _timing import TreeCase, run_op
    from _trees import materialize, subtree_near, tree_spec

    spec = tree_spec(hello["tree"], hello["smoke"])
    case = TreeCase(materialize(spec), spec, subtree_near(spec))
    side = make_side(hello["side"])
    side.prepare(case.tree)

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    reply({"ops": side.ops})
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "close":
            break
        try:
            seconds = run_op(side, case, command["op"], command["path"], check=command["check"],
                             recycle=command["recycle"], drop_cache=command["drop_cache"])
        except Exception:
            reply({"error": traceback.format_exc()})
            break
        reply({"seconds": seconds})
    side.release()
    side.close()


if __name__ == "__main__":
    _serve()
