"""The only module that speaks HTTP to the target Ollama.

It owns one `requests` transport adapter, configured once: a pool as large
as the server's thread count, no proxies from the environment (requests are
sent through the adapter, never a Session that would consult them), the
target's bearer token on every request, and the target's own Host.  Failures leave this module
as TargetUnreachable (no connection), TargetLost (a connection that broke
off or went silent after the request was sent) or TargetHTTPError only.

An in-flight request can be aborted from another thread with an AbortSignal:
shutting down its socket is what tells Ollama to stop generating, and it works
both while waiting for the response headers (prompt processing) and while the
body streams.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import traceback
import weakref
from collections.abc import Iterator
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError

from .config import redact_url
from .errors import (
    TargetBadAnswer,
    TargetHTTPError,
    TargetLost,
    TargetTransportError,
    TargetUnreachable,
)

# What a failed exchange with the target looks like from below this module.
_TRANSPORT_ERRORS = (requests.RequestException, OSError)


class AbortSignal:
    """Lets one thread cut another thread's request to the target.

    The pool attaches each connection it hands out to the signal bound to the
    requesting thread, and detaches it when the connection goes back to the
    pool, so an abort can never hit a connection that now serves someone else.
    A connection handed out before its socket exists reports back once it has
    connected, so an abort that came in between still cuts it.
    """

    def __init__(self, watched: bool = False) -> None:
        """`watched`: a watchdog times this request, so its socket waits without a
        timeout of its own once connected (sending the body included)."""
        self._lock = threading.Lock()
        # Weakly: urllib3 drops a connection that failed without handing it back
        # to the pool, and a strong link both ways would then be a cycle.
        self._conn: weakref.ref[Any] | None = None
        self.aborted = False
        self.watched = watched
        self.stalled: str | None = None  # why a watchdog cut it, if one did

    def abort(self, stalled: str | None = None) -> None:
        """Idempotent; call again if it may have raced a connection being opened.
        `stalled` says the target stopped responding, and how."""
        with self._lock:
            if not self.aborted:
                self.stalled = stalled
            self.aborted = True
            sock = getattr(self._conn and self._conn(), "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _connected(self, conn: Any) -> None:
        with self._lock:
            if self.aborted and conn.sock is not None:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)

    def _attach(self, conn: Any) -> None:
        with self._lock:
            self._conn = weakref.ref(conn)
            conn.foreman_abort_signal = self

    def _detach(self, conn: Any) -> None:
        with self._lock:
            if self._conn is not None and self._conn() is conn:
                self._conn = None


class _AbortablePoolMixin:
    """A urllib3 pool that attaches each connection it hands out to the signal of
    the request asking for it; each TargetClient makes its own subclasses."""

    # Per thread: the AbortSignal of the request this thread is sending, if any.
    requesting: threading.local

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        signal = getattr(self.requesting, "signal", None)
        if signal is not None:
            if signal.aborted:
                super()._put_conn(conn)  # type: ignore[misc]
                raise TargetLost("request aborted")
            signal._attach(conn)
        return conn

    def _put_conn(self, conn: Any) -> None:
        signal = getattr(conn, "foreman_abort_signal", None)
        if signal is not None:
            conn.foreman_abort_signal = None
            signal._detach(conn)
        super()._put_conn(conn)  # type: ignore[misc]


class _ReportingConnectionMixin:
    """A urllib3 connection that tells its abort signal when its socket exists, and
    sends a watched request with no socket timeout: its watchdog decides."""

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        signal = getattr(self, "foreman_abort_signal", None)
        if signal is not None:
            signal._connected(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        signal = getattr(self, "foreman_abort_signal", None)
        if signal is not None and signal.watched:
            if self.sock is None:  # type: ignore[attr-defined]
                self.connect()  # within the connect timeout, as usual
            self.timeout = None  # urllib3 applies it to the socket for the send
        super().request(*args, **kwargs)  # type: ignore[misc]


class Upstream:
    """A response from the target whose body has not been read yet.

    Body access translates transport failures to TargetUnreachable, so callers
    never see `requests` exceptions.
    """

    def __init__(self, response: requests.Response, abort: AbortSignal | None) -> None:
        self._response = response
        self._abort = abort
        self.status: int = response.status_code
        self.headers = response.headers
        self.content_type: str = response.headers.get("Content-Type", "")

    def line_pieces(self) -> Iterator[list[bytes]]:
        """Each non-empty NDJSON line, as soon as its newline arrives, as the pieces
        it arrived in: one piece for a line that came whole, the last piece ending
        with the newline.

        Lines split on b"\\n" only, as Go writes them (never on U+2028 or a bare
        CR), and a body that ends inside a line is a broken stream, not a last line.
        Nothing joins the pieces here, so a line of any size costs time and memory
        in proportion to its size, once.
        """
        pending: list[bytes] = []  # pieces of a line whose newline has not come yet
        try:
            for chunk in self._response.iter_content(chunk_size=65536):
                start, end = 0, chunk.find(b"\n")
                while end != -1:
                    piece = chunk[start:end + 1]  # the chunk itself when it is one line
                    if pending:
                        pending.append(piece)
                        yield pending
                        pending = []
                    elif end > start:
                        yield [piece]
                    start, end = end + 1, chunk.find(b"\n", end + 1)
                if start < len(chunk):
                    pending.append(chunk[start:])
        except _TRANSPORT_ERRORS as exc:
            raise self._lost(exc) from None
        if any(piece.strip() for piece in pending):
            raise TargetLost("the stream from ollama ended in the middle of a line")

    def lines(self) -> Iterator[bytes]:
        """Each non-empty NDJSON line, whole, with its newline."""
        for pieces in self.line_pieces():
            yield pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def chunks(self) -> Iterator[bytes]:
        """The body as the target sends it, chunk by chunk."""
        try:
            yield from self._response.iter_content(chunk_size=None)
        except _TRANSPORT_ERRORS as exc:
            raise self._lost(exc) from None

    def read(self) -> bytes:
        try:
            return self._response.content
        except _TRANSPORT_ERRORS as exc:
            raise self._lost(exc) from None

    def close(self) -> None:
        self._response.close()

    def _lost(self, exc: BaseException) -> TargetTransportError:
        if isinstance(exc, requests.Timeout):
            return _transport_error(exc, self._abort, TargetLost(
                "no data from ollama within the read timeout mid-response", timed_out=True))
        return _transport_error(exc, self._abort, TargetLost(
            f"connection to ollama lost mid-response ({type(exc).__name__})"))


class TargetClient:
    """HTTP to the one target Ollama, shared by every thread."""

    def __init__(
        self,
        url: str,
        token: str = "",
        connect_timeout: float = 5.0,
        read_timeout: float = 600.0,
        pool_size: int = 10,
    ) -> None:
        self.url = url.rstrip("/")
        # Credentials in the URL must never reach a log line or an error message.
        self.display_url = redact_url(self.url)
        self._timeout = (connect_timeout, read_timeout)
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self._requesting = threading.local()
        bound = {"requesting": self._requesting}
        adapter.poolmanager.pool_classes_by_scheme = {
            "http": type("AbortableHTTPPool", (_AbortablePoolMixin, HTTPConnectionPool), {
                **bound, "ConnectionCls": type("ReportingHTTPConnection", (
                    _ReportingConnectionMixin, HTTPConnection), {})}),
            "https": type("AbortableHTTPSPool", (_AbortablePoolMixin, HTTPSConnectionPool), {
                **bound, "ConnectionCls": type("ReportingHTTPSConnection", (
                    _ReportingConnectionMixin, HTTPSConnection), {})}),
        }
        self._adapter = adapter
        # Bodies are re-streamed byte for byte; compression would only cost CPU.
        self._headers: dict[str, str | bytes] = {"Accept-Encoding": "identity",
                                                 "User-Agent": "foreman"}
        if token:
            # As bytes: a token outside latin-1 goes out as its UTF-8, not an error.
            self._headers["Authorization"] = b"Bearer " + token.encode()

    def open(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str | None = None,
        abort: AbortSignal | None = None,
        read_timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Upstream:
        """Send a request and return once the response headers arrived.

        Any status is returned as is; only transport failures raise.  The read
        timeout is the client's own unless `read_timeout` is given, and none at
        all for a request its abort signal says is watched.  `headers` are the
        few of the client's that describe its body (Content-Encoding); foreman's
        own (its token among them) always win.
        """
        sent: dict[str, str | bytes] = self._headers
        if content_type or headers:
            sent = {**(headers or {}), **self._headers,
                    **({"Content-Type": content_type} if content_type else {})}
        # A prepared request sent straight through the adapter: a Session would
        # merge cookies, proxies and hooks we never use, at ~0.3 ms a request.
        prepared = requests.PreparedRequest()
        prepared.prepare(method=method, url=self.url + path, headers=sent, data=body)
        if abort is not None and abort.watched:
            timeout: tuple[float, float | None] = (self._timeout[0], None)
        elif read_timeout is not None:
            timeout = (min(self._timeout[0], read_timeout), read_timeout)
        else:
            timeout = self._timeout
        self._requesting.signal = abort
        try:
            response = self._adapter.send(prepared, stream=True, timeout=timeout)
        except _TRANSPORT_ERRORS as exc:
            raise _transport_error(exc, abort, _classify(exc, self.display_url)) from None
        finally:
            self._requesting.signal = None
        return Upstream(response, abort)

    def call(
        self,
        method: str,
        path: str,
        payload: Any = None,
        abort: AbortSignal | None = None,
        read_timeout: float | None = None,
    ) -> tuple[bytes, Any]:
        """A JSON request whose whole answer is wanted: returns (raw body, parsed JSON).

        A non-2xx answer raises TargetHTTPError; a 2xx answer that is not JSON
        raises TargetBadAnswer, since nothing above can use it.
        """
        body = None if payload is None else json.dumps(payload).encode()
        upstream = self.open(
            method, path, body, "application/json" if body is not None else None, abort,
            read_timeout,
        )
        try:
            raw = upstream.read()
        finally:
            upstream.close()
        if not 200 <= upstream.status < 300:
            raise TargetHTTPError(upstream.status, raw, upstream.content_type)
        try:
            return raw, json.loads(raw)
        except ValueError:
            raise TargetBadAnswer(f"a {upstream.status} whose body is not JSON") from None

    def close(self) -> None:
        self._adapter.close()


def _transport_error(exc: BaseException, abort: AbortSignal | None,
                     error: TargetTransportError) -> TargetTransportError:
    """`error` for a transport failure, with the failure's frames let go of.

    urllib3 keeps exceptions in locals of the frames they pass through, a cycle
    for each failure, and a frame holds its caller's frame: until the cycle
    collector ran, the failed request (its body, its environ) would live on too.
    """
    for link in _linked(exc):
        traceback.clear_frames(link.__traceback__)  # the running frames are skipped
    if abort is not None and abort.aborted:
        if abort.stalled:
            return TargetLost(abort.stalled, timed_out=True)
        return TargetLost("request aborted")
    return error


def _linked(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception it leads to: causes, contexts, and the ones urllib3
    and requests wrap (`reason`, `args`), each once."""
    pending: list[Any] = [exc]
    seen: set[int] = set()
    while pending:
        link = pending.pop()
        if not isinstance(link, BaseException) or id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        pending += [getattr(link, "reason", None), link.__cause__, link.__context__,
                    *link.args]


def _never_connected(exc: BaseException) -> bool:
    """Whether the failure happened before a connection existed (refused, no route,
    name not found, connect timeout): then the target cannot have seen the request.
    urllib3's NewConnectionError and NameResolutionError are ConnectTimeoutErrors."""
    return any(isinstance(link, (ConnectTimeoutError, requests.ConnectTimeout))
               for link in _linked(exc))


def _classify(exc: BaseException, url: str) -> TargetTransportError:
    if _never_connected(exc):
        if isinstance(exc, requests.Timeout):
            return TargetUnreachable(f"ollama at {url} did not accept a connection in time")
        return TargetUnreachable(f"cannot reach ollama at {url}")
    if isinstance(exc, requests.Timeout):
        return TargetLost(f"ollama at {url} timed out", timed_out=True)
    return TargetLost(f"ollama at {url} dropped the connection before answering")
