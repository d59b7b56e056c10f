"""The real openai client against a live server on 127.0.0.1."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from parallm.server.api_models import ChatCompletionChunk
from tests.server.conftest import real_engine, start_server

MODEL = "tiny"  # the tiny random Llama of tests/conftest.py; context 2048


@pytest.fixture(scope="module")
def server(tiny_loaded):
    live = start_server(real_engine(tiny_loaded, max_num_seqs=8, max_num_batched_tokens=256))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


HELLO = [{"role": "user", "content": "Say hello to the world, please."}]


def test_models_lists_the_served_model(client):
    first = client.models.list().data
    assert [m.id for m in first] == [MODEL]
    time.sleep(1.1)
    assert [m.created for m in client.models.list().data] == [m.created for m in first]  # a fact, not the clock


def test_models_retrieve_one_and_an_unknown_one(client):
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("org/no-such-model")
    assert "org/no-such-model" in e.value.message and MODEL in e.value.message
    assert e.value.body["code"] == "model_not_found"


def test_chat_completion_counts_tokens_through_the_chat_template(client, hf_tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0)
    templated = hf_tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(hf_tokenizer.encode(templated, add_special_tokens=False))
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content


def test_content_parts_equal_a_plain_string(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say hello "},
                                          {"type": "text", "text": "to the world, please."}]}]
    a = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0)
    b = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=6, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_streaming_chat_with_usage_matches_the_non_streaming_answer(client):
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_ends_with_done(server):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(d) for d in data[:-1]]  # the documented shape
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert len({c.id for c in chunks}) == 1


def test_completions_string_list_and_token_ids(client, hf_tokenizer):
    ids = hf_tokenizer.encode("The capital of France is")
    one = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert one.object == "text_completion" and one.usage.completion_tokens == 4
    assert one.usage.prompt_tokens == len(ids)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == one.choices[0].text
    many = client.completions.create(model=MODEL, prompt=["The capital of France is", "Hi"], max_tokens=3,
                                     temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text  # greedy: both choices of a prompt agree
    assert many.usage.prompt_tokens == len(ids) + len(hf_tokenizer.encode("Hi"))
    assert many.usage.completion_tokens == 4 * 3
    lists = client.completions.create(model=MODEL, prompt=[ids, [5, 6, 7]], max_tokens=2, temperature=0)
    assert len(lists.choices) == 2 and lists.usage.prompt_tokens == len(ids) + 3
    with pytest.raises(openai.BadRequestError):  # strings and token ids do not mix
        client.completions.create(model=MODEL, prompt=["a", [5, 6]], max_tokens=2)


def test_streaming_completions_with_usage(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6


def test_n_two_gives_two_choices_with_their_own_text(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, n=2, seed=7, temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 12
    stream = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, n=2, seed=7,
                                                 temperature=1.0, stream=True))
    for i in (0, 1):
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices and c.choices[0].index == i)
        assert streamed == r.choices[i].message.content


def test_stop_string_ends_the_choice_before_it(client):
    free = client.completions.create(model=MODEL, prompt="one two three four five six", max_tokens=12,
                                     temperature=0).choices[0].text
    stop = free[len(free) // 2:len(free) // 2 + 3]
    assert stop.strip(), f"need a visible stop string from {free!r}"
    cut = client.completions.create(model=MODEL, prompt="one two three four five six", max_tokens=12,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == free[:free.index(stop)]


def test_chat_logprobs_with_top_alternatives(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.bytes == list(item.token.encode())


def test_a_partial_utf8_token_keeps_its_own_bytes_in_logprobs(client, hf_tokenizer):
    """One byte-level token holding the first two bytes of an emoji: written 'bytes:\\xf0\\x9f' as
    OpenAI writes such tokens, with those two bytes, not U+FFFD and its UTF-8."""
    first = hf_tokenizer.encode("\U0001F600", add_special_tokens=False)[0]
    assert hf_tokenizer.decode([first]) == "\ufffd"  # the case in question: not a character alone
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, temperature=0,
                                       logit_bias={str(first): 100}, logprobs=True, top_logprobs=2)
    entries = r.choices[0].logprobs.content
    assert [e.token for e in entries] == ["bytes:\\xf0\\x9f"] * 2
    assert [e.bytes for e in entries] == [[0xF0, 0x9F]] * 2
    for alternative in entries[0].top_logprobs:  # the unbiased top ones: text and bytes agree
        raw = bytes(alternative.bytes)
        try:
            assert raw.decode("utf-8") == alternative.token
        except UnicodeDecodeError:
            assert alternative.token == "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def test_seed_makes_sampling_repeatable(client):
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=8, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_unknown_model_is_not_found_and_lists_served_models(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=HELLO, max_tokens=2)
    assert e.value.status_code == 404
    assert "no-such-model" in e.value.message and MODEL in e.value.message
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


@pytest.mark.parametrize("bad, field", [
    ({"temperature": 3.0}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"extra_body": {"stop_token_ids": [99999999]}}, "stop_token_ids"),
    ({"stop": ["x"] * 40}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
])
def test_invalid_fields_are_bad_requests_naming_the_field(client, bad, field):
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=2)
    kwargs.update(bad)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kwargs)
    assert e.value.status_code == 400
    assert field in e.value.message
    assert set(e.value.body) == {"message", "type", "param", "code"}


def test_prompt_beyond_the_context_is_a_bad_request_with_the_numbers(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hello " * 7000, max_tokens=10)  # tokenized off the loop
    assert "2048" in e.value.message and e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10_000)
    assert "2048" in e.value.message and "10000" in e.value.message


def test_out_of_vocabulary_token_prompt_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1, 2, 10**9], max_tokens=2)
    assert "vocabulary" in e.value.message


def test_tools_with_auto_and_a_text_response_format_are_served_as_text(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    history = HELLO + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=history, max_tokens=3, tools=tools,
                                       tool_choice="auto", response_format={"type": "text"})
    assert r.usage.completion_tokens == 3 and isinstance(r.choices[0].message.content, str)
    assert not r.choices[0].message.tool_calls


def test_unknown_fields_are_ignored(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2,
                                       extra_body={"some_vendor_field": {"x": 1}})
    assert r.usage.completion_tokens == 2


def test_http_errors_are_openai_shaped_json(server):
    base = server.url
    r = httpx.get(base + "/v1/nowhere")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(base + "/v1/chat/completions")
    assert r.status_code == 405 and "GET" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/completions", json={"model": MODEL})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_body_over_the_limit_is_413_also_when_chunked(server):
    limit = server.app.state.settings.max_body_bytes
    big = {"model": MODEL, "prompt": "x" * (limit + 10)}
    r = httpx.post(server.base_url + "/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: a chunked upload that grows past the limit
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(limit // 65536 + 2):
            yield b"y" * 65536
        yield b'"}'
    r = httpx.post(server.base_url + "/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_a_model_without_chat_template_gets_a_clear_400_on_chat_only(tiny_model_dir, tmp_path):
    import json as _json
    import shutil

    from parallm.models import load
    plain = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, plain)
    cfg = _json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(_json.dumps(cfg))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (plain / extra).unlink(missing_ok=True)
    live = start_server(real_engine(load(str(plain), device="cpu", name="plain")))
    try:
        client = openai.OpenAI(base_url=live.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="plain", messages=HELLO, max_tokens=2)
        assert "no chat template" in e.value.message and "/v1/completions" in e.value.message
        assert client.completions.create(model="plain", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    finally:
        live.stop()


def test_health_reports_engine_stats(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["models"] == [MODEL]
    assert {"num_running", "num_waiting", "kv_cache_usage"} <= set(body["engine"])
