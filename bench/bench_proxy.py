"""foreman's proxy path against a direct call to the same fake Ollama, in one run.

Measures: added latency of a non-streaming chat; streamed chats on a kept
connection against a new one each; added delay per streamed chunk
(each chunk carries its send time) and whether every chunk arrives as its own
HTTP chunk; chunks per second through one stream; embedding throughput with
16 concurrent clients; RSS with 200 clients waiting for the chat slot; and how
fast a departed client is noticed.  Run: `python -m bench.bench_proxy [--quick]`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import threading
import time
from typing import Any

import requests

from bench.common import (
    Child,
    KeepAlive,
    machine,
    proc_status,
    rss_mb,
    start_fake,
    start_foreman,
    summary,
)
from tests.http_raw import ChunkReader, send_only

MODEL = "llama3"


def chat_body(**options: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "options": options}


def nonstream_latency(direct: str, via: str, n: int) -> dict[str, Any]:
    """Sequential keep-alive requests, interleaved so drift hits both sides alike."""
    body = json.dumps({**chat_body(num_predict=1), "stream": False}).encode()
    clients = {direct: KeepAlive(direct), via: KeepAlive(via)}
    times: dict[str, list[float]] = {direct: [], via: []}
    for i in range(n + 20):
        for url in (direct, via) if i % 2 else (via, direct):
            started = time.perf_counter()
            status, _ = clients[url].post("/api/chat", body)
            elapsed = time.perf_counter() - started
            assert status == 200
            if i >= 20:  # warm-up discarded
                times[url].append(elapsed * 1000)
    d, v = summary(times[direct]), summary(times[via])
    return {"direct_ms": d, "foreman_ms": v,
            "added_ms": {k: v[k] - d[k] for k in ("p50", "p90", "p99", "mean")}}


def stream_chunks(url: str, tokens: int, delay: float) -> tuple[list[float], bool]:
    """Per-chunk delay from the target's send stamp to arrival here; and chunk == line."""
    body = json.dumps({**chat_body(num_predict=tokens, fake_token_delay=delay,
                                   fake_stamp=True)}).encode()
    reader = ChunkReader(url, "POST", "/api/chat", body)
    delays, separate = [], True
    try:
        while (chunk := reader.next_chunk()) is not None:
            arrived = time.monotonic()
            separate &= chunk.count(b"\n") == 1 and chunk.endswith(b"\n")
            message = json.loads(chunk)
            if not message["done"]:
                delays.append((arrived - float(message["message"]["content"])) * 1000)
    finally:
        reader.close()
    return delays, separate


def chunk_delay(direct: str, via: str, tokens: int) -> dict[str, Any]:
    d, d_sep = stream_chunks(direct, tokens, 0.002)
    v, v_sep = stream_chunks(via, tokens, 0.002)
    ds, vs = summary(d), summary(v)
    return {"direct_ms": ds, "foreman_ms": vs,
            "added_ms": {k: vs[k] - ds[k] for k in ("p50", "p90", "p99", "mean")},
            "every_chunk_separate": d_sep and v_sep, "chunks": len(v)}


def stream_rate(url: str, tokens: int) -> float:
    body = json.dumps(chat_body(num_predict=tokens)).encode()
    reader = ChunkReader(url, "POST", "/api/chat", body)
    try:
        first = reader.next_chunk()
        assert first is not None
        started, count = time.perf_counter(), 1
        while reader.next_chunk() is not None:
            count += 1
        return count / (time.perf_counter() - started)
    finally:
        reader.close()


def embed_rate(url: str, clients: int, seconds: float, delay: float) -> float:
    body = json.dumps({"model": "nomic-embed-text", "input": "some text", "options": {
        "fake_embed_delay": delay}}).encode()
    stop = time.monotonic() + seconds
    counts = [0] * clients

    def worker(i: int) -> None:
        client = KeepAlive(url)
        while time.monotonic() < stop:
            assert client.post("/api/embed", body)[0] == 200
            counts[i] += 1
        client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - started)


def wait_health(url: str, predicate: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        health = requests.get(url + "/healthz", timeout=5).json()
        if predicate(health) or time.monotonic() > deadline:
            return health
        time.sleep(0.001)


def rss_with_waiters(fake: Child, waiters: int) -> dict[str, Any]:
    foreman = start_foreman(fake.url, f"chat:\n  max_queue: {waiters}\n")
    try:
        idle = proc_status(foreman.pid)
        holder = send_only(foreman.url, "/api/chat",
                           json.dumps(chat_body(fake_first_token_delay=120)).encode())
        wait_health(foreman.url, lambda h: h["chat"]["in_flight"] == 1)
        socks = [send_only(foreman.url, "/api/chat", json.dumps(chat_body()).encode())
                 for _ in range(waiters)]
        health = wait_health(foreman.url, lambda h: h["chat"]["waiting"] == waiters)
        loaded = proc_status(foreman.pid)
        for sock in [holder, *socks]:
            sock.close()
        wait_health(foreman.url, lambda h: h["chat"]["waiting"] == 0)
        return {"waiting": health["chat"]["waiting"],
                "idle_rss_mb": rss_mb(idle),
                "rss_mb": rss_mb(loaded),
                "peak_rss_mb": int(loaded["VmHWM"].split()[0]) / 1024,
                "threads": int(loaded["Threads"])}
    finally:
        foreman.stop()


def fake_gone(fake: Child) -> list[float]:
    return requests.get(fake.url + "/fake/stats", timeout=5).json()["gone_at"]


def disconnect_latency(fake: Child, via: str, rounds: int) -> dict[str, Any]:
    waiting, streaming, prompt = [], [], []
    for _ in range(rounds):
        # A waiter hangs up: how long until it has left the line.
        holder = send_only(via, "/api/chat",
                           json.dumps(chat_body(fake_first_token_delay=30)).encode())
        wait_health(via, lambda h: h["chat"]["in_flight"] == 1)
        waiter = send_only(via, "/api/chat", json.dumps(chat_body()).encode())
        wait_health(via, lambda h: h["chat"]["waiting"] == 1)
        left = time.monotonic()
        waiter.close()
        wait_health(via, lambda h: h["chat"]["waiting"] == 0)
        waiting.append((time.monotonic() - left) * 1000)
        # The holder hangs up during prompt processing: how long until the target sees it.
        before = len(fake_gone(fake))
        left = time.monotonic()
        holder.close()
        while len(gone := fake_gone(fake)) == before:
            time.sleep(0.001)
        prompt.append((gone[-1] - left) * 1000)
        # A stream hangs up between tokens (no write would reveal it for 2 s).
        reader = ChunkReader(via, "POST", "/api/chat", json.dumps(chat_body(
            num_predict=50, fake_token_delay=2.0, fake_first_token_delay=0)).encode())
        before = len(fake_gone(fake))
        left = time.monotonic()
        reader.sock.shutdown(socket.SHUT_RDWR)
        reader.close()
        while len(gone := fake_gone(fake)) == before:
            time.sleep(0.001)
        streaming.append((gone[-1] - left) * 1000)
        wait_health(via, lambda h: h["chat"]["in_flight"] == 0)
    return {"waiter_left_line_ms": summary(waiting),
            "upstream_cut_during_prompt_ms": summary(prompt),
            "upstream_cut_during_stream_ms": summary(streaming)}


def streamed_chat_connections(url: str, n: int) -> dict[str, Any]:
    """Streamed one-token chats back to back through foreman: on one kept connection,
    against a new connection for each (what every client paid while waitress closed
    the connection after each stream); interleaved, so drift hits both alike."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "llama3", "messages": [], "options": {"num_predict": 1}})
    kept = http.client.HTTPConnection(host, int(port), timeout=30)
    times: dict[str, list[float]] = {"kept_ms": [], "new_connection_ms": []}
    for i in range(n + 20):
        for name in ("kept_ms", "new_connection_ms") if i % 2 else ("new_connection_ms",
                                                                      "kept_ms"):
            conn = kept if name == "kept_ms" else http.client.HTTPConnection(host, int(port),
                                                                             timeout=30)
            started = time.perf_counter()
            conn.request("POST", "/api/chat", body, {"Content-Type": "application/json"})
            conn.getresponse().read()
            if i >= 20:  # warm-up
                times[name].append((time.perf_counter() - started) * 1000)
            if conn is not kept:
                conn.close()
    kept.close()
    result: dict[str, Any] = {name: summary(values) for name, values in times.items()}
    result["ratio_p50"] = result["kept_ms"]["p50"] / result["new_connection_ms"]["p50"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    n, tokens, big, seconds, rounds = (
        (100, 200, 5000, 2, 3) if args.quick else (1000, 2000, 100_000, 10, 20))
    fake = start_fake()
    foreman = start_foreman(fake.url)
    results: dict[str, Any] = {"machine": machine()}
    try:
        results["nonstream_latency"] = nonstream_latency(fake.url, foreman.url, n)
        results["chunk_delay"] = chunk_delay(fake.url, foreman.url, tokens)
        results["streamed_chat_connections"] = streamed_chat_connections(foreman.url, n)
        direct_rate, via_rate = stream_rate(fake.url, big), stream_rate(foreman.url, big)
        results["stream_rate"] = {"direct_chunks_s": direct_rate, "foreman_chunks_s": via_rate,
                                  "ratio": via_rate / direct_rate, "chunks": big}
        d, v = (embed_rate(fake.url, 16, seconds, 0.02), embed_rate(foreman.url, 16, seconds, 0.02))
        results["embed_throughput"] = {"direct_rps": d, "foreman_rps": v, "ratio": v / d,
                                       "clients": 16, "embed_ms": 20}
        results["disconnect"] = disconnect_latency(fake, foreman.url, rounds)
    finally:
        foreman.stop()
    try:
        results["rss_200_waiters"] = rss_with_waiters(fake, 200)
    finally:
        fake.stop()
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
