"""Clients that misbehave: oversized bodies, byte-at-a-time senders, thousands of idle
connections, header floods.  Memory stays bounded and other clients are still served."""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
import requests

from foreman.daemon import Daemon
from tests.http_raw import raw_request


def connect(daemon: Daemon, source: str = "") -> socket.socket:
    """A raw connection, from `source` (another loopback address) when given."""
    parts = urlsplit(daemon.url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10,
                                    source_address=(source, 0) if source else None)


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except OSError:
        pass  # a reset after the answer still leaves the answer
    return received


def json_error(answer: bytes) -> tuple[int, str]:
    """(status, error text) of a raw answer, which must be a JSON error."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer
    return int(head.split(b" ")[1]), json.loads(body)["error"]


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_oversized_bodies_get_a_json_413(make_foreman: Callable[..., Daemon]) -> None:
    daemon = make_foreman(server={"max_body": "64KB"})
    declared = raw_request(daemon.url, "POST", "/api/chat", body=b"{" + b" " * 70_000 + b"}")
    assert declared.status == 413 and declared.json() == {"error": "request body too large"}
    for path in ("/api/embed", "/jobs", "/api/show"):
        assert raw_request(daemon.url, "POST", path, body=b"x" * 70_000).status == 413
    expected = {"/api/chat": {"error": "request body too large"},
                "/v1/messages": {"type": "error", "error": {
                    "type": "api_error", "message": "request body too large"}}}
    for path, error in expected.items():
        sock = connect(daemon)  # chunked, no length announced
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\n".encode()
                     + b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n")
        for _ in range(20):
            sock.sendall(b"1000\r\n" + b" " * 4096 + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        assert answer.status == 413
        got = json.loads(answer.read())
        got.pop("request_id", None)
        assert got == error, path  # the shape of the route's family
        sock.close()
    assert requests.get(daemon.url + "/healthz", timeout=5).status_code == 200


def test_a_byte_at_a_time_sender_does_not_hold_up_others(foreman: Daemon) -> None:
    body = b'{"model":"llama3","stream":false,"messages":[]}'
    sock = connect(foreman)
    sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body))
    done = threading.Event()

    def trickle() -> None:
        for byte in body:
            sock.sendall(bytes([byte]))
            if done.wait(0.03):
                return

    sender = threading.Thread(target=trickle)
    sender.start()
    started = time.monotonic()
    answered = 0
    while sender.is_alive() and answered < 20:
        assert requests.get(foreman.url + "/healthz", timeout=2).status_code == 200
        answered += 1
    print(f"{answered} health checks answered in {time.monotonic() - started:.2f}s "
          "while one client sent its body byte by byte")
    sender.join(10)
    reply = sock.recv(65536)
    sock.close()
    assert answered >= 5
    assert reply.startswith(b"HTTP/1.1 200")


def test_two_thousand_idle_connections_leave_room_for_real_clients(
        make_foreman: Callable[..., Daemon]) -> None:
    # Ten addresses under the per-client cap, idle for less than the header timeout.
    foreman = make_foreman(server={"header_timeout": "2m"})
    before = rss_mb()
    idle = []
    try:
        for i in range(2000):
            idle.append(connect(foreman, source=f"127.0.0.{10 + i % 10}"))
        # Absorbing the flood takes waitress seconds: it accepts one connection per
        # turn of its loop, and each turn polls every open one (4.5-4.9 s measured
        # with two soaks loading this 2-core box, so the usual 5 s is too tight).
        started = time.monotonic()
        assert requests.get(foreman.url + "/healthz", timeout=30).status_code == 200
        print(f"first answer {time.monotonic() - started:.2f}s after 2000 idle connections")
        for _ in range(3):
            assert requests.get(foreman.url + "/healthz", timeout=5).status_code == 200
            assert requests.get(foreman.url + "/api/tags", timeout=5).status_code == 200
        grown = rss_mb() - before
        print(f"RSS of test process + in-process foreman grew {grown:.1f} MB for 2000 idle"
              " connections")
        assert grown < 100
    finally:
        for sock in idle:
            sock.close()
    assert requests.get(foreman.url + "/healthz", timeout=5).status_code == 200


def test_header_floods_are_refused_and_others_served(foreman: Daemon) -> None:
    many = {f"X-Flood-{i}": "y" * 100 for i in range(1000)}  # ~110 KB of headers: accepted
    accepted = raw_request(foreman.url, "GET", "/api/tags", many)
    assert accepted.status == 200
    sock = connect(foreman)  # ~1 MB of headers: waitress refuses before foreman sees it
    sock.sendall(b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\n")
    try:
        for i in range(10_000):
            sock.sendall(b"X-Flood-%d: %s\r\n" % (i, b"z" * 100))
    except OSError:
        pass  # the server may close on us mid-flood
    with contextlib.suppress(OSError):
        sock.sendall(b"\r\n")
    answer = read_until_closed(sock)
    sock.close()
    # Either the refusal arrived before the server closed, or the reset ate it.
    assert answer == b"" or json_error(answer)[0] in (400, 431)
    assert requests.get(foreman.url + "/healthz", timeout=5).status_code == 200


@pytest.mark.parametrize(("request_bytes", "status", "error"), [
    (b"NOT HTTP AT ALL\r\n\r\n", 400, "bad request: "),
    (b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nContent-Length: many\r\n\r\n", 400,
     "bad request: Content-Length is invalid"),
    (b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
     "not implemented: Transfer-Encoding requested is not supported."),
    (b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"y" * 300_000 + b"\r\n\r\n", 431,
     "request header fields too large: "),
], ids=["not-http", "bad-content-length", "gzip-transfer-coding", "huge-header"])
def test_requests_waitress_cannot_parse_get_a_json_error(
        foreman: Daemon, request_bytes: bytes, status: int, error: str) -> None:
    sock = connect(foreman)
    try:
        sock.sendall(request_bytes)
        answer = read_until_closed(sock)
    finally:
        sock.close()
    assert json_error(answer)[0] == status
    assert json_error(answer)[1].startswith(error)
    assert requests.get(foreman.url + "/healthz", timeout=5).status_code == 200


def test_a_client_too_slow_with_its_headers_is_cut_at_the_header_timeout(
        make_foreman: Callable[..., Daemon]) -> None:
    """Regression (issue 13.9): a byte a second kept a connection forever."""
    daemon = make_foreman(server={"header_timeout": "500ms"})
    silent = connect(daemon)
    slow = connect(daemon)
    started = time.monotonic()
    cut = False
    for byte in b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"y" * 100:
        if _closed_by_server(slow):
            cut = True
            break
        try:
            slow.sendall(bytes([byte]))
        except OSError:
            cut = True
            break
        time.sleep(0.05)  # the slow client's own pace, not a synchronisation
    assert cut, "the slow client was never cut"
    assert time.monotonic() - started < 5
    assert read_until_closed(silent) == b""  # a connection that never spoke is cut too
    silent.close()
    slow.close()
    assert requests.get(daemon.url + "/healthz", timeout=5).status_code == 200


def _closed_by_server(sock: socket.socket) -> bool:
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def test_one_address_cannot_take_every_connection(make_foreman: Callable[..., Daemon]) -> None:
    """Regression (issue 13.9): 10,300 connections sending a byte a second filled the
    connection limit and every other client timed out."""
    daemon = make_foreman(server={"max_connections_per_client": 20, "header_timeout": "1m"})
    held = [connect(daemon, source="127.0.0.2") for _ in range(20)]
    for sock in held:
        sock.sendall(b"G")  # begun, never finished
    refused = connect(daemon, source="127.0.0.2")
    status, error = json_error(read_until_closed(refused))
    refused.close()
    assert (status, error) == (503, "too many connections from this address")
    assert requests.get(daemon.url + "/healthz", timeout=5).status_code == 200  # 127.0.0.1
    assert daemon.server.door.open_from("127.0.0.2") == 20
    for sock in held:
        sock.close()
    assert raw_via(daemon, "127.0.0.2").startswith(b"HTTP/1.1 200")


def raw_via(daemon: Daemon, source: str) -> bytes:
    """GET /healthz from `source`, retried while the server still counts closed sockets."""
    deadline = time.monotonic() + 5
    while True:
        sock = connect(daemon, source=source)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = read_until_closed(sock)
        sock.close()
        if answer.startswith(b"HTTP/1.1 200") or time.monotonic() > deadline:
            return answer


def test_a_request_without_the_token_is_refused_before_its_body_is_read(
        make_foreman: Callable[..., Daemon]) -> None:
    """Regression (issue 13.7): waitress read (and spooled, up to 1 GB) a body whose
    request was then refused with 401.  Here 100 MB is announced and never sent."""
    daemon = make_foreman(token="t0k", server={"max_body": "64KB"})
    for headers, wanted in ((b"", 401), (b"Authorization: Bearer t0k\r\n", 413)):
        sock = connect(daemon)
        sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\n" + headers
                     + b"Content-Length: 104857600\r\n\r\n{\"model\": ")
        status, error = json_error(read_until_closed(sock))
        sock.close()
        assert status == wanted
    assert error == "request body too large"
    denied = raw_request(daemon.url, "POST", "/jobs", body=b"{}")
    assert denied.status == 401 and denied.headers["www-authenticate"] == "Bearer"
    assert denied.json() == {"error": "unauthorized: a valid bearer token is required"}
    assert requests.get(daemon.url + "/healthz", timeout=5).status_code == 200
