"""Serving a request leaves no reference cycles behind.

An object caught in a cycle outlives its request until the cycle collector
finds it.  For a stream that lasts seconds the request's objects have by then
been promoted to the oldest generation, which is collected rarely, so its body,
environ and buffers linger mixed with live data.  Before these cycles were
broken, the soak's collector found about 19 objects of garbage per request.
These tests catch every foreman or Werkzeug object that only the cycle
collector could free, over real sockets, for each kind of request.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import types
from collections import Counter
from collections.abc import Callable

import pytest
import requests

from foreman.daemon import Daemon
from tests.fake_ollama import FakeOllama, Fault
from tests.http_raw import ChunkReader, send_only


def _name(thing: object) -> str:
    if isinstance(thing, types.FunctionType):
        return f"{thing.__module__}.{thing.__qualname__}"
    kind = type(thing)
    return f"{kind.__module__}.{kind.__qualname__}"


# Werkzeug's router defines a recursive closure on every match, a function that
# refers to itself.  It is garbage as soon as the match returns, holds nothing of
# the request, and goes at the next young-generation collection; it is left alone.
ROUTER_CLOSURE = "werkzeug.routing.matcher.StateMachineMatcher.match.<locals>._match"


def cycles_left_by(action: Callable[[], None]) -> Counter[str]:
    """The foreman and Werkzeug objects that `action` left for the cycle collector."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        action()
        gc.collect()
        found = Counter(_name(thing) for thing in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return Counter({name: n for name, n in found.items()
                    if name.startswith(("foreman.", "werkzeug.")) and name != ROUTER_CLOSURE})


CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def chat(daemon: Daemon, status: int = 200, **extra: object) -> None:
    response = requests.post(daemon.url + "/api/chat", json={**CHAT, **extra}, timeout=10)
    assert response.status_code == status, response.text


def streamed_chat(daemon: Daemon, chunks: int | None = None) -> None:
    """A streamed chat read to its end, or for `chunks` chunks before hanging up."""
    body = json.dumps({**CHAT, "stream": True, "options": {"num_predict": 20}}).encode()
    reader = ChunkReader(daemon.url, "POST", "/api/chat", body, timeout=10)
    try:
        assert reader.status == 200
        if chunks is None:
            reader.chunks()
        else:
            for _ in range(chunks):
                reader.next_chunk()
    finally:
        reader.close()


def job_to_the_end(daemon: Daemon) -> None:
    submitted = requests.post(daemon.url + "/jobs", timeout=5, json={
        "kind": "embed", "request": {"model": "nomic-embed-text", "input": "x"}})
    assert submitted.status_code == 202
    done = requests.get(f"{daemon.url}/jobs/{submitted.json()['id']}", params={"wait": 10},
                        timeout=15).json()
    assert done["status"] == "succeeded"


def with_fault(path: str, fault: Fault, then: Callable[[Daemon], None]
               ) -> Callable[[Daemon, FakeOllama], None]:
    def action(daemon: Daemon, fake: FakeOllama) -> None:
        fake.fault(path, fault)
        then(daemon)
    return action


def while_target_is_down(daemon: Daemon, fake: FakeOllama) -> None:
    fake.stop()
    try:
        chat(daemon, 502)
    finally:
        fake.start()


def leaves_while_waiting(daemon: Daemon, fake: FakeOllama) -> None:
    """A second chat that hangs up while the first holds the chat slot."""
    fake.token_delay = 0.02
    holder = ChunkReader(daemon.url, "POST", "/api/chat", json.dumps(
        {**CHAT, "stream": True, "options": {"num_predict": 50}}).encode(), timeout=10)
    try:
        assert daemon.chat_lane.wait_for(lambda s: s.in_flight == 1, 5)
        waiter = send_only(daemon.url, "/api/chat", json.dumps(CHAT).encode())
        assert daemon.chat_lane.wait_for(lambda s: s.waiting == 1, 5)
        waiter.close()
        assert daemon.chat_lane.wait_for(lambda s: s.waiting == 0, 5)
    finally:
        holder.close()
        fake.token_delay = 0.0


REQUESTS: dict[str, Callable[[Daemon, FakeOllama], None]] = {
    "chat": lambda d, f: chat(d),
    "streamed chat": lambda d, f: streamed_chat(d),
    "client hangs up mid-stream": lambda d, f: streamed_chat(d, chunks=2),
    "embed": lambda d, f: requests.post(d.url + "/api/embed", timeout=10, json={
        "model": "nomic-embed-text", "input": ["a", "b"]}).raise_for_status(),
    "tags": lambda d, f: requests.get(d.url + "/api/tags", timeout=5).raise_for_status(),
    "job": lambda d, f: job_to_the_end(d),
    "unknown route": lambda d, f: requests.get(d.url + "/api/nothing", timeout=5),
    "unknown model": lambda d, f: chat(d, 404, model="no-such-model"),
    "malformed body": lambda d, f: requests.post(d.url + "/api/chat", data=b"{", timeout=5),
    "target answers 500": with_fault("/api/chat", Fault("status"), lambda d: chat(d, 500)),
    "stream cut short": with_fault("/api/chat", Fault("truncate_after", after=2),
                                   streamed_chat),
    "target down": while_target_is_down,
    "client leaves while waiting": leaves_while_waiting,
}


# A hung-up stream closes urllib3's read generator.  Python 3.10's contextlib then
# keeps the GeneratorExit in a local of its own frame, which the exception's
# traceback holds (3.11 gives the exception its old traceback back): a cycle in
# the standard library, and through the frames' callers it holds the request.
STDLIB_CYCLE_ON_310 = pytest.mark.xfail(
    sys.version_info < (3, 11), strict=True, reason="contextlib's cycle on Python 3.10")
HUNG_UP = ("client hangs up mid-stream", "client leaves while waiting")


@pytest.mark.parametrize("kind", [pytest.param(kind, marks=STDLIB_CYCLE_ON_310)
                                  if kind in HUNG_UP else kind for kind in REQUESTS])
def test_a_request_leaves_no_reference_cycle(foreman: Daemon, fake: FakeOllama,
                                             caplog: pytest.LogCaptureFixture, kind: str) -> None:
    # pytest keeps every log record, and with it any exception logged, alive.
    caplog.set_level(logging.CRITICAL, logger="foreman")

    def three() -> None:
        for _ in range(3):
            REQUESTS[kind](foreman, fake)
        assert foreman.app.wait_idle(10)  # every request's own clean-up has run

    three()  # the first requests of a kind warm caches that live on
    assert cycles_left_by(three) == Counter()


def test_a_refused_token_leaves_no_reference_cycle(make_foreman: Callable[..., Daemon]) -> None:
    daemon = make_foreman(token="s3cret-token-value")

    def refused() -> None:
        response = requests.get(daemon.url + "/api/tags", timeout=5,
                                headers={"Authorization": "Bearer wrong"})
        assert response.status_code == 401
        assert daemon.app.wait_idle(10)

    refused()
    assert cycles_left_by(refused) == Counter()
