"""Noticing a target that stopped responding, in seconds rather than at the read timeout.

On a Mac the classic failure is "tags fine, chat dead": Ollama answers its
model lists, accepts a generation, and then sends nothing.  So every
generation (interactive or a job) runs under clocks: while its request is
being sent, each block must be taken within `stall_timeout`; from then to its
first output, `first_token_timeout` (a cold load plus long prompt processing
can take minutes); then between chunks, `stall_timeout` again (a live Ollama
streams a token every few milliseconds to a few hundred).  The client
watcher's thread checks the clocks; a generation past one has its upstream
request aborted, which frees its lane at once and answers its client with
Ollama-shaped "ollama stopped responding".

A stall makes foreman degraded until a generation completes again.
Interactive requests are still admitted (each under the clocks); jobs wait
without spending attempts.  When the chat slot is idle, a probe (a one-token
generation on the model that stalled, its first output due within
`stall_timeout`) checks whether the target recovered.  Each transition is
logged once.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .body import SizedBody
from .config import format_duration
from .errors import TargetHTTPError, TargetTransportError
from .inventory import Snapshot
from .lane import Lane, WaitCancelled, Work
from .schedule import BATCH
from .target import AbortSignal, TargetClient, Upstream
from .watch import ClientWatcher, Watch

log = logging.getLogger("foreman.watchdog")


class Clock:
    """A generation's clocks: while its request is sent, each block the target takes
    is due within `between`; once it is sent, the first output within
    `first_output`; after that, each output within `between`."""

    def __init__(self, model: str, first_output: float, between: float) -> None:
        self.model = model
        self._first_output, self._between = first_output, between
        self._sending = time.monotonic()  # the last block of the request taken
        self._sent: float | None = None
        self._output: float | None = None  # the last output received

    def took_some(self) -> None:
        self._sending = time.monotonic()

    def sent(self) -> None:
        self._sent = time.monotonic()

    def progressed(self) -> None:
        self._output = time.monotonic()

    def overdue(self) -> str | None:
        """Why the generation counts as stalled now, or None."""
        now = time.monotonic()
        between = format_duration(self._between)
        if self._sent is None:
            if now - self._sending > self._between:
                return (f"it took none of the request for {between} while a generation of"
                        f" {self.model} was being sent")
        elif self._output is None:
            if now - self._sent > self._first_output:
                return (f"no output for {format_duration(self._first_output)} after a"
                        f" generation of {self.model} was sent")
        elif now - self._output > self._between:
            return f"no output for {between} in the middle of a generation of {self.model}"
        return None


class _Sending:
    """A generation's request body, telling its clock about each block the socket
    takes (requests sends a sized file-like body block by block)."""

    def __init__(self, body: bytes | SizedBody, clock: Clock) -> None:
        self._body: SizedBody | io.BytesIO = io.BytesIO(body) if isinstance(body, bytes) \
            else body
        self._length, self._clock = len(body), clock

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        block = self._body.read(size)
        if block:
            self._clock.took_some()
        else:
            self._clock.sent()
        return block


class Watched:
    """A generation's response from the target, read under its clocks.  Reads the way
    an Upstream does; `close` also stops the clocks."""

    def __init__(self, upstream: Upstream, clock: Clock, watch: Watch) -> None:
        self._upstream, self._clock, self._watch = upstream, clock, watch
        self.status, self.headers = upstream.status, upstream.headers
        self.content_type = upstream.content_type

    def line_pieces(self) -> Iterator[list[bytes]]:
        for pieces in self._upstream.line_pieces():
            self._clock.progressed()
            yield pieces

    def lines(self) -> Iterator[bytes]:
        for line in self._upstream.lines():
            self._clock.progressed()
            yield line

    def chunks(self) -> Iterator[bytes]:
        for chunk in self._upstream.chunks():
            self._clock.progressed()
            yield chunk

    def read(self) -> bytes:
        return self._upstream.read()

    def close(self) -> None:
        self._watch.cancel()
        self._upstream.close()


@dataclass(frozen=True)
class TargetHealth:
    degraded: bool
    reason: str | None  # for anyone: no addresses
    detail: str | None  # behind the token: names the target


class Watchdog:
    def __init__(self, client: TargetClient, watcher: ClientWatcher, chat_lane: Lane, *,
                 first_token_timeout: float, stall_timeout: float,
                 probe_interval: float, on_ended: Callable[[], None] = lambda: None) -> None:
        """`on_ended` hears about every generation that ended (the inventory polls
        again, so /api/ps shows what it loaded)."""
        self._client, self._watcher, self._on_ended = client, watcher, on_ended
        self._chat_lane = chat_lane
        self._first_token, self._stall = first_token_timeout, stall_timeout
        self._probe_interval = probe_interval
        self._cond = threading.Condition()
        self.stall: str | None = None  # why foreman is degraded by a stall, if it is
        self._stalled_model = ""  # what the probe asks for: the model that stalled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe_loop, name="foreman-watchdog",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def open(self, path: str, body: bytes | SizedBody, model: str, abort: AbortSignal,
             first_output: float | None = None, content_type: str = "application/json",
             headers: dict[str, str] | None = None) -> Watched:
        """Send a generation under the clocks (sending its body included).  A stall
        raises, or ends the stream, with TargetLost(timed_out=True)."""
        clock = Clock(model, self._first_token if first_output is None else first_output,
                      self._stall)
        watch = self._watcher.watch(lambda: clock.overdue() is not None,
                                    lambda: self._stalled(clock, abort))
        try:
            upstream = self._client.open("POST", path, _Sending(body, clock),
                                         content_type, abort, headers=headers)
        except BaseException:
            watch.cancel()
            raise
        return Watched(upstream, clock, watch)

    def ended(self, answered: bool) -> None:
        """A generation ended; if the target answered it, the target answers again."""
        if answered:
            self.completed()
        self._on_ended()

    def completed(self) -> None:
        """A generation finished: the target answers again."""
        with self._cond:
            if self.stall is None:
                return
            self.stall = None
            self._cond.notify_all()
        log.warning("target answering again: a generation completed")

    def health(self, snapshot: Snapshot) -> TargetHealth:
        """The target's state: polls failing, or generations stalling."""
        if self.stall is not None:
            detail: str | None = f"ollama stopped responding: {self.stall}"
        elif snapshot.degraded:
            detail = snapshot.error or "not polled yet"
        else:
            return TargetHealth(False, None, None)
        public = detail.replace(f" at {self._client.display_url}", "")
        return TargetHealth(True, public, detail)

    def wait_until_answering(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.stall is None or self._stop.is_set(),
                                       timeout)

    def _stalled(self, clock: Clock, abort: AbortSignal) -> None:
        why = clock.overdue()
        if why is None or abort.aborted:
            return
        abort.abort(stalled=why)
        with self._cond:
            first = self.stall is None
            self.stall, self._stalled_model = why, clock.model
            self._cond.notify_all()
        if first:
            log.warning("target degraded: ollama stopped responding: %s", why)

    # -- the probe ------------------------------------------------------------------

    def _probe_loop(self) -> None:
        while not self._stop.wait(self._probe_interval):
            if self.stall is None or self._chat_lane.in_flight or self._chat_lane.waiting:
                continue
            try:
                self._probe()
            except Exception:  # the probe must outlive any surprise
                log.exception("target probe failed unexpectedly")

    def _probe(self) -> None:
        model = self._stalled_model
        work = Work(kind="probe", model=model, tier=BATCH, priority=-(2**63), label="probe")
        try:
            ticket = self._chat_lane.acquire(work)
        except WaitCancelled:
            return
        try:
            body = json.dumps({"model": model, "prompt": "Say OK.", "stream": True,
                               "options": {"num_predict": 1}}).encode()
            abort = AbortSignal(watched=True)
            upstream = self.open("/api/generate", body, model, abort, first_output=self._stall)
            try:
                if upstream.status != 200:
                    raise TargetHTTPError(upstream.status, upstream.read(),
                                          upstream.content_type)
                done = any(b'"done":true' in line for line in upstream.lines())
            finally:
                upstream.close()
            if done:
                self.completed()
        except (TargetTransportError, TargetHTTPError) as exc:
            log.info("target probe with %s did not complete: %s", model, exc)
        finally:
            ticket.release()
