"""foreman's own HTTP surface: auth, its JSON errors, request ids and the access log."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import pytest
import requests
from werkzeug.routing import Rule

from foreman.app import ForemanApp
from foreman.daemon import Daemon
from foreman.guard import Guard
from foreman.metrics import Metrics
from foreman.server import Server
from tests.conftest import LogStream
from tests.fake_ollama import FakeOllama
from tests.http_raw import ChunkReader, raw_request, send_only

TOKEN = "s3cret-token-value"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# (method, path, body) for every route foreman serves, /healthz aside.
ROUTES = [
    ("GET", "/", None), ("GET", "/api/version", None), ("GET", "/api/tags", None),
    ("GET", "/api/ps", None), ("GET", "/v1/models", None), ("GET", "/v1/models/llama3", None),
    ("POST", "/api/chat", b'{"model":"llama3","stream":false}'),
    ("POST", "/api/generate", b'{"model":"llama3","stream":false}'),
    ("POST", "/v1/chat/completions", b'{"model":"llama3","messages":[]}'),
    ("POST", "/v1/completions", b'{"model":"llama3","prompt":"hi"}'),
    ("POST", "/api/embed", b'{"model":"llama3","input":"x"}'),
    ("POST", "/api/embeddings", b'{"model":"llama3","prompt":"x"}'),
    ("POST", "/v1/embeddings", b'{"model":"llama3","input":"x"}'),
    ("POST", "/api/show", b'{"model":"llama3"}'),
    ("POST", "/api/pull", b'{"model":"llama3"}'), ("DELETE", "/api/delete", b'{"model":"x"}'),
    ("POST", "/api/blobs/sha256:abc", b"blob"), ("GET", "/no/such/route", None),
]


@pytest.fixture
def authed(make_foreman: Callable[..., Daemon], fake: FakeOllama) -> Daemon:
    fake.token = "target-secret"
    return make_foreman(token=TOKEN, target={"token": "target-secret"})


def test_health_is_public_and_ok(authed: Daemon) -> None:
    response = requests.get(authed.url + "/healthz", timeout=5)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_other_route_needs_the_token(authed: Daemon, method: str, path: str,
                                           body: bytes | None) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer "},
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN},
                    {"Authorization": f"Bearer {TOKEN[:-1]}"}):
        response = raw_request(authed.url, method, path, headers, body)
        assert response.status == 401, (headers, path)
        assert response.headers["www-authenticate"] == "Bearer"
        assert "unauthorized" in str(response.json()["error"])
    allowed = raw_request(authed.url, method, path, AUTH, body)
    assert allowed.status != 401


@pytest.mark.parametrize("path", [
    "/healthz/", "//healthz", "/HEALTHZ", "/healthz%2F", "/./healthz/../api/tags",
    "/api/../healthz/", "/Healthz", "/%2Fhealthz", "/healthz%00",
])
def test_no_other_spelling_of_healthz_is_public(authed: Daemon, path: str) -> None:
    response = raw_request(authed.url, "GET", path)
    assert response.status == 401, path


@pytest.mark.parametrize("method", ["OPTIONS", "POST", "DELETE", "PUT"])
def test_other_methods_on_healthz_need_the_token(authed: Daemon, method: str) -> None:
    assert raw_request(authed.url, method, "/healthz", body=b"").status == 401
    with_token = raw_request(authed.url, method, "/healthz", AUTH, b"")
    assert with_token.status == 405
    assert with_token.headers["allow"] == "GET, HEAD"


def test_head_healthz_is_public(authed: Daemon) -> None:
    assert raw_request(authed.url, "HEAD", "/healthz").status == 200


def test_token_in_query_string_is_not_accepted(authed: Daemon) -> None:
    assert raw_request(authed.url, "GET", f"/api/tags?token={TOKEN}").status == 401


def test_errors_are_json_with_the_right_status(make_foreman: Callable[..., Daemon]) -> None:
    daemon = make_foreman(server={"max_body": "1KB"})
    # A path foreman does not know is the target's to answer: Ollama's own 404.
    missing = raw_request(daemon.url, "GET", "/api/nothing")
    assert missing.status == 404 and missing.body == b"404 page not found"
    wrong = raw_request(daemon.url, "GET", "/api/chat")
    assert wrong.status == 405 and wrong.headers["allow"] == "POST"
    assert "not allowed" in wrong.json()["error"]
    big = raw_request(daemon.url, "POST", "/api/chat", body=b"x" * 2048)
    assert big.status == 413 and big.json() == {"error": "request body too large"}
    openai = raw_request(daemon.url, "POST", "/v1/chat/completions", body=b"x" * 2048)
    assert openai.status == 413 and openai.json()["error"]["type"] == "api_error"
    anthropic = raw_request(daemon.url, "POST", "/v1/messages", body=b"x" * 2048)
    assert anthropic.json()["error"] == {"type": "api_error",
                                         "message": "request body too large"}


def test_unexpected_exception_is_a_generic_500_with_traceback_only_in_the_log(
        log_text: LogStream) -> None:
    def explode(request: object) -> None:
        raise RuntimeError("kaboom-internal-detail")

    app = ForemanApp([Rule("/boom", endpoint=explode)], explode, set(), "", 1024, Metrics(),
                     Guard(loopback_only=True))
    server = Server(app, "127.0.0.1", 0, threads=2, check_headers=app.check_headers)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        response = raw_request(f"http://127.0.0.1:{server.port}", "GET", "/boom")
    finally:
        server.close()
    assert response.status == 500
    assert response.json() == {"error": "internal error in foreman (see its log)"}
    assert b"kaboom" not in response.body
    logged = log_text.getvalue()
    assert "Traceback" in logged and "kaboom-internal-detail" in logged


def test_request_id_is_echoed_or_made(foreman: Daemon) -> None:
    given = requests.get(foreman.url + "/healthz", headers={"X-Request-Id": "abc-123"}, timeout=5)
    assert given.headers["X-Request-Id"] == "abc-123"
    made = requests.get(foreman.url + "/healthz", headers={"X-Request-Id": "bad id; drop table"},
                        timeout=5)
    assert len(made.headers["X-Request-Id"]) == 32


def test_access_log_has_one_line_per_request_without_secrets(
        log_text: LogStream, authed: Daemon, fake: FakeOllama) -> None:
    body = b'{"model":"llama3","stream":false,"messages":[{"role":"user","content":"PRIVATE"}]}'
    ok = raw_request(authed.url, "POST", "/api/chat", {**AUTH, "Content-Type": "application/json"},
                     body)
    assert ok.status == 200
    denied = raw_request(authed.url, "GET", f"/api/tags?token={TOKEN}",
                         {"Authorization": "Bearer guess"})
    assert denied.status == 401
    assert log_text.wait_for("GET /api/tags 401")
    lines = [line for line in log_text.getvalue().splitlines() if "foreman.access" in line]
    chat = [line for line in lines if "POST /api/chat 200" in line]
    assert len(chat) == 1
    assert "model=llama3" in chat[0] and "wait_ms=" in chat[0] and " ms=" in chat[0]
    everything = log_text.getvalue()
    for secret in (TOKEN, "target-secret", "guess", "PRIVATE"):
        assert secret not in everything
    # The target got its own token, never the client's.
    received = fake.requests_to("/api/chat")[-1]
    assert received.headers["authorization"] == "Bearer target-secret"


def test_client_text_cannot_forge_a_log_line(log_text: LogStream, foreman: Daemon) -> None:
    """Regression (issue 13.13): a path with an encoded newline, or a model name with one,
    wrote a second, fake line into the text log."""
    forged = "2026-11-27T00:00:00 info    foreman.access: GET /fake 200"
    path = "/x%0a" + forged.replace(" ", "%20") + "%0d%1b%e2%80%a8"
    assert raw_request(foreman.url, "GET", path).status == 404
    body = json.dumps({"model": "llama3\n" + forged, "stream": False}).encode()
    assert raw_request(foreman.url, "POST", "/api/chat", {"Content-Type": "application/json"},
                       body).status == 404
    assert foreman.app.wait_idle(5)
    lines = log_text.getvalue().splitlines()
    assert lines and not [line for line in lines if line.startswith("2026-11-27T00:00:00")]
    access = [line for line in lines if "foreman.access" in line]
    assert any("\\n2026-11-27T00:00:00" in line for line in access)
    assert any("model=llama3\\n2026" in line for line in access)


def test_a_client_that_leaves_is_logged_499_waiting_or_streaming(
        log_text: LogStream, foreman: Daemon, fake: FakeOllama) -> None:
    """Both ways a client can leave read the same in the log (issue 17): before, a
    streaming client that hung up was logged with the 200 its headers said."""
    fake.token_delay = 0.05
    fake.tokens = 400
    streaming = ChunkReader(foreman.url, "POST", "/api/chat",
                            b'{"model": "llama3", "messages": []}')
    assert streaming.next_chunk() is not None
    waiting = send_only(foreman.url, "/api/chat", b'{"model": "llama3", "messages": []}')
    assert foreman.chat_lane.wait_for(lambda lane: lane.waiting == 1, 5)
    waiting.close()
    assert foreman.chat_lane.wait_for(lambda lane: lane.waiting == 0, 5)
    streaming.close()
    assert foreman.chat_lane.wait_for(lambda lane: lane.in_flight == 0, 5)
    assert foreman.app.wait_idle(5)
    access = [line for line in log_text.getvalue().splitlines() if "foreman.access" in line]
    assert len([line for line in access if "POST /api/chat 499" in line]) == 2, access
    assert not [line for line in access if "POST /api/chat 200" in line]
