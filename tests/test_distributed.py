"""Tests of `pytree_ckpt._distributed` on real `jax.distributed` jobs on loopback.

Each multi-process test runs a snippet in every process (see `_multiprocess.py`); the
snippet prints one ``RESULT <json>`` line that the test reads back.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import _multiprocess
import pytest
from _multiprocess import (
    MultiprocessError,
    ProcessResult,
    assert_all_ok,
    format_results,
    run_multiprocess,
)

from pytree_ckpt import _distributed
from pytree_ckpt._distributed import DistributedError

# (processes, devices per process): several devices per process, and one each.
LAYOUTS = [pytest.param(2, 2, id="2proc-x2dev"), pytest.param(4, 1, id="4proc-x1dev")]

# Every multi-process run must finish well inside the pytest timeout, so that a hang
# is reported by the harness, with every process's output, rather than by pytest.
# (90 s: generous, for two cores that other jobs load.)
RUN_TIMEOUT_S = 90
pytestmark = pytest.mark.timeout(120)

# Prepended to every snippet: report a JSON result the test can read back.
_PRELUDE = """
import json, sys, time
from pytree_ckpt import _distributed
from pytree_ckpt._distributed import DistributedError

def result(part, **values):
    print("RESULT " + json.dumps({"part": part, **values}), flush=True)
"""


def _run(code: str, num_processes: int, devices: int, **kwargs) -> list[ProcessResult]:
    return run_multiprocess(
        _PRELUDE + textwrap.dedent(code),
        num_processes=num_processes,
        devices_per_process=devices,
        timeout_s=RUN_TIMEOUT_S,
        init_timeout_s=60,  # generous: the last process may start late on busy cores
        **kwargs,
    )


def _results(runs: list[ProcessResult], part: str,
             processes: range | list[int] | None = None) -> list[dict]:
    """Each process's RESULT record of ``part`` (in `processes`, default all), failing with
    all output."""
    records = []
    for i in processes if processes is not None else range(len(runs)):
        lines = [json.loads(ln.removeprefix("RESULT ")) for ln in runs[i].stdout.splitlines()
                 if ln.startswith("RESULT ")]
        mine = [r for r in lines if r.pop("part") == part]
        if len(mine) != 1:
            pytest.fail(f"process {i} printed {len(mine)} RESULT lines of {part!r}\n"
                        + format_results(runs))
        records.append(mine[0])
    return records


# --- single process: no jax.distributed, everything is local --------------------------


def test_single_process_is_local():
    assert _distributed.process_index() == 0
    assert _distributed.process_count() == 1
    assert not _distributed.is_multiprocess()
    assert _distributed.broadcast_str("single", "v", timeout_s=0.1) == "v"
    _distributed.report_and_check("single-ok", None, timeout_s=0.1)


def test_single_process_report_error_raises():
    with pytest.raises(DistributedError, match=r"process 0 failed: OSError: disk full"):
        _distributed.report_and_check("single-bad", "OSError: disk full", timeout_s=0.1)


def test_broadcast_requires_value_on_primary():
    with pytest.raises(ValueError, match="process 0 must pass a value"):
        _distributed.broadcast_str("single", None, timeout_s=0.1)


# --- several processes ------------------------------------------------------------------
# Parts that leave every process alive share one job per layout: each part meets the others
# under names of its own and reports its own RESULT record; the tests below each check one
# part. A part that kills a process ends its job.

_BACKGROUND = """
# save_async will meet the other processes from a background thread. Each call below is made
# to wait ~2 s (a late process, a late primary); meanwhile the main thread must keep running,
# i.e. the client releases the GIL while it blocks.
import threading
_distributed.report_and_check("bg/start", None, timeout_s=20)  # the processes start together
waited = {}
def meet():
    t = time.monotonic()
    if process_id == 0:
        time.sleep(2.0)
    value = _distributed.broadcast_str("bg", "v" if process_id == 0 else None, 20)
    waited["broadcast"] = time.monotonic() - t
    t = time.monotonic()
    if process_id == 0:
        time.sleep(2.0)
    _distributed.report_and_check("bg", None, timeout_s=20)
    waited["report"] = time.monotonic() - t
    waited["value"] = value
thread = threading.Thread(target=meet)
thread.start()
longest_stall = 0.0
last = time.monotonic()
while thread.is_alive():
    now = time.monotonic()
    longest_stall = max(longest_stall, now - last)
    last = now
thread.join()
result("background", longest_stall=longest_stall, **waited)
"""

_BROADCAST = """
mine = "from process 0: ünïcode\\nand a second line" if process_id == 0 else None
if process_id == 2:
    mine = "ignored: not the primary"
result("broadcast", value=_distributed.broadcast_str("bc", mine, timeout_s=20))
"""

_ALL_SUCCEED = """
for step in range(3):  # a name per save, as the save counter will give
    _distributed.report_and_check(f"save/{step}/written", None, timeout_s=20)
result("all_succeed", ok=True)
"""

_ERROR_REACHES_EVERYONE = """
error = "OSError: [Errno 28] No space left on device" if process_id == 1 else None
try:
    _distributed.report_and_check("error/written", error, timeout_s=20)
    result("error", error=None)
except DistributedError as e:
    result("error", error=str(e))
"""

# Sanity for the checkpoint tests: an array over every device of every process, of which
# each process holds (and can read) only its own shards.
_GLOBALLY_SHARDED = """
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

mesh = Mesh(np.array(jax.devices()), ("d",))
sharding = NamedSharding(mesh, P("d"))
full = np.arange(len(jax.devices()) * 4 * 3, dtype=np.float32).reshape(-1, 3)
x = jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])
shards = x.addressable_shards
local = set(jax.local_devices())
total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
result(
    "sharded",
    shape=list(x.shape),
    global_devices=len(jax.devices()),
    fully_addressable=x.is_fully_addressable,
    shard_devices_local=all(s.device in local for s in shards),
    rows=[[s.index[0].start, s.index[0].stop] for s in shards],
    data_ok=all(np.array_equal(np.asarray(s.data), full[s.index]) for s in shards),
    total=float(total),
    expected_total=float(full.sum()),
)
"""


@pytest.fixture(scope="module", params=[pytest.param(p.values, id=p.id) for p in LAYOUTS])
def shared_job(request) -> tuple[int, int, list[ProcessResult]]:
    """(processes, devices per process, the runs) of one job running every part above."""
    num_processes, devices = request.param
    code = "".join((_BACKGROUND, _BROADCAST, _ALL_SUCCEED, _ERROR_REACHES_EVERYONE,
                    _GLOBALLY_SHARDED))
    return num_processes, devices, _run(code, num_processes, devices)


def test_background_thread_waits_without_holding_the_gil(shared_job):
    _, _, runs = shared_job
    assert_all_ok(runs)
    records = _results(runs, "background")
    for i, r in enumerate(records):
        assert r["value"] == "v"
        if i != 0:  # they did wait for process 0
            assert r["broadcast"] > 1.0, records
            assert r["report"] > 1.0, records
        # The interpreter switches threads every 5 ms; a call holding the GIL through its
        # wait would stall the main thread for ~2 s. Half of that: a loaded machine
        # deschedules a process for tenths of a second, not for a second.
        assert r["longest_stall"] < 1.0, records


def test_broadcast_str_gives_everyone_the_primary_value(shared_job):
    num_processes, _, runs = shared_job
    assert_all_ok(runs)
    assert [r["value"] for r in _results(runs, "broadcast")] == [
        "from process 0: ünïcode\nand a second line"
    ] * num_processes


def test_report_and_check_all_succeed(shared_job):
    _, _, runs = shared_job
    assert_all_ok(runs)
    assert all(r["ok"] for r in _results(runs, "all_succeed"))


def test_report_and_check_error_reaches_every_process(shared_job):
    _, _, runs = shared_job
    assert_all_ok(runs)
    for i, r in enumerate(_results(runs, "error")):
        assert r["error"] is not None, f"process {i} did not raise"
        assert "failed on process(es) 1 " in r["error"]
        assert "process 1 failed: OSError: [Errno 28] No space left on device" in r["error"]


def test_globally_sharded_array(shared_job):
    num_processes, devices, runs = shared_job
    assert_all_ok(runs)
    records = _results(runs, "sharded")
    n_dev = num_processes * devices
    for r in records:
        assert r["shape"] == [n_dev * 4, 3]
        assert r["global_devices"] == n_dev
        assert r["fully_addressable"] is False
        assert r["shard_devices_local"] is True
        assert len(r["rows"]) == devices
        assert r["data_ok"] is True
        assert r["total"] == r["expected_total"]  # a cross-process reduction over gloo
    # Between them the processes hold every row exactly once.
    rows = sorted(tuple(row) for r in records for row in r["rows"])
    assert rows == [(4 * k, 4 * k + 4) for k in range(n_dev)]


@pytest.mark.parametrize(("num_processes", "devices"), LAYOUTS)
def test_report_and_check_names_a_dead_process(num_processes, devices):
    # Process 1 is SIGKILLed before it reports. The survivors must raise within the
    # timeout (2 s, well below the 10 s heartbeat after which JAX would abort them).
    runs = _run(
        """
        if process_id == 1:
            crash()
        t = time.monotonic()
        try:
            _distributed.report_and_check("save/0/written", None, timeout_s=2)
            result("dead", error=None)
        except DistributedError as e:
            result("dead", error=str(e), elapsed=time.monotonic() - t)
        """,
        num_processes,
        devices,
    )
    assert runs[1].returncode == -9, format_results(runs)
    survivors = [i for i in range(num_processes) if i != 1]
    assert [runs[i].returncode for i in survivors] == [0] * len(survivors), format_results(runs)
    for r in _results(runs, "dead", survivors):
        assert r["error"] is not None
        assert "process(es) 1 did not report within 2 s" in r["error"]
        # It waited out its timeout, and returned long before JAX's 10 s heartbeat would
        # have aborted the survivors (their exit status 0 above says so too).
        assert 2 <= r["elapsed"] < 10


@pytest.fixture(scope="module")
def late_job() -> list[ProcessResult]:
    """One job of 2 processes x 1 device: a late process, a broadcast without its primary,
    then process 1 SIGKILLed by the parent when it prints a marker."""
    return _run(
        """
        # Process 1 is slow, not dead: process 0 gives up after 1 s. When process 1 reports
        # at 3 s it must not read process 0's earlier "ok" and carry on alone (e.g. commit).
        if process_id == 1:
            time.sleep(3)
        try:
            timeout_s = 1 if process_id == 0 else 20
            _distributed.report_and_check("save/0/written", None, timeout_s=timeout_s)
            result("late", error=None)
        except DistributedError as e:
            result("late", error=str(e))

        if process_id == 1:
            try:
                _distributed.broadcast_str("never-sent", None, timeout_s=1)
                result("no_primary", error=None)
            except DistributedError as e:
                result("no_primary", error=str(e))
        _distributed.report_and_check("after", None, timeout_s=20)

        # The other way to kill: the parent SIGKILLs process 1 when it prints a marker.
        if process_id == 1:
            print("ABOUT-TO-REPORT", flush=True)
            time.sleep(60)  # killed here
        try:
            _distributed.report_and_check("marker/written", None, timeout_s=2)
            result("marker", error=None)
        except DistributedError as e:
            result("marker", error=str(e))
        """,
        2,
        1,
        kill_on={1: "ABOUT-TO-REPORT"},
    )


def test_report_and_check_late_process_sees_that_others_gave_up(late_job):
    assert [r.returncode for r in late_job] == [0, -9], format_results(late_job)
    first, late = _results(late_job, "late")
    assert "process(es) 1 did not report within 1 s" in first["error"]
    assert "process 0 failed: gave up waiting for process(es) 1 after 1 s" in late["error"]


def test_broadcast_times_out_without_primary(late_job):
    assert [r.returncode for r in late_job] == [0, -9], format_results(late_job)
    (record,) = _results(late_job, "no_primary", [1])
    assert "process 0 did not publish a value within 1 s" in record["error"]


def test_report_and_check_dead_process_killed_by_marker(late_job):
    assert [r.returncode for r in late_job] == [0, -9], format_results(late_job)
    (record,) = _results(late_job, "marker", [0])
    assert "process(es) 1 did not report within 2 s" in record["error"]


# --- the harness itself ------------------------------------------------------------------


def test_harness_retries_when_the_port_is_taken(monkeypatch):
    # A plain listener (no SO_REUSEPORT) holds the first port handed out: rank 0 cannot
    # bind it, and the harness must start over on a fresh port at once.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        handed_out = []
        real_reserve = _multiprocess._reserve_port

        def reserve():
            held = _HeldElsewhere(taken_port) if not handed_out else real_reserve()
            handed_out.append(held.getsockname()[1])
            return held

        monkeypatch.setattr(_multiprocess, "_reserve_port", reserve)
        # An initialization timeout far beyond the run's limit: a harness that waited for it
        # rather than starting over at once would fail the run (MultiprocessError).
        runs = run_multiprocess("print('hello', process_id)", num_processes=2,
                                timeout_s=RUN_TIMEOUT_S, init_timeout_s=600)
    assert_all_ok(runs)
    assert len(handed_out) == 2 and handed_out[0] == taken_port, handed_out
    assert runs[1].stdout == "hello 1\n"


class _HeldElsewhere:
    """Stands in for the harness's port reservation, naming a port another socket holds."""

    def __init__(self, port: int) -> None:
        self.port = port

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        pass


@pytest.mark.timeout(200)
def test_harness_children_die_with_the_parent(tmp_path):
    # Even a parent killed outright (no finally, no atexit) leaves no process behind.
    pid_file = tmp_path / "pids"
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import _multiprocess\n"
        "_multiprocess.run_multiprocess(\n"
        "    'import os, time\\n'\n"
        '    \'open(args, "a").write(f"{os.getpid()}\\\\n")\\n\'\n'
        "    'time.sleep(300)\\n',\n"
        f"    num_processes=2, timeout_s=250, args={str(pid_file)!r},\n"
        ")\n"
    )
    parent = subprocess.Popen(
        [sys.executable, str(driver)],
        # The killed driver cannot remove its temporary directory: keep it in tmp_path.
        env=dict(os.environ, PYTHONPATH=_multiprocess._SRC, TMPDIR=str(tmp_path)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(_read_pids(pid_file)) < 2:
            time.sleep(0.05)
        pids = _read_pids(pid_file)
        assert len(pids) == 2
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def _read_pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    # Dead grandchildren are reparented and reaped by init; a zombie (if init is slow,
    # or is not a reaping init, as in some containers) counts as dead too.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.timeout(200)
def test_harness_timeout_kills_every_process():
    # 10 s: each process joins the job before the snippet prints its PID (forked warm, with
    # JAX imported: about a second, more on two busy cores).
    t = time.monotonic()
    with pytest.raises(MultiprocessError, match=r"did not finish within 10 s") as info:
        run_multiprocess(
            """
            import os, time
            print("PID", os.getpid(), flush=True)
            time.sleep(300)
            """,
            num_processes=2,
            timeout_s=10,
            init_timeout_s=60,
        )
    # Killed at the limit, not after the 300 s sleep (the bound leaves the load 90 s).
    assert time.monotonic() - t < 120
    pids = [int(line.split()[1]) for line in str(info.value).splitlines() if line.startswith("PID")]
    assert len(pids) == 2, str(info.value)
    for pid in pids:  # reaped: the pid no longer names a process of ours
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


KEYS = """
import jax.numpy as jnp
import pytree_ckpt as pc
from pytree_ckpt import _distributed
client = _distributed._job()[0]
counts = []
for i in range(args["saves"]):
    pc.save({"w": jnp.arange(4.0) + i, "i": i}, args["path"], overwrite=True)
    if process_id == 0 and i in (4, args["saves"] - 1):
        counts.append(len(client.key_value_dir_get("pytree_ckpt/save/")))
result("keys", counts=counts, last=int(pc.restore(args["path"])[0]["i"]))
"""


@pytest.mark.timeout(170)
def test_a_long_job_keeps_no_keys_of_finished_saves(tmp_path):
    # Process 0 keeps every coordination key until the job ends: each save's meetings
    # must be deleted once every process has left them, or its memory grows all job long.
    saves = 100
    runs = run_multiprocess(_PRELUDE + textwrap.dedent(KEYS), num_processes=2,
                            devices_per_process=1, timeout_s=150,
                            args={"path": str(tmp_path / "ckpt"), "saves": saves})
    assert_all_ok(runs)
    first, second = _results(runs, "keys")
    assert second["last"] == first["last"] == saves - 1
    early, late = first["counts"]
    assert 0 < late <= early <= 16, first  # at most the keys of the last two saves
