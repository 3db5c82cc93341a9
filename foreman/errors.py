"""The exceptions foreman decides on, and the one place they become HTTP answers.

A target that cannot be reached, a target that took the work and then broke
off, and a target that answered with an error are different failures with
different remedies, so they are different types.
foreman's own refusals (bad input, busy, not found) are ApiError.  Everything
above the target client raises these; `error_response` maps them to a
status and words, rendered in the shape the route's clients expect (see
`dialects`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from werkzeug.wrappers import Response


class TargetTransportError(Exception):
    """The exchange with the target failed below HTTP: no answer to relay."""


class TargetUnreachable(TargetTransportError):
    """No connection could be made: the target is down or not listening.  Nothing
    reached it, so the work can wait for it without counting a failure."""


class TargetLost(TargetTransportError):
    """The target accepted the request, then went silent past a timeout or dropped
    the connection.  The work itself may be what broke it, so this is a failure of
    the work, not an outage."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class TargetHTTPError(Exception):
    """The target answered with an HTTP error status."""

    def __init__(self, status: int, body: bytes, content_type: str = "") -> None:
        self.status, self.body, self.content_type = status, body, content_type
        super().__init__(f"target answered {status}: {self.message}")

    @property
    def message(self) -> str:
        """The target's error text, from Ollama's `{"error": ...}` when it has one."""
        try:
            error = json.loads(self.body).get("error")
        except (ValueError, AttributeError):
            error = None
        if isinstance(error, dict):
            error = error.get("message")
        if isinstance(error, str) and error:
            return error
        return self.body[:200].decode("utf-8", "replace").strip() or f"HTTP {self.status}"


class TargetBadAnswer(Exception):
    """The target answered 2xx with something that is not what Ollama sends."""


@dataclass
class ApiError(Exception):
    """A refusal foreman makes itself, carried to the client as JSON."""

    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


BUSY_TEXT = "server busy, please try again.  maximum pending requests exceeded"

def json_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status=status, headers=headers, content_type="application/json")


def describe_failure(exc: Exception) -> tuple[int, str]:
    """The status and the words for a failure: the same in an HTTP answer, in a
    stream's last error line and in a failed job's `error`."""
    if isinstance(exc, ApiError):
        return exc.status, exc.message
    if isinstance(exc, TargetHTTPError):
        return exc.status, exc.message
    if isinstance(exc, TargetUnreachable):
        return 502, f"ollama is unreachable: {exc}"
    if isinstance(exc, TargetLost):
        if exc.timed_out:
            return 504, f"ollama stopped responding: {exc}"
        return 502, f"ollama failed mid-request: {exc}"
    if isinstance(exc, TargetBadAnswer):
        return 502, f"ollama answered badly: {exc}"
    return 500, "internal error in foreman (see its log)"


def error_response(exc: Exception, render: Callable[[int, str], bytes]) -> Response:
    """The HTTP answer for any failure, its body rendered in the route's family's
    shape by `render`; unknown exceptions become a generic 500."""
    if isinstance(exc, TargetHTTPError) and exc.content_type.startswith("application/json"):
        return json_response(exc.status, exc.body)  # the target's own words, as it sent them
    status, message = describe_failure(exc)
    headers = exc.headers if isinstance(exc, ApiError) else None
    return json_response(status, render(status, message), headers)
