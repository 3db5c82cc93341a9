"""The WSGI application: the door checks, routing, authentication, error answers,
access log.

Every request first meets the Origin and Host checks (`guard`), which also
answer CORS preflights, before authentication.  Routes come from the API
modules as Werkzeug Rules whose endpoints are their handlers; a path no rule
knows goes to the fallback endpoint, which forwards it to the target.
Authentication is decided on the route the Map matched, so the only
unauthenticated route is exactly the one declared public: a path that does
not match (another spelling, another method) needs the token like everything
else.  Every exception a handler raises becomes a JSON answer here, through
`errors.error_response`, in the shape of the route's API family, and every
request is logged once, when its body is done.
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import unquote

from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, RequestRedirect, Rule
from werkzeug.wrappers import Request, Response

from .api import CLIENT_GONE, RequestInfo
from .dialects import dialect_of
from .errors import (
    ApiError,
    TargetBadAnswer,
    TargetHTTPError,
    TargetTransportError,
    error_response,
)
from .guard import Guard, Verdict
from .metrics import Metrics
from .relay import StartResponse

# A whole answer as the server writes it: (status line, headers, body).
Answer = tuple[str, list[tuple[str, str]], bytes]

access_log = logging.getLogger("foreman.access")
log = logging.getLogger("foreman.app")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class _Finished:
    """Wraps a response body to learn when it is done, adding no per-chunk work."""

    def __init__(self, body: Iterable[bytes], on_done: Callable[[Iterable[bytes]], None]
                 ) -> None:
        self._body, self._on_done = body, on_done

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._on_done(self._body)


Endpoint = Callable[..., Any]


class ForemanApp:
    def __init__(self, rules: list[Rule], fallback: Endpoint, public: set[Endpoint],
                 token: str, max_body: int, metrics: Metrics, guard: Guard,
                 unlimited_body: set[Endpoint] | None = None) -> None:
        """`fallback` serves the paths no rule knows; `public` endpoints need no
        token; `unlimited_body` endpoints (model blob uploads) are not held to
        `max_body`."""
        self._map = Map(rules, merge_slashes=False, redirect_defaults=False)
        self._fallback = fallback
        self._guard = guard
        self._public = public
        self._unlimited_body = unlimited_body or set()
        self._token = token.encode()
        self._max_body = max_body
        self._metrics = metrics
        self._active = 0
        self._active_lock = threading.Lock()
        self._idle = threading.Condition(self._active_lock)

    @property
    def active(self) -> int:
        return self._active

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request is in progress, or `timeout` passes."""
        return self.wait_active(lambda active: active == 0, timeout)

    def wait_active(self, predicate: Callable[[int], bool], timeout: float) -> bool:
        """Block until `predicate(requests in progress)` holds, or `timeout` passes."""
        with self._idle:
            return self._idle.wait_for(lambda: predicate(self._active), timeout)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        started = time.monotonic()
        supplied_id = environ.get("HTTP_X_REQUEST_ID", "")
        info = RequestInfo(supplied_id if _REQUEST_ID.match(supplied_id) else uuid.uuid4().hex)
        environ["foreman.info"] = info
        status_seen = ["500"]
        verdict = self._guard.verdict(environ.get("REQUEST_METHOD", ""),
                                      environ.get("HTTP_HOST", ""), environ.get("HTTP_ORIGIN", ""))

        def recording_start_response(status: str, headers: list[tuple[str, str]],
                                     exc_info: Any = None) -> Any:
            status_seen[0] = status.split(" ", 1)[0]
            headers.extend(verdict.headers)
            headers.append(("X-Request-Id", info.request_id))
            if info.waited_ms is not None:
                headers.append(("X-Foreman-Queue-Wait-Ms", str(info.waited_ms)))
            return start_response(status, headers, exc_info)

        def done(body: Iterable[bytes] | None = None) -> None:
            if getattr(body, "complete", True) is False:
                # A stream whose client left: logged as a client that left while it
                # waited is, not as the 200 its headers said.
                status_seen[0] = str(CLIENT_GONE)
            try:
                self._metrics.count_request(info.route, environ.get("REQUEST_METHOD", ""),
                                            status_seen[0])
                access_log.info(
                    "%s %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"),
                    status_seen[0],
                    extra={"fields": {
                        "ms": round((time.monotonic() - started) * 1000, 1),
                        "model": info.model or None,
                        "wait_ms": info.waited_ms,
                        "order": info.out_of_order,
                        "id": info.request_id,
                    }},
                )
            finally:  # idle means every request is counted and logged too
                with self._idle:
                    self._active -= 1
                    self._idle.notify_all()

        with self._idle:
            self._active += 1
            self._idle.notify_all()
        try:
            at_door = self._at_door(verdict, environ.get("PATH_INFO", ""))
            handler = self._dispatch(environ) if at_door is None else at_door
            body = handler(environ, recording_start_response)
        except BaseException:
            done()
            raise
        return _Finished(body, done)

    def check_headers(self, method: str, path: str, headers: dict[str, str],
                      length: int | None) -> tuple[Answer | None, int | None]:
        """The verdict on a request with a body, from its headers alone (the server
        asks before it reads the body): a refusal to send now, or None; and the
        route's body limit (None: the server's own, for blob uploads).  A request
        from a refused origin or host, without the token, or with a declared body
        over the limit, is answered without its body ever being read."""
        try:
            endpoint = self._map.bind("localhost").match(path, method)[0]
        except (HTTPException, RequestRedirect):
            endpoint = None
        limit = None if endpoint in self._unlimited_body else self._max_body
        verdict = self._guard.verdict(method, headers.get("HOST", ""), headers.get("ORIGIN", ""))
        refusal = self._at_door(verdict, path)
        render = dialect_of(path).error_body
        if refusal is None and endpoint not in self._public and not self._authorized(
                headers.get("AUTHORIZATION", ""), headers.get("X_API_KEY", "")):
            refusal = error_response(_unauthorized(), render)
        elif refusal is None and limit is not None and length is not None and length > limit:
            refusal = error_response(ApiError(413, _WERKZEUG_TEXT[413]), render)
        if refusal is None:
            return None, limit
        request_id = uuid.uuid4().hex
        refusal.headers.extend(verdict.headers)
        refusal.headers["X-Request-Id"] = request_id
        status = str(refusal.status_code)
        self._metrics.count_request("unmatched" if endpoint is None else "early", method, status)
        access_log.info("%s %s %s", method, path, status, extra={"fields": {
            "ms": 0.0, "id": request_id, "body": "not read"}})
        return (refusal.status, list(refusal.headers.items()), refusal.get_data()), limit

    @staticmethod
    def _at_door(verdict: Verdict, path: str) -> Response | None:
        """The answer the Origin and Host checks give themselves: a refusal, or a
        preflight's; None lets the request in."""
        if verdict.refusal is not None:
            return error_response(ApiError(403, verdict.refusal), dialect_of(path).error_body)
        if verdict.preflight:
            answer = Response(status=204)
            del answer.headers["Content-Type"]
            return answer
        return None

    def _dispatch(self, environ: dict[str, Any]) -> Callable[..., Iterable[bytes]]:
        request = Request(environ, populate_request=False)  # no request<->environ cycle
        request.max_content_length = self._max_body
        render = dialect_of(request.path).error_body
        try:
            try:
                if _has_empty_segment(environ):
                    raise NotFound()
                rule, values = self._map.bind_to_environ(environ).match(return_rule=True)
            except MethodNotAllowed as exc:
                # The answer, not the exception: a caught exception kept in a local
                # is a cycle through its traceback and this frame.
                endpoint, values, no_route = None, {}, _not_allowed(exc, request)
            except (HTTPException, RequestRedirect):
                endpoint, values, no_route = self._fallback, {}, None
                environ["foreman.info"].route = "forwarded"
            else:
                endpoint, no_route = rule.endpoint, None
                environ["foreman.info"].route = rule.rule
            if endpoint not in self._public:
                self._authenticate(request)
            if no_route is not None:
                return error_response(no_route, render)
            return endpoint(request, **values)
        except HTTPException as exc:
            code = exc.code or 500
            text = _WERKZEUG_TEXT.get(code, exc.name.lower())
            return error_response(ApiError(code, text), render)
        except ApiError as exc:
            return error_response(exc, render)
        except (TargetHTTPError, TargetTransportError, TargetBadAnswer) as exc:
            log.warning("%s %s: %s", request.method, request.path, exc)
            return error_response(exc, render)
        except Exception as exc:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(exc, render)

    def _authenticate(self, request: Request) -> None:
        if not self._authorized(request.headers.get("Authorization", ""),
                                request.headers.get("X-Api-Key", "")):
            raise _unauthorized()

    def _authorized(self, authorization: str, api_key: str) -> bool:
        """A bearer token, or the same token as `x-api-key` (Anthropic's clients
        send one or the other)."""
        if not self._token:
            return True
        scheme, _, supplied = authorization.partition(" ")
        if scheme.lower() != "bearer" or not supplied.strip():
            supplied = api_key
        # Header values arrive decoded as latin-1 (WSGI, and waitress's parser):
        # encoding them back gives the bytes the client sent, so a UTF-8 token
        # compares as sent.
        return bool(supplied.strip()) and hmac.compare_digest(
            supplied.strip().encode("latin-1", "replace"), self._token)


def _has_empty_segment(environ: dict[str, Any]) -> bool:
    """`//x` and `/%2Fx`: waitress and Werkzeug strip the extra slash, Ollama does not
    match it, and no foreman route has one, so such a path is no route of foreman's."""
    raw = environ.get("REQUEST_URI", "").split("?", 1)[0]
    return "//" in raw or "//" in unquote(raw) or "//" in environ.get("PATH_INFO", "")


def _not_allowed(exc: MethodNotAllowed, request: Request) -> ApiError:
    allowed = ", ".join(sorted(exc.valid_methods or ()))
    return ApiError(405, f"method {request.method} not allowed on {request.path}",
                    {"Allow": allowed})


_WERKZEUG_TEXT = {413: "request body too large", 400: "malformed request"}


def _unauthorized() -> ApiError:
    return ApiError(401, "unauthorized: a valid bearer token is required",
                    {"WWW-Authenticate": "Bearer"})

