"""The watchdog over real sockets: a target that hangs in each way is noticed within its
clock, the chat slot is freed at once, health tells the truth, and a slow but live
target is never cut (issue 14)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from foreman.daemon import Daemon
from tests.fake_ollama import FakeOllama, Fault
from tests.http_raw import ChunkReader

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
CLOCKS = {"first_token_timeout": "1s", "stall_timeout": "1s"}


def health(daemon: Daemon) -> dict:
    return requests.get(daemon.url + "/healthz", timeout=5).json()


def test_no_first_token_is_a_504_within_the_first_token_clock(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    daemon = make_foreman(target=CLOCKS)
    fake.fault("/api/chat", Fault("hang", seconds=30))
    waiting: list[requests.Response] = []
    started = time.monotonic()
    hung = threading.Thread(target=lambda: waiting.append(requests.post(
        daemon.url + "/api/chat", json=CHAT, timeout=30)))
    hung.start()
    assert daemon.chat_lane.wait_for(lambda lane: lane.in_flight == 1, 5)
    behind = requests.post(daemon.url + "/api/chat", json={**CHAT, "stream": False},
                           timeout=30)
    hung.join(10)
    assert behind.status_code == 200  # the next waiter ran once the slot was freed
    assert time.monotonic() - started < 1 + 3
    assert waiting[0].status_code == 504
    assert waiting[0].json()["error"] == ("ollama stopped responding: no output for 1s after"
                                          " a generation of llama3 was sent")
    # A completed generation (the one behind) cleared the stall again.
    assert health(daemon)["degraded"] is False
    assert requests.get(daemon.url + "/queue", timeout=5).json()["history"] != {}


def test_silence_mid_stream_ends_the_stream_within_the_stall_clock(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    daemon = make_foreman(target=CLOCKS, inventory={"poll_interval": "1h"})
    fake.fault("/api/chat", Fault("pause_after", after=2, seconds=30))
    started = time.monotonic()
    response = requests.post(daemon.url + "/api/chat", json=CHAT, stream=True, timeout=30)
    lines = [json.loads(line) for line in response.iter_lines()]
    assert time.monotonic() - started < 1 + 3
    assert [x["message"]["content"] for x in lines[:2]] == ["tok0 ", "tok1 "]
    assert lines[2] == {"error": "ollama stopped responding: no output for 1s in the middle"
                                 " of a generation of llama3"}
    assert daemon.chat_lane.wait_for(lambda lane: lane.in_flight == 0, 2)
    assert fake.wait_for(lambda: fake.stats.gone == ["/api/chat"], 5)  # upstream was cut
    state = health(daemon)
    assert state["degraded"] is True
    assert state["reason"] == ("ollama stopped responding: no output for 1s in the middle of"
                               " a generation of llama3")
    assert fake.url not in json.dumps(state)
    detail = requests.get(daemon.url + "/queue", timeout=5).json()["target"]
    assert detail == {"degraded": True, "reason": state["reason"]}
    metrics = requests.get(daemon.url + "/metrics", timeout=5).text
    assert "\nforeman_target_up 0\n" in metrics
    # No estimate was learned from the stall.
    assert requests.get(daemon.url + "/queue", timeout=5).json()["history"] == {}


@pytest.fixture
def deaf_target() -> Iterator[str]:
    """A target that accepts connections and never reads a byte of them."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(2)
    for sock in held:
        sock.close()
    listener.close()


def test_a_target_that_never_reads_the_body_is_a_stall_not_unreachable(
        make_foreman: Callable[..., Daemon], deaf_target: str) -> None:
    """Sending the body is watched too: before, a large body to a target that never read
    it was cut by the connect timeout and reported as "cannot reach ollama"."""
    daemon = make_foreman(target={"url": deaf_target, "connect_timeout": "500ms",
                                  "first_token_timeout": "10m", "stall_timeout": "1s"},
                          inventory={"poll_timeout": "300ms", "poll_interval": "1h"})
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * 20_000_000}]}
    started = time.monotonic()
    response = requests.post(daemon.url + "/api/chat", json=body, timeout=30)
    assert response.status_code == 504
    assert response.json()["error"] == ("ollama stopped responding: it took none of the"
                                        " request for 1s while a generation of llama3 was"
                                        " being sent")
    assert time.monotonic() - started < 1 + 3  # the stall clock, not connect or first token
    assert daemon.chat_lane.wait_for(lambda lane: lane.in_flight == 0, 2)


def test_a_hung_tags_poll_is_degraded_within_the_poll_clock(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    daemon = make_foreman(inventory={"poll_timeout": "300ms", "poll_interval": "200ms"})
    assert health(daemon)["degraded"] is False
    for _ in range(50):
        fake.fault("/api/tags", Fault("hang", seconds=30))
    started = time.monotonic()
    assert daemon.inventory.wait_for(lambda s: s.degraded, 5)
    assert time.monotonic() - started < 0.3 + 0.2 + 1
    state = health(daemon)
    assert state["degraded"] is True and state["reason"] == "ollama timed out"
    # A request for an unknown model is answered after one failed poll, not the read timeout.
    asked = time.monotonic()
    requests.post(daemon.url + "/api/chat", json={**CHAT, "model": "ghost"}, timeout=10)
    assert time.monotonic() - asked < 3
    fake.faults["/api/tags"].clear()
    fake.release.set()
    assert daemon.inventory.wait_for(lambda s: not s.degraded, 5)


def test_jobs_wait_out_a_stall_and_the_probe_clears_it(
        make_foreman: Callable[..., Daemon], fake: FakeOllama,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that stalls spends an attempt; while foreman is degraded by the stall the
    job waits without spending more, until the watchdog's probe sees a generation
    complete."""
    monkeypatch.setattr("foreman.worker.retry_delay", lambda attempts: 0.05)
    daemon = make_foreman(target=CLOCKS, inventory={"poll_interval": "300ms"},
                          jobs={"max_attempts": 5})
    fake.fault("/api/chat", Fault("hang", seconds=30))
    job = requests.post(daemon.url + "/jobs", json={"kind": "chat", "request": CHAT},
                        timeout=5).json()
    done = requests.get(f"{daemon.url}/jobs/{job['id']}?wait=20", timeout=30).json()
    assert done["status"] == "succeeded" and done["attempts"] == 2
    probes = [r for r in fake.requests_to("/api/generate") if r.json["prompt"] == "Say OK."]
    assert len(probes) >= 1 and probes[0].json["options"] == {"num_predict": 1}
    assert health(daemon)["degraded"] is False


def test_live_ps_shows_a_model_loaded_a_moment_ago(make_foreman: Callable[..., Daemon],
                                                   fake: FakeOllama) -> None:
    daemon = make_foreman(inventory={"poll_interval": "1h"})
    assert requests.get(daemon.url + "/api/ps", timeout=5).json() == {"models": []}
    requests.post(daemon.url + "/api/chat", json={**CHAT, "stream": False}, timeout=5)
    names = [m["name"] for m in requests.get(daemon.url + "/api/ps", timeout=5).json()["models"]]
    assert names == ["llama3:latest"]
    # And the inventory saw it too, from the poll every generation asks for.
    assert daemon.inventory.wait_for(lambda s: daemon.inventory.is_loaded("llama3"), 5)


def test_a_thinking_model_is_not_cut(make_foreman: Callable[..., Daemon],
                                     fake: FakeOllama) -> None:
    daemon = make_foreman(target={"stall_timeout": "500ms"})
    body = {**CHAT, "options": {"fake_thinking": 10, "fake_token_delay": 0.2}}
    response = requests.post(daemon.url + "/api/chat", json=body, timeout=30)
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [x["message"].get("thinking") for x in lines[:2]] == ["think0 ", "think1 "]
    assert lines[-1]["done"] is True


@pytest.mark.timeout(180)
def test_a_slow_but_alive_target_is_not_cut_at_the_defaults(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    """A 40 s first token, then a token every 200 ms for a minute: a cold load and a
    long prompt on a Mac, then a live stream."""
    daemon = make_foreman(target={"read_timeout": "10m"})
    assert daemon.config.target.first_token_timeout == 600
    assert daemon.config.target.stall_timeout == 60
    reader = ChunkReader(daemon.url, "POST", "/api/chat", json.dumps({**CHAT, "options": {
        "fake_first_token_delay": 40, "fake_token_delay": 0.2, "num_predict": 300}}).encode(),
        timeout=120)
    chunks = reader.chunks()
    reader.close()
    lines = [json.loads(chunk) for chunk in chunks]
    assert len(lines) == 301 and lines[-1]["done"] is True
    assert health(daemon)["degraded"] is False
