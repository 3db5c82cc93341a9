"""Official clients, unmodified, pointed at foreman in front of the fake Ollama."""

from __future__ import annotations

import asyncio

import ollama
import openai
import pytest

from foreman.daemon import Daemon
from tests.fake_ollama import FakeOllama, embedding_for


@pytest.fixture
def client(foreman: Daemon) -> ollama.Client:
    return ollama.Client(host=foreman.url)


def test_chat_streaming_and_not(client: ollama.Client, fake: FakeOllama) -> None:
    reply = client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert reply.message.content == "tok0 tok1 tok2 tok3 tok4 "
    assert reply.done and reply.done_reason == "stop" and reply.eval_count == 5
    parts = list(client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}],
                             stream=True))
    assert "".join(p.message.content for p in parts) == "tok0 tok1 tok2 tok3 tok4 "
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert fake.requests_to("/api/chat")[0].json["stream"] is False


def test_generate_streaming_and_not(client: ollama.Client) -> None:
    reply = client.generate(model="llama3", prompt="hi")
    assert reply.response == "tok0 tok1 tok2 tok3 tok4 " and reply.context == [1, 2, 3]
    parts = list(client.generate(model="llama3", prompt="hi", stream=True))
    assert len(parts) == 6 and parts[-1].done


def test_embed_list_ps_show(client: ollama.Client, fake: FakeOllama, foreman: Daemon) -> None:
    embedded = client.embed(model="nomic-embed-text", input=["a", "b"])
    assert embedded.embeddings == [embedding_for("a"), embedding_for("b")]
    legacy = client.embeddings(model="nomic-embed-text", prompt="a")
    assert list(legacy.embedding) == embedding_for("a")
    assert {m.model for m in client.list().models} == set(fake.models)
    foreman.inventory.refresh()  # /api/ps is served from the cache: let it see the load
    assert [m.model for m in client.ps().models] == ["nomic-embed-text:latest"]
    shown = client.show("llama3")
    assert shown.modelfile == "FROM llama3\n" and shown.details.family == "llama"


def test_errors_surface_as_response_errors(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="ghost", messages=[])
    assert missing.value.status_code == 404 and missing.value.error == "model 'ghost' not found"
    with pytest.raises(ollama.ResponseError) as streaming:
        list(client.generate(model="ghost", prompt="x", stream=True))
    assert streaming.value.status_code == 404


def test_async_client(foreman: Daemon) -> None:
    async def run() -> tuple[str, list[str], int]:
        client = ollama.AsyncClient(host=foreman.url)
        reply = await client.chat(model="llama3", messages=[])
        parts = [p.message.content async for p in await client.chat(
            model="llama3", messages=[], stream=True)]
        listed = await client.list()
        return reply.message.content, parts, len(listed.models)

    content, parts, count = asyncio.run(run())
    assert content == "tok0 tok1 tok2 tok3 tok4 "
    assert "".join(parts) == content and count == 2


def test_openai_client_on_v1(foreman: Daemon, fake: FakeOllama) -> None:
    client = openai.OpenAI(base_url=foreman.url + "/v1", api_key="unused")
    chat = client.chat.completions.create(model="llama3", messages=[
        {"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
    stream = client.chat.completions.create(model="llama3", stream=True, messages=[
        {"role": "user", "content": "hi"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    completion = client.completions.create(model="llama3", prompt="hi")
    assert completion.choices[0].text == "tok0 tok1 tok2 tok3 tok4 "
    embedded = client.embeddings.create(model="nomic-embed-text", input=["a"])
    assert embedded.data[0].embedding == pytest.approx(embedding_for("a"))
    assert {m.id for m in client.models.list()} == set(fake.models)
    assert client.models.retrieve("llama3:latest").owned_by == "library"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="ghost", messages=[])
    assert missing.value.status_code == 404
    assert "ghost" in str(missing.value)
    # The API key the client sent never reached the target.
    assert all("unused" not in str(r.headers) for r in fake.received)
