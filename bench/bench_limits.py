"""What large inputs cost foreman: big bodies waiting for the chat slot, and one huge line.

- Five clients each send a 60 MB chat body while one generation holds the chat
  slot, so all five wait; foreman's peak RSS (VmHWM) is read once they all
  wait, and again after they have all been served.  Each body must reach the
  target byte for byte (its length and digest are compared there).
- A target answers with one NDJSON line of 200 MB, sent in 64 KB writes; the
  client reads it straight from the target and through foreman in the same
  run.  Reported: seconds, and foreman's peak RSS against the line's size.

Each scenario runs a fresh foreman process, so its VmHWM is that scenario's
own peak.  Run: `python -m bench.bench_limits [--body-mb 60] [--line-mb 200]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import threading
import time
from typing import Any

import requests

from bench.common import machine, proc_status, rss_mb, start_fake, start_foreman
from tests.http_raw import send_only


def peak_mb(pid: int) -> float:
    return int(proc_status(pid)["VmHWM"].split()[0]) / 1024


def waiting_bodies(body_mb: int, clients: int) -> dict[str, Any]:
    fake = start_fake()
    foreman = start_foreman(fake.url)
    try:
        idle = rss_mb(proc_status(foreman.pid))
        holder = send_only(foreman.url, "/api/chat", json.dumps({
            "model": "llama3", "messages": [],
            "options": {"num_predict": 1, "fake_first_token_delay": 600}}).encode())
        deadline = time.monotonic() + 10
        while requests.get(foreman.url + "/healthz", timeout=5).json()["chat"]["in_flight"] < 1:
            assert time.monotonic() < deadline, "the holder never took the slot"
            time.sleep(0.01)
        filler = "x" * (body_mb * 1024 * 1024)
        body = json.dumps({"model": "llama3", "stream": False, "options": {"num_predict": 1},
                           "messages": [{"role": "user", "content": filler}]}).encode()
        del filler
        digest = hashlib.sha256(body).hexdigest()
        answers: list[int] = []

        def send() -> None:
            response = requests.post(foreman.url + "/api/chat", data=body, timeout=600,
                                     headers={"Content-Type": "application/json"})
            answers.append(response.status_code)

        started = time.monotonic()
        threads = [threading.Thread(target=send) for _ in range(clients)]
        for thread in threads:
            thread.start()
        while requests.get(foreman.url + "/healthz", timeout=5).json()["chat"]["waiting"] \
                < clients:
            assert time.monotonic() - started < 300, "the clients never all waited"
            time.sleep(0.05)
        all_waiting = time.monotonic() - started
        status = proc_status(foreman.pid)
        while_waiting = {"rss_mb": rss_mb(status), "peak_mb": peak_mb(foreman.pid)}
        holder.close()  # the slot frees; the five are served one by one
        for thread in threads:
            thread.join(600)
        received = requests.get(fake.url + "/fake/stats", timeout=30).json()
        return {
            "body_mb": len(body) / 1024 / 1024, "clients": clients, "idle_mb": idle,
            "seconds_until_all_waiting": all_waiting, **while_waiting,
            "peak_mb_after_all_served": peak_mb(foreman.pid),
            "statuses": answers, "digest_ok": received.get("body_digests", []).count(digest),
        }
    finally:
        foreman.stop()
        fake.stop()


class OneLineTarget:
    """A target whose every chat answer is one NDJSON line of `size` bytes."""

    def __init__(self, size: int) -> None:
        head, tail = b'{"message":{"role":"assistant","content":"', b'"},"done":true}\n'
        self.payload = head + b"x" * (size - len(head) - len(tail)) + tail
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:  # read it all: closing on unread input resets
                body += conn.recv(65536)
            if request.startswith(b"GET /api/"):  # foreman's inventory polls
                body = b'{"models":[{"name":"llama3:latest","model":"llama3:latest"}]}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (len(body), body))
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                         b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            view = memoryview(self.payload)
            for start in range(0, len(view), 65536):
                piece = view[start:start + 65536]
                conn.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            conn.sendall(b"0\r\n\r\n")


def read_line(url: str) -> tuple[float, int]:
    started = time.monotonic()
    with requests.post(url + "/api/chat", stream=True, timeout=600,
                       json={"model": "llama3", "messages": []}) as response:
        size = sum(len(part) for part in response.iter_content(1024 * 1024))
    return time.monotonic() - started, size


def huge_line(line_mb: int) -> dict[str, Any]:
    target = OneLineTarget(line_mb * 1024 * 1024)
    foreman = start_foreman(target.url)
    try:
        idle = rss_mb(proc_status(foreman.pid))
        direct_s, direct_size = read_line(target.url)
        via_s, via_size = read_line(foreman.url)
        return {"line_mb": line_mb, "direct_s": direct_s, "foreman_s": via_s,
                "same_size": direct_size == via_size == len(target.payload),
                "idle_mb": idle, "peak_mb": peak_mb(foreman.pid),
                "peak_over_line": peak_mb(foreman.pid) / line_mb}
    finally:
        foreman.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--body-mb", type=int, default=60)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--line-mb", type=int, default=200)
    args = parser.parse_args()
    print(machine())
    print(json.dumps({"waiting_bodies": waiting_bodies(args.body_mb, args.clients)}, indent=1))
    print(json.dumps({"huge_line": huge_line(args.line_mb)}, indent=1))


if __name__ == "__main__":
    main()
