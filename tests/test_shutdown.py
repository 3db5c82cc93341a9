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
from tests.fake_ollama import FakeOllama
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


def test_sigterm_with_a_stream_in_flight_completes_it_and_exits_0(
        fake: FakeOllama, tmp_path: Path) -> None:
    fake.token_delay = 0.03
    fake.tokens = 30
    config = tmp_path / "c.yaml"
    config.write_text(f"listen: 127.0.0.1:0\ntarget:\n  url: {fake.url}\n"
                      f"jobs:\n  db: {tmp_path / 'j.db'}\n")
    proc = ForemanProcess("-c", str(config))
    try:
        url = proc.wait_serving()
        reader = ChunkReader(url, "POST", "/api/chat", CHAT)
        assert reader.next_chunk() is not None
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
        if proc.proc.poll() is None:
            proc.kill()
