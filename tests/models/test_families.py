"""Every family mlx-lm serves, batched: parallm's greedy output for each prompt, computed in a
batch with staggered joins, chunked prefill and idle rows, equals mlx-lm's own generation of that
prompt alone, token for token. Each tiny config keeps the family's real features on (scaled RoPE,
sliding windows, sinks, MoE, MLA, linear attention, SSM): see tests/family_configs.py."""
from __future__ import annotations

import os

import pytest

from parallm.engine.engine import Engine, EngineConfig
from parallm.engine.types import EngineRequest, SamplingParams
from parallm.models import load

from engine_helpers import make_prompt, reference_greedy, run_to_completion, tokens_of
from family_configs import FAMILIES, write_family_model

GREEDY = dict(temperature=0.0, ignore_eos=True)
# longer than the configs' sliding windows, and mixed, so rows sit at different positions
PROMPT_LENGTHS = [5, 29, 13, 41, 2, 20]
# cpu in CI; the GPU check (loadtests/gpu_checks.sh tests) runs these on the device's own backend
DEVICE = os.environ.get("PARALLM_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, parallm's LoadedModel, mlx-lm's own model) for one family."""
    from mlx_lm import load as mlx_lm_load

    path = write_family_model(request.param, tmp_path_factory.mktemp(request.param))
    reference_model, _ = mlx_lm_load(str(path))
    return request.param, load(str(path), device=DEVICE), reference_model


class _Reference:
    def __init__(self, model):
        self.model = model


def request(rid: str, prompt: list[int], max_tokens: int, n: int = 1) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, n=n, logprobs=True, **GREEDY))


def reference_logprobs(model, prompt: list[int], max_tokens: int) -> list[float]:
    """mlx-lm's log-probability of each greedy token, for the prompt alone."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    return [logprobs[token].item() for token, logprobs in
            generate_step(mx.array(prompt), model, max_tokens=max_tokens, sampler=lambda x: mx.argmax(x, axis=-1))]


def assert_same_logprobs(outputs: list, model, prompt: list[int], max_tokens: int, what) -> None:
    """Closer than greedy tokens: a tiny random model's next token often hangs on the last few
    tokens only, so a wrong window or state can leave the argmax alone but not the logprobs."""
    got = [lp.logprob for o in outputs if o.index == 0 for lp in (o.logprobs or [])]
    expected = reference_logprobs(model, prompt, max_tokens)
    assert len(got) == len(expected), what
    worst = max(abs(a - b) for a, b in zip(got, expected))
    assert worst < 1e-3, (what, worst)


def test_batched_greedy_equals_mlx_lm_alone(family):
    name, loaded, reference = family
    engine = Engine(loaded, EngineConfig(max_num_seqs=4, max_num_batched_tokens=24))
    schedule: dict[int, list] = {}
    for i, n in enumerate(PROMPT_LENGTHS):  # joins at steps 0, 0, 1, 3, 4, 6: some wait for a row
        schedule.setdefault(i * 5 // 4, []).append(request(f"r{i}", make_prompt(i, n), 8 + i))
    outs = run_to_completion(engine, schedule)
    for i, n in enumerate(PROMPT_LENGTHS):
        expected = reference_greedy(_Reference(reference), make_prompt(i, n), 8 + i)
        assert tokens_of(outs[f"r{i}"]) == expected, (name, i)
        assert_same_logprobs(outs[f"r{i}"], reference, make_prompt(i, n), 8 + i, (name, i))


def test_n_choices_and_preemption_stay_exact(family):
    """n > 1 (greedy: every choice is the reference) and rows preempted under a tiny KV budget
    and recomputed later."""
    name, loaded, reference = family
    layout = Engine(loaded, EngineConfig()).cache_layout
    per_token = layout.bytes_per_token
    # room for about two sequences' K/V, besides every row's recurrent state
    budget = per_token * 70 + 4 * layout.state_bytes_per_sequence if per_token else None
    engine = Engine(loaded, EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, kv_budget_bytes=budget))
    prompts = [make_prompt(10 + i, 12 + 7 * i) for i in range(4)]
    outs = run_to_completion(engine, {0: [request("n2", prompts[0], 10, n=2)],
                                      1: [request(f"p{i}", p, 16) for i, p in enumerate(prompts[1:])]})
    expected = reference_greedy(_Reference(reference), prompts[0], 10)
    assert tokens_of(outs["n2"], 0) == expected and tokens_of(outs["n2"], 1) == expected, name
    for i, p in enumerate(prompts[1:]):
        assert tokens_of(outs[f"p{i}"]) == reference_greedy(_Reference(reference), p, 16), (name, i)
        assert_same_logprobs(outs[f"p{i}"], reference, p, 16, (name, i))
    if per_token:
        assert engine.stats().num_preemptions > 0, name


def test_a_later_turn_reuses_the_earlier_prompt_from_the_prefix_cache(family):
    """An agent's next turn extends the previous prompt: its K/V (or window, or recurrent state)
    comes from the prefix cache, and the tokens are still mlx-lm's for the whole prompt alone."""
    name, loaded, reference = family
    engine = Engine(loaded, EngineConfig(max_num_seqs=4, max_num_batched_tokens=24, prefix_block_size=8))
    first = make_prompt(30, 37)
    later = first + make_prompt(31, 11)
    run_to_completion(engine, {0: [request("turn1", first, 4)]})
    outs = run_to_completion(engine, {0: [request("turn2", later, 10)]})
    assert tokens_of(outs["turn2"]) == reference_greedy(_Reference(reference), later, 10), name
    assert_same_logprobs(outs["turn2"], reference, later, 10, name)
    assert outs["turn2"][-1].usage.cached_tokens == (len(first) - 1) // 8 * 8, name
