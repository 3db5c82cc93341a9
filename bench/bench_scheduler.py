"""Model swaps, makespans and estimates on one simulated GPU: foreman against the same
work sent straight to the simulator, in one run (issue 15's workloads).

The simulator is the fake Ollama with `--gpu N`: N chat models fit at once,
bringing in another sleeps `--load` seconds and evicts the least recently
used, generations run one at a time, and the final chunk reports the real
`load_duration` and `total_duration`.  Each workload gets a fresh simulator
(and a fresh foreman), so every run starts with nothing resident.

- W1: two interactive clients back to back for `--seconds`, one on model A,
  one on B.
- W2: one interactive client on A with 1 s of think time for `--seconds`,
  and `--jobs` chat jobs on B submitted at the start (direct: one client
  sending them one after another).
- W3: 2 x `--jobs` chat jobs alternating A/B, submitted at once (direct: one
  client, the same order).

Direct, the jobs are streamed on one kept connection and every line parsed, as
foreman's job worker runs them, so the hand-off gaps compare like for like.

Reported per workload and path: model loads (from the simulator), makespan,
and for jobs through foreman the error of `estimated_start` readings taken at
least 10 s before each job started (median, and how many were null); the
"grouped" line is the ideal: one load per model, then every generation.

Run: `python -m bench.bench_scheduler [--load 0.5] [--seconds 60] [--jobs 100]`;
`--warm` gives foreman one job per model first (the history a restart keeps),
`--steady` keeps W2's client going until the jobs are done (the estimates assume
the interactive load goes on; a client that stops is not foreseeable), `--paths
foreman` skips the direct run, `--dump FILE` keeps every estimate read.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import requests

from bench.common import Child, start_foreman

A, B = "model-a:latest", "model-b:latest"


def simulator(load: float, tokens: int, token_delay: float) -> Child:
    return Child(["-m", "tests.fake_ollama", "--gpu", "1", "--load-seconds", str(load),
                  "--tokens", str(tokens), "--token-delay", str(token_delay),
                  "--models", A, B], r"listening on (http://\S+)")


def chat(url: str, model: str) -> None:
    answer = requests.post(url + "/api/chat", timeout=600, json={
        "model": model, "stream": False, "messages": [{"role": "user", "content": "hi"}]})
    answer.raise_for_status()


def streamed_chat(session: requests.Session, url: str, model: str) -> None:
    """A chat as a job worker runs one: streamed on a kept connection, every line
    parsed and the text assembled (the like-for-like direct side of the hand-off)."""
    with session.post(url + "/api/chat", timeout=600, stream=True, json={
            "model": model, "messages": [{"role": "user", "content": "hi"}]}) as answer:
        answer.raise_for_status()
        "".join(json.loads(line)["message"]["content"] for line in answer.iter_lines())


def gpu_stats(sim: Child, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Loads, and the gap from one generation's end to the next one's arrival (the
    hand-off), from the simulator's own records; after `before` (its stats then)."""
    stats = requests.get(sim.url + "/fake/stats", timeout=5).json()
    skip = len(before["started_at"]) if before else 0
    gaps = sorted((start - end) * 1000 for start, end in
                  zip(stats["started_at"][skip + 1:], stats["finished_at"][skip:], strict=False)
                  if start >= end)
    return {"loads": stats["loads"] - (before["loads"] if before else 0),
            "handoff_ms_p50": round(statistics.median(gaps), 2) if gaps else None}


def interactive(url: str, model: str, going: Callable[[], bool], think: float,
                latencies: list[float] | None = None) -> threading.Thread:
    def run() -> None:
        while going():
            started = time.monotonic()
            chat(url, model)
            if latencies is not None:
                latencies.append(time.monotonic() - started)
            if think:
                time.sleep(think)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


class JobWatch:
    """Submits chat jobs to foreman, reads their estimates every half second, and
    waits for them all to finish."""

    def __init__(self, url: str, models: list[str]) -> None:
        self.url = url
        self.ids = [requests.post(url + "/jobs", timeout=10, json={
            "kind": "chat", "request": {"model": model, "messages": [
                {"role": "user", "content": "hi"}]}}).json()["id"] for model in models]
        self.readings: dict[str, list[tuple[float, float | None]]] = {i: [] for i in self.ids}

    def wait(self) -> float:
        """Seconds until every job finished, estimates read along the way."""
        started = time.time()
        pending = set(self.ids)
        while pending:
            now = time.time()
            for job in self._list("status=queued"):
                if job["id"] in self.readings:
                    stamp = job.get("estimated_start")
                    self.readings[job["id"]].append((now, _epoch(stamp) if stamp else None))
            pending = {j["id"] for j in self._list("")
                       if j["id"] in pending and j["status"] not in ("succeeded", "failed")}
            time.sleep(0.5)
        return time.time() - started

    def _list(self, query: str) -> list[dict[str, Any]]:
        """Every job the listing has for `query`, page by page."""
        jobs: list[dict[str, Any]] = []
        after = ""
        while True:
            page = requests.get(f"{self.url}/jobs?{query}&limit=500&brief=1{after}",
                                timeout=10).json()
            jobs += page["jobs"]
            if page["next"] is None:
                return jobs
            after = f"&after={page['next']}"

    def estimate_errors(self, dump: str = "") -> dict[str, Any]:
        errors, nulls, jumps = [], 0, []
        starts = {}
        for job_id, readings in self.readings.items():
            known = [estimate for _, estimate in readings if estimate is not None]
            jumps += [abs(b - a) for a, b in itertools.pairwise(known)]
            started = starts[job_id] = _epoch(requests.get(f"{self.url}/jobs/{job_id}",
                                                           timeout=10).json()["started_at"])
            ahead = [(at, estimate) for at, estimate in readings if started - at >= 10]
            for at, estimate in ahead:
                if estimate is None:
                    nulls += 1
                else:
                    errors.append(abs(estimate - started) / (started - at))
        if dump:
            with open(dump, "w") as out:
                json.dump({job_id: {"started": starts[job_id], "readings": readings}
                           for job_id, readings in self.readings.items()}, out)
        return {"readings_10s_ahead": len(errors) + nulls, "null": nulls,
                "median_error": round(statistics.median(errors), 3) if errors else None,
                "largest_jump_between_reads_s": round(max(jumps), 2) if jumps else None}


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def measure(name: str, args: argparse.Namespace,
            work: Callable[[str, Child], dict[str, Any]]) -> dict[str, Any]:
    results: dict[str, Any] = {"workload": name}
    for path in args.paths:
        sim = simulator(args.load, args.tokens, args.token_delay)
        proxy = start_foreman(sim.url, extra=args.foreman_yaml) if path == "foreman" else None
        try:
            before = None
            if proxy and args.warm:  # one job per model first: foreman starts with history
                JobWatch(proxy.url, [B, A]).wait()
                before = requests.get(sim.url + "/fake/stats", timeout=5).json()
            started = time.monotonic()
            outcome = work(proxy.url if proxy else sim.url, sim)
            outcome["makespan_s"] = round(time.monotonic() - started, 1)
            outcome.update(gpu_stats(sim, before))
            results[path] = outcome
        finally:
            if proxy:
                proxy.stop()
            sim.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--load", type=float, default=0.5, help="seconds per model load")
    parser.add_argument("--seconds", type=float, default=60.0, help="W1 and W2 length")
    parser.add_argument("--jobs", type=int, default=100, help="W2's jobs; W3 has twice this")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--token-delay", type=float, default=0.01)
    parser.add_argument("--only", nargs="*", default=["W1", "W2", "W3"])
    parser.add_argument("--foreman-yaml", default="", help="extra config for foreman")
    parser.add_argument("--paths", nargs="*", default=["direct", "foreman"])
    parser.add_argument("--warm", action="store_true",
                        help="run one job per model through foreman first, so it has history"
                             " (as after a restart)")
    parser.add_argument("--steady", action="store_true",
                        help="W2's client runs until the jobs are done, not for --seconds")
    parser.add_argument("--dump", default="", help="write every estimate reading here (JSON)")
    args = parser.parse_args()
    generation = args.tokens * args.token_delay

    def for_the_length() -> Callable[[], bool]:
        until = time.monotonic() + args.seconds
        return lambda: time.monotonic() < until

    def w1(url: str, sim: Child) -> dict[str, Any]:
        going = for_the_length()
        latencies: list[float] = []
        for thread in [interactive(url, A, going, 0, latencies),
                       interactive(url, B, going, 0, latencies)]:
            thread.join()
        return {"requests": len(latencies), "latency_s_max": round(max(latencies), 2),
                "latency_s_p50": round(statistics.median(latencies), 2)}

    def w2(url: str, sim: Child) -> dict[str, Any]:
        jobs_done = threading.Event()
        going = (lambda: not jobs_done.is_set()) if args.steady else for_the_length()
        client = interactive(url, A, going, 1.0)
        if url == sim.url:  # direct: the jobs are one client's requests, in turn
            started = time.monotonic()
            with requests.Session() as session:
                for _ in range(args.jobs):
                    streamed_chat(session, url, B)
            outcome = {"jobs_done_after_s": round(time.monotonic() - started, 1)}
        else:
            watch = JobWatch(url, [B] * args.jobs)
            outcome = {"jobs_done_after_s": round(watch.wait(), 1)}
            jobs_done.set()
            outcome["estimates"] = watch.estimate_errors(args.dump)
        jobs_done.set()
        client.join()
        return outcome

    def w3(url: str, sim: Child) -> dict[str, Any]:
        order = [A, B] * args.jobs
        if url == sim.url:
            with requests.Session() as session:
                for model in order:
                    streamed_chat(session, url, model)
            return {}
        watch = JobWatch(url, order)
        watch.wait()
        return {"estimates": watch.estimate_errors(args.dump)}

    workloads = {"W1": (w1, None), "W2": (w2, 2 * args.load + args.jobs * generation),
                 "W3": (w3, 2 * args.load + 2 * args.jobs * generation)}
    print(json.dumps({"load_s": args.load, "generation_s": generation}), flush=True)
    for name in args.only:
        work, grouped = workloads[name]
        result = measure(name, args, work)
        if grouped is not None:
            result["grouped_ideal"] = {"loads": 2, "makespan_s": round(grouped, 1)}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
