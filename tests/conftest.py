"""Fixtures: a fake Ollama on loopback and foreman daemons in front of it."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from foreman.config import parse_config
from foreman.daemon import Daemon, build_daemon
from tests.fake_ollama import FakeOllama


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
def foreman(make_foreman: Callable[..., Daemon]) -> Daemon:
    return make_foreman()
