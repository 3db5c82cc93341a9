"""The target client alone, against the fake Ollama: aborts, line framing, failure kinds."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3.util.connection

from foreman.errors import TargetLost, TargetUnreachable
from foreman.target import AbortSignal, TargetClient
from tests.fake_ollama import FakeOllama, Fault

CHAT = json.dumps({"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
def client(fake: FakeOllama) -> Iterator[TargetClient]:
    target = TargetClient(fake.url, connect_timeout=2, read_timeout=5)
    yield target
    target.close()


def test_an_abort_that_arrives_while_connecting_still_cuts_the_request(
        client: TargetClient, fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (issue 13.17): an abort between the connection being handed out and its
    socket existing was lost, and the cancelled job generated to completion."""
    fake.token_delay = 0.05
    signal = AbortSignal()
    connect = urllib3.util.connection.create_connection

    def abort_mid_connect(*args: Any, **kwargs: Any) -> socket.socket:
        sock = connect(*args, **kwargs)
        signal.abort()  # the cancel lands after connect() started, before it returned
        return sock

    monkeypatch.setattr(urllib3.util.connection, "create_connection", abort_mid_connect)
    with pytest.raises(TargetLost, match="request aborted"):
        upstream = client.open("POST", "/api/chat", CHAT, "application/json", signal)
        try:
            upstream.read()
        finally:
            upstream.close()
    assert fake.stats.completed == []


def test_refused_is_unreachable_and_a_cut_after_sending_is_lost(fake: FakeOllama) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    refused = TargetClient(f"http://127.0.0.1:{closed_port}", connect_timeout=2)
    with pytest.raises(TargetUnreachable, match="cannot reach ollama"):
        refused.open("GET", "/api/tags")
    refused.close()

    silent = TargetClient(fake.url, connect_timeout=2, read_timeout=0.2)
    fake.fault("/api/chat", Fault("hang", seconds=2))
    with pytest.raises(TargetLost) as lost:
        silent.open("POST", "/api/chat", CHAT, "application/json")
    assert lost.value.timed_out
    fake.fault("/api/chat", Fault("die_after", after=1))
    upstream = silent.open("POST", "/api/chat", CHAT, "application/json")
    with pytest.raises(TargetLost, match="lost mid-response"):
        list(upstream.lines())
    upstream.close()
    silent.close()


class _OneLine:
    """A target that answers with one NDJSON line of `size` bytes, in 1 KB writes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            request = b""
            while not request.endswith(b"\r\n\r\n{}"):  # all of it: unread input resets
                request += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            head, tail = b'{"response":"', b'","done":true}\n'
            payload = head + b"x" * (self.size - len(head) - len(tail)) + tail
            for start in range(0, len(payload), 1024):
                piece = payload[start:start + 1024]
                conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.sendall(b"0\r\n\r\n")


def test_a_long_line_is_assembled_in_linear_time() -> None:
    """Regression (issue 13.8): each piece of a long line was appended by concatenation,
    quadratic in the line's size (a 200 MB line took 204 s).  8 MB arrives in 8,192
    writes: quadratic assembly copies about 32 GB; linear, 16 MB."""
    size = 8 * 1024 * 1024
    target = _OneLine(size)
    client = TargetClient(target.url, read_timeout=30)
    upstream = client.open("POST", "/api/generate", b"{}", "application/json")
    started = time.monotonic()
    (line,) = list(upstream.lines())
    elapsed = time.monotonic() - started
    upstream.close()
    client.close()
    assert len(line) == size and line.endswith(b"\n") and json.loads(line)["done"]
    assert elapsed < 10, f"{elapsed:.1f} s to assemble {size} bytes"
