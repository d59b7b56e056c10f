"""A stream never answers 200 with only an error in it, and no response ever holds NaN.

- An error before the first token (here: the adapter is unloaded between the server's checks and
  the engine's) is an HTTP error with its status: the headers wait for the first output.
- An error after tokens went out ends every open choice with finish_reason "error", then the error
  object, then [DONE].
- A broken (NaN) adapter's logprobs are sent as finite numbers: JSON has no NaN.
"""
from __future__ import annotations

import json

import httpx
import mlx.core as mx
import pytest

from parallm.engine.errors import EngineDead
from tests.adapters.conftest import write_adapter_dir

from .live import MODEL, assert_openai_error, finish_reasons, sse_data

PROMPT = [5, 17, 300, 42, 9000, 7, 11, 12]


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as every JSON parser but Python's does."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in a response: {text[:300]}"))


def stream_events(client: httpx.Client, path: str, body: dict) -> tuple[int, list[str], str]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        text = r.read().decode()
        return r.status_code, sse_data(text.splitlines()), text


@pytest.fixture(scope="module")
def client(full_server):
    with httpx.Client(base_url=full_server.url, timeout=60) as c:
        yield c


def test_an_error_before_the_first_token_is_an_http_error(full_server, short_model_dir, client, monkeypatch):
    serving = full_server.app.state.serving
    admit = serving._admit

    def admit_then_unload(requests):  # the race: admitted, then unloaded before the engine sees it
        ticket = admit(requests)
        full_server.manager.unload(requests[0].adapter)
        return ticket

    monkeypatch.setattr(serving, "_admit", admit_then_unload)
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": PROMPT})):
        name = "gone" + path.replace("/", "-")
        full_server.manager.load(name, write_adapter_dir(short_model_dir, full_server.adapters_dir / name, seed=1),
                                 trusted=True)
        with client.stream("POST", path, json={"model": name, "max_tokens": 4, "stream": True, **body}) as r:
            r.read()
            error = assert_openai_error(r, 404)
        assert error["code"] == "model_not_found", error
    assert full_server.app.state.admission.in_flight == 0


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}),
    ("/v1/completions", {"prompt": [PROMPT, PROMPT[:4]]}),
], ids=["chat n=2", "completions 2 prompts"])
def test_an_error_after_tokens_ends_each_open_choice_with_finish_reason_error(full_server, client, monkeypatch,
                                                                              path, body):
    engine = full_server.app.state.serving.engine
    generate = engine.generate

    async def dies_after_two_outputs(request):
        seen = 0
        async for out in generate(request):
            yield out
            seen += 1
            if seen == 2:
                raise EngineDead("The engine worker died: injected by the test")

    monkeypatch.setattr(engine, "generate", dies_after_two_outputs)
    status, events, text = stream_events(client, path, {"model": MODEL, "max_tokens": 20, "ignore_eos": True, **body})
    assert status == 200, text
    assert events[-1] == "[DONE]", text
    error = strict_json(events[-2])
    assert error["error"]["code"] == "engine_dead", error
    assert finish_reasons(events[:-2]) == ["error", "error"], text  # both choices, once each
    assert any(c.get("delta", {}).get("content") or c.get("text")
               for e in events[:-3] for c in strict_json(e)["choices"]), text  # tokens went out first
    assert full_server.app.state.admission.in_flight == 0


@pytest.fixture(scope="module")
def nan_adapter(full_server, short_model_dir) -> str:
    """An adapter whose weights are NaN, as a training run with a NaN learning rate leaves one."""
    name = "nan-adapter"
    path = write_adapter_dir(short_model_dir, full_server.adapters_dir / name, seed=2)
    weights = mx.load(str(path / "adapters.safetensors"))
    mx.save_safetensors(str(path / "adapters.safetensors"), {k: v * float("nan") for k, v in weights.items()})
    full_server.manager.load(name, path, trusted=True)
    return name


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_nan_adapter_never_puts_nan_in_a_response(client, nan_adapter, stream):
    requests = [("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                                          "top_logprobs": 3}),
                ("/v1/completions", {"prompt": PROMPT, "logprobs": 3})]
    for path, body in requests:
        body = {"model": nan_adapter, "max_tokens": 4, "ignore_eos": True, **body}
        if stream:
            status, events, text = stream_events(client, path, body)
            assert status == 200 and events[-1] == "[DONE]", text
            chunks = [strict_json(e) for e in events[:-1]]
        else:
            r = client.post(path, json=body)
            assert r.status_code == 200, r.text
            chunks = [strict_json(r.text)]
        logprobs = [c["logprobs"] for chunk in chunks for c in chunk["choices"] if c.get("logprobs")]
        assert logprobs, chunks
