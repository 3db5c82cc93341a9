"""Input Python's JSON reads differently from Ollama's Go decoder: always a clear answer,
never a 500, and nothing stored that a reader could not parse back (issue 13.12)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import requests

from foreman.daemon import Daemon
from tests.fake_ollama import FakeOllama

DEEP = b'{"model": "llama3", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
ROUTES = ("/api/chat", "/v1/chat/completions", "/api/embed", "/jobs")


@pytest.mark.parametrize("path", ROUTES)
def test_deep_nesting_is_a_400_not_a_recursion_error(foreman: Daemon, fake: FakeOllama,
                                                     path: str) -> None:
    response = requests.post(foreman.url + path, data=DEEP, timeout=10,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    assert message == "invalid JSON in request body: nested too deeply"
    assert fake.requests_to(path) == []


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("path", ROUTES)
def test_nan_and_infinity_are_not_json(foreman: Daemon, fake: FakeOllama, path: str,
                                       constant: str) -> None:
    request = f'{{"model": "llama3", "options": {{"temperature": {constant}}}}}'
    body = request if path != "/jobs" else f'{{"kind": "chat", "request": {request}}}'
    response = requests.post(foreman.url + path, data=body, timeout=10)
    assert response.status_code == 400, response.text
    assert constant.lstrip("-") in response.text and "is not a JSON value" in response.text
    listed = requests.get(foreman.url + "/jobs", timeout=5)
    assert listed.json()["jobs"] == []  # parses, and nothing was stored


def test_a_priority_past_int64_is_a_400(foreman: Daemon) -> None:
    for priority in (10**30, -(2**63) - 1, 2**63):
        response = requests.post(foreman.url + "/jobs", timeout=5, json={
            "kind": "chat", "request": {"model": "llama3"}, "priority": priority})
        assert response.status_code == 400
        assert response.json()["error"].startswith("priority must be an integer from")
    edge = requests.post(foreman.url + "/jobs", timeout=5, json={
        "kind": "chat", "request": {"model": "llama3"}, "priority": 2**63 - 1})
    assert edge.status_code == 202


def test_lone_surrogates_become_replacement_characters(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    """As Go decodes them; before, a webhook URL or (while degraded) a model name with
    one failed to encode in SQLite and answered 500."""
    daemon = make_foreman()
    hook = 'http://127.0.0.1:9/hook?\\ud800x'
    body = f'{{"kind": "chat", "request": {{"model": "llama3"}}, "webhook": "{hook}"}}'
    stored = requests.post(daemon.url + "/jobs", data=body, timeout=5)
    assert stored.status_code == 202, stored.text
    fake.stop()
    assert daemon.inventory.wait_for(lambda s: s.degraded, 5)
    degraded = requests.post(daemon.url + "/jobs", timeout=5, data=(
        '{"kind": "chat", "request": {"model": "llama\\udfff3", "note": ["\\ud83d"]}}'))
    assert degraded.status_code == 202, degraded.text
    job = degraded.json()
    assert job["request"] == {"model": "llama\ufffd3", "note": ["\ufffd"]}
    listed = requests.get(daemon.url + "/jobs", timeout=5)
    assert listed.status_code == 200 and len(json.loads(listed.content)["jobs"]) == 2
    # A valid pair stays the character it encodes.
    pair = requests.post(daemon.url + "/jobs", timeout=5, data=(
        '{"kind": "chat", "request": {"model": "llama3", "note": "\\ud83d\\ude00"}}'))
    assert pair.json()["request"]["note"] == "\U0001F600"


def test_invalid_utf8_is_read_as_go_reads_it(foreman: Daemon, fake: FakeOllama) -> None:
    body = b'{"kind": "chat", "request": {"model": "llama3", "note": "caf\xe9"}}'
    response = requests.post(foreman.url + "/jobs", data=body, timeout=5)
    assert response.status_code == 202, response.text
    assert response.json()["request"]["note"] == "caf\ufffd"
