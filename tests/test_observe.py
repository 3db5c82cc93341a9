"""Seeing the box: /queue with estimates, /metrics, JSON logs, and the status page."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from foreman.daemon import Daemon
from foreman.logs import configure_logging
from tests.browser import browser_page, rendered_dom
from tests.conftest import LogStream
from tests.fake_ollama import FakeOllama, Fault
from tests.http_raw import raw_request

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
AUTH = {"Authorization": "Bearer t0k"}


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_queue_shows_running_and_waiting_with_estimates_once_there_is_history(
        make_foreman: Callable[..., Daemon], fake: FakeOllama) -> None:
    foreman = make_foreman(chat={"affinity_wait": 0})  # arrival order (see test_scheduler)
    fake.loaded["llama3:latest"] = "5m"
    foreman.inventory.refresh()
    fake.token_delay = 0.01
    assert requests.post(foreman.url + "/api/chat", json={**CHAT, "stream": False},
                         timeout=10).status_code == 200
    assert foreman.chat_lane.wait_for(lambda s: s.in_flight == 0, 5)
    fake.fault("/api/chat", Fault("hang"))
    first = requests.post(foreman.url + "/jobs", json={"kind": "chat", "request": CHAT},
                          timeout=5).json()["id"]
    assert fake.wait_for(lambda: len(fake.requests_to("/api/chat")) == 2)
    queued = requests.post(foreman.url + "/jobs", json={"kind": "chat", "request": {
        **CHAT, "model": "nomic-embed-text"}}, timeout=5).json()["id"]
    behind = requests.post(foreman.url + "/jobs", json={"kind": "chat", "request": CHAT},
                           timeout=5).json()["id"]
    waiter = threading.Thread(target=lambda: requests.post(
        foreman.url + "/api/generate", json={"model": "llama3", "prompt": "x"}, timeout=30))
    waiter.start()
    assert foreman.chat_lane.wait_for(lambda s: any(w.kind == "generate"
                                               for w in s.snapshot()[1]), 5)
    view = requests.get(foreman.url + "/queue", timeout=5).json()
    assert view["concurrency"] == 1
    assert [(r["kind"], r["job_id"]) for r in view["running"]] == [("job", first)]
    assert view["running"][0]["since"].endswith("Z")
    waiting = view["waiting"]
    assert [w["kind"] for w in waiting] == ["generate", "job", "job"]
    assert waiting[0]["model"] == "llama3" and waiting[0]["estimated_start"] is not None
    assert waiting[1]["job_id"] == queued and waiting[1]["estimated_start"] is None
    assert waiting[1]["estimate"] == "unknown: no history for model nomic-embed-text yet"
    # llama3 has history; its start is unknown only because of the job ahead (issue 17).
    assert waiting[2]["job_id"] == behind and waiting[2]["estimate"] == (
        "unknown: behind a job for nomic-embed-text, which has no history yet")
    assert view["history"]["registry.ollama.ai/library/llama3:latest"]["samples"] == 1
    job = requests.get(f"{foreman.url}/jobs/{queued}", timeout=5).json()
    assert job["position"] == 2 and job["estimated_start"] is None
    fake.release.set()
    waiter.join(30)


def test_a_jobs_position_and_estimate_match_the_queue_view(
        foreman: Daemon, fake: FakeOllama) -> None:
    fake.loaded["llama3:latest"] = "5m"
    foreman.inventory.refresh()
    assert requests.post(foreman.url + "/api/chat", json={**CHAT, "stream": False},
                         timeout=10).status_code == 200  # history for llama3
    fake.fault("/api/chat", Fault("hang"))
    requests.post(foreman.url + "/jobs", json={"kind": "chat", "request": CHAT}, timeout=5)
    assert fake.wait_for(lambda: len(fake.requests_to("/api/chat")) == 2)
    queued = [requests.post(foreman.url + "/jobs", timeout=5, json={
        "kind": kind, "request": CHAT if kind == "chat" else {"model": "llama3", "prompt": "x"},
        "priority": priority}).json()["id"]
        for kind, priority in [("chat", 0), ("generate", 5), ("chat", 0), ("chat", 5)]]
    view = requests.get(foreman.url + "/queue", timeout=5).json()
    in_line = {w["job_id"]: w for w in view["waiting"]}
    assert [w["job_id"] for w in view["waiting"]] == [queued[i] for i in (1, 3, 0, 2)]
    for job_id in queued:
        job = requests.get(f"{foreman.url}/jobs/{job_id}", timeout=5).json()
        assert job["position"] == in_line[job_id]["position"]
        assert job["estimated_start"] is not None
        # Both are simulated from "now"; the two requests are a few ms apart.
        assert abs(iso_seconds(job["estimated_start"])
                   - iso_seconds(in_line[job_id]["estimated_start"])) < 1.0
    fake.release.set()


def iso_seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_metrics_parse_and_count_what_happened(make_foreman: Callable[..., Daemon],
                                               fake: FakeOllama) -> None:
    daemon = make_foreman(token="t0k", target={"connect_timeout": "300ms"})
    assert requests.get(daemon.url + "/metrics", timeout=5).status_code == 401
    for _ in range(2):
        streamed = requests.post(daemon.url + "/api/chat", json=CHAT, headers=AUTH, timeout=10)
        assert len(streamed.content.splitlines()) == 6
    job = requests.post(daemon.url + "/jobs", json={"kind": "chat", "request": CHAT},
                        headers=AUTH, timeout=5).json()["id"]
    requests.get(f"{daemon.url}/jobs/{job}?wait=20", headers=AUTH, timeout=30)
    assert daemon.app.wait_idle(5)  # a request is counted just after its answer
    scrape = requests.get(daemon.url + "/metrics", headers=AUTH, timeout=5)
    assert scrape.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = metric_samples(scrape.text)
    chat_ok = (("method", "POST"), ("route", "/api/chat"), ("status", "200"))
    assert samples[("foreman_requests_total", chat_ok)] == 2
    assert samples[("foreman_requests_total", (("method", "GET"), ("route", "/metrics"),
                                               ("status", "401")))] == 1
    assert samples[("foreman_chat_wait_seconds_count", ())] == 2
    assert samples[("foreman_job_run_seconds_count", ())] == 1
    assert samples[("foreman_streamed_chunks_total", ())] == 18  # 2 x 6 + the job's 6
    assert samples[("foreman_jobs", (("status", "succeeded"),))] == 1
    assert samples[("foreman_target_up", ())] == 1
    assert samples[("foreman_chat_in_flight", ())] == 0
    fake.stop()
    assert daemon.inventory.wait_for(lambda s: s.degraded, 3)
    after = metric_samples(requests.get(daemon.url + "/metrics", headers=AUTH, timeout=5).text)
    assert after[("foreman_target_up", ())] == 0
    assert after[("foreman_target_poll_failures_total", ())] >= 1


def test_any_number_of_made_up_methods_is_one_metric_series(
        make_foreman: Callable[..., Daemon]) -> None:
    daemon = make_foreman(token="t0k", metrics={"public": True})
    for i in range(50):
        assert raw_request(daemon.url, f"X{i}", "/api/tags").status == 401
    assert raw_request(daemon.url, "PUT", "/api/tags").status == 401
    assert daemon.app.wait_idle(5)
    samples = metric_samples(requests.get(daemon.url + "/metrics", timeout=5).text)
    methods = {dict(labels)["method"] for name, labels in samples
               if name == "foreman_requests_total"}
    assert methods == {"other", "PUT"}
    assert sum(n for (name, labels), n in samples.items()
               if name == "foreman_requests_total" and ("method", "other") in labels) == 50


def test_metrics_can_be_public(make_foreman: Callable[..., Daemon]) -> None:
    daemon = make_foreman(token="t0k", metrics={"public": True})
    assert requests.get(daemon.url + "/metrics", timeout=5).status_code == 200
    assert requests.get(daemon.url + "/queue", timeout=5).status_code == 401


def test_json_logs_carry_the_request_id(foreman: Daemon) -> None:
    stream = LogStream()
    configure_logging("info", "json", stream)
    try:
        response = requests.get(foreman.url + "/api/tags", headers={"X-Request-Id": "trace-7"},
                                timeout=5)
        assert response.headers["X-Request-Id"] == "trace-7"
        made = requests.get(foreman.url + "/api/ps", timeout=5).headers["X-Request-Id"]
        assert stream.wait_for(made)
    finally:
        configure_logging("info", "text")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = {entry["id"]: entry for entry in lines if entry["logger"] == "foreman.access"}
    assert access["trace-7"]["msg"] == "GET /api/tags 200"
    assert access[made]["level"] == "info" and isinstance(access[made]["ms"], float)
    assert all(set(entry) >= {"time", "level", "logger", "msg"} for entry in lines)


def visible(dom: str, element_id: str) -> bool:
    match = re.search(rf'<[a-z]+ id="{element_id}"([^>]*)>', dom)
    assert match, f"#{element_id} missing"
    return "hidden" not in match.group(1)


def test_status_page_asks_for_the_token_and_shows_the_box(make_foreman: Callable[..., Daemon],
                                                          fake: FakeOllama) -> None:
    fake.loaded["llama3:latest"] = "5m"
    daemon = make_foreman(token="t0k", target={"connect_timeout": "300ms"})
    shell = requests.get(daemon.url + "/status", timeout=5)
    assert shell.status_code == 200 and "t0k" not in shell.text
    job = requests.post(daemon.url + "/jobs", json={"kind": "embed", "request": {
        "model": "nomic-embed-text", "input": "x"}}, headers=AUTH, timeout=5).json()["id"]
    requests.get(f"{daemon.url}/jobs/{job}?wait=20", headers=AUTH, timeout=30)

    locked = rendered_dom(daemon.url + "/status")
    assert visible(locked, "login") and not visible(locked, "data")
    assert ">OK<" in locked and job not in locked

    shown = rendered_dom(daemon.url + "/status#token=t0k")
    assert not visible(shown, "login") and visible(shown, "data")
    assert "llama3:latest" in shown  # resident model
    assert job in shown and "succeeded" in shown
    assert "nothing is running" in shown and "nobody is waiting" in shown

    fake.stop()
    assert daemon.inventory.wait_for(lambda s: s.degraded, 3)
    degraded = rendered_dom(daemon.url + "/status#token=t0k")
    assert ">DEGRADED<" in degraded and "serving the last known models" in degraded
    assert "cannot reach ollama" in degraded


@pytest.mark.parametrize("path", ["/queue", "/jobs", "/api/ps"])
def test_the_data_behind_the_page_needs_the_token(make_foreman: Callable[..., Daemon],
                                                  path: str) -> None:
    daemon = make_foreman(token="t0k")
    assert requests.get(daemon.url + path, timeout=5).status_code == 401


def test_the_status_page_shows_details_and_cancels_jobs(make_foreman: Callable[..., Daemon],
                                                        fake: FakeOllama) -> None:
    """Driven as a person would (issue 17): a model kept loaded forever says so, an old
    job shows its date, the header counts what the table shows, a job's detail opens,
    and a queued job can be cancelled, all behind the token."""
    fake.loaded["llama3:latest"] = -1  # the fake reports it until the year 2318
    daemon = make_foreman(token="t0k")
    done = requests.post(daemon.url + "/jobs", headers=AUTH, timeout=5, json={
        "kind": "embed", "request": {"model": "nomic-embed-text", "input": "look at me"}}
                         ).json()["id"]
    assert requests.get(f"{daemon.url}/jobs/{done}?wait=20", headers=AUTH,
                        timeout=30).json()["status"] == "succeeded"
    with sqlite3.connect(daemon.store.path) as db:  # it was submitted two days ago
        db.execute("UPDATE jobs SET created_at = created_at - 2 * 86400 WHERE id = ?", (done,))
    fake.stop()  # what is submitted now stays queued
    assert daemon.inventory.wait_for(lambda s: s.degraded, 5)
    queued = requests.post(daemon.url + "/jobs", headers=AUTH, timeout=5, json={
        "kind": "chat", "request": CHAT}).json()["id"]
    with browser_page() as page:
        page.goto(daemon.url + "/status#token=t0k")
        page.wait_for_selector("#data:not([hidden])")
        page.wait_for_selector(f"#jobs >> text={queued}")
        assert "kept loaded" in page.inner_text("#models")
        old_row = page.inner_text(f"#jobs tr:has-text('{done}')")
        created = requests.get(f"{daemon.url}/jobs/{done}", headers=AUTH,
                               timeout=5).json()["created_at"]
        date = page.evaluate("(iso) => new Date(iso).toLocaleDateString()", created)
        assert date in old_row
        assert page.inner_text("#chat") == \
            "Chat slot: 0 running, 1 waiting (requests and jobs)."
        assert page.inner_text("#grouping").startswith("Loaded for the scheduler: ")
        page.click(f"#jobs button:has-text('{done}')")
        page.wait_for_selector("#detail:not([hidden])")
        assert '"input": "look at me"' in page.inner_text("#detail-body")
        assert page.locator(f"#jobs tr:has-text('{done}') button.cancel").count() == 0
        page.click(f"#jobs tr:has-text('{queued}') button.cancel")
        page.wait_for_selector(f"#jobs tr:has-text('{queued}') >> text=cancelled")
    assert requests.get(f"{daemon.url}/jobs/{queued}", headers=AUTH,
                        timeout=5).json()["status"] == "cancelled"
