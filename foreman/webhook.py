"""Tells a job's webhook that the job finished: signed, to allowed hosts only, never
held up by another receiver.

Which URLs may be webhooks is decided at submit and again before each
delivery (`WebhookPolicy`): never one carrying credentials, nor a link-local
or unspecified address, nor foreman's own listening address, unless
`jobs.webhook_hosts` lists the host; when that list is set, only its hosts.
Hosts are compared as written in the URL, not resolved.

Deliveries are signed per the Standard Webhooks specification when a secret is
configured, and sent with the standard library's `http.client`: no redirects
followed, no proxies or .netrc from the environment.  Each attempt has a total
deadline (a receiver that drips bytes is cut at it), attempts run side by side
on a small pool, and a failed one is retried with backoff (1 s, 2 s, 4 s,
8 s).  A delivery still pending when foreman stops is dropped: the job itself
is durable and can be fetched with GET /jobs/<id>.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import heapq
import hmac
import http.client
import ipaddress
import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from .config import ListenAddress
from .guard import own_addresses, unmapped
from .store import Job

log = logging.getLogger("foreman.webhook")

# Read of a receiver's answer: enough for a status and a short reason.
_ANSWER_LIMIT = 64 * 1024


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: HMAC-SHA256 over `id.timestamp.body`, base64."""
    signed = message_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host names literally, in any spelling a resolver accepts
    (`2852039166` and `0x7f.1` are IPv4 to getaddrinfo), or None for a name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return unmapped(address)


class WebhookPolicy:
    def __init__(self, allowed_hosts: Iterable[str], own: ListenAddress,
                 hostname: str | None = None) -> None:
        self._allowed = frozenset(h.strip().lower().strip("[]") for h in allowed_hosts)
        self.own = own  # foreman's listening address; set again once the port is bound
        self._hostname = (hostname if hostname is not None else socket.gethostname()).lower()
        self._local = own_addresses(self._hostname)

    def problem(self, url: str) -> str | None:
        """Why foreman will not call `url`, or None when it will."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return "webhook must be an http(s) URL"
        host = (parts.hostname or "").lower().rstrip(".")  # `localhost.` is localhost
        if parts.scheme not in ("http", "https") or not host:
            return "webhook must be an http(s) URL"
        if "@" in parts.netloc:
            return "webhook URL must not carry credentials"
        if host in self._allowed:
            return None
        if self._allowed:
            return f"webhook host {host} is not in jobs.webhook_hosts"
        address = _address(host)
        if address is not None and (address.is_link_local or address.is_unspecified):
            return (f"webhook host {host} is a link-local or unspecified address"
                    " (list it in jobs.webhook_hosts to allow it)")
        port = port or (443 if parts.scheme == "https" else 80)
        if port == self.own.port and self._is_this_machine(host, address):
            return "webhook URL points at foreman itself"
        return None

    def _is_this_machine(self, host: str,
                         address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        own = _address(self.own.host)
        if address is None:
            return host in ("localhost", self._hostname, self.own.host.lower()) \
                or host.endswith(".localhost")
        listening_everywhere = own is not None and own.is_unspecified
        return (address.is_loopback or address == own or address.is_unspecified
                or (listening_everywhere and str(address) in self._local))


@dataclass(frozen=True)
class _Delivery:
    job_id: str
    url: str
    body: bytes
    attempt: int = 1


class WebhookNotifier:
    def __init__(self, render: Callable[[Job], bytes], policy: WebhookPolicy,
                 key: bytes = b"", attempts: int = 5, first_delay: float = 1.0,
                 deadline: float = 10.0, concurrency: int = 8) -> None:
        """`key`: the HMAC key deliveries are signed with (empty: unsigned);
        `deadline`: the whole of one attempt, connecting to the last byte read."""
        self._render, self._policy, self._key = render, policy, key
        self._attempts, self._first_delay, self._deadline = attempts, first_delay, deadline
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="foreman-webhook")
        self._schedule: list[tuple[float, int, _Delivery]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="foreman-webhooks", daemon=True)
        self._tls = ssl.create_default_context()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def notify(self, job: Job) -> None:
        if job.webhook:
            self._push(time.monotonic(), _Delivery(job.id, job.webhook, self._render(job)))

    def _push(self, due: float, delivery: _Delivery) -> None:
        with self._cond:
            heapq.heappush(self._schedule, (due, next(self._order), delivery))
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (
                        not self._schedule or self._schedule[0][0] > time.monotonic()):
                    wait = self._schedule[0][0] - time.monotonic() if self._schedule else None
                    self._cond.wait(wait)
                if self._stopped:
                    return
                _, _, delivery = heapq.heappop(self._schedule)
                with contextlib.suppress(RuntimeError):  # the pool shut down: stopping
                    self._pool.submit(self._deliver, delivery)

    def _deliver(self, delivery: _Delivery) -> None:
        host = urlsplit(delivery.url).hostname or "?"
        problem = self._policy.problem(delivery.url)
        if problem is not None:  # the rules changed since the job was submitted
            log.warning("webhook of job %s to %s not sent: %s", delivery.job_id, host, problem)
            return
        try:
            status = self._send(delivery)
            if 200 <= status < 300:
                log.info("webhook of job %s delivered to %s", delivery.job_id, host)
                return
            outcome = f"answered {status}"
            final = 300 <= status < 500 and status not in (408, 429)
        except (OSError, http.client.HTTPException) as exc:
            outcome, final = f"failed ({type(exc).__name__})", False
        if final or delivery.attempt >= self._attempts:
            log.warning("webhook of job %s to %s %s; giving up after attempt %d",
                        delivery.job_id, host, outcome, delivery.attempt)
            return
        delay = self._first_delay * 2 ** (delivery.attempt - 1)
        log.info("webhook of job %s to %s %s on attempt %d; retrying in %.0fs",
                 delivery.job_id, host, outcome, delivery.attempt, delay)
        self._push(time.monotonic() + delay, _Delivery(
            delivery.job_id, delivery.url, delivery.body, delivery.attempt + 1))

    def _send(self, delivery: _Delivery) -> int:
        """One attempt, all of it within the deadline; returns the receiver's status."""
        parts = urlsplit(delivery.url)
        conn: http.client.HTTPConnection = (
            http.client.HTTPSConnection(parts.hostname or "", parts.port,
                                        timeout=self._deadline, context=self._tls)
            if parts.scheme == "https" else
            http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=self._deadline))
        headers = {"Content-Type": "application/json", "User-Agent": "foreman"}
        if self._key:
            message_id, timestamp = f"msg_{delivery.job_id}", int(time.time())
            headers.update({
                "webhook-id": message_id, "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(self._key, message_id, timestamp, delivery.body),
            })

        def cut() -> None:  # the deadline passed: whatever the receiver is doing, stop
            with contextlib.suppress(OSError, AttributeError):
                conn.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]

        started = time.monotonic()
        try:
            conn.connect()  # its socket timeout is the deadline (name lookup is not bounded)
            timer = threading.Timer(max(0.0, self._deadline - (time.monotonic() - started)), cut)
            timer.daemon = True
            timer.start()
        except BaseException:
            conn.close()
            raise
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("POST", target, body=delivery.body, headers=headers)
            response = conn.getresponse()
            response.read(_ANSWER_LIMIT)
            return response.status
        finally:
            timer.cancel()
            conn.close()
