"""Turns a target response into the WSGI response the client receives.

Streams (NDJSON, and server-sent events on /v1) are relayed as they arrive,
one upstream line (or run of whole events) per chunk written to the client (a
line over 1 MB in the pieces it arrived in), bytes untouched; a line or an
event is sent only once it is whole, so a stream the target breaks off can end
with the route's own error line or event.  A
response that ends as a complete answer marks its tally `answered`, which is
what the estimator learns from.  Anything
else is read whole and sent with its length.  Hop-by-hop headers and the
upstream framing headers are never copied: waitress frames the body itself.

A streamed body's `close()` is the single place its resources are released
(the upstream connection, the chat-slot lease, the disconnect watch): waitress
calls it when the stream ends, when a write to a departed client fails, and
for HEAD, where the iterator never starts.
"""

from __future__ import annotations

import http
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from .dialects import OLLAMA, Dialect
from .errors import TargetBadAnswer, TargetLost, TargetTransportError, describe_failure
from .target import Upstream

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

# A line that arrived in pieces is sent as one HTTP chunk up to this size; a
# larger one is sent piece by piece, so it is never copied whole (the client
# reads lines, not chunks).
_JOIN_UP_TO = 1024 * 1024

_NOT_COPIED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "content-length",
    "content-encoding", "server", "date",
})


def status_line(code: int) -> str:
    try:
        return f"{code} {http.HTTPStatus(code).phrase}"
    except ValueError:
        return f"{code} Unknown"


def relayed_headers(upstream: Upstream) -> list[tuple[str, str]]:
    return [(k, v) for k, v in upstream.headers.items() if k.lower() not in _NOT_COPIED]


class Tally(Protocol):
    chunks: int
    answered: bool
    final: bytes


class _Count:
    chunks = 0
    answered = False
    final = b""


class StreamedBody:
    """A WSGI app and its body iterable: relays a streaming target response."""

    def __init__(self, upstream: Upstream, on_close: list[Callable[[], None]],
                 tally: Tally, dialect: Dialect) -> None:
        self._upstream = upstream
        self._dialect = dialect
        self._headers = relayed_headers(upstream)
        self._on_close = on_close
        self._sse = upstream.content_type.startswith("text/event-stream")
        self._gen: Iterator[bytes] | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        self.tally = tally
        self.complete = False  # the client took the whole stream (else it left)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> StreamedBody:
        start_response(status_line(self._upstream.status), self._headers)
        return self

    def __iter__(self) -> Iterator[bytes]:
        self._gen = self._relay()
        return self._gen

    def _relay(self) -> Iterator[bytes]:
        tally = self.tally
        events = 0  # server-sent events relayed, which a Responses error event numbers
        try:
            last = b""
            if self._sse:
                for last in sse_events(self._upstream.chunks()):
                    tally.chunks += 1
                    events += last.count(b"\n\n")
                    yield last
                failed = last.startswith((b"event: error", b'data: {"error"'))
            else:
                for pieces in self._upstream.line_pieces():
                    tally.chunks += 1
                    last = pieces[0]
                    if len(pieces) == 1:
                        yield last
                    elif sum(map(len, pieces)) <= _JOIN_UP_TO:
                        yield b"".join(pieces)
                    else:  # a huge line goes out in the pieces it came in, never copied
                        yield from pieces
                # Ollama reports a failure after the stream started as a last error line.
                failed = last.startswith(b'{"error"')
            tally.answered = self._upstream.status < 300 and not failed
            tally.final = last
        except TargetTransportError as exc:
            # As Ollama does: an error after the stream started ends it, in the
            # family's own words (a last error line, or an error event).
            status, message = describe_failure(exc)
            yield self._dialect.stream_error(status, message, events)
        self.complete = True

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self._gen is not None:
                self._gen.close()
            self._upstream.close()
        finally:
            for callback in self._on_close:
                callback()


_STREAM_TYPES = ("application/x-ndjson", "text/event-stream")


def sse_events(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Server-sent events as they arrive, bytes untouched: each piece yielded ends
    with an event's blank line (a chunk carrying several whole events is yielded
    as it came), so an error event foreman adds never lands inside one."""
    pending: list[bytes] = []
    for chunk in chunks:
        cut = chunk.rfind(b"\n\n") + 2
        if cut == 1:  # no blank line inside the chunk; maybe one across the seam
            seam = pending and pending[-1].endswith(b"\n") and chunk.startswith(b"\n")
            cut = 1 if seam else 0
        if cut == 0:
            pending.append(chunk)
            continue
        pending.append(chunk[:cut])
        yield b"".join(pending) if len(pending) > 1 else pending[0]
        pending = [chunk[cut:]] if cut < len(chunk) else []
    if any(piece.strip() for piece in pending):
        raise TargetLost("the stream from ollama ended in the middle of an event")


def relay(upstream: Upstream, on_close: list[Callable[[], None]], head: bool = False,
          tally: Tally | None = None, json_only: bool = False,
          dialect: Dialect = OLLAMA) -> WSGIApp:
    """The response for `upstream`; `on_close` callbacks run exactly once, when it is
    done, also when this call raises.

    A streamed response counts its chunks into `tally` as they go.  With
    `json_only` (the inference routes), a 2xx answer that is neither a stream
    nor JSON raises TargetBadAnswer instead of reaching the client.
    """
    ctype = upstream.content_type
    if ctype.startswith(_STREAM_TYPES):
        return StreamedBody(upstream, on_close, tally or _Count(), dialect)
    try:
        body = upstream.read()
        if json_only and 200 <= upstream.status < 300 and not _looks_like_json(ctype, body):
            raise TargetBadAnswer(f"a {upstream.status} with content type {ctype or 'none'}"
                                  f" that is not JSON")
        if tally is not None:
            tally.answered = 200 <= upstream.status < 300
            tally.final = body
    finally:
        upstream.close()
        for callback in on_close:
            callback()
    headers = relayed_headers(upstream)
    length = upstream.headers.get("Content-Length", "0") if head else str(len(body))
    headers.append(("Content-Length", length))

    def buffered(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        start_response(status_line(upstream.status), headers)
        return [body]

    return buffered


def _looks_like_json(content_type: str, body: bytes) -> bool:
    """A sniff, not a parse: JSON's content type and a body that opens like JSON."""
    return content_type.startswith("application/json") and body.lstrip()[:1] in (b"{", b"[")

