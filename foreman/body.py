"""The client's JSON request body: parsed once for foreman's decisions, sent on as sent.

Parsing is as strict as Ollama's Go decoder where Python's is looser or
breaks: `NaN` and `Infinity` are not JSON, nesting deeper than Python can
parse is a 400 (not a RecursionError), invalid UTF-8 and lone surrogate
escapes become U+FFFD as Go decodes them, so nothing foreman stores or logs
can fail to encode later.

A body forwarded to the target is never held in memory while its request
waits for a lane: waitress has already spooled a large body to a temporary
file, the parsed object is dropped once the decisions are made, and the bytes
are read from that file again when the target is called.  Large bodies are
parsed in turn under a byte budget, so many arriving at once cannot multiply
the memory one parse takes.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, TypeVar

from werkzeug.wrappers import Request

from .errors import ApiError

# Bodies up to this size stay in memory as bytes; larger ones are re-read from
# waitress's spool file (waitress spools past 512 KB) when the target is called.
KEEP_IN_MEMORY = 1024 * 1024
# Bytes of large bodies being parsed at once.  A parse briefly needs about
# twice the body (its text and its objects); a body over the budget parses alone.
PARSE_BUDGET = 32 * 1024 * 1024

_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")

T = TypeVar("T")


class ParseBudget:
    """Lets large bodies be parsed only while their total stays within `limit` bytes."""

    def __init__(self, limit: int = PARSE_BUDGET) -> None:
        self._limit = limit
        self._in_use = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, size: int) -> Iterator[None]:
        if size <= KEEP_IN_MEMORY:
            yield
            return
        with self._cond:
            self._cond.wait_for(lambda: self._in_use == 0 or self._in_use + size <= self._limit)
            self._in_use += size
        try:
            yield
        finally:
            with self._cond:
                self._in_use -= size
                self._cond.notify_all()


def _no_constants(name: str) -> Any:
    raise ApiError(400, f"invalid JSON in request body: {name} is not a JSON value")


def _replace_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_replace_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in value.items()}
    return value


def _text(raw: bytes) -> str:
    encoding = json.detect_encoding(raw)
    try:
        # Go decodes invalid UTF-8 to U+FFFD rather than refusing the body.
        return raw.decode(encoding, "replace" if encoding == "utf-8" else "surrogatepass")
    except ValueError as exc:
        raise ApiError(400, f"invalid JSON in request body: {exc}") from None


def parse_json(text: str) -> Any:
    """JSON as Ollama's decoder reads it, or ApiError(400) saying what is wrong."""
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise ApiError(400, "invalid JSON in request body: nested too deeply") from None
    except ValueError as exc:
        raise ApiError(400, f"invalid JSON in request body: {exc}") from None
    if _LONE_SURROGATE_ESCAPE.search(text):
        value = _replace_surrogates(value)
    return value


def _object(text: str) -> dict[str, Any]:
    if not text.strip():
        raise ApiError(400, "missing request body")
    body = parse_json(text)
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def read_json_object(request: Request, budget: ParseBudget) -> dict[str, Any]:
    """The parsed body of a request foreman itself consumes (a job submit)."""
    with budget.reserve(request.content_length or 0):
        return _object(_text(request.get_data(cache=False)))


class SizedBody:
    """A body streamed to the target with its length known up front.

    `requests` sends a file-like object with a length as a plain body with
    Content-Length, reading it block by block, instead of buffering it.
    """

    def __init__(self, stream: IO[bytes], length: int) -> None:
        self._stream, self._length = stream, length

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(size)


class ForwardedBody:
    """The client's bytes, for sending to the target once the request's turn comes."""

    def __init__(self, raw: bytes | None, spool: IO[bytes] | None, length: int) -> None:
        self._raw, self._spool, self.length = raw, spool, length

    def content(self) -> bytes | SizedBody:
        """The body to send; a spooled one is read from its start each time."""
        if self._raw is not None:
            return self._raw
        assert self._spool is not None
        self._spool.seek(0)
        return SizedBody(self._spool, self.length)

    def blocks(self, size: int = 65536) -> Iterator[bytes]:
        """The body block by block, from its start, for a decision that scans it."""
        if self._raw is not None:
            yield self._raw
            return
        assert self._spool is not None
        self._spool.seek(0)
        while block := self._spool.read(size):
            yield block

    def whole(self) -> bytes:
        return b"".join(self.blocks(self.length or 65536))


def forwarded(request: Request) -> ForwardedBody:
    """The request's body, unread: in memory when small, else left in waitress's
    spool file to be read when it is needed."""
    length = request.content_length or 0
    spool = request.environ.get("wsgi.input")
    if length <= KEEP_IN_MEMORY or spool is None or not spool.seekable():
        raw = request.get_data(cache=False)
        return ForwardedBody(raw, None, len(raw))
    return ForwardedBody(None, spool, length)


def read_forwarded(request: Request, budget: ParseBudget,
                   decide: Callable[[dict[str, Any]], T]) -> tuple[ForwardedBody, T]:
    """Parse the body, hand the object to `decide`, and keep only the client's bytes
    (or, for a large body, the way back to them) and what `decide` returned."""
    body = forwarded(request)
    with budget.reserve(body.length):
        # The bytes are let go of as soon as they are text: the parse then needs
        # the text and its objects, not a third copy.
        return body, decide(_object(_text(body.whole())))
