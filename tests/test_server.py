"""The waitress server's thread pool: short work stays on the threads that are already warm."""

from __future__ import annotations

import logging

import pytest
import requests

from foreman.daemon import Daemon


def test_sequential_requests_reuse_the_newest_idle_thread(
        foreman: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    # The pool is sized for every queued chat (84 threads here).  waitress's own
    # dispatcher spreads 40 requests in a row over dozens of threads (36 when measured).
    assert foreman.config.threads > 40
    with caplog.at_level(logging.INFO, logger="foreman.access"), requests.Session() as client:
        for _ in range(40):
            assert client.get(foreman.url + "/healthz", timeout=5).status_code == 200
        assert foreman.app.wait_idle(5)  # the last access line follows its answer
    served_by = {r.threadName for r in caplog.records if r.name == "foreman.access"}
    assert len([r for r in caplog.records if r.name == "foreman.access"]) == 40
    # One thread, or two when the next request arrives while the last thread is
    # still on its way back to idle.
    assert 1 <= len(served_by) <= 4, served_by
