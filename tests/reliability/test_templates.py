"""Chat templates sent by clients: refused unless the server allows them; when allowed, rendered in a
sandbox process, where a loop, a memory bomb or a flood of output costs only its own request (a 400
within seconds) while other chats, with the model's template or their own, are served promptly."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from parallm.server.template_sandbox import RENDER_TIMEOUT_S

from .live import MODEL, assert_openai_error, start_full_server

MESSAGES = [{"role": "user", "content": "hi"}]
SIMPLE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}"
HOSTILE = {
    # 10^10 iterations: hours in the server process
    "loop": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
             f"more than {RENDER_TIMEOUT_S:g} s"),
    # a 1.5 GB string
    "memory bomb": ("{% set x = 'a' * 1500000000 %}{{ x|length }}", "memory"),
    # 20 MB of prompt, which the tokenizer would then chew on for seconds
    "huge output": ("{% for i in range(2000) %}{% for j in range(100) %}{{ 'x' * 100 }}{% endfor %}{% endfor %}",
                    "characters"),
}
PROMPT_WAIT_S = 3.0  # a concurrent chat of the model's template, or of a well-behaved client template


def chat(client: httpx.Client, **fields) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 1, **fields})


def timed(fn, *args, **kwargs) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = fn(*args, **kwargs)
    return response, time.monotonic() - started


@pytest.fixture(scope="module")
def templates_server(short_model_dir, tmp_path_factory):
    server = start_full_server(short_model_dir, tmp_path_factory.mktemp("templates"), allow_client_chat_template=True)
    yield server
    server.stop()


@pytest.mark.parametrize("where", ["chat_template_kwargs", "top level"])
def test_client_templates_are_off_by_default(full_server, where):
    fields = ({"chat_template_kwargs": {"chat_template": SIMPLE}} if where == "chat_template_kwargs"
              else {"chat_template": SIMPLE})
    with httpx.Client(base_url=full_server.url, timeout=30) as client:
        error = assert_openai_error(chat(client, **fields), 400)
    assert error["code"] == "chat_template_not_allowed" and error["param"] == "chat_template"
    assert "--allow-client-chat-template" in error["message"]


def test_an_allowed_client_template_is_the_prompt(templates_server, short_model_dir):
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(str(short_model_dir)).encode("<user>hi<bot>", add_special_tokens=False)
    with httpx.Client(base_url=templates_server.url, timeout=30) as client:
        for fields in ({"chat_template": SIMPLE}, {"chat_template_kwargs": {"chat_template": SIMPLE}}):
            r = chat(client, **fields)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens"] == len(expected)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_template_costs_only_its_own_request(templates_server, name):
    template, why = HOSTILE[name]
    with httpx.Client(base_url=templates_server.url, timeout=60) as hostile_client, \
            httpx.Client(base_url=templates_server.url, timeout=60) as client, ThreadPoolExecutor(1) as pool:
        chat(client, chat_template=SIMPLE)  # the sandbox's helpers have started: their start is not timed
        hostile = pool.submit(timed, chat, hostile_client, chat_template_kwargs={"chat_template": template})
        time.sleep(0.3)  # it is rendering
        own, own_s = timed(chat, client)
        theirs, theirs_s = timed(chat, client, chat_template=SIMPLE)
        response, seconds = hostile.result(timeout=120)
    error = assert_openai_error(response, 400)
    assert error["code"] == "chat_template_error" and why in error["message"], error
    assert seconds < RENDER_TIMEOUT_S + 5, seconds
    assert own.status_code == 200 and own_s < PROMPT_WAIT_S, (own.status_code, own_s)
    assert theirs.status_code == 200 and theirs_s < PROMPT_WAIT_S, (theirs.status_code, theirs_s)


def test_a_broken_template_is_a_400_that_says_why(templates_server):
    with httpx.Client(base_url=templates_server.url, timeout=30) as client:
        for template, why in (("{% for %}", "TemplateSyntaxError"), ("{{ raise_exception('no tools') }}", "no tools"),
                              ("{{ ''.__class__.__mro__ }}", "unsafe")):
            error = assert_openai_error(chat(client, chat_template=template), 400)
            assert why in error["message"], error
        assert chat(client).status_code == 200
