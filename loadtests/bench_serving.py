"""The serving benchmark: streaming requests at a sweep of concurrencies, against any
OpenAI-compatible server, parallm's own engine without HTTP, or two parallm checkouts.

  # one server that is already running
  python loadtests/bench_serving.py --url http://127.0.0.1:8000 --concurrency 1,4,16

  # parallm against mlx_lm.server on the same model dir, the same sweep, ratios printed;
  # --engine-baseline adds the same load straight into an in-process AsyncEngine (no HTTP)
  python loadtests/bench_serving.py --compare --engine-baseline --model DIR --concurrency 1,4,16

  # A/B of two checkouts' servers (the code before a change and after it), levels interleaved
  git archive <base-commit> | tar -x -C /tmp/base
  python loadtests/bench_serving.py --ab /tmp/base . --model DIR --concurrency 64 --reps 4

  # the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) dequantized to f32 as an mlx-lm dir,
  # so that mlx_lm.server and parallm serve the very same weights
  python loadtests/bench_serving.py --export-default-model loadtests/out/smollm2-f32

Per level it reports TTFT (request sent -> first streamed text), TPOT ((end - first text) / (tokens - 1)),
ITL (gaps between streamed chunks), each at p50 and p99; output throughput (tokens / wall time of the
level); failures (non-200, dropped connections, streams that end without [DONE]). Output tokens are
counted from the stream's usage chunk when the server sends one, else as streamed chunks. `ignore_eos`
is sent (a vLLM extra; parallm honours it, mlx_lm.server ignores it), so compare tokens received,
never tokens asked for.

Each level runs against every target back to back, alternating which goes first, so the ratio
survives a noisy machine; `--reps N` runs every level N times and prints the geometric mean of the
per-pair ratios with a 95% interval. Bounded: --num-requests per level (capped), --level-timeout per
level. Loopback URLs only unless --allow-remote.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import httpx

OUT_DIR = Path(__file__).resolve().parent / "out"
REPO_ROOT = Path(__file__).resolve().parents[1]  # `python -m parallm` runs this checkout's code
MAX_REQUESTS_PER_LEVEL = 2000
WORDS = ("time year people way day man thing woman life child world school state family student group "
         "country problem hand part place case week company system program question work government number "
         "night point home water room mother area money story fact month lot right study book eye job word "
         "business issue side kind head house service friend father power hour game line end member law car "
         "city community name president team minute idea kid body information back parent face others level "
         "office door health person art war history party result change morning reason research girl guy "
         "moment air teacher force education").split()


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    detail: str = ""  # the exception's message, for a failure (the kind alone hid a connect failure's cause)
    ttft: Optional[float] = None  # seconds to the first streamed text
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)  # gaps between streamed chunks
    output_tokens: int = 0
    prompt_tokens: Optional[int] = None

    @classmethod
    def raised(cls, error: BaseException, start: float) -> "RequestResult":
        """A request that ended in `error` (its kind counts; its message is kept for the report)."""
        return cls(ok=False, error=type(error).__name__, detail=repr(error)[:300], e2e=time.perf_counter() - start)


@dataclass
class LevelResult:
    server: str
    concurrency: int
    requests: int
    failures: int
    wall_s: float
    output_tokens: int
    throughput_tok_s: float
    requests_per_s: float
    ttft_p50: Optional[float]
    ttft_p99: Optional[float]
    tpot_p50: Optional[float]
    tpot_p99: Optional[float]
    itl_p50: Optional[float]
    itl_p99: Optional[float]
    mean_prompt_tokens: Optional[float]
    errors: dict = field(default_factory=dict)  # error text -> count
    error_examples: dict = field(default_factory=dict)  # error text -> the first failure's message
    # CPU seconds this harness process spent during the level, per wall second. Near 1.0 the
    # load generator (one asyncio loop parsing every SSE event) is what limits the figures, not the server.
    client_cpu: Optional[float] = None
    # The engine's own accounting over the level (parallm only: from /metrics, or engine.stats() for
    # the in-process baseline): steps, decode rows per step (how full the batch ran), and the shares of
    # the level's wall time the engine spent stepping and sitting idle with nothing to run. Two runs
    # with the same engine and different throughput differ here: a starved engine idles or runs
    # part-full batches; a slowed one steps slower at the same occupancy.
    engine_steps: Optional[int] = None
    prefill_steps: Optional[int] = None  # of engine_steps, those that ran a prefill pass too
    rows_per_step: Optional[float] = None
    engine_busy: Optional[float] = None
    engine_idle: Optional[float] = None
    ms_per_step: Optional[float] = None  # the engine's busy time per step
    phase_ms: Optional[dict] = None  # that time (and the hand-over, "emit") by phase, ms per step


ENGINE_COUNTERS = ("steps", "busy_seconds", "idle_seconds", "decode_rows", "prefill_steps")


def engine_counters(stats) -> dict:
    """The ENGINE_COUNTERS of an EngineStats, in the form engine_counters_from_metrics returns
    (with its phase_seconds under "phases")."""
    return {**{k: getattr(stats, k) for k in ENGINE_COUNTERS}, "phases": dict(stats.phase_seconds)}


def engine_counters_from_metrics(text: str) -> Optional[dict]:
    """parallm's cumulative engine counters from a /metrics page (summed over models), or None."""
    from prometheus_client.parser import text_string_to_metric_families

    names = {f"parallm:engine_{c}": c for c in ENGINE_COUNTERS}
    found: dict = {}
    phases: dict = {}
    for family in text_string_to_metric_families(text):
        if family.name == "parallm:engine_phase_seconds":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    phase = sample.labels["phase"]
                    phases[phase] = phases.get(phase, 0.0) + sample.value
            continue
        key = names.get(family.name)
        if key is None:
            continue
        found[key] = sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
    if len(found) != len(ENGINE_COUNTERS):
        return None
    return {**found, "phases": phases}


def metrics_counters(url: str) -> Optional[dict]:
    """The engine counters of the server at `url` (parallm serves /metrics; another server may not:
    then None and the level's accounting columns stay empty)."""
    try:
        r = httpx.get(url + "/metrics", timeout=10)
        return engine_counters_from_metrics(r.text) if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def add_engine_accounting(lv: "LevelResult", before: Optional[dict], after: Optional[dict]) -> None:
    if not before or not after:
        return
    d = {k: after[k] - before[k] for k in ENGINE_COUNTERS}
    if not d["decode_rows"] and not d["busy_seconds"]:
        return  # an engine that keeps no such accounting (a fake one)
    lv.engine_steps, lv.prefill_steps = int(d["steps"]), int(d["prefill_steps"])
    lv.rows_per_step = d["decode_rows"] / d["steps"] if d["steps"] else None
    lv.ms_per_step = 1e3 * d["busy_seconds"] / d["steps"] if d["steps"] else None
    phases_before, phases_after = before.get("phases") or {}, after.get("phases") or {}
    if d["steps"] and phases_after:
        lv.phase_ms = {p: round(1e3 * (v - phases_before.get(p, 0.0)) / d["steps"], 3)
                       for p, v in phases_after.items()}
    if lv.wall_s:
        lv.engine_busy = d["busy_seconds"] / lv.wall_s
        lv.engine_idle = d["idle_seconds"] / lv.wall_s


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_prompts(count: int, input_len: int, seed: int) -> list[str]:
    """Random common words, about one token each; different per request so no prefix cache helps."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(input_len)) for _ in range(count)]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, output_len: int,
                      endpoint: str) -> RequestResult:
    if endpoint == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
    else:
        path, body = "/v1/completions", {"prompt": prompt}
    body.update(model=model, max_tokens=output_len, temperature=0.0, stream=True, ignore_eos=True,
                stream_options={"include_usage": True})
    start = time.perf_counter()
    first = last = None
    itls, chunks, usage, done = [], 0, None, False
    try:
        async with client.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return RequestResult(ok=False, error=f"HTTP {r.status_code}", e2e=time.perf_counter() - start)
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return RequestResult(ok=False, error="stream error: " + str(event["error"].get("code")))
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    text = choice.get("text") if endpoint != "chat" else (choice.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        else:
                            itls.append(now - last)
                        last = now
                        chunks += 1
    except (httpx.HTTPError, OSError) as e:
        return RequestResult.raised(e, start)
    end = time.perf_counter()
    if not done:
        return RequestResult(ok=False, error="stream ended without [DONE]", e2e=end - start)
    tokens = (usage or {}).get("completion_tokens") or chunks
    return RequestResult(ok=True, ttft=None if first is None else first - start, e2e=end - start, itls=itls,
                         output_tokens=tokens, prompt_tokens=(usage or {}).get("prompt_tokens"))


async def _run_clients(url: str, model: str, concurrency: int, prompts: list[str], output_len: int,
                       endpoint: str, level_timeout: float, start_at: Optional[float] = None,
                       counters: Optional[list] = None) -> tuple[list[RequestResult], int, float, float]:
    """`concurrency` clients in this process's loop, each sending the next prompt when its last one ended.
    The connections are opened (and httpx's lazy imports done) before the clock starts, so that a
    level's first requests do not carry them. Returns the results, how many prompts were not finished
    within the timeout, the wall seconds and this process's CPU seconds over that time."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results: list[RequestResult] = []
    pending = list(reversed(prompts))
    async with httpx.AsyncClient(timeout=httpx.Timeout(level_timeout, connect=30), limits=limits) as client:
        await asyncio.gather(*(client.get(url + "/health") for _ in range(concurrency)), return_exceptions=True)
        if start_at is not None:  # the agreed start of a level spread over processes
            await asyncio.sleep(max(0.0, start_at - time.time()))

        async def worker():
            while pending:
                results.append(await one_request(client, url, model, pending.pop(), output_len, endpoint))

        if counters is not None:  # the server's engine counters, as the clock starts and stops
            counters.append(metrics_counters(url))
        start, cpu_start = time.perf_counter(), time.process_time()
        tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        _, late = await asyncio.wait(tasks, timeout=level_timeout)
        for t in late:
            t.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if counters is not None:
            counters.append(metrics_counters(url))
    return results, len(prompts) - len(results), wall, cpu


async def run_level(server: str, url: str, model: str, concurrency: int, prompts: list[str], output_len: int,
                    endpoint: str, level_timeout: float, client_procs: int = 1) -> LevelResult:
    if client_procs > 1:
        return await asyncio.get_running_loop().run_in_executor(
            None, _run_level_in_processes, server, url, model, concurrency, prompts, output_len, endpoint,
            level_timeout, client_procs)
    counters: list = []
    results, unfinished, wall, cpu = await _run_clients(url, model, concurrency, prompts, output_len, endpoint,
                                                        level_timeout, counters=counters)
    lv = summarize(server, concurrency, results, unfinished, wall, client_cpu=cpu / wall if wall else None)
    add_engine_accounting(lv, *counters)
    return lv


def _worker_ready(hold_s: float) -> None:
    time.sleep(hold_s)


def _client_process(start_at: float, url: str, model: str, concurrency: int, prompts: list[str],
                    output_len: int, endpoint: str, level_timeout: float) -> tuple[list[dict], int, float, float]:
    """One load-generator process's share of a level, from an agreed wall-clock start so that the
    processes' clients begin together. Returns results (as dicts), unfinished, end time, CPU share."""
    results, unfinished, wall, cpu = asyncio.run(_run_clients(url, model, concurrency, prompts, output_len,
                                                              endpoint, level_timeout, start_at=start_at))
    return [asdict(r) for r in results], unfinished, time.time(), cpu / wall if wall else 0.0


def _run_level_in_processes(server: str, url: str, model: str, concurrency: int, prompts: list[str],
                            output_len: int, endpoint: str, level_timeout: float, procs: int) -> LevelResult:
    """The level's clients spread over `procs` processes (each its own loop), for loads where one
    loop parsing every SSE event would be the bottleneck. Client CPU is the busiest process's."""
    import concurrent.futures
    import multiprocessing

    procs = max(1, min(procs, concurrency))
    shares = [(concurrency // procs + (1 if i < concurrency % procs else 0), prompts[i::procs]) for i in range(procs)]
    # spawn, not fork: with --engine-baseline this process has a GPU context and threads
    with concurrent.futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        # start every worker and import this module there before the clock starts (a task that finds
        # no idle worker starts one; each of these holds its worker long enough for the next to need one)
        for ready in [pool.submit(_worker_ready, 0.3) for _ in range(procs)]:
            ready.result()
        start_at = time.time() + 1.0  # after each process opened its connections
        futures = [pool.submit(_client_process, start_at, url, model, conc, share, output_len, endpoint,
                               level_timeout) for conc, share in shares]
        time.sleep(max(0.0, start_at - time.time()))
        before = metrics_counters(url)  # the server's engine counters as the clients start
        parts = [f.result() for f in futures]
        after = metrics_counters(url)
    results = [RequestResult(**r) for part in parts for r in part[0]]
    wall = max(part[2] for part in parts) - start_at
    lv = summarize(server, concurrency, results, sum(part[1] for part in parts), wall,
                   client_cpu=max(part[3] for part in parts))
    add_engine_accounting(lv, before, after)
    return lv


def summarize(server: str, concurrency: int, results: list[RequestResult], unfinished: int, wall: float,
              client_cpu: Optional[float] = None) -> LevelResult:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
            if r.detail:
                examples.setdefault(r.error, r.detail)
    if unfinished:
        errors["level timeout"] = unfinished
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itls]
    tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return LevelResult(
        server=server, concurrency=concurrency, requests=len(results) + unfinished,
        failures=len(results) - len(ok) + unfinished, wall_s=wall, output_tokens=tokens,
        throughput_tok_s=tokens / wall if wall else 0.0, requests_per_s=len(ok) / wall if wall else 0.0,
        ttft_p50=percentile(ttfts, 0.5), ttft_p99=percentile(ttfts, 0.99),
        tpot_p50=percentile(tpots, 0.5), tpot_p99=percentile(tpots, 0.99),
        itl_p50=percentile(itls, 0.5), itl_p99=percentile(itls, 0.99),
        mean_prompt_tokens=statistics.mean(prompt_tokens) if prompt_tokens else None, errors=errors,
        error_examples=examples, client_cpu=client_cpu)


# ---- the engine baseline: the same load straight into an in-process AsyncEngine -----------------
# No HTTP, no JSON, no SSE: what the server delivers of its own engine. The prompts go through the
# same chat-free path as /v1/completions (tokenizer.encode), with the same max_tokens, greedy sampling
# and ignore_eos; TTFT, TPOT and ITL are taken on the asyncio side as the HTTP client takes them.

def load_engine(model_dir: str, max_num_seqs: int, max_queue: int, max_num_batched_tokens=None):
    sys.path.insert(0, str(REPO_ROOT))  # this checkout's parallm
    import parallm  # noqa: F401  (preloads the same BLAS the server gets, before mlx)
    from parallm.engine.async_engine import AsyncEngine
    from parallm.engine.engine import EngineConfig
    from parallm.models import load

    loaded = load(model_dir, device="auto", name="bench")
    return AsyncEngine(loaded, EngineConfig(max_num_seqs=max_num_seqs, max_queue=max_queue,
                                            max_num_batched_tokens=max_num_batched_tokens))


async def _engine_request(engine, prompt_ids: list[int], output_len: int) -> RequestResult:
    from parallm.engine.types import EngineRequest, SamplingParams

    request = EngineRequest(request_id=uuid.uuid4().hex, prompt_token_ids=prompt_ids, model="bench",
                            sampling=SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))
    start = time.perf_counter()
    first = last = None
    itls, tokens, prompt_tokens = [], 0, None
    try:
        async for out in engine.generate(request):
            if out.text:
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    itls.append(now - last)
                last = now
            if out.finished and out.usage:
                tokens, prompt_tokens = out.usage.completion_tokens, out.usage.prompt_tokens
    except Exception as e:  # a typed engine error (QueueFull...) is a failure of this request
        return RequestResult.raised(e, start)
    end = time.perf_counter()
    return RequestResult(ok=True, ttft=None if first is None else first - start, e2e=end - start, itls=itls,
                         output_tokens=tokens, prompt_tokens=prompt_tokens)


async def run_engine_level(engine, tokenizer, concurrency: int, prompts: list[str], output_len: int,
                           level_timeout: float) -> LevelResult:
    """One level into the engine: `concurrency` clients, each sending the next prompt when its last
    one ended. The result carries the engine's accounting over the level (steps, rows per step)."""
    await engine.start()
    pending = list(reversed([list(tokenizer.encode(p)) for p in prompts]))
    results: list[RequestResult] = []

    async def worker():
        while pending:
            results.append(await _engine_request(engine, pending.pop(), output_len))

    before, start = engine_counters(engine.stats()), time.perf_counter()
    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    _, late = await asyncio.wait(tasks, timeout=level_timeout)
    for t in late:
        t.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    level = summarize("engine", concurrency, results, len(prompts) - len(results), time.perf_counter() - start)
    add_engine_accounting(level, before, engine_counters(engine.stats()))
    return level


def engine_settings(args) -> dict:
    """The engine baseline's settings: those given to parallm in --parallm-args where they are
    engine settings (rows, step budget, queue), so that "server vs engine" compares like with
    like; otherwise rows for the largest level."""
    max_conc = max(args.concurrency)
    settings = {"max_num_seqs": max_conc, "max_queue": 4 * max_conc, "max_num_batched_tokens": None}
    words = shlex.split(args.parallm_args or "")
    for flag, key in (("--max-num-seqs", "max_num_seqs"), ("--max-queue", "max_queue"),
                      ("--max-num-batched-tokens", "max_num_batched_tokens")):
        for i, word in enumerate(words):
            if word == flag and i + 1 < len(words):
                settings[key] = int(words[i + 1])
            elif word.startswith(flag + "="):
                settings[key] = int(word.split("=", 1)[1])
    return settings


def export_default_model(out: Path) -> Path:
    """The default model, dequantized to float32 as the CPU serves it, written as an mlx-lm dir
    that mlx_lm.server loads too: both servers then serve the very same weights."""
    sys.path.insert(0, str(REPO_ROOT))
    import mlx.core as mx
    import mlx.nn as nn

    from parallm.models import load

    loaded = load(None, device="cpu")
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(nn.utils.tree_flatten(loaded.model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = dict(loaded.config, torch_dtype="float32")
    (out / "config.json").write_text(json.dumps(config, indent=1))
    getattr(loaded.tokenizer, "_tokenizer", loaded.tokenizer).save_pretrained(str(out))
    return out


# ---- output -------------------------------------------------------------------------------------

def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


SATURATED_CLIENT_CPU = 0.8


def print_table(levels: list[LevelResult]) -> None:
    head = f"{'server':<10} {'conc':>4} {'reqs':>5} {'fail':>4} {'tok/s':>8} {'TTFT p50/p99 ms':>16} " \
           f"{'TPOT p50/p99 ms':>16} {'ITL p50/p99 ms':>15} {'client CPU':>10} {'steps/prefill':>13} " \
           f"{'rows/step':>9} {'busy/idle':>9}"
    print(head)
    print("-" * len(head))
    for lv in levels:
        print(f"{lv.server:<10} {lv.concurrency:>4} {lv.requests:>5} {lv.failures:>4} {lv.throughput_tok_s:>8.1f} "
              f"{_ms(lv.ttft_p50) + '/' + _ms(lv.ttft_p99):>16} {_ms(lv.tpot_p50) + '/' + _ms(lv.tpot_p99):>16} "
              f"{_ms(lv.itl_p50) + '/' + _ms(lv.itl_p99):>15} "
              f"{'-' if lv.client_cpu is None else f'{lv.client_cpu:.0%}':>10} "
              f"{'-' if lv.engine_steps is None else f'{lv.engine_steps}/{lv.prefill_steps}':>13} "
              f"{'-' if lv.rows_per_step is None else f'{lv.rows_per_step:.1f}':>9} "
              f"{'-' if lv.engine_busy is None else f'{lv.engine_busy:.0%}/{lv.engine_idle:.0%}':>9}")
        if lv.errors:
            print(f"{'':<10} errors: {lv.errors}")
            for kind, example in lv.error_examples.items():
                print(f"{'':<10} first {kind}: {example}")
    if any(lv.client_cpu is not None and lv.client_cpu >= SATURATED_CLIENT_CPU for lv in levels):
        print(f"note: a load-generator process ran at >= {SATURATED_CLIENT_CPU:.0%} CPU in some level: those "
              "figures may measure the harness, not the server; raise --client-procs")


def print_ratios(levels: list[LevelResult], candidate: str, baseline: str) -> list[dict]:
    """candidate ÷ baseline throughput, and baseline ÷ candidate latencies (> 1: candidate is better),
    one row per pair (the k-th level of each at one concurrency). Where one concurrency has several
    pairs (--reps), a row with the geometric mean of their throughput ratios and its 95% interval."""
    rows = []
    print(f"\nratios ({candidate} vs {baseline}; > 1 means {candidate} is better)")
    print(f"{'conc':>4} {'throughput':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9}")

    def ratio(a, b):
        return None if not a or not b else a / b

    fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    for conc in sorted({lv.concurrency for lv in levels}):
        cands = [lv for lv in levels if lv.server == candidate and lv.concurrency == conc]
        bases = [lv for lv in levels if lv.server == baseline and lv.concurrency == conc]
        throughputs = []
        for cand, base in zip(cands, bases):
            row = dict(concurrency=conc, throughput=ratio(cand.throughput_tok_s, base.throughput_tok_s),
                       ttft_p50=ratio(base.ttft_p50, cand.ttft_p50), ttft_p99=ratio(base.ttft_p99, cand.ttft_p99),
                       tpot_p50=ratio(base.tpot_p50, cand.tpot_p50))
            rows.append(row)
            if row["throughput"]:
                throughputs.append(row["throughput"])
            print(f"{conc:>4} {fmt(row['throughput']):>10} {fmt(row['ttft_p50']):>9} {fmt(row['ttft_p99']):>9} "
                  f"{fmt(row['tpot_p50']):>9}")
        if len(throughputs) > 1:
            mean, low, high = geomean_interval(throughputs)
            rows.append(dict(concurrency=conc, pairs=len(throughputs), throughput_geomean=mean,
                             throughput_low=low, throughput_high=high))
            print(f"{conc:>4} throughput geometric mean {mean:.3f}x over {len(throughputs)} pairs, "
                  f"95% interval [{low:.3f}, {high:.3f}]")
    return rows


T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def geomean_interval(ratios: list[float]) -> tuple[float, float, float]:
    """The geometric mean of `ratios` and a 95% interval (Student's t over the log ratios). One
    pair's ratio moves with the host (+-15% on a lent GPU), so only the interval says whether a
    target is met."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    half = T95.get(len(logs) - 1, 2.1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def plot(levels: list[LevelResult], out_dir: Path, stem: str) -> list[Path]:
    from plot_bench import plot_serving  # the figure BENCHMARKS.md shows, drawn from this run

    path = out_dir / f"{stem}.png"
    plot_serving([asdict(lv) for lv in levels], path, title=f"bench_serving {stem}")
    return [path]


# ---- targets and servers -------------------------------------------------------------------------

@dataclass
class Target:
    """One thing to load: an HTTP server (url + model name) or, with --engine-baseline, the engine itself."""

    name: str
    url: str = ""
    model: str = ""
    engine: object = None
    tokenizer: object = None

    async def run(self, concurrency: int, prompts: list[str], args) -> LevelResult:
        if self.engine is None:  # the level runner reads the server's counters as its clock starts and stops
            return await run_level(self.name, self.url, self.model, concurrency, prompts, args.output_len,
                                   args.endpoint, args.level_timeout, client_procs=args.client_procs)
        lv = await run_engine_level(self.engine, self.tokenizer, concurrency, prompts, args.output_len,
                                    args.level_timeout)
        lv.server = self.name
        return lv


def engine_target(args) -> Target:
    engine = load_engine(args.model, **engine_settings(args))
    return Target("engine", engine=engine, tokenizer=engine.tokenizer("bench"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A server for --compare or --ab: the command, where it listens, and the checkout it runs from."""

    name: str
    cmd: list[str]
    url: str
    model: str
    cwd: Path = REPO_ROOT
    env: Optional[dict] = None


def parallm_server(name: str, checkout: Path, args) -> Server:
    """`parallm serve` from `checkout` (PYTHONPATH and cwd: `-m parallm` imports that checkout's package;
    whatever PYTHONPATH the caller had comes after it, e.g. MLX's CUDA build on a GPU host)."""
    port, max_conc = free_port(), max(args.concurrency)
    extra = {"A": args.a_args, "B": args.b_args}.get(name, "")
    cmd = [sys.executable, "-m", "parallm", "serve", "--model", args.model, "--served-model-name", "bench",
           "--port", str(port), "--max-num-seqs", str(max(max_conc, 1)), "--max-queue", str(4 * max_conc),
           *shlex.split(args.parallm_args), *shlex.split(extra)]
    checkout = checkout.resolve()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(checkout), os.environ.get("PYTHONPATH", "")) if p))
    return Server(name, cmd, f"http://127.0.0.1:{port}", "bench", cwd=checkout, env=env)


def mlx_lm_server(args) -> Server:
    # By default mlx_lm.server gets the same optimized BLAS that parallm preloads on Linux (importing
    # parallm loads it before mlx), so the comparison is of the servers, not of the BLAS.
    port = free_port()
    launcher = (["-c", "import parallm, runpy; runpy.run_module('mlx_lm.server', run_name='__main__')"]
                if args.mlx_blas == "parallm" else ["-m", "mlx_lm.server"])
    cmd = [sys.executable, *launcher, "--model", args.model, "--port", str(port), "--host", "127.0.0.1",
           *shlex.split(args.mlx_args)]
    return Server("mlx_lm", cmd, f"http://127.0.0.1:{port}", "default_model")


@contextlib.contextmanager
def running_server(server: Server, startup_timeout: float):
    log_path = OUT_DIR / f"{server.name}.log"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(server.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=server.cwd, env=server.env)
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{server.name} exited with {proc.returncode}; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{server.name} did not start within {startup_timeout}s; see {log_path}")
                time.sleep(0.5)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


async def warm_up(name: str, url: str, model: str, endpoint: str) -> None:
    async with httpx.AsyncClient(timeout=300) as client:
        r = await one_request(client, url, model, "hello " * 8, 8, endpoint)
    if not r.ok:
        raise RuntimeError(f"{name}: warm-up request failed: {r.error}")


def sweep(targets: list[Target], args, loop: asyncio.AbstractEventLoop) -> list[LevelResult]:
    """Each level (every concurrency, --reps times) runs on every target back to back, alternating
    which goes first. One event loop for the whole sweep (an in-process engine is bound to the loop
    it started on)."""
    levels = []
    plan = [conc for conc in args.concurrency for _ in range(args.reps)]
    for i, conc in enumerate(plan):
        n = min(args.num_requests or conc * args.requests_per_client, MAX_REQUESTS_PER_LEVEL)
        # new prompts for every level, the same for each target of it: a repeated set would be served
        # from the prefix caches and measure a sweep without prefill
        prompts = make_prompts(n, args.input_len, seed=args.seed + conc + 1009 * i)
        order = targets if i % 2 == 0 else list(reversed(targets))
        for target in order:
            lv = loop.run_until_complete(target.run(conc, prompts, args))
            levels.append(lv)
            print(f"  {target.name:<10} c={conc:<4} {lv.throughput_tok_s:8.1f} tok/s  TTFT p50 {_ms(lv.ttft_p50)} ms  "
                  f"failures {lv.failures}/{lv.requests}", flush=True)
    return levels


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="base URL of a running OpenAI-compatible server (no /v1)")
    p.add_argument("--model-name", help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--compare", action="store_true", help="start parallm and mlx_lm.server on --model and compare")
    p.add_argument("--ab", nargs=2, metavar=("A", "B"),
                   help="start `parallm serve` from two checkout roots on --model and compare B with A")
    p.add_argument("--model", help="model dir for --compare, --ab and --engine-baseline")
    p.add_argument("--engine-baseline", action="store_true",
                   help="also run the sweep straight into an in-process AsyncEngine on --model (no HTTP)")
    p.add_argument("--parallm-args", default="", help="extra arguments for `parallm serve` (--compare, --ab)")
    p.add_argument("--a-args", default="", help="with --ab: extra `parallm serve` arguments for A only")
    p.add_argument("--b-args", default="", help="with --ab: extra `parallm serve` arguments for B only")
    p.add_argument("--mlx-args", default="", help="extra arguments for mlx_lm.server in --compare mode")
    p.add_argument("--mlx-blas", choices=("parallm", "wheel"), default="parallm",
                   help="BLAS for mlx_lm.server on Linux CPU: parallm's preloaded OpenBLAS (fair) or the wheel's")
    p.add_argument("--concurrency", default="1,4,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--reps", type=int, default=1,
                   help="run every level this many times (pairs for a geometric mean with a 95%% interval)")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests per level = this x concurrency")
    p.add_argument("--num-requests", type=int, default=0, help="fixed requests per level (overrides the above)")
    p.add_argument("--input-len", type=int, default=64, help="prompt length in words (~tokens)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--client-procs", type=_client_procs, default="auto",
                   help="load-generator processes per level (the clients are split among them); auto: one per "
                        "4 CPUs, at most 4. One asyncio loop parsing every SSE event saturates near a few "
                        "thousand tokens/s: watch the table's client CPU column and raise this when it nears 100%%")
    p.add_argument("--level-timeout", type=float, default=300.0, help="seconds a level may run")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    p.add_argument("--out", default=None, help="JSON result path (default loadtests/out/bench_serving-<time>.json)")
    p.add_argument("--no-plot", action="store_true", help="no PNG (the plot needs matplotlib)")
    p.add_argument("--export-default-model", metavar="DIR",
                   help="write the default model as an f32 mlx-lm dir to DIR (for --compare) and exit")


def _client_procs(value: str) -> int:
    if value == "auto":  # leave cores to the server under test; a 2-core box keeps one process
        return max(1, min(4, (os.cpu_count() or 1) // 4))
    procs = int(value)
    if procs < 1:
        raise argparse.ArgumentTypeError("--client-procs must be >= 1 or auto")
    return procs


def _usage_error(message: str) -> int:
    print(f"bench_serving: {message}", file=sys.stderr)
    return 2


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if args.export_default_model:
        print(export_default_model(Path(args.export_default_model)))
        return 0
    if args.reps < 1:
        return _usage_error("--reps must be >= 1")
    if args.engine_baseline and not args.model:
        return _usage_error("--engine-baseline needs --model DIR")
    stem = f"bench_serving-{time.strftime('%Y%m%d-%H%M%S')}"
    out_json = Path(args.out) if args.out else OUT_DIR / f"{stem}.json"

    if args.compare or args.ab:
        if args.compare and args.ab:
            return _usage_error("give --compare or --ab, not both")
        if not args.model:
            return _usage_error(("--compare" if args.compare else "--ab") + " needs --model DIR")
        if args.ab and args.engine_baseline:
            return _usage_error("--engine-baseline goes with --compare or --url, not --ab")
        if args.compare:
            servers = [parallm_server("parallm", REPO_ROOT, args), mlx_lm_server(args)]
            candidate, baseline = "parallm", "mlx_lm"
        else:
            servers = [parallm_server("A", Path(args.ab[0]), args), parallm_server("B", Path(args.ab[1]), args)]
            candidate, baseline = "B", "A"
    else:
        if not args.url:
            return _usage_error("give --url (a running server), --compare --model DIR or --ab A B --model DIR")
        if not is_loopback(args.url) and not args.allow_remote:
            return _usage_error(f"{args.url} is not a loopback address; pass --allow-remote to load-test another machine")
        servers, candidate, baseline = [], "server", None

    loop = asyncio.new_event_loop()
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.enter_context(running_server(server, args.startup_timeout))
        if servers:
            targets = [Target(s.name, s.url, s.model) for s in servers]
        else:
            url = args.url.rstrip("/")
            model = args.model_name or httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
            targets = [Target("server", url, model)]
        for t in targets:
            loop.run_until_complete(warm_up(t.name, t.url, t.model, args.endpoint))
        if args.engine_baseline:
            targets.append(engine_target(args))
        levels = sweep(targets, args, loop)

    for engine in {id(t.engine): t.engine for t in targets if t.engine is not None}.values():
        loop.run_until_complete(engine.shutdown())
    loop.run_until_complete(loop.shutdown_asyncgens())  # close the streams left at [DONE]
    loop.close()
    print()
    print_table(levels)
    ratios = [dict(r, kind=f"{candidate}_vs_{baseline}") for r in print_ratios(levels, candidate, baseline)] \
        if baseline else []
    if args.engine_baseline:
        ratios += [dict(r, kind="server_vs_engine") for r in print_ratios(levels, candidate, "engine")]
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                    "commands": {s.name: s.cmd for s in servers},
                                    "cpu_count": os.cpu_count(), "levels": [asdict(lv) for lv in levels],
                                    "ratios": ratios}, indent=1))
    print(f"\nJSON: {out_json}")
    if not args.no_plot:
        try:
            for path in plot(levels, out_json.parent, out_json.stem):
                print(f"plot: {path}")
        except ImportError as e:  # the figures are in the JSON: loadtests/plot_bench.py draws them later
            print(f"no plot ({e}); pip install 'parallm[bench]' for matplotlib, or pass --no-plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
