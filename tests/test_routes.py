"""Ollama's whole route surface through foreman: each route in its lane, unknown paths
forwarded, and every answer foreman makes itself in the shape of the route's family."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from foreman.api import ROUTES
from foreman.daemon import Daemon
from tests.conftest import LogStream
from tests.fake_ollama import FakeOllama, Fault
from tests.http_raw import raw_request

OLLAMA_ROUTES = Path(__file__).parent / "data" / "ollama_routes.txt"
USER = [{"role": "user", "content": "hi"}]


def ollama_table() -> dict[tuple[str, str], str]:
    table = {}
    for line in OLLAMA_ROUTES.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            method, path, lane = re.split(r"\s{2,}", line.strip())
            table[(method, re.sub(r":(\w+)", "{}", path))] = lane
    return table


def test_the_route_table_is_ollamas_with_a_lane_for_each() -> None:
    ours = {(r.method, re.sub(r"<(?:\w+:)?\w+>", "{}", r.path)): r.lane for r in ROUTES}
    assert ours == ollama_table()


def test_every_route_in_the_table_is_served_by_its_handler(foreman: Daemon) -> None:
    """Held against the daemon's real map: no rule shadows another, nothing falls through
    to forwarding."""
    urls = foreman.app._map.bind("localhost")
    for route in ROUTES:
        path = re.sub(r"<(?:\w+:)?\w+>", "sample", route.path)
        endpoint, _ = urls.match(path, route.method)
        assert endpoint.__name__ == route.handler, (route.method, route.path)


# -- lanes -----------------------------------------------------------------------------

SLOT_REQUESTS: dict[str, dict[str, Any]] = {
    "/api/chat": {"json": {"model": "llama3", "messages": USER, "stream": False}},
    "/api/generate": {"json": {"model": "llama3", "prompt": "hi", "stream": False}},
    "/v1/chat/completions": {"json": {"model": "llama3", "messages": USER}},
    "/v1/completions": {"json": {"model": "llama3", "prompt": "hi"}},
    "/v1/responses": {"json": {"model": "llama3", "input": "hi"}},
    "/v1/messages": {"json": {"model": "llama3", "max_tokens": 9, "messages": USER}},
    "/v1/audio/transcriptions": {"files": {"file": ("a.wav", b"RIFF0000WAVE")},
                                 "data": {"model": "llama3"}},
}


@contextmanager
def slot_held(daemon: Daemon, fake: FakeOllama) -> Iterator[None]:
    """The chat slot busy with a generation the fake holds until the block ends."""
    fake.fault("/api/generate", Fault("hang", seconds=20))
    holder = threading.Thread(target=lambda: requests.post(
        daemon.url + "/api/generate", json={"model": "llama3", "prompt": "x"}, timeout=30))
    holder.start()
    assert fake.wait_for(lambda: len(fake.requests_to("/api/generate")) == 1)
    try:
        yield
    finally:
        fake.release.set()
        holder.join(10)


def in_thread(call: Callable[[], requests.Response]) -> tuple[threading.Thread,
                                                               list[requests.Response]]:
    answers: list[requests.Response] = []
    thread = threading.Thread(target=lambda: answers.append(call()))
    thread.start()
    return thread, answers


@pytest.mark.parametrize("path", list(SLOT_REQUESTS))
def test_each_generation_route_waits_for_the_chat_slot(foreman: Daemon, fake: FakeOllama,
                                                       path: str) -> None:
    with slot_held(foreman, fake):
        before = len(fake.requests_to(path))  # the holder's, for /api/generate
        thread, answers = in_thread(lambda: requests.post(foreman.url + path, timeout=30,
                                                          **SLOT_REQUESTS[path]))
        assert foreman.chat_lane.wait_for(lambda s: s.waiting == 1, 5)
        # nothing reached the GPU while the slot was busy
        assert len(fake.requests_to(path)) == before
    thread.join(10)
    assert answers[0].status_code == 200, answers[0].text
    assert len(fake.requests_to(path)) == before + 1


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/api/embed", {"model": "nomic-embed-text", "input": "x"}),
    ("POST", "/v1/embeddings", {"model": "nomic-embed-text", "input": "x"}),
    ("POST", "/api/experimental/web_search", {"query": "ollama"}),
    ("POST", "/api/experimental/web_fetch", {"url": "https://ollama.com"}),
    ("GET", "/api/status", None),
    ("GET", "/api/experimental/model-recommendations", None),
    ("GET", "/api/version", None),
    ("POST", "/api/show", {"model": "llama3"}),
    ("GET", "/api/tags", None),
    ("GET", "/v1/models/llama3", None),
    ("GET", "/api/some-future-read", None),
])
def test_routes_beside_the_slot_answer_while_it_is_busy(
        foreman: Daemon, fake: FakeOllama, method: str, path: str, body: Any) -> None:
    with slot_held(foreman, fake):
        answer = requests.request(method, foreman.url + path, json=body, timeout=5)
        assert foreman.chat_lane.in_flight == 1  # still held: this did not wait for it
    expected = 404 if path == "/api/some-future-read" else 200  # the target's own answer
    assert answer.status_code == expected, answer.text


def test_a_path_foreman_does_not_know_is_forwarded_and_may_run_the_gpu(
        foreman: Daemon, fake: FakeOllama, log_text: LogStream) -> None:
    with slot_held(foreman, fake):
        thread, answers = in_thread(lambda: requests.put(
            foreman.url + "/api/next-month?x=1&y=%2F", data=b"\x00raw bytes", timeout=30,
            headers={"Content-Type": "application/octet-stream"}))
        assert foreman.chat_lane.wait_for(lambda s: s.waiting == 1, 5)
        assert not fake.requests_to("/api/next-month")
    thread.join(10)
    assert answers[0].status_code == 404 and answers[0].text == "404 page not found"
    [sent] = fake.requests_to("/api/next-month")
    assert sent.method == "PUT" and sent.body == b"\x00raw bytes"
    assert sent.headers["content-type"] == "application/octet-stream"
    assert fake.raw_targets[-1] == "/api/next-month?x=1&y=%2F"
    requests.put(foreman.url + "/api/next-month", data=b"again", timeout=10)
    logged = [line for line in log_text.getvalue().splitlines() if "does not know" in line]
    assert len(logged) == 1  # once per route, not per request
    assert "forwarding PUT /api/next-month, a route foreman does not know" in logged[0]


def test_the_forwarded_query_string_arrives_as_written(foreman: Daemon,
                                                       fake: FakeOllama) -> None:
    assert raw_request(foreman.url, "GET", "/api/next?a=1&b=%2F%20").status == 404
    assert fake.raw_targets[-1] == "/api/next?a=1&b=%2F%20"


def test_foremans_own_routes_and_405s_are_not_forwarded(foreman: Daemon,
                                                        fake: FakeOllama) -> None:
    assert requests.get(foreman.url + "/queue", timeout=5).status_code == 200
    wrong = requests.get(foreman.url + "/api/chat", timeout=5)
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "POST"
    assert not fake.requests_to("/queue") and not fake.requests_to("/api/chat")


def test_forwarded_routes_need_the_token(make_foreman: Callable[..., Daemon],
                                         fake: FakeOllama) -> None:
    daemon = make_foreman(token="t0k")
    assert requests.get(daemon.url + "/api/next", timeout=5).status_code == 401
    assert requests.post(daemon.url + "/api/next", json={}, timeout=5).status_code == 401
    assert not fake.requests_to("/api/next")
    answer = requests.get(daemon.url + "/api/next", headers={"x-api-key": "t0k"}, timeout=5)
    assert answer.status_code == 404 and answer.text == "404 page not found"
    [sent] = fake.requests_to("/api/next")
    assert "x-api-key" not in sent.headers and "authorization" not in sent.headers


@pytest.mark.parametrize("method,path", [
    ("POST", "/api/me"), ("POST", "/api/signout"), ("DELETE", "/api/user/keys/abc"),
])
def test_account_routes_are_admin_routes(make_foreman: Callable[..., Daemon], tmp_path: Path,
                                         fake: FakeOllama, method: str, path: str) -> None:
    closed = make_foreman()
    refused = requests.request(method, closed.url + path, timeout=5)
    assert refused.status_code == 403 and "allow_admin" in refused.json()["error"]
    assert not fake.requests_to(path)
    opened = make_foreman(target={"allow_admin": True}, jobs={"db": str(tmp_path / "2.db")})
    assert requests.request(method, opened.url + path, timeout=5).json() == {
        "route": path, "method": method}


def test_a_compressed_body_goes_through_unread(foreman: Daemon, fake: FakeOllama) -> None:
    """Codex sends zstd bodies to /v1/responses; foreman cannot read them, so it passes
    them on with their encoding for Ollama to judge."""
    body = b"(\xb5/\xfd not really zstd"
    answer = requests.post(foreman.url + "/v1/responses", data=body, timeout=10, headers={
        "Content-Type": "application/json", "Content-Encoding": "zstd"})
    [sent] = fake.requests_to("/v1/responses")
    assert sent.body == body and sent.headers["content-encoding"] == "zstd"
    assert answer.status_code == 400  # the fake, like Ollama without zstd, cannot parse it


# -- each family's own shapes ----------------------------------------------------------

def test_errors_foreman_makes_have_the_shape_of_the_routes_family(
        make_foreman: Callable[..., Daemon]) -> None:
    daemon = make_foreman(token="t0k", server={"max_body": "1KB"})
    cases = {
        "/api/chat": {"error": "unauthorized: a valid bearer token is required"},
        "/v1/chat/completions": {"error": {
            "message": "unauthorized: a valid bearer token is required", "type": "api_error",
            "param": None, "code": None}},
        "/v1/responses": {"error": {
            "message": "unauthorized: a valid bearer token is required", "type": "api_error",
            "param": None, "code": None}},
    }
    for path, expected in cases.items():
        answer = requests.post(daemon.url + path, json={}, timeout=5)
        assert answer.status_code == 401 and answer.json() == expected, path
    anthropic = requests.post(daemon.url + "/v1/messages", json={}, timeout=5).json()
    assert anthropic["type"] == "error" and anthropic["request_id"].startswith("req_")
    assert anthropic["error"] == {"type": "authentication_error",
                                  "message": "unauthorized: a valid bearer token is required"}
    big = raw_request(daemon.url, "POST", "/v1/messages", {"x-api-key": "t0k"}, b"{" * 2048)
    assert big.status == 413 and big.json()["error"]["type"] == "api_error"


def test_anthropic_validation_texts_are_ollamas(foreman: Daemon, fake: FakeOllama) -> None:
    def ask(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        answer = requests.post(foreman.url + "/v1/messages", json=body, timeout=5)
        return answer.status_code, answer.json()["error"]

    invalid = "invalid_request_error"
    assert ask({"max_tokens": 5, "messages": USER}) == (
        400, {"type": invalid, "message": "model is required"})
    assert ask({"model": "llama3", "messages": USER}) == (
        400, {"type": invalid, "message": "max_tokens is required and must be positive"})
    assert ask({"model": "llama3", "max_tokens": 0, "messages": USER})[1]["message"] == \
        "max_tokens is required and must be positive"
    assert ask({"model": "llama3", "max_tokens": 5}) == (
        400, {"type": invalid, "message": "messages is required"})
    assert ask({"model": "ghost", "max_tokens": 5, "messages": USER}) == (
        404, {"type": "not_found_error", "message": "model 'ghost' not found"})
    assert not fake.requests_to("/v1/messages")


def test_transcription_forms_are_checked_as_ollama_checks_them(foreman: Daemon,
                                                               fake: FakeOllama) -> None:
    def ask(**form: Any) -> tuple[int, str]:
        answer = requests.post(foreman.url + "/v1/audio/transcriptions", timeout=5, **form)
        return answer.status_code, answer.json()["error"]["message"]

    assert ask(files={"file": ("a.wav", b"x")}) == (400, "model is required")
    assert ask(files={"model": (None, "llama3")}) == (
        400, "file is required: http: no such file")
    assert ask(files={"file": ("a.wav", b"")}, data={"model": "llama3"}) == (
        400, "audio file is empty")
    assert ask(json={"model": "llama3"})[1].startswith("failed to parse multipart form")
    assert ask(files={"file": ("a.wav", b"x")}, data={"model": "ghost"}) == (
        404, "model 'ghost' not found")
    assert not fake.requests_to("/v1/audio/transcriptions")
    audio = bytes(range(256)) * 4096  # 1 MiB: past the size kept in memory
    answer = requests.post(foreman.url + "/v1/audio/transcriptions", timeout=10,
                           files={"file": ("a.wav", audio)}, data={"model": "llama3"})
    assert answer.json() == {"text": f"heard {len(audio)} bytes"}
    [sent] = fake.requests_to("/v1/audio/transcriptions")
    assert sent.headers["content-type"].startswith("multipart/form-data; boundary=")


@pytest.mark.parametrize("path,body,last_event", [
    ("/v1/messages", {"model": "llama3", "max_tokens": 9, "messages": USER, "stream": True},
     "error"),
    ("/v1/responses", {"model": "llama3", "input": "hi", "stream": True}, "error"),
])
def test_a_stream_the_target_breaks_ends_with_the_familys_error_event(
        foreman: Daemon, fake: FakeOllama, path: str, body: dict[str, Any],
        last_event: str) -> None:
    fake.fault(path, Fault("die_after", after=4))
    answer = requests.post(foreman.url + path, json=body, timeout=10)
    events = [e for e in answer.text.split("\n\n") if e]
    assert len(events) == 5  # four relayed whole, then foreman's own
    name, data = events[-1].split("\n")
    assert name == f"event: {last_event}"
    error = json.loads(data.removeprefix("data: "))
    assert error["type"] == "error"
    if path == "/v1/messages":
        assert error["error"]["type"] == "api_error"
        assert error["error"]["message"].startswith("ollama failed mid-request")
    else:
        assert error["sequence_number"] == 4
        assert error["message"].startswith("ollama failed mid-request")


@pytest.mark.parametrize("path,body", [
    ("/v1/messages", {"model": "llama3", "max_tokens": 9, "messages": USER, "stream": True}),
    ("/v1/responses", {"model": "llama3", "input": "hi", "stream": True}),
])
def test_server_sent_events_are_relayed_as_they_arrive_bytes_untouched(
        foreman: Daemon, fake: FakeOllama, path: str, body: dict[str, Any]) -> None:
    fake.token_delay = 0.05
    with requests.post(foreman.url + path, json=body, stream=True, timeout=10) as answer:
        chunks = answer.iter_content(None)
        first = next(chunks)
        assert first.startswith(b"event: ") and first.endswith(b"\n\n")
        assert fake.stats.generations_active == 1  # the first event came mid-generation
        rest = b"".join(chunks)
    direct = requests.post(fake.url + path, json=body, timeout=10).content
    assert first + rest == direct
