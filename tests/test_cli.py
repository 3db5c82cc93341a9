"""The command line as a user runs it: real processes, exit codes, signals."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from foreman import __version__
from foreman.config import default_job_store
from tests.fake_ollama import FakeOllama
from tests.procs import ROOT, ForemanProcess


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, env={**os.environ, **(env or {})})


def test_version_from_script_and_module() -> None:
    for args in (("foreman.py", "--version"), ("-m", "foreman", "--version")):
        result = run(*args)
        assert result.returncode == 0
        assert result.stdout.strip() == f"foreman {__version__}"


def test_check_prints_resolved_settings_with_secrets_redacted(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("token: hunter2\ntarget:\n  token: sesame\n  url: http://u:pw@127.0.0.1:1\n")
    result = run("foreman.py", "-c", str(config), "--check")
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout and "sesame" not in result.stdout
    assert ":pw@" not in result.stdout
    assert "token: <redacted>" in result.stdout
    assert "threads: 145" in result.stdout
    # In the units people write (issue 17): not 600.0, 604800.0 and 67108864.
    for line in ("read_timeout: 10m", "stall_timeout: 1m", "retention: 7d", "max_body: 64MB",
                 "max_wait: 0s", "repoll_cooldown: 1s"):
        assert f"  {line}\n" in result.stdout, line


def test_the_job_store_defaults_to_the_per_user_data_folder(tmp_path: Path) -> None:
    """Not `foreman.db` in whatever folder foreman starts in (the repo, or `/` under
    launchd); shown by --check, created on first start, and named at start-up."""
    data = tmp_path / "data"
    env = {"XDG_DATA_HOME": str(data), "HOME": str(tmp_path / "home")}
    config = tmp_path / "c.yaml"
    config.write_text("listen: 127.0.0.1:0\ntoken: t0k\ntarget:\n  url: http://127.0.0.1:9\n")
    shown = run("foreman.py", "-c", str(config), "--check", env=env)
    db = data / "foreman" / "foreman.db"
    assert f"  db: {db}\n" in shown.stdout
    proc = ForemanProcess("-c", str(config), env=env, cwd=tmp_path)
    try:
        url = proc.wait_serving()
        line = proc.wait_for_line("auth ")
        assert line.string.rstrip().endswith(
            f"auth on (bearer token); status page {url}/status; job store {db}")
        assert db.exists()
    finally:
        assert proc.terminate() == 0
    assert not (tmp_path / "foreman.db").exists()
    assert default_job_store({"HOME": "/Users/me"}, "darwin") == \
        "/Users/me/Library/Application Support/foreman/foreman.db"
    assert default_job_store({"HOME": "/home/me", "XDG_DATA_HOME": "relative"}, "linux") == \
        "/home/me/.local/share/foreman/foreman.db"


def test_check_with_a_typo_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("chat:\n  max_queu: 3\n")
    result = run("foreman.py", "-c", str(config), "--check")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"foreman: config error: {config}: chat.max_queu: unknown key "
        "(known keys here: concurrency, max_queue, max_wait, affinity_wait)"
    ]


def test_serving_with_a_bad_duration_exits_2_before_binding(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("listen: 127.0.0.1:0\ninventory:\n  poll_interval: often\n")
    result = run("foreman.py", "-c", str(config))
    assert result.returncode == 2
    assert "inventory.poll_interval" in result.stderr
    assert "foreman serving on" not in result.stderr


def test_serves_health_at_once_and_drains_on_sigterm(tmp_path: Path) -> None:
    # The target is down: start-up must not wait for it.
    config = tmp_path / "c.yaml"
    config.write_text("listen: 127.0.0.1:0\ntarget:\n  url: http://127.0.0.1:9\n"
                      f"jobs:\n  db: {tmp_path / 'j.db'}\n")
    started = time.monotonic()
    proc = ForemanProcess("-c", str(config))
    try:
        url = proc.wait_serving()
        health = requests.get(url + "/healthz", timeout=5)
        elapsed = time.monotonic() - started
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        print(f"healthz answered {elapsed:.2f}s after spawn")
    finally:
        code = proc.terminate()
    assert code == 0
    assert any("foreman stopped" in line for line in proc.log)


def test_serves_on_builtin_defaults_without_a_file(fake: FakeOllama, tmp_path: Path) -> None:
    proc = ForemanProcess(cwd=tmp_path)
    try:
        url = proc.wait_serving()
        assert url == "http://127.0.0.1:11435"
        assert requests.get(url + "/healthz", timeout=5).status_code == 200
    finally:
        assert proc.terminate() == 0
