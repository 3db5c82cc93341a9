"""Headless Chromium for looking at the status page as a person would, and for using it:
`rendered_dom` reads the page after its scripts ran; `browser_page` drives it (clicks)
through Playwright, with Debian's Chromium, never a downloaded browser."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


def chromium() -> str:
    """The browser binary; a skip locally without one, a failure in CI (which installs it)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("Chromium is missing in CI: .ci/run must install Debian's chromium")
    pytest.skip("Chromium is not installed (apt-get install chromium); CI runs this test")


def rendered_dom(url: str, budget_ms: int = 4000) -> str:
    """The page's DOM after its scripts ran for `budget_ms` of virtual time."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}",
             f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def screenshot(url: str, path: str, budget_ms: int = 4000) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", "--window-size=1000,900",
             f"--virtual-time-budget={budget_ms}", f"--screenshot={path}", url],
            capture_output=True, text=True, timeout=60, check=True)


@contextlib.contextmanager
def browser_page(*extra_flags: str) -> Iterator[Any]:
    """A Playwright page in headless Chromium (the same binary and flags as above, and
    `extra_flags`)."""
    from playwright.sync_api import sync_playwright

    binary = chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=binary, args=[*FLAGS, *extra_flags])
        try:
            page = browser.new_page()
            page.set_default_timeout(10_000)
            yield page
        finally:
            browser.close()
