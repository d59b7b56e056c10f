"""Several base models in one `parallm serve` (MultiModelEngine), end to end through the real
openai client: each model answers with its own greedy tokens, /v1/models lists them with metadata,
models load at run time through the admin API, the memory budget evicts the least recently used
idle model (its engine stops), and an unload lets the request in flight finish while new ones 404."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from live_app import run_app_in_thread

from parallm.server.app import create_app
from parallm.server.config import ServerSettings
from parallm.commands.serve import build_engine
from tests.server.conftest import free_port
from tests.tiny_models import write_tiny_llama

from .test_lora import greedy

PROMPT = [5, 17, 300, 42, 9000, 7, 11, 12]
STEPS = 6


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    return {name: write_tiny_llama(root / name, seed=seed) for name, seed in (("alpha", 11), ("beta", 22),
                                                                                ("gamma", 33))}


def reference(model_dir, steps=STEPS):
    """mlx-lm's greedy tokens (as text) and each chosen token's logprob. The tiny random models all
    echo the prompt's last token, so the logprobs are what tells two models apart."""
    import mlx.core as mx
    from mlx_lm import load as mlx_load

    model, tok = mlx_load(str(model_dir))
    toks, logits = greedy(model, [PROMPT], steps=steps)
    logprobs = [(step - mx.logsumexp(step, axis=-1, keepdims=True))[0, t].item()
                for step, t in zip(logits, toks[0])]
    return tok.decode(toks[0], skip_special_tokens=True), logprobs


def answer(choice):
    return choice.text, choice.logprobs.token_logprobs


def assert_same(got, want):
    assert got[0] == want[0]
    assert got[1] == pytest.approx(want[1], rel=2e-2, abs=1e-6)  # logprobs near 0: relative


@pytest.fixture
def served(model_dirs):
    """alpha and beta served at startup; a budget that holds two tiny models but not three."""
    settings = ServerSettings(model=[str(model_dirs["alpha"]), str(model_dirs["beta"])],
                              served_model_name=["alpha", "beta"], device="cpu", max_num_seqs=4,
                              max_num_batched_tokens=64, fine_tuning=False, drain_timeout=60,
                              models_dir=str(model_dirs["gamma"].parent))
    engine = build_engine(settings)
    one_model = engine.registry.total_weight_bytes() // 2
    engine.registry.memory_budget_bytes = int(one_model * 2.5)
    port = free_port()
    app = create_app(engine, ServerSettings(port=port))
    srv, thread = run_app_in_thread(app, port)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(timeout=30)


def complete(client, model, max_tokens=STEPS, **kwargs):
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                     extra_body={"ignore_eos": True}, **{"logprobs": 1, **kwargs})


def test_two_models_answer_with_their_own_tokens(served, model_dirs):
    url, engine = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    got = {m: answer(complete(client, m).choices[0]) for m in ("alpha", "beta")}
    want = {m: reference(model_dirs[m]) for m in ("alpha", "beta")}
    for m in ("alpha", "beta"):
        assert_same(got[m], want[m])
    # different weights, different numbers: the routing is really per model
    assert want["alpha"][1] != pytest.approx(want["beta"][1], rel=2e-2, abs=1e-6)

    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert set(cards) == {"alpha", "beta"}
    for name in ("alpha", "beta"):
        assert cards[name]["parent"] is None and cards[name]["root"] == model_dirs[name].name
        meta = cards[name]["parallm"]
        assert meta["kind"] == "model" and meta["context_length"] == 2048 and meta["memory_bytes"] > 0

    with pytest.raises(openai.NotFoundError) as err:
        complete(client, "nope")
    assert "alpha" in str(err.value) and "beta" in str(err.value)


def test_run_time_load_evicts_lru_then_unload_in_flight(served, model_dirs):
    url, engine = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    complete(client, "alpha", max_tokens=1)
    complete(client, "beta", max_tokens=1)  # alpha is now the least recently used
    alpha_engine = engine.engine_for("alpha")

    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/v1/admin/models/load", json={"model": str(model_dirs["gamma"]), "name": "gamma"})
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "gamma" and r.json()["parallm"]["context_length"] == 2048
    assert engine.model_names() == ["beta", "gamma"]
    assert set(engine.model_stats()) == {"beta", "gamma"}
    deadline = time.monotonic() + 30
    while alpha_engine._thread.is_alive():  # the evicted model's worker stops
        assert time.monotonic() < deadline, "the evicted engine did not stop"
        time.sleep(0.01)
    assert_same(answer(complete(client, "gamma").choices[0]), reference(model_dirs["gamma"]))
    with pytest.raises(openai.NotFoundError):
        complete(client, "alpha")
    assert {m.id for m in client.models.list().data} == {"beta", "gamma"}

    # Unload beta while a long request runs on it: it finishes; new requests get 404 at once.
    stream = complete(client, "beta", max_tokens=120, stream=True)
    pieces = [next(iter(stream))]
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/v1/admin/models/unload", json={"model": "beta", "force": True})
        assert r.status_code == 200, r.text
        busy = c.post("/v1/admin/models/unload", json={"model": "gamma"})
        assert busy.status_code == 200  # idle: no force needed
    with pytest.raises(openai.NotFoundError):
        complete(client, "beta")
    pieces += list(stream)
    finish = [p.choices[0].finish_reason for p in pieces if p.choices and p.choices[0].finish_reason]
    assert finish == ["length"]
    assert engine.model_names() == []
    with httpx.Client(base_url=url, timeout=60) as c:
        health = c.get("/health").json()
    assert health["models"] == []


def test_model_lists_from_toml_and_cli(tmp_path):
    import argparse

    from parallm.server.config import ConfigError, load_settings
    from parallm.commands.engines import ModelSpec, StartupAdapter, model_specs, startup_adapters
    from parallm.commands.serve import add_arguments

    toml = tmp_path / "c.toml"
    toml.write_text('model = ["/m/a", "/m/b"]\nserved_model_name = ["a"]\nmemory_budget_bytes = 1000\n')
    settings = load_settings({}, config_file=str(toml), environ={})
    assert model_specs(settings) == [ModelSpec("/m/a", "a"), ModelSpec("/m/b", None)]
    assert settings.memory_budget_bytes == 1000
    assert model_specs(load_settings({"model": "/m/one"}, environ={})) == [ModelSpec("/m/one", None)]
    with pytest.raises(ConfigError, match="pair by position"):
        model_specs(load_settings({"model": "/m/a", "served_model_name": ["x", "y"]}, environ={}))
    toml.write_text("model = [1, 2]\n")
    with pytest.raises(ConfigError, match="list of strings"):
        load_settings({}, config_file=str(toml), environ={})

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "/m/a", "--model", "/m/b", "--served-model-name", "a"])
    assert args.model == ["/m/a", "/m/b"] and args.served_model_name == ["a"]
    adapters = startup_adapters(load_settings({"adapters": "x=/ad/x,y=/ad/y@b"}, environ={}))
    assert adapters == [StartupAdapter("x", "/ad/x", None), StartupAdapter("y", "/ad/y", "b")]
    with pytest.raises(ConfigError, match="empty"):
        startup_adapters(load_settings({"adapters": "y=/ad/y@"}, environ={}))
