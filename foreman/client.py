"""A Python client for a running foreman's job queue, in-process or remote.

`Client(url, token)` submits, waits for, reads, lists, cancels and deletes
jobs over HTTP.  Every failure raises ForemanError: foreman's own refusals
carry the HTTP status and foreman's message, and a daemon that cannot be
reached raises it too (status None).  The command line's `jobs ...` verbs
are built on it.
"""

from __future__ import annotations

import time
from typing import Any

import requests

FINAL = ("succeeded", "failed", "cancelled")
PAGE_LIMIT = 500  # the most jobs foreman lists in one page
LONG_POLL = 60.0  # the longest `?wait` foreman holds


class ForemanError(Exception):
    """A refusal from foreman (`status` is its HTTP status), or no foreman to ask
    (`status` is None)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message if status is None else f"{status}: {message}")
        self.status, self.message = status, message


class Client:
    def __init__(self, url: str, token: str | None = None, timeout: float = 90.0) -> None:
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._session = requests.Session()
        self._session.trust_env = False  # never route loopback through an HTTP_PROXY
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    def submit(self, kind: str, request: dict[str, Any], *, priority: int = 0,
               webhook: str | None = None, idempotency_key: str | None = None
               ) -> dict[str, Any]:
        """Queue a job (`kind` chat, generate or embed; `request` the Ollama body)."""
        body: dict[str, Any] = {"kind": kind, "request": request, "priority": priority}
        if webhook is not None:
            body["webhook"] = webhook
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        job: dict[str, Any] = self._call("POST", "/jobs", json=body, headers=headers)
        return job

    def get(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._call("GET", f"/jobs/{job_id}")
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The job once it has ended; ForemanError if it has not within `timeout`
        seconds (None: wait as long as it takes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = LONG_POLL if deadline is None else deadline - time.monotonic()
            asked = time.monotonic()
            job: dict[str, Any] = self._call("GET", f"/jobs/{job_id}", params={
                "wait": f"{max(0.0, min(LONG_POLL, left)):.3f}"})
            if job["status"] in FINAL:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise ForemanError(None, f"job {job_id} is still {job['status']} after"
                                         f" {timeout:g}s")
            if time.monotonic() - asked < 1.0:
                time.sleep(1.0)  # foreman had no long-poll to spare: do not spin

    def page(self, status: str | None = None, kind: str | None = None, limit: int = 50,
             after: str | None = None, brief: bool = False) -> dict[str, Any]:
        """One page, newest first: `{"jobs": [...], "next": cursor or None}`."""
        params = {key: value for key, value in (
            ("status", status), ("kind", kind), ("limit", limit), ("after", after),
            ("brief", "1" if brief else None)) if value is not None}
        listed: dict[str, Any] = self._call("GET", "/jobs", params=params)
        return listed

    def list(self, status: str | None = None, kind: str | None = None, limit: int = 50,
             brief: bool = False) -> list[dict[str, Any]]:
        """Up to `limit` jobs, newest first, following the cursor across pages."""
        jobs: list[dict[str, Any]] = []
        after = None
        while len(jobs) < limit:
            listed = self.page(status, kind, min(PAGE_LIMIT, limit - len(jobs)), after, brief)
            jobs += listed["jobs"]
            after = listed["next"]
            if after is None:
                break
        return jobs

    def cancel(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._call("POST", f"/jobs/{job_id}/cancel")
        return job

    def delete(self, job_id: str) -> dict[str, Any]:
        deleted: dict[str, Any] = self._call("DELETE", f"/jobs/{job_id}")
        return deleted

    def close(self) -> None:
        self._session.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._session.request(method, self.url + path, timeout=self._timeout,
                                             **kwargs)
        except requests.RequestException as exc:
            raise ForemanError(None, f"cannot reach foreman at {self.url}:"
                                     f" {type(exc).__name__}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            error = body.get("error") if isinstance(body, dict) else None
            if isinstance(error, dict):  # OpenAI's shape
                error = error.get("message")
            raise ForemanError(response.status_code, str(error or response.text.strip()
                                                          or response.reason))
        if body is None:
            raise ForemanError(response.status_code, "foreman answered with something that"
                                                     " is not JSON")
        return body
