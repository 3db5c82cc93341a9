"""The Ollama routes: every one Ollama serves, and what each does on the way to it.

`ROUTES` is the table: each of Ollama's routes (read from its
`server/routes.go`) with the lane it takes.  Generations of every API family
(Ollama's, OpenAI's, Responses, Anthropic's Messages, audio transcriptions)
and the embedding routes take the same path through different lanes: validate
the body, check the model against the inventory, wait in the lane (the chat
slot, or the embed lane beside it), then relay the target's answer.  A client
that leaves while waiting leaves the line; one that leaves mid-answer has its
upstream request cut.  Model lists come from the inventory's cache; some
routes pass straight through; model management passes through only when the
operator allows it.  A path foreman does not know is forwarded as it came
(through the chat slot unless it only reads), so a route Ollama adds works
the day it ships and a route Ollama lacks gets Ollama's own 404.  Decisions
read the body, but the bytes sent to the target are the client's own.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

from werkzeug.routing import Rule
from werkzeug.wrappers import Request

from . import __version__
from .body import ForwardedBody, ParseBudget, SizedBody, forwarded, read_forwarded
from .dialects import dialect_of, messages_model, required_model, transcription_model
from .errors import (
    ApiError,
    TargetBadAnswer,
    TargetHTTPError,
    TargetTransportError,
    TargetUnreachable,
    json_response,
)
from .inventory import Inventory, Snapshot, canonical_model_name
from .lane import WAITING, Lane, Work
from .metrics import Metrics
from .relay import WSGIApp, relay
from .target import AbortSignal, TargetClient, Upstream
from .watch import ClientWatcher
from .watchdog import Watchdog, Watched

log = logging.getLogger("foreman.api")

CLIENT_GONE = 499  # nginx's "client closed request": nobody reads it, the log does


@dataclass(frozen=True)
class Route:
    """One of Ollama's routes, the lane foreman serves it in, and the handler."""

    method: str
    path: str  # Werkzeug's syntax for a parameter: <name>
    lane: str
    handler: str


CHAT, EMBED, BESIDE, THROUGH, CACHE, ADMIN = (
    "chat slot", "embed lane", "beside the slot", "passed through", "from the cache", "admin")

ROUTES: tuple[Route, ...] = (
    *(Route("POST", path, CHAT, handler) for path, handler in (
        ("/api/chat", "generate"), ("/api/generate", "generate"),
        ("/v1/chat/completions", "generate"), ("/v1/completions", "generate"),
        ("/v1/responses", "generate"), ("/v1/messages", "messages"),
        ("/v1/audio/transcriptions", "transcribe"))),
    *(Route("POST", path, EMBED, "embed")
      for path in ("/api/embed", "/api/embeddings", "/v1/embeddings")),
    *(Route("POST", path, BESIDE, "passthrough")
      for path in ("/api/experimental/web_search", "/api/experimental/web_fetch")),
    *(Route(method, path, THROUGH, "passthrough") for method, path in (
        ("GET", "/"), ("HEAD", "/"), ("GET", "/api/version"), ("HEAD", "/api/version"),
        ("GET", "/api/status"), ("POST", "/api/show"),
        ("GET", "/api/experimental/model-recommendations"))),
    Route("GET", "/api/tags", CACHE, "tags"), Route("HEAD", "/api/tags", CACHE, "tags"),
    Route("GET", "/api/ps", CACHE, "ps"),
    Route("GET", "/v1/models", CACHE, "openai_models"),
    Route("GET", "/v1/models/<path:model>", CACHE, "openai_model"),
    *(Route(method, path, ADMIN, "admin") for method, path in (
        ("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/api/create"),
        ("POST", "/api/copy"), ("DELETE", "/api/delete"), ("POST", "/api/me"),
        ("POST", "/api/signout"), ("DELETE", "/api/user/keys/<key>"))),
    Route("POST", "/api/blobs/<digest>", ADMIN, "blob"),
    Route("HEAD", "/api/blobs/<digest>", ADMIN, "blob"),
)

# How many distinct unknown routes are logged by name before foreman stops
# naming them (a scanner must not grow a set without end).
_UNKNOWN_ROUTES_LOGGED = 1000


@dataclass
class RequestInfo:
    """Per-request facts the access log and response headers need."""

    request_id: str
    route: str = "unmatched"
    model: str = ""
    waited_ms: int | None = None
    out_of_order: str | None = None  # why the scheduler served it before earlier arrivals


def request_info(request: Request) -> RequestInfo:
    return request.environ["foreman.info"]


def client_gone_check(request: Request) -> Callable[[], bool]:
    return request.environ.get("waitress.client_disconnected") or (lambda: False)


_FRACTION = re.compile(r"(\.\d{6})\d+")


def _unix_time(stamp: Any) -> int:
    """Seconds since the epoch from Go's RFC 3339 with nanoseconds; 0 if unparseable."""
    if not isinstance(stamp, str):
        return 0
    try:
        return int(datetime.fromisoformat(_FRACTION.sub(r"\1", stamp.replace("Z", "+00:00")))
                   .timestamp())
    except ValueError:
        return 0


def openai_model(model: dict[str, Any]) -> dict[str, Any]:
    name = model.get("name") or model.get("model", "")
    return {
        "id": name,
        "object": "model",
        "created": _unix_time(model.get("modified_at")),
        "owned_by": canonical_model_name(name).split("/")[1],
    }


class OllamaApi:
    def __init__(
        self,
        client: TargetClient,
        inventory: Inventory,
        chat_lane: Lane,
        embed_lane: Lane,
        watcher: ClientWatcher,
        watchdog: Watchdog,
        metrics: Metrics,
        budget: ParseBudget,
        *,
        max_wait: float = 0.0,
        allow_admin: bool = False,
    ) -> None:
        self._client = client
        self._inventory = inventory
        self._chat_lane, self._embed_lane = chat_lane, embed_lane
        self._watcher, self._watchdog = watcher, watchdog
        self._metrics = metrics
        self._budget = budget
        self._max_wait = max_wait or None
        self._allow_admin = allow_admin
        self._unknown_seen: set[tuple[str, str]] = set()
        self._unknown_lock = threading.Lock()

    def rules(self) -> list[Rule]:
        return [
            Rule("/healthz", methods=["GET"], endpoint=self.health),
            *(Rule(route.path, methods=[route.method], endpoint=getattr(self, route.handler))
              for route in ROUTES),
        ]

    def unlimited_body(self) -> set[Callable[..., Any]]:
        """Endpoints not held to `server.max_body`: blob uploads, when allowed."""
        return {self.blob} if self._allow_admin else set()

    # -- health ---------------------------------------------------------------

    def health(self, request: Request) -> WSGIApp:
        snapshot = self._inventory.snapshot
        target = self._watchdog.health(snapshot)
        body = {
            "status": "ok",
            "degraded": target.degraded,
            "reason": target.reason,  # public: it never names the target's address
            "last_poll_ok_seconds_ago": _age(snapshot.last_success),
            "models": len(snapshot.models),
            "chat": {"in_flight": self._chat_lane.in_flight,
                     "waiting": self._chat_lane.waiting},
            "embed": {"in_flight": self._embed_lane.in_flight,
                      "waiting": self._embed_lane.waiting},
            "version": __version__,
        }
        return json_response(200, json.dumps(body).encode())

    # -- through a lane -------------------------------------------------------

    def generate(self, request: Request) -> WSGIApp:
        return self._through_lane(request, self._chat_lane, *self._read(request, required_model))

    def messages(self, request: Request) -> WSGIApp:
        return self._through_lane(request, self._chat_lane, *self._read(request, messages_model))

    def transcribe(self, request: Request) -> WSGIApp:
        body = forwarded(request)
        model = transcription_model(body.blocks(), request.content_type or "")
        return self._through_lane(request, self._chat_lane, body, model,
                                  content_type=request.content_type)

    def embed(self, request: Request) -> WSGIApp:
        return self._through_lane(request, self._embed_lane,
                                  *self._read(request, required_model))

    def forward(self, request: Request) -> WSGIApp:
        """A path foreman does not know, sent on as it came: straight through when it
        only reads, through the chat slot (unwatched: its pace is unknown) when it
        may run the GPU."""
        target = _request_target(request.environ)
        key = (request.method, request.path)
        with self._unknown_lock:
            first = key not in self._unknown_seen
            if first and len(self._unknown_seen) < _UNKNOWN_ROUTES_LOGGED:
                self._unknown_seen.add(key)
            else:
                first = False
        if first:
            log.info("forwarding %s %s, a route foreman does not know, to the target", *key)
        if request.method in ("GET", "HEAD", "OPTIONS"):
            upstream = self._client.open(request.method, target, None, None,
                                         headers=_body_headers(request))
            return relay(upstream, [], head=request.method == "HEAD",
                         dialect=dialect_of(request.path))
        return self._through_lane(request, self._chat_lane, forwarded(request), "",
                                  content_type=request.content_type, target=target,
                                  watched=False)

    def _read(self, request: Request, decide: Callable[[dict[str, Any]], str]
              ) -> tuple[ForwardedBody, str]:
        if request.headers.get("Content-Encoding", "identity").lower() != "identity":
            # A compressed body (Codex sends zstd to /v1/responses): foreman cannot read
            # the model from it, so the target alone judges it.
            return forwarded(request), ""
        return read_forwarded(request, self._budget, decide)

    def _through_lane(self, request: Request, lane: Lane, body: ForwardedBody, model: str, *,
                      content_type: str | None = "application/json", target: str = "",
                      watched: bool = True) -> WSGIApp:
        """Wait in `lane`, then send the body on and relay the answer.  `model` is ""
        when foreman cannot know it; the chat slot's work runs under the watchdog's
        clocks when `watched`."""
        chat = lane is self._chat_lane
        generation = chat and watched
        info = request_info(request)
        info.model, info.waited_ms = model, 0
        if model and self._inventory.known_absent(model):
            raise ApiError(404, (_CHAT_NOT_FOUND if chat else _EMBED_NOT_FOUND).format(model))
        work = Work(kind=request.path.rsplit("/", 1)[-1], model=model, label=info.request_id,
                    resident=self._inventory.is_loaded(model))
        ticket = lane.enqueue(work)
        gone = client_gone_check(request)
        try:
            if ticket.state == WAITING:  # only a wait needs watching (most take a free place)
                with self._watcher.watch(
                    gone, lambda: ticket.cancel("client went away", CLIENT_GONE)
                ):
                    ticket.wait(self._max_wait if chat else None)
        finally:
            info.waited_ms = round(ticket.waited * 1000)
            info.out_of_order = work.out_of_order
            if chat:
                self._metrics.observe_wait(ticket.waited)
        abort = AbortSignal(watched=generation)
        streaming = self._watcher.watch(gone, abort.abort)
        cleanup = [streaming.cancel, ticket.release,
                   lambda: self._metrics.add_chunks(work.chunks)]
        if generation:
            cleanup.append(lambda: self._watchdog.ended(work.answered))
        path, headers = target or request.path, _body_headers(request)
        try:
            try:
                if gone():
                    raise ApiError(CLIENT_GONE, "client went away")
                upstream: Upstream | Watched = (
                    self._watchdog.open(path, body.content(), model, abort,
                                        content_type=content_type or "", headers=headers)
                    if generation else
                    self._client.open(request.method, path, body.content(), content_type,
                                      abort, headers=headers))
                if lane is self._embed_lane and upstream.status == 500:
                    # Some Ollama builds fail concurrent embeds spuriously; embeds are
                    # idempotent.
                    log.info("target answered 500 to %s of %s; retrying once", path, model)
                    upstream.read()
                    upstream.close()
                    upstream = self._client.open("POST", path, body.content(), content_type,
                                                 abort, headers=headers)
            except BaseException:
                for step in cleanup:
                    step()
                raise
            # From here on relay owns the cleanup, and runs it exactly once.
            return relay(upstream, cleanup, tally=work, json_only=model != "",
                         dialect=dialect_of(request.path))
        except TargetTransportError:
            if abort.aborted and not abort.stalled:
                raise ApiError(CLIENT_GONE, "client went away") from None
            raise

    # -- from the inventory ---------------------------------------------------

    def _known(self) -> Snapshot:
        snapshot = self._inventory.snapshot
        if not snapshot.known:  # never polled successfully: one rate-limited try now
            snapshot = self._inventory.refresh(for_miss=True)
        if not snapshot.known:
            raise TargetUnreachable(snapshot.error or "no model list yet")
        return snapshot

    def tags(self, request: Request) -> WSGIApp:
        return json_response(200, self._known().tags_body or b'{"models":[]}')

    def ps(self, request: Request) -> WSGIApp:
        """Live while the target answers (a poll can be a whole interval old), from the
        cache while it is degraded or when the live call fails."""
        if not self._inventory.snapshot.degraded:
            try:
                raw, _ = self._client.call("GET", "/api/ps",
                                           read_timeout=self._inventory.poll_timeout)
                return json_response(200, raw)
            except (TargetTransportError, TargetHTTPError, TargetBadAnswer) as exc:
                log.info("live /api/ps failed, answering from the cache: %s", exc)
        return json_response(200, self._known().ps_body or b'{"models":[]}')

    def openai_models(self, request: Request) -> WSGIApp:
        data = [openai_model(m) for m in self._known().models]
        return json_response(200, json.dumps({"object": "list", "data": data}).encode())

    def openai_model(self, request: Request, model: str) -> WSGIApp:
        wanted = canonical_model_name(model)
        for entry in self._known().models:
            if canonical_model_name(entry.get("name") or entry.get("model", "")) == wanted:
                return json_response(200, json.dumps(openai_model(entry)).encode())
        raise ApiError(404, f'model "{model}" not found')

    # -- straight through -----------------------------------------------------

    def passthrough(self, request: Request) -> WSGIApp:
        body = request.get_data(cache=False) or None
        upstream = self._client.open(
            request.method, request.path, body, request.content_type or None
        )
        return relay(upstream, [], head=request.method == "HEAD",
                     dialect=dialect_of(request.path))

    def admin(self, request: Request, **path_values: str) -> WSGIApp:
        return self._manage(request, request.get_data(cache=False) or None)

    def blob(self, request: Request, digest: str) -> WSGIApp:
        # A model file: read by waitress into its spool file, streamed on from there.
        request.max_content_length = None
        length = request.content_length or 0
        return self._manage(request, SizedBody(request.stream, length) if length else None)

    def _manage(self, request: Request, body: Any) -> WSGIApp:
        if not self._allow_admin:
            raise ApiError(
                403, "model management through foreman is disabled (target.allow_admin is false)"
            )
        upstream = self._client.open(request.method, request.path, body,
                                     request.content_type or None)
        on_close = [self._inventory.poll_soon] if 200 <= upstream.status < 300 else []
        return relay(upstream, on_close, head=request.method == "HEAD")


_CHAT_NOT_FOUND = "model '{}' not found"
_EMBED_NOT_FOUND = 'model "{}" not found, try pulling it first'


def _body_headers(request: Request) -> dict[str, str]:
    """The client's headers the target needs to read the body; never its credentials."""
    encoding = request.headers.get("Content-Encoding")
    return {"Content-Encoding": encoding} if encoding else {}


def _request_target(environ: dict[str, Any]) -> str:
    """The path and query as the client wrote them (waitress keeps the raw form in
    REQUEST_URI), so a forwarded request reaches the target unchanged."""
    raw = environ.get("REQUEST_URI", "")
    if raw.startswith("/"):
        return raw
    query = environ.get("QUERY_STRING", "")
    return quote(environ.get("PATH_INFO", "/")) + (f"?{query}" if query else "")


def _age(stamp: float | None) -> float | None:
    return None if stamp is None else round(time.time() - stamp, 3)
