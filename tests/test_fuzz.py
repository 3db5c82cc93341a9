"""Property-based: generated methods, paths, headers and bodies thrown at a running
foreman.  No 500s, no tracebacks, every error a JSON body, and healthy afterwards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foreman.daemon import Daemon
from tests.http_raw import raw_request

ROUTES = ["/", "/healthz", "/api/chat", "/api/generate", "/api/embed", "/api/embeddings",
          "/api/tags", "/api/ps", "/api/show", "/api/version", "/api/pull", "/api/delete",
          "/api/blobs/sha256:00", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
          "/v1/models", "/v1/models/llama3", "/jobs", "/jobs/abc", "/jobs/abc/cancel",
          "/queue", "/metrics", "/status"]
SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~:@!$&'()*+,;=%"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
models = st.sampled_from(["llama3", "nomic-embed-text", "LLaMA3:latest", "ghost", "", "a/b:c"])
ollama_like = st.fixed_dictionaries(
    {"model": models | json_values},
    optional={"messages": json_values, "prompt": json_values, "stream": json_values,
              "input": json_values, "options": json_values, "keep_alive": json_values,
              "kind": st.sampled_from(["chat", "generate", "embed", "x"]),
              "request": st.fixed_dictionaries({"model": models}) | json_values,
              "priority": json_values, "webhook": json_values})
bodies = (st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode())
          | ollama_like.map(lambda v: json.dumps(v).encode()))
paths = st.one_of(
    st.sampled_from(ROUTES),
    st.tuples(st.sampled_from(ROUTES), st.text(SAFE + "/?#", max_size=20)).map("".join),
    st.text(SAFE + "/", min_size=1, max_size=40).map(lambda p: "/" + p),
)
header_names = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20).filter(
    lambda n: n not in ("content-length", "transfer-encoding", "host", "expect", "connection"))
headers = st.dictionaries(header_names, st.text(SAFE + " ", max_size=40), max_size=5)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"])

TEXT_OK = {"/", "/status", "/metrics"}  # non-JSON success bodies foreman serves by design


@pytest.fixture(scope="module")
def fuzz_target(request: Any) -> Iterator[Daemon]:
    from pathlib import Path

    from foreman.config import parse_config
    from foreman.daemon import build_daemon
    from tests.conftest import config_data
    from tests.fake_ollama import FakeOllama

    fake = FakeOllama().start()
    tmp: Path = request.getfixturevalue("tmp_path_factory").mktemp("fuzz")
    daemon = build_daemon(parse_config(config_data(fake.url, tmp, inventory={
        "poll_interval": "1s", "repoll_cooldown": "20ms"})))
    daemon.start()
    daemon.inventory.refresh()
    yield daemon
    daemon.shutdown(drain_timeout=2)
    fake.stop()


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(method=methods, path=paths, extra=headers, body=bodies)
def test_no_input_gets_a_500_or_a_non_json_error(fuzz_target: Daemon, method: str, path: str,
                                                 extra: dict[str, str], body: bytes) -> None:
    send: bytes | None = body if method not in ("GET", "HEAD") or body[:1] == b"{" else None
    response = raw_request(fuzz_target.url, method, path, extra, send, timeout=15)
    assert response.status != 500, (method, path, response.body[:300])
    assert b"Traceback" not in response.body
    if response.body == b"404 page not found":
        return  # a path foreman does not know: the target's own answer, as Ollama's
    if response.status >= 400 and method != "HEAD":
        assert response.headers["content-type"] == "application/json", response.body[:200]
        error = json.loads(response.body)["error"]
        assert isinstance(error, (str, dict)) and error


def test_still_healthy_after_the_fuzzing(fuzz_target: Daemon) -> None:
    health = raw_request(fuzz_target.url, "GET", "/healthz").json()
    assert health["status"] == "ok" and health["degraded"] is False
    assert fuzz_target.chat_lane.wait_for(lambda s: s.in_flight == 0 and s.waiting == 0, 10)
