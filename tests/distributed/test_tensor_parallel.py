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

from tests.adapters.conftest import write_adapter_dir
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
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    """Two LoRA adapters on every linear of the last 2 blocks (q/k/v/gate/up are all-to-sharded,
    o/down sharded-to-all once split): X served from startup, Y loaded at run time."""
    root = tmp_path_factory.mktemp("tp-adapters")
    return {"X": write_adapter_dir(tiny_model_dir, root / "X", seed=11),
            "Y": write_adapter_dir(tiny_model_dir, root / "Y", seed=12, rank=8)}


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory, adapter_dirs):
    args = (*SERVER_ARGS, "--adapter", f"X={adapter_dirs['X']}", "--adapters-dir", str(adapter_dirs["Y"].parent))
    c = start_cluster(tiny_model_dir, tmp_path_factory.mktemp("tp"), extra_args=args)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_dirs):
    """Single-process engine, same settings, serving adapters X and Y: request dict -> list of
    choice texts (body["model"] may name an adapter)."""
    from parallm.engine.adapter_manager import AdapterManager
    from parallm.engine.engine import Engine, EngineConfig
    from parallm.engine.types import EngineRequest, SamplingParams
    from parallm.models import load

    loaded = load(str(tiny_model_dir), device="cpu")
    adapters = AdapterManager(loaded.name, loaded.model)
    for name, path in adapter_dirs.items():
        adapters.load(name, path, trusted=True)
    engine = Engine(loaded, EngineConfig(max_num_batched_tokens=MAX_BATCHED), adapters=adapters)
    counter = iter(range(10**6))

    def run(body: dict) -> list[str]:
        params = SamplingParams(max_tokens=body["max_tokens"], temperature=body.get("temperature", 1.0),
                                n=body.get("n", 1), seed=body.get("seed"), ignore_eos=True)
        adapter = body.get("model") if body.get("model") in adapter_dirs else None
        engine.add_request(EngineRequest(f"ref-{next(counter)}", list(body["prompt"]), params, adapter=adapter))
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


def _concurrently(url: str, bodies: list[dict]) -> list[dict]:
    results: dict[int, dict] = {}

    def send(i: int) -> None:
        time.sleep(0.03 * i)
        results[i] = complete(url, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == len(bodies)
    return [results[i] for i in range(len(bodies))]


def test_adapter_request_on_two_ranks(cluster, reference):
    """Startup adapter X (--adapter on every rank): the 2-rank output equals the single-process
    output with X and differs from the base model's; a batch mixing X and the base model gives
    each row its own (verify-every 1 also checks both ranks bound the same slots every step)."""
    with_x = {"model": "X", "prompt": prompt(21, 9), "max_tokens": 16, "temperature": 0}
    base = {**with_x, "model": "tiny"}
    got_x = texts_of(complete(cluster.url, with_x))
    assert got_x == reference(with_x)
    assert got_x != reference(base), "the adapter does not change the output: the test would prove nothing"
    mixed = [{"model": m, "prompt": prompt(30 + i, 7 + 3 * i), "max_tokens": 12, "temperature": 0}
             for i, m in enumerate(["X", "tiny", "X", "tiny"])]
    for body, resp in zip(mixed, _concurrently(cluster.url, mixed)):
        assert texts_of(resp) == reference(body), f"{body['model']} row differs from the single-process engine"
    assert httpx.get(cluster.url + "/health").status_code == 200


def test_adapter_loaded_at_run_time_reaches_every_rank(cluster, reference):
    """/v1/load_lora_adapter on rank 0: the install travels in the step plan, every rank reads Y
    from the same path and installs its slice at the same slot before the same step; unloading
    it makes it unknown again and the group keeps serving."""
    assert complete_status(cluster.url, {"model": "Y", "prompt": prompt(40, 5), "max_tokens": 4}) == 404
    r = httpx.post(cluster.url + "/v1/load_lora_adapter", json={"lora_name": "Y", "lora_path": "Y"}, timeout=60)
    assert r.status_code == 200, r.text
    mixed = [{"model": m, "prompt": prompt(41 + i, 6 + 2 * i), "max_tokens": 12, "temperature": 0}
             for i, m in enumerate(["Y", "X", "tiny", "Y"])]
    for body, resp in zip(mixed, _concurrently(cluster.url, mixed)):
        assert texts_of(resp) == reference(body), f"{body['model']} row differs from the single-process engine"
    assert texts_of(complete(cluster.url, mixed[0])) != reference({**mixed[0], "model": "X"})
    r = httpx.post(cluster.url + "/v1/unload_lora_adapter", json={"lora_name": "Y"}, timeout=30)
    assert r.status_code == 200, r.text
    assert complete_status(cluster.url, {"model": "Y", "prompt": prompt(40, 5), "max_tokens": 4}) == 404
    after = {"model": "X", "prompt": prompt(42, 5), "max_tokens": 8, "temperature": 0}
    assert texts_of(complete(cluster.url, after)) == reference(after)  # ops after the unload applied alike


def test_dora_adapter_is_refused_in_distributed_mode(cluster, tiny_model_dir, adapter_dirs):
    write_adapter_dir(tiny_model_dir, adapter_dirs["Y"].parent / "D", seed=13, dora=True)
    r = httpx.post(cluster.url + "/v1/load_lora_adapter", json={"lora_name": "D", "lora_path": "D"}, timeout=60)
    assert r.status_code == 400 and "DoRA" in r.json()["error"]["message"], r.text
    assert httpx.get(cluster.url + "/health").status_code == 200


def complete_status(url: str, body: dict) -> int:
    return httpx.post(url + "/v1/completions", json={"ignore_eos": True, **body}, timeout=60).status_code


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
    assert r.status_code == 503 and lost.search(r.text), r.text  # EngineDead at once, not a hang
    assert cluster.wait_exit(0, timeout=30) == 3, cluster.log(0)[-2000:]
    assert "distributed group failed" in cluster.log(0)
