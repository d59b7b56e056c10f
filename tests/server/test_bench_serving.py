"""The load-test harness: loopback only, percentiles, and one small real run against a live server."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))
import bench_serving  # noqa: E402

from tests.server.conftest import real_engine, start_server  # noqa: E402


@pytest.mark.parametrize("url, ok", [("http://127.0.0.1:8000", True), ("http://localhost:1", True),
                                     ("http://[::1]:8000", True), ("http://10.1.2.3:8000", False),
                                     ("http://example.com", False)])
def test_only_loopback_urls_unless_allowed(url, ok):
    assert bench_serving.is_loopback(url) is ok


def test_remote_url_is_refused(capsys):
    assert bench_serving.main(["--url", "http://10.1.2.3:8000"]) == 2
    assert "--allow-remote" in capsys.readouterr().err


def test_percentile_interpolates():
    assert bench_serving.percentile([], 0.5) is None
    assert bench_serving.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert bench_serving.percentile([5.0], 0.99) == 5.0


def test_a_small_sweep_against_a_live_server(tiny_loaded, tmp_path):
    live = start_server(real_engine(tiny_loaded))
    try:
        out = tmp_path / "r.json"
        assert bench_serving.main(["--url", live.url, "--concurrency", "1,2", "--num-requests", "3",
                                   "--input-len", "8", "--output-len", "5", "--no-plot", "--out", str(out)]) == 0
    finally:
        live.stop()
    levels = json.loads(out.read_text())["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert lv["failures"] == 0 and lv["requests"] == 3
        assert lv["output_tokens"] == 15  # ignore_eos: every request gets its 5 tokens
        assert lv["ttft_p50"] > 0 and lv["throughput_tok_s"] > 0
        # the engine's own accounting, read from /metrics around the level
        assert lv["engine_steps"] >= 5 and 0 < lv["rows_per_step"] <= lv["concurrency"]
        assert 1 <= lv["prefill_steps"] <= 3  # each of the 3 prompts prefilled in some step
        assert 0 < lv["engine_busy"] <= 1.05 and lv["engine_idle"] >= 0
        # and where the steps' time went, per step: the phases within the busy time per step
        phases = lv["phase_ms"]
        assert {"schedule", "build", "dispatch", "wait", "update", "emit"} <= set(phases)
        assert phases["build"] > 0 and sum(v for k, v in phases.items() if k != "emit") <= lv["ms_per_step"] + 1e-3


def test_clients_split_over_processes_send_every_request(tiny_loaded, tmp_path):
    live = start_server(real_engine(tiny_loaded))
    try:
        out = tmp_path / "r.json"
        assert bench_serving.main(["--url", live.url, "--concurrency", "3", "--num-requests", "5",
                                   "--client-procs", "2", "--input-len", "8", "--output-len", "4",
                                   "--no-plot", "--out", str(out)]) == 0
    finally:
        live.stop()
    (level,) = json.loads(out.read_text())["levels"]
    assert level["failures"] == 0 and level["requests"] == 5
    assert level["output_tokens"] == 20
    assert level["ttft_p50"] > 0 and level["wall_s"] > 0
    assert level["client_cpu"] is not None and level["client_cpu"] > 0


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    bench_serving.add_arguments(parser)
    return parser.parse_args(argv)


def test_engine_baseline_takes_the_servers_engine_settings():
    args = _parse(
        ["--compare", "--model", "m", "--concurrency", "64,256",
         "--parallm-args", "--max-num-seqs 128 --max-queue=300 --max-num-batched-tokens 2048"])
    assert bench_serving.engine_settings(args) == {"max_num_seqs": 128, "max_queue": 300,
                                                   "max_num_batched_tokens": 2048}
    plain = _parse(["--compare", "--model", "m", "--concurrency", "4,16"])
    assert bench_serving.engine_settings(plain) == {"max_num_seqs": 16, "max_queue": 64,
                                                    "max_num_batched_tokens": None}


def test_client_procs_is_a_positive_count_or_auto():
    assert _parse(["--client-procs", "3"]).client_procs == 3
    assert 1 <= _parse([]).client_procs <= 4  # auto: one per 4 CPUs, at least one, at most four
    with pytest.raises(SystemExit):
        _parse(["--client-procs", "0"])


def test_the_engine_baseline_runs_a_level_with_its_accounting(tiny_model_dir):
    import asyncio

    async def main():
        engine = bench_serving.load_engine(str(tiny_model_dir), max_num_seqs=8, max_queue=16)  # named "bench"
        try:
            prompts = bench_serving.make_prompts(8, 6, seed=1)
            return await bench_serving.run_engine_level(engine, engine.tokenizer("bench"), 4, prompts, 2, 60)
        finally:
            await engine.shutdown()

    level = asyncio.run(main())
    assert level.requests == 8 and level.failures == 0, level.errors
    assert level.output_tokens == 16
    assert level.ttft_p50 > 0 and level.throughput_tok_s > 0
    # the level carries the engine's own accounting: 8 x 2 tokens decoded, each prompt prefilled
    assert level.engine_steps >= 2 and 1 <= level.prefill_steps <= 8
    assert 0 < level.rows_per_step <= 4 and level.ms_per_step > 0


def _level(server, concurrency, tok_s):
    return bench_serving.summarize(server, concurrency, [bench_serving.RequestResult(
        ok=True, ttft=0.1, e2e=1.0, output_tokens=int(tok_s))], 0, 1.0)


def test_repeated_levels_pair_in_order_and_give_a_geometric_mean(capsys):
    """--reps: the k-th level of the candidate pairs with the k-th of the baseline at the same
    concurrency, and the pairs' throughput ratios are summed up as a geometric mean with an interval."""
    levels = [_level("A", 64, 100), _level("B", 64, 110), _level("B", 64, 90), _level("A", 64, 100),
              _level("A", 64, 200), _level("B", 64, 220)]
    rows = bench_serving.print_ratios(levels, "B", "A")
    pairs = [r["throughput"] for r in rows if "throughput" in r]
    assert pairs == pytest.approx([1.1, 0.9, 1.1])
    (summary,) = [r for r in rows if "throughput_geomean" in r]
    assert summary["pairs"] == 3
    assert summary["throughput_geomean"] == pytest.approx((1.1 * 0.9 * 1.1) ** (1 / 3))
    assert summary["throughput_low"] < summary["throughput_geomean"] < summary["throughput_high"]
    assert "95% interval" in capsys.readouterr().out


def test_sweep_repeats_each_level_with_new_prompts_and_alternating_order():
    seen = []

    class Fake(bench_serving.Target):
        async def run(self, concurrency, prompts, args):
            seen.append((self.name, concurrency, prompts[0]))
            return _level(self.name, concurrency, 10)

    import asyncio

    args = _parse(["--concurrency", "2,4", "--reps", "2", "--num-requests", "1"])
    loop = asyncio.new_event_loop()
    try:
        levels = bench_serving.sweep([Fake("A"), Fake("B")], args, loop)
    finally:
        loop.close()
    assert [(lv.server, lv.concurrency) for lv in levels] == [("A", 2), ("B", 2), ("B", 2), ("A", 2),
                                                              ("A", 4), ("B", 4), ("B", 4), ("A", 4)]
    prompts = [p for _, _, p in seen]
    assert prompts[0] == prompts[1] and prompts[1] != prompts[2]  # both targets of a level get the same


@pytest.mark.parametrize("argv, message", [
    (["--ab", "/a", "/b"], "--ab needs --model"),
    (["--compare", "--ab", "/a", "/b", "--model", "m"], "not both"),
    (["--ab", "/a", "/b", "--model", "m", "--engine-baseline"], "not --ab"),
    (["--url", "http://127.0.0.1:1", "--engine-baseline"], "--engine-baseline needs --model"),
])
def test_mode_errors_are_usage_errors(argv, message, capsys):
    assert bench_serving.main(argv) == 2
    assert message in capsys.readouterr().err


def test_ab_servers_run_from_their_own_checkouts(tmp_path):
    """--ab starts `parallm serve` twice, each importing parallm from its own checkout root."""
    args = _parse(["--ab", str(tmp_path / "base"), ".", "--model", "m", "--concurrency", "64",
                   "--parallm-args", "--max-queue 256", "--b-args", "--log-level warning"])
    a = bench_serving.parallm_server("A", Path(args.ab[0]), args)
    b = bench_serving.parallm_server("B", Path(args.ab[1]), args)
    assert a.cwd == (tmp_path / "base").resolve() and a.env["PYTHONPATH"].split(":")[0] == str(a.cwd)
    assert b.cwd == Path(".").resolve()
    assert a.cmd[1:4] == ["-m", "parallm", "serve"] and "--max-queue" in a.cmd and "256" in a.cmd
    assert "--log-level" in b.cmd and "--log-level" not in a.cmd
    assert a.url != b.url


def test_a_failed_level_keeps_the_first_failures_message():
    """A level whose requests all fail says why, not only which exception kind (an H200 run lost
    two levels to ConnectError with no message to go on)."""
    import asyncio

    from tests.live_app import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    results, unfinished, wall, _ = asyncio.run(bench_serving._run_clients(url, "m", 2, ["a", "b", "c"], 4,
                                                                          "completions", 5))
    level = bench_serving.summarize("server", 2, results, unfinished, wall)
    assert level.failures == 3 and level.errors == {"ConnectError": 3}
    assert "ConnectError" in level.error_examples["ConnectError"]
    assert "connect" in level.error_examples["ConnectError"].lower()
