"""Disconnects abort, overload answers 429 (never a reset), the API key guards /v1/*."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.server.conftest import real_engine, start_server

MODEL = "tiny"
HELLO = [{"role": "user", "content": "Tell me a long story."}]


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


LONG = 1900  # tokens: a request this long that ends after fewer engine steps was aborted


@pytest.fixture
def small_server(tiny_loaded):
    """2 rows + 2 waiting: the server admits 4 requests at once."""
    live = start_server(real_engine(tiny_loaded, max_num_seqs=2, max_queue=2, max_num_batched_tokens=128),
                        max_num_seqs=2, max_queue=2)
    yield live
    live.stop()


def long_body(**fields):
    return {"model": MODEL, "max_tokens": LONG, "ignore_eos": True, **fields}


def engine_stats(live):
    return httpx.get(live.url + "/health").json()["engine"]


def test_streaming_disconnect_aborts_the_request(small_server):
    body = long_body(messages=HELLO, stream=True)
    with httpx.stream("POST", small_server.base_url + "/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert engine_stats(small_server)["num_running"] == 1
    # the client closed the connection mid-stream
    assert wait_until(lambda: engine_stats(small_server)["num_running"] == 0)
    assert engine_stats(small_server)["steps"] < LONG  # it stopped early: aborted, row freed
    assert wait_until(lambda: small_server.app.state.admission.in_flight == 0)


def test_non_streaming_disconnect_aborts_the_request(small_server):
    body = long_body(prompt="Once upon a time")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small_server.base_url + "/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    assert wait_until(lambda: engine_stats(small_server)["num_running"] == 0)
    assert engine_stats(small_server)["steps"] < LONG
    assert wait_until(lambda: small_server.app.state.admission.in_flight == 0)


def test_health_answers_while_the_engine_is_busy(small_server):
    body = long_body(prompt="busy", stream=True)
    with httpx.stream("POST", small_server.base_url + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # keep the iterator: dropping it closes the connection
        assert next(lines).startswith("data: ")
        h = httpx.get(small_server.url + "/health", timeout=5)
        assert h.status_code == 200 and h.json()["server"]["in_flight"] == 1


def test_overload_gives_every_client_a_200_or_a_429(small_server):
    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        body = {"model": MODEL, "prompt": f"client {i}", "max_tokens": 200, "ignore_eos": True}
        return await client.post(small_server.base_url + "/completions", json=body)

    async def crowd(n: int) -> list:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n)), return_exceptions=True)

    results = asyncio.run(crowd(40))
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, f"connection errors: {errors[:3]}"
    codes = sorted(r.status_code for r in results)
    assert set(codes) <= {200, 429}, codes
    assert 200 in codes, codes
    assert 429 in codes, codes  # 4 admitted at a time; 40 arrive together with 200-token requests
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["usage"]["completion_tokens"] == 200
    assert wait_until(lambda: small_server.app.state.admission.in_flight == 0)


def test_more_prompts_than_ever_admitted_is_a_400_not_a_429(small_server):
    """4 engine requests are admitted at once: 5 prompts in one request can never fit (retrying a
    429 would loop forever), 4 do."""
    client = openai.OpenAI(base_url=small_server.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=["a", "b", "c", "d", "e"], max_tokens=1)
    assert e.value.body["param"] == "prompt" and "5 prompts" in e.value.message and "(4:" in e.value.message
    fits = client.completions.create(model=MODEL, prompt=["a", "b", "c", "d"], max_tokens=1)
    assert len(fits.choices) == 4
    assert wait_until(lambda: small_server.app.state.admission.in_flight == 0)


def test_openai_client_sees_rate_limit_error(small_server):
    client = openai.OpenAI(base_url=small_server.base_url, api_key="x", max_retries=0)
    streams = [httpx.stream("POST", small_server.base_url + "/completions", timeout=60,
                            json=long_body(prompt="hold", stream=True))
               for _ in range(4)]
    # opened at once: a stream waiting for a row has its headers only with its first token (or
    # after streaming.FIRST_OUTPUT_WAIT_S), but it is admitted, and counted, at once
    with ThreadPoolExecutor(len(streams)) as pool:
        opening = [pool.submit(s.__enter__) for s in streams]
        try:
            assert wait_until(lambda: small_server.app.state.admission.in_flight == 4)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model=MODEL, prompt="one too many", max_tokens=2)
            assert all(f.result().status_code == 200 for f in opening)
        finally:
            for s, f in zip(streams, opening):
                if f.exception() is None:
                    s.__exit__(None, None, None)


def test_api_key_guards_v1_but_not_health(tiny_loaded):
    live = start_server(real_engine(tiny_loaded), api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=live.base_url, api_key="wrong", max_retries=0).models.list()
        assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
        r = httpx.post(live.base_url + "/chat/completions", json={"model": MODEL, "messages": HELLO})
        assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
        good = openai.OpenAI(base_url=live.base_url, api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list().data] == [MODEL]
        assert good.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(live.url + "/health").status_code == 200
    finally:
        live.stop()
