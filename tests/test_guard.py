"""The Origin and Host checks at foreman's door, as Ollama makes them."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
import requests

from foreman.daemon import Daemon
from foreman.guard import ALLOWED_HEADERS, Guard
from tests.fake_ollama import FakeOllama
from tests.http_raw import raw_request

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}


@pytest.mark.parametrize("origin", [
    "http://localhost", "https://localhost", "http://localhost:3000", "http://127.0.0.1",
    "https://127.0.0.1:8443", "http://0.0.0.0:8080", "app://obsidian.md", "file://",
    "tauri://localhost", "vscode-webview://1a2b3c", "vscode-file://vscode-app",
])
def test_ollamas_default_origins_are_allowed(origin: str) -> None:
    assert Guard(loopback_only=True).origin_allowed(origin)


@pytest.mark.parametrize("origin", [
    "https://evil.example", "chrome-extension://abcdefgh", "moz-extension://x", "null",
    "http://localhost.evil.example", "http://127.0.0.1.evil.example:80", "http://[::1]:3000",
])
def test_other_origins_are_not(origin: str) -> None:
    assert not Guard(loopback_only=True).origin_allowed(origin)


def test_cors_origins_extend_the_defaults_with_wildcards() -> None:
    guard = Guard(True, ["chrome-extension://*", "https://*.example.com", "https://app.dev"])
    assert guard.origin_allowed("chrome-extension://abcdefgh")
    assert guard.origin_allowed("https://notes.example.com")
    assert guard.origin_allowed("https://app.dev") and guard.origin_allowed("http://localhost")
    assert not guard.origin_allowed("https://app.dev.evil")
    everyone = Guard(True, ["*"])
    assert everyone.origin_allowed("https://anything.example")
    assert dict(everyone.verdict("GET", "localhost", "https://a.example").headers)[
        "Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("host", [
    "", "localhost", "localhost:11435", "LOCALHOST", "foo.localhost:1", "box.local",
    "gpu.internal:8080", "127.0.0.1:11435", "127.9.9.9", "[::1]:11435", "::1", "0.0.0.0:1",
    "10.1.2.3", "172.16.0.1:80", "192.168.1.20", "[fd00::1]:80", "[::ffff:127.0.0.1]:80",
    "my-mac",
])
def test_local_hosts_pass_the_host_check(host: str) -> None:
    assert Guard(loopback_only=True, hostname="my-mac").host_allowed(host)


@pytest.mark.parametrize("host", [
    "evil.example", "evil.example:11435", "localhost.evil.example", "100.64.0.1",
    "169.254.169.254", "8.8.8.8:53", "[2001:db8::1]:80", "local", "x.local.evil",
])
def test_other_hosts_do_not(host: str) -> None:
    assert not Guard(loopback_only=True, hostname="my-mac").host_allowed(host)


def test_server_allowed_hosts_adds_names_and_a_lan_listener_accepts_any_host() -> None:
    assert Guard(True, allowed_hosts=["gpu.example.com"]).host_allowed("gpu.example.com:443")
    assert Guard(loopback_only=False).verdict("GET", "evil.example", "").refusal is None


# -- over real sockets -----------------------------------------------------------------

def test_a_page_on_a_disallowed_origin_starts_no_work(foreman: Daemon,
                                                      fake: FakeOllama) -> None:
    """A `text/plain` POST needs no preflight: a page can send it, so the door must
    refuse it, before its body, with no generation and no job."""
    evil = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
    job = b'{"kind":"chat","request":{"model":"llama3"},"webhook":"http://127.0.0.1:9/x"}'
    for path, body in (("/jobs", job), ("/api/chat", b'{"model":"llama3"}'),
                       ("/api/generate", b'{"model":"llama3","prompt":"x"}')):
        answer = raw_request(foreman.url, "POST", path, evil, body)
        assert answer.status == 403, path
        assert answer.json() == {"error": "origin not allowed: https://evil.example"
                                          " (see cors.origins)"}
    assert requests.get(foreman.url + "/jobs", timeout=5).json()["jobs"] == []
    assert not fake.requests_to("/api/chat") and not fake.requests_to("/api/generate")
    refused = raw_request(foreman.url, "GET", "/api/tags", {"Origin": "https://evil.example"})
    assert refused.status == 403


def test_an_allowed_origin_is_echoed_and_its_preflight_answered_before_auth(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    daemon = make_foreman(token="t0k")
    page = "http://localhost:5173"
    preflight = requests.options(daemon.url + "/api/chat", timeout=5, headers={
        "Origin": page, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-api-key"})
    assert preflight.status_code == 204 and preflight.content == b""
    assert preflight.headers["Access-Control-Allow-Origin"] == page
    assert preflight.headers["Access-Control-Allow-Headers"] == ALLOWED_HEADERS
    allowed_headers = preflight.headers["Access-Control-Allow-Headers"].lower().split(",")
    for header in ("authorization", "content-type", "x-api-key", "anthropic-version",
                   "anthropic-beta", "anthropic-dangerous-direct-browser-access",
                   "openai-beta", "x-stainless-retry-count"):
        assert header in allowed_headers
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"].split(",")
    denied = requests.get(daemon.url + "/api/tags", headers={"Origin": page}, timeout=5)
    assert denied.status_code == 401  # readable by the page: it carries the CORS headers
    assert denied.headers["Access-Control-Allow-Origin"] == page
    answer = requests.post(daemon.url + "/api/chat", json=CHAT, timeout=5,
                           headers={"Origin": page, "Authorization": "Bearer t0k"})
    assert answer.status_code == 200
    assert answer.headers["Access-Control-Allow-Origin"] == page
    assert answer.headers["Vary"] == "Origin"
    assert not [r for r in fake.received if r.method == "OPTIONS"]


def test_a_same_origin_request_is_not_a_cors_request(foreman: Daemon) -> None:
    """As gin-contrib/cors: an Origin equal to the Host's own is served without CORS
    headers (the status page's buttons send one)."""
    host = foreman.url.removeprefix("http://")
    answer = requests.get(foreman.url + "/queue", headers={"Origin": f"http://{host}"},
                          timeout=5)
    assert answer.status_code == 200 and "Access-Control-Allow-Origin" not in answer.headers


def test_a_rebound_name_is_refused(foreman: Daemon, fake: FakeOllama) -> None:
    """DNS rebinding: a page on evil.example, its name now pointing at 127.0.0.1, is
    same-origin to itself; only the Host check stops it reading the job history."""
    port = foreman.url.rsplit(":", 1)[1]
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    for method, path in (("GET", "/jobs"), ("GET", "/api/tags"), ("GET", "/healthz"),
                         ("POST", "/api/chat")):
        answer = raw_request(foreman.url, method, path, rebound, b"{}" if method == "POST"
                             else None)
        assert answer.status == 403, path
        assert "host not allowed" in answer.json()["error"]
    for host in ("localhost", f"127.0.0.1:{port}", "gpu.local", socket.gethostname()):
        assert raw_request(foreman.url, "GET", "/api/tags", {"Host": host}).status == 200


def test_allowed_hosts_and_a_lan_listener(make_foreman: Callable[..., Daemon],
                                          tmp_path: object) -> None:
    named = make_foreman(server={"allowed_hosts": ["gpu.example.com"]})
    assert raw_request(named.url, "GET", "/api/tags", {"Host": "gpu.example.com"}).status == 200
    assert raw_request(named.url, "GET", "/api/tags", {"Host": "evil.example"}).status == 403
    lan = make_foreman(listen="0.0.0.0:0", jobs={"db": f"{tmp_path}/lan.db"})
    lan_url = lan.url.replace("0.0.0.0", "127.0.0.1")
    assert raw_request(lan_url, "GET", "/api/tags", {"Host": "evil.example"}).status == 200
