"""The official JavaScript client (npm `ollama`), run by Node.js against foreman."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from foreman.daemon import Daemon
from tests.fake_ollama import FakeOllama, embedding_for

JS = Path(__file__).parent / "js"


@pytest.fixture(scope="session")
def node() -> str:
    """Node.js with the client installed from tests/js/package-lock.json.  Skipped where
    there is no Node.js, except in CI, which installs it."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must provide node and npm (Debian's nodejs and npm)")
        pytest.skip("node and npm are not installed")
    if not (JS / "node_modules" / "ollama").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS, check=True,
                       timeout=300, capture_output=True)
    return node


def test_the_javascript_client_chats_streams_aborts_generates_embeds_and_lists(
        node: str, foreman: Daemon, fake: FakeOllama) -> None:
    result = subprocess.run([node, str(JS / "client.mjs"), foreman.url], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["chat"] == out["generate"] == "tok0 tok1 tok2 tok3 tok4 "
    assert out["streamed"] == ["tok0 ", "tok1 "] and out["abort"] == "AbortError"
    assert out["embed"] == [embedding_for("a"), embedding_for("b")]
    assert out["list"] == sorted(fake.models)
    assert out["missing"] == {"status": 404, "error": "model 'ghost' not found"}
    # The aborted stream freed the slot and cut the generation on the target.
    assert foreman.chat_lane.wait_for(lambda s: s.in_flight == 0 and s.waiting == 0, 5)
    assert fake.wait_for(lambda: fake.stats.gone == ["/api/chat"])
