"""Where foreman is assembled: every piece is built here, from the config, once.

Nothing else constructs a collaborator for itself; `build_daemon` is the one
function that knows the whole shape, and `Daemon` starts and stops the pieces
in order.  `Foreman` is the public face of the same thing, for running foreman
inside a Python program.  Tests build the same daemon on an ephemeral port.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .api import OllamaApi
from .app import ForemanApp
from .body import ParseBudget
from .client import ForemanError
from .config import (
    Config,
    ConfigError,
    ListenAddress,
    load_config,
    parse_config,
    webhook_key,
    with_environment,
)
from .estimates import Estimator, ModelHistory
from .guard import Guard, is_loopback_listen
from .inventory import Inventory
from .jobs_api import JobsApi, render_job
from .lane import Lane
from .metrics import Metrics
from .observe import ObserveApi, register_gauges
from .queue_view import QueueView
from .schedule import Residency, Scheduler
from .server import Server
from .store import JobStore, StoreCorrupt, StoreInUse, StoreUnavailable, open_store
from .target import TargetClient
from .warmup import EmbedderWarmer
from .watch import ClientWatcher
from .watchdog import TargetHealth, Watchdog
from .webhook import WebhookNotifier, WebhookPolicy
from .worker import JobWorker

log = logging.getLogger("foreman")


@dataclass
class Daemon:
    config: Config
    client: TargetClient
    inventory: Inventory
    chat_lane: Lane
    embed_lane: Lane
    watcher: ClientWatcher
    watchdog: Watchdog
    warmer: EmbedderWarmer | None
    store: JobStore
    estimator: Estimator
    worker: JobWorker
    notifier: WebhookNotifier
    app: ForemanApp
    server: Server
    draining: threading.Event
    _stopped: bool = dataclasses.field(default=False, init=False)

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"

    def start(self) -> None:
        """Start the background pieces and serve on a thread; returns at once."""
        self.watcher.start()
        self.watchdog.start()
        if self.warmer is not None:
            self.warmer.start()
        self.inventory.start()
        self.notifier.start()
        self.worker.start()
        threading.Thread(target=self.server.serve, name="foreman-server", daemon=True).start()
        log.info("foreman serving on %s, target %s", self.url, self.client.display_url)
        log.info("auth %s; status page %s/status; job store %s",
                 "on (bearer token)" if self.config.token else "off (no token configured)",
                 self.url, self.store.location)

    def shutdown(self, drain_timeout: float | None = None) -> bool:
        """Stop accepting, let in-flight work finish (up to the drain timeout), stop.

        Returns whether everything in flight finished in time.  Idempotent.
        """
        if self._stopped:
            return True
        self._stopped = True
        drain = self.config.server.drain_timeout if drain_timeout is None else drain_timeout
        deadline = time.monotonic() + drain
        self.server.stop_accepting()
        self.draining.set()
        self.worker.stop_claiming()  # also wakes the long-polls to see `draining`
        self.chat_lane.close("foreman is shutting down")
        self.embed_lane.close("foreman is shutting down")
        drained = self.app.wait_idle(drain)
        if not drained:
            log.warning("drain timeout: %d requests still in flight are cut", self.app.active)
        # Jobs still running past the deadline are aborted and go back to the queue.
        self.worker.stop(max(0.0, deadline - time.monotonic()))
        self.notifier.stop()
        self.inventory.stop()
        if self.warmer is not None:
            self.warmer.stop()
        self.watchdog.stop()
        self.watcher.stop()
        self.server.close(flush_timeout=5.0 if drained else 0.0)
        self.client.close()
        self.estimator.flush()
        self.store.close()
        log.info("foreman stopped")
        return drained


class Foreman:
    """foreman inside the calling process: the whole daemon on threads, no subprocess.

    `config` is a mapping shaped like the YAML file, or the path of one; it is
    validated exactly as the command line does it (the FOREMAN_* variables
    included).  `start()` serves (on the real port when port 0 was asked:
    see `url`); `stop()` drains and stops as SIGTERM does.  A config problem, a
    job store in use or a port that cannot be bound raises ForemanError.
    """

    def __init__(self, config: Mapping[str, Any] | str | os.PathLike[str]) -> None:
        try:
            if isinstance(config, (str, os.PathLike)):
                self.config = load_config(os.fspath(config))
            else:
                self.config = with_environment(parse_config(dict(config), "<dict>"),
                                               os.environ)
        except ConfigError as exc:
            raise ForemanError(None, f"config error: {exc}") from None
        self._daemon: Daemon | None = None

    @property
    def url(self) -> str:
        if self._daemon is None:
            raise ForemanError(None, "foreman is not running: call start() first")
        return self._daemon.url

    def start(self) -> Foreman:
        if self._daemon is None:
            try:
                self._daemon = build_daemon(self.config)
            except (StoreCorrupt, StoreInUse) as exc:
                raise ForemanError(None, str(exc)) from None
            except OSError as exc:
                raise ForemanError(None, f"cannot listen on {self.config.listen}:"
                                         f" {exc.strerror or exc}") from None
            self._daemon.start()
        return self

    def stop(self) -> bool:
        """Drain and stop; returns whether everything in flight finished in time."""
        daemon, self._daemon = self._daemon, None
        return True if daemon is None else daemon.shutdown()

    def __enter__(self) -> Foreman:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_daemon(config: Config) -> Daemon:
    threads = config.threads
    client = TargetClient(
        config.target.url,
        config.target.token,
        config.target.connect_timeout,
        config.target.read_timeout,
        pool_size=threads + 4,
    )
    inventory = Inventory(client, config.inventory.poll_interval,
                          miss_cooldown=config.inventory.repoll_cooldown,
                          poll_timeout=config.inventory.poll_timeout)
    store = open_store(config.jobs.db, exclusive=True, host=config.jobs.host_name,
                       lease_timeout=config.jobs.lease_timeout)
    try:
        store.register(())  # its models follow with its first heartbeat
    except StoreUnavailable as exc:
        store.close()
        raise StoreCorrupt(f"{store.location}: {exc.message}") from None
    except BaseException:
        store.close()
        raise

    def save_history(model: str, history: ModelHistory) -> None:
        try:
            store.save_model_history(model, history.generation, history.load, history.samples)
        except StoreUnavailable as exc:  # the history is a help, never a failure
            log.warning("cannot save the history of %s: %s", model, exc.message)

    estimator = Estimator(store.model_history(), save_history)
    scheduler = Scheduler(
        Residency(lambda: inventory.snapshot.loaded_names),
        affinity_wait=config.chat.affinity_wait, min_share=config.jobs.min_share,
        share_after=config.jobs.share_after, load_time=estimator.load_time)
    # The estimator learns from chat-slot work the target answered, nothing else.
    chat_lane = Lane("chat slot", config.chat.concurrency, config.chat.max_queue,
                     on_release=lambda work, held: estimator.record(
                         work.model, held, work.resident, work.final),
                     scheduler=scheduler)
    embed_lane = Lane("embed lane", config.embed.concurrency, config.embed.max_queue)
    # Each host of a fleet is scraped on its own: its name goes on every series.
    metrics = Metrics((("host", config.jobs.host_name),) if store.shared else ())
    watcher = ClientWatcher()
    watchdog = Watchdog(client, watcher, chat_lane,
                        first_token_timeout=config.target.first_token_timeout,
                        stall_timeout=config.target.stall_timeout,
                        probe_interval=config.inventory.poll_interval,
                        on_ended=inventory.poll_soon)
    budget = ParseBudget()
    warmer = None
    if config.embedder.model:
        warmer = EmbedderWarmer(client, config.embedder.model, config.inventory.poll_interval,
                                on_loaded=inventory.poll_soon)
        inventory.on_reachable(warmer.request)
    api = OllamaApi(
        client, inventory, chat_lane, embed_lane, watcher, watchdog, metrics, budget,
        max_wait=config.chat.max_wait,
        allow_admin=config.target.allow_admin,
    )
    webhooks = WebhookPolicy(config.jobs.webhook_hosts, config.listen)
    notifier = WebhookNotifier(render_job, webhooks, webhook_key(config.jobs.webhook_secret))
    worker = JobWorker(
        store, client, chat_lane, embed_lane, inventory, watchdog, notifier.notify, metrics,
        generation_workers=config.chat.concurrency,
        embed_workers=config.embed.concurrency or 2,
        max_attempts=config.jobs.max_attempts,
        retention=config.jobs.retention,
    )
    queue = QueueView(chat_lane, store, worker, estimator, scheduler)
    draining = threading.Event()
    jobs = JobsApi(store, worker, inventory, queue, notifier.notify, webhooks, budget, draining)
    def target_health() -> TargetHealth:
        return watchdog.health(inventory.snapshot)

    observe = ObserveApi(queue, metrics, target_health)
    register_gauges(metrics, chat_lane, embed_lane, inventory, store, target_health, estimator,
                    worker.running_count)
    public = {api.health, observe.status}
    if config.metrics.public:
        public.add(observe.metrics)
    guard = Guard(is_loopback_listen(config.listen.host), config.cors.origins,
                  config.server.allowed_hosts)
    app = ForemanApp([*api.rules(), *jobs.rules(), *observe.rules()], api.forward, public,
                     config.token, config.server.max_body, metrics, guard,
                     unlimited_body=api.unlimited_body())
    server = Server(app, config.listen.host, config.listen.port, threads,
                    check_headers=app.check_headers,
                    header_timeout=config.server.header_timeout,
                    max_connections_per_client=config.server.max_connections_per_client)
    webhooks.own = ListenAddress(server.host, server.port)  # the port, when 0 was asked
    return Daemon(config, client, inventory, chat_lane, embed_lane, watcher, watchdog, warmer,
                  store, estimator, worker, notifier, app, server, draining)
