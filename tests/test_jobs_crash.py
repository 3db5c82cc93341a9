"""Durability across a SIGKILL: every accepted job ends succeeded after a restart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import requests

from tests.fake_ollama import FakeOllama
from tests.procs import ROOT, ForemanProcess

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}


def config_file(tmp_path: Path, fake: FakeOllama, token: str = "") -> Path:
    config = tmp_path / "foreman.yaml"
    config.write_text(f"listen: 127.0.0.1:0\ntoken: '{token}'\ntarget:\n  url: {fake.url}\n"
                      f"jobs:\n  db: {tmp_path / 'jobs.db'}\n")
    return config


def test_kill_9_with_jobs_queued_and_running_loses_nothing(fake: FakeOllama,
                                                           tmp_path: Path) -> None:
    fake.token_delay = 0.02
    fake.tokens = 15
    config = config_file(tmp_path, fake)
    first = ForemanProcess("-c", str(config))
    try:
        url = first.wait_serving()
        accepted = []
        for i in range(8):
            kind, request = ("chat", CHAT) if i % 4 else ("embed", {
                "model": "nomic-embed-text", "input": str(i)})
            response = requests.post(url + "/jobs", json={"kind": kind, "request": request},
                                     timeout=5)
            assert response.status_code == 202
            accepted.append(response.json()["id"])
        assert fake.wait_for(lambda: fake.stats.generations_active == 1, 10)
    finally:
        first.kill()  # SIGKILL, mid-job
    second = ForemanProcess("-c", str(config))
    try:
        url = second.wait_serving()
        for job_id in accepted:
            job = requests.get(f"{url}/jobs/{job_id}?wait=30", timeout=40).json()
            assert job["status"] == "succeeded", job
    finally:
        assert second.terminate() == 0
    assert any("recovered jobs interrupted by a restart: 1 requeued" in line
               for line in second.log)
    assert fake.stats.generations_peak == 1


def test_jobs_cli_submit_list_show_wait_cancel(fake: FakeOllama, tmp_path: Path) -> None:
    config = config_file(tmp_path, fake, token="cli-token")
    daemon = ForemanProcess("-c", str(config))
    try:
        url = daemon.wait_serving()
        port = url.rsplit(":", 1)[1]
        cli_config = tmp_path / "cli.yaml"
        cli_config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))

        def jobs(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, str(ROOT / "foreman.py"), "-c", str(cli_config), "jobs", *args],
                capture_output=True, text=True, timeout=60, input=stdin)

        submitted = jobs("submit", "--kind", "chat", "--model", "llama3", "--prompt", "hello",
                         "--priority", "3")
        assert submitted.returncode == 0, submitted.stderr
        job = json.loads(submitted.stdout)
        assert job["request"] == {"model": "llama3",
                                  "messages": [{"role": "user", "content": "hello"}]}
        waited = jobs("wait", job["id"], "--timeout", "30")
        assert waited.returncode == 0 and json.loads(waited.stdout)["status"] == "succeeded"
        shown = json.loads(jobs("show", job["id"]).stdout)
        assert shown["result"]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 "
        piped = jobs("submit", "--kind", "embed", "--request", "-",
                     stdin='{"model": "nomic-embed-text", "input": "x"}')
        assert piped.returncode == 0, piped.stderr
        listed = json.loads(jobs("list", "--limit", "1").stdout)
        assert [j["id"] for j in listed["jobs"]] == [json.loads(piped.stdout)["id"]]
        late = jobs("cancel", job["id"])
        assert late.returncode == 1 and "already finished" in late.stderr
        missing = jobs("show", "nope")
        assert missing.returncode == 1 and "not found" in missing.stderr
    finally:
        assert daemon.terminate() == 0
    assert not any("cli-token" in line for line in daemon.log)


def test_a_second_daemon_on_the_same_store_exits_2_naming_the_first(
        fake: FakeOllama, tmp_path: Path) -> None:
    """Regression (issue 13.3): the second daemon's start-up recovery requeued the first
    one's running job, and the two ran it at once."""
    config = config_file(tmp_path, fake)
    first = ForemanProcess("-c", str(config))
    try:
        first.wait_serving()
        second = subprocess.run([sys.executable, str(ROOT / "foreman.py"), "-c", str(config)],
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 2
        db = str(tmp_path / "jobs.db")
        assert second.stderr.strip() == (
            f"foreman: {db}: the job store is in use by another foreman"
            f" (pid {first.proc.pid}); run one daemon per job store")
    finally:
        first.kill()  # SIGKILL: the lock must die with the process
    third = ForemanProcess("-c", str(config))
    try:
        third.wait_serving()
    finally:
        assert third.terminate() == 0
