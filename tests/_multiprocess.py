"""Run a Python snippet in N real ``jax.distributed`` processes on loopback.

Usage::

    from _multiprocess import run_multiprocess, assert_all_ok

    results = run_multiprocess(
        '''
        import jax
        from pytree_ckpt import _distributed
        _distributed.report_and_check("hello", None, timeout_s=5)
        print("I am", process_id, "of", num_processes, "with", jax.local_devices())
        ''',
        num_processes=2,
        devices_per_process=2,
        timeout_s=30,
    )
    assert_all_ok(results)
    assert "I am 1 of 2" in results[1].stdout

Each child is forked from a warm zygote (``_zygote.py``: one per test process, JAX and
pytree_ckpt imported once, no backend), gets the job's environment, initializes
``jax.distributed`` (gloo CPU collectives, a fresh loopback port) and starts its backend
before the snippet runs (backend start-up waits for every process, so a process killed
early in the snippet would otherwise hang the others there). The snippet sees these globals:

- ``process_id``, ``num_processes``: this process and the job size.
- ``args``: the JSON round trip of ``run_multiprocess(..., args=...)``.
- ``crash()``: flush the output and SIGKILL this process, right here.

To kill a process at a chosen moment, either call ``crash()`` in the snippet (exact
point), or pass ``kill_on={1: "MARKER"}`` and print ``MARKER`` in process 1: the parent
SIGKILLs it when it reads the line (asynchronously: make the child wait after printing).

How the children end (the part that is easy to get wrong):

- A child that finishes its snippet tells the parent so on a control pipe and waits.
- If every child finished and none died, the parent tells them all to call
  ``jax.distributed.shutdown()``: JAX's own exit path, a barrier over all processes.
- If a child died, that barrier could never complete (JAX would wait out
  ``shutdown_timeout_seconds`` and then abort the process), so the parent tells the
  survivors to exit without it: processes other than 0 first, and process 0, which
  hosts the coordination service, only once they are gone. A client whose service
  disappears aborts itself, so the order matters.
- Children and the zygote get ``PR_SET_PDEATHSIG=SIGKILL`` (a child dies with the zygote,
  the zygote with the parent), so none outlives the parent (pytest itself being killed
  included); every exit path of ``run_multiprocess`` kills whatever is still running
  and waits until the zygote has reaped it.

JAX facts this relies on (jax 0.10.2): a dead process is noticed only after
``heartbeat_timeout_s``, and then JAX aborts every other process. Timeouts in the
snippet (e.g. ``report_and_check``) must be well below it for survivors to see a
Python exception rather than an abort.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import tempfile
import textwrap
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from _zygote import Zygote

__all__ = [
    "MultiprocessError",
    "ProcessResult",
    "assert_all_ok",
    "format_results",
    "run_multiprocess",
]

_SRC = str(Path(__file__).resolve().parent.parent / "src")

# rank 0 logs this (from gRPC) when it cannot bind the coordinator port (a socket
# without SO_REUSEPORT holds it): the run is retried on a fresh port at once, instead
# of every process failing at the initialization timeout.
_PORT_TAKEN = "Failed to add port to server"
_PORT_ATTEMPTS = 3


class ProcessResult(NamedTuple):
    """What one process did: its exit status and its whole output."""

    returncode: int  # negative: killed by that signal (-9 SIGKILL, -6 abort)
    stdout: str
    stderr: str


class MultiprocessError(AssertionError):
    """The run timed out, or (from `assert_all_ok`) a process failed; says which and shows
    every process's output."""


# The program each child runs, forked by a warm zygote (``_zygote.py``: JAX is imported
# once, not once per child). Parent -> child: environment and a FIFO of commands;
# child -> parent: stdout and stderr (files the parent follows) and a control file.
_BOOTSTRAP = r"""
import ctypes, json, os, select, signal, sys, traceback

# Die with the zygote (which dies with the parent), so no child is orphaned even if the
# parent is SIGKILLed. (PR_SET_PDEATHSIG = 1: it fires when the forking thread exits.)
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
if os.getppid() != int(os.environ["_MP_PARENT_PID"]):
    os._exit(111)  # the zygote already died before prctl took effect

process_id = int(os.environ["_MP_PROCESS_ID"])
num_processes = int(os.environ["_MP_NUM_PROCESSES"])
# Opened now, before the parent may write to it: a FIFO with no reader refuses writers.
commands = os.open(os.environ["_MP_COMMANDS"], os.O_RDONLY | os.O_NONBLOCK)

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port = os.environ["_MP_PORT"]
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    # Bind to loopback only: JAX's default ([::]:port) listens on every interface.
    coordinator_bind_address=f"127.0.0.1:{port}",
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=int(os.environ["_MP_INIT_TIMEOUT"]),
    heartbeat_timeout_seconds=int(os.environ["_MP_HEARTBEAT_TIMEOUT"]),
    shutdown_timeout_seconds=int(os.environ["_MP_SHUTDOWN_TIMEOUT"]),
)
# Start the backend now: its start-up exchanges topology with every process, so a
# snippet that kills one process before its first JAX call would otherwise leave the
# others stuck there (for minutes) rather than in the code under test.
jax.devices()


def crash():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


path = os.environ["_MP_CODE"]
namespace = {
    "__name__": "__multiprocess__",
    "__file__": path,
    "process_id": process_id,
    "num_processes": num_processes,
    "args": json.loads(os.environ["_MP_ARGS"]),
    "crash": crash,
}
rc = 0
try:
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), namespace)
except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
except BaseException:
    traceback.print_exc()
    rc = 1
sys.stdout.flush()
sys.stderr.flush()
with open(os.environ["_MP_CONTROL"], "w") as control:
    control.write(f"done {rc}\n")

command = b""
while not command.endswith(b"\n"):
    select.select([commands], [], [])
    more = os.read(commands, 64)
    if not more:  # the parent closed the FIFO without a command
        break
    command += more
if command.strip() == b"shutdown":
    try:
        jax.distributed.shutdown()
    except BaseException:
        traceback.print_exc()
        rc = rc or 1
sys.stdout.flush()
sys.stderr.flush()
# Skip interpreter teardown (atexit would try jax.distributed.shutdown() again, and
# with a dead peer that waits out the shutdown timeout and then aborts).
os._exit(rc)
"""


def run_multiprocess(
    code: str,
    *,
    num_processes: int,
    devices_per_process: int = 1,
    timeout_s: float = 60.0,
    kill_on: Mapping[int, str] | None = None,
    args: Any = None,
    heartbeat_timeout_s: int = 10,
    shutdown_timeout_s: int = 5,
    init_timeout_s: int = 20,
    env: Mapping[str, str] | None = None,
) -> list[ProcessResult]:
    """Run `code` in `num_processes` processes of one ``jax.distributed`` job.

    **Arguments:**

    - `code`: Python source (dedented here) run in every process after
      ``jax.distributed.initialize``; see the module docstring for its globals.
    - `num_processes`, `devices_per_process`: the job's shape (CPU devices via
      ``--xla_force_host_platform_device_count``).
    - `timeout_s`: hard limit for the whole run; past it every process is killed.
    - `kill_on`: ``{process: marker}``: SIGKILL that process when it prints a line
      containing the marker.
    - `args`: JSON-serializable value handed to the snippet as ``args``.
    - `heartbeat_timeout_s`, `shutdown_timeout_s`, `init_timeout_s`: the
      ``jax.distributed.initialize`` timeouts (short, so a broken run fails fast).
    - `env`: extra environment variables for the children.

    **Returns:** one `ProcessResult` per process, in process order. A failing process
    is not an error here: check with `assert_all_ok` or look at the results.

    **Raises:**

    - `MultiprocessError`: the run did not finish within `timeout_s` (all outputs in
      the message).
    """
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError("num_processes and devices_per_process must be at least 1")
    with tempfile.TemporaryDirectory(prefix="pytree_ckpt_mp_") as tmp:
        code_path = Path(tmp, "snippet.py")
        code_path.write_text(textwrap.dedent(code))
        base_env = _child_env(devices_per_process, env)
        base_env.update(
            _MP_CODE=str(code_path),
            _MP_ARGS=json.dumps(args),
            _MP_NUM_PROCESSES=str(num_processes),
            _MP_INIT_TIMEOUT=str(init_timeout_s),
            _MP_HEARTBEAT_TIMEOUT=str(heartbeat_timeout_s),
            _MP_SHUTDOWN_TIMEOUT=str(shutdown_timeout_s),
        )
        _zygote()  # started (once per test process) before the run's time starts
        deadline = time.monotonic() + timeout_s
        for _ in range(_PORT_ATTEMPTS):
            run = _Run(num_processes, base_env, tmp, dict(kill_on or {}))
            try:
                outcome = run.wait(deadline)
            finally:
                run.close()
            if outcome == "port taken":
                continue
            results = run.results()
            if outcome == "timeout":
                raise MultiprocessError(
                    f"Multi-process run did not finish within {timeout_s:g} s; killed all "
                    f"{num_processes} processes.\n" + format_results(results)
                )
            return results
        raise MultiprocessError(
            f"Could not bind a coordinator port in {_PORT_ATTEMPTS} attempts.\n"
            + format_results(run.results())
        )


def assert_all_ok(results: list[ProcessResult]) -> None:
    """Raise `MultiprocessError` showing every output unless every process exited 0."""
    bad = [i for i, r in enumerate(results) if r.returncode != 0]
    if bad:
        raise MultiprocessError(
            f"Process(es) {bad} failed (return codes {[r.returncode for r in results]}).\n"
            + format_results(results)
        )


def format_results(results: list[ProcessResult]) -> str:
    """Every process's return code, stdout and stderr, for an assertion message."""
    parts = []
    for i, r in enumerate(results):
        parts.append(f"===== process {i}: return code {r.returncode} =====")
        parts.append(f"--- stdout ---\n{r.stdout.rstrip()}")
        parts.append(f"--- stderr ---\n{r.stderr.rstrip()}")
    return "\n".join(parts)


def _child_env(devices_per_process: int, extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # gRPC honours *_proxy variables even for 127.0.0.1, which can hang the connect
    # (JAX warns about it too); a loopback job never needs a proxy.
    for key in [k for k in env if k.lower().endswith("_proxy")]:
        del env[key]
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_CPU_DEVICES", "JAX_LOCAL_DEVICE_IDS"):
        env.pop(key, None)
    xla_flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    xla_flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    env["XLA_FLAGS"] = " ".join(xla_flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, env.get("PYTHONPATH")) if p)
    # Markers must reach the parent when printed, not when a buffer fills.
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _reserve_port() -> socket.socket:
    """A socket holding a free loopback port for the coordinator, until it is closed.

    It is bound but never listens, with SO_REUSEPORT: gRPC binds its own listener with
    SO_REUSEPORT too, so it can share the port, while no other ``bind(0)`` (another run
    of this harness, say) is handed the same port meanwhile. Only listening sockets
    receive connections, so this one never steals the coordinator's.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
    except BaseException:
        s.close()
        raise
    return s


class _Child:
    """One process, forked by the zygote, and the thread that follows its output."""

    def __init__(self, rank: int, env: dict[str, str], cwd: str, files: str,
                 marker: str | None) -> None:
        self.rank = rank
        self.marker = marker
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.done = threading.Event()  # the snippet finished (the child now waits)
        self.port_taken = threading.Event()
        self.returncode: int | None = None
        self._zygote = _zygote()
        self._files = {name: os.path.join(files, f"{rank}.{name}")
                       for name in ("out", "err", "control", "commands")}
        os.mkfifo(self._files["commands"])
        env = dict(env, _MP_PROCESS_ID=str(rank), _MP_PARENT_PID=str(self._zygote.pid),
                   _MP_CONTROL=self._files["control"], _MP_COMMANDS=self._files["commands"])
        self.pid = self._zygote.start(_BOOTSTRAP, env=env, replace_env=True, cwd=cwd,
                                      out=self._files["out"], err=self._files["err"])
        self.threads = [threading.Thread(target=self._follow, daemon=True)]
        for t in self.threads:
            t.start()

    def _follow(self) -> None:
        """Reads the child's output files as they grow, line by line, until it has exited."""
        streams = [(self._files["out"], self.stdout, True), (self._files["err"], self.stderr, False)]
        partial = ["", ""]
        opened: list[Any] = [None, None]  # kept open: each read goes on where the last ended
        while True:
            exited = not self.running()  # before the last read: nothing is written after
            for i, (path, lines, is_stdout) in enumerate(streams):
                if opened[i] is None:
                    try:
                        opened[i] = open(path, errors="replace")
                    except FileNotFoundError:  # not created yet
                        continue
                *complete, partial[i] = (partial[i] + opened[i].read()).split("\n")
                for line in complete:
                    self._line(line + "\n", lines, is_stdout)
            if not self.done.is_set() and os.path.exists(self._files["control"]):
                with open(self._files["control"]) as f:
                    if f.read().startswith("done"):
                        self.done.set()
            if exited:
                for i, (_path, lines, is_stdout) in enumerate(streams):
                    if partial[i]:
                        self._line(partial[i], lines, is_stdout)
                    if opened[i] is not None:
                        opened[i].close()
                return
            time.sleep(0.02)

    def _line(self, line: str, lines: list[str], is_stdout: bool) -> None:
        lines.append(line)
        if self.marker is not None and is_stdout and self.marker in line:
            self.kill()
        if self.rank == 0 and _PORT_TAKEN in line:
            self.port_taken.set()

    def running(self) -> bool:
        if self.returncode is None:
            self.returncode = self._zygote.exit_code(self.pid)
        return self.returncode is None

    def send(self, command: str) -> None:
        try:
            fd = os.open(self._files["commands"], os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return  # no reader: it died meanwhile, nothing to tell it
        try:
            os.write(fd, (command + "\n").encode())
        except OSError:
            pass
        finally:
            os.close(fd)

    def kill(self) -> None:
        if self.running():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait(self) -> None:
        """Until the child has exited and been reaped."""
        self.returncode = self._zygote.wait(self.pid, None)


_ZYGOTE: list[Zygote] = []


def _zygote() -> Zygote:
    """This process's zygote, started on first use and closed at exit."""
    if not _ZYGOTE:
        _ZYGOTE.append(Zygote(_child_env(1, None)))
        atexit.register(_ZYGOTE[0].close)
    return _ZYGOTE[0]


class _Run:
    """One attempt: N children on one port, and the decision of how they end."""

    def __init__(self, n: int, env: dict[str, str], cwd: str, kill_on: dict[int, str]) -> None:
        self.children: list[_Child] = []
        self.port = _reserve_port()
        env = dict(env, _MP_PORT=str(self.port.getsockname()[1]))
        try:
            files = tempfile.mkdtemp(prefix="run-", dir=cwd)  # this attempt's pipes and output
            for rank in range(n):
                self.children.append(_Child(rank, env, cwd, files, kill_on.get(rank)))
        except BaseException:
            self.close()
            raise

    def wait(self, deadline: float) -> str:
        """Drive the run to its end: "ok", "timeout" or "port taken"."""
        children = self.children
        while True:
            if children[0].port_taken.is_set():
                return "port taken"
            # A child is settled once it finished its snippet or exited; `done` is
            # re-checked after `running` so an exit right after "done" is not a death.
            if all(c.done.is_set() or not c.running() for c in children):
                break
            if time.monotonic() > deadline:
                return "timeout"
            time.sleep(0.02)
        died = [c for c in children if not c.running() and not c.done.is_set()]
        if not died:
            for c in children:
                c.send("shutdown")
        else:
            # No shutdown barrier with a dead peer; process 0 (the service) goes last.
            for c in children[1:]:
                c.send("exit")
            while any(c.running() for c in children[1:]):
                if time.monotonic() > deadline:
                    return "timeout"
                time.sleep(0.02)
            children[0].send("exit")
        while any(c.running() for c in children):
            if time.monotonic() > deadline:
                return "timeout"
            time.sleep(0.02)
        return "ok"

    def close(self) -> None:
        """Kill and reap every child still running, and finish draining their output."""
        self.port.close()
        for c in self.children:
            c.kill()
        for c in self.children:
            c.wait()
            for t in c.threads:
                t.join(timeout=5)

    def results(self) -> list[ProcessResult]:
        return [
            ProcessResult(c.returncode, "".join(c.stdout), "".join(c.stderr))
            for c in self.children
        ]
