"""Disconnect storm: 200 long streams, each cut by its client after its first chunks. Within 3 s
of the last hang-up the engine runs nothing (its rows were freed by aborts, not by the requests
running out), memory is flat across a second storm, and a fresh request is served at once."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from .live import MODEL, serve
from .load import many_streams, stream_body

STREAMS = 200
MAX_TOKENS = 1500  # what each would run for if nobody aborted it: far longer than the test
SETTLE_S = 3.0  # the bound from the last hang-up to an idle engine
# RSS may grow by this much from the end of the warm-up storm to the end of the second one. A
# leak of the 200 aborted requests' KV rows (1500 tokens each) would be far larger.
RSS_TOLERANCE_BYTES = 48 * 1024 * 1024


@pytest.fixture(scope="module")
def roomy_server(tiny_model_dir, tmp_path_factory):
    # every stream is admitted (32 rows + 256 waiting), so each one is a real engine request to abort
    server = serve(tiny_model_dir, tmp_path_factory.mktemp("storm"), "--max-num-seqs", "32", "--max-queue", "256")
    yield server
    assert server.stop() == 0, server.log()


def storm(server) -> float:
    """Run one storm; return seconds from the last hang-up until the engine and server are idle."""
    bodies = [stream_body(MAX_TOKENS, prompt=f"storm client {i}") for i in range(STREAMS)]
    outcomes = asyncio.run(many_streams(server.url, bodies, cut_after_events=2))
    assert [o for o in outcomes if o.status != 200 or o.transport_error or len(o.events) < 2] == []
    last_hangup = max(o.finished_at for o in outcomes)
    while True:
        h = server.health()
        idle = (h["engine"]["num_running"] == 0 and h["engine"]["num_waiting"] == 0
                and h["server"]["in_flight"] == 0)
        elapsed = time.monotonic() - last_hangup
        if idle:
            return elapsed
        assert elapsed < SETTLE_S, f"still busy {elapsed:.1f}s after the last hang-up: {h}"
        time.sleep(0.05)


def test_disconnect_storm_frees_everything(roomy_server):
    server = roomy_server
    rss_start = server.rss_bytes()
    warm_settle = storm(server)  # warm-up: allocator pools, compiled kernels, caches reach steady size
    rss_warm = server.rss_bytes()
    settle = storm(server)
    rss_after = server.rss_bytes()
    print(f"\nsettled in {warm_settle:.2f}s / {settle:.2f}s; RSS start {rss_start >> 20} MiB, after warm-up "
          f"{rss_warm >> 20} MiB, after storm 2 {rss_after >> 20} MiB")
    assert rss_after - rss_warm < RSS_TOLERANCE_BYTES, (rss_warm >> 20, rss_after >> 20)
    # the aborts are counted as such, and nothing ran to its length
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert _counter(metrics, 'parallm:request_success_total{finished_reason="abort"') >= 2 * STREAMS
    assert _counter(metrics, 'parallm:request_success_total{finished_reason="length"') == 0
    assert _counter(metrics, "parallm:num_requests_running{") == 0
    # a fresh request is served promptly (bounded by the client timeout, not asserted in seconds)
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "after the storm", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def _counter(metrics_text: str, prefix: str) -> float:
    """Sum of the samples whose line starts with `prefix` (labels may follow)."""
    total, seen = 0.0, False
    for line in metrics_text.splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    if not seen and "finished_reason" in prefix:
        return 0.0  # a reason that never happened has no sample
    assert seen, f"no metric {prefix!r}"
    return total
