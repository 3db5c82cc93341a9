"""The door as a browser meets it: headless Chromium on pages of allowed and refused
origins, and a page whose name was rebound to 127.0.0.1."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from foreman.daemon import Daemon
from tests.browser import browser_page
from tests.conftest import LogStream
from tests.fake_ollama import FakeOllama

# evil.test and rebind.test are names a page could have; both resolve to loopback here.
RESOLVE = "--host-resolver-rules=MAP evil.test 127.0.0.1, MAP rebind.test 127.0.0.1"
# Chromium's own Local Network Access checks would block a page served from outside
# from reaching loopback; Firefox and Safari have no such checks, and foreman must
# hold without them, so they are off where the test plays the attacker's page.
WITHOUT_LNA = ("--disable-features=LocalNetworkAccessChecks,"
               "BlockInsecurePrivateNetworkRequests,PrivateNetworkAccessSendPreflights")


@pytest.fixture
def page_server() -> Iterator[int]:
    """Serves an empty HTML page on a loopback port, under whatever name is asked."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = b"<!doctype html><title>a page</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


READ_AND_STREAM = """async (url) => {
    const tags = await (await fetch(url + "/api/tags")).json();
    const answer = await fetch(url + "/api/chat", {
        method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({model: "llama3", messages: [{role: "user", content: "hi"}]}),
    });
    const reader = answer.body.getReader();
    const decoder = new TextDecoder();
    let text = "", reads = 0;
    for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        reads += 1;
        text += decoder.decode(value);
    }
    const words = text.trim().split("\\n").map((line) => JSON.parse(line))
        .map((part) => part.message.content).join("");
    return {models: tags.models.map((m) => m.name), words, reads};
}"""


def test_a_page_on_an_allowed_origin_reads_and_streams(foreman: Daemon, fake: FakeOllama,
                                                       page_server: int) -> None:
    fake.token_delay = 0.02
    with browser_page() as page:
        page.goto(f"http://localhost:{page_server}/")
        result = page.evaluate(READ_AND_STREAM, foreman.url)
    # Read at all only because foreman's answers allowed the page's origin.
    assert set(result["models"]) == set(fake.models)
    assert result["words"] == "tok0 tok1 tok2 tok3 tok4 "
    assert result["reads"] >= 2  # streamed, not delivered whole


SEND_WITHOUT_PREFLIGHT = """async (url) => {
    const outcomes = [];
    for (const [path, body] of [
        ["/api/chat", '{"model": "llama3", "messages": []}'],
        ["/jobs", '{"kind": "chat", "request": {"model": "llama3"}}'],
    ]) {
        try {
            const answer = await fetch(url + path, {
                method: "POST", headers: {"Content-Type": "text/plain"}, body});
            outcomes.push("read " + answer.status);
        } catch (error) {
            outcomes.push("refused");
        }
    }
    return outcomes;
}"""


def test_a_page_on_another_origin_starts_nothing(foreman: Daemon, fake: FakeOllama,
                                                 page_server: int,
                                                 log_text: LogStream) -> None:
    """A text/plain POST is a 'simple' request: the browser sends it without asking.
    foreman refuses it at the door, so no generation runs and no job is stored."""
    with browser_page(RESOLVE) as page:
        page.goto(f"http://evil.test:{page_server}/")
        outcomes = page.evaluate(SEND_WITHOUT_PREFLIGHT, foreman.url)
    assert outcomes == ["refused", "refused"]  # and the page could not read the answer
    assert log_text.wait_for("POST /jobs 403")
    assert "POST /api/chat 403" in log_text.getvalue()
    assert not fake.requests_to("/api/chat")
    assert requests.get(foreman.url + "/jobs", timeout=5).json()["jobs"] == []


REBOUND_READ = """async () => {
    const answer = await fetch("/jobs");
    return {status: answer.status, body: await answer.text()};
}"""


def test_a_rebound_page_cannot_read_the_job_history(foreman: Daemon,
                                                    fake: FakeOllama) -> None:
    """DNS rebinding: the attacker's page came from rebind.test, whose name now points
    at 127.0.0.1 and foreman's port; its fetch of /jobs is same-origin, carries no
    Origin, and only the Host check stops it."""
    port = foreman.url.rsplit(":", 1)[1]
    requests.post(foreman.url + "/jobs", timeout=5,
                  json={"kind": "chat", "request": {"model": "llama3"}})
    with browser_page(RESOLVE, WITHOUT_LNA) as page:
        # The page itself as the attacker served it before the name was rebound.
        page.route(f"http://rebind.test:{port}/", lambda route: route.fulfill(
            status=200, content_type="text/html", body="<!doctype html><title>hi</title>"))
        page.goto(f"http://rebind.test:{port}/")
        result = page.evaluate(REBOUND_READ)
    assert result["status"] == 403
    assert "host not allowed: rebind.test" in result["body"]
    assert "llama3" not in result["body"]
