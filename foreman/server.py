"""The waitress server foreman runs under, with the graceful stop waitress lacks.

waitress is tuned here for a proxy of long streams: lookahead so a departed
client is noticed, no `Server` header (Ollama sends none), poll() instead of
select() and a connection limit set by the descriptor limit, and a pool sized
by the config whose idle threads are woken newest first.  `stop_accepting`
closes only the listening socket, from waitress's own loop, so in-flight
responses carry on; `close` then ends everything.
"""

from __future__ import annotations

import json
import resource
import threading
import time
from typing import Any

from waitress import create_server, wasyncore
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask, ThreadedTaskDispatcher
from waitress.utilities import Error

# Request bodies up to this size are read (spooled to disk past 512 KB) so the
# application can answer an oversized one with its own JSON 413.
_WAITRESS_BODY_LIMIT = 1024**3


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
    """A waitress error rendered as foreman renders every error: `{"error": "..."}`."""

    def __init__(self, error: Error) -> None:
        self._error = error

    def to_response(self, ident: str | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
        error = self._error
        body = json.dumps({"error": f"{error.reason.lower()}: {error.body}"}).encode()
        return (f"{error.code} {error.reason}",
                [("Content-Type", "application/json; charset=utf-8")], body)


class _JsonErrorTask(ErrorTask):
    """waitress answers requests it cannot parse (a malformed request line,
    headers past its limit, an unknown transfer coding) itself, before foreman
    sees them; this makes that answer JSON too instead of plain text."""

    def execute(self) -> None:
        self.request.error = _AsJson(self.request.error)
        super().execute()


class _Channel(HTTPChannel):
    error_task_class = _JsonErrorTask


class Server:
    def __init__(self, app: Any, host: str, port: int, threads: int, max_body: int) -> None:
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
            max_request_body_size=max(_WAITRESS_BODY_LIMIT, max_body + 1),
            clear_untrusted_proxy_headers=True,
        )
        self._server.channel_class = _Channel
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

    def stop_accepting(self) -> None:
        listener = self._server

        def close_listener() -> None:
            # The dispatcher's own close() would take the loop's trigger with it.
            wasyncore.dispatcher.close(listener)

        self._server.trigger.pull_trigger(close_listener)

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
