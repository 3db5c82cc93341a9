"""The waitress server foreman runs under, with the graceful stop waitress lacks.

waitress is tuned here for a proxy of long streams: lookahead so a departed
client is noticed, a stream's connection kept for the client's next request
(waitress closes it), no `Server` header (Ollama sends none), poll() instead of
select() and a connection limit set by the descriptor limit, and a pool sized
by the config whose idle threads are woken newest first.  The door is kept
here too: a deadline for a request's headers, a cap on connections from one
address, and the app's verdict on a request's headers (a missing token, a body
over the route's limit) given before waitress reads the body.
`stop_accepting` closes only the listening socket, from waitress's own loop,
so in-flight responses carry on; `close` then ends everything.

Every reach into waitress's internals lives in this module and was read from
waitress 3.0.2: the dispatcher's `queue_cv` and `lock`, the channel's
`parser_class`, `received`, `readable`, `del_channel`, `write_soon`,
`will_close` and `close_when_flushed`, the task's `build_response_header`,
`set_close_on_finish`, `chunked_response` and `version`, the parser's `received`,
`headers_finished`, `completed`, `error`, `expect_continue`, `chunked` and
`adj`, and the server's `trigger` and `_map`.  tests/test_server.py fails
loudly if an upgrade moves them.
"""

from __future__ import annotations

import copy
import json
import resource
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from waitress import create_server, wasyncore
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask
from waitress.utilities import Error

from .dialects import dialect_of

# waitress reads (and spools to disk past 512 KB) every request body before
# the application sees it, so this is the largest upload that can pass at all:
# the blob upload route, whose bodies are model files.  Other routes get the
# app's own limit, enforced from Content-Length before the body is read.
WAITRESS_BODY_LIMIT = 1024**4
LINGER_SECONDS = 2.0


class EarlyAnswer(Error):
    """An answer given from a request's headers, before its body is read: already
    rendered by the app as foreman renders every error."""

    def __init__(self, answer: tuple[str, list[tuple[str, str]], bytes]) -> None:
        super().__init__(answer[2])
        code, _, self.reason = answer[0].partition(" ")
        self.code = int(code)
        self._response = answer

    def to_response(self, ident: str | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
        return self._response


# The app's look at a request's headers: (method, path, headers as waitress
# keys them, body length or None when chunked) -> (an answer to send now as
# (status, headers, body), or None; the body limit for the route, or None for
# waitress's own).
HeaderCheck = Callable[[str, str, dict[str, str], int | None],
                       tuple[tuple[str, list[tuple[str, str]], bytes] | None, int | None]]


def connection_budget() -> int:
    """How many client connections to hold open: as many as file descriptors allow.

    Raises the soft descriptor limit to the hard one first (macOS starts
    launchd jobs at 256), keeping a reserve for the target pool, the job
    database and logs.  Idle connections then cannot lock out new clients
    until thousands are open; waitress closes them after `channel_timeout`.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 10240 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return max(100, min(soft - 200, 10000))


class _NewestIdleFirst:
    """The dispatcher's wake-up condition, waking the thread that went idle last.

    waitress's own is a `threading.Condition`, which wakes the longest-idle
    thread, so with a pool sized for every queued chat, each short request
    lands on a different thread and every thread's allocator caches (glibc's
    tcache, a share of its arenas) fill in turn: RSS crept up 1.2 MB a minute
    in the soak with no Python object leaking.  Waking the newest idle thread
    keeps the short work on a few warm threads.  The methods are the ones
    `ThreadedTaskDispatcher` calls, always with its lock held.
    """

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._idle: list[threading.Lock] = []

    def wait(self) -> None:
        wake = threading.Lock()
        wake.acquire()
        self._idle.append(wake)
        self._lock.release()
        try:
            wake.acquire()
        finally:
            self._lock.acquire()

    def notify(self, n: int = 1) -> None:
        for _ in range(min(n, len(self._idle))):
            self._idle.pop().release()

    def notify_all(self) -> None:
        self.notify(len(self._idle))


def warm_thread_dispatcher(threads: int) -> ThreadedTaskDispatcher:
    """waitress's own dispatcher and threads, with the newest-idle-first wake-up."""
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.queue_cv = _NewestIdleFirst(dispatcher.lock)
    dispatcher.set_thread_count(threads)
    return dispatcher


class _AsJson:
    """A waitress error rendered as foreman renders every error: JSON in the shape of
    the route's API family."""

    def __init__(self, error: Error, path: str) -> None:
        self._error, self._path = error, path

    def to_response(self, ident: str | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
        error = self._error
        # The app's own words for a body too large, whoever noticed it first.
        text = ("request body too large" if error.code == 413
                else f"{error.reason.lower()}: {error.body}")
        body = dialect_of(self._path).error_body(error.code, text)
        return (f"{error.code} {error.reason}",
                [("Content-Type", "application/json; charset=utf-8")], body)


class _JsonErrorTask(ErrorTask):
    """waitress answers requests it cannot parse (a malformed request line,
    headers past its limit, an unknown transfer coding) itself, before foreman
    sees them; this makes that answer JSON too instead of plain text."""

    def execute(self) -> None:
        if not isinstance(self.request.error, EarlyAnswer):
            # A request line that did not parse has no path: Ollama's shape, then.
            self.request.error = _AsJson(self.request.error, getattr(self.request, "path", ""))
        super().execute()


class _Parser(HTTPRequestParser):
    """Asks the app about a request as soon as its headers are in, before the body."""

    check_headers: HeaderCheck  # bound per server
    body_refused = False  # answered before its whole body was read

    def received(self, data: bytes) -> int:
        had_headers = self.headers_finished
        consumed = super().received(data)
        if had_headers and self.completed and self.error is not None:
            self.body_refused = True  # a chunked body that went over its route's limit
        if had_headers or not self.headers_finished or self.completed:
            return consumed  # no body to come, or the verdict was given already
        answer, limit = self.check_headers(self.command, self.path, self.headers,
                                           None if self.chunked else self.content_length)
        if answer is not None:
            self.error, self.completed = EarlyAnswer(answer), True
            self.body_refused = True
            self.expect_continue = False  # no "100 Continue" for a body we refuse
            return len(data)  # the rest is body we will not read; the connection closes
        if limit is not None and self.chunked:
            self.adj = copy.copy(self.adj)  # this request's own limit, as it is read
            self.adj.max_request_body_size = limit + 1
        return consumed


class _KeepAliveTask(WSGITask):
    """waitress closes the connection after every answer it sends chunked (every
    stream); Go's net/http, and so Ollama, keeps it open when the client asked to.
    A chunked answer ends with its last chunk, so nothing is lost by keeping the
    connection, and a client streaming chat after chat saves a connection each."""

    _building = False

    def build_response_header(self) -> bytes:
        self._building = True
        try:
            return super().build_response_header()  # type: ignore[no-any-return]
        finally:
            self._building = False

    def set_close_on_finish(self) -> None:
        if (self._building and self.chunked_response and self.version == "1.1"
                and self.request.headers.get("CONNECTION", "").lower() != "close"):
            return  # only waitress's rule for chunked answers asked to close
        super().set_close_on_finish()


class _Channel(HTTPChannel):
    """A connection that counts against its address's cap and must finish sending
    each request's headers within the header timeout.

    A connection answered before its client finished sending (a refused body, a
    refused connection) closes lingering: it stops writing, then reads and drops
    what still arrives for up to LINGER_SECONDS, because closing a socket with
    unread input resets it, and a reset can destroy the answer in transit.
    """

    task_class = _KeepAliveTask
    error_task_class = _JsonErrorTask
    door: _Door  # bound per server
    _linger = False  # close lingering once the answer is out
    _linger_until: float | None = None

    def __init__(self, server: Any, sock: Any, addr: Any, adj: Any, map: Any = None) -> None:
        super().__init__(server, sock, addr, adj, map)
        self._client = addr[0] if isinstance(addr, tuple) and addr else ""
        self._counted = self.door.enter(self._client)
        # From accept, and again from the first byte of each later request.
        self._headers_since: float | None = time.monotonic()
        if not self._counted:
            self.door.refuse(self)

    def received(self, data: bytes) -> bool:
        if self._linger_until is not None:
            return False  # input after the answer is dropped
        result: bool = super().received(data)
        if any(getattr(r, "body_refused", False) for r in self.requests):
            self._linger = True
        request = self.request
        if request is None or request.headers_finished:
            self._headers_since = None
        elif self._headers_since is None:
            self._headers_since = time.monotonic()
        return result

    def readable(self) -> bool:
        if self._linger_until is not None:
            if time.monotonic() < self._linger_until:
                return True
            self.will_close = True  # handle_write closes it now
            return False
        since = self._headers_since
        if since is not None and time.monotonic() - since > self.door.header_timeout \
                and not self.will_close:
            self.will_close = True  # a client too slow to send its headers loses the door
            return False
        return bool(super().readable())

    def handle_close(self) -> None:
        if self._linger and self._linger_until is None and self.connected:
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            else:
                self._linger_until = time.monotonic() + LINGER_SECONDS
                self.will_close = self.close_when_flushed = False
                return
        super().handle_close()

    def del_channel(self, map: Any = None) -> None:
        super().del_channel(map)
        if self._counted:
            self._counted = False
            self.door.leave(self._client)


class _Door:
    """Connections per client address, and the header deadline, for one server."""

    def __init__(self, max_per_client: int, header_timeout: float) -> None:
        self.max_per_client, self.header_timeout = max_per_client, header_timeout
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def enter(self, client: str) -> bool:
        """Count a new connection; False if its address already has its share."""
        with self._lock:
            count = self._open.get(client, 0)
            if self.max_per_client and count >= self.max_per_client:
                return False
            self._open[client] = count + 1
            return True

    def leave(self, client: str) -> None:
        with self._lock:
            count = self._open.pop(client, 1) - 1
            if count:
                self._open[client] = count

    def open_from(self, client: str) -> int:
        with self._lock:
            return self._open.get(client, 0)

    @staticmethod
    def refuse(channel: _Channel) -> None:
        body = json.dumps({"error": "too many connections from this address"}).encode()
        channel.write_soon(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))
        channel.close_when_flushed = True
        channel._linger = True


class Server:
    def __init__(self, app: Any, host: str, port: int, threads: int, *,
                 check_headers: HeaderCheck, header_timeout: float = 10.0,
                 max_connections_per_client: int = 256) -> None:
        self.door = _Door(max_connections_per_client, header_timeout)
        self._server = create_server(
            app,
            host=host,
            port=port,
            threads=threads,
            _dispatcher=warm_thread_dispatcher(threads),
            channel_request_lookahead=1,
            ident="",
            # select() cannot watch descriptors past 1024: with more connections
            # open, waitress's loop would die.  poll() has no such ceiling.
            asyncore_use_poll=True,
            connection_limit=connection_budget(),
            max_request_body_size=WAITRESS_BODY_LIMIT,
            clear_untrusted_proxy_headers=True,
        )
        parser = type("ForemanParser", (_Parser,), {"check_headers": staticmethod(check_headers)})
        self._server.channel_class = type("ForemanChannel", (_Channel,), {
            "door": self.door, "parser_class": parser})
        self._stopped = threading.Event()

    @property
    def host(self) -> str:
        return str(self._server.effective_host)

    @property
    def port(self) -> int:
        return int(self._server.effective_port)

    def serve(self) -> None:
        """Run waitress's loop on this thread until `close`."""
        try:
            self._server.run()
        finally:
            self._stopped.set()

    def stop_accepting(self, timeout: float = 5.0) -> None:
        """Close the listening socket, from waitress's loop, and return once it is
        closed (or `timeout` passed): a connection attempted after this is refused."""
        listener = self._server
        closed = threading.Event()

        def close_listener() -> None:
            # The dispatcher's own close() would take the loop's trigger with it.
            wasyncore.dispatcher.close(listener)
            closed.set()

        self._server.trigger.pull_trigger(close_listener)
        closed.wait(timeout)

    def close(self, flush_timeout: float = 5.0) -> None:
        """Stop the worker threads and the loop, closing every connection.

        Our application is done with a response before waitress has written
        its end (the last chunk, the terminator), so first let the workers
        finish their current tasks and the loop send what is buffered, for up
        to `flush_timeout` seconds; 0 cuts at once.
        """
        server = self._server
        if flush_timeout:
            server.task_dispatcher.shutdown(cancel_pending=True, timeout=flush_timeout)
            deadline = time.monotonic() + flush_timeout
            while self._unsent() and time.monotonic() < deadline:
                time.sleep(0.01)  # waitress offers no event for "all flushed"
        trigger = server.trigger

        def end_loop() -> None:
            for channel in list(server._map.values()):
                if channel is not trigger:
                    channel.close()
            # Leave the map so the loop ends, but keep the pipe open: closing it
            # here races with the pull that delivered this very call.
            trigger.del_channel()

        trigger.pull_trigger(end_loop)
        self._stopped.wait(5.0)
        trigger.close()
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=1.0)

    def _unsent(self) -> int:
        return sum(getattr(channel, "total_outbufs_len", 0)
                   for channel in list(self._server._map.values()))
