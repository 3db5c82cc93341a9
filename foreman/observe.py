"""Seeing the box: the queue with estimates, Prometheus metrics, and the status page.

`/queue` and the data behind the page need the token like everything else;
the page itself (`/status`) is a static shell that carries no data, so it is
served without one and asks the browser's user for the token when needed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources

from werkzeug.routing import Rule
from werkzeug.wrappers import Request, Response

from . import __version__
from .errors import json_response
from .estimates import Estimator
from .inventory import Inventory
from .lane import Lane
from .metrics import Metrics
from .queue_view import QueueView
from .relay import WSGIApp
from .store import JobStore
from .watchdog import TargetHealth

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def register_gauges(metrics: Metrics, chat_lane: Lane, embed_lane: Lane, inventory: Inventory,
                    store: JobStore, target: Callable[[], TargetHealth],
                    estimator: Estimator, running_here: Callable[[], int]) -> None:
    """Gauges and counters read from their owners at scrape time."""
    metrics.register("foreman_chat_waiting", "Interactive requests and job workers waiting for "
                  "the chat slot.", lambda: [((), chat_lane.waiting)])
    metrics.register("foreman_chat_in_flight", "Generations holding the chat slot.",
                  lambda: [((), chat_lane.in_flight)])
    metrics.register("foreman_embed_waiting", "Embedding requests and job workers waiting for "
                  "the embed lane.", lambda: [((), embed_lane.waiting)])
    metrics.register("foreman_embed_in_flight", "Embeddings running on the target.",
                  lambda: [((), embed_lane.in_flight)])
    metrics.register("foreman_target_up", "1 when the last poll of the target succeeded and"
                     " no generation has stalled since the last one completed.",
                     lambda: [((), 0 if target().degraded else 1)])
    metrics.register("foreman_target_poll_failures_total", "Failed polls of the target.",
                     lambda: [((), inventory.poll_failures)], kind="counter")
    metrics.register("foreman_jobs", "Jobs in the store, by status.",
                  lambda: [((("status", s),), n) for s, n in store.counts().items()])
    metrics.register("foreman_model_loads_total", "Model loads (swaps) Ollama reported in"
                     " the generations foreman ran, by model.",
                     lambda: [((("model", m),), n) for m, n, _ in estimator.loads()],
                     kind="counter")
    metrics.register("foreman_model_load_seconds_total", "Time Ollama spent loading models"
                     " for those generations, by model.",
                     lambda: [((("model", m),), t) for m, _, t in estimator.loads()],
                     kind="counter")
    metrics.register("foreman_build_info", "foreman's version.",
                  lambda: [((("version", __version__),), 1)])
    if store.shared:  # foreman_jobs counts the whole fleet's queue; this, this host's part
        metrics.register("foreman_jobs_running_here", "Jobs this host is running, of a job"
                         " store shared by a fleet.", lambda: [((), running_here())])


def status_page() -> bytes:
    return resources.files("foreman").joinpath("static/status.html").read_bytes()


class ObserveApi:
    def __init__(self, queue: QueueView, metrics: Metrics,
                 target: Callable[[], TargetHealth]) -> None:
        """`target` tells the target's state in full, for those with the token."""
        self._queue, self._metrics, self._target = queue, metrics, target
        self._page = status_page()

    def rules(self) -> list[Rule]:
        return [
            Rule("/queue", methods=["GET"], endpoint=self.queue),
            Rule("/metrics", methods=["GET"], endpoint=self.metrics),
            Rule("/status", methods=["GET"], endpoint=self.status),
        ]

    def queue(self, request: Request) -> WSGIApp:
        target = self._target()
        view = {**self._queue.snapshot(),
                "target": {"degraded": target.degraded, "reason": target.detail}}
        return json_response(200, json.dumps(view).encode())

    def metrics(self, request: Request) -> WSGIApp:
        return Response(self._metrics.render(), content_type=PROMETHEUS_TEXT)

    def status(self, request: Request) -> WSGIApp:
        return Response(self._page, content_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-store",
                                 "Content-Security-Policy": "default-src 'self'; "
                                 "style-src 'unsafe-inline'; script-src 'unsafe-inline'"})
