"""Prompts are templated and tokenized on the server's prompt thread, never on the event loop."""
from __future__ import annotations

import threading

import httpx

from tests.server.conftest import real_engine, start_server


class ThreadRecordingTokenizer:
    """Delegates to a real tokenizer and notes which thread each encode / template call ran on."""

    def __init__(self, inner):
        self._inner = inner
        self.threads: list[str] = []

    def encode(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self._inner.encode(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self._inner.apply_chat_template(*args, **kwargs)

    def __len__(self):
        return len(self._inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_text_prompts_are_tokenized_off_the_loop_and_token_ids_need_no_thread(tiny_loaded):
    engine = real_engine(tiny_loaded)
    recorder = ThreadRecordingTokenizer(engine.tokenizer("tiny"))
    engine.tokenizer = lambda model: recorder
    live = start_server(engine)
    try:
        chat = httpx.post(live.base_url + "/chat/completions", timeout=60, json={
            "model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        completion = httpx.post(live.base_url + "/completions", timeout=60,
                                json={"model": "tiny", "max_tokens": 2, "prompt": ["one", "two"]})
        assert chat.status_code == 200 and completion.status_code == 200
        assert recorder.threads, "the tokenizer was never called"
        assert all(name.startswith("parallm-prompts") for name in recorder.threads), recorder.threads
        calls = len(recorder.threads)
        by_ids = httpx.post(live.base_url + "/completions", timeout=60,
                            json={"model": "tiny", "max_tokens": 2, "prompt": [1, 2, 3]})
        assert by_ids.status_code == 200
        assert len(recorder.threads) == calls  # token ids: nothing was tokenized
    finally:
        live.stop()


def test_a_tokenizer_error_is_still_a_client_error(tiny_loaded):
    live = start_server(real_engine(tiny_loaded))
    try:
        r = httpx.post(live.base_url + "/completions", timeout=60,
                       json={"model": "tiny", "max_tokens": 2, "prompt": ""})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "prompt"
    finally:
        live.stop()


class BlockingOnHugeTokenizer(ThreadRecordingTokenizer):
    """Holds every encode of a huge prompt until released."""

    def __init__(self, inner):
        super().__init__(inner)
        self.huge_started = threading.Event()
        self.release = threading.Event()

    def encode(self, text, *args, **kwargs):
        if len(text) > 32_768:
            self.huge_started.set()
            assert self.release.wait(30), "never released"
        return super().encode(text, *args, **kwargs)


def test_a_huge_prompt_being_tokenized_does_not_hold_up_a_small_one(tiny_loaded):
    engine = real_engine(tiny_loaded)
    tokenizer = BlockingOnHugeTokenizer(engine.tokenizer("tiny"))
    engine.tokenizer = lambda model: tokenizer
    live = start_server(engine)
    huge_status = []
    try:
        huge = threading.Thread(target=lambda: huge_status.append(httpx.post(
            live.base_url + "/completions", timeout=60,
            json={"model": "tiny", "max_tokens": 2, "prompt": "word " * 10_000}).status_code))
        huge.start()
        assert tokenizer.huge_started.wait(30)
        small = httpx.post(live.base_url + "/completions", timeout=30,
                           json={"model": "tiny", "max_tokens": 2, "prompt": "hello"})
        assert small.status_code == 200  # served while the huge prompt is still in encode
        assert huge.is_alive()
        tokenizer.release.set()
        huge.join(60)
        assert huge_status and huge_status[0] in (200, 400)  # 400: longer than the tiny model's context
    finally:
        tokenizer.release.set()
        live.stop()
