"""Today's clients beyond Ollama's own, unmodified, through foreman: the Anthropic SDK
(Claude Code's API) on /v1/messages, and the OpenAI client's Responses and audio
transcriptions, each through the chat slot."""

from __future__ import annotations

import io
from collections.abc import Callable

import anthropic
import openai
import pytest

from foreman.daemon import Daemon
from tests.fake_ollama import FakeOllama, Fault

TEXT = "tok0 tok1 tok2 tok3 tok4 "
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def guarded(make_foreman: Callable[..., Daemon]) -> Daemon:
    return make_foreman(token="t0k")


@pytest.mark.parametrize("credential", ["api_key", "auth_token"])
def test_anthropic_messages_create_stream_and_tools(guarded: Daemon, fake: FakeOllama,
                                                    credential: str) -> None:
    """`api_key` sends x-api-key, `auth_token` a bearer token: foreman takes either."""
    client = anthropic.Anthropic(base_url=guarded.url, max_retries=0, **{credential: "t0k"})
    message = client.messages.create(model="llama3", max_tokens=64, messages=USER)
    assert message.content[0].type == "text" and message.content[0].text == TEXT
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == 5
    with client.messages.stream(model="llama3", max_tokens=64, messages=USER) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == TEXT and len(pieces) == 5
    assert final.content[0].text == TEXT and final.stop_reason == "end_turn"
    called = client.messages.create(model="llama3", max_tokens=64, messages=USER,
                                    tools=[WEATHER])
    use = [block for block in called.content if block.type == "tool_use"]
    assert called.stop_reason == "tool_use"
    assert use[0].name == "get_weather" and use[0].input == {"city": "Paris"}
    with client.messages.stream(model="llama3", max_tokens=64, messages=USER,
                                tools=[WEATHER]) as stream:
        streamed = stream.get_final_message()
    assert [b.input for b in streamed.content if b.type == "tool_use"] == [{"city": "Paris"}]
    assert fake.stats.generations_peak == 1  # through the one chat slot
    sent = fake.requests_to("/v1/messages")
    assert len(sent) == 4
    assert all("t0k" not in str(r.headers) for r in sent)  # never forwarded


def test_anthropic_errors_are_the_sdks_typed_exceptions(guarded: Daemon,
                                                        fake: FakeOllama) -> None:
    client = anthropic.Anthropic(base_url=guarded.url, api_key="t0k", max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="ghost", max_tokens=5, messages=USER)
    assert missing.value.body["error"] == {"type": "not_found_error",
                                           "message": "model 'ghost' not found"}
    with pytest.raises(anthropic.BadRequestError) as invalid:
        client.messages.create(model="llama3", max_tokens=0, messages=USER)
    assert "max_tokens is required and must be positive" in str(invalid.value)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=guarded.url, api_key="wrong", max_retries=0
                            ).messages.create(model="llama3", max_tokens=5, messages=USER)
    fake.stop()  # the target goes away: foreman's own 502, in Anthropic's shape
    with pytest.raises(anthropic.APIStatusError) as down:
        client.messages.create(model="llama3", max_tokens=5, messages=USER)
    assert down.value.status_code == 502
    assert down.value.body["error"]["type"] == "api_error"


def test_anthropic_stream_cut_by_the_target_ends_in_an_error_the_sdk_raises(
        foreman: Daemon, fake: FakeOllama) -> None:
    fake.fault("/v1/messages", Fault("die_after", after=3))
    client = anthropic.Anthropic(base_url=foreman.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as broken, client.messages.stream(
            model="llama3", max_tokens=64, messages=USER) as stream:
        list(stream.text_stream)
    assert "ollama failed mid-request" in str(broken.value)


def test_openai_responses_plain_and_streamed(foreman: Daemon, fake: FakeOllama) -> None:
    client = openai.OpenAI(base_url=foreman.url + "/v1", api_key="unused", max_retries=0)
    response = client.responses.create(model="llama3", input="hi")
    assert response.output_text == TEXT and response.status == "completed"
    events = list(client.responses.create(model="llama3", input="hi", stream=True))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == TEXT
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == TEXT
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="ghost", input="hi")
    assert len(fake.requests_to("/v1/responses")) == 2


def test_openai_responses_stream_cut_ends_in_an_error_event(foreman: Daemon,
                                                            fake: FakeOllama) -> None:
    fake.fault("/v1/responses", Fault("die_after", after=5))
    client = openai.OpenAI(base_url=foreman.url + "/v1", api_key="unused", max_retries=0)
    events = list(client.responses.create(model="llama3", input="hi", stream=True))
    assert events[-1].type == "error"
    assert events[-1].message.startswith("ollama failed mid-request")
    assert events[-1].sequence_number == 5


def test_openai_audio_transcription_is_a_multipart_upload_through_the_slot(
        foreman: Daemon, fake: FakeOllama) -> None:
    client = openai.OpenAI(base_url=foreman.url + "/v1", api_key="unused", max_retries=0)
    audio = io.BytesIO(b"RIFF" + bytes(4000) + b"WAVEfmt ")
    audio.name = "speech.wav"
    transcript = client.audio.transcriptions.create(model="llama3", file=audio)
    assert transcript.text == "heard 4012 bytes"
    [sent] = fake.requests_to("/v1/audio/transcriptions")
    assert sent.headers["content-type"].startswith("multipart/form-data")
    audio.seek(0)
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="ghost", file=audio)
    assert len(fake.requests_to("/v1/audio/transcriptions")) == 1
