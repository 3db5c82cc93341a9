"""Raw HTTP requests with the path sent exactly as written (no client-side normalising)."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(base_url: str, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes | None = None, timeout: float = 10.0) -> RawResponse:
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        own_host = any(name.lower() == "host" for name in headers or {})
        conn.putrequest(method, path, skip_accept_encoding=True, skip_host=own_host)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        data = response.read()
        return RawResponse(response.status, {k.lower(): v for k, v in response.getheaders()},
                           data)
    finally:
        conn.close()


class ChunkReader:
    """Reads a chunked HTTP response off a raw socket, keeping each chunk as sent."""

    def __init__(self, base_url: str, method: str, path: str, body: bytes,
                 headers: dict[str, str] | None = None, timeout: float = 10.0) -> None:
        import socket

        parts = urlsplit(base_url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}",
                 f"Content-Length: {len(body)}", "Content-Type: application/json"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        self.file = self.sock.makefile("rb")
        status_line = self.file.readline().decode()
        self.status = int(status_line.split()[1])
        self.headers: dict[str, str] = {}
        while (line := self.file.readline().decode().strip()):
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def next_chunk(self) -> bytes | None:
        """The next chunk's payload, or None at the end of the body."""
        size = int(self.file.readline().strip(), 16)
        if size == 0:
            self.file.readline()
            return None
        data = self.file.read(size)
        self.file.readline()
        return data

    def chunks(self) -> list[bytes]:
        out = []
        while (chunk := self.next_chunk()) is not None:
            out.append(chunk)
        return out

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def send_only(base_url: str, path: str, body: bytes, method: str = "POST") -> Any:
    """Send a request on a fresh socket and return the socket without reading anything."""
    import socket

    parts = urlsplit(base_url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    head = (f"{method} {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock
