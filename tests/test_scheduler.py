"""What foreman learns about models from Ollama's own account of each generation, and
that it keeps it across a restart (issue 15)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import requests

from foreman.daemon import Daemon
from foreman.estimates import Estimator, load_seconds
from tests.fake_ollama import FakeOllama, Gpu

CHAT = {"messages": [{"role": "user", "content": "hi"}], "stream": False}


def final(load_ns: int) -> bytes:
    return (b'{"model":"m","done":true,"total_duration":900000000,"load_duration":'
            + str(load_ns).encode() + b',"eval_count":5}\n')


def test_the_load_comes_from_ollamas_load_duration_not_from_looking_resident() -> None:
    """Before, a first sample on a cold GPU was learned as generation time (after W3 the
    history said 0.70 s generation and 0.0002 s load; the truth was 0.2 + 0.5)."""
    saved: list[tuple[str, float | None, float | None, int]] = []
    estimator = Estimator(save=lambda m, h: saved.append((m, h.generation, h.load, h.samples)))
    estimator.record("llama3", 0.7, resident=False, final=final(500_000_000))
    history = estimator.known()["registry.ollama.ai/library/llama3:latest"]
    assert history["generation_seconds"] == pytest.approx(0.2)
    assert history["load_seconds"] == pytest.approx(0.5)
    estimator.record("llama3", 0.21, resident=False, final=final(3_000_000))  # resident
    history = estimator.known()["registry.ollama.ai/library/llama3:latest"]
    assert history["load_seconds"] == pytest.approx(0.5)  # a few ms is no load
    assert history["generation_seconds"] == pytest.approx(0.3 * 0.207 + 0.7 * 0.2)
    assert estimator.loads() == [("registry.ollama.ai/library/llama3:latest", 1,
                                  pytest.approx(0.5))]
    assert [row[0] for row in saved] == ["registry.ollama.ai/library/llama3:latest"] * 2
    assert load_seconds(b"x" * 10_000 + final(1)) == 1e-9
    assert load_seconds(b'{"choices": []}') is None


def test_without_ollamas_account_a_cold_sample_teaches_nothing() -> None:
    estimator = Estimator()
    estimator.record("m", 0.2, resident=True)
    estimator.record("m", 5.0, resident=False)  # a load of unknown length inside
    assert estimator.estimate("m", resident=True) == pytest.approx(0.2)


def test_loads_are_counted_and_learned_from_a_real_swapping_gpu(
        foreman: Daemon, fake: FakeOllama) -> None:
    fake.add_model("a:latest")
    fake.add_model("b:latest")
    fake.gpu = Gpu(capacity=1, load_seconds=0.2)
    foreman.inventory.refresh()
    for model in ("a", "b", "a", "a"):
        answer = requests.post(foreman.url + "/api/chat", json={**CHAT, "model": model},
                               timeout=10)
        assert answer.status_code == 200
    assert fake.gpu.loads == 3
    metrics = requests.get(foreman.url + "/metrics", timeout=5).text
    assert 'foreman_model_loads_total{model="registry.ollama.ai/library/a:latest"} 2' \
        in metrics
    assert 'foreman_model_loads_total{model="registry.ollama.ai/library/b:latest"} 1' \
        in metrics
    history = requests.get(foreman.url + "/queue", timeout=5).json()["history"]
    learned = history["registry.ollama.ai/library/a:latest"]
    assert learned["load_seconds"] == pytest.approx(0.2, abs=0.05)
    assert learned["generation_seconds"] < 0.15  # the loads are not in it


def test_the_history_survives_a_restart(make_foreman: Callable[..., Daemon]) -> None:
    first = make_foreman()
    assert requests.post(first.url + "/api/chat", json={**CHAT, "model": "llama3"},
                         timeout=10).status_code == 200
    assert first.chat_lane.wait_for(lambda lane: lane.in_flight == 0, 5)
    learned = requests.get(first.url + "/queue", timeout=5).json()["history"]
    assert learned
    first.shutdown(drain_timeout=2)
    again = make_foreman()
    assert requests.get(again.url + "/queue", timeout=5).json()["history"] == learned
