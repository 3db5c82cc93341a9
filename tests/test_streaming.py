"""Relaying: chunk per line, bytes untouched, errors passed through or appended as Ollama does."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable

import pytest
import requests

from foreman.daemon import Daemon
from tests.fake_ollama import FakeOllama, Fault
from tests.http_raw import ChunkReader, raw_request


def test_each_line_is_its_own_chunk_unchanged(foreman: Daemon, fake: FakeOllama) -> None:
    fake.token_delay = 0.01
    body = b'{"model":"llama3","messages":[{"role":"user","content":"hi"}]}'
    reader = ChunkReader(foreman.url, "POST", "/api/chat", body)
    try:
        assert reader.status == 200
        assert reader.headers["content-type"] == "application/x-ndjson"
        assert reader.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in reader.headers and "server" not in reader.headers
        assert "x-foreman-queue-wait-ms" in reader.headers
        chunks = reader.chunks()
    finally:
        reader.close()
    assert len(chunks) == 6
    for chunk in chunks:
        assert chunk.endswith(b"\n") and chunk.count(b"\n") == 1
        json.loads(chunk)
    assert json.loads(chunks[-1])["done"] is True
    # Byte-for-byte what the fake sent: compact separators survive, nothing re-encoded.
    assert chunks[0].startswith(b'{"model":"llama3","created_at":')


def test_sse_streams_pass_through(foreman: Daemon) -> None:
    body = b'{"model":"llama3","stream":true,"messages":[]}'
    reader = ChunkReader(foreman.url, "POST", "/v1/chat/completions", body)
    try:
        assert reader.headers["content-type"] == "text/event-stream"
        data = b"".join(reader.chunks())
    finally:
        reader.close()
    assert data.endswith(b"data: [DONE]\n\n") and data.count(b"\n\n") == 7


@pytest.mark.parametrize(("body", "error"), [
    (b"", "missing request body"),
    (b"   ", "missing request body"),
    (b"{not json", "invalid JSON in request body"),
    (b"[1,2]", "request body must be a JSON object"),
    (b'{"messages":[]}', "model is required"),
    (b'{"model":""}', "model is required"),
    (b'{"model":42}', "model must be a string"),
])
@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/api/embed"])
def test_bad_bodies_are_refused_before_the_target(foreman: Daemon, fake: FakeOllama, path: str,
                                                  body: bytes, error: str) -> None:
    response = raw_request(foreman.url, "POST", path, {"Content-Type": "application/json"}, body)
    assert response.status == 400
    assert response.json()["error"].startswith(error)
    assert fake.requests_to(path) == []


def test_v1_validation_errors_use_the_openai_shape(foreman: Daemon) -> None:
    response = raw_request(foreman.url, "POST", "/v1/chat/completions", body=b"{}")
    assert response.status == 400
    assert response.json() == {"error": {"message": "model is required",
                                         "type": "invalid_request_error", "param": None,
                                         "code": None}}


def test_target_error_status_and_body_pass_through(foreman: Daemon, fake: FakeOllama) -> None:
    fake.fault("/api/chat", Fault("status", status=500,
                                  body=b'{"error":"llama runner process has terminated"}'))
    response = requests.post(foreman.url + "/api/chat", json={"model": "llama3"}, timeout=5)
    assert response.status_code == 500
    assert response.content == b'{"error":"llama runner process has terminated"}'
    assert "X-Foreman-Queue-Wait-Ms" in response.headers
    # The slot was released: the next chat runs.
    assert requests.post(foreman.url + "/api/chat", json={"model": "llama3", "stream": False},
                         timeout=5).status_code == 200


def test_target_unreachable_is_a_502(make_foreman: Callable[..., Daemon],
                                     fake: FakeOllama) -> None:
    daemon = make_foreman()
    fake.stop()
    response = requests.post(daemon.url + "/api/chat", json={"model": "llama3"}, timeout=5)
    assert response.status_code == 502
    assert response.json()["error"].startswith("ollama is unreachable: cannot reach ollama at")
    assert daemon.chat_lane.in_flight == 0


def test_target_dying_mid_stream_ends_with_an_error_line(foreman: Daemon,
                                                         fake: FakeOllama) -> None:
    fake.fault("/api/generate", Fault("die_after", after=2))
    response = requests.post(foreman.url + "/api/generate", json={"model": "llama3"},
                             stream=True, timeout=5)
    lines = list(response.iter_lines())
    assert response.status_code == 200
    assert [json.loads(x)["response"] for x in lines[:2]] == ["tok0 ", "tok1 "]
    assert len(lines) == 3
    assert "connection to ollama lost" in json.loads(lines[2])["error"]
    assert foreman.chat_lane.wait_for(lambda s: s.in_flight == 0, 2)


def test_ollama_error_line_mid_stream_is_relayed(foreman: Daemon, fake: FakeOllama) -> None:
    fake.fault("/api/chat", Fault("error_after", after=1))
    response = requests.post(foreman.url + "/api/chat", json={"model": "llama3"}, stream=True,
                             timeout=5)
    lines = list(response.iter_lines())
    assert json.loads(lines[-1]) == {"error": "an error was encountered while running the model"}


def test_passthrough_routes(foreman: Daemon, fake: FakeOllama) -> None:
    root = requests.get(foreman.url + "/", timeout=5)
    assert root.status_code == 200 and root.text == "Ollama is running"
    head = requests.head(foreman.url + "/", timeout=5)
    assert head.status_code == 200 and head.headers["Content-Length"] == "17"
    version = requests.get(foreman.url + "/api/version", timeout=5)
    assert version.json() == {"version": fake.version}
    missing = requests.post(foreman.url + "/api/show", json={"model": "ghost"}, timeout=5)
    assert missing.status_code == 404 and missing.json() == {"error": "model 'ghost' not found"}


def test_admin_routes_are_refused_unless_allowed(foreman: Daemon, fake: FakeOllama) -> None:
    for method, path in (("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/api/create"),
                         ("POST", "/api/copy"), ("DELETE", "/api/delete"),
                         ("POST", "/api/blobs/sha256:00")):
        response = raw_request(foreman.url, method, path, body=b'{"model":"x"}')
        assert response.status == 403, path
        assert "target.allow_admin" in response.json()["error"]
    assert not any(r.path.startswith(("/api/pull", "/api/delete")) for r in fake.received)


def test_admin_pull_passes_through_and_refreshes_the_inventory(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    daemon = make_foreman(target={"allow_admin": True}, inventory={"poll_interval": "1h"})
    pulled = requests.post(daemon.url + "/api/pull", json={"model": "gemma3:1b"}, stream=True,
                           timeout=5)
    statuses = [json.loads(x)["status"] for x in pulled.iter_lines()]
    assert statuses[-1] == "success"
    assert daemon.inventory.wait_for(lambda s: "gemma3:1b" in str(s.tags_body), 2)
    deleted = requests.delete(daemon.url + "/api/delete", json={"model": "gemma3:1b"}, timeout=5)
    assert deleted.status_code == 200
    blob = requests.post(daemon.url + "/api/blobs/sha256:abcd", data=b"\0" * 3_000_000, timeout=5)
    assert blob.status_code == 201
    assert fake.requests_to("/api/blobs/sha256:abcd")[0].body == b"\0" * 3_000_000


def test_embed_is_retried_once_on_a_target_500(foreman: Daemon, fake: FakeOllama) -> None:
    fake.fault("/api/embed", Fault("status", status=500, body=b'{"error":"flaky"}'))
    response = requests.post(foreman.url + "/api/embed", json={"model": "llama3", "input": "x"},
                             timeout=5)
    assert response.status_code == 200 and len(response.json()["embeddings"]) == 1
    assert len(fake.requests_to("/api/embed")) == 2
    fake.fault("/api/embed", Fault("status", status=500, body=b'{"error":"broken"}'))
    fake.fault("/api/embed", Fault("status", status=500, body=b'{"error":"broken"}'))
    twice = requests.post(foreman.url + "/api/embed", json={"model": "llama3", "input": "x"},
                          timeout=5)
    assert twice.status_code == 500 and twice.json() == {"error": "broken"}


def test_blob_uploads_are_not_held_to_max_body_but_everything_else_is(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    """Regression (issue 13.7): blob uploads over waitress's old 1 GB cap could not pass at
    all.  They alone are exempt from server.max_body (here 64 KB)."""
    daemon = make_foreman(target={"allow_admin": True}, server={"max_body": "64KB"})
    blob = b"\1" * 3_000_000
    sent = requests.post(daemon.url + "/api/blobs/sha256:ef01", data=blob, timeout=10)
    assert sent.status_code == 201
    assert fake.requests_to("/api/blobs/sha256:ef01")[0].body == blob
    # The limit for everything else still holds, before the body is read.
    refused = requests.post(daemon.url + "/api/create", data=blob, timeout=10)
    assert refused.status_code == 413
    assert fake.requests_to("/api/create") == []


def test_a_waiting_request_sends_its_spooled_body_unchanged(
        foreman: Daemon, fake: FakeOllama) -> None:
    """A body over 1 MB waits on disk, not in memory, and reaches the target byte for
    byte once its turn comes (bench/bench_limits.py measures the memory)."""
    fake.token_delay = 0.05
    holder = ChunkReader(foreman.url, "POST", "/api/chat", json.dumps({
        "model": "llama3", "messages": []}).encode())
    assert holder.next_chunk() is not None
    body = json.dumps({"model": "llama3", "stream": False, "messages": [
        {"role": "user", "content": "é" * 1_500_000}]}, ensure_ascii=False).encode()
    answer = requests.post(foreman.url + "/api/chat", data=body, timeout=30)
    holder.close()
    assert answer.status_code == 200
    assert [r.body for r in fake.requests_to("/api/chat")][-1] == body


def test_a_stream_keeps_its_connection_for_the_next_request(foreman: Daemon) -> None:
    """Before, waitress closed the connection after every streamed answer (issue 15),
    so each streaming chat paid for a new TCP connection."""
    host, port = foreman.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    body = json.dumps({"model": "llama3", "messages": []})
    sockets = []
    for _ in range(3):
        conn.request("POST", "/api/chat", body, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        assert answer.getheader("Transfer-Encoding") == "chunked"
        assert answer.getheader("Connection") is None
        assert json.loads(answer.read().splitlines()[-1])["done"] is True
        sockets.append(conn.sock)
    assert sockets[0] is not None and sockets.count(sockets[0]) == 3  # one connection
    conn.request("POST", "/api/chat", body, {"Connection": "close"})
    answer = conn.getresponse()
    answer.read()
    assert answer.getheader("Connection") == "close"  # asked to close: closed
    conn.close()
