"""Graceful shutdown: stop accepting at once, finish streams, refuse waiters, exit 0."""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path

import pytest
import requests

from foreman.daemon import Daemon
from tests.fake_ollama import FakeOllama, Fault
from tests.http_raw import ChunkReader
from tests.procs import ForemanProcess

CHAT = json.dumps({"model": "llama3", "messages": []}).encode()


def test_shutdown_finishes_the_stream_refuses_waiters_and_new_connections(
        foreman: Daemon, fake: FakeOllama) -> None:
    fake.token_delay = 0.03
    fake.tokens = 20
    reader = ChunkReader(foreman.url, "POST", "/api/chat", CHAT)
    assert reader.next_chunk() is not None
    waiter: list[requests.Response] = []
    waiting = threading.Thread(target=lambda: waiter.append(
        requests.post(foreman.url + "/api/chat", data=CHAT, timeout=10)))
    waiting.start()
    assert foreman.chat_lane.wait_for(lambda s: s.waiting == 1, 5)

    drained: list[bool] = []
    stopper = threading.Thread(target=lambda: drained.append(foreman.shutdown()))
    stopper.start()
    waiting.join(5)
    assert waiter[0].status_code == 503
    assert "shutting down" in waiter[0].json()["error"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", foreman.server.port), timeout=2).close()

    rest = reader.chunks()
    reader.close()
    assert json.loads(rest[-1])["done"] is True
    assert len(rest) == 20  # every remaining token, then the final line
    stopper.join(10)
    assert drained == [True]


def streaming_through_a_process(fake: FakeOllama, tmp_path: Path, proc: list[ForemanProcess],
                                extra: str = "") -> ChunkReader:
    """foreman as a child process with one chat streaming through it (first chunk read)."""
    config = tmp_path / "c.yaml"
    config.write_text(f"listen: 127.0.0.1:0\ntarget:\n  url: {fake.url}\n"
                      f"jobs:\n  db: {tmp_path / 'j.db'}\n{extra}")
    proc.append(ForemanProcess("-c", str(config)))
    reader = ChunkReader(proc[0].wait_serving(), "POST", "/api/chat", CHAT)
    assert reader.next_chunk() is not None
    return reader


def test_sigterm_with_a_stream_in_flight_completes_it_and_exits_0(
        fake: FakeOllama, tmp_path: Path) -> None:
    fake.token_delay = 0.03
    fake.tokens = 30
    started: list[ForemanProcess] = []
    try:
        reader = streaming_through_a_process(fake, tmp_path, started)
        proc = started[0]
        proc.proc.send_signal(signal.SIGTERM)
        proc.wait_for_line("draining")
        try:
            rest = reader.chunks()
        except ValueError:
            raise AssertionError("stream cut; log:\n" + "".join(proc.log)) from None
        reader.close()
        assert json.loads(rest[-1])["done"] is True and len(rest) == 30
        assert proc.proc.wait(15) == 0
    finally:
        for proc in started:
            if proc.proc.poll() is None:
                proc.kill()


def test_an_open_long_poll_answers_as_soon_as_the_drain_starts(
        foreman: Daemon, fake: FakeOllama) -> None:
    """Regression (issue 13.4): one open `?wait` held the drain for 10.3 s and it ended
    with drained=False."""
    fake.fault("/api/chat", Fault("hang", seconds=30))
    job = requests.post(foreman.url + "/jobs", timeout=5, json={
        "kind": "chat", "request": {"model": "llama3", "messages": []}}).json()
    polled: list[requests.Response] = []
    poller = threading.Thread(target=lambda: polled.append(requests.get(
        f"{foreman.url}/jobs/{job['id']}?wait=60", timeout=70)))
    poller.start()
    assert fake.wait_for(lambda: fake.requests_to("/api/chat") != [], 5)
    assert foreman.app.wait_active(lambda active: active == 1, 5)  # the long-poll is held
    drained = foreman.shutdown(drain_timeout=3)
    poller.join(5)
    assert drained is True
    assert polled[0].status_code == 200 and polled[0].json()["status"] == "running"


def test_a_second_signal_exits_at_once(fake: FakeOllama, tmp_path: Path) -> None:
    fake.token_delay = 0.5
    fake.tokens = 100
    started: list[ForemanProcess] = []
    try:
        reader = streaming_through_a_process(fake, tmp_path, started,
                                             "server:\n  drain_timeout: 60s\n")
        proc = started[0]
        proc.proc.send_signal(signal.SIGINT)
        proc.wait_for_line("draining")
        proc.proc.send_signal(signal.SIGINT)
        assert proc.proc.wait(5) == 130
        assert any("exiting without draining" in line for line in proc.log)
        reader.close()
    finally:
        for proc in started:
            if proc.proc.poll() is None:
                proc.kill()
