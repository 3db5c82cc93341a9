"""foreman from Python: the README's own snippet, the in-process daemon, and the client
(issue 17)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import foreman
from tests.fake_ollama import FakeOllama
from tests.procs import ROOT

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}


def readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use from Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python section has no code block"
    return match.group(1)


def test_the_readme_snippet_runs_as_written(fake: FakeOllama, tmp_path: Path) -> None:
    """The snippet, with only the target's address changed to the fake's, in a fresh
    interpreter: so the README cannot drift from the API."""
    code = readme_snippet()
    assert code.count("http://127.0.0.1:11434") == 1
    code = code.replace("http://127.0.0.1:11434", fake.url)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "succeeded tok0 tok1 tok2 tok3 tok4 \n1 succeeded\n"
    assert (tmp_path / "jobs.db").exists()


def test_only_the_three_names_are_public() -> None:
    assert foreman.__all__ == ["Client", "Foreman", "ForemanError"]


def test_foreman_in_process_with_a_yaml_path(fake: FakeOllama, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"listen: 127.0.0.1:0\ntoken: for-foreman\ntarget:\n  url: {fake.url}\n"
                      f"jobs:\n  db: {tmp_path / 'j.db'}\n")
    fm = foreman.Foreman(config).start()
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", fm.url) and not fm.url.endswith(":0")
        with pytest.raises(foreman.ForemanError) as refused:
            foreman.Client(fm.url).get("x")
        assert refused.value.status == 401 and "bearer token" in refused.value.message
        client = foreman.Client(fm.url, token="for-foreman")
        job = client.submit("generate", {"model": "llama3", "prompt": "hi"}, priority=2,
                            idempotency_key="k-1")
        assert client.submit("generate", {"model": "llama3", "prompt": "hi"}, priority=2,
                             idempotency_key="k-1")["id"] == job["id"]
        done = client.wait(job["id"], timeout=30)
        assert done["status"] == "succeeded" and client.get(job["id"]) == done
        with pytest.raises(foreman.ForemanError) as late:
            client.cancel(job["id"])
        assert late.value.status == 409
        assert client.delete(job["id"]) == {"id": job["id"], "deleted": True}
        with pytest.raises(foreman.ForemanError) as gone:
            client.get(job["id"])
        assert gone.value.status == 404
    finally:
        assert fm.stop() is True
    assert fm.stop() is True  # idempotent


def test_list_follows_the_cursor_across_pages(fake: FakeOllama, tmp_path: Path) -> None:
    fake.stop()  # the jobs stay queued
    with foreman.Foreman({"listen": "127.0.0.1:0", "target": {"url": fake.url},
                          "jobs": {"db": str(tmp_path / "j.db")}}) as fm:
        client = foreman.Client(fm.url)
        ids = [client.submit("embed", {"model": "nomic-embed-text", "input": str(i)})["id"]
               for i in range(520)]
        listed = client.list(status="queued", kind="embed", limit=600, brief=True)
        assert [job["id"] for job in listed] == ids[::-1]
        assert [job["id"] for job in client.list(limit=510)] == ids[:-511:-1]
        page = client.page(limit=2)
        assert len(page["jobs"]) == 2 and page["next"] is not None
        with pytest.raises(foreman.ForemanError, match=r"still queued after 0\.2s"):
            client.wait(ids[0], timeout=0.2)


def test_errors_are_foreman_errors(tmp_path: Path) -> None:
    with pytest.raises(foreman.ForemanError, match=r"config error: <dict>: chat\.max_queu"):
        foreman.Foreman({"chat": {"max_queu": 3}})
    with pytest.raises(foreman.ForemanError, match="not running"):
        _ = foreman.Foreman({"listen": "127.0.0.1:0"}).url
    nobody = foreman.Client("http://127.0.0.1:9", timeout=2)
    with pytest.raises(foreman.ForemanError, match="cannot reach foreman at") as unreachable:
        nobody.list()
    assert unreachable.value.status is None
    db = str(tmp_path / "j.db")
    with foreman.Foreman({"listen": "127.0.0.1:0", "jobs": {"db": db}}), \
            pytest.raises(foreman.ForemanError, match="in use by another foreman"):
        foreman.Foreman({"listen": "127.0.0.1:0", "jobs": {"db": db}}).start()
