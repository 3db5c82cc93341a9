"""Prometheus metrics, written in the text exposition format with the stdlib only.

Counters and histograms are updated where things happen (the app, the chat
slot handler, the job worker, the relay); gauges are read from their owners
when `/metrics` is scraped, so they are never stale and cost nothing between
scrapes.  Names follow Prometheus conventions: `foreman_` prefix, base units,
`_total` for counters.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
RUN_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() \
        else str(int(value))


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    samples: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.samples += 1


@dataclass
class ReadAtScrape:
    name: str
    kind: str  # gauge, or counter for a monotonic count kept by its owner
    help: str
    read: Callable[[], Iterable[tuple[Labels, float]]]


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


class Metrics:
    def __init__(self, labels: Labels = ()) -> None:
        """`labels` go on every series (a fleet's host name: one scrape per host)."""
        self._constant = labels
        self._lock = threading.Lock()
        self._requests: dict[Labels, int] = {}
        self._chunks = 0
        self._wait = Histogram(WAIT_BUCKETS)
        self._job_run = Histogram(RUN_BUCKETS)
        self._read_at_scrape: list[ReadAtScrape] = []

    def register(self, name: str, help: str, read: Callable[[], Iterable[tuple[Labels, float]]],
                 kind: str = "gauge") -> None:
        self._read_at_scrape.append(ReadAtScrape(name, kind, help, read))

    def count_request(self, route: str, method: str, status: str) -> None:
        # The method is whatever token the client sent, before any auth: one
        # series per spelling would let anyone grow this table without end.
        method = method if method in _METHODS else "other"
        key = (("route", route), ("method", method), ("status", status))
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1

    def add_chunks(self, chunks: int) -> None:
        with self._lock:
            self._chunks += chunks

    def observe_wait(self, seconds: float) -> None:
        with self._lock:
            self._wait.observe(seconds)

    def observe_job_run(self, seconds: float) -> None:
        with self._lock:
            self._job_run.observe(seconds)

    def render(self) -> bytes:
        out: list[str] = []

        def family(name: str, kind: str, help: str) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")

        with self._lock:
            family("foreman_requests_total", "counter", "HTTP requests answered, by route.")
            for labels, value in sorted(self._requests.items()):
                out.append(f"foreman_requests_total{self._labels(labels)} {value}")
            family("foreman_streamed_chunks_total", "counter",
                   "Stream chunks relayed from the target to clients.")
            out.append(f"foreman_streamed_chunks_total{self._labels(())} {self._chunks}")
            self._histogram(out, family, "foreman_chat_wait_seconds",
                            "Time interactive requests waited for the chat slot.", self._wait)
            self._histogram(out, family, "foreman_job_run_seconds",
                            "Time a job attempt spent running against the target.",
                            self._job_run)
        for metric in self._read_at_scrape:
            family(metric.name, metric.kind, metric.help)
            for labels, value in metric.read():
                out.append(f"{metric.name}{self._labels(labels)} {_number(value)}")
        return ("\n".join(out) + "\n").encode()

    def _labels(self, labels: Labels, extra: str = "") -> str:
        return _labels(self._constant + labels, extra)

    def _histogram(self, out: list[str], family: Callable[[str, str, str], None], name: str,
                   help: str, histogram: Histogram) -> None:
        family(name, "histogram", help)
        cumulative = 0
        for bound, count in zip(histogram.buckets, histogram.counts, strict=True):
            cumulative += count
            le = f'le="{_number(bound)}"'
            out.append(f"{name}_bucket{self._labels((), le)} {cumulative}")
        infinity = 'le="+Inf"'
        out.append(f"{name}_bucket{self._labels((), infinity)} {histogram.samples}")
        out.append(f"{name}_sum{self._labels(())} {_number(histogram.total)}")
        out.append(f"{name}_count{self._labels(())} {histogram.samples}")
