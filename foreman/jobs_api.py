"""The /jobs routes: submit work now, collect it later.

`POST /jobs` answers 202 only after the job is committed to disk; an
`Idempotency-Key` makes a retried submit return the same job.  `GET
/jobs/<id>?wait=N` holds the request (up to 60 s) until the job ends, waking
on every store change, and answers at once when foreman starts to drain.
Listing is newest first with an opaque cursor.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from werkzeug.routing import Rule
from werkzeug.wrappers import Request

from .api import client_gone_check
from .body import ParseBudget, read_json_object
from .dialects import required_model
from .errors import ApiError, json_response
from .inventory import Inventory
from .queue_view import QueueView, iso
from .relay import WSGIApp
from .store import GENERATION_KINDS, KINDS, STATUSES, Job, JobStore, model_key
from .webhook import WebhookPolicy
from .worker import JobWorker

MAX_WAIT_SECONDS = 60.0
MAX_LIST_LIMIT = 500
PRIORITY_RANGE = (-(2**63), 2**63 - 1)  # SQLite's INTEGER, as Go's int64


def render_job(job: Job, position: int | None = None, partial: str | None = None,
               estimated_start: str | None = None, brief: bool = False,
               wait_reason: str | None = None) -> bytes:
    """A job's JSON document; its stored request and result go in as they are.
    A brief one leaves out the request, the result and the partial text, which
    can be megabytes, for listings that only show what each job is."""
    document: dict[str, Any] = {
        "id": job.id, "kind": job.kind, "model": job.model, "status": job.status,
        "priority": job.priority, "created_at": iso(job.created_at),
        "started_at": iso(job.started_at), "finished_at": iso(job.finished_at),
        "attempts": job.attempts, "error": job.error,
        "position": position, "estimated_start": estimated_start,
    }
    if job.host:  # a shared store: which host runs it (or ran it)
        document["host"] = job.host
    if wait_reason:
        document["wait_reason"] = wait_reason
    if brief:
        return json.dumps(document).encode()
    if partial is not None:
        document["partial"] = partial
    head = json.dumps(document)[:-1]  # without its closing brace
    return (f'{head}, "request": {job.request_json}, "result": {job.result_json or "null"}}}'
            .encode())


class JobsApi:
    def __init__(self, store: JobStore, worker: JobWorker, inventory: Inventory,
                 queue: QueueView, notify: Any, webhooks: WebhookPolicy, budget: ParseBudget,
                 draining: threading.Event, max_long_polls: int = 8) -> None:
        self._store, self._worker, self._inventory = store, worker, inventory
        self._webhooks = webhooks
        self._budget = budget
        self._draining = draining  # set when shutdown starts: long-polls answer at once
        self._queue = queue
        self._notify = notify
        # Each long-poll holds a server thread: bound them so they cannot starve the rest.
        self._long_polls = threading.BoundedSemaphore(max_long_polls)

    def rules(self) -> list[Rule]:
        return [
            Rule("/jobs", methods=["POST"], endpoint=self.submit),
            Rule("/jobs", methods=["GET"], endpoint=self.list),
            Rule("/jobs/<job_id>", methods=["GET"], endpoint=self.show),
            Rule("/jobs/<job_id>", methods=["DELETE"], endpoint=self.delete),
            Rule("/jobs/<job_id>/cancel", methods=["POST"], endpoint=self.cancel),
        ]

    def _line(self) -> dict[str, tuple[int, str | None]]:
        """job id -> (place in the chat-slot line, estimated start), from one snapshot."""
        return {entry["job_id"]: (entry["position"], entry["estimated_start"])
                for entry in self._queue.snapshot()["waiting"] if "job_id" in entry}

    def document(self, job: Job, line: dict[str, tuple[int, str | None]] | None = None,
                 brief: bool = False) -> bytes:
        position, estimated = None, None
        if job.status == "queued":
            if job.kind in GENERATION_KINDS:
                position, estimated = self._queue.place(job) if line is None else line.get(
                    job.id, (None, None))
            else:
                position = self._store.position(job)
        partial = None if brief else self._worker.progress(job.id)
        return render_job(job, position, partial, estimated, brief, self._wait_reason(job))

    def _wait_reason(self, job: Job) -> str | None:
        """Why a queued job on a shared store cannot run yet: no live host has its model."""
        if job.status != "queued":
            return None
        models = self._store.fleet_models()  # None: one host, whose own model check ran
        if models is None or model_key(job.model) in models:
            return None
        return (f"no live host has model '{job.model}': it runs when a host whose"
                " target has it is up")

    def submit(self, request: Request) -> WSGIApp:
        body = read_json_object(request, self._budget)
        kind = body.get("kind")
        if kind not in KINDS:
            raise ApiError(400, f"kind must be one of {', '.join(KINDS)}")
        job_request = body.get("request")
        if not isinstance(job_request, dict):
            raise ApiError(400, "request must be a JSON object (the Ollama request body)")
        model = required_model(job_request)
        priority = body.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int) \
                or not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]:
            raise ApiError(400, "priority must be an integer from"
                                f" {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[1]}")
        webhook = body.get("webhook")
        if webhook is not None:
            problem = (self._webhooks.problem(webhook) if isinstance(webhook, str)
                       else "webhook must be an http(s) URL")
            if problem is not None:
                raise ApiError(400, problem)
        key = request.headers.get("Idempotency-Key")
        if key is not None and not 0 < len(key) <= 255:
            raise ApiError(400, "Idempotency-Key must be 1 to 255 characters")
        # With a shared store another host's target may have it, or get it later.
        if not self._store.shared and self._inventory.known_absent(model):
            raise ApiError(404, f"model '{model}' not found")
        job, created = self._store.submit(kind, job_request, priority, webhook, key)
        location = {"Location": f"/jobs/{job.id}"}
        return json_response(202 if created else 200, self.document(job), location)

    def show(self, request: Request, job_id: str) -> WSGIApp:
        wait = _wait_seconds(request.args.get("wait"))
        job = self._store.get(job_id)
        if job is None:
            raise ApiError(404, f"job {job_id} not found")
        if wait and not job.finished and self._long_polls.acquire(blocking=False):
            try:
                job = self._hold(job, wait, client_gone_check(request))
            finally:
                self._long_polls.release()
        return json_response(200, self.document(job))

    def _hold(self, job: Job, wait: float, gone: Any) -> Job:
        deadline = time.monotonic() + wait
        seen = self._store.version
        while not job.finished and not gone() and not self._draining.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            seen = self._store.wait_for_change(seen, min(left, 0.25))
            job = self._store.get(job.id) or job
        return job

    def list(self, request: Request) -> WSGIApp:
        args = request.args
        status, kind = args.get("status") or None, args.get("kind") or None
        if status is not None and status not in STATUSES:
            raise ApiError(400, f"status must be one of {', '.join(STATUSES)}")
        if kind is not None and kind not in KINDS:
            raise ApiError(400, f"kind must be one of {', '.join(KINDS)}")
        limit = _integer(args.get("limit"), "limit", 50)
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ApiError(400, f"limit must be between 1 and {MAX_LIST_LIMIT}")
        after = args.get("after")
        if after is not None and not (after.isdigit() and len(after) < 19):
            raise ApiError(400, "invalid cursor")
        brief = args.get("brief", "") not in ("", "0", "false")
        jobs, cursor = self._store.list(status, kind, limit, int(after) if after else None,
                                        brief)
        line = self._line() if any(j.status == "queued" for j in jobs) else {}
        documents = b", ".join(self.document(j, line, brief) for j in jobs)
        after_this = json.dumps(None if cursor is None else str(cursor)).encode()
        return json_response(200, b'{"jobs": [' + documents + b'], "next": ' + after_this + b"}")

    def cancel(self, request: Request, job_id: str) -> WSGIApp:
        job, was = self._store.cancel(job_id)
        if job is None:
            raise ApiError(404, f"job {job_id} not found")
        if was == "final":
            raise ApiError(409, f"job {job_id} already finished ({job.status})")
        if was == "running":
            self._worker.abort(job_id)
        self._notify(job)
        return json_response(200, self.document(job))

    def delete(self, request: Request, job_id: str) -> WSGIApp:
        outcome = self._store.delete(job_id)
        if outcome == "missing":
            raise ApiError(404, f"job {job_id} not found")
        if outcome == "unfinished":
            raise ApiError(409, f"job {job_id} has not finished; cancel it first")
        return json_response(200, json.dumps({"id": job_id, "deleted": True}).encode())


def _integer(text: str | None, name: str, default: int) -> int:
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None


def _wait_seconds(text: str | None) -> float:
    if text is None or text == "":
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        raise ApiError(400, "wait must be a number of seconds") from None
    if not 0 <= seconds <= MAX_WAIT_SECONDS:
        raise ApiError(400, f"wait must be between 0 and {MAX_WAIT_SECONDS:.0f} seconds")
    return seconds
