"""Prometheus metrics for one served app: engine gauges, per-request histograms, HTTP counts.

Names mirror vLLM v1's (vllm/v1/metrics/loggers.py) with the prefix `parallm:` instead of `vllm:`,
so a vLLM dashboard works after a change of prefix. prometheus_client appends `_total` to every
Counter on the wire, so counters are declared without it (`parallm:prompt_tokens` is exposed as
`parallm:prompt_tokens_total`, exactly as vLLM declares `vllm:prompt_tokens`).

Three sources feed the registry:
  * gauges and cumulative engine counters are read at scrape time from `engine.stats()` by
    `EngineStatsCollector` (no background thread, no stale copies);
  * per-request counters and histograms are fed by `ServingMetrics.on_request_finished()`, with
    the engine's own timestamps (RequestOutput.times), so queue and prefill time are real;
  * HTTP request counts and latencies by route template and status come from
    `HttpMetricsMiddleware` (parallm/server/http_metrics.py).

Every series carries `model_name`. Each app owns its CollectorRegistry: nothing is global, so two
apps in one process (tests) never share counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from parallm.engine.types import EngineStats, RequestOutput

PREFIX = "parallm:"

# The buckets vLLM uses, so histogram_quantile() panels read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                       5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
HTTP_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                        120.0, 300.0)


def token_count_buckets(max_model_len: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len (vLLM's build_1_2_5_buckets)."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            if value > max_model_len:
                return tuple(buckets)
            buckets.append(value)
        exponent += 1


@dataclass
class MetricsSources:
    """Callables read at scrape time. Each may be None where that part of the server is absent.

    `model_name` names the engine-wide series (the primary served model); `engine_stats` is
    `engine.stats`; `adapters_loaded` returns how many LoRA adapters are resident per base model;
    `fine_tuning_jobs` returns job counts by status (e.g. {"queued": 1, "running": 0}).
    """

    model_name: Callable[[], str]
    engine_stats: Optional[Callable[[], EngineStats]] = None
    adapters_loaded: Optional[Callable[[], Mapping[str, int]]] = None
    fine_tuning_jobs: Optional[Callable[[], Mapping[str, int]]] = None


class EngineStatsCollector(Collector):
    """Reads the engine's snapshot on every scrape and turns it into gauges and counters.

    The prefix-cache and preemption figures are cumulative inside the engine, so they are exposed
    as counters directly (CounterMetricFamily adds the `_total` suffix).
    """

    def __init__(self, sources: MetricsSources):
        self._sources = sources

    def collect(self) -> Iterable:
        model = self._sources.model_name()
        if self._sources.engine_stats is not None:
            stats = self._sources.engine_stats()
            yield _gauge("num_requests_running", "Number of requests in model execution batches.",
                         model, stats.num_running)
            yield _gauge("num_requests_waiting", "Number of requests waiting to be processed.",
                         model, stats.num_waiting)
            yield _gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                         model, stats.kv_cache_usage)
            yield _gauge("kv_cache_used_bytes", "Bytes of the KV-cache budget in use.",
                         model, stats.kv_bytes_used)
            yield _gauge("kv_cache_budget_bytes", "Bytes the KV cache may use.",
                         model, stats.kv_bytes_budget)
            yield _counter("prefix_cache_queries",
                           "Prefix cache queries, in terms of number of queried tokens.",
                           model, stats.prefix_cache_queries)
            yield _counter("prefix_cache_hits",
                           "Prefix cache hits, in terms of number of cached tokens.",
                           model, stats.prefix_cache_hits)
            yield _counter("num_preemptions", "Cumulative number of preemption from the engine.",
                           model, stats.num_preemptions)
            yield _counter("engine_steps", "Engine steps (schedule, run, update) taken.",
                           model, stats.steps)
            yield _counter("engine_busy_seconds", "Wall seconds the engine spent inside its steps.",
                           model, stats.busy_seconds)
            yield _counter("engine_idle_seconds", "Wall seconds the engine waited with no request to run.",
                           model, stats.idle_seconds)
            yield _counter("engine_decode_rows", "Decode rows run over all steps (one token each); "
                           "divided by engine_steps, how full the batch ran.", model, stats.decode_rows)
            yield _counter("engine_batched_tokens", "Prefill tokens plus decode rows run over all steps.",
                           model, stats.batched_tokens)
            yield _counter("engine_prefill_steps", "Engine steps that ran a prefill pass.",
                           model, stats.prefill_steps)
            if stats.phase_seconds:
                family = CounterMetricFamily(
                    PREFIX + "engine_phase_seconds",
                    "Wall seconds of the engine's steps by phase: schedule, build (the step's graph), "
                    "dispatch (inside mx.async_eval), wait (reading tokens back), update, and emit "
                    "(handing outputs to the server).", labels=["model_name", "phase"])
                for phase, seconds in stats.phase_seconds.items():
                    family.add_metric([model, phase], seconds)
                yield family
        if self._sources.adapters_loaded is not None:
            family = GaugeMetricFamily(PREFIX + "lora_adapters_loaded",
                                       "LoRA adapters resident in memory, per base model.",
                                       labels=["model_name"])
            for base_model, count in sorted(self._sources.adapters_loaded().items()):
                family.add_metric([base_model], count)
            yield family
        if self._sources.fine_tuning_jobs is not None:
            family = GaugeMetricFamily(PREFIX + "fine_tuning_jobs",
                                       "Fine-tuning jobs by status.",
                                       labels=["model_name", "status"])
            for status, count in sorted(self._sources.fine_tuning_jobs().items()):
                family.add_metric([model, status], count)
            yield family


def _gauge(name: str, doc: str, model: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
    family.add_metric([model], value)
    return family


def _counter(name: str, doc: str, model: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
    family.add_metric([model], value)
    return family


@dataclass
class RequestTokenTimes:
    """When each generated token reached the server, per choice index (time.monotonic())."""

    by_choice: dict[int, list[float]] = field(default_factory=dict)

    def record(self, output: RequestOutput, now: float) -> None:
        if output.token_ids:
            self.by_choice.setdefault(output.index, []).extend([now] * len(output.token_ids))

    def inter_token_gaps(self) -> list[float]:
        """Gaps between consecutive tokens of each choice. Tokens that arrived in one delta share
        a timestamp, so a gap of 0 there is real: the client saw them at once."""
        gaps: list[float] = []
        for stamps in self.by_choice.values():
            gaps.extend(later - earlier for earlier, later in zip(stamps, stamps[1:]))
        return gaps


class ServingMetrics:
    """The registry of one app, with the per-request instruments and the scrape-time collector."""

    def __init__(self, sources: MetricsSources, *, max_model_len: int = 131072):
        self.registry = CollectorRegistry(auto_describe=True)
        self.sources = sources
        self.registry.register(EngineStatsCollector(sources))
        r, m = self.registry, ["model_name"]
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Number of prefill tokens processed.",
                                     m, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens",
                                         "Number of generation tokens processed.", m, registry=r)
        self.cached_prompt_tokens = Counter(PREFIX + "prompt_tokens_cached",
                                            "Prompt tokens whose KV came from the prefix cache.",
                                            m, registry=r)
        self.request_success = Counter(PREFIX + "request_success",
                                       "Count of successfully processed requests.",
                                       m + ["finished_reason"], registry=r)
        token_buckets = token_count_buckets(max_model_len)
        self.request_prompt_tokens = Histogram(PREFIX + "request_prompt_tokens",
                                               "Number of prefill tokens processed.", m,
                                               buckets=token_buckets, registry=r)
        self.request_generation_tokens = Histogram(PREFIX + "request_generation_tokens",
                                                   "Number of generation tokens processed.", m,
                                                   buckets=token_buckets, registry=r)
        self.time_to_first_token = Histogram(PREFIX + "time_to_first_token_seconds",
                                             "Histogram of time to first token in seconds.", m,
                                             buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(PREFIX + "inter_token_latency_seconds",
                                             "Histogram of inter-token latency in seconds.", m,
                                             buckets=INTER_TOKEN_BUCKETS, registry=r)
        self.e2e_latency = Histogram(PREFIX + "e2e_request_latency_seconds",
                                     "Histogram of e2e request latency in seconds.", m,
                                     buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", m,
                                    buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.prefill_time = Histogram(PREFIX + "request_prefill_time_seconds",
                                      "Histogram of time spent in PREFILL phase for request.", m,
                                      buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.decode_time = Histogram(PREFIX + "request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.", m,
                                     buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.inference_time = Histogram(PREFIX + "request_inference_time_seconds",
                                        "Histogram of time spent in RUNNING phase for request.", m,
                                        buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.http_requests = Counter(PREFIX + "http_requests",
                                     "HTTP requests by method, route template and status.",
                                     m + ["method", "route", "status"], registry=r)
        self.http_latency = Histogram(PREFIX + "http_request_duration_seconds",
                                      "HTTP request latency (until the last body byte is sent).",
                                      m + ["method", "route"], buckets=HTTP_LATENCY_BUCKETS,
                                      registry=r)

    def on_request_finished(self, model: str, final: RequestOutput,
                            token_times: Optional[RequestTokenTimes] = None,
                            finish_reasons: Sequence[str] = ()) -> None:
        """Record one finished request. `final` is the output with `finished=True` (it carries
        usage and the engine's times). `finish_reasons` lists every choice's reason when n > 1;
        the request is counted once, under its first choice's reason (vLLM counts per request)."""
        reason = (finish_reasons[0] if finish_reasons else final.finish_reason) or "unknown"
        self.request_success.labels(model, reason).inc()
        usage = final.usage
        if usage is not None:
            self.prompt_tokens.labels(model).inc(usage.prompt_tokens)
            self.generation_tokens.labels(model).inc(usage.completion_tokens)
            self.cached_prompt_tokens.labels(model).inc(usage.cached_tokens)
            self.request_prompt_tokens.labels(model).observe(usage.prompt_tokens)
            self.request_generation_tokens.labels(model).observe(usage.completion_tokens)
        times = final.times
        if times is not None:
            if times.first_scheduled is not None:
                self.queue_time.labels(model).observe(times.first_scheduled - times.arrival)
            if times.first_token is not None:
                self.time_to_first_token.labels(model).observe(times.first_token - times.arrival)
                if times.first_scheduled is not None:
                    self.prefill_time.labels(model).observe(times.first_token - times.first_scheduled)
            if times.finished is not None:
                self.e2e_latency.labels(model).observe(times.finished - times.arrival)
                if times.first_token is not None:
                    self.decode_time.labels(model).observe(times.finished - times.first_token)
                if times.first_scheduled is not None:
                    self.inference_time.labels(model).observe(times.finished - times.first_scheduled)
        if token_times is not None:
            itl = self.inter_token_latency.labels(model)
            for gap in token_times.inter_token_gaps():
                itl.observe(gap)

    def on_request_aborted(self, model: str) -> None:
        """A stream the client left before the engine's final output: counted as `abort`."""
        self.request_success.labels(model, "abort").inc()

    def on_http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        model = self.sources.model_name()
        self.http_requests.labels(model, method, route, str(status)).inc()
        self.http_latency.labels(model, method, route).observe(seconds)


def primary_model_name(engine) -> str:
    """The label value for engine-wide series: the first served base model ("" before any)."""
    names = engine.model_names()
    return names[0] if names else ""
