"""foreman as a real child process, for tests of the command line, signals and crashes."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_SERVING = re.compile(r"foreman serving on (http://\S+),")


class ForemanProcess:
    """Starts `python foreman.py ...` and collects its stderr line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 cwd: Path = ROOT) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "foreman.py"), *args],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = ""

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        wanted = re.compile(pattern)
        while True:
            line = self.lines.get(timeout=timeout)
            if line is None:
                raise AssertionError("foreman exited; log:\n" + "".join(self.log))
            match = wanted.search(line)
            if match:
                return match

    def wait_serving(self, timeout: float = 10.0) -> str:
        self.url = self.wait_for_line(_SERVING.pattern, timeout).group(1)
        return self.url

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
