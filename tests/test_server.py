"""The waitress server: short work stays on warm threads, and the internals it reaches
are where it reads them."""

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


def test_the_waitress_internals_foreman_reaches_are_where_it_reads_them() -> None:
    """server.py names every waitress internal it uses (read from waitress 3.0.2); an
    upgrade that moves one must fail here, not in production."""
    import inspect

    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser
    from waitress.server import BaseWSGIServer
    from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask

    dispatcher = ThreadedTaskDispatcher()
    assert hasattr(dispatcher, "queue_cv") and hasattr(dispatcher, "lock")
    channel, parser = inspect.getsource(HTTPChannel), inspect.getsource(HTTPRequestParser)
    for name in ("parser_class", "received", "readable", "del_channel", "write_soon",
                 "handle_close", "will_close", "close_when_flushed", "requests", "request"):
        assert hasattr(HTTPChannel, name) or f"self.{name} =" in channel, name
    for name in ("received", "headers_finished", "completed", "error", "expect_continue",
                 "chunked", "content_length", "command", "path", "headers", "adj"):
        assert hasattr(HTTPRequestParser, name) or f"self.{name}" in parser, name
    assert "adj.max_request_body_size" in inspect.getsource(HTTPRequestParser.received)
    assert "error_task_class" in inspect.getsource(HTTPChannel.service)
    assert "to_response" in inspect.getsource(ErrorTask.execute)
    building = inspect.getsource(WSGITask.build_response_header)
    assert "self.chunked_response = True" in building and "set_close_on_finish()" in building
    assert hasattr(WSGITask, "set_close_on_finish")
    assert "self.version = " in inspect.getsource(WSGITask.__mro__[1])
    assert "channel_class(self, conn, addr, self.adj" in inspect.getsource(
        BaseWSGIServer.handle_accept)
