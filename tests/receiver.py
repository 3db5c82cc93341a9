"""Webhook receivers for tests and benchmarks: a real HTTP server recording each
delivery, and one that answers a byte at a time, forever."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Answers deliveries with `statuses` in turn (the last one from then on), adding
    `location` when set."""

    statuses: tuple[int, ...] = (204,)
    location: str = ""
    got: list[Delivery] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.cond:
                    receiver.got.append(Delivery(
                        self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.statuses[min(len(receiver.got),
                                                   len(receiver.statuses)) - 1]
                    receiver.cond.notify_all()
                self.send_response(status)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?secret=1"

    def wait(self, count: int, timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.got) >= count, timeout)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Dripper:
    """A receiver that answers one byte at a time, forever, until the sender hangs up."""

    def __init__(self, every: float) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/slow"
        self.connected, self.hung_up = threading.Event(), threading.Event()
        self.every = every
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.recv(65536)
        self.connected.set()
        conn.setblocking(False)
        try:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 100_000:
                conn.send(bytes([byte]))
                time.sleep(self.every)
                try:
                    if conn.recv(1, socket.MSG_PEEK) == b"":
                        break  # the sender hung up
                except BlockingIOError:
                    continue  # still connected, nothing sent: drip on
        except OSError:
            pass  # reset by the sender
        finally:
            self.hung_up.set()
            conn.close()
