"""A fault-injecting, request-counting HTTP proxy for the loopback object stores.

:class:`FaultProxy` listens on 127.0.0.1 (a free port) and forwards every request to one
upstream server (moto's S3 or fake-gcs-server from ``tests/_servers.py``) over plain
``http.client``. It records each request as ``(method, kind, key)`` and, by rule, answers
some of them itself: an HTTP status (403, 404, 429, 503, ...), a dropped connection (closed
with no answer), or a delay before forwarding.

Kinds, for both protocols:

- ``"get"``: an object's bytes (S3 ``GET /bucket/key``; GCS ``GET .../o/NAME?alt=media``);
- ``"list"``: a listing (S3 ``GET /bucket?list-type=2``; GCS ``GET .../b/BUCKET/o``);
- ``"put"``: an upload (S3 ``PUT``; GCS ``POST /upload/...``);
- ``"head"``: an object's metadata (S3 ``HEAD``; GCS ``GET .../o/NAME`` without ``alt=media``);
- ``"delete"``: S3 ``DELETE`` or a multi-object delete (``POST ?delete``); GCS ``DELETE``;
- ``"other"``: anything else.

``key`` is the object name inside the bucket (a listing's is its ``prefix``, or on GCS its
``startOffset`` where it has no prefix), URL-decoded.
``answers`` holds each forwarded request's kind, key, ``Range`` header and answer bytes.
:meth:`FaultProxy.sent` adds up the request bodies of a kind (an upload's bytes as sent,
protocol framing such as a multipart upload's headers included).

Use it as a context manager (the fixtures in ``tests/conftest.py`` do); it stops serving,
and closes its socket, on exit however the block ends.
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import http.server
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator

LOOPBACK = "127.0.0.1"
_UPSTREAM_TIMEOUT_S = 60.0
# Headers that describe one hop, never forwarded (RFC 9110, 7.6.1).
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
        "upgrade", "proxy-authorization", "proxy-authenticate"}


@dataclasses.dataclass
class Rule:
    """Requests matching ``method``, ``kind`` and ``key`` (a regex searched in the key; None
    for any) are answered with ``status``, dropped (``drop``), or delayed by ``delay`` seconds
    and then forwarded. ``count`` is how many requests it applies to (None: all); ``hits``
    how many it has."""

    method: str | None = None
    kind: str | None = None
    key: str | None = None
    status: int | None = None
    drop: bool = False
    delay: float = 0.0
    count: int | None = None
    hits: int = 0

    def matches(self, method: str, kind: str, key: str) -> bool:
        return ((self.method is None or self.method == method)
                and (self.kind is None or self.kind == kind)
                and (self.key is None or re.search(self.key, key) is not None)
                and (self.count is None or self.hits < self.count))


class FaultProxy:
    """Forwards HTTP requests to ``upstream`` (``http://127.0.0.1:PORT``), counting them and
    injecting the faults of its rules. ``endpoint`` is its own ``http://127.0.0.1:PORT``."""

    def __init__(self, upstream: str):
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.hostname != LOOPBACK:
            raise ValueError(f"{upstream}: the proxy forwards to loopback servers only")
        self._upstream = (parsed.hostname, parsed.port)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        # Per request seen: (method, kind, key, bytes of its body).
        self.log: list[tuple[str, str, str, int]] = []
        # Per forwarded request: (kind, key, its Range header or None, bytes of the answer).
        self.answers: list[tuple[str, str, str | None, int]] = []
        self._server = _Server((LOOPBACK, 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://{LOOPBACK}:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    # ---- rules and counts ----

    def fail(self, *, method: str | None = None, kind: str | None = None, key: str | None = None,
             status: int | None = None, drop: bool = False, delay: float = 0.0,
             count: int | None = None) -> Rule:
        """Adds a rule (see :class:`Rule`); the first matching rule applies to a request."""
        if (status is None) + (not drop) + (not delay) != 2:
            raise ValueError("a rule gives exactly one of status, drop or delay")
        rule = Rule(method, kind, key, status, drop, delay, count)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Removes every rule and forgets every request seen."""
        with self._lock:
            self._rules.clear()
            self.log.clear()
            self.answers.clear()

    def counts(self) -> collections.Counter:
        """Requests seen so far, by kind (``"get"``, ``"list"``, ``"put"``, ...)."""
        with self._lock:
            return collections.Counter(kind for _m, kind, _k, _n in self.log)

    def keys(self, kind: str) -> list[str]:
        """The keys of the requests of ``kind`` seen so far, in order."""
        with self._lock:
            return [k for _m, kd, k, _n in self.log if kd == kind]

    def sent(self, kind: str, key: str | None = None) -> int:
        """The bytes of the bodies of the requests of ``kind`` seen so far (those whose key
        matches the regex ``key``, if given)."""
        with self._lock:
            return sum(n for _m, kd, k, n in self.log
                       if kd == kind and (key is None or re.search(key, k) is not None))

    def _decide(self, method: str, kind: str, key: str, size: int = 0) -> Rule | None:
        with self._lock:
            self.log.append((method, kind, key, size))
            for rule in self._rules:
                if rule.matches(method, kind, key):
                    rule.hits += 1
                    return rule
        return None

    # ---- serving ----

    def __enter__(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # quiet: the log is proxy.log

            def _any(self) -> None:
                body = self._body()
                kind, key = classify(self.command, self.path)
                rule = proxy._decide(self.command, kind, key, len(body))
                if rule is not None and rule.drop:
                    # RST, not FIN: the connection is reset, as a broken network does.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if rule is not None and rule.status is not None:
                    # Each protocol's own error body (GCS: JSON, S3: XML).
                    if "/storage/v1/" in self.path:
                        ctype = "application/json"
                        payload = (f'{{"error": {{"code": {rule.status}, "message": '
                                   f'"injected by the test proxy"}}}}').encode()
                    else:
                        ctype = "application/xml"
                        payload = (f"<Error><Code>Injected{rule.status}</Code><Message>"
                                   "injected by the test proxy</Message></Error>").encode()
                    self.send_response(rule.status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                if rule is not None and rule.delay:
                    time.sleep(rule.delay)
                sent = self._forward(body)
                with proxy._lock:
                    proxy.answers.append((kind, key, self.headers.get("Range"), sent))

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self, body: bytes) -> int:
                """Forwards the request; returns the bytes of the answer's body."""
                conn = http.client.HTTPConnection(*proxy._upstream, timeout=_UPSTREAM_TIMEOUT_S)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    payload = response.read()
                    self.send_response(response.status, response.reason)
                    for name, value in response.getheaders():
                        if name.lower() not in _HOP and name.lower() != "content-length":
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return len(payload) if self.command != "HEAD" else 0
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any  # noqa: N815

        return Handler


class _Server(http.server.ThreadingHTTPServer):
    # socketserver's listen backlog is 5. TensorStore sends tens of requests to a store at
    # once, each on a connection of its own here (HTTP/1.0); a connection dropped by a full
    # backlog is retried by the client's TCP after 1 s, a second no real bucket charges.
    request_queue_size = 1024


def classify(method: str, target: str) -> tuple[str, str]:
    """The kind and key of a request to S3 or GCS (module docstring)."""
    split = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
    path = split.path
    gcs = re.match(r"^/(upload/)?storage/v1/b/[^/]+/o(?:/(.*))?$", path)
    if gcs is not None:
        upload, name = gcs.group(1), gcs.group(2)
        if upload:
            return "put", query.get("name", [""])[0]
        if name is None:
            # TensorStore lists a GCS key range by its bounds (startOffset, endOffset)
            start = query.get("prefix") or query.get("startOffset") or [""]
            return ("list" if method == "GET" else "other"), start[0]
        key = urllib.parse.unquote(name)
        if method == "DELETE":
            return "delete", key
        if method == "GET":
            return ("get" if query.get("alt") == ["media"] else "head"), key
        return "other", key
    if path.startswith("/storage/") or path.startswith("/upload/"):
        return "other", ""
    _bucket, _, key = path.lstrip("/").partition("/")
    key = urllib.parse.unquote(key)
    if method == "GET":
        if not key and "list-type" in query:
            return "list", query.get("prefix", [""])[0]
        return "get", key
    if method == "POST" and "delete" in query:
        return "delete", key
    return {"PUT": "put", "HEAD": "head", "DELETE": "delete"}.get(method, "other"), key


def serving(upstream: str) -> Iterator[FaultProxy]:
    """A generator for a fixture: a running proxy in front of ``upstream``, stopped after."""
    with FaultProxy(upstream) as proxy:
        yield proxy
