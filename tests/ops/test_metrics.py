"""/metrics after a few requests through a small app and a fake engine: parses with
prometheus_client's parser, names match vLLM's (with our prefix), counts match what was sent."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from parallm.engine.types import RequestOutput, RequestTimes, Usage
from parallm.server.metrics import MetricsSources, RequestTokenTimes, ServingMetrics, token_count_buckets

from .conftest import DECODE_S, MODEL, PREFILL_S, QUEUE_S, build_app


def scrape(client: TestClient) -> dict[str, list]:
    """{sample name: [(labels, value), ...]} from a real /metrics scrape."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples, name, **labels) -> float:
    matches = [v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} series in {samples.get(name)}"
    return matches[0]


def test_counters_and_histograms_match_the_requests_sent(fake_engine):
    app, _ = build_app(fake_engine)
    prompts = [("one two three", 2), ("a b", 5), ("w x y z", 3)]
    with TestClient(app) as client:
        for prompt, max_tokens in prompts:
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens})
            assert r.status_code == 200 and r.json()["text"] == "x" * max_tokens
        s = scrape(client)

    n = len(prompts)
    assert value(s, "parallm:prompt_tokens_total", model_name=MODEL) == sum(len(p.split()) for p, _ in prompts)
    assert value(s, "parallm:generation_tokens_total", model_name=MODEL) == sum(m for _, m in prompts)
    assert value(s, "parallm:request_success_total", model_name=MODEL, finished_reason="length") == n
    # Engine timestamps drive the request histograms: every fake request queued QUEUE_S, etc.
    assert value(s, "parallm:request_queue_time_seconds_count", model_name=MODEL) == n
    assert value(s, "parallm:request_queue_time_seconds_sum", model_name=MODEL) == pytest.approx(n * QUEUE_S)
    assert value(s, "parallm:time_to_first_token_seconds_sum", model_name=MODEL) == pytest.approx(n * (QUEUE_S + PREFILL_S))
    assert value(s, "parallm:request_prefill_time_seconds_sum", model_name=MODEL) == pytest.approx(n * PREFILL_S)
    assert value(s, "parallm:e2e_request_latency_seconds_sum", model_name=MODEL) == pytest.approx(n * (QUEUE_S + PREFILL_S + DECODE_S))
    # one inter-token gap per token after the first of each request
    assert value(s, "parallm:inter_token_latency_seconds_count", model_name=MODEL) == sum(m - 1 for _, m in prompts)
    assert value(s, "parallm:request_prompt_tokens_count", model_name=MODEL) == n


def test_engine_gauges_are_read_at_scrape_time(fake_engine):
    app, _ = build_app(fake_engine)
    with TestClient(app) as client:
        s = scrape(client)
        assert value(s, "parallm:num_requests_running", model_name=MODEL) == 3
        assert value(s, "parallm:num_requests_waiting", model_name=MODEL) == 2
        assert value(s, "parallm:kv_cache_usage_perc", model_name=MODEL) == 0.25
        assert value(s, "parallm:prefix_cache_queries_total", model_name=MODEL) == 40
        assert value(s, "parallm:prefix_cache_hits_total", model_name=MODEL) == 10
        assert value(s, "parallm:num_preemptions_total", model_name=MODEL) == 1
        assert value(s, "parallm:engine_steps_total", model_name=MODEL) == 7
        assert value(s, "parallm:engine_decode_rows_total", model_name=MODEL) == 150
        assert value(s, "parallm:engine_busy_seconds_total", model_name=MODEL) == 2.5
        assert value(s, "parallm:engine_idle_seconds_total", model_name=MODEL) == 0.5
        assert value(s, "parallm:engine_prefill_steps_total", model_name=MODEL) == 20
        assert value(s, "parallm:engine_phase_seconds_total", model_name=MODEL, phase="build") == 1.25
        assert value(s, "parallm:engine_phase_seconds_total", model_name=MODEL, phase="emit") == 0.125
        fake_engine.stats_snapshot.num_waiting = 9
        fake_engine.stats_snapshot.prefix_cache_hits = 30
        s = scrape(client)
        assert value(s, "parallm:num_requests_waiting", model_name=MODEL) == 9
        assert value(s, "parallm:prefix_cache_hits_total", model_name=MODEL) == 30


def test_adapters_and_fine_tuning_job_gauges(fake_engine):
    jobs = {"queued": 2, "running": 1, "succeeded": 0}
    app, _ = build_app(fake_engine, fine_tuning_jobs=lambda: dict(jobs),
                       adapters_loaded=lambda: {MODEL: 3})
    with TestClient(app) as client:
        s = scrape(client)
        assert value(s, "parallm:fine_tuning_jobs", model_name=MODEL, status="queued") == 2
        assert value(s, "parallm:fine_tuning_jobs", model_name=MODEL, status="running") == 1
        assert value(s, "parallm:lora_adapters_loaded", model_name=MODEL) == 3
        jobs["running"] = 0
        assert value(scrape(client), "parallm:fine_tuning_jobs", model_name=MODEL, status="running") == 0


def test_http_requests_are_counted_by_route_template_and_status(fake_engine):
    app, _ = build_app(fake_engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        for name in ("a", "b", "c"):
            assert client.get(f"/v1/models/{name}").status_code == 404
        assert client.get(f"/v1/models/{MODEL}").status_code == 200
        assert client.get("/no/such/path/1").status_code == 404
        assert client.get("/no/such/path/2").status_code == 404
        assert client.get("/boom").status_code == 500
        s = scrape(client)
    routes = {lab["route"] for lab, _ in s["parallm:http_requests_total"]}
    # templates only: no raw ids, no per-path series for unmatched URLs
    assert routes == {"/v1/models/{model}", "<unmatched>", "/boom"}
    assert value(s, "parallm:http_requests_total", route="/v1/models/{model}", status="404", method="GET") == 3
    assert value(s, "parallm:http_requests_total", route="/v1/models/{model}", status="200") == 1
    assert value(s, "parallm:http_requests_total", route="<unmatched>", status="404") == 2
    assert value(s, "parallm:http_requests_total", route="/boom", status="500") == 1
    assert value(s, "parallm:http_request_duration_seconds_count", route="/v1/models/{model}", method="GET") == 4


def test_every_series_carries_model_name(fake_engine):
    app, _ = build_app(fake_engine, fine_tuning_jobs=lambda: {"queued": 1}, adapters_loaded=lambda: {MODEL: 0})
    with TestClient(app) as client:
        client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        client.get("/v1/models/x")
        s = scrape(client)
    missing = [name for name, series in s.items() if name.startswith("parallm:")
               for labels, _ in series if "model_name" not in labels]
    assert not missing
    # process/python collectors are not registered: an app's registry holds only parallm's series
    assert all(n.startswith("parallm:") for n in s), sorted(n for n in s if not n.startswith("parallm:"))


def test_two_apps_do_not_share_counts(fake_engine):
    app1, _ = build_app(fake_engine)
    app2, _ = build_app(fake_engine)
    with TestClient(app1) as c1, TestClient(app2) as c2:
        c1.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert value(scrape(c1), "parallm:request_success_total", finished_reason="length") == 1
        assert "parallm:request_success_total" not in scrape(c2)


def test_client_leaving_a_stream_counts_as_abort(fake_engine):
    import asyncio

    from parallm.engine.types import EngineRequest, SamplingParams
    from parallm.server.request_observer import observe_stream

    metrics = ServingMetrics(MetricsSources(model_name=lambda: MODEL, engine_stats=fake_engine.stats))

    async def take_one():
        stream = observe_stream(metrics, MODEL, fake_engine.generate(EngineRequest("r", [1, 2], SamplingParams(max_tokens=5),
                                                                                     model=MODEL)))
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(take_one())
    get = metrics.registry.get_sample_value
    assert get("parallm:request_success_total", {"model_name": MODEL, "finished_reason": "abort"}) == 1
    assert get("parallm:prompt_tokens_total", {"model_name": MODEL}) is None


def test_inter_token_gaps_are_per_choice():
    times = RequestTokenTimes()
    times.record(RequestOutput("r", index=0, token_ids=[1]), 1.0)
    times.record(RequestOutput("r", index=1, token_ids=[1]), 1.5)
    times.record(RequestOutput("r", index=0, token_ids=[2, 3]), 3.0)
    times.record(RequestOutput("r", index=1, token_ids=[]), 9.0)  # no token: no stamp
    assert sorted(times.inter_token_gaps()) == [0.0, 2.0]


def test_missing_engine_times_record_counts_without_latencies():
    metrics = ServingMetrics(MetricsSources(model_name=lambda: MODEL))
    final = RequestOutput("r", finish_reason="stop", finished=True,
                          usage=Usage(prompt_tokens=4, completion_tokens=2),
                          times=RequestTimes(arrival=5.0, first_scheduled=None, first_token=None, finished=6.0))
    metrics.on_request_finished(MODEL, final)
    get = metrics.registry.get_sample_value
    labels = {"model_name": MODEL}
    assert get("parallm:generation_tokens_total", labels) == 2
    assert get("parallm:request_queue_time_seconds_count", labels) is None  # unknown, not zero
    assert get("parallm:e2e_request_latency_seconds_count", labels) == 1
    assert get("parallm:e2e_request_latency_seconds_sum", labels) == pytest.approx(1.0)


def test_token_count_buckets():
    assert token_count_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert token_count_buckets(4) == (1, 2)
