"""The job queue: durable submits per second over HTTP, the gap between one job
finishing and the next reaching the target, claim latency in a large database, and
reading back jobs whose results are real-sized embeddings.

Run: `python -m bench.bench_jobs [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from bench.common import KeepAlive, machine, proc_status, rss_mb, start_fake, start_foreman, summary
from foreman.store_sqlite import SqliteStore


def submit_rate(total: int, clients: int) -> dict[str, Any]:
    """Submits against a foreman whose target is down, so nothing runs: pure intake."""
    foreman = start_foreman("http://127.0.0.1:9", "")
    body = json.dumps({"kind": "embed", "request": {"model": "m", "input": "x"}}).encode()
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(count: int) -> None:
        client = KeepAlive(foreman.url)
        mine = []
        for _ in range(count):
            started = time.perf_counter()
            status, _ = client.post("/jobs", body)
            mine.append((time.perf_counter() - started) * 1000)
            assert status == 202
        with lock:
            latencies.extend(mine)

    try:
        threads = [threading.Thread(target=worker, args=(total // clients,))
                   for _ in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
    finally:
        foreman.stop()
    return {"submits": len(latencies), "clients": clients,
            "submits_per_s": len(latencies) / elapsed, "latency_ms": summary(latencies)}


def submit_at_depth(total: int) -> dict[str, Any]:
    """Chat jobs submitted one after another while none runs (target down): each 202
    carries the new job's place and estimated start behind everything queued."""
    foreman = start_foreman("http://127.0.0.1:9", "")
    body = json.dumps({"kind": "chat", "request": {
        "model": "m", "messages": [{"role": "user", "content": "x" * 2000}]}}).encode()
    client = KeepAlive(foreman.url)
    latencies = []
    try:
        for _ in range(total):
            started = time.perf_counter()
            status, _ = client.post("/jobs", body)
            latencies.append((time.perf_counter() - started) * 1000)
            assert status == 202
    finally:
        foreman.stop()
    step = max(1, total // 4)
    return {f"mean_ms_with_{i}_to_{i + step}_queued": statistics.mean(latencies[i:i + step])
            for i in range(0, total, step)}


def handoff_gap(jobs: int) -> dict[str, Any]:
    """Queue many one-token jobs at once; the fake records when each starts and ends."""
    fake = start_fake()
    foreman = start_foreman(fake.url, "")
    try:
        body = {"kind": "chat", "request": {"model": "llama3", "messages": [],
                                            "options": {"num_predict": 1}}}
        ids = [requests.post(foreman.url + "/jobs", json=body, timeout=10).json()["id"]
               for _ in range(jobs)]
        for job_id in ids:
            while requests.get(f"{foreman.url}/jobs/{job_id}?wait=30",
                               timeout=40).json()["status"] != "succeeded":
                pass
        stats = requests.get(fake.url + "/fake/stats", timeout=5).json()
    finally:
        foreman.stop()
        fake.stop()
    starts, ends = stats["started_at"], stats["finished_at"]
    # Skip the first few, which raced the submissions themselves.
    gaps = [(starts[i + 1] - ends[i]) * 1000 for i in range(5, len(ends) - 1)]
    return {"jobs": jobs, "gap_ms": summary(gaps)}


def claim_latency(finished: int, queued: int, claims: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp())
    path = str(folder / "big.db")
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    now = time.time()
    rows = [(f"f{i:08d}", "chat", "succeeded", i % 7, '{"model":"m"}', f"fp{i}", now - 100,
             now - 50, 1) for i in range(finished)]
    rows += [(f"q{i:08d}", "chat", "queued", i % 7, '{"model":"m"}', f"fq{i}", now, None, 0)
             for i in range(queued)]
    db.executemany("INSERT INTO jobs (id, kind, status, priority, request, fingerprint,"
                   " created_at, finished_at, attempts) VALUES (?,?,?,?,?,?,?,?,?)", rows)
    db.commit()
    db.close()
    store = SqliteStore(path)
    times = []
    for _ in range(claims):
        started = time.perf_counter()
        job = store.claim(("chat", "generate"))
        times.append((time.perf_counter() - started) * 1000)
        assert job is not None
        store.finish(job, "succeeded", '{"ok": true}')
    store.close()
    return {"finished_rows": finished, "queued_rows": queued, "claim_ms": summary(times)}


def big_results(jobs: int, dims: int, reads: int) -> dict[str, Any]:
    """Embedding jobs of real size (8 inputs of `dims` numbers each), read back one at
    a time and as one page of all of them: time per read, and foreman's RSS."""
    fake = start_fake()
    foreman = start_foreman(fake.url, "")
    session = requests.Session()
    try:
        ids = [session.post(foreman.url + "/jobs", timeout=10, json={"kind": "embed", "request": {
            "model": "nomic-embed-text", "input": [f"text {i} {k}" for k in range(8)],
            "options": {"fake_dims": dims}}}).json()["id"] for i in range(jobs)]
        for job_id in ids:
            assert session.get(f"{foreman.url}/jobs/{job_id}?wait=30",
                               timeout=40).json()["status"] == "succeeded"
        rss_before = rss_mb(proc_status(foreman.pid))
        timings: dict[str, list[float]] = {"one": [], "page": []}
        page = b""
        for i in range(reads):
            for name, path in (("one", f"/jobs/{ids[i % jobs]}"), ("page", f"/jobs?limit={jobs}")):
                started = time.perf_counter()
                page = session.get(foreman.url + path, timeout=60).content
                timings[name].append((time.perf_counter() - started) * 1000)
        rss_after = rss_mb(proc_status(foreman.pid))
    finally:
        foreman.stop()
        fake.stop()
    return {"jobs": jobs, "numbers_per_job": 8 * dims, "page_mb": round(len(page) / 1e6, 2),
            "one_job_ms": summary(timings["one"]), "page_ms": summary(timings["page"]),
            "rss_mb_before_reads": round(rss_before, 1), "rss_mb_after_reads": round(rss_after, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    scale = (400, 40, 10_000, 1_000, 200) if args.quick else (4000, 200, 100_000, 10_000, 1000)
    results = {
        "machine": machine(),
        "submit": submit_rate(scale[0], 4),
        "submit_at_depth": submit_at_depth(scale[0]),
        "handoff": handoff_gap(scale[1]),
        "claim": claim_latency(scale[2], scale[3], scale[4]),
        "big_results": big_results(50, 1536, scale[1] // 2),
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
