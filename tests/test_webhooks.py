"""Webhooks that can be trusted: signed, only to allowed hosts, never redirected or
proxied, and each attempt bounded as a whole so one slow receiver delays no other."""

from __future__ import annotations

import base64
import json
import re
import socket
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from foreman.config import ListenAddress
from foreman.daemon import Daemon
from foreman.store import Job
from foreman.webhook import WebhookNotifier, WebhookPolicy
from tests.conftest import LogStream
from tests.procs import ROOT
from tests.receiver import Dripper, Receiver

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
SECRET = "whsec_" + base64.b64encode(b"a-key-of-thirty-two-bytes-length").decode()


def readme_verifier() -> Callable[[str, dict[str, str], bytes], bool]:
    """The README's receiver snippet, as written (it follows the specification)."""
    section = (ROOT / "README.md").read_text().split("webhook-signature: v1,", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README shows no receiver snippet"
    namespace: dict[str, Any] = {}
    exec(textwrap.dedent(match.group(1)), namespace)
    return namespace["verified"]


verify = readme_verifier()


def submit(daemon: Daemon, webhook: str) -> requests.Response:
    return requests.post(daemon.url + "/jobs", timeout=5,
                         json={"kind": "chat", "request": CHAT, "webhook": webhook})


# -- which hosts --------------------------------------------------------------------------

@pytest.mark.parametrize("url,problem", [
    ("http://169.254.169.254/latest/meta-data", "link-local or unspecified"),
    ("http://2852039166/", "link-local or unspecified"),  # 169.254.169.254, as a number
    ("http://[fe80::1]/x", "link-local or unspecified"),
    ("http://0.0.0.0:8080/x", "link-local or unspecified"),
    ("http://[::]:8080/x", "link-local or unspecified"),
    ("http://user:pass@example.com/x", "must not carry credentials"),
    ("http://token@example.com/x", "must not carry credentials"),
    ("ftp://example.com/x", "must be an http(s) URL"),
    ("http://example.com:99999/x", "must be an http(s) URL"),
])
def test_webhook_urls_foreman_refuses(url: str, problem: str) -> None:
    policy = WebhookPolicy([], ListenAddress("127.0.0.1", 11435))
    assert problem in (policy.problem(url) or "")


def test_foremans_own_address_is_refused_in_every_spelling(foreman: Daemon) -> None:
    port = foreman.server.port
    for url in (f"http://127.0.0.1:{port}/jobs", f"http://localhost:{port}/jobs",
                f"http://[::1]:{port}/x", f"http://127.1.2.3:{port}/x",
                f"http://LOCALHOST:{port}/x", f"http://foo.localhost:{port}/x",
                f"http://localhost.:{port}/x", f"http://0.0.0.0:{port}/x"):
        answer = submit(foreman, url)
        assert answer.status_code == 400 and "error" in answer.json(), url
    assert requests.get(foreman.url + "/jobs", timeout=5).json()["jobs"] == []
    assert submit(foreman, f"http://127.0.0.1:{port + 1}/hook").status_code == 202


def test_on_every_address_this_machine_is_foreman_but_another_machine_is_not() -> None:
    policy = WebhookPolicy([], ListenAddress("0.0.0.0", 11435), hostname=socket.gethostname())
    mine = socket.getaddrinfo(socket.gethostname(), None)[0][4][0]
    assert policy.problem(f"http://{mine}:11435/x") == "webhook URL points at foreman itself"
    assert policy.problem(f"http://{socket.gethostname()}:11435/x") is not None
    assert policy.problem("http://192.0.2.50:11435/x") is None  # another host, same port
    assert policy.problem(f"http://{mine}:8080/x") is None  # this host, another port


def test_webhook_hosts_is_an_allow_list_compared_as_written() -> None:
    policy = WebhookPolicy(["hooks.example.com", "169.254.169.254"],
                           ListenAddress("127.0.0.1", 11435))
    assert policy.problem("https://hooks.example.com/x") is None
    assert policy.problem("http://169.254.169.254/x") is None  # listed: allowed
    assert "not in jobs.webhook_hosts" in (policy.problem("https://other.example/x") or "")
    assert "not in jobs.webhook_hosts" in (policy.problem("http://127.0.0.1:9/x") or "")
    assert "credentials" in (policy.problem("https://u:p@hooks.example.com/x") or "")


# -- signed ----------------------------------------------------------------------------

@pytest.mark.parametrize("secret", [SECRET, "plain text secret ✓"])
def test_deliveries_are_signed_per_standard_webhooks(
        make_foreman: Callable[..., Daemon], receivers: Callable[..., Receiver],
        secret: str) -> None:
    receiver = receivers()
    daemon = make_foreman(jobs={"webhook_secret": secret})
    job_id = submit(daemon, receiver.url).json()["id"]
    assert receiver.wait(1)
    [delivery] = receiver.got
    assert verify(secret, delivery.headers, delivery.body)
    assert delivery.headers["webhook-id"] == f"msg_{job_id}"
    assert json.loads(delivery.body)["id"] == job_id
    assert not verify("whsec_" + base64.b64encode(b"another key").decode(), delivery.headers,
                      delivery.body)
    assert not verify(secret, delivery.headers, delivery.body.replace(b"succeeded", b"failed"))


def test_without_a_secret_deliveries_are_unsigned(foreman: Daemon,
                                                  receivers: Callable[..., Receiver]) -> None:
    receiver = receivers()
    submit(foreman, receiver.url)
    assert receiver.wait(1)
    assert "webhook-signature" not in receiver.got[0].headers


# -- how they are sent -------------------------------------------------------------------

def job(job_id: str, webhook: str) -> Job:
    return Job(id=job_id, seq=1, kind="chat", model="llama3", status="succeeded", priority=0,
               request_json="{}", webhook=webhook, created_at=0.0, started_at=None,
               finished_at=None, not_before=0.0, attempts=1, result_json=None, error=None)


def notifier(**kwargs: object) -> WebhookNotifier:
    policy = WebhookPolicy([], ListenAddress("127.0.0.1", 1))
    made = WebhookNotifier(lambda j: json.dumps({"id": j.id}).encode(), policy,
                           **kwargs)  # type: ignore[arg-type]
    made.start()
    return made


def test_redirects_are_not_followed(receivers: Callable[..., Receiver]) -> None:
    elsewhere = receivers()
    redirecting = receivers(statuses=(307,), location=elsewhere.url)
    sender = notifier(first_delay=0.01)
    try:
        sender.notify(job("j1", redirecting.url))
        assert redirecting.wait(1)
        later = receivers()
        sender.notify(job("j2", later.url))  # deliveries are served in order of due time
        assert later.wait(1)
    finally:
        sender.stop()
    assert not elsewhere.got and len(redirecting.got) == 1  # a 3xx is not retried either


def test_environment_proxies_are_not_used(receivers: Callable[..., Receiver],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = receivers()
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy.url.removesuffix("/hook"))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    receiver = receivers()
    sender = notifier()
    try:
        sender.notify(job("j1", receiver.url))
        assert receiver.wait(1)
    finally:
        sender.stop()
    assert not proxy.got


def test_a_dripping_receiver_is_cut_at_the_deadline_and_delays_no_other(
        receivers: Callable[..., Receiver], log_text: LogStream) -> None:
    """Before, each read had its own 10 s timeout and deliveries shared one thread: a
    receiver sending a byte every 8 s held every other job's webhook for as long as
    it liked."""
    slow = Dripper(every=0.2)
    fast = receivers()
    sender = notifier(deadline=2.0, attempts=1)
    try:
        started = time.monotonic()
        sender.notify(job("slowjob", slow.url))
        assert slow.connected.wait(5)
        sender.notify(job("fastjob", fast.url))
        assert fast.wait(1, timeout=5)
        assert not slow.hung_up.is_set()  # delivered while the slow one still dripped
        assert slow.hung_up.wait(10)
        cut_after = time.monotonic() - started
    finally:
        sender.stop()
    assert cut_after < 5.0  # the 2 s deadline, not 100,000 bytes at 0.2 s each
    assert log_text.wait_for("webhook of job slowjob to 127.0.0.1 failed")
    assert "webhook of job fastjob delivered to 127.0.0.1" in log_text.getvalue()
