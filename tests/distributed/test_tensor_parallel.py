"""2 ranks on loopback (ring backend) serving the tiny Llama, against the single-process engine.

One cluster serves the behaviour tests; the fault test at the end kills its rank 1 (so it runs
last in this module). The ranks run with --distributed-verify-every 1: after every step they
all-gather a digest of what they sampled and fail on any difference, so every test here also
checks that the ranks stayed in lockstep.
"""
from __future__ import annotations

import re
import signal
import threading
import time

import httpx
import pytest

from tests.distributed.cluster import start_cluster

pytestmark = pytest.mark.skipif(
    not __import__("mlx.core", fromlist=["distributed"]).distributed.is_available(),
    reason="this MLX build has no distributed backend")

MAX_BATCHED = 64  # small, so the long prompt below is prefilled in chunks over several steps
SERVER_ARGS = ("--max-num-batched-tokens", str(MAX_BATCHED), "--distributed-verify-every", "1",
               "--distributed-timeout", "30", "--served-model-name", "tiny")


def prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7919 + j * 104729) % 49000 + 100 for j in range(length)]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    c = start_cluster(tiny_model_dir, tmp_path_factory.mktemp("tp"), extra_args=SERVER_ARGS)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Single-process engine, same settings: request dict -> list of choice texts."""
    from parallm.engine.engine import Engine, EngineConfig
    from parallm.engine.types import EngineRequest, SamplingParams
    from parallm.models import load

    engine = Engine(load(str(tiny_model_dir), device="cpu"), EngineConfig(max_num_batched_tokens=MAX_BATCHED))
    counter = iter(range(10**6))

    def run(body: dict) -> list[str]:
        params = SamplingParams(max_tokens=body["max_tokens"], temperature=body.get("temperature", 1.0),
                                n=body.get("n", 1), seed=body.get("seed"), ignore_eos=True)
        engine.add_request(EngineRequest(f"ref-{next(counter)}", list(body["prompt"]), params))
        texts = [""] * params.n
        while engine.has_unfinished():
            for out in engine.step().outputs:
                texts[out.index] += out.text
        return texts

    return run


def complete(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "ignore_eos": True, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def texts_of(resp: dict) -> list[str]:
    return [c["text"] for c in sorted(resp["choices"], key=lambda c: c["index"])]


def test_greedy_and_seeded_outputs_match_the_single_process_engine(cluster, reference):
    bodies = [
        {"prompt": prompt(1, 5), "max_tokens": 24, "temperature": 0},
        {"prompt": prompt(2, 150), "max_tokens": 16, "temperature": 0},  # chunked: 150 > 64 per step
        {"prompt": prompt(3, 33), "max_tokens": 20, "temperature": 0},
        {"prompt": prompt(4, 12), "max_tokens": 20, "temperature": 1.0, "seed": 1234},
        {"prompt": prompt(5, 20), "max_tokens": 12, "temperature": 0.9, "seed": 7, "n": 2},
    ]
    results: dict[int, dict] = {}

    def send(i: int) -> None:  # concurrent: the ranks batch them together, joining at different steps
        time.sleep(0.05 * i)
        results[i] = complete(cluster.url, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == len(bodies), cluster.log(0)[-3000:]
    for i, body in enumerate(bodies):
        got = texts_of(results[i])
        assert got == reference(body), f"request {i} differs from the single-process engine"
        assert all(len(t) > 0 for t in got)


def test_unseeded_sampling_is_consistent_across_ranks(cluster):
    # No seed: rank 0 draws one per row and ships it; the per-step check (verify-every 1) would
    # fail the group if the ranks sampled differently, and the group keeps serving afterwards.
    resp = complete(cluster.url, {"prompt": prompt(6, 10), "max_tokens": 16, "temperature": 1.0, "n": 3})
    assert len(resp["choices"]) == 3
    assert httpx.get(cluster.url + "/health").status_code == 200


def test_prefix_cache_hit_gives_the_same_output(cluster, reference):
    body = {"prompt": prompt(8, 70), "max_tokens": 10, "temperature": 0}
    first, second = complete(cluster.url, body), complete(cluster.url, body)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 64
    assert texts_of(first) == texts_of(second) == reference(body)


def test_abort_frees_the_row_and_the_group_keeps_serving(cluster, reference):
    body = {"model": "tiny", "prompt": prompt(9, 8), "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True, "stream": True}
    chunks = 0
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks += 1
                if chunks == 3:
                    break  # leaving the block closes the connection: the server aborts the request
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        engine = httpx.get(cluster.url + "/health").json()["engine"]
        if engine["num_running"] == 0 and engine["num_waiting"] == 0:
            break
        time.sleep(0.1)
    assert engine["num_running"] == 0, f"the aborted request still holds a row: {engine}"
    after = {"prompt": prompt(10, 6), "max_tokens": 8, "temperature": 0}
    assert texts_of(complete(cluster.url, after)) == reference(after)


@pytest.mark.skip(reason="adapters: the `adapters` branch (parallm/models/lora.py MultiLoRALinear) is not "
                  "merged into engine/server yet, and MultiLoRALinear only wraps nn.Linear/QuantizedLinear, "
                  "not the sharded linears model.shard() installs; see docs/distributed.md 'Adapters'")
def test_adapter_request_on_two_ranks():
    raise AssertionError("not reached")


def test_killing_a_rank_mid_generation_fails_rank0_cleanly(cluster):
    """Runs last: it breaks the module's cluster. Rank 1 dies while a stream is being generated
    (rank 0 is inside the model's all-reduces): the stream ends with an error, /health turns 503
    naming the lost rank, new requests get an error at once, and rank 0 exits with status 3."""
    body = {"model": "tiny", "prompt": prompt(11, 8), "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True, "stream": True}
    lines = []
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            lines.append(line)
            if len(lines) == 6:
                cluster.ranks[1].send_signal(signal.SIGKILL)
    # the stream ended (no hang: the read timeout is 30 s) without finishing its 1500 tokens
    assert lines and not any('"finish_reason":"length"' in l for l in lines)
    deadline = time.monotonic() + 10
    unhealthy = None
    while time.monotonic() < deadline and cluster.ranks[0].poll() is None:
        r = httpx.get(cluster.url + "/health", timeout=2)
        if r.status_code == 503:
            unhealthy = r.json()
            break
        time.sleep(0.05)
    assert unhealthy is not None, "rank 0's /health never reported the lost rank"
    # whichever notices first names the cause: the liveness link ("rank 1 ... closed") or the ring
    # ("connection to a peer was lost")
    lost = re.compile(r"rank 1 .*closed its liveness connection|connection to a peer was lost")
    assert unhealthy["status"] == "unhealthy" and lost.search(unhealthy["error"]), unhealthy
    r = httpx.post(cluster.url + "/v1/completions", timeout=10,
                   json={"model": "tiny", "prompt": prompt(12, 4), "max_tokens": 4})
    assert r.status_code == 500 and lost.search(r.text), r.text  # EngineDead at once, not a hang
    assert cluster.wait_exit(0, timeout=30) == 3, cluster.log(0)[-2000:]
    assert "distributed group failed" in cluster.log(0)
