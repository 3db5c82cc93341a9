"""How fast foreman notices a hung Ollama, and frees the chat slot for the next request.

The fake target runs in this process (so faults can be queued on it); foreman
runs in its own, with short clocks (first_token_timeout and stall_timeout,
given on the command line) so that a run takes seconds.  Times come from
`time.monotonic()`, one clock for every process on the machine.

- Before the first token: a chat whose target never answers, with a second
  chat waiting behind it.  Measured: from the target receiving the first chat
  to it receiving the second (the slot freed and the next waiter started).
  Goal: first_token_timeout + 1 s.
- Mid-stream: a chat whose target sends two tokens and then nothing, a second
  chat waiting.  Measured: from the last chunk the client received to the
  target receiving the second chat.  Goal: stall_timeout + 1 s.
- A hung `/api/tags`: from the first poll that hangs to `/healthz` saying
  degraded.  Goal: poll_timeout + one poll interval.

Run: `python -m bench.bench_watchdog [--rounds 5] [--clock 2] [--poll-timeout 1]`.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

import requests

from bench.common import machine, start_foreman, summary
from tests.fake_ollama import FakeOllama, Fault
from tests.http_raw import ChunkReader

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}


def chats_received(fake: FakeOllama, count: int, timeout: float = 60) -> list[float]:
    """When the target received each chat so far (at least `count` of them)."""
    assert fake.wait_for(lambda: len(fake.requests_to("/api/chat")) >= count, timeout)
    return [r.at for r in fake.requests_to("/api/chat")]


def before_first_token(fake: FakeOllama, url: str) -> float:
    seen = len(fake.requests_to("/api/chat"))
    fake.fault("/api/chat", Fault("hang", seconds=600))
    first = threading.Thread(target=lambda: requests.post(url + "/api/chat", json=CHAT,
                                                          timeout=600))
    first.start()
    hung_at = chats_received(fake, seen + 1)[seen]
    second = requests.post(url + "/api/chat", json={**CHAT, "stream": False}, timeout=600)
    assert second.status_code == 200, second.text
    next_at = chats_received(fake, seen + 2)[seen + 1]
    first.join(30)
    return next_at - hung_at


def mid_stream(fake: FakeOllama, url: str) -> float:
    seen = len(fake.requests_to("/api/chat"))
    fake.fault("/api/chat", Fault("pause_after", after=2, seconds=600))
    reader = ChunkReader(url, "POST", "/api/chat", json.dumps(CHAT).encode(), timeout=600)
    reader.next_chunk()
    reader.next_chunk()
    silent_from = time.monotonic()
    behind = threading.Thread(target=lambda: requests.post(
        url + "/api/chat", json={**CHAT, "stream": False}, timeout=600))
    behind.start()
    next_at = chats_received(fake, seen + 2)[seen + 1]
    behind.join(30)
    reader.chunks()  # the last error line, then the end
    reader.close()
    return next_at - silent_from


def hung_tags(fake: FakeOllama, url: str, interval: float) -> float:
    deadline = time.monotonic() + 30
    while requests.get(url + "/healthz", timeout=5).json()["degraded"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    polls = len(fake.requests_to("/api/tags"))
    for _ in range(1000):
        fake.fault("/api/tags", Fault("hang", seconds=600))
    assert fake.wait_for(lambda: len(fake.requests_to("/api/tags")) > polls, interval + 5)
    hung_from = fake.requests_to("/api/tags")[polls].at
    while not requests.get(url + "/healthz", timeout=5).json()["degraded"]:
        assert time.monotonic() < hung_from + 60
        time.sleep(0.005)
    degraded_at = time.monotonic()
    fake.faults["/api/tags"].clear()
    return degraded_at - hung_from


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clock", type=float, default=2.0,
                        help="first_token_timeout and stall_timeout, in seconds")
    parser.add_argument("--poll-timeout", type=float, default=1.0)
    parser.add_argument("--poll-interval", type=float, default=2.0)
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(), "clock_s": args.clock,
                               "poll_timeout_s": args.poll_timeout,
                               "poll_interval_s": args.poll_interval}
    fake = FakeOllama().start()
    foreman = start_foreman(
        fake.url,
        extra=(f"inventory:\n  poll_interval: {args.poll_interval}s\n"
               f"  poll_timeout: {args.poll_timeout}s\n"),
        target_extra=f"  first_token_timeout: {args.clock}s\n  stall_timeout: {args.clock}s\n")
    try:
        results["before_first_token_s"] = summary(
            [before_first_token(fake, foreman.url) for _ in range(args.rounds)])
        results["mid_stream_s"] = summary(
            [mid_stream(fake, foreman.url) for _ in range(args.rounds)])
        results["hung_tags_to_degraded_s"] = summary(
            [hung_tags(fake, foreman.url, args.poll_interval) for _ in range(args.rounds)])
    finally:
        foreman.stop()
        fake.stop()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
