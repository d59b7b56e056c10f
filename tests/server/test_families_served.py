"""Every family served as a user serves it: `parallm serve` on a tiny random model of the family,
4 concurrent greedy completions and one streamed chat through the openai client, each equal to
mlx-lm's `stream_generate` of that prompt alone. (The batched engine's token-for-token check with
joins, chunked prefill, n > 1 and preemption is tests/models/test_families.py; this one is the
whole path: loader, worker thread, HTTP, detokenizing, streaming.)"""
from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from family_configs import FAMILIES, write_family_model
from tests.server.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived",
           "def fibonacci(n):", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,"]
CHAT = [{"role": "user", "content": "Write a short poem about the sea and the wind."}]
MAX_TOKENS = 16


def reference_text(model, tokenizer, prompt_ids: list[int]) -> str:
    """mlx-lm's greedy tokens for the prompt alone, as text (decoded whole: mlx-lm's streaming
    detokenizer drops the first token's leading space, which OpenAI's API keeps; special tokens
    are skipped, as the server does by default)."""
    from mlx_lm.generate import stream_generate

    ids = [r.token for r in stream_generate(model, tokenizer, prompt_ids, max_tokens=MAX_TOKENS)]
    return tokenizer.decode([t for t in ids if t not in tokenizer.eos_token_ids], skip_special_tokens=True)


@pytest.fixture(params=sorted(FAMILIES))
def served(request, tmp_path):
    """(family, base url, mlx-lm model, tokenizer) with `parallm serve` running the family."""
    from mlx_lm import load as mlx_lm_load

    path = write_family_model(request.param, tmp_path / request.param)
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "parallm", "serve", "--model", str(path),
                                 "--served-model-name", "m", "--port", str(port), "--device", "cpu",
                                 "--no-fine-tuning"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        model, tokenizer = mlx_lm_load(str(path))
        yield request.param, url, model, tokenizer
    finally:
        proc.terminate()
        proc.wait(30)


def test_concurrent_completions_and_a_streamed_chat_equal_mlx_lm(served):
    from openai import OpenAI

    family, url, model, tokenizer = served
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    def complete(prompt: str) -> str:
        reply = client.completions.create(model="m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        return reply.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
        texts = list(pool.map(complete, PROMPTS))
        stream = client.chat.completions.create(model="m", messages=CHAT, max_tokens=MAX_TOKENS,
                                                temperature=0, stream=True)
        chat = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    for prompt, text in zip(PROMPTS, texts):
        assert text == reference_text(model, tokenizer, tokenizer.encode(prompt)), (family, prompt)
    chat_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert chat == reference_text(model, tokenizer, chat_ids), family
    assert httpx.get(url + "/health", timeout=10).status_code == 200
