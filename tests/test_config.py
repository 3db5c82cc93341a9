"""The config file's contract: defaults, units, unknown keys, env overrides, redaction."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from foreman.config import ConfigError, load_config, parse_config, parse_duration, parse_size
from foreman.store import StoreCorrupt, open_store


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_without_a_file() -> None:
    config = load_config(None, environ={})
    assert str(config.listen) == "127.0.0.1:11435"
    assert config.target.url == "http://127.0.0.1:11434"
    assert config.target.read_timeout == 600
    assert config.chat.concurrency == 1 and config.chat.max_queue == 64
    assert config.server.max_body == 64 * 1024**2
    assert config.threads == 64 + 1 + 64 + 0 + 16


def test_example_config_is_valid_and_matches_the_defaults() -> None:
    example = Path(__file__).parent.parent / "foreman.example.yaml"
    assert load_config(str(example), environ={}) == load_config(None, environ={})


@pytest.mark.parametrize(("text", "seconds"), [
    (30, 30.0), (2.5, 2.5), ("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0),
    ("7d", 604800.0), ("10", 10.0), (" 1.5s ", 1.5),
])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["10 minutes", "5x", "-3s", -1, True, "", [1], None])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(("text", "size"), [
    (1000, 1000), ("512KB", 512 * 1024), ("64MB", 64 * 1024**2), ("1gb", 1024**3), ("10", 10),
])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["64 parsecs", 0, -5, "MB", False])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize(("text", "key", "fragment"), [
    ("chat:\n  max_queu: 3\n", "chat.max_queu", "unknown key"),
    ("tokn: x\n", "tokn", "unknown key"),
    ("target:\n  read_timeout: 10 minutes\n", "target.read_timeout", "duration"),
    ("chat:\n  concurrency: 0\n", "chat.concurrency", ">= 1"),
    ("chat:\n  max_queue: -1\n", "chat.max_queue", ">= 0"),
    ("chat: 5\n", "chat", "mapping"),
    ("listen: nowhere\n", "listen", "host:port"),
    ("target:\n  url: ftp://x\n", "target.url", "http(s) URL"),
    ("target:\n  allow_admin: maybe\n", "target.allow_admin", "true or false"),
    ("log:\n  format: xml\n", "log.format", "text, json"),
    ("server:\n  max_body: lots\n", "server.max_body", "size"),
    # Regressions (issue 13.15): each passed --check and then broke the daemon.
    ("target:\n  read_timeout: 0\n", "target.read_timeout", "at least 1ms"),
    ("target:\n  connect_timeout: 0s\n", "target.connect_timeout", "at least 1ms"),
    ("inventory:\n  poll_interval: 0\n", "inventory.poll_interval", "at least 100ms"),
    ("inventory:\n  poll_interval: 5ms\n", "inventory.poll_interval", "at least 100ms"),
    ("jobs:\n  retention: 0\n", "jobs.retention", "at least 1s"),
    ("token: 0123\n", "token", "put it in quotes"),
    ("target:\n  token: 12.50\n", "target.token", "put it in quotes"),
    ("jobs:\n  webhook_secret: whsec_not*base64\n", "jobs.webhook_secret", "base64"),
    ("jobs:\n  webhook_hosts: [1, 2]\n", "jobs.webhook_hosts", "list of strings"),
    ("cors:\n  origins: {a: b}\n", "cors.origins", "list of strings"),
    ("server:\n  allowed_hosts: 7\n", "server.allowed_hosts", "list of strings"),
])
def test_errors_name_the_file_and_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.key == key
    assert fragment in caught.value.problem
    assert str(caught.value).startswith(f"{path}: {key}: ")


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(str(tmp_path / "missing.yaml"), environ={})
    with pytest.raises(ConfigError, match="not valid YAML at line 3"):
        load_config(write(tmp_path, "chat:\n  - [unclosed\n"), environ={})


def test_env_overrides_tokens(tmp_path: Path) -> None:
    path = write(tmp_path, "token: from-file\ntarget:\n  token: target-from-file\n")
    config = load_config(path, environ={"FOREMAN_TOKEN": "env-in",
                                        "FOREMAN_TARGET_TOKEN": "env-out"})
    assert config.token == "env-in" and config.target.token == "env-out"
    assert load_config(path, environ={}).token == "from-file"


def test_the_door_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "cors:\n  origins: [chrome-extension://*]\nserver:\n"
                           "  allowed_hosts: gpu.example.com, nas.example.com\njobs:\n"
                           "  webhook_secret: whsec_c2VjcmV0\n  webhook_hosts: [hooks.example]\n")
    config = load_config(path, environ={"FOREMAN_WEBHOOK_SECRET": "from-env"})
    assert config.cors.origins == ("chrome-extension://*",)
    assert config.server.allowed_hosts == ("gpu.example.com", "nas.example.com")
    assert config.jobs.webhook_hosts == ("hooks.example",)
    assert config.jobs.webhook_secret == "from-env"  # the environment wins, as for tokens
    assert load_config(path, environ={}).jobs.webhook_secret == "whsec_c2VjcmV0"
    shown = config.redacted()
    assert shown["jobs"]["webhook_secret"] == "<redacted>"
    assert shown["cors"]["origins"] == ["chrome-extension://*"]
    with pytest.raises(ConfigError, match=r"FOREMAN_WEBHOOK_SECRET: .*base64"):
        load_config(path, environ={"FOREMAN_WEBHOOK_SECRET": "whsec_%%%"})


def test_an_empty_env_token_counts_as_unset(tmp_path: Path) -> None:
    """Regression (issue 13.15): `FOREMAN_TOKEN=""` silently switched auth off."""
    path = write(tmp_path, "token: from-file\ntarget:\n  token: target-from-file\n")
    config = load_config(path, environ={"FOREMAN_TOKEN": "", "FOREMAN_TARGET_TOKEN": ""})
    assert config.token == "from-file" and config.target.token == "target-from-file"


def test_a_quoted_token_keeps_its_leading_zero(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, 'token: "0123"\n'), environ={}).token == "0123"


def test_redacted_hides_secrets_and_resolves_threads() -> None:
    config = parse_config({"token": "s3cret", "target": {
        "token": "t0ken", "url": "http://user:pw@gpu:11434"}, "server": {"threads": 0}})
    shown = config.redacted()
    assert shown["token"] == "<redacted>" and shown["target"]["token"] == "<redacted>"
    assert "pw" not in shown["target"]["url"] and "gpu:11434" in shown["target"]["url"]
    assert shown["server"]["threads"] == config.threads == 81 + 64  # both lanes waiting
    assert parse_config({"server": {"threads": 7}}).threads == 7


def test_a_postgresql_store_url_is_redacted_and_may_come_from_the_environment(
        tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("jobs:\n  db: postgresql://foreman:hunter2@db.lan/jobs\n")
    config = load_config(str(path), environ={})
    assert config.jobs.db == "postgresql://foreman:hunter2@db.lan/jobs"
    assert "hunter2" not in str(config.redacted())
    assert config.redacted()["jobs"]["db"] == "postgresql://<redacted>@db.lan/jobs"
    assert config.jobs.host_name and config.jobs.lease_timeout == 30.0
    env = {"FOREMAN_JOBS_DB": "postgresql://foreman:other@db2.lan/jobs"}
    assert load_config(str(path), environ=env).jobs.db.endswith("@db2.lan/jobs")
    with pytest.raises(ConfigError, match="lease_timeout"):
        parse_config({"jobs": {"lease_timeout": "1s"}})


def test_without_the_postgresql_driver_the_error_names_the_file_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "foreman.store_postgres", raising=False)
    with pytest.raises(StoreCorrupt, match=r"requirements-postgres\.txt"):
        open_store("postgresql://foreman@127.0.0.1:9/jobs", host="h")
