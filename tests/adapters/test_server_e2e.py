"""End to end through the HTTP server and the AsyncEngine: `"model": "<adapter>"` runs the base
model with that adapter in the same batch as other requests; unloading an adapter while a request
uses it lets that request finish and answers 404 to new ones; /v1/models lists adapters with
parent and root."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from live_app import run_app_in_thread

from parallm.engine.adapter_manager import AdapterManager
from parallm.engine.async_engine import AsyncEngine
from parallm.engine.engine import EngineConfig
from parallm.models import load
from parallm.server.app import create_app
from parallm.server.config import ServerSettings

from .test_lora import greedy
from tests.server.conftest import free_port

PROMPT = [5, 17, 300, 42, 9000, 7, 11, 12]


@pytest.fixture
def server(tiny_model_dir, tmp_path, make_adapter):
    loaded = load(str(tiny_model_dir), device="cpu", name="tiny")
    (tmp_path / "adapters").mkdir(exist_ok=True)
    manager = AdapterManager("tiny", loaded.model, adapters_dir=tmp_path / "adapters")
    engine = AsyncEngine(loaded, EngineConfig(max_num_seqs=8, max_num_batched_tokens=64), adapters=manager)
    port = free_port()
    app = create_app(engine, ServerSettings(port=port))
    srv, thread = run_app_in_thread(app, port)
    yield f"http://127.0.0.1:{port}", manager
    srv.should_exit = True
    thread.join(timeout=30)


def reference_text(tiny_model_dir, adapter_dir, steps):
    from mlx_lm import load as mlx_load
    from mlx_lm.tuner.utils import load_adapters

    model, tok = mlx_load(str(tiny_model_dir))
    if adapter_dir is not None:
        load_adapters(model, str(adapter_dir))
    toks, _ = greedy(model, [PROMPT], steps=steps)
    return tok.decode(toks[0], skip_special_tokens=True)  # as the OpenAI API does


def completion(model, max_tokens):
    return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def test_adapters_through_the_server(server, tiny_model_dir, make_adapter):
    url, manager = server
    x_dir, y_dir = make_adapter("x", seed=1), make_adapter("y", seed=2, dora=True)
    with httpx.Client(base_url=url, timeout=60) as c:
        for name in ("x", "y"):
            r = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name})
            assert r.status_code == 200, r.text
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert models["x"]["parent"] == "tiny" and models["x"]["root"] == "x"
        assert models["tiny"]["parent"] is None

        # Three requests at once: x, y and the base model share batches.
        results = {}

        def run(model):
            with httpx.Client(base_url=url, timeout=120) as cc:
                results[model] = cc.post("/v1/completions", json=completion(model, 8))

        threads = [threading.Thread(target=run, args=(m,)) for m in ("x", "y", "tiny")]
        [t.start() for t in threads]
        [t.join() for t in threads]
        for model, adapter_dir in (("x", x_dir), ("y", y_dir), ("tiny", None)):
            r = results[model]
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == reference_text(tiny_model_dir, adapter_dir, 8), model
        assert results["x"].json()["choices"][0]["text"] != results["tiny"].json()["choices"][0]["text"]

        r = c.post("/v1/completions", json=completion("nope", 4))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_unload_while_streaming(server, tiny_model_dir, make_adapter):
    url, manager = server
    x_dir = make_adapter("x", seed=1)
    steps = 24
    with httpx.Client(base_url=url, timeout=120) as c:
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "x"}).status_code == 200
        text, unloaded = "", False
        with c.stream("POST", "/v1/completions", json={**completion("x", steps), "stream": True}) as stream:
            assert stream.status_code == 200
            with httpx.Client(base_url=url, timeout=60) as other:
                for line in stream.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    text += chunk["choices"][0]["text"] if chunk.get("choices") else ""
                    if not unloaded and text:
                        r = other.post("/v1/unload_lora_adapter", json={"lora_name": "x"})
                        assert r.status_code == 200, r.text
                        unloaded = True
                        r = other.post("/v1/completions", json=completion("x", 2))
                        assert r.status_code == 404, r.text
                        assert manager.list()[0].unloading  # still held by the stream
        assert unloaded
        assert text == reference_text(tiny_model_dir, x_dir, steps)  # finished with its adapter
        deadline = time.monotonic() + 10
        while manager.list() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert manager.list() == []  # freed after the last request
        assert "x" not in {m["id"] for m in c.get("/v1/models").json()["data"]}


def test_reloaded_name_does_not_reuse_old_prefix_kv(server, tiny_model_dir, make_adapter):
    """The prefix cache is keyed per load: adapter 'x' unloaded and loaded again from other weights
    gives the new adapter's output for a prompt whose prefix was cached under the old one."""
    url, _ = server
    old_dir, new_dir = make_adapter("old", seed=1), make_adapter("new", seed=2)
    long_prompt = PROMPT * 5  # 40 tokens: two full prefix-cache blocks
    body = {"model": "x", "prompt": long_prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}

    def ref(adapter_dir):
        from mlx_lm import load as mlx_load
        from mlx_lm.tuner.utils import load_adapters
        model, tok = mlx_load(str(tiny_model_dir))
        load_adapters(model, str(adapter_dir))
        return tok.decode(greedy(model, [long_prompt], steps=4)[0][0])

    with httpx.Client(base_url=url, timeout=120) as c:
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "old"}).status_code == 200
        first = c.post("/v1/completions", json=body)
        assert first.json()["choices"][0]["text"] == ref(old_dir)
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 200
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "new"}).status_code == 200
        second = c.post("/v1/completions", json=body)
        assert second.json()["choices"][0]["text"] == ref(new_dir)
        assert second.json()["choices"][0]["text"] != first.json()["choices"][0]["text"]
