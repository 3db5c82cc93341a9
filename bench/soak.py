"""Soak: a mixed workload against foreman while the target restarts, watching for leaks.

Streams, clients that hang up mid-stream, embeddings and async jobs run for
the whole time; the fake Ollama is killed and restarted on the same port
every `--restart-every` seconds.  foreman's RSS, open file descriptors,
threads and job backlog are sampled throughout.  At the end every job must
have succeeded, every failed request must fall inside a target restart, and
the samples of the last fifth must match the first fifth (after a warm-up: a
tenth of the run, or `--warm-up-minutes`).
The load is steady: the backlog of queued jobs must not grow, or memory would
grow with it for a reason that is no leak.

Run: `python -m bench.soak --minutes 10` (CI runs `--seconds 20`).  Exit status
0 means every check passed; the JSON report goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import requests

from bench.common import Child, KeepAlive, proc_status, rss_mb, start_foreman
from tests.http_raw import ChunkReader

THINK_SECONDS = 1.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Target:
    """The fake Ollama as a process that can be killed and brought back on its port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.lock = threading.Lock()
        self.down_windows: list[list[float]] = []  # [went down, back up (inf while down)]
        self.child = self._start()

    def _start(self) -> Child:
        return Child(["-m", "tests.fake_ollama", "--port", str(self.port)],
                     r"listening on (http://\S+)")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restart(self, downtime: float) -> None:
        window = [time.monotonic(), float("inf")]
        with self.lock:
            self.down_windows.append(window)
        self.child.proc.kill()
        self.child.proc.wait()
        time.sleep(downtime)
        self.child = self._start()
        with self.lock:
            window[1] = time.monotonic()

    def was_down_near(self, started: float, ended: float, slack: float = 2.0) -> bool:
        with self.lock:
            return any(a - slack <= ended and started <= b + slack
                       for a, b in self.down_windows)


class Soak:
    def __init__(self, seconds: float, restart_every: float, jobs: bool = True,
                 warm_up: float | None = None) -> None:
        """`warm_up`: seconds left out of the resource checks (default: a tenth)."""
        self.seconds, self.restart_every, self.with_jobs = seconds, restart_every, jobs
        self.warm_up = seconds / 10 if warm_up is None else warm_up
        self.started = time.monotonic()
        self.target = Target()
        self.foreman = start_foreman(self.target.url, "inventory:\n  poll_interval: 1s\n",
                                     "  connect_timeout: 1s\n  read_timeout: 30s\n")
        self.stop = threading.Event()
        self.outcomes: Counter[str] = Counter()
        self.unexplained: list[str] = []
        self.jobs: list[str] = []
        self.samples: list[dict[str, float]] = []
        self.lock = threading.Lock()

    def record(self, kind: str, ok: bool, started: float, detail: str = "") -> None:
        with self.lock:
            if ok:
                self.outcomes[f"{kind}: ok"] += 1
            elif self.target.was_down_near(started, time.monotonic()):
                self.outcomes[f"{kind}: failed during a target restart"] += 1
            else:
                self.outcomes[f"{kind}: UNEXPLAINED"] += 1
                self.unexplained.append(f"{kind}: {detail}")

    def loop(self, kind: str, action: Any, think: float = 0.0) -> None:
        """Run `action` until the soak ends, pausing `think` seconds after each."""
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                ok, detail = action()
            except (OSError, ValueError, requests.RequestException) as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            self.record(kind, ok, started, detail)
            if not ok:
                self.stop.wait(0.1)  # a client backs off a little, as real ones do
            if think:
                self.stop.wait(think)

    def _chat(self, options: dict[str, Any],
              read: Callable[[ChunkReader], tuple[bool, str]]) -> tuple[bool, str]:
        """Open a streaming chat and let `read` consume as much of it as it wants."""
        body = json.dumps({"model": "llama3", "messages": [], "options": options}).encode()
        reader = ChunkReader(self.foreman.url, "POST", "/api/chat", body, timeout=30)
        try:
            if reader.status != 200:
                return False, f"status {reader.status}"
            return read(reader)
        finally:
            reader.close()

    def stream(self) -> tuple[bool, str]:
        def to_the_end(reader: ChunkReader) -> tuple[bool, str]:
            last = reader.chunks()[-1]
            return bool(json.loads(last).get("done")), last.decode()[:200]

        return self._chat({"num_predict": 40, "fake_token_delay": 0.005}, to_the_end)

    def hang_up(self) -> tuple[bool, str]:
        def two_chunks(reader: ChunkReader) -> tuple[bool, str]:
            reader.next_chunk()
            reader.next_chunk()
            return True, ""

        return self._chat({"num_predict": 400, "fake_token_delay": 0.01}, two_chunks)

    def embed(self, client: KeepAlive) -> tuple[bool, str]:
        status, body = client.post("/api/embed", json.dumps({
            "model": "nomic-embed-text", "input": ["soak"]}).encode())
        return status == 200, f"status {status}: {body[:200]!r}"

    def submit(self) -> tuple[bool, str]:
        kind = random.choice(("chat", "embed"))
        request = ({"model": "llama3", "messages": [], "options": {"num_predict": 5}}
                   if kind == "chat" else {"model": "nomic-embed-text", "input": "x"})
        response = requests.post(self.foreman.url + "/jobs", timeout=10,
                                 json={"kind": kind, "request": request})
        if response.status_code == 202:
            with self.lock:
                self.jobs.append(response.json()["id"])
        time.sleep(0.2)
        return response.status_code == 202, response.text[:200]

    def sample(self) -> None:
        while not self.stop.wait(1.0):
            status = proc_status(self.foreman.pid)
            self.samples.append({
                "t": time.monotonic(), "rss_mb": rss_mb(status),
                "threads": int(status["Threads"]),
                "fds": len(os.listdir(f"/proc/{self.foreman.pid}/fd")),
                "jobs_queued": self.jobs_queued(),
            })

    def jobs_queued(self) -> float:
        """From /metrics: a backlog that only grows would make every check below moot,
        since each submit's work (its place in line) grows with the line."""
        metrics = requests.get(self.foreman.url + "/metrics", timeout=10).text
        found = re.search(r'^foreman_jobs\{status="queued"\} (\S+)$', metrics, re.M)
        return float(found.group(1)) if found else 0.0

    def restarts(self) -> None:
        while not self.stop.wait(self.restart_every):
            self.target.restart(downtime=1.0)

    def run(self) -> dict[str, Any]:
        embed_clients = [KeepAlive(self.foreman.url) for _ in range(2)]
        # The chat clients pause between turns, as people and agents do; without
        # pauses they hold the chat slot all the time, and chat jobs (the lower tier)
        # would queue up for the whole run.
        threads = [
            threading.Thread(target=self.loop, args=("stream", self.stream, THINK_SECONDS)),
            threading.Thread(target=self.loop, args=("stream", self.stream, THINK_SECONDS)),
            threading.Thread(target=self.loop, args=("hang-up", self.hang_up, THINK_SECONDS)),
            *(threading.Thread(target=self.loop, args=("embed", lambda c=c: self.embed(c)))
              for c in embed_clients),
            *([threading.Thread(target=self.loop, args=("job submit", self.submit))]
              if self.with_jobs else []),
            threading.Thread(target=self.sample),
            threading.Thread(target=self.restarts),
        ]
        self.started = started = time.monotonic()
        for thread in threads:
            thread.start()
        self.stop.wait(self.seconds)
        self.stop.set()
        for thread in threads:
            thread.join(60)
        finished = self.collect_jobs()
        health = requests.get(self.foreman.url + "/healthz", timeout=5).json()
        report = {
            "seconds": round(time.monotonic() - started, 1),
            "target_restarts": len(self.target.down_windows),
            "outcomes": dict(sorted(self.outcomes.items())),
            "unexplained": self.unexplained[:20],
            "jobs": dict(Counter(finished.values())),
            "final_health": health,
            "resources": self.resource_summary(),
        }
        report["checks"] = self.checks(report, finished, health)
        return report

    def collect_jobs(self) -> dict[str, str]:
        statuses = {}
        deadline = time.monotonic() + 120
        for job_id in self.jobs:
            while True:
                left = max(0.0, min(30.0, deadline - time.monotonic()))
                try:
                    job = requests.get(f"{self.foreman.url}/jobs/{job_id}?wait={left:.1f}",
                                       timeout=left + 10).json()
                except requests.RequestException:
                    continue
                if job["status"] in ("succeeded", "failed", "cancelled") or left == 0:
                    statuses[job_id] = job["status"]
                    break
        return statuses

    def resource_summary(self) -> dict[str, Any]:
        usable = [s for s in self.samples if s["t"] - self.started >= self.warm_up]
        fifth = max(1, len(usable) // 5)
        first, last = usable[:fifth], usable[-fifth:]
        summary: dict[str, Any] = {"samples": len(self.samples), "warm_up_seconds": self.warm_up}
        step = max(1, len(self.samples) // 10)
        summary["rss_mb_every_tenth"] = [round(s["rss_mb"], 1) for s in self.samples[::step]]
        for key in ("rss_mb", "threads", "fds", "jobs_queued"):
            summary[key] = {
                "first_fifth_median": statistics.median(s[key] for s in first),
                "last_fifth_median": statistics.median(s[key] for s in last),
                "max": max(s[key] for s in self.samples),
            }
        return summary

    def checks(self, report: dict[str, Any], finished: dict[str, str],
               health: dict[str, Any]) -> dict[str, bool]:
        resources = report["resources"]

        def flat(key: str, allowed: float) -> bool:
            entry = resources[key]
            return entry["last_fifth_median"] - entry["first_fifth_median"] <= allowed

        return {
            "every job succeeded": set(finished.values()) <= {"succeeded"}
            and len(finished) == len(self.jobs) and (bool(finished) or not self.with_jobs),
            "every failure falls in a target restart": not self.unexplained,
            "foreman healthy at the end": health["status"] == "ok",
            "rss flat (within 5 MB)": flat("rss_mb", 5.0),
            "threads flat (within 5)": flat("threads", 5),
            "file descriptors flat (within 10)": flat("fds", 10),
            "job backlog steady (within 20)": flat("jobs_queued", 20),
        }

    def close(self) -> None:
        self.foreman.stop()
        self.target.child.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float)
    length.add_argument("--seconds", type=float)
    parser.add_argument("--restart-every", type=float, default=30.0,
                        help="seconds between target restarts")
    parser.add_argument("--no-jobs", action="store_true", help="leave async jobs out")
    parser.add_argument("--warm-up-minutes", type=float,
                        help="left out of the resource checks (default: a tenth of the run)")
    args = parser.parse_args()
    seconds = args.seconds or (args.minutes or 10) * 60
    warm_up = None if args.warm_up_minutes is None else args.warm_up_minutes * 60
    if warm_up is not None and not 0 <= warm_up < seconds:
        parser.error("the warm-up must be shorter than the run")
    soak = Soak(seconds, args.restart_every, jobs=not args.no_jobs, warm_up=warm_up)
    try:
        report = soak.run()
    finally:
        soak.close()
    print(json.dumps(report, indent=2))
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
