"""The API families foreman speaks, and everything that differs between them.

Ollama's own routes, OpenAI's `/v1/*`, OpenAI's Responses (`/v1/responses`)
and Anthropic's Messages (`/v1/messages`) each have their own error shape,
their own way of ending a stream that broke, and their own rules for the
request fields foreman needs before it lets a request reach the GPU.  A route's
family follows from its path alone, as in Ollama, so every answer foreman makes
itself (a refusal at the door, a missing model, an outage) has the shape the
route's clients parse.  The shapes, the status-to-type mappings and the
validation texts are Ollama's (`openai/openai.go`, `anthropic/anthropic.go`,
`middleware/anthropic.go`, `middleware/openai.go`).
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from .errors import ApiError

_OPENAI_TYPES = {400: "invalid_request_error", 404: "not_found_error"}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error",
    529: "overloaded_error",
}


def _openai_error(status: int, message: str) -> dict[str, Any]:
    return {"message": message, "type": _OPENAI_TYPES.get(status, "api_error"),
            "param": None, "code": None}


def _anthropic_error(status: int, message: str) -> dict[str, Any]:
    return {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


@dataclass(frozen=True)
class Dialect:
    """One API family: the name its access-log and metrics use, and its shapes."""

    name: str

    def error_body(self, status: int, message: str) -> bytes:
        """An error answer as this family's clients parse it."""
        if self.name == "ollama":
            return _json({"error": message})
        if self.name == "anthropic":
            return _json({"type": "error", "error": _anthropic_error(status, message),
                          "request_id": "req_" + uuid.uuid4().hex[:24]})
        return _json({"error": _openai_error(status, message)})

    def stream_error(self, status: int, message: str, events_sent: int) -> bytes:
        """The last piece of a stream the target broke off: Ollama's error line, or
        the family's own error event (`events_sent` numbers a Responses event)."""
        if self.name == "ollama":
            return _json({"error": message}) + b"\n"
        if self.name == "anthropic":
            data = _json({"type": "error", "error": _anthropic_error(status, message)})
            return b"event: error\ndata: " + data + b"\n\n"
        if self.name == "responses":
            data = _json({"type": "error", "code": _OPENAI_TYPES.get(status, "api_error"),
                          "message": message, "param": None,
                          "sequence_number": events_sent})
            return b"event: error\ndata: " + data + b"\n\n"
        return b"data: " + _json({"error": _openai_error(status, message)}) + b"\n\n"


OLLAMA = Dialect("ollama")
OPENAI = Dialect("openai")
RESPONSES = Dialect("responses")
ANTHROPIC = Dialect("anthropic")


def dialect_of(path: str) -> Dialect:
    if not path.startswith("/v1/"):
        return OLLAMA
    if path == "/v1/messages":
        return ANTHROPIC
    if path == "/v1/responses":
        return RESPONSES
    return OPENAI


# -- what foreman needs from a request before it reaches the GPU --------------


def required_model(body: dict[str, Any]) -> str:
    """The model of an Ollama or OpenAI request; Ollama's handlers' texts."""
    model = body.get("model")
    if model is None or model == "":
        raise ApiError(400, "model is required")
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string")
    return model


def messages_model(body: dict[str, Any]) -> str:
    """The model of an Anthropic Messages request, checked in the order and with
    the words of Ollama's Anthropic middleware."""
    model = required_model(body)
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, float)) \
            or max_tokens <= 0:
        raise ApiError(400, "max_tokens is required and must be positive")
    messages = body.get("messages")
    if messages is not None and not isinstance(messages, list):
        raise ApiError(400, "messages must be an array")
    if not messages:
        raise ApiError(400, "messages is required")
    return model


def transcription_model(blocks: Iterable[bytes], content_type: str) -> str:
    """The form field `model` of a multipart transcription upload, which must also
    carry a non-empty `file`; the audio itself is skipped over, never kept."""
    mimetype, options = parse_options_header(content_type)
    boundary = options.get("boundary", "")
    if mimetype != "multipart/form-data" or not boundary:
        raise ApiError(400, "failed to parse multipart form: request Content-Type isn't"
                            " multipart/form-data")
    decoder = MultipartDecoder(boundary.encode("latin-1", "replace"))
    model, current = bytearray(), ""
    audio_bytes: int | None = None  # None: no part named `file`
    try:
        for block in itertools.chain(blocks, [None]):
            decoder.receive_data(block)
            while not isinstance(event := decoder.next_event(), (NeedData, Epilogue)):
                if isinstance(event, (Field, File)):
                    current = event.name
                    if current == "file" and audio_bytes is None:
                        audio_bytes = 0
                elif isinstance(event, Data) and current == "model" and len(model) < 4096:
                    model += event.data
                elif isinstance(event, Data) and current == "file" and audio_bytes is not None:
                    audio_bytes += len(event.data)
            if isinstance(event, Epilogue):
                break
        else:
            raise ValueError("the form ends before its closing boundary")
    except ValueError as exc:
        raise ApiError(400, f"failed to parse multipart form: {exc}") from None
    if not model:
        raise ApiError(400, "model is required")
    if audio_bytes is None:
        raise ApiError(400, "file is required: http: no such file")
    if audio_bytes == 0:
        raise ApiError(400, "audio file is empty")
    return model.decode("utf-8", "replace")
