"""The Ollama-compatible routes: what each one does on the way to the target.

Chat and generate (and their /v1 twins) validate their body, check the model
against the inventory, wait for the chat slot, then relay the target's answer.
Embeddings skip the slot.  Model lists come from the inventory's cache; a few
routes pass straight through; model management passes through only when the
operator allows it.  Decisions parse the JSON body, but the bytes sent to the
target are the client's own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from werkzeug.routing import Rule
from werkzeug.wrappers import Request

from . import __version__
from .errors import ApiError, TargetUnreachable, json_response
from .inventory import Inventory, Snapshot, canonical_model_name
from .metrics import Metrics
from .relay import WSGIApp, relay
from .slot import ChatSlot, Work
from .target import AbortSignal, TargetClient
from .watch import ClientWatcher

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


def read_json_object(request: Request) -> tuple[bytes, dict[str, Any]]:
    """The raw body and its parsed object; Ollama's 400s for anything else."""
    raw = request.get_data(cache=False)
    if not raw.strip():
        raise ApiError(400, "missing request body")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"invalid JSON in request body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return raw, body


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
        slot: ChatSlot,
        watcher: ClientWatcher,
        metrics: Metrics,
        *,
        max_wait: float = 0.0,
        embed_concurrency: int = 0,
        allow_admin: bool = False,
    ) -> None:
        self._client = client
        self._inventory = inventory
        self._slot = slot
        self._watcher = watcher
        self._metrics = metrics
        self._max_wait = max_wait or None
        self._embed_limit = (
            threading.BoundedSemaphore(embed_concurrency) if embed_concurrency
            else contextlib.nullcontext()
        )
        self._allow_admin = allow_admin

    def rules(self) -> list[Rule]:
        post, get = ["POST"], ["GET"]
        slot_routes = ("/api/chat", "/api/generate", "/v1/chat/completions", "/v1/completions")
        embed_routes = ("/api/embed", "/api/embeddings", "/v1/embeddings")
        admin_routes = (
            ("/api/pull", post), ("/api/push", post), ("/api/create", post),
            ("/api/copy", post), ("/api/delete", ["DELETE"]),
            ("/api/blobs/<digest>", ["HEAD", "POST"]),
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
        ]

    # -- health ---------------------------------------------------------------

    def health(self, request: Request) -> WSGIApp:
        snapshot = self._inventory.snapshot
        body = {
            "status": "ok",
            "degraded": snapshot.degraded,
            "reason": snapshot.error,
            "last_poll_ok_seconds_ago": _age(snapshot.last_success),
            "models": len(snapshot.models),
            "chat": {"in_flight": self._slot.in_flight, "waiting": self._slot.waiting},
            "version": __version__,
        }
        return json_response(200, json.dumps(body).encode())

    # -- through the chat slot ------------------------------------------------

    def generate(self, request: Request) -> WSGIApp:
        raw, body = read_json_object(request)
        model = required_model(body)
        info = request_info(request)
        info.model, info.waited_ms = model, 0
        if self._inventory.known_absent(model):
            raise ApiError(404, f"model '{model}' not found")
        kind = request.path.rsplit("/", 1)[-1]
        work = Work(kind=kind, model=model, label=info.request_id,
                    resident=self._inventory.is_loaded(model))
        ticket = self._slot.enqueue(work)
        gone = client_gone_check(request)
        try:
            with self._watcher.watch(
                gone, lambda: ticket.cancel("client went away", CLIENT_GONE)
            ):
                lease = ticket.wait(self._max_wait)
        finally:
            info.waited_ms = round(ticket.waited * 1000)
            self._metrics.observe_wait(ticket.waited)
        abort = AbortSignal()
        streaming = self._watcher.watch(gone, abort.abort)
        cleanup = [streaming.cancel, lease.release,
                   lambda: self._metrics.add_chunks(work.chunks)]
        try:
            try:
                if gone():
                    raise ApiError(CLIENT_GONE, "client went away")
                upstream = self._client.open("POST", request.path, raw, "application/json",
                                             abort)
            except BaseException:
                for step in cleanup:
                    step()
                raise
            # From here on relay owns the cleanup, and runs it exactly once.
            return relay(upstream, cleanup, tally=work, json_only=True)
        except TargetUnreachable:
            if abort.aborted:
                raise ApiError(CLIENT_GONE, "client went away") from None
            raise

    # -- beside the chat slot -------------------------------------------------

    def embed(self, request: Request) -> WSGIApp:
        raw, body = read_json_object(request)
        model = required_model(body)
        request_info(request).model = model
        if self._inventory.known_absent(model):
            raise ApiError(404, f'model "{model}" not found, try pulling it first')
        with self._embed_limit:
            upstream = self._client.open("POST", request.path, raw, "application/json")
            if upstream.status == 500:
                # Some Ollama builds fail concurrent embeds spuriously; embeds are idempotent.
                log.info("target answered 500 to an embed of %s; retrying once", model)
                upstream.read()
                upstream.close()
                upstream = self._client.open("POST", request.path, raw, "application/json")
            return relay(upstream, [], json_only=True)

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

    def admin(self, request: Request, digest: str | None = None) -> WSGIApp:
        if not self._allow_admin:
            raise ApiError(
                403, "model management through foreman is disabled (target.allow_admin is false)"
            )
        if digest is not None:
            request.max_content_length = None  # model blobs are gigabytes, streamed through
            length = request.content_length or 0
            body: Any = SizedBody(request.stream, length) if length else None
        else:
            body = request.get_data(cache=False) or None
        upstream = self._client.open(request.method, request.path, body,
                                     request.content_type or None)
        on_close = [self._inventory.poll_soon] if 200 <= upstream.status < 300 else []
        return relay(upstream, on_close, head=request.method == "HEAD")


class SizedBody:
    """A request body streamed to the target with its length known up front.

    `requests` sends a file-like object with a length as a plain body with
    Content-Length, reading it block by block, instead of buffering it.
    """

    def __init__(self, stream: Any, length: int) -> None:
        self._stream, self._length = stream, length

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(size)


def _age(stamp: float | None) -> float | None:
    return None if stamp is None else round(time.time() - stamp, 3)
