"""A warm process that forks a fresh child per snippet, for tests that need a process of its
own (to measure its memory, to kill it, to see what it leaves at exit) many times over.

    with Zygote() as zygote:
        done = zygote.run(CODE, [str(path)], timeout=60)
        done.returncode, done.stdout, done.stderr

Started once (``python _zygote.py``), the zygote imports JAX, pytree_ckpt, NumPy and msgpack
without creating a backend, a device or a TensorStore context, then forks a child per
``run``: the child starts from the imported modules and creates its own backend. A child
runs the snippet as ``python -c CODE ARGV...`` would (``sys.argv``, ``__name__ ==
"__main__"``, exit status from ``SystemExit``; an uncaught exception prints its traceback
and exits 1), with stdout and stderr in files of its own and stdin closed; at its end,
``atexit`` handlers run as at a normal interpreter exit. A child still running at
``timeout`` is SIGKILLed and ``TimeoutError`` raised.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

_SRC = str(Path(__file__).resolve().parent.parent / "src")


class Done(NamedTuple):
    """A child's exit status (negative: killed by that signal) and its output."""

    returncode: int
    stdout: str
    stderr: str


class Zygote:
    """The parent's side: start with ``with Zygote(env) as z``; ``z.run(...)`` per child."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        full = dict(os.environ, **(env or {}))
        full["PYTHONPATH"] = os.pathsep.join(filter(None, [_SRC, full.get("PYTHONPATH")]))
        self._dir = tempfile.TemporaryDirectory(prefix="pytree_ckpt_zygote_")
        self._proc = subprocess.Popen([sys.executable, __file__], env=full, text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._count = 0
        if self._proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("the zygote did not start")

    def run(self, code: str, argv: list[str] = (), *, env: dict[str, str] | None = None,
            timeout: float = 60) -> Done:
        """Runs ``code`` in a fresh child with ``argv``, and ``env`` added to its
        environment; returns when the child has exited."""
        self._count += 1
        out = os.path.join(self._dir.name, f"{self._count}.out")
        err = os.path.join(self._dir.name, f"{self._count}.err")
        request = {"code": code, "argv": list(map(str, argv)), "env": env or {}, "out": out,
                   "err": err}
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        pid = int(self._proc.stdout.readline())
        killed = []

        def kill() -> None:
            killed.append(pid)
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            status = int(self._proc.stdout.readline())
        finally:
            timer.cancel()
        stdout, stderr = Path(out).read_text(), Path(err).read_text()
        if killed:
            raise TimeoutError(f"the child ran past {timeout} s\n{stdout}\n{stderr}")
        return Done(status, stdout, stderr)

    def close(self) -> None:
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        self._dir.cleanup()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _child(request: dict) -> None:
    """In the forked child: become ``python -c CODE ARGV...`` and never return."""
    rc = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, request["out"]), (2, request["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        os.environ.update(request["env"])
        sys.argv = ["-c", *request["argv"]]
        try:
            exec(compile(request["code"], "<string>", "exec"), {"__name__": "__main__"})
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            import traceback

            traceback.print_exc()
            rc = 1
        import atexit

        atexit._run_exitfuncs()  # as the interpreter does when it exits
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


def _serve() -> None:
    import jax  # noqa: F401  (imported before fork; no backend is created here)
    import msgpack  # noqa: F401
    import numpy  # noqa: F401

    import pytree_ckpt  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    _serve()
