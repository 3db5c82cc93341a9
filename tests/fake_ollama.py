"""A fake Ollama for tests: a real HTTP/1.1 server on loopback speaking Ollama's wire protocol.

It streams chunked NDJSON (and SSE on /v1) one token per chunk at a set rate,
answers with Ollama's real error bodies and statuses, refuses a non-local
Host with an empty 403 as Ollama does, can require a bearer token, and records
what it received: headers, bodies, peak concurrency of generations and of
embeddings, and streams whose client went away.  Faults can be queued per
route.  It can be stopped (cutting every open connection) and started again
on the same port.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import select
import socket
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from werkzeug.formparser import MultiPartParser

CREATED_AT = "2026-11-26T10:00:00.123456789Z"


def model_entry(name: str, size: int = 4_000_000_000) -> dict[str, Any]:
    digest = hashlib.sha256(name.encode()).hexdigest()
    return {
        "name": name,
        "model": name,
        "modified_at": "2026-11-01T09:30:00.123456789+01:00",
        "size": size,
        "digest": digest,
        "details": {
            "parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
            "parameter_size": "8.0B", "quantization_level": "Q4_K_M",
        },
    }


def embedding_for(text: str, dims: int = 8) -> list[float]:
    digest = hashlib.shake_256(text.encode()).digest(dims)
    return [round((b - 128) / 128, 6) for b in digest]


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Fault:
    """One queued misbehaviour for the next request to a route."""

    # status | garbage | hang | die_after | error_after | truncate_after | line_after |
    # pause_after (silence for `seconds` before token `after`, then carry on)
    kind: str
    status: int = 500
    body: bytes = b'{"error":"something went wrong"}'
    ctype: str = "application/json; charset=utf-8"
    after: int = 0
    seconds: float = 0.0


class ClientGone(Exception):
    pass


@dataclass
class Knobs:
    """Per-request timing: the fake's settings, overridable by `fake_*` keys in `options`
    (so a benchmark can drive a fake running in another process)."""

    token_delay: float
    first_token_delay: float
    embed_delay: float
    stamp: bool  # each token is the send time (time.monotonic()), to measure relay delay
    dims: int = 8  # numbers per embedding

    def word(self, i: int) -> str:
        return f"{time.monotonic():.6f} " if self.stamp else f"tok{i} "


@dataclass
class Gpu:
    """One simulated GPU: `capacity` chat models fit at once, bringing in another
    costs `load_seconds` and evicts the least recently used, and generations run one
    at a time (Ollama on one GPU with OLLAMA_NUM_PARALLEL=1)."""

    capacity: int = 1
    load_seconds: float = 0.5
    resident: list[str] = field(default_factory=list)  # least recently used first
    loads: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bring(self, model: str) -> float:
        """Make `model` resident (call with `lock` held); the seconds the load took."""
        if model in self.resident:
            self.resident.remove(model)
            self.resident.append(model)
            return 0.0
        started = time.monotonic()
        time.sleep(self.load_seconds)
        self.loads += 1
        if len(self.resident) >= self.capacity:
            self.resident.pop(0)
        self.resident.append(model)
        return time.monotonic() - started


@dataclass
class Stats:
    generations_active: int = 0
    generations_peak: int = 0
    embeds_active: int = 0
    embeds_peak: int = 0
    gone: list[str] = field(default_factory=list)  # paths of streams whose client left
    gone_at: list[float] = field(default_factory=list)  # time.monotonic() of each
    # (options.tag, start, end) of each generation, ended or cut: whether two targets
    # ever ran one job at once.
    runs: list[tuple[str, float, float]] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)  # paths of generations that finished
    started_at: list[float] = field(default_factory=list)  # time.monotonic() per generation
    finished_at: list[float] = field(default_factory=list)
    body_digests: list[str] = field(default_factory=list)  # sha256 of each body over 1 MiB
    loads: int = 0  # with a simulated GPU: model loads so far


class FakeOllama:
    def __init__(self, token: str = "", token_delay: float = 0.0, tokens: int = 5,
                 models: tuple[str, ...] = ("llama3:latest", "nomic-embed-text:latest")) -> None:
        self.token = token
        self.token_delay = token_delay
        self.first_token_delay = 0.0
        self.embed_delay = 0.0
        self.tokens = tokens
        self.version = "0.12.6"
        self.models: dict[str, dict[str, Any]] = {m: model_entry(m) for m in models}
        self.loaded: dict[str, Any] = {}  # name -> keep_alive of the last load
        self.received: list[Received] = []
        self.raw_targets: list[str] = []  # each request's path and query, as sent
        self.stats = Stats()
        self.faults: dict[str, deque[Fault]] = defaultdict(deque)
        self.gpu: Gpu | None = None  # set: generations are serialised and pay for loads
        self.cond = threading.Condition()
        self.release = threading.Event()  # lets hung requests go
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self.port = 0

    # -- lifecycle ------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeOllama:
        fake = self

        class Handler(_Handler):
            pass

        Handler.fake = fake
        server = _Server(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self.release.clear()
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection, as a killed Ollama would."""
        server, self._server = self._server, None
        if server is None:
            return
        self.release.set()
        server.shutdown()
        server.server_close()
        with self.cond:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    # -- test helpers -----------------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def changed(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def fault(self, path: str, fault: Fault) -> None:
        self.faults[path].append(fault)

    def requests_to(self, path: str) -> list[Received]:
        with self.cond:
            return [r for r in self.received if r.path == path]

    def add_model(self, name: str) -> None:
        self.models[name] = model_entry(name)

    def has(self, name: str) -> bool:
        if ":" not in name.rsplit("/", 1)[-1]:
            name += ":latest"
        return name.lower() in {m.lower() for m in self.models}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client (foreman) closing its keep-alive connection is normal here.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeOllama

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        # Go's net/http (Ollama) sets TCP_NODELAY; without it a header write and a
        # body write meet Nagle and delayed ACKs and every answer costs 40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.fake.cond:
            self.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.fake.cond:
            self.fake._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    # -- plumbing ---------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, ctype: str = "application/json; charset=utf-8",
              head: bool = False) -> None:
        self.send_response(status)
        if body or status != 403:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode())

    def _error(self, status: int, message: str) -> None:
        """An error in the shape Ollama's middleware gives the route's family."""
        path = self.path.split("?", 1)[0]
        if path == "/v1/messages":
            kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
            self._json(status, {"type": "error", "error": {"type": kind, "message": message},
                                "request_id": "req_fake"})
        elif path.startswith("/v1/"):
            kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
            self._json(status, {"error": {"message": message, "type": kind, "param": None,
                                          "code": None}})
        else:
            self._json(status, {"error": message})

    def _start_stream(self, ctype: str = "application/x-ndjson") -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        except OSError:
            raise ClientGone from None

    def _end_stream(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            raise ClientGone from None

    def _pause(self, seconds: float) -> None:
        """Wait, noticing at once if the client hangs up (as Ollama checks per token)."""
        deadline = time.monotonic() + seconds
        while True:
            left = max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self.connection], [], [], left)
            if readable:
                try:
                    if self.connection.recv(1, socket.MSG_PEEK) == b"":
                        raise ClientGone
                except OSError:
                    raise ClientGone from None
                time.sleep(min(left, 0.005))  # pipelined bytes: keep waiting
            if time.monotonic() >= deadline:
                return

    # -- dispatch ---------------------------------------------------------------

    def __getattr__(self, name: str) -> Callable[[], None]:
        """`do_GET`, `do_PUT`, ...: every method reaches `_handle`, as in Go's router."""
        if name.startswith("do_"):
            return lambda: self._handle(name[3:])
        raise AttributeError(name)

    def _handle(self, method: str) -> None:
        fake = self.fake
        body = self._read_body()
        path = self.path.split("?", 1)[0]
        record = Received(method, path, {k.lower(): v for k, v in self.headers.items()}, body)
        with fake.cond:
            fake.received.append(record)
            fake.raw_targets.append(self.path)
            if len(body) > 1024 * 1024:
                fake.stats.body_digests.append(hashlib.sha256(body).hexdigest())
            fake.cond.notify_all()
        host = self.headers.get("Host", "").rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            self._send(403, b"")
            return
        supplied = self.headers.get("Authorization", "").encode("latin-1", "replace")
        if fake.token and supplied != f"Bearer {fake.token}".encode():
            self._error(401, "unauthorized")
            return
        queued = fake.faults.get(path)
        fault = queued.popleft() if queued else None
        if fault is not None and self._apply_fault(fault):
            return
        route = _ROUTES.get((method if method != "HEAD" else "GET", path))
        if route is None and path.startswith("/v1/models/") and method == "GET":
            route = _Handler.v1_model
        if route is None and path.startswith("/api/blobs/") and method in ("HEAD", "POST"):
            route = _Handler.blobs
        if route is None and path.startswith("/api/user/keys/") and method == "DELETE":
            route = _Handler.small_json
        if route is None:
            self._send(404, b"404 page not found", "text/plain")
            return
        try:
            route(self, record, fault)
        except ClientGone:
            with fake.cond:
                fake.stats.gone.append(path)
                fake.stats.gone_at.append(time.monotonic())
                fake.cond.notify_all()
            self.close_connection = True

    def _apply_fault(self, fault: Fault) -> bool:
        """Apply a fault that replaces the whole answer; return False for stream faults."""
        if fault.kind == "status":
            self._send(fault.status, fault.body, fault.ctype)
        elif fault.kind == "garbage":
            self._send(200, b"<html>this is not json", "text/html")
        elif fault.kind == "hang":
            self.fake.release.wait(fault.seconds or 30)
            self.close_connection = True
        else:
            return False
        return True

    # -- routes ---------------------------------------------------------------

    def root(self, rec: Received, fault: Fault | None) -> None:
        self._send(200, b"Ollama is running", "text/plain; charset=utf-8", rec.method == "HEAD")

    def version(self, rec: Received, fault: Fault | None) -> None:
        self._json(200, {"version": self.fake.version})

    def tags(self, rec: Received, fault: Fault | None) -> None:
        self._json(200, {"models": list(self.fake.models.values())})

    def ps(self, rec: Received, fault: Fault | None) -> None:
        running = []
        gpu = self.fake.gpu
        for name in (list(gpu.resident) if gpu is not None else self.fake.loaded):
            entry = dict(self.fake.models.get(name, model_entry(name)))
            entry.update(expires_at="2318-01-01T00:00:00Z", size_vram=entry["size"],
                         context_length=4096)
            running.append(entry)
        self._json(200, {"models": running})

    def _model_of(self, rec: Received, not_found: str) -> tuple[dict[str, Any], str] | None:
        if rec.path == "/v1/audio/transcriptions":
            return self._transcription_of(rec, not_found)
        if not rec.body.strip():
            self._error(400, "missing request body")
            return None
        try:
            body = json.loads(rec.body)
        except ValueError as exc:
            self._error(400, str(exc))
            return None
        model = body.get("model") or body.get("name") or ""
        if not model:
            self._error(400, "model is required")
            return None
        if not self.fake.has(model):
            self._error(404, not_found.format(model=model))
            return None
        return body, model

    def _transcription_of(self, rec: Received, not_found: str
                          ) -> tuple[dict[str, Any], str] | None:
        """The form of an audio upload, checked as Ollama's TranscriptionMiddleware does."""
        boundary = rec.headers.get("content-type", "").partition("boundary=")[2].strip('"')
        if not boundary:
            self._error(400, "failed to parse multipart form: request Content-Type isn't"
                             " multipart/form-data")
            return None
        form, files = MultiPartParser().parse(io.BytesIO(rec.body), boundary.encode(),
                                              len(rec.body))
        model = form.get("model", "")
        if not model:
            self._error(400, "model is required")
            return None
        if "file" not in files:
            self._error(400, "file is required: http: no such file")
            return None
        audio = files["file"].read()
        if not audio:
            self._error(400, "audio file is empty")
            return None
        if not self.fake.has(model):
            self._error(404, not_found.format(model=model))
            return None
        return {"model": model, "stream": False, "audio_bytes": len(audio),
                "response_format": form.get("response_format", "json")}, model

    def _knobs(self, body: dict[str, Any]) -> Knobs:
        fake = self.fake
        options = body.get("options") or {}
        return Knobs(
            float(options.get("fake_token_delay", fake.token_delay)),
            float(options.get("fake_first_token_delay", fake.first_token_delay)),
            float(options.get("fake_embed_delay", fake.embed_delay)),
            bool(options.get("fake_stamp", False)),
            int(options.get("fake_dims", 8)),
        )

    def _note_load(self, model: str, body: dict[str, Any]) -> None:
        name = model if ":" in model else model + ":latest"
        self.fake.loaded[name] = body.get("keep_alive")

    def _generation(self, rec: Received, fault: Fault | None, kind: str) -> None:
        parsed = self._model_of(rec, "model '{model}' not found")
        if parsed is None:
            return
        body, model = parsed
        fake = self.fake
        self._note_load(model, body)
        count = int((body.get("options") or {}).get("num_predict") or fake.tokens)
        with fake.cond:
            fake.stats.started_at.append(time.monotonic())
            fake.stats.generations_active += 1
            fake.stats.generations_peak = max(fake.stats.generations_peak,
                                              fake.stats.generations_active)
            fake.cond.notify_all()
        knobs = self._knobs(body)
        gpu = fake.gpu
        began = time.monotonic()
        try:
            if gpu is not None:
                gpu.lock.acquire()
                self.load_seconds = gpu.bring(model if ":" in model else model + ":latest")
            self._pause(knobs.first_token_delay)
            if kind in ("chat", "generate"):
                self._ollama_generation(kind, model, body, count, fault, knobs)
            elif kind == "messages":
                self._anthropic_generation(model, body, count, fault, knobs)
            elif kind == "responses":
                self._responses_generation(model, body, count, fault, knobs)
            elif kind == "transcription":
                text = f"heard {body['audio_bytes']} bytes"
                if body["response_format"] == "text":
                    self._send(200, text.encode(), "text/plain; charset=utf-8")
                else:
                    self._json(200, {"text": text})
            else:
                self._openai_generation(kind, model, body, count, knobs)
            with fake.cond:
                fake.stats.completed.append(rec.path)
                fake.stats.finished_at.append(time.monotonic())
        finally:
            if gpu is not None:
                gpu.lock.release()
            with fake.cond:
                fake.stats.generations_active -= 1
                tag = str((body.get("options") or {}).get("tag", ""))
                fake.stats.runs.append((tag, began, time.monotonic()))
                fake.cond.notify_all()

    def _timed(self, final: dict[str, Any], started: float) -> dict[str, Any]:
        """With a simulated GPU, the final chunk's durations are the real ones, in
        nanoseconds as Ollama reports them: the load, and the whole request."""
        if self.fake.gpu is None:
            return final
        load = self.load_seconds
        return {**final, "load_duration": int(load * 1e9),
                "total_duration": int((load + time.monotonic() - started) * 1e9)}

    def _ollama_generation(self, kind: str, model: str, body: dict[str, Any], count: int,
                           fault: Fault | None, knobs: Knobs) -> None:
        words = [f"tok{i} " for i in range(count)]

        def piece(text: str) -> dict[str, Any]:
            if kind == "chat":
                return {"message": {"role": "assistant", "content": text}}
            return {"response": text}

        started = time.monotonic()
        final = {
            "model": model, "created_at": CREATED_AT, **piece(""), "done": True,
            "done_reason": "stop", "total_duration": 123456789, "load_duration": 1234567,
            "prompt_eval_count": 12, "prompt_eval_duration": 2345678,
            "eval_count": count, "eval_duration": 98765432,
        }
        if kind == "generate":
            final["context"] = [1, 2, 3]
        if body.get("stream", True) is False:
            for _ in words:
                self._pause(knobs.token_delay)
            final.update(piece("".join(words)))
            self._json(200, self._timed(final, started))
            return
        self._start_stream()
        for i in range(int((body.get("options") or {}).get("fake_thinking", 0))):
            self._pause(knobs.token_delay)  # a thinking model streams its thinking first
            part = {"role": "assistant", "content": "", "thinking": f"think{i} "}
            chunk = {"model": model, "created_at": CREATED_AT, "done": False,
                     **({"message": part} if kind == "chat" else
                        {"response": "", "thinking": part["thinking"]})}
            self._chunk(json.dumps(chunk, separators=(",", ":")).encode() + b"\n")
        for i in range(count):
            breaks_here = fault is not None and i == fault.after
            if breaks_here and fault.kind == "line_after":
                self._chunk(fault.body + b"\n")  # a line Ollama would never send
            elif breaks_here and fault.kind == "pause_after":
                self._pause(fault.seconds)
            elif breaks_here and fault.kind in ("die_after", "error_after", "truncate_after"):
                if fault.kind == "error_after":
                    self._chunk(b'{"error":"an error was encountered while running the model"}\n')
                    self._end_stream()
                elif fault.kind == "truncate_after":
                    self._chunk(b'{"model":"' + model.encode() + b'","created_at":"20')
                    self._end_stream()
                else:
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                return
            self._pause(knobs.token_delay)
            chunk = {"model": model, "created_at": CREATED_AT, **piece(knobs.word(i)),
                     "done": False}
            self._chunk(json.dumps(chunk, separators=(",", ":")).encode() + b"\n")
        self._chunk(json.dumps(self._timed(final, started), separators=(",", ":")).encode()
                    + b"\n")
        self._end_stream()

    def _openai_generation(self, kind: str, model: str, body: dict[str, Any], count: int,
                           knobs: Knobs) -> None:
        words = [f"tok{i} " for i in range(count)]
        created = 1764151200
        if kind == "chat.completion":
            ident = "chatcmpl-42"

            def choice(text: str | None, done: bool, stream: bool) -> dict[str, Any]:
                if not stream:
                    return {"index": 0, "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop"}
                delta = {"role": "assistant", "content": text} if text is not None else {}
                return {"index": 0, "delta": delta, "finish_reason": "stop" if done else None}
        else:
            ident = "cmpl-42"

            def choice(text: str | None, done: bool, stream: bool) -> dict[str, Any]:
                return {"text": text or "", "index": 0,
                        "finish_reason": "stop" if done else None}
        usage = {"prompt_tokens": 12, "completion_tokens": count, "total_tokens": 12 + count}
        base = {"id": ident, "created": created, "model": model, "system_fingerprint": "fp_ollama"}
        if not body.get("stream"):
            for _ in words:
                self._pause(knobs.token_delay)
            answer = choice("".join(words), True, False)
            self._json(200, {**base, "object": kind, "choices": [answer], "usage": usage})
            return
        self._start_stream("text/event-stream")
        obj = kind + ".chunk" if kind == "chat.completion" else kind
        for word in words:
            self._pause(knobs.token_delay)
            event = {**base, "object": obj, "choices": [choice(word, False, True)]}
            self._chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
        self._chunk(b"data: " + json.dumps(
            {**base, "object": obj, "choices": [choice(None, True, True)]}).encode() + b"\n\n")
        self._chunk(b"data: [DONE]\n\n")
        self._end_stream()

    def _events(self, events: list[tuple[str, dict[str, Any]]], fault: Fault | None,
                 knobs: Knobs, paced: set[str]) -> None:
        """Server-sent events as Ollama writes them, one per chunk; events of a type in
        `paced` wait a token's time first; `die_after` cuts the connection before
        event number `after`."""
        self._start_stream("text/event-stream")
        for number, (name, data) in enumerate(events):
            if fault is not None and fault.kind == "die_after" and number == fault.after:
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if name in paced:
                self._pause(knobs.token_delay)
            self._chunk(f"event: {name}\ndata: ".encode()
                        + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")
        self._end_stream()

    def _anthropic_generation(self, model: str, body: dict[str, Any], count: int,
                              fault: Fault | None, knobs: Knobs) -> None:
        """Anthropic's Messages API as Ollama's middleware answers it; a request with
        tools gets a call of the first one."""
        words = [knobs.word(i) for i in range(count)]
        tools = body.get("tools") or []
        call = ({"type": "tool_use", "id": "toolu_fake1", "name": tools[0]["name"],
                 "input": {"city": "Paris"}} if tools else None)
        stop = "tool_use" if call else "end_turn"
        usage = {"input_tokens": 12, "output_tokens": count}
        message = {"id": "msg_fake1", "type": "message", "role": "assistant", "model": model,
                   "stop_reason": None, "stop_sequence": None}
        if not body.get("stream"):
            content = [{"type": "text", "text": "".join(words)}, *([call] if call else [])]
            self._json(200, {**message, "content": content, "stop_reason": stop,
                             "usage": usage})
            return
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": {
                **message, "content": [], "usage": {"input_tokens": 12, "output_tokens": 0}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            *(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": word}})
              for word in words),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ]
        if call:
            events += [
                ("content_block_start", {"type": "content_block_start", "index": 1,
                                         "content_block": {**call, "input": {}}}),
                ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {
                    "type": "input_json_delta", "partial_json": json.dumps(call["input"])}}),
                ("content_block_stop", {"type": "content_block_stop", "index": 1}),
            ]
        events += [
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": stop, "stop_sequence": None},
                               "usage": {"output_tokens": count}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        self._events(events, fault, knobs, {"content_block_delta"})

    def _responses_generation(self, model: str, body: dict[str, Any], count: int,
                              fault: Fault | None, knobs: Knobs) -> None:
        """OpenAI's Responses API as Ollama's middleware answers it."""
        words = [knobs.word(i) for i in range(count)]
        text = "".join(words)
        item_id = "msg_fake1"
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"type": "message", "id": item_id, "status": "completed", "role": "assistant",
                "content": [part]}
        response = {"id": "resp_fake1", "object": "response", "created_at": 1764151200,
                    "status": "completed", "model": model, "output": [item], "error": None,
                    "incomplete_details": None, "tools": [], "parallel_tool_calls": False,
                    "tool_choice": "auto",
                    "usage": {"input_tokens": 12, "output_tokens": count,
                              "total_tokens": 12 + count}}
        if not body.get("stream"):
            self._json(200, response)
            return
        started = {**response, "status": "in_progress", "output": [], "usage": None}
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        events: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"response": started}),
            ("response.in_progress", {"response": started}),
            ("response.output_item.added", {"output_index": 0, "item": {
                **item, "status": "in_progress", "content": []}}),
            ("response.content_part.added", {**where, "part": {**part, "text": ""}}),
            *(("response.output_text.delta", {**where, "delta": word}) for word in words),
            ("response.output_text.done", {**where, "text": text}),
            ("response.content_part.done", {**where, "part": part}),
            ("response.output_item.done", {"output_index": 0, "item": item}),
            ("response.completed", {"response": response}),
        ]
        self._events([(name, {"type": name, **data, "sequence_number": number})
                      for number, (name, data) in enumerate(events)],
                     fault, knobs, {"response.output_text.delta"})

    def small_json(self, rec: Received, fault: Fault | None) -> None:
        """The routes whose answers foreman only relays: a small JSON object naming the
        route, so a test can tell which one answered."""
        self._json(200, {"route": rec.path, "method": rec.method})

    def _embedding(self, rec: Received, shape: str) -> None:
        parsed = self._model_of(rec, 'model "{model}" not found, try pulling it first')
        if parsed is None:
            return
        body, model = parsed
        fake = self.fake
        with fake.cond:
            fake.stats.embeds_active += 1
            fake.stats.embeds_peak = max(fake.stats.embeds_peak, fake.stats.embeds_active)
            fake.cond.notify_all()
        try:
            self._note_load(model, body)
            knobs = self._knobs(body)
            if knobs.embed_delay:
                time.sleep(knobs.embed_delay)
            inputs = body.get("input", body.get("prompt", ""))
            texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
            texts = [t for t in texts if t]
            vectors = [embedding_for(t, knobs.dims) for t in texts]
            if shape == "embed":
                self._json(200, {"model": model, "embeddings": vectors, "total_duration": 1000,
                                 "load_duration": 10, "prompt_eval_count": len(texts)})
            elif shape == "embeddings":
                self._json(200, {"embedding": vectors[0] if vectors else []})
            else:
                self._json(200, {"object": "list", "model": model, "data": [
                    {"object": "embedding", "embedding": v, "index": i}
                    for i, v in enumerate(vectors)
                ], "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)}})
        finally:
            with fake.cond:
                fake.stats.embeds_active -= 1
                fake.cond.notify_all()

    def embed(self, rec: Received, fault: Fault | None) -> None:
        self._embedding(rec, "embed")

    def embeddings(self, rec: Received, fault: Fault | None) -> None:
        self._embedding(rec, "embeddings")

    def v1_embeddings(self, rec: Received, fault: Fault | None) -> None:
        self._embedding(rec, "v1")

    def show(self, rec: Received, fault: Fault | None) -> None:
        parsed = self._model_of(rec, "model '{model}' not found")
        if parsed is None:
            return
        _, model = parsed
        entry = self.fake.models.get(model if ":" in model else model + ":latest", {})
        self._json(200, {
            "license": "fake", "modelfile": f"FROM {model}\n", "parameters": "stop <|eot|>",
            "template": "{{ .Prompt }}", "details": entry.get("details", {}),
            "model_info": {"general.architecture": "llama"}, "capabilities": ["completion"],
            "modified_at": entry.get("modified_at", CREATED_AT),
        })

    def fake_stats(self, rec: Received, fault: Fault | None) -> None:
        with self.fake.cond:
            if self.fake.gpu is not None:
                self.fake.stats.loads = self.fake.gpu.loads
            self._json(200, dataclasses.asdict(self.fake.stats))

    def v1_models(self, rec: Received, fault: Fault | None) -> None:
        self._json(200, {"object": "list", "data": [
            {"id": name, "object": "model", "created": 1761985800, "owned_by": "library"}
            for name in self.fake.models
        ]})

    def v1_model(self, rec: Received, fault: Fault | None) -> None:
        name = rec.path[len("/v1/models/"):]
        if not self.fake.has(name):
            self._json(404, {"error": {"message": f'model "{name}" not found',
                                       "type": "not_found_error", "param": None, "code": None}})
            return
        self._json(200, {"id": name, "object": "model", "created": 1761985800,
                         "owned_by": "library"})

    def pull(self, rec: Received, fault: Fault | None) -> None:
        body = json.loads(rec.body or b"{}")
        model = body.get("model") or body.get("name") or ""
        self._start_stream()
        for status in ("pulling manifest", "verifying sha256 digest", "writing manifest",
                       "success"):
            self._chunk(json.dumps({"status": status}).encode() + b"\n")
        self._end_stream()
        self.fake.add_model(model if ":" in model else model + ":latest")

    def delete(self, rec: Received, fault: Fault | None) -> None:
        body = json.loads(rec.body or b"{}")
        model = body.get("model") or body.get("name") or ""
        name = model if ":" in model else model + ":latest"
        if self.fake.models.pop(name, None) is None:
            self._error(404, f"model '{model}' not found")
            return
        self._send(200, b"")

    def blobs(self, rec: Received, fault: Fault | None) -> None:
        self._send(201 if rec.method == "POST" else 200, b"")


Route = Callable[[_Handler, Received, Fault | None], None]


def _generating(kind: str) -> Route:
    """The handler of a generation route answering in `kind`'s shape."""
    return lambda handler, rec, fault: handler._generation(rec, fault, kind)


_ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/"): _Handler.root,
    ("GET", "/api/version"): _Handler.version,
    ("GET", "/api/tags"): _Handler.tags,
    ("GET", "/api/ps"): _Handler.ps,
    ("POST", "/api/chat"): _generating("chat"),
    ("POST", "/api/generate"): _generating("generate"),
    ("POST", "/api/embed"): _Handler.embed,
    ("POST", "/api/embeddings"): _Handler.embeddings,
    ("POST", "/api/show"): _Handler.show,
    ("POST", "/api/pull"): _Handler.pull,
    ("DELETE", "/api/delete"): _Handler.delete,
    ("POST", "/v1/chat/completions"): _generating("chat.completion"),
    ("POST", "/v1/completions"): _generating("text_completion"),
    ("POST", "/v1/embeddings"): _Handler.v1_embeddings,
    ("GET", "/v1/models"): _Handler.v1_models,
    ("POST", "/v1/messages"): _generating("messages"),
    ("POST", "/v1/responses"): _generating("responses"),
    ("POST", "/v1/audio/transcriptions"): _generating("transcription"),
    ("GET", "/api/status"): _Handler.small_json,
    ("POST", "/api/experimental/web_search"): _Handler.small_json,
    ("POST", "/api/experimental/web_fetch"): _Handler.small_json,
    ("GET", "/api/experimental/model-recommendations"): _Handler.small_json,
    ("POST", "/api/me"): _Handler.small_json,
    ("POST", "/api/signout"): _Handler.small_json,
    ("GET", "/fake/stats"): _Handler.fake_stats,
    ("POST", "/fake/future"): _Handler.small_json,  # a route Ollama might add next month
}


def main() -> None:
    """Run the fake alone (for benchmarks): prints `listening on <url>` and serves until killed."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=["llama3:latest",
                                                         "nomic-embed-text:latest"])
    parser.add_argument("--gpu", type=int, default=0,
                        help="simulate one GPU holding this many chat models (0: no)")
    parser.add_argument("--load-seconds", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=5)
    parser.add_argument("--token-delay", type=float, default=0.0)
    args = parser.parse_args()
    fake = FakeOllama(tokens=args.tokens, token_delay=args.token_delay,
                      models=tuple(args.models))
    if args.gpu:
        fake.gpu = Gpu(capacity=args.gpu, load_seconds=args.load_seconds)
    fake.port = args.port
    fake.start()
    print(f"listening on {fake.url}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
