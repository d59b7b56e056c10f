"""BatchSampler behaviour: per-row parameters in one batch, seeds, penalties, logprobs."""
from __future__ import annotations

import numpy as np
import mlx.core as mx
import pytest

from parallm.engine.sampler import BatchSampler, choice_seed
from parallm.engine.types import SamplingParams

V = 64


def random_logits(b: int, v: int = V, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((b, v)) * scale).astype(np.float32)


def sample_np(sampler, logits: np.ndarray, slots):
    out = sampler.sample(mx.array(logits), slots)
    arrays = [a for a in (out.token_ids, out.logprobs, out.top_ids, out.top_logprobs) if a is not None]
    mx.eval(*arrays)
    return out


def tokens(sampler, logits, slots) -> list[int]:
    return np.array(sample_np(sampler, logits, slots).token_ids).tolist()


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    keep = expected > 0
    assert counts[~keep].sum() == 0, "drew a token whose probability is zero"
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


# A chi-square statistic with d degrees of freedom has mean d and sd sqrt(2d): mean + 10 sd is a
# bound that a correct sampler fails with negligible probability but a biased one does not meet.
def chi_square_bound(dof: int) -> float:
    return dof + 10 * np.sqrt(2 * dof)


def test_greedy_is_argmax():
    s = BatchSampler(8, V)
    logits = random_logits(5)
    for slot in range(5):
        s.add_row(slot, SamplingParams(temperature=0.0), [1, 2], seed=None)
    assert tokens(s, logits, [0, 1, 2, 3, 4]) == np.argmax(logits, -1).tolist()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.5, top_p=1e-6),
    SamplingParams(temperature=1.0, min_p=1.0),
    SamplingParams(temperature=1e-4),
    SamplingParams(temperature=1e-40),  # treated as greedy: 1/T would overflow
])
def test_degenerate_truncation_equals_greedy(params):
    s = BatchSampler(16, V)
    logits = random_logits(12, seed=3)
    for slot in range(12):
        s.add_row(slot, params, [], seed=slot)
    for _ in range(3):  # several steps: fresh noise each time, still the argmax
        assert tokens(s, logits, list(range(12))) == np.argmax(logits, -1).tolist()


def test_logit_bias_forces_and_forbids_tokens():
    s = BatchSampler(4, V)
    logits = random_logits(3, seed=1)
    best = np.argmax(logits, -1)
    s.add_row(0, SamplingParams(temperature=1.0, logit_bias=((7, 100.0),)), [], seed=1)
    s.add_row(1, SamplingParams(temperature=0.0, logit_bias=((int(best[1]), -100.0),)), [], seed=None)
    s.add_row(2, SamplingParams(temperature=0.0), [], seed=None)  # no bias: untouched
    got = tokens(s, logits, [0, 1, 2])
    assert got[0] == 7
    second = logits[1].copy()
    second[best[1]] -= 100.0
    assert got[1] == int(np.argmax(second))
    assert got[2] == int(best[2])


def reference_penalised(logits: np.ndarray, prompt: list[int], generated: list[int],
                        p: SamplingParams) -> np.ndarray:
    """Slow per-row reference: HF/vLLM repetition penalty over prompt + generated tokens,
    OpenAI presence/frequency penalties over generated tokens, logit_bias first."""
    out = logits.astype(np.float64).copy()
    for token, bias in p.logit_bias:
        out[token] += bias
    for token in set(prompt) | set(generated):
        out[token] = out[token] / p.repetition_penalty if out[token] > 0 else out[token] * p.repetition_penalty
    for token in set(generated):
        count = generated.count(token)
        out[token] -= p.frequency_penalty * count + p.presence_penalty
    return out


def test_penalties_match_reference_over_steps():
    s = BatchSampler(6, V)
    rows = {
        4: (SamplingParams(temperature=0.7, repetition_penalty=1.5), [1, 2, 3, 3]),
        1: (SamplingParams(temperature=0.0, presence_penalty=0.8, frequency_penalty=0.3), [5, 9]),
        0: (SamplingParams(temperature=1.0), [1, 2]),  # no penalties: logits untouched
        2: (SamplingParams(temperature=1.2, repetition_penalty=0.8, presence_penalty=-0.5,
                           frequency_penalty=1.0, logit_bias=((3, 2.0),)), [3, 4, 5]),
    }
    for slot, (p, prompt) in rows.items():
        s.add_row(slot, p, prompt, seed=slot)
    slots = [2, 0, 4, 1]
    generated = {slot: [] for slot in slots}
    for step in range(6):
        # few distinct logits values so tokens repeat and counts > 1 happen
        logits = random_logits(4, seed=step, scale=1.0)
        logits[:, :8] += 4.0
        got = np.array(s.process_logits(mx.array(logits), slots))
        for b, slot in enumerate(slots):
            p, prompt = rows[slot]
            want = reference_penalised(logits[b], prompt, generated[slot], p)
            np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)
        for b, t in enumerate(tokens(s, logits, slots)):
            generated[slots[b]].append(t)
        slots = slots[::-1]  # the batch order changes: history must follow the slot
    assert any(len(set(g)) < len(g) for g in generated.values()), "test never exercised counts > 1"


def test_row_result_is_independent_of_batch_and_slot():
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, min_p=0.02, logprobs=True,
                            top_logprobs=3, repetition_penalty=1.2)
    row = random_logits(1, seed=42)
    alone = BatchSampler(8, V)
    alone.add_row(0, params, [1, 2, 3], seed=1234)
    busy = BatchSampler(8, V)
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=2.0, top_k=5),
              SamplingParams(temperature=0.5, top_p=0.5, logit_bias=((0, 5.0),), top_logprobs=5, logprobs=True),
              SamplingParams(temperature=1.0, frequency_penalty=1.0)]
    for slot, p in zip([0, 1, 2, 3], others):
        busy.add_row(slot, p, [4], seed=None)
    busy.add_row(6, params, [1, 2, 3], seed=1234)
    for step in range(8):
        step_row = row + step * 0.05
        a = sample_np(alone, step_row, [0])
        batch = np.concatenate([random_logits(2, seed=100 + step), step_row, random_logits(2, seed=200 + step)])
        b = sample_np(busy, batch, [3, 0, 6, 2, 1])
        assert int(np.array(a.token_ids)[0]) == int(np.array(b.token_ids)[2])
        np.testing.assert_allclose(np.array(a.logprobs)[0], np.array(b.logprobs)[2], rtol=1e-6)
        np.testing.assert_array_equal(np.array(a.top_ids)[0], np.array(b.top_ids)[2, :3])


def test_seeded_rows_repeat_and_different_seeds_differ():
    logits = np.zeros((1, V), np.float32)  # uniform: the draw is all noise
    def run(seed, slot, filler):
        s = BatchSampler(8, V)
        for i in range(filler):
            s.add_row((slot + 1 + i) % 8, SamplingParams(temperature=1.0), [], seed=None)
        s.add_row(slot, SamplingParams(temperature=1.0), [], seed=seed)
        slots = [slot] + [(slot + 1 + i) % 8 for i in range(filler)]
        out = []
        for _ in range(20):
            out.append(tokens(s, np.repeat(logits, len(slots), 0), slots)[0])
        return out
    first = run(7, 0, 0)
    assert run(7, 5, 3) == first
    assert run(7, 2, 7) == first
    assert run(8, 0, 0) != first
    assert len(set(first)) > 5  # noise changes from step to step


def test_unseeded_rows_draw_different_streams():
    s = BatchSampler(4, V)
    for slot in range(4):
        s.add_row(slot, SamplingParams(temperature=1.0), [], seed=None)
    logits = np.zeros((4, V), np.float32)
    draws = np.array([tokens(s, logits, [0, 1, 2, 3]) for _ in range(10)])  # [steps, rows]
    assert len({tuple(draws[:, r]) for r in range(4)}) == 4


def test_resuming_after_preemption_continues_the_seeded_stream():
    logits = random_logits(1, seed=5, scale=0.5)
    params = SamplingParams(temperature=1.0, frequency_penalty=0.5)
    s = BatchSampler(2, V)
    s.add_row(0, params, [3, 4], seed=99)
    straight = [tokens(s, logits, [0])[0] for _ in range(10)]
    r = BatchSampler(2, V)
    r.add_row(1, params, [3, 4], seed=99)
    head = [tokens(r, logits, [1])[0] for _ in range(4)]
    r.remove_row(1)
    r.add_row(0, params, [3, 4], seed=99, generated_token_ids=head)
    tail = [tokens(r, logits, [0])[0] for _ in range(6)]
    assert head + tail == straight


def test_choice_seed_keeps_first_and_separates_others():
    assert choice_seed(123, 0) == 123
    seeds = {choice_seed(123, i) for i in range(10)}
    assert len(seeds) == 10
    assert choice_seed(123, 3) == choice_seed(123, 3)


def draw_many(params: SamplingParams, logits_row: np.ndarray, n_rows: int, steps: int) -> np.ndarray:
    v = logits_row.size
    s = BatchSampler(n_rows, v)
    for slot in range(n_rows):
        s.add_row(slot, params, [], seed=slot)
    batch = np.repeat(logits_row[None, :], n_rows, 0)
    counts = np.zeros(v, np.int64)
    for _ in range(steps):
        counts += np.bincount(tokens(s, batch, list(range(n_rows))), minlength=v)
    return counts


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_draws_follow_the_distribution():
    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], np.float32))
    counts = draw_many(SamplingParams(temperature=1.0), logits, n_rows=500, steps=8)
    assert chi_square(counts, softmax(logits)) < chi_square_bound(5)


def test_temperature_reshapes_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    for t in (0.5, 2.0):
        counts = draw_many(SamplingParams(temperature=t), logits, n_rows=500, steps=8)
        assert chi_square(counts, softmax(logits / t)) < chi_square_bound(3)
    # and a wrong target is rejected by the same check (the test can fail)
    counts = draw_many(SamplingParams(temperature=2.0), logits, n_rows=500, steps=8)
    assert chi_square(counts, softmax(logits)) > chi_square_bound(3)


def test_top_p_top_k_min_p_follow_the_truncated_distribution():
    probs = np.array([0.4, 0.3, 0.15, 0.1, 0.05], np.float32)
    logits = np.log(probs)
    cases = [
        # nucleus 0.8: mass before the 3rd token is 0.7 < 0.8 -> kept; before the 4th 0.85 -> cut
        (SamplingParams(temperature=1.0, top_p=0.8), [1, 1, 1, 0, 0]),
        (SamplingParams(temperature=1.0, top_k=2), [1, 1, 0, 0, 0]),
        # min_p 0.3: keep p >= 0.3 * 0.4 = 0.12
        (SamplingParams(temperature=1.0, min_p=0.3), [1, 1, 1, 0, 0]),
        # top_k 4 then top_p 0.75 of the renormalised 4 (0.421, 0.316, 0.158, 0.105): keeps 2
        (SamplingParams(temperature=1.0, top_k=4, top_p=0.7), [1, 1, 0, 0, 0]),
    ]
    for params, keep in cases:
        target = probs * np.array(keep)
        target = target / target.sum()
        counts = draw_many(params, logits, n_rows=400, steps=6)
        assert chi_square(counts, target) < chi_square_bound(int(sum(keep)) - 1), params


def test_logprobs_are_raw_and_top_logprobs_ordered():
    s = BatchSampler(4, V)
    s.add_row(0, SamplingParams(temperature=1.0, logprobs=True, top_logprobs=V), [], seed=3)
    s.add_row(1, SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2,
                                logit_bias=((5, 50.0),)), [], seed=None)
    s.add_row(2, SamplingParams(temperature=0.7), [], seed=None)
    logits = random_logits(3, seed=9)
    out = sample_np(s, logits, [0, 1, 2])
    raw_logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.array(out.token_ids)
    assert ids[1] == 5  # sampled from the biased distribution ...
    # rows 0 and 1 asked for logprobs (row 2 did not: its entries are unspecified)
    np.testing.assert_allclose(np.array(out.logprobs)[:2], raw_logprobs[[0, 1], ids[:2]], rtol=1e-5, atol=1e-5)
    top_ids, top_lp = np.array(out.top_ids), np.array(out.top_logprobs)
    assert top_ids.shape == (3, V)
    np.testing.assert_allclose(np.exp(top_lp[0]).sum(), 1.0, rtol=1e-5)  # all V: sums to one
    assert sorted(top_ids[0].tolist()) == list(range(V))
    assert np.all(np.diff(top_lp[:2], axis=1) <= 0)
    np.testing.assert_array_equal(top_ids[1, :2], np.argsort(-logits[1])[:2])  # ... logprobs are raw


def test_no_logprobs_requested_returns_none():
    s = BatchSampler(2, V)
    s.add_row(0, SamplingParams(temperature=0.0), [], seed=None)
    out = s.sample(mx.array(random_logits(1)), [0])
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None
    assert out.token_ids.dtype == mx.int32


def test_bad_parameters_and_slots_are_rejected_with_clear_errors():
    s = BatchSampler(2, V)
    with pytest.raises(ValueError, match="top_p"):
        s.add_row(0, SamplingParams(top_p=0.0), [], seed=None)
    with pytest.raises(ValueError, match="temperature"):
        s.add_row(0, SamplingParams(temperature=-1.0), [], seed=None)
    with pytest.raises(ValueError, match="logit_bias"):
        s.add_row(0, SamplingParams(logit_bias=((V, 1.0),)), [], seed=None)
    with pytest.raises(ValueError, match="slot 5"):
        s.add_row(5, SamplingParams(), [], seed=None)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        s.add_row(0, SamplingParams(repetition_penalty=1.2), [1, V + 3], seed=None)
    with pytest.raises(ValueError, match="no row"):  # a rejected row leaves nothing behind
        s.sample(mx.array(random_logits(1)), [0])
    s.add_row(0, SamplingParams(), [], seed=None)
    assert s.sample(mx.zeros((0, V)), []).token_ids.shape == (0,)
    with pytest.raises(ValueError, match="no row"):
        s.sample(mx.array(random_logits(2)), [0, 1])
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        s.sample(mx.array(random_logits(2)), [0])


def test_bfloat16_logits_and_large_vocab_top_k():
    v = 49152
    s = BatchSampler(3, v)
    s.add_row(0, SamplingParams(temperature=0.8, top_k=50, top_p=0.95), [1], seed=1)
    s.add_row(1, SamplingParams(temperature=0.0), [1], seed=None)
    s.add_row(2, SamplingParams(temperature=1.0, top_k=40), [1], seed=2)
    logits = mx.array(random_logits(3, v)).astype(mx.bfloat16)
    out = sample_np(s, np.array(logits.astype(mx.float32)), [0, 1, 2])
    ids = np.array(out.token_ids)
    ranked = np.argsort(-np.array(logits.astype(mx.float32)), -1)
    assert ids[0] in ranked[0, :50] and ids[2] in ranked[2, :40]
    assert ids[1] == ranked[1, 0]


def test_built_on_one_thread_sampled_on_another():
    """The engine builds its sampler on the main thread and samples on its worker thread."""
    import threading
    s = BatchSampler(4, V)
    s.add_row(0, SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.2, logprobs=True), [1, 2], seed=1)
    s.add_row(1, SamplingParams(temperature=0.0), [3], seed=None)
    result = {}

    def worker():
        try:
            result["tokens"] = [tokens(s, random_logits(2, seed=i), [0, 1]) for i in range(3)]
        except Exception as exc:  # surfaced below with its message
            result["error"] = exc

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert "error" not in result, result.get("error")
    assert len(result["tokens"]) == 3


def test_top_p_bisection_equals_sort_reference():
    """The sort-free nucleus threshold matches a sorted-cumsum reference, ties and floors included."""
    from parallm.engine.sampling_ops import top_p_threshold, top_p_threshold_by_sort
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 500)).astype(np.float32) * 2
    x[1, :50] = 3.0  # a block of ties at the top
    x[2] = np.round(x[2])  # many ties everywhere
    x[3, 100:] = -np.inf  # already masked tokens
    inv_t = np.array([[1.0], [0.5], [2.0], [1.0], [1.3], [1.0]], np.float32)
    floor = np.full((6, 1), -np.inf, np.float32)
    floor[4] = 1.0  # a min_p / top_k threshold below the nucleus
    top_p = np.array([[0.9], [0.5], [0.3], [0.99], [0.7], [1e-6]], np.float32)
    args = [mx.array(a) for a in (x, inv_t, floor, top_p)]
    bisect = np.array(top_p_threshold(*args))
    by_sort = np.array(top_p_threshold_by_sort(*args))
    np.testing.assert_array_equal(bisect, by_sort)
    # and against a plain numpy nucleus (row 0): smallest prefix reaching 0.9 of the mass
    desc = np.sort(x[0])[::-1]
    p = np.exp(desc - desc[0]); p /= p.sum()
    n = int(np.searchsorted(np.cumsum(p), 0.9) + 1)
    assert bisect[0, 0] == desc[n - 1]


def test_min_p_applies_after_temperature():
    probs = np.array([0.4, 0.3, 0.15, 0.1, 0.05], np.float32)
    logits = np.log(probs)
    # at T=2 the tempered probabilities are proportional to sqrt(p): 0.632, 0.548, 0.387, 0.316, 0.224
    # (unnormalised); min_p 0.55 keeps those >= 0.55 * 0.632 = 0.348: the first three
    tempered = softmax(logits / 2.0)
    target = tempered * np.array([1, 1, 1, 0, 0])
    counts = draw_many(SamplingParams(temperature=2.0, min_p=0.55), logits, n_rows=400, steps=6)
    assert chi_square(counts, target / target.sum()) < chi_square_bound(2)


def test_fused_and_unfused_gumbel_kernels_agree():
    """GPUs run the fused draw, the CPU the unfused one: the same tokens either way."""
    from parallm.engine.rng import row_keys
    from parallm.engine.sampling_ops import SamplingKernels
    b, v = 64, 1000
    x = mx.array(random_logits(b, v, seed=8))
    inv_t = mx.array(np.linspace(0.5, 2.0, b, dtype=np.float32))[:, None]
    thr = mx.array(np.where(np.arange(b) % 2 == 0, -np.inf, 0.0).astype(np.float32))[:, None]
    keys = mx.array(row_keys(np.arange(b, dtype=np.uint32), np.ones(b, np.uint32), np.arange(b)))
    vocab_ids = mx.arange(v, dtype=mx.uint32)
    fused = SamplingKernels(fuse_gumbel=True).gumbel_argmax(x, inv_t, thr, keys, vocab_ids)
    plain = SamplingKernels(fuse_gumbel=False).gumbel_argmax(x, inv_t, thr, keys, vocab_ids)
    np.testing.assert_array_equal(np.array(fused), np.array(plain))


def test_counter_uniforms_look_uniform_and_independent_across_rows():
    from parallm.engine.rng import CounterNoise, row_keys
    noise = CounterNoise(4096)
    keys = row_keys(np.array([1, 1, 2], np.uint32), np.zeros(3, np.uint32), np.array([0, 1, 0]))
    u = np.array(noise.uniform(keys))
    assert u.min() > 0 and u.max() < 1
    for row in u:
        counts = np.histogram(row, bins=16, range=(0, 1))[0]
        assert chi_square(counts, np.full(16, 1 / 16)) < chi_square_bound(15)
    # consecutive steps of one seed, and neighbouring seeds, are uncorrelated
    assert abs(np.corrcoef(u[0], u[1])[0, 1]) < 0.1 and abs(np.corrcoef(u[0], u[2])[0, 1]) < 0.1


def test_top_p_candidates_exact_when_covered_and_capped_when_flat():
    from parallm.engine.sampling_ops import top_p_threshold, top_p_threshold_in_candidates
    rng = np.random.default_rng(5)
    peaked = rng.standard_normal((4, 2000)).astype(np.float32) * 4
    inv_t = mx.array(np.array([[1.0], [1.5], [0.8], [1.0]], np.float32))
    floor = mx.full((4, 1), -np.inf)
    top_p = mx.array(np.array([[0.9], [0.5], [0.95], [0.7]], np.float32))
    exact = np.array(top_p_threshold(mx.array(peaked), inv_t, floor, top_p))
    cands = np.array(top_p_threshold_in_candidates(mx.array(peaked), inv_t, floor, top_p, 256))
    np.testing.assert_array_equal(exact, cands)

    flat = rng.standard_normal((1, 2000)).astype(np.float32) * 1e-3
    one = mx.ones((1, 1))
    args = (mx.array(flat), one, mx.full((1, 1), -np.inf), mx.full((1, 1), 0.9))
    capped = np.array(top_p_threshold_in_candidates(*args, 16))
    assert (flat >= capped).sum() == 16  # the nucleus (~1800 tokens) is capped at 16
    assert (flat >= np.array(top_p_threshold(*args))).sum() > 1500


def test_sampler_with_top_p_candidates_matches_exact_on_peaked_rows():
    logits = random_logits(6, seed=21, scale=4.0)
    draws = []
    for candidates in (None, 32):
        s = BatchSampler(6, V, top_p_candidates=candidates)
        for slot in range(6):
            s.add_row(slot, SamplingParams(temperature=0.8, top_p=0.8), [], seed=slot)
        draws.append([tokens(s, logits, list(range(6))) for _ in range(5)])
    assert draws[0] == draws[1]
