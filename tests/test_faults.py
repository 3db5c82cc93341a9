"""A target that misbehaves, and a job store that cannot be written: clear errors,
a free chat slot afterwards, nothing accepted lost, foreman still serving."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from foreman.daemon import Daemon
from tests.fake_ollama import FakeOllama, Fault
from tests.procs import ROOT, ForemanProcess

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}


def slot_is_free_and_serving(daemon: Daemon) -> None:
    assert daemon.chat_lane.wait_for(lambda s: s.in_flight == 0 and s.waiting == 0, 5)
    after = requests.post(daemon.url + "/api/chat", json={**CHAT, "stream": False}, timeout=10)
    assert after.status_code == 200, after.text


def test_a_target_that_never_answers_times_out_with_a_504(make_foreman: Callable[..., Daemon],
                                                          fake: FakeOllama) -> None:
    """It took the request and went silent: a gateway timeout, not "unreachable"."""
    daemon = make_foreman(target={"first_token_timeout": "500ms"})
    fake.fault("/api/chat", Fault("hang", seconds=5))
    response = requests.post(daemon.url + "/api/chat", json=CHAT, timeout=10)
    assert response.status_code == 504
    assert response.json()["error"] == ("ollama stopped responding: no output for 500ms after"
                                        " a generation of llama3 was sent")
    slot_is_free_and_serving(daemon)


def test_silence_mid_stream_ends_with_an_error_line(make_foreman: Callable[..., Daemon],
                                                    fake: FakeOllama) -> None:
    daemon = make_foreman(target={"stall_timeout": "300ms"})
    fake.token_delay = 0.0
    first = requests.post(daemon.url + "/api/chat", json={**CHAT, "options": {
        "num_predict": 3, "fake_token_delay": 1.0}}, stream=True, timeout=10)
    lines = list(first.iter_lines())
    assert first.status_code == 200
    assert "error" in json.loads(lines[-1])
    slot_is_free_and_serving(daemon)


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/api/embed"])
@pytest.mark.parametrize("fault", [
    Fault("garbage"),
    Fault("status", status=200, body=b'{"ok": true}', ctype="text/plain"),
    Fault("status", status=200, body=b"<html>proxy login</html>"),
])
def test_non_json_answers_become_a_clear_502(foreman: Daemon, fake: FakeOllama, path: str,
                                             fault: Fault) -> None:
    fake.fault(path, fault)
    body = {"model": "llama3", "prompt": "x", "input": "x", "stream": False}
    response = requests.post(foreman.url + path, json=body, timeout=10)
    assert response.status_code == 502
    assert response.json()["error"].startswith("ollama answered badly: a 200 with content type")
    slot_is_free_and_serving(foreman)


def test_truncated_ndjson_never_reaches_the_client_as_a_line(foreman: Daemon,
                                                             fake: FakeOllama) -> None:
    fake.fault("/api/chat", Fault("truncate_after", after=2))
    response = requests.post(foreman.url + "/api/chat", json=CHAT, stream=True, timeout=10)
    lines = [json.loads(line) for line in response.iter_lines()]  # every line parses
    assert [x["message"]["content"] for x in lines[:2]] == ["tok0 ", "tok1 "]
    assert lines[2] == {"error": "ollama failed mid-request: the stream from ollama ended in"
                                 " the middle of a line"}
    assert len(lines) == 3
    slot_is_free_and_serving(foreman)


def test_a_refused_port_is_a_502_and_foreman_keeps_serving(make_foreman: Callable[..., Daemon],
                                                           fake: FakeOllama) -> None:
    daemon = make_foreman()
    fake.stop()
    for path in ("/api/chat", "/api/embed", "/api/show"):
        response = requests.post(daemon.url + path, json={"model": "llama3", "input": "x"},
                                 timeout=10)
        assert response.status_code == 502, path
    assert requests.get(daemon.url + "/healthz", timeout=5).status_code == 200
    assert requests.get(daemon.url + "/api/tags", timeout=5).status_code == 200


def test_a_full_job_store_refuses_submits_with_503_and_loses_nothing(
        foreman: Daemon, fake: FakeOllama) -> None:
    accepted = requests.post(foreman.url + "/jobs", json={"kind": "chat", "request": CHAT},
                             timeout=5).json()["id"]
    requests.get(f"{foreman.url}/jobs/{accepted}?wait=20", timeout=30)
    db = foreman.store._db  # fault injection: cap the file at its current size
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")
    try:
        refused = None
        for i in range(200):  # fill the last free pages
            refused = requests.post(foreman.url + "/jobs", timeout=5, json={
                "kind": "embed", "request": {"model": "llama3", "input": "x" * 2000 + str(i)}})
            if refused.status_code != 202:
                break
        assert refused is not None and refused.status_code == 503
        assert refused.json()["error"] == ("the job store cannot accept work right now:"
                                           " database or disk is full")
        assert refused.headers["Retry-After"] == "5"
        chat = requests.post(foreman.url + "/api/chat", json={**CHAT, "stream": False},
                             timeout=10)
        assert chat.status_code == 200  # the proxy keeps serving
    finally:
        db.execute("PRAGMA max_page_count = 1073741823")
    assert requests.get(f"{foreman.url}/jobs/{accepted}", timeout=5).json()[
        "status"] == "succeeded"
    again = requests.post(foreman.url + "/jobs", json={"kind": "chat", "request": CHAT},
                          timeout=5)
    assert again.status_code == 202


def test_a_corrupt_job_database_is_a_clear_exit_2(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    db.write_bytes(os.urandom(8192))
    config = tmp_path / "c.yaml"
    config.write_text(f"listen: 127.0.0.1:0\njobs:\n  db: {db}\n")
    result = subprocess.run([sys.executable, str(ROOT / "foreman.py"), "-c", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert str(db) in result.stderr and "job database" in result.stderr
    assert "Traceback" not in result.stderr


def test_kill_9_in_a_loop_under_a_job_workload(fake: FakeOllama, tmp_path: Path) -> None:
    """20 SIGKILLs at random moments: every accepted job ends in a final state,
    succeeded, and no two attempts of one job ever ran at the same time."""
    fake.token_delay = 0.01
    fake.tokens = 8
    config = tmp_path / "c.yaml"
    config.write_text(f"listen: 127.0.0.1:0\ntarget:\n  url: {fake.url}\n"
                      f"jobs:\n  db: {tmp_path / 'jobs.db'}\n  max_attempts: 100\n")
    rng = random.Random(7)
    accepted: list[str] = []
    for round_ in range(20):
        proc = ForemanProcess("-c", str(config))
        try:
            url = proc.wait_serving()
            for i in range(3):
                kind, request = ("embed", {"model": "nomic-embed-text", "input": "x"}) \
                    if i == 2 else ("chat", {**CHAT, "options": {"tag": f"{round_}-{i}"}})
                response = requests.post(url + "/jobs", json={"kind": kind, "request": request},
                                         timeout=5)
                assert response.status_code == 202
                accepted.append(response.json()["id"])
            # A random moment: while jobs are queued, running, or being recorded.
            fake.wait_for(lambda: False, rng.uniform(0.0, 0.4))
        finally:
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait(10)
    final = ForemanProcess("-c", str(config))
    try:
        url = final.wait_serving()
        statuses = {}
        for job_id in accepted:
            statuses[job_id] = requests.get(f"{url}/jobs/{job_id}?wait=60", timeout=70).json()
    finally:
        assert final.terminate() == 0
    assert len(statuses) == 60
    assert {job["status"] for job in statuses.values()} == {"succeeded"}
    assert fake.stats.generations_peak == 1  # never two generations at once, across restarts
