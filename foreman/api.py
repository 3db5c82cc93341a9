"""The Ollama-compatible routes: what each one does on the way to the target.

Chat and generate (and their /v1 twins) and the embedding routes take the
same path through different lanes: validate the body, check the model
against the inventory, wait in the lane (the chat slot, or the embed lane
beside it), then relay the target's answer.  A client that leaves while
waiting leaves the line; one that leaves mid-answer has its upstream request
cut.  Model lists come from the inventory's cache; a few routes pass straight
through; model management passes through only when the operator allows it.
Decisions parse the JSON body, but the bytes sent to the target are the
client's own.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from werkzeug.routing import Rule
from werkzeug.wrappers import Request

from . import __version__
from .body import ParseBudget, SizedBody, read_forwarded
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


@dataclass
class RequestInfo:
    """Per-request facts the access log and response headers need."""

    request_id: str
    route: str = "unmatched"
    model: str = ""
    waited_ms: int | None = None


def request_info(request: Request) -> RequestInfo:
    return request.environ["foreman.info"]


def client_gone_check(request: Request) -> Callable[[], bool]:
    return request.environ.get("waitress.client_disconnected") or (lambda: False)


def required_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None or model == "":
        raise ApiError(400, "model is required")
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string")
    return model


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

    def rules(self) -> list[Rule]:
        post, get = ["POST"], ["GET"]
        slot_routes = ("/api/chat", "/api/generate", "/v1/chat/completions", "/v1/completions")
        embed_routes = ("/api/embed", "/api/embeddings", "/v1/embeddings")
        admin_routes = (
            ("/api/pull", post), ("/api/push", post), ("/api/create", post),
            ("/api/copy", post), ("/api/delete", ["DELETE"]),
        )
        return [
            Rule("/healthz", methods=get, endpoint=self.health),
            *(Rule(path, methods=post, endpoint=self.generate) for path in slot_routes),
            *(Rule(path, methods=post, endpoint=self.embed) for path in embed_routes),
            Rule("/api/tags", methods=get, endpoint=self.tags),
            Rule("/api/ps", methods=get, endpoint=self.ps),
            Rule("/v1/models", methods=get, endpoint=self.openai_models),
            Rule("/v1/models/<path:model>", methods=get, endpoint=self.openai_model),
            Rule("/", methods=get, endpoint=self.passthrough),
            Rule("/api/version", methods=get, endpoint=self.passthrough),
            Rule("/api/show", methods=post, endpoint=self.passthrough),
            *(Rule(path, methods=m, endpoint=self.admin) for path, m in admin_routes),
            Rule("/api/blobs/<digest>", methods=["HEAD", "POST"], endpoint=self.blob),
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
        return self._through_lane(request, self._chat_lane, "model '{}' not found",
                                  max_wait=self._max_wait)

    def embed(self, request: Request) -> WSGIApp:
        # Some Ollama builds fail concurrent embeds spuriously; embeds are idempotent.
        return self._through_lane(request, self._embed_lane,
                                  'model "{}" not found, try pulling it first',
                                  retry_500=True)

    def _through_lane(self, request: Request, lane: Lane, not_found: str,
                      max_wait: float | None = None, retry_500: bool = False) -> WSGIApp:
        body, model = read_forwarded(request, self._budget, required_model)
        generation = lane is self._chat_lane
        info = request_info(request)
        info.model, info.waited_ms = model, 0
        if self._inventory.known_absent(model):
            raise ApiError(404, not_found.format(model))
        work = Work(kind=request.path.rsplit("/", 1)[-1], model=model, label=info.request_id,
                    resident=self._inventory.is_loaded(model))
        ticket = lane.enqueue(work)
        gone = client_gone_check(request)
        try:
            if ticket.state == WAITING:  # only a wait needs watching (most take a free place)
                with self._watcher.watch(
                    gone, lambda: ticket.cancel("client went away", CLIENT_GONE)
                ):
                    ticket.wait(max_wait)
        finally:
            info.waited_ms = round(ticket.waited * 1000)
            if generation:
                self._metrics.observe_wait(ticket.waited)
        abort = AbortSignal(watched=generation)
        streaming = self._watcher.watch(gone, abort.abort)
        cleanup = [streaming.cancel, ticket.release,
                   lambda: self._metrics.add_chunks(work.chunks)]
        if generation:
            cleanup.append(lambda: self._watchdog.ended(work.answered))
        try:
            try:
                if gone():
                    raise ApiError(CLIENT_GONE, "client went away")
                upstream: Upstream | Watched = (
                    self._watchdog.open(request.path, body.content(), model, abort)
                    if generation else
                    self._client.open("POST", request.path, body.content(),
                                      "application/json", abort))
                if retry_500 and upstream.status == 500:
                    log.info("target answered 500 to %s of %s; retrying once",
                             request.path, model)
                    upstream.read()
                    upstream.close()
                    upstream = self._client.open("POST", request.path, body.content(),
                                                 "application/json", abort)
            except BaseException:
                for step in cleanup:
                    step()
                raise
            # From here on relay owns the cleanup, and runs it exactly once.
            return relay(upstream, cleanup, tally=work, json_only=True)
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
        return relay(upstream, [], head=request.method == "HEAD")

    def admin(self, request: Request) -> WSGIApp:
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


def _age(stamp: float | None) -> float | None:
    return None if stamp is None else round(time.time() - stamp, 3)
