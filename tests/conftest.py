"""Fixtures: a fake Ollama on loopback and foreman daemons in front of it."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from foreman.config import parse_config
from foreman.daemon import Daemon, build_daemon
from foreman.logs import configure_logging
from tests.fake_ollama import FakeOllama
from tests.postgres import Cluster, start_cluster
from tests.receiver import Receiver

# Every inbound token a test gives foreman, and every target token.  None may ever
# appear in a log line; no inbound token may ever reach the fake target.
INBOUND_TOKENS = ("s3cret-token-value", "t0k", "for-foreman", "cli-token", "hunter2",
                  "matrix-Token-1234567890", "pässwörd-ключ-🔑")
TARGET_TOKENS = ("target-secret", "for-ollama", "sesame", "sésame-ключ")

_logged: list[str] = []
_make_record = logging.Logger.makeRecord


def _remembering_make_record(self: logging.Logger, *args: Any, **kwargs: Any
                             ) -> logging.LogRecord:
    record = _make_record(self, *args, **kwargs)  # extra fields are set by now
    with contextlib.suppress(Exception):  # a malformed record is logging's business
        _logged.append(record.getMessage() + " " + str(getattr(record, "fields", "")))
    return record


logging.Logger.makeRecord = _remembering_make_record  # type: ignore[method-assign]


@pytest.fixture(scope="session", autouse=True)
def no_secret_is_ever_logged() -> Iterator[None]:
    """Checked over every log record the whole suite creates, whatever its handlers."""
    logging.getLogger("foreman.tests").warning("capture check", extra={"fields": {"x": "y"}})
    assert _logged and _logged[-1] == "capture check {'x': 'y'}"  # the capture works
    yield
    leaked = [line for line in _logged for secret in INBOUND_TOKENS + TARGET_TOKENS
              if secret in line]
    assert not leaked, leaked[:5]


class LogStream(io.StringIO):
    """A log stream that tests can wait on, since a request is logged after its reply."""

    def __init__(self) -> None:
        super().__init__()
        self.cond = threading.Condition()

    def write(self, text: str) -> int:
        with self.cond:
            written = super().write(text)
            self.cond.notify_all()
        return written

    def wait_for(self, fragment: str, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: fragment in self.getvalue(), timeout)


@pytest.fixture
def log_text() -> Iterator[LogStream]:
    stream = LogStream()
    configure_logging("debug", "text", stream)
    yield stream
    configure_logging("info", "text")


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def config_data(target_url: str, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    base = {
        "listen": "127.0.0.1:0",
        "target": {"url": target_url, "connect_timeout": "2s", "read_timeout": "30s"},
        "inventory": {"poll_interval": "200ms"},
        "jobs": {"db": str(tmp_path / "jobs.db")},
        "server": {"drain_timeout": "5s"},
    }
    return merge(base, overrides)


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    server = FakeOllama().start()
    yield server
    server.stop()
    with server.cond:
        seen = [str(r.headers) + str(r.body) for r in server.received]
    assert not [s for s in seen for token in INBOUND_TOKENS if token in s], \
        "an inbound token reached the target"


@pytest.fixture
def make_foreman(fake: FakeOllama, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def make(upstream: FakeOllama | None = None, **overrides: Any) -> Daemon:
        data = config_data((upstream or fake).url, tmp_path, **overrides)
        daemon = build_daemon(parse_config(data))
        daemon.start()
        daemons.append(daemon)
        daemon.inventory.wait_for(lambda s: s.last_attempt is not None, 5)
        return daemon

    yield make
    for daemon in daemons:
        daemon.shutdown(drain_timeout=2)


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    """Makes webhook receivers, stopped after the test."""
    made: list[Receiver] = []

    def make(**settings: Any) -> Receiver:
        made.append(Receiver(**settings))
        return made[-1]

    yield make
    for receiver in made:
        receiver.stop()


@pytest.fixture
def foreman(make_foreman: Callable[..., Daemon]) -> Daemon:
    return make_foreman()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster for the session (skips locally without one)."""
    yield from start_cluster()
