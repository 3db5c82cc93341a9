"""Shared benchmark plumbing: processes for the fake target and for foreman, and statistics.

The fake Ollama and foreman each run in their own process, so the load
generator, the proxy and the target do not share a GIL; every measurement
runs the same workload directly against the target and through foreman, in
the same run, and reports both.
"""

from __future__ import annotations

import http.client
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parent.parent


class Child:
    """A child process whose first matching stdout/stderr line carries its URL."""

    def __init__(self, args: Sequence[str], pattern: str, stream: str = "stdout") -> None:
        # Open for the child's whole life, so no context manager.
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        out = subprocess.PIPE if stream == "stdout" else self.log
        err = subprocess.PIPE if stream == "stderr" else self.log
        self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out, stderr=err,
                                     text=True)
        pipe = self.proc.stdout if stream == "stdout" else self.proc.stderr
        assert pipe is not None
        wanted = re.compile(pattern)
        for line in pipe:
            match = wanted.search(line)
            if match:
                self.url = match.group(1)
                break
        else:
            raise RuntimeError(f"{args} exited before printing {pattern!r}")
        # Keep draining the pipe into the log so the child never blocks on it.
        def drain() -> None:
            for line in pipe:
                self.log.write(line)

        threading.Thread(target=drain, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_fake() -> Child:
    return Child(["-m", "tests.fake_ollama"], r"listening on (http://\S+)")


def start_foreman(target_url: str, extra: str = "", target_extra: str = "",
                  db: str = "", jobs_extra: str = "") -> Child:
    """foreman on an ephemeral port; `extra` is YAML for other sections, `target_extra`
    and `jobs_extra` indented lines for the target and jobs sections; `db` the job
    store (default: a new SQLite file)."""
    folder = Path(tempfile.mkdtemp())
    config = folder / "bench.yaml"
    config.write_text(f"listen: 127.0.0.1:0\ntarget:\n  url: {target_url}\n{target_extra}"
                      f"jobs:\n  db: {db or folder / 'bench.db'}\n{jobs_extra}{extra}")
    child = Child(["foreman.py", "-c", str(config)], r"foreman serving on (http://\S+),",
                  stream="stderr")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # wait for the first poll so models are known
        if requests.get(child.url + "/healthz", timeout=5).json()["degraded"] is False:
            break
        time.sleep(0.02)
    return child


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def rss_mb(status: dict[str, str]) -> float:
    """Resident memory in MB, from `proc_status`."""
    return int(status["VmRSS"].split()[0]) / 1024


def pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"p50": pct(values, 50), "p90": pct(values, 90), "p99": pct(values, 99),
            "mean": statistics.fmean(values) if values else float("nan"), "n": len(values)}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


class KeepAlive:
    """A lean keep-alive HTTP client (http.client), so the load generator spends as
    little of the machine's two cores as possible on itself."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self._conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = self._conn.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self._conn.close()
