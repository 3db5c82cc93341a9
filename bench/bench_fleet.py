"""The job store on PostgreSQL against SQLite, and a fleet draining a queue (issue 16).

A throwaway PostgreSQL cluster (as the tests start one, but with fsync on, as a
real server runs) on this machine, next to a SQLite file on the same disk.

- store: submits per second (one thread, each a committed transaction), and the
  latency of a claim (claim + finish of a queued job, one thread), per backend.
- hand-off: foreman in front of the one-GPU simulator (no load time, 5 tokens of
  5 ms), 200 chat jobs on one model; the simulator's gap from one generation's
  end to the next one's arrival, p50, with each backend as the store.
- drain: 1,000 chat jobs (half on model A, half on B, 5 tokens of 5 ms each)
  submitted at once; time until all succeeded with one host (its target has A
  and B), two hosts with disjoint models (A | B), and two with overlapping ones
  (A+B | A+B).  Each host is a foreman process in front of its own simulator.

Run: `python -m bench.bench_fleet [--jobs 1000] [--only store handoff drain]`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import requests

from bench.bench_scheduler import gpu_stats
from bench.common import Child, start_foreman
from foreman.store import JobStore, model_key, open_store
from tests.postgres import Cluster, start_cluster

A, B = "model-a:latest", "model-b:latest"


def simulator(*models: str) -> Child:
    return Child(["-m", "tests.fake_ollama", "--gpu", "2", "--load-seconds", "0",
                  "--tokens", "5", "--token-delay", "0.005", "--models", *models],
                 r"listening on (http://\S+)")


def stores(cluster: Cluster) -> Iterator[tuple[str, JobStore]]:
    yield "sqlite", open_store(tempfile.mkdtemp() + "/bench.db")
    yield "postgresql", open_store(cluster.database(), host="bench")


def store_speed(cluster: Cluster, count: int) -> dict[str, Any]:
    results = {}
    for name, store in stores(cluster):
        started = time.perf_counter()
        for _ in range(count):
            store.submit("chat", {"model": A})
        submits = count / (time.perf_counter() - started)
        latencies = []
        for _ in range(count):
            began = time.perf_counter()
            job = store.claim(("chat",), available=[model_key(A)])
            assert job is not None
            store.finish(job, "succeeded", "{}")
            latencies.append((time.perf_counter() - began) * 1000)
        store.close()
        latencies.sort()
        results[name] = {"submits_per_s": round(submits),
                         "claim_finish_ms_p50": round(statistics.median(latencies), 2),
                         "claim_finish_ms_p99": round(latencies[int(len(latencies) * .99)], 2)}
    return results


def submit_all(url: str, models: list[str]) -> list[str]:
    with requests.Session() as session:
        return [session.post(url + "/jobs", timeout=30, json={"kind": "chat", "request": {
            "model": model, "messages": [{"role": "user", "content": "hi"}]}}).json()["id"]
            for model in models]


def succeeded(url: str) -> int:
    """Jobs succeeded in the whole store, from /metrics."""
    found = re.search(r'^foreman_jobs\{status="succeeded"\} (\d+)',
                      requests.get(url + "/metrics", timeout=30).text, re.MULTILINE)
    return int(found.group(1)) if found else 0


def wait_done(url: str, count: int, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while succeeded(url) < count:
        if time.monotonic() > deadline:
            raise RuntimeError("the jobs did not finish in time")
        time.sleep(0.1)


def hosts_ready(url: str, count: int) -> bool:
    """Whether `count` hosts are up and each has said which models it has."""
    hosts = requests.get(url + "/queue", timeout=5).json()["hosts"]
    return len(hosts) == count and all(host["models"] for host in hosts)


def generations(sim: Child) -> int:
    return len(requests.get(sim.url + "/fake/stats", timeout=5).json()["started_at"])


def handoff(cluster: Cluster, count: int) -> dict[str, Any]:
    results = {}
    for name, db in (("sqlite", ""), ("postgresql", cluster.database())):
        sim = simulator(A)
        host = start_foreman(sim.url, db=db, jobs_extra="  host_name: bench\n")
        try:
            submit_all(host.url, [A] * count)
            wait_done(host.url, count)
            results[name] = gpu_stats(sim)
        finally:
            host.stop()
            sim.stop()
    return results


def drain(cluster: Cluster, count: int) -> dict[str, Any]:
    layouts = {"one host (A+B)": [(A, B)], "two hosts, disjoint (A | B)": [(A,), (B,)],
               "two hosts, overlapping (A+B | A+B)": [(A, B), (A, B)]}
    results = {}
    for layout, hosts in layouts.items():
        db = cluster.database()
        sims = [simulator(*models) for models in hosts]
        foremen = [start_foreman(sim.url, db=db, jobs_extra=f"  host_name: h{index}\n")
                   for index, sim in enumerate(sims)]
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not hosts_ready(foremen[0].url, len(foremen)):
                time.sleep(0.05)
            started = time.monotonic()
            submit_all(foremen[0].url, [A, B] * (count // 2))
            submitted = time.monotonic() - started
            wait_done(foremen[-1].url, count)
            results[layout] = {"drain_s": round(time.monotonic() - started, 1),
                               "submit_s": round(submitted, 1),
                               "generations": [generations(sim) for sim in sims]}
        finally:
            for host in foremen:
                host.stop()
            for sim in sims:
                sim.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--only", nargs="*", default=["store", "handoff", "drain"])
    args = parser.parse_args()
    cluster_run = start_cluster(durable=True)
    cluster = next(cluster_run)
    try:
        if "store" in args.only:
            print(json.dumps({"store": store_speed(cluster, args.jobs)}), flush=True)
        if "handoff" in args.only:
            print(json.dumps({"handoff": handoff(cluster, 200)}), flush=True)
        if "drain" in args.only:
            print(json.dumps({"drain": drain(cluster, args.jobs)}), flush=True)
    finally:
        cluster_run.close()


if __name__ == "__main__":
    main()
