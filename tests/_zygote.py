"""A warm process that forks a fresh child per snippet, for tests that need a process of its
own (to measure its memory, to kill it, to see what it leaves at exit) many times over.

    with Zygote() as zygote:
        done = zygote.run(CODE, [str(path)], timeout=60)
        done.returncode, done.stdout, done.stderr

        pid = zygote.start(CODE, [], env=ENV, replace_env=True, out=OUT, err=ERR)
        zygote.exit_code(pid)  # None while it runs; zygote.wait(pid, timeout) blocks

Started once (``python _zygote.py``), the zygote imports JAX, pytree_ckpt, NumPy and msgpack
without creating a backend, a device or a TensorStore context, then forks a child per
``run``: the child starts from the imported modules and creates its own backend. A child
runs the snippet as ``python -c CODE ARGV...`` would (``sys.argv``, ``__name__ ==
"__main__"``, exit status from ``SystemExit``; an uncaught exception prints its traceback
and exits 1), with stdout and stderr in files of its own and stdin closed; at its end,
``atexit`` handlers run as at a normal interpreter exit. A child still running at
``timeout`` is SIGKILLed and ``TimeoutError`` raised. :meth:`Zygote.start` starts a child
and returns at once (several may run side by side: a multi-process job's processes, see
``_multiprocess.py``); the zygote reaps each child and reports its exit status.

The zygote is single-threaded (it forks from its main thread only: a fork beside other
threads can inherit a lock one of them held) and dies with the process that started it:
its stdin reaches EOF, and ``PR_SET_PDEATHSIG`` covers a parent killed outright.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
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
        self.pid = self._proc.pid
        self._count = 0
        self._lock = threading.Lock()  # one request at a time: its reply is the next pid
        self._changed = threading.Condition()
        self._pids: list[int] = []  # replies to requests, in order
        self._exits: dict[int, int] = {}
        self._reader: threading.Thread | None = None
        if self._proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("the zygote did not start")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def run(self, code: str, argv: list[str] = (), *, env: dict[str, str] | None = None,
            timeout: float = 60) -> Done:
        """Runs ``code`` in a fresh child with ``argv``, and ``env`` added to its
        environment; returns when the child has exited."""
        self._count += 1
        out = os.path.join(self._dir.name, f"{self._count}.out")
        err = os.path.join(self._dir.name, f"{self._count}.err")
        pid = self.start(code, argv, env=env, out=out, err=err)
        status = self.wait(pid, timeout)
        killed = status is None
        if killed:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(pid, signal.SIGKILL)
            status = self.wait(pid, None)
        stdout, stderr = Path(out).read_text(), Path(err).read_text()
        if killed:
            raise TimeoutError(f"the child ran past {timeout} s\n{stdout}\n{stderr}")
        return Done(status, stdout, stderr)

    def start(self, code: str, argv: list[str] = (), *, env: dict[str, str] | None = None,
              replace_env: bool = False, cwd: str | None = None, out: str, err: str) -> int:
        """Forks a child running ``code`` (stdout to the file ``out``, stderr to ``err``,
        ``env`` added to its environment or, with ``replace_env``, its whole environment;
        in the directory ``cwd`` if given); its pid, at once."""
        request = {"code": code, "argv": list(map(str, argv)), "env": env or {},
                   "replace_env": replace_env, "cwd": cwd, "out": out, "err": err}
        with self._lock:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            with self._changed:
                if not self._changed.wait_for(lambda: self._pids or self._proc.poll() is not None,
                                              timeout=60) or not self._pids:
                    raise RuntimeError("the zygote did not fork a child")
                return self._pids.pop(0)

    def exit_code(self, pid: int) -> int | None:
        """The exit status of the child ``pid`` (negative: killed by that signal), or None
        while it runs. A child is reaped before its status is known here."""
        with self._changed:
            return self._exits.get(pid)

    def wait(self, pid: int, timeout: float | None) -> int | None:
        """:meth:`exit_code` once the child has exited, or None at ``timeout``."""
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exits, timeout=timeout)
            return self._exits.get(pid)

    def _read(self) -> None:
        for line in self._proc.stdout:
            what, *numbers = line.split()
            with self._changed:
                if what == "pid":
                    self._pids.append(int(numbers[0]))
                elif what == "exit":
                    self._exits[int(numbers[0])] = int(numbers[1])
                self._changed.notify_all()

    def close(self) -> None:
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)  # it ends at the zygote's EOF
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
        # Line-buffered: a parent may watch the file for a line as it is printed.
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        if request["replace_env"]:
            os.environ.clear()
        os.environ.update(request["env"])
        if request.get("cwd"):
            os.chdir(request["cwd"])
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
    # Die with the parent even if it is killed outright (PR_SET_PDEATHSIG = 1).
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    import jax  # noqa: F401  (imported before fork; no backend is created here)
    import msgpack  # noqa: F401
    import numpy  # noqa: F401

    import pytree_ckpt  # noqa: F401

    print("ready", flush=True)
    pending = b""
    running = 0
    while True:
        readable, _, _ = select.select([0], [], [], 0.02 if running else None)
        while running:  # reap every child that has exited
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            running -= 1
            print("exit", pid, os.waitstatus_to_exitcode(status), flush=True)
        if not readable:
            continue
        data = os.read(0, 1 << 16)
        if not data:  # the parent is gone: so are we (the children die with us)
            return
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _child(request)
            running += 1
            print("pid", pid, flush=True)


if __name__ == "__main__":
    _serve()
