"""Engine behaviour against mlx-lm's single-sequence generation on a tiny random Llama."""
from __future__ import annotations

import mlx.core as mx
import pytest

from parallm.engine.engine import Engine, EngineConfig
from parallm.engine.types import EngineRequest, SamplingParams

from engine_helpers import make_prompt, reference_greedy, run_to_completion, tokens_of

GREEDY = dict(temperature=0.0, ignore_eos=True)


def greedy_request(rid: str, prompt: list[int], max_tokens: int, **kw) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, **{**GREEDY, **kw}))


def test_staggered_joins_match_mlx_lm_one_at_a_time(tiny_loaded):
    lengths = [1, 3, 7, 12, 20, 33, 50, 64, 90]
    engine = Engine(tiny_loaded, EngineConfig(max_num_seqs=6, max_num_batched_tokens=48,
                                              prefix_cache_bytes=0))
    schedule: dict[int, list] = {}
    for i, n in enumerate(lengths):  # join at steps 0, 0, 2, 3, 5, ... (some wait for a slot)
        schedule.setdefault(i * 3 // 2, []).append(greedy_request(f"r{i}", make_prompt(i, n), 6 + i))
    outs = run_to_completion(engine, schedule)
    for i, n in enumerate(lengths):
        assert tokens_of(outs[f"r{i}"]) == reference_greedy(tiny_loaded, make_prompt(i, n), 6 + i), i
        last = outs[f"r{i}"][-1]
        assert last.finished and last.finish_reason == "length"
        assert last.usage.prompt_tokens == n and last.usage.completion_tokens == 6 + i


def test_long_prompt_chunked_equals_unchunked(tiny_loaded):
    prompt = make_prompt(42, 150)
    results = []
    for budget in (16, 4096):
        engine = Engine(tiny_loaded, EngineConfig(max_num_batched_tokens=budget, prefix_cache_bytes=0))
        # a running stream next to the long prompt keeps decoding while the prompt is chunked
        outs = run_to_completion(engine, {0: [greedy_request("short", make_prompt(1, 5), 30)],
                                          1: [greedy_request("long", prompt, 8)]})
        results.append(tokens_of(outs["long"]))
        if budget == 16:
            assert engine.stats().steps > 150 // 16
    assert results[0] == results[1] == reference_greedy(tiny_loaded, prompt, 8)


def test_prefix_cache_hit_equals_miss(tiny_loaded):
    engine = Engine(tiny_loaded, EngineConfig(prefix_block_size=16))
    shared = make_prompt(5, 70)
    first = run_to_completion(engine, {0: [greedy_request("a", shared + [11, 12], 8)]})
    second = run_to_completion(engine, {0: [greedy_request("b", shared + [13], 8)]})
    assert tokens_of(first["a"]) == reference_greedy(tiny_loaded, shared + [11, 12], 8)
    assert tokens_of(second["b"]) == reference_greedy(tiny_loaded, shared + [13], 8)
    assert first["a"][-1].usage.cached_tokens == 0
    assert second["b"][-1].usage.cached_tokens == 64  # 4 whole blocks of the 70 shared tokens
    stats = engine.stats()
    assert stats.prefix_cache_hits == 64 and stats.prefix_cache_queries == 72 + 71


def test_a_hit_shorter_than_the_stored_prefix_uses_its_first_blocks(tiny_loaded):
    engine = Engine(tiny_loaded, EngineConfig(prefix_block_size=16))
    stored = make_prompt(6, 60)  # 3 whole blocks before its last token: an entry of 48 tokens
    later = stored[:40] + make_prompt(7, 9)  # shares 2 of those blocks
    run_to_completion(engine, {0: [greedy_request("a", stored, 4)]})
    outs = run_to_completion(engine, {0: [greedy_request("b", later, 8)]})
    assert outs["b"][-1].usage.cached_tokens == 32
    assert tokens_of(outs["b"]) == reference_greedy(tiny_loaded, later, 8)


def test_prefix_cache_key_includes_adapter(tiny_loaded):
    class NoopAdapters:
        def has_adapter(self, name):
            return name == "lora-a"

        def bind_rows(self, ids):
            self.last = list(ids)

    adapters = NoopAdapters()
    engine = Engine(tiny_loaded, EngineConfig(), adapters=adapters)
    prompt = make_prompt(9, 40)
    run_to_completion(engine, {0: [greedy_request("a", prompt, 2)]})
    outs = run_to_completion(engine, {0: [EngineRequest("b", prompt, SamplingParams(max_tokens=2, **GREEDY),
                                                        adapter="lora-a")]})
    assert outs["b"][-1].usage.cached_tokens == 0
    assert "lora-a" in adapters.last


def test_n_choices_share_prefill(tiny_loaded):
    prompt = make_prompt(3, 40)
    engine = Engine(tiny_loaded, EngineConfig(prefix_cache_bytes=0))
    req = greedy_request("r", prompt, 7, n=3)
    engine.validate(req)
    engine.add_request(req)
    outs, computed = [], 0
    while engine.has_unfinished():
        result = engine.step()
        outs += result.outputs
        computed += result.num_batched_tokens
    expected = reference_greedy(tiny_loaded, prompt, 7)
    for i in range(3):
        assert tokens_of(outs, i) == expected
    assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
    assert outs[-1].usage.completion_tokens == 21
    # the prompt's 39 K/V positions are computed once; each choice decodes 7 tokens
    assert computed == 39 + 3 * 7


def test_preemption_under_tiny_kv_budget_keeps_output_correct(tiny_loaded):
    prompts = [make_prompt(20 + i, 10 + 5 * i) for i in range(5)]
    probe = Engine(tiny_loaded, EngineConfig())
    per_token = probe.cache_layout.bytes_per_token
    # room for ~2 sequences at a time; all 5 are admitted early, then must preempt to grow
    engine = Engine(tiny_loaded, EngineConfig(kv_budget_bytes=per_token * 90, prefix_cache_bytes=0))
    outs = run_to_completion(engine, {0: [greedy_request(f"p{i}", p, 25) for i, p in enumerate(prompts)]})
    assert engine.stats().num_preemptions > 0
    for i, p in enumerate(prompts):
        assert tokens_of(outs[f"p{i}"]) == reference_greedy(tiny_loaded, p, 25), i


def test_abort_frees_the_slot(tiny_loaded):
    engine = Engine(tiny_loaded, EngineConfig(max_num_seqs=2, prefix_cache_bytes=0))
    for rid in ("a", "b"):
        req = greedy_request(rid, make_prompt(1, 8), 100)
        engine.validate(req)
        engine.add_request(req)
    for _ in range(3):
        engine.step()
    assert engine.stats().num_running == 2
    final = engine.abort("a")
    assert [o.finish_reason for o in final] == ["abort"] and final[0].finished
    engine.step()  # the runner frees the row within one step
    assert engine.stats().num_running == 1 and not engine.runner.cache.in_use[0]
    c = greedy_request("c", make_prompt(2, 5), 3)
    engine.validate(c)
    engine.add_request(c)
    first = [o for o in engine.step().outputs if o.request_id == "c"]
    assert engine.scheduler.running[-1].slot == 0  # the freed hole is reused first
    engine.abort("b")
    outs = run_to_completion(engine, {})
    assert tokens_of(first + outs["c"]) == reference_greedy(tiny_loaded, make_prompt(2, 5), 3)


def test_kv_memory_returns_to_baseline_after_1000_requests(tiny_loaded):
    engine = Engine(tiny_loaded, EngineConfig(max_num_seqs=32, max_num_batched_tokens=256))
    mx.eval(tiny_loaded.model.parameters())
    mx.clear_cache()
    baseline = mx.get_active_memory()
    reqs = [greedy_request(f"m{i}", make_prompt(i % 50, 2 + i % 7), 1 + i % 2) for i in range(1000)]
    schedule = {i // 40: reqs[i:i + 40] for i in range(0, 1000, 40)}
    schedule = {k * 2: v for k, v in schedule.items()}
    outs = run_to_completion(engine, schedule)
    assert len(outs) == 1000 and all(o[-1].finished for o in outs.values())
    assert engine.stats().kv_bytes_used == 0 and engine.kv_bytes_allocated() == 0
    assert engine.stats().num_running == 0
    engine.prefix_cache.clear()
    mx.clear_cache()
    # nothing the engine keeps grows with the number of requests served
    assert mx.get_active_memory() - baseline < 1 << 20


def test_stop_string_spanning_tokens(tiny_loaded):
    tok = tiny_loaded.tokenizer
    prompt = make_prompt(8, 12)
    ref = reference_greedy(tiny_loaded, prompt, 12)
    pieces = [tok.decode(ref[:k]) for k in range(len(ref) + 1)]
    # a stop string made of the end of token 3's text and the start of token 4's text
    k = next(k for k in range(3, 10) if len(pieces[k]) - len(pieces[k - 1]) >= 2
             and len(pieces[k + 1]) - len(pieces[k]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][len(pieces[k]):len(pieces[k]) + 2]
    expected = pieces[-1][:pieces[-1].find(stop)]
    engine = Engine(tiny_loaded, EngineConfig())
    outs = run_to_completion(engine, {0: [greedy_request("s", prompt, 12, stop=(stop,))]})["s"]
    text = "".join(o.text for o in outs)
    assert stop not in text and text == expected
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop


def test_seeded_sample_same_alone_and_in_busy_batch(tiny_loaded):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    prompt = make_prompt(77, 9)
    alone = run_to_completion(Engine(tiny_loaded, EngineConfig()),
                              {0: [EngineRequest("x", prompt, params)]})
    busy_engine = Engine(tiny_loaded, EngineConfig())
    others = [EngineRequest(f"o{i}", make_prompt(i, 5 + i),
                            SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)) for i in range(6)]
    busy = run_to_completion(busy_engine, {0: others[:3], 2: [EngineRequest("x", prompt, params)] + others[3:]})
    assert tokens_of(alone["x"]) == tokens_of(busy["x"])
    assert len(tokens_of(alone["x"])) == 12


def test_logprobs_reach_the_outputs(tiny_loaded):
    engine = Engine(tiny_loaded, EngineConfig())
    prompt = make_prompt(4, 6)
    outs = run_to_completion(engine, {0: [greedy_request("l", prompt, 3, logprobs=True, top_logprobs=2)]})["l"]
    lps = [lp for o in outs for lp in (o.logprobs or [])]
    assert [lp.token_id for lp in lps] == reference_greedy(tiny_loaded, prompt, 3)
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top) == 2 and lp.top[0].token_id == lp.token_id


def test_invalid_sampling_params_are_typed_errors(tiny_loaded):
    from parallm.engine.errors import InvalidRequest

    engine = Engine(tiny_loaded, EngineConfig())
    with pytest.raises(InvalidRequest, match="top_p"):
        engine.validate(EngineRequest("bad", [1, 2], SamplingParams(top_p=0.0)))


def test_overlapped_and_synchronous_steps_agree(tiny_loaded):
    ref = reference_greedy(tiny_loaded, make_prompt(30, 9), 10)
    results = []
    # build step t+1 before step t ends / after it ends / no overlap at all
    for overlap, build_ahead in ((True, 1 << 40), (True, 0), (False, 0)):
        engine = Engine(tiny_loaded, EngineConfig(overlap=overlap, max_num_batched_tokens=24,
                                                  build_ahead_max_kv_bytes=build_ahead))
        reqs = {0: [greedy_request("a", make_prompt(30, 9), 10, stop_token_ids=(ref[4],)),
                    greedy_request("b", make_prompt(31, 40), 6)],
                3: [greedy_request("c", make_prompt(32, 5), 7, n=2)]}
        outs = run_to_completion(engine, reqs)
        results.append({rid: (tokens_of(o, 0), tokens_of(o, 1), o[-1].finish_reason) for rid, o in outs.items()})
        assert engine.scheduler.kv_tokens_used() == 0 and not engine.runner.cache.nbytes
    assert results[0] == results[1] == results[2]
    first_stop = ref.index(ref[4])
    assert results[0]["a"] == (ref[:first_stop + 1], [], "stop")


def test_step_accounting_counts_every_row_and_token(tiny_loaded):
    """stats() says how full the batch ran: one decode row per sampled token, and the prompt's other
    tokens as prefill (the last prompt token is the first decode row's input)."""
    lengths, max_tokens = [3, 17, 40, 9], [5, 8, 2, 11]
    engine = Engine(tiny_loaded, EngineConfig(max_num_seqs=4, max_num_batched_tokens=24, prefix_cache_bytes=0))
    schedule = {i: [greedy_request(f"r{i}", make_prompt(i, n), m)] for i, (n, m) in enumerate(zip(lengths, max_tokens))}
    run_to_completion(engine, schedule)
    stats = engine.stats()
    assert stats.decode_rows == sum(max_tokens)
    assert stats.batched_tokens == sum(max_tokens) + sum(n - 1 for n in lengths)
    assert stats.steps >= max(max_tokens) and stats.busy_seconds > 0
    assert stats.decode_rows / stats.steps <= 4  # never more rows than max_num_seqs
    # 17 + 40 prompt tokens at 24 a step need chunks; the four prompts need at least four steps
    assert len(lengths) <= stats.prefill_steps < stats.steps
    # the phases split the step's time: each ran, none is negative, together within the busy time
    phases = stats.phase_seconds
    assert set(phases) == {"schedule", "build", "dispatch", "wait", "update"}
    assert all(v > 0 for v in phases.values()), phases
    assert sum(phases.values()) <= stats.busy_seconds
