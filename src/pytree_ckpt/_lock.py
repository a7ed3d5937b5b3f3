"""The lock a CheckpointManager holds on its directory, so that a second writer fails loudly.

Two managers writing one directory would each delete the other's checkpoints under their own
retention rules; the second one therefore gets a :class:`LockedError` naming the holder.

- **Local files**: ``<directory>/manager.lock``, held with ``fcntl.flock``. The kernel drops
  the lock when its holder closes it or dies (SIGKILL included), so a crashed job never blocks
  its own restart. The file holds the owner (host, pid, token, time) for the error message
  and stays in place (removing a flock'ed file races with the next process locking it).
  Limits: some network filesystems (older NFS) do not carry ``flock`` between hosts; a child
  made by ``fork`` (a data-loader worker) shares the lock until it exits.
- **Object stores and memory://**: an object ``manager.lock`` with the owner and a heartbeat
  time, created by a conditional write (only if absent), read back to check the token, and
  refreshed by a background thread every ``lock_stale_s / 5`` seconds (an option of
  :func:`pytree_ckpt.configure`). A lock whose heartbeat is older than ``lock_stale_s`` (its
  holder died without closing), or whose holder is a dead process on this very host, is
  taken over. Limits: creation is as atomic as the store's conditional writes (GCS and S3
  honour them; fake-gcs-server does not); staleness compares clocks of different hosts;
  after a crash, a restart on another host waits up to ``lock_stale_s`` (5 minutes unless
  ``PYTREE_CKPT_LOCK_STALE_S`` or ``configure`` says otherwise) or until the object is
  deleted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import threading
import time
import uuid
from typing import Any

from . import _faults, _options, _storage
from ._errors import LockedError, NotACheckpointError

LOCK_FILE = "manager.lock"


class DirectoryLock:
    """Held from construction until :meth:`release`; raises :class:`LockedError` if taken."""

    def __init__(self, loc: _storage.Location, kv: Any):
        self._loc, self._kv = loc, kv
        self._token = uuid.uuid4().hex
        self._fd: int | None = None
        self._generation = b""
        self._lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if loc.local is not None:
            self._acquire_file()
        else:
            self._acquire_object()

    def _owner(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "token": self._token, "time": time.time()}).encode()

    def _refuse(self, raw: bytes | None, why: str = "") -> LockedError:
        return LockedError(
            f"{self._loc.url}: another CheckpointManager holds this directory ({_describe(raw)})"
            f"{why}; close() it or let its process exit first. Two managers writing one "
            "directory would delete each other's checkpoints.")

    def _acquire_file(self) -> None:
        assert self._loc.local is not None
        os.makedirs(self._loc.local, exist_ok=True)
        path = os.path.join(self._loc.local, LOCK_FILE)
        try:
            # Never through a link someone planted (its target would be truncated), nor
            # blocked by a FIFO.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and not os.path.islink(path):
                raise OSError(e.errno, f"{path}: cannot create the lock file ({e.strerror}); to "
                              "only read this directory, open it with read_only=True") from None
            if not os.path.islink(path) and e.errno not in (errno.ENXIO, errno.EISDIR):
                raise
            raise NotACheckpointError(
                f"{path}: {'a symbolic link' if os.path.islink(path) else 'not a file'} "
                "where a CheckpointManager keeps its lock file; refusing to write through "
                "it (remove it if it is not meant to be there)") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotACheckpointError(
                    f"{path}: not a regular file where a CheckpointManager keeps its lock "
                    "file (remove it if it is not meant to be there)")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._owner(), 0)
        except BlockingIOError:
            raw = os.pread(fd, 4096, 0)
            os.close(fd)
            raise self._refuse(raw) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _acquire_object(self) -> None:
        with _faults.faults(f"{self._loc.url}/{LOCK_FILE}"):
            self._acquire_object_once()

    def _acquire_object_once(self) -> None:
        found = self._kv.read(LOCK_FILE).result()
        if found.state == "value" and not _stale(found.value):
            raise self._refuse(found.value)
        stamp = self._kv.write(LOCK_FILE, self._owner(), if_equal=found.stamp.generation).result()
        back = self._kv.read(LOCK_FILE).result()
        # An empty generation means the conditional write lost a race; reading back also
        # catches stores whose conditional writes are not atomic.
        if not stamp.generation or back.state != "value" or _token(back.value) != self._token:
            raise self._refuse(back.value if back.state == "value" else None,
                               ", taken a moment ago")
        self._generation = back.stamp.generation
        self._thread = threading.Thread(target=self._heartbeat, name="pytree_ckpt-lock",
                                        daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(_options.get("lock_stale_s") / 5):
            try:
                stamp = self._kv.write(LOCK_FILE, self._owner(),
                                       if_equal=self._generation).result()
            except Exception:  # a transient store error: try again at the next beat
                continue
            if not stamp.generation:  # someone took the lock over (we looked dead)
                self._lost = True
                return
            self._generation = stamp.generation

    def check(self) -> None:
        """Raises :class:`LockedError` if another manager has taken the lock over."""
        if self._lost:
            found = self._kv.read(LOCK_FILE).result()
            raise self._refuse(found.value if found.state == "value" else None,
                               ", after this manager's heartbeat went stale")

    def release(self) -> None:
        """Releases the lock (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            finally:  # the lock is released whatever happened to the owner record
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)  # also for a forked child sharing it
                finally:
                    os.close(fd)
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if not self._lost:
                self._kv.write(LOCK_FILE, None, if_equal=self._generation).result()


def _parse(raw: bytes | None) -> dict[str, Any]:
    try:
        owner = json.loads(raw or b"")
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _token(raw: bytes) -> Any:
    return _parse(raw).get("token")


def _describe(raw: bytes | None) -> str:
    owner = _parse(raw)
    if not owner:
        return "owner unknown"
    age = time.time() - owner["time"] if isinstance(owner.get("time"), float) else float("nan")
    return f"host {owner.get('host')!r}, pid {owner.get('pid')}, last seen {age:.0f} s ago"


def _stale(raw: bytes) -> bool:
    """True if the lock's holder is surely gone: no heartbeat for lock_stale_s, or a dead process
    on this host."""
    owner = _parse(raw)
    when, pid = owner.get("time"), owner.get("pid")
    if not isinstance(when, float) or time.time() - when > _options.get("lock_stale_s"):
        return True
    if owner.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return False
